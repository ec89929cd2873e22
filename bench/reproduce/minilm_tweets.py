"""Study (a): MiniLM fine-tuned on tweet sentiment, the seed paper's ViT case (Table 1).

36 ingredients (the seed's 6x6 grid of lr x weight decay, SGD momentum 0.9) fine-tuned
from one start: all-MiniLM-L6-v2 with a 3-class linear head. The embeddings and the
bottom ``--frozen`` transformer layers are frozen in every ingredient, so their output
is computed once and cached: ingredients (and soups) are the top layers + head, and
the cached hidden states are their inputs. This is exact (frozen layers run in eval
mode, i.e. without dropout) and makes every soup evaluation ``6/(6-frozen)`` times
cheaper. Then cook(): best individual, uniform, greedy sorted/random (10 runs), pruned
sorted/random (10 runs), ensemble.

    nice -n 10 .venv/bin/python bench/reproduce/minilm_tweets.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modelsoup.demo.datasets import load_tweet_sentiment
from modelsoup.demo.models import MiniLMClassifier, minilm_classifier, tokenize
from modelsoup.demo.training import train_grid
from modelsoup.evaluators import Accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class MiniLMTop(nn.Module):
    """The trainable top of a MiniLM classifier: its last layers, mean pooling and head.

    Input is the cached output of the frozen bottom (``hidden``, ``(N, L, 384)``) and
    the ``attention_mask``.
    """

    def __init__(self, full: MiniLMClassifier, frozen: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(full.bert.encoder.layer[frozen:])
        self.dropout = full.dropout
        self.classifier = full.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        h, keep = hidden[:, :length], attention_mask[:, :length].bool()
        for layer in self.layers:
            h = layer(h, keep[:, None, None, :])
        w = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


@torch.no_grad()
def frozen_features(full: MiniLMClassifier, texts: list[str], frozen: int, max_len: int) -> dict:
    """Hidden states after the embeddings and the bottom ``frozen`` layers (eval mode)."""
    full.eval()
    batch = tokenize(texts, max_len=max_len)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = []
    for s in range(0, len(texts), 256):
        i, m = ids[s : s + 256], mask[s : s + 256]
        h = full.bert.embeddings(i, torch.zeros_like(i))
        for layer in full.bert.encoder.layer[:frozen]:
            h = layer(h, m.bool()[:, None, None, :])
        out.append(h)
    return {"hidden": torch.cat(out), "attention_mask": mask}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--test", type=int, default=1500)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--heldout-use", type=int, default=None, help="score on the first N only")
    p.add_argument("--test-use", type=int, default=None, help="score on the first N only")
    p.add_argument("--frozen", type=int, default=3, help="frozen transformer layers (of 6)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=256, help="held-out and test")
    p.add_argument("--lrs", type=float, nargs="+", default=common.SEED_LRS)
    p.add_argument("--wds", type=float, nargs="+", default=common.SEED_WDS)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--study", default="minilm_tweets")
    return p.parse_args(argv)


def load_pool(args: argparse.Namespace) -> common.Pool:
    """The grid's ingredients (trained unless on disk), the model factory and evaluators.

    Held-out and test are the first ``--heldout-use`` / ``--test-use`` examples of their
    splits (the split itself must not change: it fixes the train set). MiniLM has no
    BatchNorm: ``recalibrate`` does nothing.
    """
    split = load_tweet_sentiment(0, heldout=args.heldout, test=args.test, train=args.train)
    full = minilm_classifier(len(split.classes), freeze_layers=args.frozen)
    feats = {
        name: frozen_features(full, sub.x, args.frozen, args.max_len)
        for name, sub in (("train", split.train), ("heldout", split.heldout), ("test", split.test))
    }
    template = MiniLMTop(full, args.frozen)

    def factory() -> nn.Module:
        return copy.deepcopy(template)

    start_state = {k: v.clone() for k, v in template.state_dict().items()}
    t = time.perf_counter()
    paths = train_grid(
        factory,
        (feats["train"], split.train.y),
        {"lr": args.lrs, "weight_decay": args.wds},
        common.WORK / args.study / "ingredients",
        start_state=start_state,
        optimizer="sgd",
        momentum=0.9,
        epochs=args.epochs,
        batch_size=args.batch_size,
        progress=False,
    )
    train_seconds = time.perf_counter() - t

    def first(name: str, y: torch.Tensor, n: int | None) -> tuple[dict, torch.Tensor]:
        n = n or len(y)
        return {k: v[:n] for k, v in feats[name].items()}, y[:n]

    size = args.eval_batch_size
    held = Accuracy(
        first("heldout", split.heldout.y, args.heldout_use), batch_size=size, name="heldout"
    )
    test = Accuracy(first("test", split.test.y, args.test_use), batch_size=size, name="test")
    return common.Pool(
        [str(p) for p in paths], factory, held, test, lambda module: None, None, train_seconds
    )


def main() -> None:
    args = parse()
    found, started = common.open_pool(load_pool, args)
    paths, factory, held, test = found.paths, found.factory, found.held, found.test
    train_seconds = found.train_seconds
    prep = time.perf_counter() - started - train_seconds
    template = factory()
    result, summary = common.run_cook(
        args.study, paths, factory, held, test, passes=args.passes, runs=args.runs
    )
    record = {
        "study": "MiniLM (all-MiniLM-L6-v2) fine-tuned on tweet sentiment (3 classes)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine(),
        "setup": {
            k: v for k, v in vars(args).items() if k not in ("threads", "study", "eval_batch_size")
        }
        | {
            "optimizer": "SGD momentum 0.9, linear decay, grad-norm clip 1.0",
            "ingredients": len(paths),
            "trainable_params": sum(p.numel() for p in template.parameters()),
        },
        "seconds": {
            "prepare": prep,
            "training": train_seconds,
            "cook": summary["cook_seconds"],
            "total": time.perf_counter() - started,
        },
        **summary,
    }
    common.write(args.study, record)
    print(common.table(summary))
    print(record["seconds"])


if __name__ == "__main__":
    main()
