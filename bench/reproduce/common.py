"""Shared pieces of the reproduction studies: the seed paper's grid, recipes and summary.

The protocol follows Dansereau et al. (the seed paper), section 3.1: a 6x6 grid of
learning rate x weight decay, SGD with momentum 0.9, every ingredient fine-tuned from
one start; a held-out split used only to order and select; 10 random-order runs for
mean and standard deviation; methods best individual, uniform, greedy sorted/random,
pruned sorted/random (Algorithm 2), plus the output ensemble.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelsoup.cook import CookResult, cook
from modelsoup.cook.plots import plot_greedy_curve, plot_pruned_passes
from modelsoup.cook.report import write_report
from modelsoup.ingredients import open_ingredients
from modelsoup.tasting import Taster

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "bench/_work/reproduce"
RESULTS = ROOT / "bench/reproduce/results"

# The seed paper's grid (section 3.1).
SEED_LRS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
SEED_WDS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 4e-4]


@dataclass
class Pool:
    """A study's trained ingredients and what scores them, before any cooking.

    ``recalibrate`` repairs a soup's BatchNorm statistics in place from ``recal_data``;
    ``train_seconds`` is 0 for ingredients found on disk.
    """

    paths: list[str]
    factory: Callable[[], torch.nn.Module]
    held: Any
    test: Any
    recalibrate: Callable[[torch.nn.Module], None]
    recal_data: Any
    train_seconds: float


def open_pool(load_pool: Callable[[Any], Pool], args: Any) -> tuple[Pool, float]:
    """A study's pool from its ``load_pool`` with ``args.threads`` torch threads.

    Returns the pool and the ``time.perf_counter()`` at the start, for the study's timing.
    """
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    found = load_pool(args)
    print(f"trained {len(found.paths)} ingredients in {found.train_seconds:.0f} s", flush=True)
    return found, started


def recipes(passes: int = 5, runs: int = 10) -> list[dict[str, Any]]:
    """Greedy and pruned soups, sorted and random (``runs`` random orders each)."""
    return [
        {"name": "greedy", "order": "sorted"},
        {"name": "greedy", "order": "random", "runs": runs},
        {"name": "pruned", "order": "sorted", "passes": passes},
        {"name": "pruned", "order": "random", "passes": passes, "runs": runs},
    ]


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch "
        f"thread(s), shared 2-core machine), torch {torch.__version__}"
    )


def run_cook(
    study: str, ingredients: list, factory, held, test, *, passes: int, runs: int, **kwargs: Any
) -> tuple[CookResult, dict]:
    """Cook the seed's recipes; copy report and figures to ``results/<study>``; summarize.

    Also scores on test the soups met along every greedy and pruned path (the seed's
    Figures 4-6, see :func:`test_ablation`); its figures go to the same folder.
    """
    work = WORK / study / "cook"
    if work.exists():
        shutil.rmtree(work)  # a fresh journal: wall times must be real, not cached
    start = time.perf_counter()
    result = cook(
        ingredients,
        factory,
        held,
        test=test,
        recipes=recipes(passes, runs),
        output=None,
        progress=False,
        **kwargs,
    )
    work.mkdir(parents=True)
    write_report(result, work)
    seconds = time.perf_counter() - start
    out = RESULTS / study
    publish(work, out)
    summary = summarize(result, seconds)
    start = time.perf_counter()
    summary["test_ablation"] = test_ablation(result, ingredients, factory, held, test, **kwargs)
    summary["test_ablation"]["seconds"] = time.perf_counter() - start
    plot_ablation(summary["test_ablation"], out / "figures", summary["rows"])
    return result, summary


def publish(work: Path, out: Path) -> None:
    """Copy a cook's ``report.md``, ``report.json`` and figures from ``work`` to a fresh ``out``."""
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    for name in ("report.md", "report.json"):
        shutil.copy(work / name, out / name)
    for fig in (work / "figures").glob("*.png"):
        shutil.copy(fig, out / "figures" / fig.name)


