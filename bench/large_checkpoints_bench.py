"""Large checkpoints: a uniform soup of 4 sharded ~1.6 GB checkpoints in bounded memory.

The checkpoints have the tensor names and shapes of GPT-2 medium with its LM head
(``GPT2LMHeadModel.state_dict()``: 24 layers, width 1024, vocab 50257, 406M parameters,
fp32, 1.63 GB), stored as Hugging Face shards of at most 500 MB with
``model.safetensors.index.json``; the values are random. They are written once under
``bench/_work/large/`` and deleted at the end unless ``--keep``.

Each measurement runs in a fresh child process, so its peak RSS (``VmHWM``, including
``import torch``) is its own; wall time covers the work only:

- ``read``: read every input byte once into one reused 8 MB buffer: the floor any
  averaging tool has to pay; measured right before and after the soup.
- ``write``: write (and fsync) as many bytes as one soup has: the other floor.
- ``hash``: the sha256 of every input, which the soup card records (``Ingredient.sha256``).
- ``average``: ``modelsoup.average(folders).save(out)``: the streamed uniform soup, written
  as an HF folder with shards, index and config, on first contact with the inputs: the
  sha256 of every input byte for its card is computed on the way (empty hash cache).
- ``average-again``: the same on inputs seen before: their hashes are remembered
  (``modelsoup.formats.hashcache``, filled by the ``hash`` row).
- ``materialise``: what a greedy soup holds: an ``Accumulator`` of the 4 ingredients
  written into a model of the same architecture (one model + its float32 sum).

Page cache: the inputs (6.5 GB) fit in RAM; every method reads them from the page cache
(the generator's writes and the first ``read`` leave them there). ``--cold`` evicts this
benchmark's own files from the cache (``posix_fadvise(DONTNEED)``) before each method,
so reads come from disk without disturbing anything else on the machine.

Run::

    .venv/bin/python bench/large_checkpoints_bench.py            # ~10 GB of disk, a few minutes
    .venv/bin/python bench/large_checkpoints_bench.py --keep     # keep bench/_work/large
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchlib import (
    WORK,
    gpt2_shapes,
    machine,
    mib,
    peak_rss_bytes,
    run_with_hash_cache,
    table,
)

ROOT = WORK / "large"
K = 4
SHARD = 500 * 10**6


def gpt2_medium_layout() -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``GPT2LMHeadModel.state_dict()`` for GPT-2 medium."""
    d, vocab, positions, layers = 1024, 50257, 1024, 24
    return gpt2_shapes(d, vocab, positions, layers)


def folders() -> list[Path]:
    return [ROOT / f"ft-{i}" for i in range(K)]


def generate() -> None:
    """Write the K checkpoints as HF shard folders (skipped when already there)."""
    import torch

    from modelsoup.formats.base import TensorMeta
    from modelsoup.formats.hf_folder import write_folder

    layout = {n: TensorMeta(s, torch.float32) for n, s in gpt2_medium_layout().items()}
    for i, folder in enumerate(folders()):
        if (folder / "model.safetensors.index.json").exists():
            continue
        gen = torch.Generator().manual_seed(i)
        start = time.perf_counter()
        write_folder(
            folder,
            layout,
            lambda n, gen=gen: torch.randn(layout[n].shape, generator=gen).mul_(0.02),
            max_shard_size=SHARD,
        )
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 24}))
        print(f"wrote {folder} in {time.perf_counter() - start:.1f} s", flush=True)


def input_files() -> list[Path]:
    return sorted(p for f in folders() for p in f.glob("*.safetensors"))


# -- the children: one measurement each ------------------------------------------------
def child(method: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    paths = [str(f) for f in folders()]
    out = ROOT / "soup"
    start = time.perf_counter()
    extra: dict = {}
    if method == "read":
        buf = bytearray(1 << 23)
        total = 0
        for path in input_files():
            with open(path, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        extra["bytes"] = total
    elif method == "write":
        target = ROOT / "write-floor.bin"
        block = torch.randn(1 << 21).numpy().tobytes()  # 8 MB
        total = sum(p.stat().st_size for p in input_files()) // K
        with open(target, "wb") as fh:
            for _ in range(total // len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        target.unlink()
        extra["bytes"] = total
    elif method == "hash":
        from modelsoup.ingredients import open_ingredients

        for ing in open_ingredients(paths):
            _ = ing.sha256
    elif method in ("average", "average-again"):
        import modelsoup

        modelsoup.average(paths).save(out, max_shard_size=SHARD, progress=False)
        extra["bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    elif method == "materialise":
        from modelsoup.accumulator import Accumulator
        from modelsoup.ingredients import open_ingredients

        ingredients = open_ingredients(paths)
        model = module_from_layout(gpt2_medium_layout())
        acc = Accumulator(ingredients)
        for i in range(len(ingredients)):
            acc.add(i)
        acc.write_into(model)
        first = "transformer.h.0.attn.c_attn.weight"
        expect = sum(ing.tensor(first) for ing in ingredients) / len(ingredients)
        extra["max_error"] = float((model.get_parameter(first) - expect).abs().max())
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": seconds, "peak_rss": peak_rss_bytes(), **extra}


def module_from_layout(shapes: dict[str, tuple[int, ...]]):
    """An ``nn.Module`` tree with uninitialised parameters named and shaped like ``shapes``."""
    import torch

    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape), requires_grad=False))
    return root


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only; Linux)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(method: str, cold: bool) -> dict:
    if cold:
        evict(input_files())
    cmd = [sys.executable, __file__, "--child", method]
    # the kept sha256 cache is filled by the "hash" row; "average" starts empty
    out_text = run_with_hash_cache(cmd, ROOT, first_contact=method == "average")
    return json.loads(out_text.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep bench/_work/large")
    parser.add_argument("--cold", action="store_true", help="inputs not in the page cache")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    print(machine())
    free = shutil.disk_usage(WORK.parent).free
    if free < 12 * 10**9 and not (ROOT / "ft-3").exists():
        raise SystemExit(f"needs ~12 GB free on {WORK.parent}, has {free / 1e9:.1f} GB")
    try:
        generate()
        size = sum(p.stat().st_size for p in input_files())
        print(f"{K} checkpoints, {size / 1e9:.2f} GB in all, {len(input_files())} shards")
        (ROOT / "sha256-cache.jsonl").unlink(missing_ok=True)
        methods = ("read", "write", "hash", "average", "average-again", "read", "materialise")
        results = [run_child(m, args.cold) for m in methods]
        floor = min(r["seconds"] for r in results if r["method"] == "read")
        write = next(r["seconds"] for r in results if r["method"] == "write")
        rows = []
        for r in results:
            rate = r.get("bytes", size) / r["seconds"] / 1e9
            note = ""
            if r["method"].startswith("average"):
                rate = size / r["seconds"] / 1e9  # input bytes per second
                note = (
                    f"{r['seconds'] / floor:.1f}x read, {r['seconds'] / (floor + write):.1f}x "
                    f"read+write; wrote {r['bytes'] / 1e9:.2f} GB"
                )
            if r["method"] == "materialise":
                note = f"max error {r['max_error']:.1e}"
            rows.append(
                [r["method"], f"{r['seconds']:.2f}", f"{rate:.2f}", mib(r["peak_rss"]), note]
            )
        print(table(["method", "seconds", "GB/s", "peak RSS", "note"], rows))
    finally:
        if not args.keep:
            shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
