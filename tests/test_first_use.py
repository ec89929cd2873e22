"""What a new user could not work out: quiet logs off a terminal, ``cook --dry-run``,
messages that point at the real problem, and warnings for soups that are not what
they look like."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from modelsoup.cli import main
from modelsoup.errors import SoupWarning

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

CONFIG = """
model: digits_kit:model
ingredients: ["{ckpts}/*.safetensors"]
held_out: digits_kit:held_out
test: digits_kit:on_test
recipes:
  - {{name: greedy, order: sorted}}
  - {{name: pruned, passes: 2}}
output: {out}
bootstrap_resamples: 200
"""


def test_cook_logs_one_line_per_stage_when_stderr_is_not_a_terminal(tmp_path, digits_ckpts):
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(CONFIG.format(ckpts=digits_ckpts, out=tmp_path / "out"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    run = subprocess.run(
        [sys.executable, "-m", "modelsoup.cli", "cook", str(cfg)],
        capture_output=True,  # stderr is a pipe, as in a CI log or `2> log`
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert "\r" not in err and "\x1b" not in err  # no bar redraws, no cursor moves
    lines = err.splitlines()
    # one line per finished stage: ingredients on held-out and test, three recipes that
    # taste, four soups written (and no line per candidate or per tensor)
    assert 5 <= len(lines) <= 15, lines
    assert any(line.startswith("tasting greedy (sorted): ") for line in lines), lines
    assert any(line.startswith("writing greedy-sorted.safetensors: ") for line in lines), lines
