"""The report: a table like the seed paper's Table 1, with honest uncertainty.

For every method: held-out score (what chose it), test score (what judges it) with a
95% bootstrap interval over test examples, and a paired comparison with the best
individual model on the same examples ("+0.6 points, CI [0.1, 1.1]" or "no detectable
difference"). Written as ``report.json`` and ``report.md`` with PNG figures.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from modelsoup._util import atomic_file, slug
from modelsoup.cook.stats import MIN_RESAMPLES, bootstrap_ci, paired_difference
from modelsoup.errors import SoupWarning


def _fmt(x: float | None, std: float | None = None, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{x * scale:.2f}" if scale != 1 else f"{x:.4f}"
    if std is not None:
        text += f" ± {std * scale:.2f}" if scale != 1 else f" ± {std:.4f}"
    return text


def _perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def _test_higher_is_better(result) -> bool:
    # the test evaluator's direction: the held-out one's unless the cook recorded another
    other = getattr(result, "test_higher_is_better", None)
    return result.higher_is_better if other is None else other


def report_scale(result) -> float:
    """Show accuracies as percentages (100); losses and anything outside [0, 1] as is (1)."""
    if getattr(result, "perplexity_columns", None):
        return 1.0  # a language model's loss in nats, however small, is no percentage
    if not (result.higher_is_better and _test_higher_is_better(result)):
        return 1.0  # a loss in [0, 1] is still a loss
    scores = list(result.individual_held_out) + (result.individual_test or [])
    return 100.0 if all(0.0 <= s <= 1.0 for s in scores) else 1.0


def summarize(result, *, bootstrap_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The report as plain data: rows, individual scores, verdict, notes.

    Example:
        >>> import torch
        >>> from modelsoup.cook.run import cook
        >>> ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)]
        >>> r = cook(ings, torch.nn.Linear(1, 1, bias=False),
        ...          lambda m: 1 - abs(float(m.weight.detach()) - 2), progress=False)
        >>> [row["method"] for row in summarize(r)["rows"]]
        ['best_individual', 'uniform']
    """
    scale = report_scale(result)
    unit = "points" if scale == 100 else ""
    best = next((m for m in result.methods if m.recipe == "best_individual"), None)
    rows = []
    for m in result.methods:
        row: dict[str, Any] = {
            "method": m.label,
            "recipe": m.recipe,
            "kind": "soup" if m.is_soup else "ensemble",
            "held_out": m.held_out,
            "held_out_std": m.held_out_std,
            "test": m.test,
            "test_std": m.test_std,
            "runs": len(m.runs),
            "ingredients": m.size,
            "chosen": [result.ingredients[i].label for i in m.result.chosen],
            "evaluations": m.evaluations,
            "reused_from_journal": m.reused,
            "seconds": round(m.seconds, 3),
            "saved": m.saved,
        }
        for column in getattr(result, "perplexity_columns", []):
            if row[column] is not None:
                row[f"{column}_perplexity"] = _perplexity(row[column])
        pe = m.test_per_example
        if pe is not None:
            ci = bootstrap_ci(pe.numpy(), n_resamples=bootstrap_resamples, seed=seed)
            row["test_ci"] = [ci.low, ci.high]
            if best is not None and best.test_per_example is not None and m is not best:
                cmp = paired_difference(
                    pe.numpy(),
                    best.test_per_example.numpy(),
                    n_resamples=bootstrap_resamples,
                    seed=seed,
                )
                row["vs_best_individual"] = {
                    "difference": cmp.difference,
                    "ci": [cmp.low, cmp.high],
                    "p_value": cmp.p_value,
                    "significant": cmp.significant,
                    "text": cmp.describe(scale=scale, unit=unit, digits=1 if scale == 100 else 4),
                }
        rows.append(row)
    verdict = _verdict(result, rows, scale, unit)
    if bootstrap_resamples < MIN_RESAMPLES and any("vs_best_individual" in r for r in rows):
        verdict += (
            f" (Only {bootstrap_resamples} bootstrap resamples: below {MIN_RESAMPLES} no "
            "difference is called significant; use 2000.)"
        )
    return {
        "format": "modelsoup.report/1",
        "held_out_evaluator": result.held_out_name,
        "test_evaluator": result.test_name,
        "higher_is_better": result.higher_is_better,
        "test_higher_is_better": _test_higher_is_better(result),
        "rows": rows,
        "individuals": [
            {
                "label": ing.label,
                "path": str(ing.path) if ing.path is not None else None,
                "sha256": ing.sha256,
                "hyperparameters": ing.hyperparameters,
                "held_out": h,
                "test": (result.individual_test[i] if result.individual_test else None),
            }
            for i, (ing, h) in enumerate(zip(result.ingredients, result.individual_held_out))
        ],
        "verdict": verdict,
        "notes": result.notes,
        "evaluations": result.taster_stats,
        "seconds": round(result.seconds, 2),
    }


