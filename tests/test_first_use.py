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
    cfg.write_text(
        CONFIG.format(ckpts=digits_ckpts, out=tmp_path / "out").replace(
            "  - {name: pruned, passes: 2}\n", ""
        )
    )
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
    # one line per finished stage: ingredients on held-out and test, two recipes that
    # taste, three soups written (and no line per candidate or per tensor)
    assert 5 <= len(lines) <= 15, lines
    assert any(line.startswith("tasting greedy (sorted): ") for line in lines), lines
    assert any(line.startswith("writing greedy-sorted.safetensors: ") for line in lines), lines


# -- cook --dry-run ---------------------------------------------------------------------

KITCHEN = '''
from pathlib import Path

from digits_kit import model, splits
from modelsoup.evaluators import Accuracy

CALLS = Path(__file__).with_name("evaluations.log")


class Counted(Accuracy):
    """Held-out accuracy that logs one line per forward pass over the data."""

    def logits(self, model):
        with open(CALLS, "a") as fh:
            fh.write("held_out\\n")
        return super().logits(model)


def held_out():
    return Counted(splits()["held_out"], name="digits-held-out")
'''

PLANNED = """
model: kitchen.py:model
ingredients: ["{ckpts}/*.safetensors"]
held_out: kitchen.py:held_out
test: digits_kit:on_test
recipes:
  - {{name: greedy, order: sorted}}
  - {{name: greedy, order: random, runs: 3}}
  - {{name: pruned, passes: 2}}
  - {{name: forward}}
  - {{name: layerwise}}
output: {out}
bootstrap_resamples: 200
"""


def _kitchen(tmp_path, ckpts) -> Path:
    (tmp_path / "kitchen.py").write_text(KITCHEN)
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(PLANNED.format(ckpts=ckpts, out=tmp_path / "out"))
    return cfg


