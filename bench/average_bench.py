"""Uniform soup of K large checkpoints: modelsoup against the two usual ways of doing it.

Methods (each one runs in a fresh subprocess, so peak RSS is that method's alone):

- ``load-all``: the seed blog's way: ``safetensors.torch.load_file`` every checkpoint,
  then average key by key, then ``save_file``.
- ``running-sum``: the official model-soups code's way: load one full state dict at a
  time, add it into a running sum, divide at the end, ``save_file``.
- ``modelsoup``: ``modelsoup.average(paths).save(out, progress=False)``, which streams
  tensor by tensor, as on any run after the first: the inputs' sha256 hashes for the soup
  card are remembered (``modelsoup.formats.hashcache``; primed by one untimed run).
- ``modelsoup-first``: the same on first contact with the inputs (an empty hash cache),
  so the sha256 of every input byte is computed while reading.
- ``sketch``: not a target, a what-if: the same streaming without the sha256 of the
  inputs (and without the soup card); see ``bench/proposed_fixes.py``.

The checkpoints are random fp32 safetensors files with GPT-2-like names and shapes
(``transformer.h.3.attn.c_attn.weight`` ...), about ``--params`` parameters each; they
are written once under ``bench/_work/average/`` and removed at the end unless
``--keep``. Page cache: by default every input file is read once right before each
method runs, so every method starts with all its inputs cached (``--cold`` drops the
page cache instead; needs root). Wall time covers the work only, not interpreter start
or imports; CPU is the child's user + system time over the same span (less sensitive
than wall time to other work on the machine); page faults are the child's minor faults
(each costs a trap and, for fresh memory, a zeroed page); peak RSS is the child's ``VmHWM`` and
does include the imports.

Every method runs torch on ``--threads`` threads (1 by default: these loops are
memory-bound, and on a 2-core machine whose other core is busy, torch's second
intra-op thread made large ``add_`` calls up to 30x slower, very unevenly).

Run::

    .venv/bin/python bench/average_bench.py                    # K = 2, 8, 32 at 50M params
    .venv/bin/python bench/average_bench.py --ks 2,4 --params 5M --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from benchlib import (
    WORK,
    drop_page_cache,
    gpt2_shapes,
    machine,
    mib,
    parse_count,
    peak_rss_bytes,
    rss_bytes,
    run_with_hash_cache,
    table,
    warm_page_cache,
)

METHODS = ("load-all", "running-sum", "modelsoup", "modelsoup-first", "sketch")


# -- checkpoints -------------------------------------------------------------------
def gpt2_layout(params: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a GPT-2-like model (untied head) with about ``params`` weights.

    Width grows with the square root of the size, vocabulary = 62.5 x width (32000 at
    width 512), and layers fill the rest.
    """
    d = max(64, 64 * round(math.sqrt(params / 221) / 64))
    vocab, ctx = int(62.5 * d), 1024
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((params - 2 * vocab * d - ctx * d) / per_layer))
    return gpt2_shapes(d, vocab, ctx, layers)


def make_checkpoints(folder: Path, shapes: dict[str, tuple[int, ...]], count: int) -> list[Path]:
    """Write ``count`` random fp32 checkpoints (kept between runs while complete)."""
    import safetensors.torch
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    nbytes = 4 * sum(math.prod(s) for s in shapes.values())
    paths = []
    for k in range(count):
        path = folder / f"ft-{k:02d}.safetensors"
        paths.append(path)
        if path.exists() and path.stat().st_size > nbytes:
            continue
        gen = torch.Generator().manual_seed(k)
        state = {}
        for name, shape in shapes.items():
            noise = torch.randn(shape, generator=gen)
            is_norm_scale = ".ln_" in name and name.endswith(".weight")
            state[name] = 1 + 0.02 * noise if is_norm_scale else 0.02 * noise
        safetensors.torch.save_file(state, str(path))
        print(f"  wrote {path.name}", file=sys.stderr, flush=True)
    return paths


