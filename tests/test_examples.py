"""The worked example in examples/digits runs as its docstring says, start to finish."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from modelsoup.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def test_digits_example_fine_tunes_diagnoses_and_cooks(tmp_path, capsys):
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("runs", "cooked"))
    done = subprocess.run(
        [sys.executable, "kitchen.py"], cwd=folder, capture_output=True, text=True, check=True
    )
    assert "6 ingredients" in done.stdout
    assert len(list((folder / "runs").glob("*.safetensors"))) == 6

    assert main(["inspect", str(folder / "runs")]) == 0
    assert main(["diagnose", str(folder / "soup.yaml"), "-q"]) == 0
    assert "soup away" in capsys.readouterr().out

    assert main(["cook", str(folder / "soup.yaml"), "-q"]) == 0
    report = json.loads((folder / "cooked" / "report.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert {"greedy (sorted)", "forward", "learned", "uniform", "ensemble"} <= methods
    # held-out chooses, test judges: every method carries both scores
    assert all(row["held_out"] is not None and row["test"] is not None for row in report["rows"])
    assert (folder / "cooked" / "soups" / "greedy-sorted.safetensors").exists()