def _verdict(result, rows: list[dict], scale: float, unit: str) -> str:
    """Name the soup the held-out data would pick, and say what the test set thinks of it."""
    soups = [r for r in rows if r["kind"] == "soup" and r["recipe"] != "best_individual"]
    if not soups:
        return "no soup was cooked"
    sign = 1 if result.higher_is_better else -1
    pick = max(soups, key=lambda r: sign * r["held_out"])
    count = pick["ingredients"]
    text = (
        f"On held-out data the best soup is {pick['method']} ({count:g} "
        f"ingredient{'' if count == 1 else 's'})."
    )
    cmp = pick.get("vs_best_individual")
    sign = 1 if _test_higher_is_better(result) else -1  # test judges in its own direction
    if cmp is not None:
        text += f" On test, against the best individual model: {cmp['text']}."
        if cmp["significant"] and sign * cmp["difference"] > 0:
            text += " The soup helped."
        elif cmp["significant"]:
            text += " The soup is worse: keep the best individual model."
        else:
            text += " The test set cannot tell them apart."
    elif pick["test"] is not None:
        text += f" Its test score is {_fmt(pick['test'], scale=scale)}."
        alone = _best_individual_test(result)
        if alone is not None:
            diff = sign * (pick["test"] - alone)
            word = "better than" if diff > 0 else "worse than" if diff < 0 else "the same as"
            why = (
                "there is no best_individual row to compare with example by example: turn "
                "baselines on for an interval"
                if pick.get("test_ci") is not None
                else "the test evaluator gives no per-example results whose mean is its "
                "score, so no interval says whether that is more than chance"
            )
            text += (
                f" The best individual model (on held-out) scores {_fmt(alone, scale=scale)}: "
                f"the soup is {word} it on test, by one score each ({why})."
            )
    return text


def _best_individual_test(result) -> float | None:
    # the test score of the ingredient the held-out data ranks first
    if not result.individual_test or not result.individual_held_out:
        return None
    held = result.individual_held_out
    sign = 1 if result.higher_is_better else -1
    best = max(range(len(held)), key=lambda i: (sign * held[i], -i))
    return result.individual_test[best]


