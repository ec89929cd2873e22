"""`modelsoup demo --quick`: the digits variant end to end, then again from the cache."""

from __future__ import annotations

import json

from modelsoup.cli import main
from modelsoup.demo import DIGITS, demo_recipes
from modelsoup.recipes import RECIPES

BASELINES = ["best_individual", "uniform", "ensemble"]
RECIPE_ROWS = ["greedy (sorted)", "greedy (random)", "pruned (sorted, 1 pass)"]


def _run(tmp_path, capsys) -> tuple[dict, str]:
    out, work = tmp_path / "out", tmp_path / "work"
    code = main(["demo", "--quick", "-q", "--output", str(out), "--workdir", str(work)])
    assert code == 0
    return json.loads((out / "report.json").read_text()), capsys.readouterr().out


def test_quick_demo_end_to_end_then_from_cache(tmp_path, capsys):
    report, printed = _run(tmp_path, capsys)
    out, work = tmp_path / "out", tmp_path / "work"

    methods = [row["method"] for row in report["rows"]]
    expected = BASELINES + RECIPE_ROWS + (["learned"] if "learned" in RECIPES else [])
    assert methods == expected
    for row in report["rows"]:
        assert row["test"] is not None and 0.0 <= row["test"] <= 1.0
    random_greedy = report["rows"][methods.index("greedy (random)")]
    assert random_greedy["runs"] == DIGITS.random_runs
    assert len(report["individuals"]) == DIGITS.ingredients
    # Every ingredient records how it was trained; the grid heatmap needs lr and seed.
    assert {"lr", "seed"} <= set(report["individuals"][0]["hyperparameters"])

    md = (out / "report.md").read_text()
    assert "Verdict" in md and "| greedy (sorted) |" in md
    assert report["figures"]
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 1000
        assert f"]({fig})" in md
    assert (out / "soup.safetensors").is_file() and (out / "soup.safetensors.json").is_file()
    assert len(list((work / "digits" / "ingredients").glob("*.safetensors"))) == DIGITS.ingredients

    # The printed summary carries the table and the report's own verdict, word for word.
    for method in expected:
        assert method in printed
    assert f"Verdict: {report['verdict']}" in printed
    assert f"{DIGITS.ingredients} of {DIGITS.ingredients} ingredients trained" in printed
    assert report["evaluations"]["evaluations"] > 0

    sidecars = {p: p.stat().st_mtime_ns for p in (work / "digits" / "ingredients").glob("*.json")}
    again, printed = _run(tmp_path, capsys)
    # Nothing trained (sidecars untouched) and nothing evaluated: all from the journal.
    assert {p: p.stat().st_mtime_ns for p in sidecars} == sidecars
    assert f"0 of {DIGITS.ingredients} ingredients trained" in printed
    assert again["evaluations"]["evaluations"] == 0
    assert again["evaluations"]["reused"] > 0
    assert [r["method"] for r in again["rows"]] == methods
    # Same ingredients, same journal, same seeds: the same soups.
    for a, b in zip(report["rows"], again["rows"]):
        assert a["chosen"] == b["chosen"] and a["held_out"] == b["held_out"]
    assert again["verdict"] == report["verdict"]


def test_learned_joins_only_when_registered(monkeypatch):
    names = [r["name"] for r in demo_recipes(DIGITS)]
    assert names[:3] == ["greedy", "greedy", "pruned"]
    monkeypatch.delitem(RECIPES, "learned", raising=False)
    assert "learned" not in [r["name"] for r in demo_recipes(DIGITS)]


def test_quick_demo_with_progress_off_a_terminal(tmp_path, capsys):
    # What `make demo` does in CI or a log file: progress on, stderr not a terminal, so
    # every stage is one log line and no bar is drawn (this once raised AttributeError).
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["demo", "--quick", "--output", str(out), "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    assert (out / "report.json").is_file()


def test_the_demo_never_replaces_a_report_it_did_not_write(tmp_path, capsys):
    out, work = tmp_path / "project", tmp_path / "work"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    code = main(["demo", "--quick", "-q", "--output", str(out), "--workdir", str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "report.md, which no cook wrote" in err[0], err
    assert (out / "report.md").read_text() == "my own report"
    assert not work.exists()  # refused before any training
