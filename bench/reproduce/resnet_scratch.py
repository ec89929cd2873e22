"""Study (c): the seed's ResNet case with from-scratch networks (Table 2), repaired or not.

Two pools of ResNet-8 networks trained from scratch on Fashion-MNIST, each network
from its own random init (its own seed) and batch order:

* ``--pool grid`` (default): the seed's 6x6 lr x weight-decay grid, 36 networks of
  width ``--grid-width`` (x1 by default, to fit the CPU budget), trained here;
* ``--pool seeds``: the four ResNet-8 x4 of ``bench/batchnorm/run.py`` (run that first).

Each pool is cooked with the seed's recipes three times: as the seed did (plain
averages), with BatchNorm recalibration of every candidate, and with activation-matching
permutation alignment onto the first network (:func:`modelsoup.repair.pool.align_pool`,
``method="activations"``, on the recalibration images) plus recalibration.

    nice -n 10 .venv/bin/python bench/reproduce/resnet_scratch.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelsoup.demo.datasets import load_fashion_mnist
from modelsoup.evaluators import Accuracy
from modelsoup.repair import recalibrate_bn
from modelsoup.repair.pool import align_pool

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "batchnorm"))
import common  # noqa: E402
from resnet import ResNet, train_from_scratch  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", choices=["grid", "seeds"], default="grid")
    p.add_argument("--grid-width", type=int, default=1, help="width of the grid's networks")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (grid)")
    # --pool seeds must match bench/batchnorm/run.py's defaults (same split, same networks).
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--train", type=int, default=15000)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--recal-batches", type=int, default=10)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true", help="train the grid, do not cook")
    p.add_argument(
        "--shard",
        default="0/1",
        help="with --train-only: train only cells i, i+n, i+2n, ... of the grid (i/n), so "
        "that n processes can train it side by side",
    )
    args = p.parse_args(argv)
    i, _, n = args.shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        p.error(f"--shard {args.shard}: write i/n with 0 <= i < n, e.g. 0/2")
    args.shard = (int(i), int(n))
    if args.shard != (0, 1) and not args.train_only:
        p.error("--shard trains part of the grid: use it with --train-only")
    return args


def load_pool(args: argparse.Namespace) -> common.Pool:
    """The pool's networks (the grid is trained unless on disk), factory and evaluators."""
    width = args.grid_width if args.pool == "grid" else args.width
    split = load_fashion_mnist(seed=0, heldout=args.heldout, train=args.train, test=args.test)
    recal_data = split.train.x[: 256 * args.recal_batches]

    def factory() -> torch.nn.Module:
        return ResNet(blocks=args.blocks, width=width)

    def recalibrate(module: torch.nn.Module) -> None:
        recalibrate_bn(module, recal_data, num_batches=args.recal_batches)

    train_seconds = 0.0
    work = work_of(args)
    if args.pool == "seeds":
        paths = sorted(str(p) for p in work.glob("seed*.safetensors"))
        if not paths:
            sys.exit(f"no networks in {work}: run bench/batchnorm/run.py first")
    else:
        t = time.perf_counter()
        paths = train_grid_from_scratch(
            factory, split.train.as_tuple(), work, args.epochs, shard=args.shard
        )
        train_seconds = time.perf_counter() - t
    return common.Pool(
        paths,
        factory,
        Accuracy(split.heldout.as_tuple(), name="heldout"),
        Accuracy(split.test.as_tuple(), name="test"),
        recalibrate,
        recal_data,
        train_seconds,
    )


def tag(args: argparse.Namespace) -> str:
    """The networks' name, e.g. ``resnet8x1``."""
    width = args.grid_width if args.pool == "grid" else args.width
    return f"resnet{6 * args.blocks + 2}x{width}"


def work_of(args: argparse.Namespace) -> Path:
    """Where the pool's networks (and their aligned copies) live."""
    if args.pool == "seeds":
        return common.ROOT / "bench/_work/batchnorm" / tag(args)
    return common.WORK / "resnet_scratch_grid" / tag(args)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    width = args.grid_width if args.pool == "grid" else args.width
    found = load_pool(args)
    paths, factory, held, test = found.paths, found.factory, found.held, found.test
    train_seconds = found.train_seconds
    if args.train_only:
        print(f"{len(paths)} networks ready ({train_seconds:.0f} s training)", flush=True)
        return
    study = "resnet_scratch" if args.pool == "seeds" else "resnet_scratch_grid"
    work = work_of(args)
    recal_data, recalibrate = found.recal_data, found.recalibrate

    t = time.perf_counter()
    aligned = align_pool(
        paths,
        factory,
        work / "activations",
        example=recal_data[:8],
        method="activations",
        data=recal_data,
        progress=False,
    )
    align_seconds = time.perf_counter() - t
    repair = {"recalibrate": recalibrate, "recalibrate_candidates": True}
    record = {
        "study": f"{tag(args)} trained from scratch on Fashion-MNIST ({len(paths)} networks, "
        f"pool {args.pool})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine(),
        "setup": vars(args) | {"width": width},
        "seconds": {"training": train_seconds, "activation_alignment": align_seconds},
    }
    for variant, pool, kwargs in (
        ("plain", paths, {}),
        ("bn_recalibration", paths, repair),
        ("aligned_bn_recalibration", aligned, repair),
    ):
        _, summary = common.run_cook(
            f"{study}/{variant}",
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
    common.write(study, record)


def train_grid_from_scratch(
    factory, train, work: Path, epochs: int, shard: tuple[int, int] = (0, 1)
) -> list[str]:
    """The seed's lr x wd grid, every cell its own init and batch order (seed = cell index).

    With ``shard=(i, n)`` only cells ``i, i + n, ...`` are trained (the others are only
    named); n processes with i = 0..n-1 train the whole grid between them."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    cells = [(lr, wd) for lr in common.SEED_LRS for wd in common.SEED_WDS]
    for seed, (lr, wd) in enumerate(cells):
        path = work / f"lr{lr:g}_wd{wd:g}_seed{seed}.safetensors"
        if not path.exists() and seed % shard[1] == shard[0]:
            t = time.perf_counter()
            state = train_from_scratch(
                factory, train, lr=lr, weight_decay=wd, epochs=epochs, seed=seed
            )
            save_file(state, str(path))
            hyper = {"lr": lr, "weight_decay": wd, "seed": seed}
            path.with_suffix(".json").write_text(json.dumps({"hyperparameters": hyper}))
            print(f"trained {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    main()
