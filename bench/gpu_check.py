"""The GPU check of issue 17, as one prepared script: run it on a machine with CUDA.

1. Cooks a digits pool (greedy sorted, greedy random, pruned 2 passes) with
   ``device="cpu"`` and ``device="cuda"`` and compares the picks and held-out scores.
2. Tastes a generated ~100M-parameter MLP classifier (4 fine-tunes of one random start,
   safetensors on disk) with greedy on the GPU twice: the accumulator's running sum on
   the GPU (the default: ``Taster(sum_device=None)``) and on the CPU
   (``sum_device="cpu"``), and prints wall seconds per candidate for each, beside the
   CPU-only run of a smaller pool for scale.

Run (about 3 minutes on one H200, most of it writing the generated checkpoints)::

    python bench/gpu_check.py            # prints Markdown tables; exit 1 if picks differ
    python bench/gpu_check.py --params 20M --k 3   # smaller
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from benchlib import WORK, machine, parse_count, table
from recipes_bench import digits_task, make_ingredients
from torch import nn

from modelsoup.cook import cook
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.recipes import greedy_soup
from modelsoup.tasting import Taster

RECIPES = [
    {"name": "greedy"},
    {"name": "greedy", "order": "random", "label": "greedy random"},
    {"name": "pruned", "passes": 2},
]


def wide_mlp(width: int, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def width_for(params: int, depth: int = 4) -> int:
    # (depth - 2) square layers dominate: width^2 * (depth - 2) ~ params
    return int((params / (depth - 2)) ** 0.5)


def generated_pool(folder: Path, params: int, k: int) -> tuple[list[Path], int]:
    width = width_for(params)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"wide-{width}-{i}.safetensors" for i in range(k)]
    torch.manual_seed(0)
    start = wide_mlp(width).state_dict()
    for i, path in enumerate(paths):
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(i + 1)
        state = {
            n: t + 0.01 * t.std() * torch.randn(t.shape, generator=gen) for n, t in start.items()
        }
        safetensors.torch.save_file(state, str(path))
    return paths, width


def digits_picks(device: str) -> list:
    task = digits_task()
    paths = make_ingredients(task, WORK / "gpu" / "digits", 8)
    held = Accuracy(task.held_out, batch_size=2000, name="held-out")
    result = cook(paths, task.model, held, recipes=RECIPES, device=device, progress=False)
    return [(m.label, m.result.chosen, m.held_out) for m in result.methods if m.is_soup]


def per_candidate(paths: list[Path], width: int, device: str, sum_device: str | None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 256, generator=gen), torch.randint(0, 10, (4096,), generator=gen)
    held = Accuracy((x, y), batch_size=1024, name="random")
    model = wide_mlp(width).to(device)
    start = time.perf_counter()
    taster = Taster(open_ingredients(paths), model, held, sum_device=sum_device, racing="off")
    soup = greedy_soup(taster)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "per_candidate": seconds / taster.evaluations,
        "mix": taster.mix_seconds / taster.evaluations,
        "eval": taster.eval_seconds / taster.evaluations,
        "chosen": soup.chosen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="100M")
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run this on a machine with a GPU")
    print(machine(), "|", torch.cuda.get_device_name(0))
    cpu, gpu = digits_picks("cpu"), digits_picks("cuda")
    rows = [[label, chosen, f"{score:.4f}"] for label, chosen, score in gpu]
    print(table(["recipe (cuda)", "chosen", "held-out"], rows))
    same = [(a[1], a[2]) for a in cpu] == [(b[1], b[2]) for b in gpu]
    print(f"digits picks and scores, cuda vs cpu: {'identical' if same else 'DIFFERENT'}")
    paths, width = generated_pool(WORK / "gpu" / "wide", parse_count(args.params), args.k)
    runs = {
        "cuda model, sum on cuda": per_candidate(paths, width, "cuda", None),
        "cuda model, sum on cpu": per_candidate(paths, width, "cuda", "cpu"),
    }
    base = runs["cuda model, sum on cpu"]["per_candidate"]
    rows = [
        [
            label,
            f"{r['per_candidate']:.3f}",
            f"{r['mix']:.3f}",
            f"{r['eval']:.3f}",
            f"{r['per_candidate'] / base:.2f}x",
            r["chosen"],
        ]
        for label, r in runs.items()
    ]
    headers = [
        "greedy, width " + str(width),
        "s / candidate",
        "mixing s",
        "eval s",
        "vs sum on cpu",
    ]
    print(table([*headers, "chosen"], rows))
    picks = {tuple(r["chosen"]) for r in runs.values()}
    if not same or len(picks) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
