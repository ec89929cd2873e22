"""Greedy and pruned soups through modelsoup's Taster, against the cost of evaluating alone
and against a straightforward implementation.

For K ingredients fine-tuned from one shared start, each recipe is timed three ways in
the same run:

- ``modelsoup``: ``open_ingredients`` + ``Taster`` + ``greedy_soup`` / ``pruned_soup
  (passes=2)``, with the held-out evaluator built as the docs show it,
  ``Accuracy((x, y))``;
- ``modelsoup, named evaluator``: the same with ``Accuracy((x, y), name="held-out")``
  (an unnamed built-in evaluator hashes its whole data set each time its name is read);
- ``sketch``: not a target, a what-if: the named evaluator, and ingredients keyed by
  file identity rather than the sha256 of their bytes (``bench/proposed_fixes.py``);
- ``straightforward``: the seed blog's way: for every candidate build a new model,
  load every member's state dict from disk with ``safetensors.torch.load_file``,
  average them, ``load_state_dict``, evaluate. Same algorithm, same order, same
  ``>=`` rule, no score cache (pruned runs both passes in full).

Beside them: (a) = evaluator calls x the time of one evaluation, measured just before
(median of several). The overhead is the wall time above (a). Because other work on a
shared machine makes one evaluation's time drift, the time spent *outside* the
evaluator within the same run is reported too (wall time minus the evaluator calls'
own time, both measured in that run): the steadier measure of overhead.

Two tasks:

- ``digits``: an MLP 64-256-256-10 on scikit-learn's digits (the shared digits kitchen,
  :mod:`modelsoup.demo.digits`); the held-out set is the digits held-out split,
  shifted by up to a pixel and noised, 20,000 images.
  Evaluation-bound: a checkpoint is ~0.3 MB and one evaluation tens of ms.
- ``text``: a fastText-style classifier (``EmbeddingBag`` over 2^17 hashed tokens, 64
  dims, then a linear layer; 8.4M parameters, 32 MiB) on synthetic 10-topic documents.
  Weight-bound: loading and mixing a checkpoint costs about as much as one evaluation,
  as with large real models.

Run::

    .venv/bin/python bench/recipes_bench.py                     # both tasks, K = 8, 16, 32
    .venv/bin/python bench/recipes_bench.py --tasks digits --ks 8 --repeats 1   # quick look

torch runs on ``--threads`` threads (1 by default: the networks are small, and a
second thread mostly adds noise on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from benchlib import WORK, machine, table, warm_page_cache
from proposed_fixes import keyed_by_identity
from torch import nn

from modelsoup import open_ingredients
from modelsoup.demo.digits import DigitsMLP, digits_split, pretrain, write_fine_tunes
from modelsoup.evaluators import Accuracy
from modelsoup.recipes.greedy import greedy_soup
from modelsoup.recipes.pruned import pruned_soup
from modelsoup.tasting import Taster


# -- tasks -------------------------------------------------------------------------
class BagOfTokens(nn.Module):
    def __init__(self, buckets: int = 2**17, dim: int = 64, classes: int = 10):
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean", sparse=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.embed(x))


@dataclass
class Task:
    name: str
    model: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    held_out: tuple[torch.Tensor, torch.Tensor]
    pretrain_lr: float
    lrs: list[float]  # fine-tuning learning rates, cycled over the ingredients
    momentum: float
    epochs: int


def digits_task() -> Task:
    # The suite's shuffled split (train: the first 1000 images, held-out: the next 400)
    # and a deeper MLP, from the shared digits kitchen.
    split = digits_split("shuffled", train=1000, heldout=400)
    # A bigger held-out set: the held-out images shifted by up to one pixel, then noised.
    gen = torch.Generator().manual_seed(1)
    images = torch.nn.functional.pad(split.heldout.x.reshape(-1, 8, 8), (1, 1, 1, 1))
    xs, ys = [], []
    for dy in range(3):
        for dx in range(3):
            for _ in range(6):
                shifted = images[:, dy : dy + 8, dx : dx + 8].reshape(-1, 64)
                xs.append(shifted + 0.1 * torch.randn(shifted.shape, generator=gen))
                ys.append(split.heldout.y)
    held_x, held_y = torch.cat(xs)[:20_000], torch.cat(ys)[:20_000]
    return Task(
        "digits",
        functools.partial(DigitsMLP, hidden=(256, 256)),
        split.train.as_tuple(),
        (held_x, held_y),
        pretrain_lr=0.05,
        lrs=[0.003, 0.01, 0.03, 0.1, 0.2, 0.5, 0.02, 0.05],
        momentum=0.9,
        epochs=3,
    )


def text_task(buckets: int = 2**17, length: int = 48) -> Task:
    gen = torch.Generator().manual_seed(0)
    topics = torch.randint(0, buckets, (10, 1000), generator=gen)

    def documents(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        on_topic = torch.rand(n, length, generator=gen) < 0.1
        topical = topics[y[:, None], torch.randint(0, 1000, (n, length), generator=gen)]
        background = (buckets * torch.rand(n, length, generator=gen) ** 3).long()
        return torch.where(on_topic, topical, background), y

    return Task(
        "text",
        lambda: BagOfTokens(buckets),
        documents(4000),
        documents(20_000),
        pretrain_lr=2.0,
        lrs=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 1.5, 3.0],
        momentum=0.0,  # SGD takes sparse gradients without momentum
        epochs=2,
    )


TASKS = {"digits": digits_task, "text": text_task}


def make_ingredients(task: Task, folder: Path, count: int) -> list[Path]:
    """Fine-tune ``count`` ingredients from one shared start (kept between runs)."""
    n_pre = len(task.train[1]) // 4
    start = functools.cache(
        lambda: pretrain(
            task.model, task.train, n=n_pre, lr=task.pretrain_lr, epochs=1, momentum=task.momentum
        )
    )
    runs = [(f"ft-{k:02d}", task.lrs[k % len(task.lrs)], k + 1) for k in range(count)]
    return write_fine_tunes(
        folder, runs, task.model, start, task.train, epochs=task.epochs, momentum=task.momentum
    )


# -- the straightforward implementation --------------------------------------------
class Straightforward:
    """Every candidate from scratch: new model, re-average members from disk, evaluate."""

    def __init__(self, paths: list[Path], factory: Callable[[], nn.Module], evaluator):
        self.paths, self.factory, self.evaluator = paths, factory, evaluator
        self.evaluations = 0
        self.eval_seconds = 0.0  # for the report only; not part of the method

    def score(self, members: list[int]) -> float:
        model = self.factory()
        state_dicts = [safetensors.torch.load_file(str(self.paths[i])) for i in members]
        soup = {k: sum(sd[k] for sd in state_dicts) / len(state_dicts) for k in state_dicts[0]}
        model.load_state_dict(soup)
        self.evaluations += 1
        start = time.perf_counter()
        score = self.evaluator.evaluate(model)
        self.eval_seconds += time.perf_counter() - start
        return score

    def order(self) -> tuple[list[int], list[float]]:
        scores = [self.score([i]) for i in range(len(self.paths))]
        return sorted(range(len(scores)), key=lambda i: -scores[i]), scores

    def greedy(self) -> list[int]:
        order, scores = self.order()
        members, best = [order[0]], scores[order[0]]
        for i in order[1:]:
            score = self.score([*members, i])
            if score >= best:
                members, best = [*members, i], score
        return sorted(members)

    def pruned(self, passes: int = 2) -> list[int]:
        members = list(range(len(self.paths)))
        baseline = self.score(members)
        order, _ = self.order()
        for _ in range(passes):
            for i in order:
                if i not in members or len(members) == 1:
                    continue
                candidate = [m for m in members if m != i]
                score = self.score(candidate)
                if score >= baseline:
                    members, baseline = candidate, score
        return sorted(members)


# -- timing ------------------------------------------------------------------------
def one_evaluation(task: Task, path: Path, evaluator, runs: int = 9) -> float:
    """Median seconds of one ``evaluator.evaluate`` on one ingredient."""
    model = task.model()
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    evaluator.evaluate(model)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        evaluator.evaluate(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_modelsoup(
    task: Task, paths: list[Path], recipe: str, evaluator, prefetch: bool | None = None
) -> dict:
    start = time.perf_counter()
    taster = Taster(open_ingredients(paths), task.model(), evaluator, prefetch=prefetch)
    soup = greedy_soup(taster) if recipe == "greedy" else pruned_soup(taster, passes=2)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "evaluations": taster.evaluations,
        "eval_seconds": taster.eval_seconds,
        "mix_seconds": taster.mix_seconds,
        "prefetched": taster.prefetched,
        "chosen": soup.chosen,
    }


def prefetch_rows(task: Task, ks: list[int], repeats: int) -> tuple[list, list[str]]:
    """Prefetch on against off (named evaluator), in the same run: time outside the
    evaluator as a share of evaluator time, fastest of ``repeats`` each, and the picks."""
    folder = WORK / "recipes" / task.name
    paths = make_ingredients(task, folder, max(ks))
    named = Accuracy(task.held_out, batch_size=1000, name="held-out")
    rows, verdicts = [], []
    for k in ks:
        warm_page_cache(paths[:k])
        for recipe in ("greedy", "pruned"):
            best: dict[str, dict] = {}
            for _ in range(repeats):
                for label, prefetch in (("prefetch on", None), ("prefetch off", False)):
                    got = with_modelsoup(task, paths[:k], recipe, named, prefetch=prefetch)
                    if label not in best or got["seconds"] < best[label]["seconds"]:
                        best[label] = got
            share = {}
            for label, r in best.items():
                outside = r["seconds"] - r["eval_seconds"]
                share[label] = outside / r["eval_seconds"]
                rows.append(
                    [
                        task.name,
                        k,
                        recipe,
                        label,
                        r["evaluations"],
                        r["prefetched"],
                        f"{r['seconds']:.2f}",
                        f"{r['eval_seconds']:.2f}",
                        f"{outside:.2f}",
                        f"{100 * share[label]:.1f}%",
                    ]
                )
            on, off = best["prefetch on"], best["prefetch off"]
            verdicts.append(
                f"{task.name} K={k} {recipe}: outside the evaluator "
                f"{100 * share['prefetch on']:.0f}%"
                f" of evaluator time with prefetch, {100 * share['prefetch off']:.0f}% without "
                f"(target <= 100%: {'met' if share['prefetch on'] <= 1 else 'MISSED'}); "
                f"wall {on['seconds'] / off['seconds']:.2f}x of prefetch off; "
                f"same picks: {'yes' if on['chosen'] == off['chosen'] else 'NO'}"
            )
            print("  " + verdicts[-1], flush=True)
    return rows, verdicts


def with_sketch(task: Task, paths: list[Path], recipe: str, evaluator) -> dict:
    start = time.perf_counter()
    ingredients = open_ingredients(paths)
    keyed_by_identity(ingredients)
    taster = Taster(ingredients, task.model(), evaluator)
    soup = greedy_soup(taster) if recipe == "greedy" else pruned_soup(taster, passes=2)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "evaluations": taster.evaluations,
        "eval_seconds": taster.eval_seconds,
        "chosen": soup.chosen,
    }


def straightforward(task: Task, paths: list[Path], recipe: str, evaluator) -> dict:
    start = time.perf_counter()
    naive = Straightforward(paths, task.model, evaluator)
    chosen = naive.greedy() if recipe == "greedy" else naive.pruned(passes=2)
    return {
        "seconds": time.perf_counter() - start,
        "evaluations": naive.evaluations,
        "eval_seconds": naive.eval_seconds,
        "chosen": chosen,
    }


def run_task(task: Task, ks: list[int], repeats: int, keep: bool) -> tuple[list, list[str]]:
    folder = WORK / "recipes" / task.name
    try:
        start = time.perf_counter()
        paths = make_ingredients(task, folder, max(ks))
        size = paths[0].stat().st_size
        print(
            f"{task.name}: {max(ks)} ingredients of {size / 2**20:.2f} MiB ready in "
            f"{time.perf_counter() - start:.0f} s; held-out set of {len(task.held_out[1]):,}",
            flush=True,
        )
        unnamed = Accuracy(task.held_out, batch_size=1000)
        named = Accuracy(task.held_out, batch_size=1000, name="held-out")
        rows, verdicts = [], []
        for k in ks:
            warm_page_cache(paths[:k])
            for recipe in ("greedy", "pruned"):
                best: dict[str, dict] = {}
                t_eval = math.inf
                for _ in range(repeats):
                    t_eval = min(t_eval, one_evaluation(task, paths[0], unnamed))
                    for label, fn, ev in (
                        ("modelsoup", with_modelsoup, unnamed),
                        ("modelsoup, named evaluator", with_modelsoup, named),
                        ("straightforward", straightforward, unnamed),
                        ("sketch", with_sketch, named),
                    ):
                        got = fn(task, paths[:k], recipe, ev)
                        if label not in best or got["seconds"] < best[label]["seconds"]:
                            best[label] = got
                ms = best["modelsoup"]
                named_run = best["modelsoup, named evaluator"]
                sk = best["sketch"]
                a = ms["evaluations"] * t_eval
                naive = best["straightforward"]
                same = all(r["chosen"] == naive["chosen"] for r in best.values())
                for label, r in best.items():
                    over = r["seconds"] / (r["evaluations"] * t_eval) - 1
                    outside = r["seconds"] - r["eval_seconds"]
                    rows.append(
                        [
                            task.name,
                            k,
                            recipe,
                            label,
                            r["evaluations"],
                            f"{t_eval * 1e3:.1f}",
                            f"{r['evaluations'] * t_eval:.2f}",
                            f"{r['seconds']:.2f}",
                            f"{100 * over:+.1f}%",
                            f"{outside:.2f}",
                            f"{1e3 * outside / r['evaluations']:.1f}",
                            f"{100 * outside / r['eval_seconds']:.1f}%",
                            f"{naive['seconds'] / r['seconds']:.2f}x",
                        ]
                    )
                over = ms["seconds"] / a - 1
                inside = ms["seconds"] / ms["eval_seconds"] - 1
                verdicts.append(
                    f"{task.name} K={k} {recipe}: overhead over (a) {100 * over:+.1f}% "
                    f"(in-run {100 * inside:+.1f}%; "
                    f"{'met' if over < 0.05 else 'MISSED'} <5%); "
                    f"{naive['seconds'] / ms['seconds']:.2f}x faster than straightforward"
                    + (
                        f" ({'met' if naive['seconds'] >= 3 * ms['seconds'] else 'MISSED'} >=3x)"
                        if k == 16
                        else ""
                    )
                    + f"; every implementation chose the same soup: {'yes' if same else 'NO'} "
                    f"({len(ms['chosen'])} of {k}); with a named evaluator: "
                    f"{100 * (named_run['seconds'] / named_run['eval_seconds'] - 1):+.1f}% in-run, "
                    f"{naive['seconds'] / named_run['seconds']:.2f}x; sketch: "
                    f"{100 * (sk['seconds'] / sk['eval_seconds'] - 1):+.1f}% in-run, "
                    f"{naive['seconds'] / sk['seconds']:.2f}x"
                )
                print("  " + verdicts[-1], flush=True)
        return rows, verdicts
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,text", help="digits, text or both")
    parser.add_argument("--ks", default="8,16,32", help="numbers of ingredients")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (fastest kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--keep", action="store_true", help="keep the fine-tuned ingredients")
    parser.add_argument(
        "--prefetch", action="store_true", help="only compare prefetch on and off (modelsoup)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = sorted(int(k) for k in args.ks.split(","))
    print(machine())
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    if args.prefetch:
        rows, verdicts = [], []
        for name in args.tasks.split(","):
            r, v = prefetch_rows(TASKS[name](), ks, args.repeats)
            rows += r
            verdicts += v
        headers = ["task", "K", "recipe", "prefetch", "evals", "read ahead", "wall s"]
        headers += ["evaluator s", "outside evaluator s", "% of eval time"]
        print()
        print(table(headers, rows))
        print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for v in verdicts:
            print("  " + v)
        return
    rows, verdicts = [], []
    for name in args.tasks.split(","):
        r, v = run_task(TASKS[name](), ks, args.repeats, args.keep)
        rows += r
        verdicts += v
    headers = [
        "task",
        "K",
        "recipe",
        "implementation",
        "evals",
        "1 eval ms",
        "(a) evals x 1 eval s",
        "wall s",
        "above (a)",
        "outside evaluator s",
        "per eval ms",
        "% of eval time",
        "speed-up vs straightforward",
    ]
    print()
    print(table(headers, rows))
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("targets: modelsoup overhead above (a) < 5%; >= 3x faster than straightforward at K=16")
    for v in verdicts:
        print("  " + v)


if __name__ == "__main__":
    main()
