"""Study (d): merging MiniLM fine-tunes for different tasks, FusionBench's ordering.

all-MiniLM-L6-v2 is fine-tuned from the one pretrained start on three offline tasks,
each with its own linear head: tweet sentiment (3 classes), BBC News topics (5
classes) and BBC headline-or-body (2 classes, built here: a BBC article's first line is
its title; the other class is the start of one of its body sentences, cut to the
title's word count, its end punctuation removed, so length and a final period give
nothing away). The heads are kept aside; the soups merge only the shared encoder.
The held-out evaluator attaches each task's own head to a candidate encoder and scores
all tasks' held-out examples (per-example results concatenated, equal counts per task,
so the score is the mean accuracy over tasks and the report's intervals are valid).

Through cook(): the uniform soup (FusionBench's "simple average"), and the `search`
recipe on held-out for task arithmetic's lambda, TIES's lambda (density 0.2, the TIES
paper's k = 20%) and DARE-TIES's lambda (density 0.5; ``--densities`` also searches
TIES's density at lambda 1), with the pretrained encoder as `base`. Sizes fit a shared
2-core CPU: 1,200 training tweets at 64 tokens, 600 texts per BBC task at 32 tokens, one
epoch; 100 held-out and 200 test examples per task. Every chosen soup is scored on
every task's test split, beside the base encoder and each individual fine-tune (each
with every task's head).

    nice -n 5 /work/main/.venv/bin/python bench/reproduce/multitask.py --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from modelsoup.cook import cook
from modelsoup.cook.report import write_report
from modelsoup.demo.datasets import DataSplit, Subset, load_bbc_news, load_tweet_sentiment
from modelsoup.demo.models import MiniLMClassifier, minilm_classifier, tokenize
from modelsoup.demo.training import train_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tables import multitask_table  # noqa: E402

STUDY = "multitask"
# FusionBench (Tang et al. 2024), CLIP ViT-B/32 over 8 image tasks, mean accuracy (%).
FUSIONBENCH = {"simple average": 66.5, "task arithmetic": 68.0, "TIES": 72.2}
PAD_LOGIT = -1e4  # fills the logit columns a task's head does not have


class SharedEncoder(nn.Module):
    """The part every task shares: MiniLM's encoder and its mean pooling, no head.

    Its state dict holds ``bert.*`` only, the keys a :class:`MiniLMClassifier` gives
    them, so an encoder is cut out of a fine-tuned classifier's checkpoint unchanged.
    """

    def __init__(self, classifier: MiniLMClassifier) -> None:
        super().__init__()
        self.bert = classifier.bert

    # MiniLMClassifier.embed reads self.bert alone: the pooled embeddings, (N, 384).
    forward = MiniLMClassifier.embed


class MultiTaskAccuracy:
    """Accuracy over several tasks: each task's examples through the candidate encoder
    and that task's own head. Logits are the heads' outputs, padded to the widest head
    and concatenated task after task; the score is the mean over all examples (with
    equal counts per task, the mean of the per-task accuracies)."""

    higher_is_better = True
    score_range = (0.0, 1.0)

    def __init__(self, tasks: dict[str, tuple[dict, torch.Tensor, nn.Linear]], name: str):
        self.tasks = tasks
        self.name = name
        self.width = max(head.out_features for _, _, head in tasks.values())
        self.labels = torch.cat([y for _, y, _ in tasks.values()])
        self._seen: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def logits(self, model: nn.Module) -> torch.Tensor:
        # Kept by the weights' digest: the individual fine-tunes cook scored on test are
        # not run again when this script breaks their scores down by task.
        key = _digest(model)
        if key not in self._seen:
            self._seen[key] = self._forward(model)
        return self._seen[key]

    def _forward(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        out = []
        for batch, _, head in self.tasks.values():
            n = batch["input_ids"].shape[0]
            for s in range(0, n, 128):
                pooled = model(
                    batch["input_ids"][s : s + 128], batch["attention_mask"][s : s + 128]
                )
                logits = torch.full((pooled.shape[0], self.width), PAD_LOGIT)
                logits[:, : head.out_features] = head(pooled)
                out.append(logits)
        return torch.cat(out)

    def per_example(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == self.labels).float()

    def score_logits(self, logits: torch.Tensor) -> float:
        return float(self.per_example(logits).mean())

    def evaluate(self, model: nn.Module) -> float:
        return self.score_logits(self.logits(model))

    def by_task(self, per_example: torch.Tensor) -> dict[str, float]:
        """Per-task accuracy (%) from the concatenated per-example results."""
        sizes = [len(y) for _, y, _ in self.tasks.values()]
        parts = torch.split(per_example.float(), sizes)
        return {t: 100 * float(p.mean()) for t, p in zip(self.tasks, parts)}


def _digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def headline_subset(articles: list[str], rng: np.random.Generator) -> Subset:
    """Two examples per article: its title (label 1) and the start of one body sentence
    cut to the title's word count, trailing punctuation removed (label 0); shuffled."""
    texts, labels = [], []
    for article in articles:
        title, _, body = article.partition("\n")
        words = title.split()
        sentences = [
            s for s in _SENTENCE_END.split(" ".join(body.split())) if len(s.split()) >= len(words)
        ]
        if not words or not sentences:
            continue
        fragment = sentences[rng.integers(len(sentences))].split()[: len(words)]
        texts += [" ".join(words), " ".join(fragment).rstrip(".,;:!?\"'")]
        labels += [1, 0]
    order = rng.permutation(len(texts))
    return Subset([texts[i] for i in order], torch.tensor(labels)[torch.as_tensor(order)])


