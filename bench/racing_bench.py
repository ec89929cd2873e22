"""Early rejection (racing), exact and statistical, against full evaluation, on the
same pools in one run.

For each pool, greedy (sorted), greedy (random order) and pruned (3 passes) run three
times through modelsoup's Taster: ``racing="off"`` (every candidate evaluated in full,
what every other soup tool does), ``racing="exact"`` (the default: a candidate's
evaluation stops once it provably cannot meet the score to beat) and
``racing={"confidence": 0.999}`` (statistical: stopped once a confidence sequence on its
paired differences from the incumbent says it is worse). Reported: evaluator calls,
examples run through the model, the ratio, wall time, whether the picks are identical
(exact racing must change none), and, for statistical racing, how many of its
accept/reject decisions are the ones the candidates' full scores give (each raced
candidate's full score is measured afterwards, through the full-evaluation run's
journal).

Pools (digits MLPs from ``recipes_bench.digits_task``, held-out 20,000 shifted and
noised digits, shuffled once with seed 0, in batches of 500):

- ``shared start``: 16 fine-tunes of one start (the soup papers' setting; candidates
  are close, few are rejected by a wide margin);
- ``own starts``: 16 networks each trained from its own random start (the from-scratch
  ResNet grid's situation: soups collapse and most candidates are far below the bar);
- ``mixed``: 8 of each.

``--pools effnet resnet-grid`` runs the same comparison on two pools of
``bench/reproduce`` instead: the 36 EfficientNet-Lite0 fine-tunes of
``effnet_fashion.py`` and the 36 from-scratch ResNet-8 x1 of ``resnet_scratch.py --pool
grid``, each scored by its script's own held-out evaluator (Fashion-MNIST, 500 and 2,000
images, batches of 256; no recalibration). Their ingredients are trained on first use
(the scripts' ``load_pool``, cached in ``bench/_work/reproduce``) and reused after.
``--pools minilm`` is the 36 MiniLM fine-tunes of ``minilm_tweets.py`` as docs/results.md
section 2a ran them (4 frozen layers; held-out the first 200 tweets, here in batches of
50). ``--pools demo`` adds the default demo's pool (9 MiniLM fine-tunes on tweets, held-out
300 tweets in batches of 200), found in (or trained into) ``--demo-work``.

Run::

    .venv/bin/python bench/racing_bench.py             # ~2 min on 2 cores
    .venv/bin/python bench/racing_bench.py --k 8       # quick look
    .venv/bin/python bench/racing_bench.py --pools effnet resnet-grid
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from benchlib import WORK, machine, table
from recipes_bench import digits_task, make_ingredients

sys.path.insert(0, str(Path(__file__).resolve().parent / "reproduce"))

from modelsoup.demo.digits import sgd_train
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import greedy_soup, pruned_soup
from modelsoup.tasting import Taster

RECIPES = {
    "greedy (sorted)": lambda t: greedy_soup(t),
    "greedy (random)": lambda t: greedy_soup(t, order="random", seed=0),
    "pruned (3 passes)": lambda t: pruned_soup(t, passes=3),
}


def own_starts(task, folder: Path, count: int) -> list[Path]:
    """``count`` networks, each from its own random start (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"own-{k:02d}.safetensors" for k in range(count)]
    for k, path in enumerate(paths):
        if path.exists():
            continue
        torch.manual_seed(100 + k)
        model = task.model()
        sgd_train(model, task.train, 0.05, epochs=task.epochs, seed=100 + k, momentum=task.momentum)
        safetensors.torch.save_file(model.state_dict(), str(path))
    return paths


class RecordingTaster(Taster):
    """A Taster that remembers every decision racing made: (weights, bar, strict, score)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions: list[tuple[list[float], float, bool, float]] = []

    def score(self, weights, evaluator=None, *, to_beat=None, strict=False, incumbent=None):
        value = super().score(
            weights, evaluator, to_beat=to_beat, strict=strict, incumbent=incumbent
        )
        if to_beat is not None:
            self.decisions.append((list(weights), to_beat, strict, value))
        return value


def agreeing(decisions, full: Taster) -> tuple[int, int]:
    """How many accept/reject decisions match the candidates' full scores, of how many."""
    same = 0
    for weights, to_beat, strict, value in decisions:
        truth = full.score(weights)  # from the full run's journal when it scored it
        same += full.better(value, to_beat, strict=strict) == full.better(
            truth, to_beat, strict=strict
        )
    return same, len(decisions)


