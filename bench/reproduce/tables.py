"""Print the results tables for docs/results.md from the studies' summary.json files.

.venv/bin/python bench/reproduce/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The seed paper (Dansereau et al.), test accuracy % and ingredients (avg).
SEED = {
    "ViT (Table 1)": {
        "best_individual": (50.3, "-"),
        "uniform": (32.22, 22),
        "greedy (random)": (51.06, 5.1),
        "greedy (sorted)": (51.76, 5),
        "pruned (random)": (52.04, 3.2),
        "pruned (sorted)": (52.1, 3),
    },
    "ResNet (Table 2)": {
        "best_individual": (65.78, "-"),
        "uniform": (1.08, 33),
        "greedy (random)": (65.78, 1),
        "greedy (sorted)": (65.78, 1),
        "pruned (random)": (1.19, 6.2),
        "pruned (sorted)": (1.19, 6.2),
    },
    "EfficientNet (Table 2)": {
        "best_individual": (40.12, "-"),
        "uniform": (0.98, 36),
        "greedy (random)": (40.12, 1),
        "greedy (sorted)": (40.12, 1),
        "pruned (random)": (1.12, 5.1),
        "pruned (sorted)": (1.12, 5.1),
    },
}


def seed_key(label: str) -> str:
    return label.split(",")[0].rstrip(")") + (")" if "(" in label else "")


def rows(summary: dict) -> dict[str, dict]:
    return {r["method"]: r for r in summary["rows"]}


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    std = f" +- {r['test_std']:.2f}" if r.get("test_std") is not None else ""
    return f"{r['test']:.2f}{std} ({r['ingredients']:g})"


def table(columns: dict[str, dict], seed: str | None) -> str:
    names = list(columns)
    head = ["method"] + ([f"seed paper {seed}"] if seed else []) + names
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = list(rows(next(iter(columns.values()))))
    for m in methods:
        line = [m]
        if seed:
            s = SEED[seed].get(seed_key(m))
            line.append(f"{s[0]} ({s[1]})" if s else "-")
        line += [cell(rows(columns[n]).get(m)) for n in names]
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def pass_table(summary: dict) -> str:
    out = [
        "| recipe | pass | held-out % (mean over runs) | ingredients (mean) |",
        "|---|---|---|---|",
    ]
    for label, by_pass in summary["pruned_by_pass"].items():
        for p, v in by_pass.items():
            out.append(f"| {label} | {p} | {v['held_out']:.2f} | {v['ingredients']:.1f} |")
    return "\n".join(out)


def ablation_table(summary: dict) -> str:
    """The seed's Figures 4-6 on test: greedy by ingredients considered, pruned by pass."""
    ab = summary.get("test_ablation")
    if not ab:
        return "(no test ablation in this run)"
    out = ["| greedy | after n ingredients considered: test % (mean over runs) |", "|---|---|"]
    for label, runs in ab["greedy_test_by_considered"].items():
        k = len(runs[0])
        points = sorted({1, 2, 3, 5, 10, k} & set(range(1, k + 1)))
        means = [sum(r[n - 1] for r in runs) / len(runs) for n in points]
        out.append(
            f"| {label} | " + ", ".join(f"n={n}: {m:.2f}" for n, m in zip(points, means)) + " |"
        )
    out += ["", "| pruned | pass | test % (mean) | ingredients (mean) |", "|---|---|---|---|"]
    for label, runs in ab["pruned_by_pass"].items():
        for p in range(len(runs["test"][0])):
            t = sum(r[p] for r in runs["test"]) / len(runs["test"])
            n = sum(r[p] for r in runs["size"]) / len(runs["size"])
            out.append(f"| {label} | {p} | {t:.2f} | {n:.1f} |")
    return "\n".join(out)


def multitask_table(record: dict) -> str:
    """The multitask study's table: test accuracy (%) per task and their mean."""
    tasks = list(record["setup"]["tasks"])
    lines = [
        "| method | chosen | " + " | ".join(tasks) + " | mean | held-out mean |",
        "|---|---|" + "---|" * (len(tasks) + 2),
    ]
    for r in record["rows"]:
        chosen = r.get("chosen")
        merge = r.get("merge") or {}
        detail = ", ".join(f"{k}={v:g}" for k, v in merge.items() if isinstance(v, float))
        if chosen is None:
            detail = ""
        cells = " | ".join(f"{r['tests'][t]:.1f}" for t in tasks)
        held = f"{r['held_out']:.1f}" if r.get("held_out") is not None else "-"
        lines.append(f"| {r['method']} | {detail} | {cells} | {r['mean']:.1f} | {held} |")
    return "\n".join(lines)


def main() -> None:
    studies = {
        "minilm_tweets": ("ViT (Table 1)", None),
        "minilm_tweets_full": ("ViT (Table 1)", None),
        "effnet_fashion": ("EfficientNet (Table 2)", ("no_recalibration", "bn_recalibration")),
        "resnet_scratch": (
            "ResNet (Table 2)",
            ("plain", "bn_recalibration", "aligned_bn_recalibration"),
        ),
        "resnet_scratch_grid": (
            "ResNet (Table 2)",
            ("plain", "bn_recalibration", "aligned_bn_recalibration"),
        ),
    }
    for study, (seed, variants) in studies.items():
        path = RESULTS / study / "summary.json"
        if not path.exists():
            print(f"## {study}: not run\n")
            continue
        s = json.loads(path.read_text())
        columns = {v: s[v] for v in variants} if variants else {"ours": s}
        print(f"## {study}\n\n{s['study']}; {s['date']}; {s['machine']}\n")
        print(table(columns, seed), "\n")
        for name, c in columns.items():
            ind = c["individual_test"]
            print(
                f"{name}: individual test mean {sum(ind) / len(ind):.2f}, min {min(ind):.2f}, "
                f"max {max(ind):.2f}; notes: {c['notes']}\n"
            )
            print(pass_table(c), "\n")
            print(ablation_table(c), "\n")
        print("seconds:", json.dumps(s["seconds"]), "\n")
    path = RESULTS / "multitask" / "summary.json"
    if path.exists():
        s = json.loads(path.read_text())
        print(f"## multitask\n\n{s['study']}; {s['date']}; {s['machine']}\n")
        print(multitask_table(s), "\n")
        print("seconds:", json.dumps(s["seconds"]), "\n")


if __name__ == "__main__":
    main()