def _evaluations(tmp_path) -> int:
    log = tmp_path / "evaluations.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_dry_run_lists_ingredients_recipes_and_a_bound_then_does_nothing(
    tmp_path, digits_ckpts, capsys
):
    from modelsoup.cook.plan import plan_cook
    from modelsoup.cook.run import cook_config

    cfg = _kitchen(tmp_path, digits_ckpts)
    assert main(["cook", str(cfg), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert _evaluations(tmp_path) == 0  # nothing evaluated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kitchen.py", "soup.yaml"]
    paths = sorted(digits_ckpts.glob("*.safetensors"))
    for p in paths:  # every ingredient, by label and path
        assert any(p.stem in line and str(p) in line for line in printed.splitlines()), p
    for label in ("best_individual", "uniform", "ensemble", "greedy (random)", "forward"):
        assert f"  {label} " in printed
    assert "runs=3" in printed and "passes=2" in printed
    plan = plan_cook(cfg)
    n = len(paths)
    greedy_random = next(r for r in plan.recipes if r.label == "greedy (random)")
    assert greedy_random.held_out == 3 * (n - 1) and greedy_random.test == 3
    assert f"at most {plan.held_out_total} on held-out and {plan.test_total} on test" in printed
    assert "upper bounds" in printed

    # The bound holds for the real cook: no more evaluations run than were planned.
    result = cook_config(cfg, progress=False)
    assert 0 < _evaluations(tmp_path) <= plan.held_out_total
    assert result.taster_stats["evaluations"] <= plan.held_out_total + plan.test_total


@pytest.mark.parametrize("bad", ["device: cuda:99\n", "output: {ckpts}\n", "output: {cfg}\n"])
def test_dry_run_refuses_what_the_cook_would_refuse(tmp_path, digits_ckpts, capsys, bad):
    cfg = _kitchen(tmp_path, digits_ckpts)
    lines = [line for line in cfg.read_text().splitlines() if not line.startswith("output:")]
    extra = bad.format(ckpts=digits_ckpts, cfg=cfg)
    cfg.write_text(
        "\n".join(lines)
        + "\n"
        + extra
        + ("" if "output" in bad else f"output: {tmp_path / 'out'}\n")
    )
    assert main(["cook", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


@pytest.mark.parametrize(
    "cooked,needle", [(False, "holds report.md, which no cook wrote"), (True, "not a soup folder")]
)
def test_dry_run_refuses_an_output_whose_files_the_cook_would_lose(
    tmp_path, digits_ckpts, capsys, cooked, needle
):
    from modelsoup.cook.folder import COOK_MARKER

    cfg = _kitchen(tmp_path, digits_ckpts)
    cfg.write_text(cfg.read_text() + "save_format: folder\n")
    out = tmp_path / "out"
    mine = out / "soups" / "uniform" / "notes.txt" if cooked else out / "report.md"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    if cooked:  # a cook's folder, with the user's folder where a soup would be saved
        (out / COOK_MARKER).write_text("")
    assert main(["cook", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert mine.read_text() == "mine"


# -- diagnose reuses the cook's journal -------------------------------------------------


def test_diagnose_reuses_the_scores_cook_recorded(tmp_path, digits_ckpts, capsys):
    cfg = _kitchen(tmp_path, digits_ckpts)
    n = len(list(digits_ckpts.glob("*.safetensors")))
    assert main(["diagnose", str(cfg), "--out", str(tmp_path / "alone"), "-q"]) == 0
    alone = _evaluations(tmp_path)
    # on its own: each ingredient, then 3 inner points on each of the n-1 paths
    assert alone == n + 3 * (n - 1)
    (tmp_path / "out" / "journal.jsonl").unlink()
    (tmp_path / "evaluations.log").unlink()

    assert main(["cook", str(cfg), "-q"]) == 0
    cooked = _evaluations(tmp_path)
    assert main(["diagnose", str(cfg), "-q"]) == 0
    after_cook = _evaluations(tmp_path) - cooked
    # no ingredient is scored again, and greedy's pairs on the paths are reused too
    assert after_cook < 3 * (n - 1)
    again = _evaluations(tmp_path)
    assert main(["diagnose", str(cfg), "-q"]) == 0
    assert _evaluations(tmp_path) == again  # everything is in the journal now
    assert "verdict:" in capsys.readouterr().out


# -- misleading messages ----------------------------------------------------------------


def test_a_short_csv_row_is_reported_as_short_not_as_a_missing_column(tmp_path):
    from modelsoup.errors import ConfigError
    from modelsoup.hf import read_examples

    data = tmp_path / "held.csv"
    data.write_text("text,label\ngood film,pos\nbad film\n")
    with pytest.raises(ConfigError) as err:
        read_examples(data, ["text", "label"])
    msg = str(err.value)
    assert "line 3: 1 field(s) where the header has 2 (text, label)" in msg
    assert "no 'label' column" not in msg
    data.write_text("text,label\ngood film,pos,extra\n")
    with pytest.raises(ConfigError, match="line 2: 3 field"):
        read_examples(data, ["text", "label"])
    # a column that really is missing is still named as such
    data.write_text("text,sentiment\ngood film,pos\n")
    with pytest.raises(ConfigError, match="no 'label' column"):
        read_examples(data, ["text", "label"])
    lines = tmp_path / "held.jsonl"
    lines.write_text('{"text": "good", "label": null}\n')
    with pytest.raises(ConfigError, match="'label' is null"):
        read_examples(lines, ["text", "label"])


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            "held_out: {hf_text_classification: held.csv, max_lenght: 64}\n",
            "'held_out.max_lenght': unknown key; did you mean 'max_length'?",
        ),
        (
            "test: {hf_text_classification: t.csv, lable_column: y}\n",
            "'test.lable_column': unknown key; did you mean 'label_column'?",
        ),
        ("model: HF\n", "config key 'model': 'HF' is not understood; did you mean 'hf'"),
        ("model: mymodels\n", "'mymodels' is neither hf nor an import path"),
    ],
)
def test_config_messages_suggest_the_right_spelling(tmp_path, capsys, edit, needle):
    cfg = tmp_path / "bad.yaml"
    keys = {"model": "model: hf\n", "held_out": "held_out: digits_kit:held_out\n"}
    keys[edit.split(":")[0]] = edit  # replaces a key, or adds test
    cfg.write_text("ingredients: [x]\noutput: o\n" + "".join(keys.values()))
    assert main(["cook", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def _table_pool(n: int, only_a_wrong: int, only_b_wrong: int, batchnorm: bool):
    """Two ingredients of a model whose logits on example i are column i of its weight.

    On ``only_a_wrong`` examples only ingredient a errs, on ``only_b_wrong`` only b: each
    errs there with logits (-3, 0) where the other has (1, 0), so their uniform soup,
    (-1, 0), errs on both sets and scores below both ingredients.
    """
    import torch
    from torch import nn

    def build():
        layers = [nn.Linear(n, 2, bias=False)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(2))
        return nn.Sequential(*layers)

    states = []
    for wrong in (range(only_a_wrong), range(only_a_wrong, only_a_wrong + only_b_wrong)):
        weight = torch.zeros(2, n)
        weight[0] = 1.0
        weight[0, list(wrong)] = -3.0
        state = build().state_dict()
        state["0.weight"] = weight
        states.append(state)
    return states, build


@pytest.mark.parametrize(
    "wrong,batchnorm,warned,mentions_bn",
    [
        (2, False, False, False),  # 1 point below on 200 examples: noise, no warning
        (30, False, True, False),  # 15 points below: a real gap, but no BatchNorm to fix
        (30, True, True, True),
    ],
)
def test_collapse_warning_needs_a_real_gap_and_batchnorm_advice_needs_batchnorm(
    wrong, batchnorm, warned, mentions_bn
):
    import torch

    from modelsoup.cook import cook
    from modelsoup.evaluators import Accuracy

    n = 200
    states, build = _table_pool(n, wrong, wrong, batchnorm)
    held = Accuracy((torch.eye(n), torch.zeros(n, dtype=torch.long)), name="table")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = cook(states, build, held, progress=False, bootstrap_resamples=500)
    uniform = result.method("uniform").held_out
    assert uniform == pytest.approx(1 - 2 * wrong / n)
    assert uniform < min(result.individual_held_out)  # below both, in every case
    notes = [str(w.message) for w in seen if "loss basin" in str(w.message)]
    assert bool(notes) == warned and bool(result.notes) == warned
    if warned:
        assert f"on {n} held-out examples" in notes[0]
        assert ("BatchNorm" in notes[0]) == mentions_bn


def test_test_data_equal_to_held_out_is_warned_about(tmp_path, digits_ckpts, capsys):
    import torch

    from digits_kit import DigitsMLP, held_out, on_test
    from modelsoup.cook import cook

    def honest_warnings(test):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cook(
                [digits_ckpts],
                DigitsMLP,
                held,
                test=test,
                progress=False,
                baselines=False,
                bootstrap_resamples=10,
            )
        return [w for w in seen if "not an honest test" in str(w.message)]

    held = held_out()
    assert len(honest_warnings(held)) == 1  # the same object
    assert len(honest_warnings(held_out())) == 1  # the same data, another object
    assert honest_warnings(on_test()) == []
    score = lambda m: float(torch.cat([p.reshape(-1) for p in m.parameters()]).mean())  # noqa: E731
    held = score
    assert len(honest_warnings(score)) == 1  # one function given twice

    cfg = tmp_path / "soup.yaml"
    text = CONFIG.format(ckpts=digits_ckpts, out=tmp_path / "out")
    cfg.write_text(text.replace("digits_kit:on_test", "digits_kit:held_out"))
    assert main(["cook", str(cfg), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.count("not an honest test") == 1, err


def test_builtin_held_out_and_test_reading_one_file_are_warned_about(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ngood\nbad\nfilm\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=7,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    (tmp_path / "held.csv").write_text("text,label\ngood film,1\nbad film,0\n")
    base = f"model: hf\ningredients: [{folder}]\noutput: out\n"
    cfg = tmp_path / "soup.yaml"
    for held, test in [
        (
            "{hf_text_classification: held.csv, max_length: 3}",  # other tokens, one file
            "{hf_text_classification: ./held.csv, max_length: 16}",
        ),
        (
            "{hf_text_classification: held.csv}",  # the very same examples
            "{hf_text_classification: held.csv, name: test}",
        ),
        ("{hf_text_classification: held.csv}", "{hf_text_classification: held.csv}"),
    ]:
        cfg.write_text(base + f"held_out: {held}\ntest: {test}\n")
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # each case its own warnings, as each run has
            assert main(["cook", str(cfg), "--dry-run"]) == 0
        err = capsys.readouterr().err
        assert err.count("not an honest test") == 1, (held, test, err)
    assert not (tmp_path / "out").exists()


# -- soups that are not what they look like ----------------------------------------------


def test_a_one_ingredient_soup_is_warned_about(tmp_path, states, capsys):
    import safetensors.torch

    from modelsoup.recipes.uniform import average

    with pytest.warns(SoupWarning, match="copy of model0, not an average .it is the only"):
        average([states[0]])
    with pytest.warns(SoupWarning, match="only it has weight > 0"):
        average(states[:2], weights=[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupWarning)
        average(states[:2])
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(states[0], str(path))
    assert main(["average", str(path), "-o", str(tmp_path / "soup.safetensors"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: this soup is a copy of a, not an average" in err


def test_a_folder_soup_without_config_json_is_warned_about(tmp_path, states):
    import safetensors.torch

    from modelsoup.recipes.uniform import average

    files = []
    for i, state in enumerate(states[:2]):
        files.append(tmp_path / f"m{i}.safetensors")
        safetensors.torch.save_file(state, str(files[-1]))
    with pytest.warns(SoupWarning, match="without config.json .m0 has none.*from_pretrained"):
        average(files).save(tmp_path / "soup", progress=False)
    assert (tmp_path / "soup" / "model.safetensors").exists()

    folders = []
    for i, f in enumerate(files):  # the same weights as HF folders with their config
        folders.append(tmp_path / f"hf{i}")
        folders[-1].mkdir()
        f.rename(folders[-1] / "model.safetensors")
        (folders[-1] / "config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupWarning)
        average(folders).save(tmp_path / "soup2", progress=False)
    assert json.loads((tmp_path / "soup2" / "config.json").read_text()) == {}
