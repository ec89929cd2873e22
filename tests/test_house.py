"""The house rules that hold the layout together: one summary behind the printed and the
written verdict, user code loaded without global state, no prints in the library."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
import warnings
from pathlib import Path

import safetensors.torch
import torch

from modelsoup.cli import build_parser, main
from modelsoup.distributed import DistContext
from modelsoup.evaluators import Accuracy, as_evaluator

SRC = Path(__file__).resolve().parents[1] / "src" / "modelsoup"


def _md_verdict(report_md: str) -> str:
    section = report_md.split("**Verdict.** ", 1)[1]
    # the verdict section ends where the ingredients table or the figures begin
    return section.split("\n![", 1)[0].split("\n## Ingredients", 1)[0].strip()


def test_printed_verdict_is_the_report_verdict(tmp_path, digits_ckpts, capsys):
    # A non-default seed and resample count: the intervals depend on both, so a verdict
    # summarised again with the defaults would print other numbers than report.md holds.
    paths = sorted(digits_ckpts.glob("*.safetensors"))[:3]
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        "model: digits_kit:model\n"
        f"ingredients: {json.dumps([str(p) for p in paths])}\n"
        "held_out: digits_kit:held_out\n"
        "test: digits_kit:on_test\n"
        "recipes: [{name: greedy}]\n"
        "save: none\n"
        "seed: 11\n"
        "bootstrap_resamples: 150\n"
        f"output: {tmp_path / 'out'}\n"
    )
    assert main(["cook", str(cfg), "-q"]) == 0
    printed = capsys.readouterr().out
    verdict = printed.split("Verdict: ", 1)[1].split("\nreport: ", 1)[0].strip()
    assert "CI [" in verdict  # the intervals are part of what must agree
    assert verdict == _md_verdict((tmp_path / "out" / "report.md").read_text())


KITCHEN = """
import torch
from modelsoup.demo.digits import DigitsMLP, digits_split
from modelsoup.evaluators import Accuracy

HIDDEN = {hidden}


def model():
    return DigitsMLP(hidden=HIDDEN)


def held_out():
    split = digits_split("shuffled", train=1000, heldout=400)
    x, y = split.heldout.as_tuple()
    return Accuracy((x[:100], y[:100]), name="held-out {hidden}")
"""


def _kitchen_folder(folder: Path, hidden: int) -> Path:
    folder.mkdir()
    (folder / "kitchen.py").write_text(KITCHEN.format(hidden=hidden))
    for seed in range(2):
        torch.manual_seed(seed)
        state = {"fc1.weight": torch.randn(hidden, 64), "fc1.bias": torch.zeros(hidden)}
        state |= {"fc2.weight": torch.randn(10, hidden), "fc2.bias": torch.zeros(10)}
        safetensors.torch.save_file(state, str(folder / f"ing{seed}.safetensors"))
    config = folder / "soup.yaml"
    config.write_text(
        "model: kitchen.py:model\n"
        "ingredients: [ing0.safetensors, ing1.safetensors]\n"
        "held_out: kitchen.py:held_out\n"
        "recipes: []\n"
        "save: none\n"
        "output: cooked\n"
    )
    return config


def test_two_kitchens_of_one_name_cook_in_one_process(tmp_path):
    # Same file name, other architectures: if the second config got the first one's
    # module, its ingredients (another hidden width) would not load into the model.
    first = _kitchen_folder(tmp_path / "a", hidden=16)
    second = _kitchen_folder(tmp_path / "b", hidden=24)
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    for config, hidden in ((first, 16), (second, 24), (first, 16)):
        assert main(["cook", str(config), "-q"]) == 0
        report = json.loads((config.parent / "cooked" / "report.json").read_text())
        assert report["held_out_evaluator"] == f"held-out {hidden}"
    assert sys.path == path_before
    # one module per file, each under a name of its own (never a bare "kitchen")
    kitchens = {name for name in set(sys.modules) - modules_before if "kitchen" in name}
    assert len(kitchens) == 2 and "kitchen" not in kitchens


def test_cli_restores_warnings_and_logging(tmp_path):
    shown = warnings.showwarning
    logger = logging.getLogger("modelsoup")
    handlers, level = list(logger.handlers), logger.level
    missing = str(tmp_path / "missing.safetensors")
    assert main(["average", missing, "-o", str(tmp_path / "o.safetensors")]) == 2  # error path
    assert main(["-v", "inspect", missing]) == 2
    assert warnings.showwarning is shown
    assert logger.handlers == handlers and logger.level == level


def test_quiet_and_verbose_on_every_subcommand():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        options = {s for action in sub._actions for s in action.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, name
    # before or after the subcommand, the same meaning; the subcommand does not reset it
    assert parser.parse_args(["-q", "inspect", "x"]).quiet
    assert parser.parse_args(["inspect", "x", "-vv"]).verbose == 2
    assert parser.parse_args(["-v", "inspect", "x"]).verbose == 1


class _UserEvaluator:
    """An evaluator as a user writes one: ``evaluate`` and nothing else."""

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, model: torch.nn.Module) -> float:
        self.calls += 1
        return 0.5


def test_as_evaluator_leaves_the_users_object_alone():
    mine = _UserEvaluator()
    before = dict(vars(mine))
    ev = as_evaluator(mine, higher_is_better=False)
    assert ev.evaluate(torch.nn.Linear(1, 1)) == 0.5 and not ev.higher_is_better
    assert ev.name == "_UserEvaluator"
    assert vars(mine) == {**before, "calls": 1}  # only its own doing
    assert not hasattr(mine, "name") and not hasattr(mine, "higher_is_better")


def test_distributed_share_leaves_the_users_evaluator_alone():
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    mine = Accuracy((x, y), batch_size=2, name="mine")
    before = dict(vars(mine))
    ctx = DistContext(1, 2)
    shared = ctx.share(mine)
    assert shared is not mine and shared.sharding is ctx and shared.name == "mine"
    assert vars(mine) == before and mine.sharding is None
    assert list(shared.sharding.positions(4)) == [1, 3]  # this rank's share of the batches
    ctx.close()


def _prints(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]


def test_no_print_in_the_library():
    # The library logs (one _logger per module); only the CLI and the demo print.
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel == Path("cli.py") or rel.parts[0] == "demo":
            continue
        found += [f"{rel}:{line}" for line in _prints(ast.parse(path.read_text()))]
    assert not found, f"print() outside cli.py and demo/: {', '.join(found)}"
    assert _prints(ast.parse("def f():\n    print('x')\n")) == [2]  # the walk does see one


def test_one_logger_per_module():
    # A module that logs names its logger once, after itself: `_logger = getLogger(__name__)`.
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel in (Path("cli.py"), Path("__init__.py")):  # the CLI's handler; the package face
            continue
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger"
        ]
        if any(ast.unparse(call) != "logging.getLogger(__name__)" for call in calls):
            bad.append(f"{rel}: a logger not named after the module")
        if len(calls) > 1:
            bad.append(f"{rel}: {len(calls)} loggers")
    assert not bad, "; ".join(bad)
