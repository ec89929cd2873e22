"""BatchNorm + independent training: can alignment and BN recalibration rescue the soup?

Trains ``--models`` ResNet-8 (x``--width``) networks from scratch on a Fashion-MNIST
subset, each from its own random init (seeds 0..k-1), then scores on the official test
images: every endpoint; the uniform soup of all k; the same soup with BatchNorm
recalibration (:func:`modelsoup.repair.recalibrate_bn`); with permutation alignment
(:func:`modelsoup.repair.pool.align_pool`: weight matching, activation matching and
MergeMany, Ainsworth et al. 2023), alone or with recalibration; the two-model average of
models 0 and 1 under the same treatments; the aligned soups of the first n models; and
the interpolation barriers (:func:`modelsoup.cook.diagnose.diagnose`) for every treatment.

Run from the repo root (about 15 minutes on 2 CPU cores at the defaults):

    nice -n 10 .venv/bin/python bench/batchnorm/run.py

Trained and aligned checkpoints go to ``bench/_work/batchnorm/`` (reused on a re-run);
``results.json`` and ``results.md`` go to ``bench/batchnorm/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelsoup.cook.diagnose import diagnose
from modelsoup.demo.datasets import load_fashion_mnist
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.recipes.greedy import greedy_soup
from modelsoup.repair import recalibrate_bn
from modelsoup.repair.pool import align_pool
from modelsoup.tasting import Taster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet import ResNet, train_from_scratch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1, help="blocks per stage (1: ResNet-8)")
    p.add_argument("--train", type=int, default=15000)
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--recal-batches", type=int, default=10, help="batches of 256 train images")
    p.add_argument(
        "--init",
        choices=("own", "shared"),
        default="own",
        help="own: each seed is its own init (default); shared: one init, seeds change only "
        "the batch order",
    )
    p.add_argument(
        "--spawn-epochs",
        type=int,
        default=0,
        help="with --init shared: train the shared init this many epochs first (its own "
        "schedule), then every seed continues from there",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "bench/_work/batchnorm"))
    p.add_argument("--results", default=str(ROOT / "bench/batchnorm/results"))
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.spawn_epochs and args.init != "shared":
        sys.exit("--spawn-epochs needs --init shared")
    tag = f"resnet{6 * args.blocks + 2}x{args.width}"
    if args.init == "shared":
        tag += f"_spawn{args.spawn_epochs}" if args.spawn_epochs else "_shared_init"
    work = Path(args.work) / tag
    work.mkdir(parents=True, exist_ok=True)
    split = load_fashion_mnist(seed=0, heldout=args.heldout, train=args.train, test=args.test)
    train = split.train.as_tuple()
    held = Accuracy(split.heldout.as_tuple(), name="heldout")
    test = Accuracy(split.test.as_tuple(), name="test")
    recal_data = train[0][: 256 * args.recal_batches]

    def factory() -> torch.nn.Module:
        return ResNet(blocks=args.blocks, width=args.width)

    def recalibrate(module: torch.nn.Module) -> None:
        recalibrate_bn(module, recal_data, num_batches=args.recal_batches)

    # 1. training: by default each seed is its own init and its own batch order; with
    #    --init shared every seed starts from one init (trained --spawn-epochs first)
    paths, train_seconds = [], []
    start = None
    if args.init == "shared":
        t = time.perf_counter()
        start = shared_start(factory, train, args)
        train_seconds.append(time.perf_counter() - t)
    for seed in range(args.models):
        path = work / f"seed{seed}.safetensors"
        if not path.exists():
            t = time.perf_counter()
            state = train_from_scratch(
                factory,
                train,
                lr=args.lr,
                weight_decay=5e-4,
                epochs=args.epochs,
                seed=seed,
                start_state=start,
            )
            save_file(state, str(path))
            train_seconds.append(time.perf_counter() - t)
            print(f"trained seed {seed} in {train_seconds[-1]:.0f} s", flush=True)
        paths.append(str(path))

    # 2. alignment, three ways: weight matching of models 1..k-1 onto model 0; activation
    #    matching onto model 0 (on the recalibration images, no labels); MergeMany (each
    #    model weight-matched to the mean of the others, repeated until nothing changes)
    example = train[0][:8]
    align_seconds = {}
    aligned_paths = {}
    for pool, kwargs in (
        ("weights", {}),
        ("activations", {"method": "activations", "data": recal_data}),
        ("merge_many", {"method": "merge_many"}),
    ):
        t = time.perf_counter()
        aligned_paths[pool] = align_pool(
            paths, factory, work / pool, example=example, progress=False, **kwargs
        )
        align_seconds[pool] = time.perf_counter() - t
    pool_paths = {"plain": paths} | aligned_paths

    # 3. score every treatment on the test set (never used for any choice here)
    tasters = {
        (pool, recal): Taster(
            open_ingredients(pool_paths[pool]),
            factory(),
            held,
            recalibrate=recalibrate if recal else None,
            recalibrate_candidates=recal,
        )
        for pool in pool_paths
        for recal in (False, True)
    }
    k = args.models

    def score(members: list[int], pool: str, recal: bool) -> float:
        return 100 * tasters[(pool, recal)].score_members(members, test)

    endpoints = [score([i], "plain", False) for i in range(k)]
    treatments = {
        "plain": ("plain", False),
        "+ BN recalibration": ("plain", True),
        "+ weight matching": ("weights", False),
        "+ weight matching + BN recalibration": ("weights", True),
        "+ activation matching + BN recalibration": ("activations", True),
        "+ MergeMany + BN recalibration": ("merge_many", True),
    }
    soups = {name: score(list(range(k)), *how) for name, how in treatments.items()}
    pair = {name: score([0, 1], *how) for name, how in treatments.items()}
    print("endpoints", endpoints, "\nsoups", soups, "\npair", pair, flush=True)

    # 4. every subset size of the aligned + recalibrated pools: does a k-soup beat the mean?
    by_size = {
        pool: {n: score(list(range(n)), pool, True) for n in range(2, k + 1)}
        for pool in aligned_paths
    }

    # 4b. what a user gets from the greedy recipe (held-out guided) on each recalibrated pool
    greedy = {}
    for pool in pool_paths:
        soup = greedy_soup(tasters[(pool, True)])
        greedy[pool] = {
            "size": len(soup.chosen),
            "test": 100 * tasters[(pool, True)].score(soup.coefficients, test),
        }

    # 5. interpolation barriers on held-out, best model -> each other one
    barriers = {}
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    for name, (pool, recal) in treatments.items():
        d = diagnose(
            pool_paths[pool],
            factory,
            held,
            alphas=alphas,
            recalibrate=recalibrate if recal else None,
            output=Path(args.results) / "diagnose" / tag / name.replace("+ ", "").replace(" ", "_"),
        )
        barriers[name] = {
            "barriers": {key: 100 * v for key, v in d.barriers.items()},
            "mean_barrier": 100 * statistics.fmean(d.barriers.values()),
            "paths": {key: [100 * s for s in v] for key, v in d.paths.items()},
            "verdict": d.verdict,
        }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}",
        "setup": {
            "model": f"ResNet-{6 * args.blocks + 2} x{args.width} (stem stride 2, BatchNorm)",
            "params": sum(p.numel() for p in factory().parameters()),
            "train_images": args.train,
            "heldout_images": args.heldout,
            "test_images": args.test,
            "epochs": args.epochs,
            "lr": args.lr,
            "optimizer": "SGD momentum 0.9, wd 5e-4, cosine, batch 128",
            "recalibration": f"{args.recal_batches} batches of 256 train images",
            "seeds": list(range(k)),
            "init": "own init per seed"
            if args.init == "own"
            else "one shared init (seed 1000)"
            + (
                f", trained {args.spawn_epochs} epoch(s) before the seeds split"
                if args.spawn_epochs
                else ""
            ),
        },
        "test_accuracy": {
            "endpoints": endpoints,
            "mean_endpoint": statistics.fmean(endpoints),
            f"uniform_soup_{k}": soups,
            "two_model_average_0_1": pair,
            "aligned_recalibrated_soup_by_size": by_size,
            "greedy_recalibrated": greedy,
        },
        "barriers_heldout": barriers,
        "seconds": {
            "training": train_seconds,
            "alignment": align_seconds,
            "total": time.perf_counter() - started,
        },
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"{tag}.md").write_text(markdown(result, k))
    print(markdown(result, k))


def shared_start(factory, train, args) -> dict[str, torch.Tensor]:
    """The one starting point of ``--init shared``: a fresh init from seed 1000, trained
    ``--spawn-epochs`` epochs (batch order from seed 1000) when asked."""
    torch.manual_seed(1000)
    if not args.spawn_epochs:
        return factory().state_dict()
    return train_from_scratch(
        factory, train, lr=args.lr, weight_decay=5e-4, epochs=args.spawn_epochs, seed=1000
    )


def markdown(r: dict, k: int) -> str:
    acc = r["test_accuracy"]
    ends = acc["endpoints"]
    pair_ends = ends[:2]
    lines = [
        f"# {r['setup']['model']} on Fashion-MNIST: soups of networks trained with "
        f"different seeds ({r['setup'].get('init', 'own init per seed')})",
        "",
        f"{r['date']}; {r['machine']}. Setup: {json.dumps(r['setup'])}",
        "",
        "Test accuracy (%), official test images:",
        "",
        "| treatment | uniform soup of all "
        f"{k} | two-model average (0, 1) | pair gap to mean endpoint |",
        "|---|---|---|---|",
    ]
    for name, v in acc[f"uniform_soup_{k}"].items():
        pair = acc["two_model_average_0_1"][name]
        gap = statistics.fmean(pair_ends) - pair
        lines.append(f"| {name} | {v:.2f} | {pair:.2f} | {gap:+.2f} |")
    lines += [
        "",
        "Endpoints: "
        + ", ".join(f"{e:.2f}" for e in ends)
        + f" (mean {acc['mean_endpoint']:.2f}, best {max(ends):.2f}).",
        "",
        "Aligned + recalibrated uniform soup of models 0..n-1:",
        "",
        *(
            f"- {pool}: " + ", ".join(f"n={n}: {v:.2f}" for n, v in sizes.items())
            for pool, sizes in acc["aligned_recalibrated_soup_by_size"].items()
        ),
        "",
        "Greedy soup (sorted, held-out guided, candidates recalibrated): "
        + ", ".join(
            f"{pool}: {g['size']} of {k} kept, {g['test']:.2f}"
            for pool, g in acc.get("greedy_recalibrated", {}).items()
        ),
        "",
        "Interpolation barrier on held-out (percentage points, best model to each other one, "
        "5 points on the line):",
        "",
        "| treatment | mean barrier | per pair |",
        "|---|---|---|",
    ]
    for name, b in r["barriers_heldout"].items():
        per = ", ".join(f"{v:.1f}" for v in b["barriers"].values())
        lines.append(f"| {name} | {b['mean_barrier']:.2f} | {per} |")
    s = r["seconds"]
    lines += [
        "",
        f"Wall time: training {sum(s['training']):.0f} s (this run), alignment "
        + ", ".join(f"{k} {v:.0f} s" for k, v in s["alignment"].items())
        + f", total {s['total']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
