"""What the checks that a checkpoint is unchanged while read cost (bench/README.md).

Every read of a safetensors file is followed by one ``fstat`` compared with the state the
header was read in, and every read of a torch pickle's memory-mapped tensor is preceded
by one ``stat`` (``formats.base.check_unchanged``). This averages K generated
checkpoints of each format, with the hashes remembered and the page cache warm, with the
checks as they are and with them switched off (the reads before the checks), alternated,
best of ``--repeats``.

    python bench/file_checks_bench.py --models 4 --tensors 25
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch


def _soup_seconds(paths: list[Path], out: Path, checked: bool, repeats: int) -> float:
    from modelsoup import average
    from modelsoup.formats import safetensors_io, torch_pickle

    saved = (safetensors_io.check_unchanged, torch_pickle.check_unchanged)
    if not checked:
        safetensors_io.check_unchanged = torch_pickle.check_unchanged = lambda *a, **k: None
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            average(paths).save(out, progress=False)
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        safetensors_io.check_unchanged, torch_pickle.check_unchanged = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=25, help="1024 x 1024 float32 each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="checked/unchecked alternations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="file-checks-"))
    os.environ["MODELSOUP_HASH_CACHE"] = str(work / "hashes.jsonl")
    files: dict[str, list[Path]] = {"safetensors": [], "pt": []}
    for i in range(args.models):
        gen = torch.Generator().manual_seed(i)
        state = {
            f"l{j}.weight": torch.randn(1024, 1024, generator=gen) for j in range(args.tensors)
        }
        files["safetensors"].append(work / f"m{i}.safetensors")
        safetensors.torch.save_file(state, str(files["safetensors"][-1]))
        files["pt"].append(work / f"m{i}.pt")
        torch.save(state, files["pt"][-1])
    size = sum(p.stat().st_size for p in files["pt"]) / 2**20
    print(f"{args.models} checkpoints of {args.tensors}M float32 parameters ({size:.0f} MiB)")
    for fmt, paths in files.items():
        _soup_seconds(paths, work / "warm.safetensors", True, 1)  # hashes, page cache
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for checked in (True, False):
                times[checked].append(
                    _soup_seconds(paths, work / "soup.safetensors", checked, args.repeats)
                )
        on, off = min(times[True]), min(times[False])
        print(f"{fmt:12s} checked {on:.3f} s  unchecked {off:.3f} s  ratio {on / off:.2f}x")


if __name__ == "__main__":
    main()