def run(factory, paths: list, recipe, racing, evaluator, journal=None) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    taster = RecordingTaster(
        open_ingredients(paths), factory(), evaluator, racing=racing, journal=journal
    )
    soup = recipe(taster)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu  # this process only: steadier on a shared machine
    n = len(evaluator.labels)
    full_calls = taster.evaluations - taster.races
    return {
        "taster": taster,
        "seconds": seconds,
        "cpu": cpu,
        "evaluations": taster.evaluations,
        "examples": full_calls * n + taster.race_examples,
        "stopped": taster.rejected_early,
        # the raced candidates alone: examples run, and what full passes would have run
        "raced": (taster.race_examples, taster.race_full_examples),
        "chosen": soup.chosen,
        "score": soup.scores["held_out"],
    }


def digits_pools(k: int) -> dict[str, tuple]:
    """The three digits pools: ``name -> (paths, factory, held-out evaluator)``."""
    task = digits_task()
    folder = WORK / "racing"
    shared = make_ingredients(task, folder / "shared", k)
    own = own_starts(task, folder / "own", k)
    # One fixed random order (seed 0), so that early batches are representative: the
    # task builds its held-out set shift by shift, and racing reads it front to back.
    x, y = task.held_out
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    evaluator = Accuracy((x[order], y[order]), batch_size=500, name="held-out")
    return {
        "shared start": (shared, task.model, evaluator),
        "own starts": (own, task.model, evaluator),
        "mixed": (shared[: k // 2] + own[: k // 2], task.model, evaluator),
    }


def reproduce_pool(name: str) -> tuple:
    """A ``bench/reproduce`` pool with its script's default settings (trained if absent)."""
    import effnet_fashion
    import minilm_tweets
    import resnet_scratch

    if name == "effnet":
        found = effnet_fashion.load_pool(effnet_fashion.parse([]))
    elif name == "minilm":
        found = minilm_tweets.load_pool(minilm_tweets.parse(MINILM_RECORDED))
    else:
        found = resnet_scratch.load_pool(resnet_scratch.parse(["--pool", "grid"]))
    return found.paths, found.factory, found.held


def demo_pool(workdir: Path) -> tuple:
    """The default demo's pool (``modelsoup demo``: 9 MiniLM fine-tunes on tweets) and its
    held-out evaluator, from the demo's work folder ``workdir`` (trained there if absent)."""
    from modelsoup.demo.run import _KITCHENS, TWEETS
    from modelsoup.demo.training import train_grid

    work = workdir / TWEETS.name
    kitchen = _KITCHENS[TWEETS.name](TWEETS, work)
    paths = train_grid(
        kitchen.model,
        kitchen.train,
        dict(TWEETS.grid),
        work / "ingredients",
        start_state=kitchen.start_state,
        seeds=TWEETS.seeds,
        progress=False,
        **TWEETS.fixed,
    )
    return paths, kitchen.model, kitchen.held_out


#: minilm_tweets.py as docs/results.md section 2a ran it, its held-out in batches of 50:
#: in the script's batches of 256 the 200 held-out tweets are one batch, nothing to race
MINILM_RECORDED = [
    *("--frozen 4 --heldout 300 --heldout-use 200 --test-use 1000".split()),
    *("--eval-batch-size 50".split()),
]

POOL_LABELS = {
    "effnet": "EfficientNet-Lite0 36",
    "resnet-grid": "ResNet-8 x1 grid 36",
    "minilm": "MiniLM tweets 36 (4 frozen layers)",
    "demo": "demo (MiniLM tweets 9)",
}


def compare(pools: dict[str, tuple], confidence: float) -> tuple[list, bool, dict]:
    """Full, exact and statistical runs of every recipe on every pool: one entry per run
    (pool, recipe, mode, its result, the full run's, same picks, decisions), whether
    exact racing kept every pick, and per pool the statistical decisions that agree with
    full evaluation (agreeing, made)."""
    results, same_everywhere, agree_by_pool = [], True, {}
    for pool, (paths, factory, evaluator) in pools.items():
        agree_by_pool[pool] = [0, 0]
        for label, recipe in RECIPES.items():
            book = Journal(None)
            off = run(factory, paths, recipe, "off", evaluator, journal=book)
            exact = run(factory, paths, recipe, "exact", evaluator)
            stat = run(factory, paths, recipe, {"confidence": confidence}, evaluator)
            same = exact["chosen"] == off["chosen"] and exact["score"] == off["score"]
            same_everywhere &= same
            agree, decided = agreeing(stat["taster"].decisions, off["taster"])
            agree_by_pool[pool][0] += agree
            agree_by_pool[pool][1] += decided
            stat_same = stat["chosen"] == off["chosen"] and stat["score"] == off["score"]
            for mode, r, picks, decisions in (
                ("full evaluation", off, same, "-"),
                ("exact racing", exact, same, "-"),
                (f"statistical {confidence}", stat, stat_same, f"{agree}/{decided}"),
            ):
                results.append((pool, label, mode, r, off, picks, decisions))
    return results, same_everywhere, agree_by_pool


HEADERS = [
    "pool",
    "recipe",
    "mode",
    "evaluator calls",
    "stopped early",
    "examples",
    "fewer than full",
    "raced candidates: fewer",
    "wall s",
    "vs full",
    "CPU s",
    "CPU vs full",
    "same picks",
    "decisions as full",
]


def row(pool, label, mode, r, off, picks, decisions) -> list:
    seen, whole = r["raced"]
    return [
        pool,
        label,
        mode,
        r["evaluations"],
        r["stopped"],
        f"{r['examples']:,}",
        f"{off['examples'] / r['examples']:.2f}x",
        f"{whole / seen:.2f}x" if seen else "-",
        f"{r['seconds']:.2f}",
        f"{r['seconds'] / off['seconds']:.2f}x",
        f"{r['cpu']:.2f}",
        f"{r['cpu'] / off['cpu']:.2f}x",
        "yes" if picks else "NO",
        decisions,
    ]


def totals(results: list) -> str:
    """One line per pool and mode: examples over the recipes against full evaluation,
    the range of the per-recipe ratios, and the slowest wall and CPU ratios."""
    groups: dict[tuple[str, str], list] = {}
    for pool, _, mode, r, off, *_ in results:
        groups.setdefault((pool, mode), []).append((r, off))
    lines = []
    for (pool, mode), runs in groups.items():
        examples = sum(r["examples"] for r, _ in runs)
        full = sum(off["examples"] for _, off in runs)
        ratios = [off["examples"] / r["examples"] for r, off in runs]
        wall = max(r["seconds"] / off["seconds"] for r, off in runs)
        cpu = max(r["cpu"] / off["cpu"] for r, off in runs)
        lines.append(
            f"{pool}, {mode}: {examples:,} examples over the recipes, {full / examples:.2f}x "
            f"fewer than full (per recipe {min(ratios):.2f}x-{max(ratios):.2f}x); slowest "
            f"against full: wall {wall:.2f}x, CPU {cpu:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16, help="ingredients per digits pool")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--confidence", type=float, default=0.999)
    parser.add_argument(
        "--pools",
        nargs="+",
        choices=["digits", *POOL_LABELS],
        default=["digits"],
        help="digits: the three digits pools; effnet, resnet-grid, minilm: bench/reproduce's; "
        "demo: the default demo's",
    )
    parser.add_argument(
        "--demo-work",
        type=Path,
        default=WORK / "racing" / "demo",
        help="the demo's --workdir (its ingredients in tweets/ingredients)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pools = {}
    for name in args.pools:
        if name == "digits":
            pools |= digits_pools(args.k)
        elif name == "demo":
            pools[POOL_LABELS[name]] = demo_pool(args.demo_work)
        else:
            pools[POOL_LABELS[name]] = reproduce_pool(name)
    print(machine())
    for pool, (paths, _, evaluator) in pools.items():
        n = len(evaluator.labels)
        print(f"{pool}: K = {len(paths)}; held-out {n:,} in batches of {evaluator.batch_size}")
    same_everywhere, agree_by_pool = True, {}
    for pool, found in pools.items():  # one table per pool, printed as soon as it is done
        results, same, agree = compare({pool: found}, args.confidence)
        same_everywhere &= same
        agree_by_pool |= agree
        print(table(HEADERS, [row(*r) for r in results]), flush=True)
        print(totals(results), flush=True)
    total = [sum(a for a, _ in agree_by_pool.values()), sum(d for _, d in agree_by_pool.values())]
    for pool, (agree, decided) in [*agree_by_pool.items(), ("all pools", total)]:
        share = agree / decided if decided else 1.0
        print(
            f"statistical racing, {pool}: {agree} of {decided} accept/reject decisions "
            f"({share:.1%}) are the ones full evaluation gives"
        )
    if not same_everywhere:
        raise SystemExit("exact racing changed a pick: this is a bug")


if __name__ == "__main__":
    main()