def write_report(
    result, folder: str | Path, *, bootstrap_resamples: int = 2000, seed: int = 0
) -> dict:
    """Write ``report.json``, ``report.md`` and ``figures/*.png`` into ``folder``."""
    folder = Path(folder)
    data = summarize(result, bootstrap_resamples=bootstrap_resamples, seed=seed)
    figures = write_figures(result, data, folder / "figures")
    data["figures"] = [str(p.relative_to(folder)) for p in figures]
    with atomic_file(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    with atomic_file(folder / "report.md") as tmp:
        tmp.write_text(render_markdown(data, report_scale(result)))
    return data


def render_markdown(data: dict, scale: float = 100.0) -> str:
    """The Markdown report: table, verdict, notes, figures.

    Example:
        >>> print(render_markdown({"rows": [], "verdict": "no soup was cooked", "notes": [],
        ...     "held_out_evaluator": "acc", "test_evaluator": None, "seconds": 1,
        ...     "evaluations": {}, "figures": []}).splitlines()[0])
        # modelsoup report
    """
    lines = [
        "# modelsoup report",
        "",
        f"Held-out (selection) evaluator: `{data['held_out_evaluator']}`; "
        f"test evaluator: `{data['test_evaluator'] or 'none'}`. "
        "Recipes choose on held-out only; test scores are never used to choose.",
        "",
        f"**Verdict.** {render_verdict(data, scale)}",
    ]
    lines += render_individuals(data, scale)
    for fig in data.get("figures", []):
        lines += [f"![{Path(fig).stem}]({fig})", ""]
    return "\n".join(lines)


def render_individuals(data: dict, scale: float = 100.0) -> list[str]:
    """The ingredients table of ``report.md``: label, scores, hyperparameters and path.

    Example:
        >>> rows = render_individuals({"individuals": [{"label": "run1/checkpoint-26",
        ...     "path": "/runs/run1/checkpoint-26", "held_out": 0.8, "test": None,
        ...     "hyperparameters": {"learning_rate": 3e-4, "seed": 1}}]})
        >>> rows[4]
        '| run1/checkpoint-26 | 80.00 | - | learning_rate=0.0003, seed=1 | `/runs/run1/checkpoint-26` |'
    """  # noqa: E501
    individuals = data.get("individuals") or []
    if not individuals:
        return []
    pct = " (%)" if scale == 100 else ""
    lines = [
        "## Ingredients",
        "",
        f"| ingredient | held-out{pct} | test{pct} | hyperparameters | path |",
        "|---|---|---|---|---|",
    ]
    for ing in individuals:
        hyper = ", ".join(f"{k}={v}" for k, v in (ing.get("hyperparameters") or {}).items())
        path = f"`{ing['path']}`" if ing.get("path") else "(in memory)"
        lines.append(
            f"| {ing['label']} | {_fmt(ing['held_out'], scale=scale)} "
            f"| {_fmt(ing['test'], scale=scale)} | {hyper or '-'} | {path} |"
        )
    return [*lines, ""]


def render_verdict(data: dict, scale: float = 100.0) -> str:
    """The verdict, the table, warnings and costs: what ``modelsoup cook`` prints.

    ``report.md`` holds the same text, so the terminal and the file never disagree.

    Example:
        >>> print(render_verdict({"rows": [], "verdict": "no soup was cooked", "notes": []}))
        no soup was cooked
        <BLANKLINE>
        | method | held-out (%) | test (%) | test 95% CI | vs best individual (test) | ingredients | evaluations (reused) | seconds |
        |---|---|---|---|---|---|---|---|
        <BLANKLINE>
    """  # noqa: E501
    pct = " (%)" if scale == 100 else ""
    lines = [
        data["verdict"],
        "",
        f"| method | held-out{pct} | test{pct} | test 95% CI | vs best individual (test) "
        "| ingredients | evaluations (reused) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        ci = r.get("test_ci")
        digits = 2 if scale != 1 else 4  # as the scores beside it
        ci_text = f"[{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "-"
        vs = r.get("vs_best_individual", {}).get("text", "-")
        size = f"{r['ingredients']:.3g}" + (f" (mean of {r['runs']} runs)" if r["runs"] > 1 else "")
        held = _fmt(r["held_out"], r["held_out_std"], scale)
        test = _fmt(r["test"], r["test_std"], scale)
        if "held_out_perplexity" in r:
            held += f" (perplexity {r['held_out_perplexity']:.2f})"
        if "test_perplexity" in r:
            test += f" (perplexity {r['test_perplexity']:.2f})"
        lines.append(
            f"| {r['method']} | {held} | {test} | {ci_text} | {vs} | {size} "
            f"| {r['evaluations']} ({r['reused_from_journal']}) | {r['seconds']:.1f} |"
        )
    lines.append("")
    if data["notes"]:
        lines += ["## Warnings", ""] + [f"- {n}" for n in data["notes"]] + [""]
    ev = data.get("evaluations", {})
    if ev:
        lines.append(
            f"Evaluator calls: {ev.get('evaluations')} run, {ev.get('reused')} reused from the "
            f"journal; {ev.get('eval_seconds')} s evaluating, {ev.get('mix_seconds')} s mixing "
            f"weights; {data['seconds']} s in all."
        )
        if ev.get("races"):
            seen, full = ev.get("race_examples", 0), ev.get("race_full_examples", 0)
            ratio = f"{full / seen:.2f}x fewer" if seen else "none"
            stat = ev.get("statistical_races", 0)
            kind = "Racing" if stat else "Exact racing"
            lines.append(
                f"{kind}: {ev['rejected_early']} of {ev['races']} raced candidates were "
                f"stopped early, {seen} of {full} examples evaluated ({ratio})"
                + ("; every decision is the one a full evaluation gives." if not stat else ".")
            )
            for test in ev.get("racing_tests", []):
                lines.append(
                    f"Statistical racing ({stat} candidates): {test['method']} at confidence "
                    f"{test['confidence']}"
                    + (f", losses clipped at {test['clip']}" if test["clip"] else "")
                    + f"; held-out examples in one random order (seed "
                    f"{test['order_seed']}, sha256 {test['order_sha256']}); "
                    f"{ev.get('incumbent_passes', 0)} extra full passes for incumbents' "
                    "per-example values."
                )
            for name, reason in ev.get("racing_fallbacks", {}).items():
                lines.append(
                    f"Statistical racing was off for evaluator {name}: {reason}; its "
                    "candidates were raced exactly instead."
                )
        if ev.get("bn_recalibrations"):
            lines.append(
                f"BatchNorm statistics were re-estimated {ev['bn_recalibrations']} times, each "
                "one extra pass over the recalibration data (included in the times above)."
            )
        lines.append("")
    return "\n".join(lines)


def _numeric_axes(result) -> tuple[str, str] | None:
    """Two hyperparameters that vary over the ingredients (for the grid heatmap)."""
    hps = [ing.hyperparameters for ing in result.ingredients]
    if not hps or not all(hps):
        return None
    keys = [k for k in hps[0] if all(isinstance(h.get(k), int | float) for h in hps)]
    varying = [k for k in keys if len({h[k] for h in hps}) > 1]
    preferred = [k for k in ("lr", "learning_rate", "weight_decay", "wd") if k in varying]
    axes = preferred + [k for k in varying if k not in preferred]
    # the first pair that gives each ingredient a cell of its own (checkpoints of one run
    # share their learning rate and seed: one cell would hide the others)
    for i, x in enumerate(axes):
        for y in axes[i + 1 :]:
            if len({(h[x], h[y]) for h in hps}) == len(hps):
                return x, y
    return None


def write_figures(result, data: dict, folder: Path) -> list[Path]:
    """The seed paper's figures for this cook (those that apply).

    A figure that cannot be drawn is skipped with a warning: the cook's results matter
    more than any one picture of them.
    """
    try:
        return _figures(result, data, folder)
    except Exception as err:  # noqa: BLE001 - a picture never costs the report
        what = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"figures not written: {what}", SoupWarning, stacklevel=2)
        return sorted(folder.glob("*.png")) if folder.exists() else []


def _figures(result, data: dict, folder: Path) -> list[Path]:
    from modelsoup.cook import plots

    made: list[Path] = []
    scale = report_scale(result)
    use_test = result.test_name is not None
    key = "test" if use_test else "held_out"
    ylabel = f"{'test' if use_test else 'held-out'} score" + (" (%)" if scale == 100 else "")
    rows = [r for r in data["rows"] if r[key] is not None]
    if rows:
        lows = [r["test_ci"][0] * scale if r.get("test_ci") else math.nan for r in rows]
        highs = [r["test_ci"][1] * scale if r.get("test_ci") else math.nan for r in rows]
        made.append(
            plots.plot_method_bars(
                [r["method"] for r in rows],
                [r[key] * scale for r in rows],
                lows,
                highs,
                path=folder / "methods.png",
                ylabel=ylabel,
            )
        )
    individual = result.individual_test if use_test else result.individual_held_out
    if individual and len(result.ingredients) > 1:
        made.append(
            plots.plot_method_bars(
                [ing.label for ing in result.ingredients],
                [s * scale for s in individual],
                None,
                None,
                path=folder / "ingredients.png",
                ylabel=ylabel,
                title=f"the ingredients, each on its own ({'test' if use_test else 'held-out'})",
            )
        )
    curves: dict[str, list[list[float]]] = {}
    for m in result.methods:
        if m.recipe == "greedy":
            curves[m.label] = [
                [s["best"] * scale if "best" in s else s["score"] * scale for s in soup.trace]
                for soup in m.runs
            ]
    if curves:
        best = (
            max(result.individual_held_out)
            if result.higher_is_better
            else min(result.individual_held_out)
        )
        made.append(
            plots.plot_greedy_curve(
                curves,
                path=folder / "greedy.png",
                ylabel="held-out score" + (" (%)" if scale == 100 else ""),
                baselines={"best individual": best * scale},
            )
        )
    for m in result.methods:
        if m.recipe == "pruned":
            ends = [s for s in m.result.trace if s.get("end_of_pass") or s.get("pass") == 0]
            if len(ends) > 1:
                made.append(
                    plots.plot_pruned_passes(
                        [s["pass"] for s in ends],
                        [s["score"] * scale for s in ends],
                        [s["size"] for s in ends],
                        path=folder / f"{slug(m.label)}.png",
                    )
                )
    axes = _numeric_axes(result)
    if axes:
        scores_src = result.individual_test if use_test else result.individual_held_out
        grid = {}
        for ing, s in zip(result.ingredients, scores_src):
            grid[(ing.hyperparameters[axes[0]], ing.hyperparameters[axes[1]])] = s * scale
        soups = {r["method"]: r[key] * scale for r in rows}
        made.append(
            plots.plot_grid_heatmap(
                grid,
                x_label=axes[0],
                y_label=axes[1],
                soups=soups,
                path=folder / "grid.png",
                title=f"individual {ylabel} over the grid",
            )
        )
    return made
