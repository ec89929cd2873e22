"""Study (c): the seed's ResNet case with from-scratch networks (Table 2), repaired or not.

Reuses the independently trained ResNet-8 x4 networks of ``bench/batchnorm/run.py``
(run that first) and cooks the seed's recipes three times: as the seed did (plain
averages), with BatchNorm recalibration of every candidate, and with weight matching
(:func:`modelsoup.repair.pool.align_pool`) plus recalibration.

    nice -n 10 .venv/bin/python bench/reproduce/resnet_scratch.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from modelsoup.datasets import load_fashion_mnist
from modelsoup.evaluators import Accuracy
from modelsoup.repair import recalibrate_bn
from modelsoup.repair.pool import align_pool

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "batchnorm"))
import common  # noqa: E402
from resnet import ResNet  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Must match bench/batchnorm/run.py's defaults (same split, same networks).
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--train", type=int, default=15000)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--recal-batches", type=int, default=10)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tag = f"resnet{6 * args.blocks + 2}x{args.width}"
    work = common.ROOT / "bench/_work/batchnorm" / tag
    paths = sorted(str(p) for p in work.glob("seed*.safetensors"))
    if not paths:
        sys.exit(f"no networks in {work}: run bench/batchnorm/run.py first")
    split = load_fashion_mnist(seed=0, heldout=args.heldout, train=args.train, test=args.test)
    x_train = split.train.x
    held = Accuracy(split.heldout.as_tuple(), name="heldout")
    test = Accuracy(split.test.as_tuple(), name="test")
    recal_data = x_train[: 256 * args.recal_batches]

    def factory() -> torch.nn.Module:
        return ResNet(blocks=args.blocks, width=args.width)

    def recalibrate(module: torch.nn.Module) -> None:
        recalibrate_bn(module, recal_data, num_batches=args.recal_batches)

    aligned = align_pool(paths, factory, work, example=x_train[:8], progress=False)
    repair = {"recalibrate": recalibrate, "recalibrate_candidates": True}
    record = {
        "study": f"{tag} trained from scratch on Fashion-MNIST ({len(paths)} seeds)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine(),
        "setup": vars(args),
        "seconds": {},
    }
    for variant, pool, kwargs in (
        ("plain", paths, {}),
        ("bn_recalibration", paths, repair),
        ("aligned_bn_recalibration", aligned, repair),
    ):
        _, summary = common.run_cook(
            f"resnet_scratch/{variant}",
            pool,
            factory,
            held,
            test,
            passes=args.passes,
            runs=args.runs,
            **kwargs,
        )
        record[variant] = summary
        record["seconds"][variant] = summary["cook_seconds"]
        print(variant, "\n" + common.table(summary), flush=True)
    record["seconds"]["total"] = time.perf_counter() - started
    common.write("resnet_scratch", record)


if __name__ == "__main__":
    main()
