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
from pathlib import Path
from typing import Any

import torch

from modelsoup.cook import CookResult, cook

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "bench/_work/reproduce"
RESULTS = ROOT / "bench/reproduce/results"

# The seed paper's grid (section 3.1).
SEED_LRS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
SEED_WDS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 4e-4]


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
    """Cook the seed's recipes; copy report and figures to ``results/<study>``; summarize."""
    work = WORK / study / "cook"
    if work.exists():
        shutil.rmtree(work)  # a fresh journal: wall times must be real, not cached
    start = time.perf_counter()
    # Reports are written below rather than by cook(output=...): see write_report_safely.
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
    write_report_safely(result, work)
    seconds = time.perf_counter() - start
    out = RESULTS / study
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    for name in ("report.md", "report.json"):
        shutil.copy(work / name, out / name)
    for fig in (work / "figures").glob("*.png"):
        shutil.copy(fig, out / "figures" / fig.name)
    return result, summarize(result, seconds)


def write_report_safely(result: CookResult, folder: Path) -> None:
    """``write_report``, working around a modelsoup bug with multi-run methods.

    For a recipe with several random-order runs, the report's bar is the mean test score
    over runs but its bootstrap interval comes from the first run's per-example scores
    (``cook._run_entry`` keeps only ``k == 0``), so the interval can exclude the bar and
    ``plots.plot_method_bars`` raises ConfigError. Then drop those intervals and retry.
    """
    from modelsoup.errors import ConfigError
    from modelsoup.report import write_report

    try:
        write_report(result, folder)
    except ConfigError as err:
        print(f"report: {err}; dropping the first-run intervals of multi-run methods")
        for m in result.methods:
            if len(m.runs) > 1:
                m.test_per_example = None
        write_report(result, folder)


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