# -- the methods (run in the child) ------------------------------------------------
def load_all(paths: list[Path], out: Path) -> None:
    import safetensors.torch

    state_dicts = [safetensors.torch.load_file(str(p)) for p in paths]
    soup = {}
    for key in state_dicts[0]:
        soup[key] = sum(sd[key] for sd in state_dicts) / len(state_dicts)
    safetensors.torch.save_file(soup, str(out))


def running_sum(paths: list[Path], out: Path) -> None:
    import safetensors.torch

    soup: dict = {}
    for j, path in enumerate(paths):
        state_dict = safetensors.torch.load_file(str(path))
        if j == 0:
            soup = state_dict
        else:
            for key, value in state_dict.items():
                soup[key].add_(value)
        del state_dict
    for value in soup.values():
        value.div_(len(paths))
    safetensors.torch.save_file(soup, str(out))


def child(method: str, out: Path, paths: list[Path], threads: int) -> None:
    # Each method imports what it needs, before the clock starts.
    if method.startswith("modelsoup"):
        import modelsoup
    elif method == "sketch":
        from proposed_fixes import stream_average
    else:
        import safetensors.torch  # noqa: F401
    import torch

    torch.set_num_threads(threads)
    after_import = rss_bytes()
    result: dict = {"method": method}
    cpu = os.times()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    if method == "load-all":
        load_all(paths, out)
    elif method == "running-sum":
        running_sum(paths, out)
    elif method == "sketch":
        stream_average(paths, out)
    else:
        soup = modelsoup.average(paths)
        result["open_seconds"] = time.perf_counter() - start
        soup.save(out, progress=False)
    result["seconds"] = time.perf_counter() - start
    now = os.times()
    result["cpu_seconds"] = now.user - cpu.user + now.system - cpu.system
    result["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    result["peak_rss"] = peak_rss_bytes()
    result["rss_after_import"] = after_import
    print(json.dumps(result))


# -- the driver --------------------------------------------------------------------
def run_method(method: str, out: Path, paths: list[Path], cold: bool, threads: int) -> dict:
    if cold:
        drop_page_cache()
    else:
        warm_page_cache(paths)
    cmd = [sys.executable, __file__, "--child", method, "--out", str(out)]
    cmd += ["--threads", str(threads), *map(str, paths)]
    # the kept sha256 cache is primed by the driver; "modelsoup-first" starts empty
    out_text = run_with_hash_cache(cmd, out.parent, first_contact=method == "modelsoup-first")
    return json.loads(out_text.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for key in fa.keys():
            diff = (fa.get_tensor(key) - fb.get_tensor(key)).abs().max().item()
            worst = max(worst, diff)
    return worst


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def summarize(k: int, best: dict[str, dict], diff: float) -> tuple[list[list], str]:
    """Table rows for one K, and the verdict on the issue's targets."""
    ref = best["running-sum"]
    ref_work = ref["peak_rss"] - ref["rss_after_import"]
    rows = []
    for method in METHODS:
        r = best[method]
        work = r["peak_rss"] - r["rss_after_import"]
        note = f"open+check {r['open_seconds']:.2f} s" if "open_seconds" in r else ""
        rows.append(
            [
                k,
                method,
                f"{r['seconds']:.2f}",
                ratio(r["seconds"], ref["seconds"]),
                f"{r['cpu_seconds']:.2f}",
                ratio(r["cpu_seconds"], ref["cpu_seconds"]),
                mib(r["peak_rss"]),
                ratio(r["peak_rss"], ref["peak_rss"]),
                mib(work),
                ratio(work, ref_work),
                f"{r['faults'] / 1e3:,.0f}k",
                note,
            ]
        )
    soup = best["modelsoup"]
    first = best["modelsoup-first"]
    soup_work = soup["peak_rss"] - soup["rss_after_import"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    text = (
        f"K={k}: wall {verdict(soup['seconds'] <= ref['seconds'])} "
        f"({soup['seconds']:.2f} s vs {ref['seconds']:.2f} s; CPU {soup['cpu_seconds']:.2f} s "
        f"vs {ref['cpu_seconds']:.2f} s; first contact {first['seconds']:.2f} s, "
        f"{verdict(first['seconds'] <= ref['seconds'])}); "
        f"peak RSS {verdict(soup['peak_rss'] < ref['peak_rss'] / 2)} "
        f"({mib(soup['peak_rss'])} vs half of {mib(ref['peak_rss'])}); "
        f"above imports {verdict(soup_work < ref_work / 2)} "
        f"({mib(soup_work)} vs half of {mib(ref_work)}); "
        f"outputs agree to {diff:.1e}"
    )
    return rows, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="2,8,32", help="numbers of checkpoints to average")
    parser.add_argument("--params", default="50M", help="parameters per checkpoint, e.g. 5M")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each method")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.inputs, args.threads)
        return

    ks = sorted(int(k) for k in args.ks.split(","))
    shapes = gpt2_layout(parse_count(args.params))
    n_params = sum(math.prod(s) for s in shapes.values())
    size = 4 * n_params
    folder = WORK / "average" / f"p{n_params}"
    need = (max(ks) + len(METHODS)) * size
    free = shutil.disk_usage(WORK.parent).free
    have = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.exists() else 0
    if need - have > free - 2**30:
        sys.exit(
            f"needs {mib(need)} of disk under {WORK} but {mib(free)} is free; "
            "lower --ks or --params"
        )
    print(machine())
    print(
        f"{len(shapes)} tensors, {n_params / 1e6:.1f}M fp32 parameters, "
        f"{mib(size)} per checkpoint; "
        f"page cache: {'dropped' if args.cold else 'warm'} before each method; "
        f"best of {args.repeats}; torch threads {args.threads}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    try:
        start = time.perf_counter()
        paths = make_checkpoints(folder, shapes, max(ks))
        print(f"checkpoints ready in {time.perf_counter() - start:.0f} s", flush=True)
        rows, verdicts, soup_peaks, after_import = [], [], [], {}
        for p in folder.glob("sha256-*.jsonl"):
            p.unlink()
        for k in ks:
            # one untimed run remembers the inputs' hashes, as any earlier run would have
            prime = folder / "out-prime.safetensors"
            run_method("modelsoup", prime, paths[:k], False, args.threads)
            prime.unlink(missing_ok=True)
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for rep in range(args.repeats):
                # Rotate the order so no method always runs first (or last) in a round.
                for method in METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]:
                    out = folder / f"out-{method}.safetensors"
                    got = run_method(method, out, paths[:k], args.cold, args.threads)
                    runs[method].append(got)
                    print(
                        f"  K={k} {method} run {rep + 1}: {got['seconds']:.2f} s "
                        f"(CPU {got['cpu_seconds']:.2f} s)",
                        flush=True,
                    )
            # Fastest wall and CPU times over the runs; highest peak RSS.
            best = {
                m: {
                    **min(r, key=lambda x: x["seconds"]),
                    "cpu_seconds": min(x["cpu_seconds"] for x in r),
                    "peak_rss": max(x["peak_rss"] for x in r),
                }
                for m, r in runs.items()
            }
            outs = {m: folder / f"out-{m}.safetensors" for m in METHODS}
            diff = max(max_difference(outs["modelsoup"], outs[m]) for m in METHODS)
            for p in [*outs.values(), *folder.glob("out-*.json")]:
                p.unlink(missing_ok=True)
            k_rows, text = summarize(k, best, diff)
            rows += k_rows
            verdicts.append(text)
            soup_peaks.append(best["modelsoup"]["peak_rss"])
            after_import = {m: best[m]["rss_after_import"] for m in METHODS}
        print()
        headers = ["K", "method", "wall s", "vs (b)", "CPU s", "vs (b)", "peak RSS", "vs (b)"]
        headers += ["peak above imports", "vs (b)", "page faults", "note"]
        print(table(headers, rows))
        print("(b) = running-sum")
        print(
            "RSS of a child right after its imports: "
            + ", ".join(f"{m} {mib(v)}" for m, v in after_import.items())
        )
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
        print("targets: modelsoup wall <= running-sum; peak RSS < half of running-sum, flat in K")
        for v in verdicts:
            print("  " + v)
        growth = max(soup_peaks) / min(soup_peaks)
        flat = "met" if growth < 1.1 else "MISSED"
        print(f"  flat in K: {flat} (modelsoup peak RSS varies by {growth:.2f}x over K={ks})")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