def load_tasks(args: argparse.Namespace) -> dict[str, DataSplit]:
    """The three tasks' splits; the BBC tasks share one split of the articles."""
    held, test = args.heldout, args.test
    tweets = load_tweet_sentiment(args.seed, heldout=held, test=test, train=args.train)
    bbc = load_bbc_news(args.seed, heldout=held, test=test, train=None)
    rng = np.random.default_rng(args.seed)
    headline = DataSplit(
        *(headline_subset(part.x, rng) for part in (bbc.train, bbc.heldout, bbc.test)),
        ("body", "headline"),
    )
    return {"tweets": tweets, "bbc_topic": bbc, "bbc_headline": headline}


def first(part: Subset, n: int) -> tuple[list[str], torch.Tensor]:
    if len(part) < n:
        raise SystemExit(f"only {len(part)} examples where {n} were asked for")
    return part.x[:n], part.y[:n]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1200, help="training tweets (at most)")
    p.add_argument("--train-bbc", type=int, default=600, help="training texts per BBC task")
    p.add_argument("--heldout", type=int, default=100, help="held-out examples per task")
    p.add_argument("--test", type=int, default=200, help="test examples per task")
    p.add_argument("--max-len", type=int, default=64, help="tokens per tweet")
    p.add_argument("--max-len-bbc", type=int, default=32, help="tokens per BBC text")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.5, 2.5, 3.5, 5.0])
    p.add_argument(
        "--densities", type=float, nargs="*", default=[], help="also search TIES's density"
    )
    p.add_argument("--ties-density", type=float, default=0.2)
    p.add_argument("--dare-density", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def recipes(args: argparse.Namespace) -> list[dict]:
    lam, dens = list(args.lambdas), list(args.densities)
    entries = [
        {"name": "search", "merge": {"rule": "task_arithmetic"}, "option": "lambda", "grid": lam},
        {
            "name": "search",
            "merge": {"rule": "ties", "density": args.ties_density},
            "option": "lambda",
            "grid": lam,
        },
        {
            "name": "search",
            "merge": {"rule": "dare_ties", "density": args.dare_density},
            "option": "lambda",
            "grid": lam,
        },
    ]
    if dens:
        entries.append(
            {
                "name": "search",
                "merge": {"rule": "ties", "lambda": 1.0},
                "option": "density",
                "grid": dens,
            }
        )
    return entries


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = load_tasks(args)
    start = {t: minilm_classifier(len(s.classes), head_seed=args.seed) for t, s in splits.items()}
    base = SharedEncoder(start["tweets"])
    encoders, heads, train_seconds, sizes = {}, {}, {}, {}
    max_len = {t: args.max_len if t == "tweets" else args.max_len_bbc for t in splits}
    for task, split in splits.items():
        n = args.train if task == "tweets" else args.train_bbc
        x, y = first(split.train, min(n, len(split.train)))
        sizes[task] = {"train": len(y), "max_len": max_len[task], "classes": list(split.classes)}
        t = time.perf_counter()
        (path,) = train_grid(
            lambda task=task: start[task],
            (tokenize(x, max_len=max_len[task]), y),
            {"lr": [args.lr]},
            common.WORK / STUDY / task,
            start_state=start[task].state_dict(),
            epochs=args.epochs,
            batch_size=args.batch_size,
            warmup_frac=0.1,
            weight_decay=0.01,
            progress=False,
        )
        train_seconds[task] = time.perf_counter() - t
        print(f"{task}: {path} ({train_seconds[task]:.0f} s)", flush=True)
        state = load_file(str(path))
        model = minilm_classifier(len(split.classes), head_seed=args.seed)
        model.load_state_dict(state)
        encoders[task] = SharedEncoder(model)
        heads[task] = model.classifier.eval()

    def evaluator(part: str, n: int) -> MultiTaskAccuracy:
        tasks = {}
        for task, split in splits.items():
            x, y = first(getattr(split, part), n)
            tasks[task] = (tokenize(x, max_len=max_len[task]), y, heads[task])
        return MultiTaskAccuracy(tasks, part)

    held, test = evaluator("heldout", args.heldout), evaluator("test", args.test)
    prep = time.perf_counter() - started

    t = time.perf_counter()
    result = cook(
        list(encoders.values()),
        lambda: SharedEncoder(minilm_classifier(1, head_seed=args.seed)),
        held,
        test=test,
        recipes=recipes(args),
        base=base,
        labels=list(encoders),
        output=None,
        progress=False,
    )
    cook_seconds = time.perf_counter() - t
    work = common.WORK / STUDY / "cook"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_report(result, work)
    out = common.RESULTS / STUDY
    common.publish(work, out)

    # The base and every individual fine-tune, task by task (cook reports only means).
    t = time.perf_counter()
    rows = [{"method": "base (pretrained encoder + each task's head)"} | score(test, base)]
    for task, enc in encoders.items():
        rows.append({"method": f"fine-tune on {task}"} | score(test, enc))
    own = {task: rows[1 + i]["tests"][task] for i, task in enumerate(encoders)}
    rows.append({"method": "individual (each task's own fine-tune)", "tests": own})
    individual_seconds = time.perf_counter() - t
    for m in result.methods:
        if m.recipe in ("best_individual",) or m.test_per_example is None:
            continue
        soup = m.result
        chosen = soup.options.get("chosen") if m.recipe == "search" else None
        rows.append(
            {
                "method": m.label,
                "recipe": m.recipe,
                "merge": soup.merge.canonical() if hasattr(soup, "merge") else None,
                "chosen": chosen,
                "held_out": 100 * m.held_out,
                "trace": soup.trace if m.recipe == "search" else None,
                "tests": test.by_task(m.test_per_example),
            }
        )
    for r in rows:
        r["mean"] = sum(r["tests"].values()) / len(r["tests"])
    record = {
        "study": "MiniLM fine-tuned on 3 text tasks, shared encoder merged (FusionBench ordering)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": common.machine(),
        "setup": {k: v for k, v in vars(args).items() if k != "threads"}
        | {"tasks": sizes, "optimizer": "AdamW, wd 0.01, 10% warmup, linear decay"},
        "fusionbench_clip_vit_b32_8_tasks": FUSIONBENCH,
        "seconds": {
            "prepare_and_train": prep,
            "training": train_seconds,
            "cook": cook_seconds,
            "individual_and_base_test": individual_seconds,
            "total": time.perf_counter() - started,
        },
        "rows": rows,
        "notes": result.notes,
        "taster": result.taster_stats,
    }
    common.write(STUDY, record)
    print(multitask_table(record))
    print(record["seconds"])


def score(ev: MultiTaskAccuracy, encoder: nn.Module) -> dict:
    return {"tests": ev.by_task(ev.per_example(ev.logits(encoder)))}


if __name__ == "__main__":
    main()
