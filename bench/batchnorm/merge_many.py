"""Align k networks to each other, not to one reference (Git Re-Basin's MergeMany).

``bench/batchnorm/run.py`` aligns models 1..k-1 to model 0, which suits a two-model
average but not a k-model soup: each model is matched to model 0 alone. MergeMany
(Ainsworth et al. 2023, section 4 / appendix) repeatedly re-aligns each model to the
mean of all the others until nothing changes. This script does that with
:func:`modelsoup.repair.align_to` on the networks trained by ``run.py`` and scores the
uniform soup of all k with BatchNorm recalibration on the test set.

    nice -n 10 .venv/bin/python bench/batchnorm/merge_many.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from modelsoup.datasets import load_fashion_mnist
from modelsoup.evaluators import Accuracy
from modelsoup.repair import align_to, recalibrate_bn, trace_permutation_spec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from resnet import ResNet  # noqa: E402

ROOT = HERE.parents[1]


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: sum(s[k].float() for s in states) / len(states)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--train", type=int, default=15000)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--recal-batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tag = f"resnet{6 * args.blocks + 2}x{args.width}"
    work = ROOT / "bench/_work/batchnorm" / tag
    states = [load_file(str(f)) for f in sorted(work.glob("seed*.safetensors"))]
    split = load_fashion_mnist(seed=0, heldout=args.heldout, train=args.train, test=args.test)
    test = Accuracy(split.test.as_tuple(), name="test")
    recal = split.train.x[: 256 * args.recal_batches]
    model = ResNet(blocks=args.blocks, width=args.width)
    spec = trace_permutation_spec(model, split.train.x[:8])
    k = len(states)
    for r in range(args.rounds):
        changed = 0
        for i in torch.randperm(k, generator=torch.Generator().manual_seed(r)).tolist():
            others = mean_state([s for j, s in enumerate(states) if j != i])
            new = align_to(others, states[i], spec)
            changed += any(not torch.equal(new[n], states[i][n]) for n in new)
            states[i] = new
        print(f"round {r + 1}: {changed} model(s) re-permuted", flush=True)
        if not changed:
            break

    def score(members: list[int]) -> float:
        model.load_state_dict(mean_state([states[i] for i in members]))
        recalibrate_bn(model, recal, num_batches=args.recal_batches)
        return 100 * test.evaluate(model)

    result = {
        "method": "MergeMany (align each model to the mean of the others, repeat)",
        "rounds_run": r + 1,
        "uniform_soup_recalibrated_by_size": {n: score(list(range(n))) for n in range(2, k + 1)},
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(result, indent=2))
    out = HERE / "results" / f"{tag}-merge-many.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