def test_ablation(
    result: CookResult, ingredients: list, factory, held, test, **kwargs: Any
) -> dict[str, Any]:
    """Test scores along the greedy and pruned paths: the seed paper's Figures 4-6.

    Greedy: for every run, the test score of the soup after the first n ingredients were
    considered (n = 1..k). Pruned: for every run, the test score and size of the soup
    left after pass p (p = 0..passes; pass 0 is the uniform soup). Soups are rebuilt
    from the traces and scored as cook would (``recalibrate`` and
    ``recalibrate_candidates`` as given); each distinct soup is scored once.
    """
    pool = open_ingredients(ingredients)
    taster = Taster(
        pool,
        factory(),
        held,
        recalibrate=kwargs.get("recalibrate"),
        recalibrate_candidates=kwargs.get("recalibrate_candidates", False),
    )
    position = {ing.label: i for i, ing in enumerate(pool)}
    cache: dict[frozenset, float] = {}

    def score(labels: set[str]) -> float:
        key = frozenset(labels)
        if key not in cache:
            cache[key] = 100 * taster.score_members(sorted(position[x] for x in key), test)
        return cache[key]

    greedy: dict[str, list[list[float]]] = {}
    pruned: dict[str, dict[str, list[list[float]]]] = {}
    for m in result.methods:
        if m.recipe == "greedy":
            curves = greedy.setdefault(m.label, [])
            for soup in m.runs:
                members: set[str] = set()
                curve = []
                for step in soup.trace:
                    if step["accepted"]:
                        members.add(step["tried"])
                    curve.append(score(members))
                curves.append(curve)
        elif m.recipe == "pruned":
            runs = pruned.setdefault(m.label, {"test": [], "size": []})
            for soup in m.runs:
                members = set(position)
                tests, sizes = [score(members)], [len(members)]
                for step in soup.trace[1:]:
                    if "removed" in step:
                        members.discard(step["removed"])
                    elif step.get("end_of_pass"):
                        tests.append(score(members))
                        sizes.append(len(members))
                runs["test"].append(tests)
                runs["size"].append(sizes)
    return {
        "greedy_test_by_considered": greedy,
        "pruned_by_pass": pruned,
        "soups_scored": len(cache),
    }


def plot_ablation(ablation: dict, folder: Path, rows: list[dict]) -> None:
    """Figure 4 (greedy, test) and Figures 5-6 (pruned score and size per pass, test)."""
    best = next(r["test"] for r in rows if r["method"] == "best_individual")
    curves = {label: runs for label, runs in ablation["greedy_test_by_considered"].items()}
    if curves:
        plot_greedy_curve(
            curves,
            path=folder / "test_greedy_by_ingredients.png",
            ylabel="test accuracy (%)",
            baselines={"best individual": best},
        )
    for label, runs in ablation["pruned_by_pass"].items():
        passes = list(range(len(runs["test"][0])))
        name = "test_" + label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        plot_pruned_passes(
            passes,
            [statistics.fmean(r[p] for r in runs["test"]) for p in passes],
            [statistics.fmean(r[p] for r in runs["size"]) for p in passes],
            path=folder / f"{name}.png",
        )


def summarize(result: CookResult, seconds: float) -> dict:
    """Rows of the seed's Table 1 (test %, mean +- std over runs) and the pass ablation."""
    rows = []
    for m in result.methods:
        rows.append(
            {
                "method": m.label,
                "test": 100 * m.test if m.test is not None else None,
                "test_std": 100 * m.test_std if m.test_std is not None else None,
                "held_out": 100 * m.held_out,
                "ingredients": m.size,
                "runs": len(m.runs),
            }
        )
    passes = {}
    for m in result.methods:
        if m.recipe != "pruned":
            continue
        per_run = []
        for soup in m.runs:
            ends = {s["pass"]: (s["score"], s["size"]) for s in soup.trace if s.get("end_of_pass")}
            per_run.append(ends)
        keys = sorted(per_run[0])
        passes[m.label] = {
            p: {
                "held_out": 100 * statistics.fmean(r[p][0] for r in per_run),
                "ingredients": statistics.fmean(r[p][1] for r in per_run),
            }
            for p in keys
        }
    ind_test = result.individual_test or []
    return {
        "rows": rows,
        "pruned_by_pass": passes,
        "individual_test": [100 * s for s in ind_test],
        "individual_held_out": [100 * s for s in result.individual_held_out],
        "mean_individual_test": 100 * statistics.fmean(ind_test) if ind_test else None,
        "cook_seconds": seconds,
        "taster": result.taster_stats,
        "notes": result.notes,
    }


def table(summary: dict) -> str:
    lines = ["| method | test % | held-out % | ingredients (avg) |", "|---|---|---|---|"]
    for r in summary["rows"]:
        std = f" +- {r['test_std']:.2f}" if r["test_std"] is not None else ""
        lines.append(
            f"| {r['method']} | {r['test']:.2f}{std} | {r['held_out']:.2f} | {r['ingredients']:g} |"
        )
    return "\n".join(lines)


def write(study: str, record: dict) -> None:
    path = RESULTS / study / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
