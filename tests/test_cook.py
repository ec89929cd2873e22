"""`modelsoup cook`: config validation, the report, and resuming from the journal."""

from __future__ import annotations

import json
import warnings

import pytest

from digits_kit import DigitsMLP, held_out, on_test, splits
from modelsoup.cli import main
from modelsoup.cook import cook
from modelsoup.errors import SoupWarning
from modelsoup.evaluators import Accuracy


@pytest.fixture(scope="module")
def ckpt_dir(digits_ckpts):
    return digits_ckpts


CONFIG = """
model: digits_kit:model
ingredients: ["{ckpts}/*.safetensors"]
held_out: digits_kit:held_out
test: digits_kit:on_test
recipes:
  - {{name: greedy, order: sorted}}
  - {{name: greedy, order: random, runs: 3}}
  - {{name: forward}}
  - {{name: pruned, passes: 2}}
  - {{name: greedy_ensemble}}
output: {out}
bootstrap_resamples: 200
"""


def test_cook_from_yaml_writes_soups_report_and_figures(tmp_path, ckpt_dir, capsys):
    cfg = tmp_path / "soup.yaml"
    out = tmp_path / "out"
    cfg.write_text(CONFIG.format(ckpts=ckpt_dir, out=out))
    assert main(["cook", str(cfg), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "greedy (sorted)" in printed and "report.md" in printed
    report = json.loads((out / "report.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods[:3] == ["best_individual", "uniform", "ensemble"]
    assert "greedy (random)" in methods and "pruned (sorted, 2 passes)" in methods
    rnd = next(r for r in report["rows"] if r["method"] == "greedy (random)")
    assert rnd["runs"] == 3 and rnd["held_out_std"] is not None
    for row in report["rows"]:
        assert row["test"] is not None and len(row["test_ci"]) == 2
        # for several runs, too: the interval is about the mean the row reports
        assert row["test_ci"][0] - 1e-9 <= row["test"] <= row["test_ci"][1] + 1e-9
        if row["method"] != "best_individual":
            assert "vs_best_individual" in row
        if row["kind"] == "soup":
            assert (out / row["saved"]).exists()
            card = json.loads((out / (row["saved"] + ".json")).read_text())
            assert card["recipe"] == row["recipe"]
            assert card["scores"]["test"] == pytest.approx(row["test"]) or row["runs"] > 1
    md = (out / "report.md").read_text()
    assert "| greedy (sorted) |" in md and "Verdict" in md
    for fig in report["figures"]:
        assert (out / fig).stat().st_size > 1000
    assert any("grid" in f for f in report["figures"])  # lr x seed from the sidecars


class Interrupting(Accuracy):
    """Held-out accuracy that simulates Ctrl-C after ``limit`` evaluations."""

    def __init__(self, limit=None):
        super().__init__(splits()["held_out"], name="digits-held-out")
        # private: a test's switch, not part of what the evaluator measures (public
        # settings of an evaluator class are, and would make each run another measure)
        self._limit, self.calls = limit, 0

    def logits(self, model):
        self.calls += 1
        if self._limit is not None and self.calls > self._limit:
            raise KeyboardInterrupt
        return super().logits(model)


RECIPES = [{"name": "greedy"}, {"name": "pruned", "passes": 2}, {"name": "forward"}]


def _cook(ckpt_dir, out, evaluator):
    return cook(
        [str(ckpt_dir)],
        DigitsMLP,
        evaluator,
        test=on_test(),
        recipes=RECIPES,
        output=out,
        progress=False,
        save="none",
        bootstrap_resamples=100,
    )


def test_journal_resumes_with_zero_repeated_evaluations(tmp_path, ckpt_dir):
    reference = Interrupting()
    _cook(ckpt_dir, tmp_path / "ref", reference)
    total = reference.calls

    first = Interrupting(limit=total // 2)
    with pytest.raises(KeyboardInterrupt):
        _cook(ckpt_dir, tmp_path / "run", first)
    second = Interrupting()
    result = _cook(ckpt_dir, tmp_path / "run", second)
    assert (first.calls - 1) + second.calls == total  # the interrupted call is the only redo
    third = Interrupting()
    again = _cook(ckpt_dir, tmp_path / "run", third)
    assert third.calls == 0 and again.taster_stats["evaluations"] == 0
    assert [m.held_out for m in again.methods] == [m.held_out for m in result.methods]


def test_corrupt_journal_lines_are_reported_and_ignored(tmp_path, ckpt_dir):
    out = tmp_path / "out"
    _cook(ckpt_dir, out, Interrupting())
    journal = out / "journal.jsonl"
    lines = journal.read_text().splitlines()
    # a soup of several ingredients (single ones are re-derived from cached logits)
    k = next(i for i, line in enumerate(lines) if line.count('"members"') and line.count(",") > 6)
    lines[k] = lines[k][: len(lines[k]) // 2]  # a line cut off by a crash
    journal.write_text("\n".join(lines) + "\n")
    ev = Interrupting()
    with pytest.warns(SoupWarning, match="corrupt journal line"):
        _cook(ckpt_dir, out, ev)
    assert ev.calls == 1  # only the lost evaluation runs again


def test_foreign_journal_is_set_aside_not_trusted(tmp_path, ckpt_dir):
    from modelsoup.cook.folder import COOK_MARKER
    from modelsoup.errors import WriteError

    out = tmp_path / "out"
    out.mkdir()
    foreign = '{"something": "else"}\n{"key": "x", "score": 1}\n'
    (out / "journal.jsonl").write_text(foreign)
    with pytest.raises(WriteError, match="journal.jsonl, which no cook wrote"):
        _cook(ckpt_dir, out, Interrupting())  # someone else's file: refused, left as is
    assert (out / "journal.jsonl").read_text() == foreign
    (out / COOK_MARKER).write_text("")  # a cook's folder, its journal damaged
    with pytest.warns(SoupWarning, match="not a modelsoup journal"):
        _cook(ckpt_dir, out, Interrupting())
    assert list(out.glob("journal.jsonl.ignored-*"))


@pytest.mark.parametrize(
    "edit,needle",
    [
        ("batch_size: 3\n", "'batch_size': unknown key"),
        (
            "recipes: [{name: pruned, pases: 2}]\n",
            "'recipes.0.pases' (pruned): unknown option; did you mean 'passes'?",
        ),
        ("recipies: [{name: greedy}]\n", "'recipies': unknown key; did you mean 'recipes'?"),
        ("recipes: [{name: greedy, order: backwards}]\n", "'recipes.0.order'"),
        ("recipes: [{name: souffle}]\n", "recipe 'souffle' is unknown"),
        ("recipes: [{name: pruned, passes: many}]\n", "'recipes.0.passes'"),
        (
            "recipes: [{name: greedy, merge: {rule: ties, density: 2}}]\n",
            "'recipes.0.merge' (greedy): merge rule 'ties': option 'density': Input should be",
        ),
        # numbers and flags are taken only as written: a quoted number, or YAML's yes/no
        # where a number goes, is not quietly converted
        ("seed: yes\n", "'seed': write a number, not True"),
        ("baselines: 'no'\n", "'baselines': write true or false, not 'no'"),
        ("align: 'yes'\n", "'align': write true, false, reference, activations, merge_many"),
        # YAML read as written: a key given twice, octal and base-60 integers are refused
        ("seed: 1\nseed: 2\n", "key 'seed' is given twice"),
        ("seed: 017\n", "'017' reads as a YAML 1.1 octal or base-60 number"),
        ("bootstrap_resamples: 1:30:00\n", "'1:30:00' reads as a YAML 1.1 octal"),
        ("seed: -1\n", "'seed': Input should be greater than or equal to 0"),
        ("recipes: [{name: greedy, label: '...'}]\n", "recipe label '...' cannot name a soup"),
        ('recipes: [{name: greedy, label: "a\\nb"}]\n', "cannot name a soup file"),
        # a fraction of a byte is refused, not cut down to a 1-byte budget
        ("max_memory: '1.5'\n", "'max_memory': size 1.5 is not a whole number of bytes"),
        ("max_memory: 1e999\n", "'max_memory': size 1e999 is more bytes than any machine has"),
        # checked with the config, not after the soups are saved (it held 15 GB of means)
        ("bootstrap_resamples: 1000000000\n", "'bootstrap_resamples': Input should be less"),
        # a number where a number goes, text where text goes (YAML 1.1 reads 1e-3 as text)
        ("recipes: [{name: learned, lr: '1e-3'}]\n", "write a number without quotes, not '1e-3'"),
        ("max_memory: 1.5\n", "'max_memory': size 1.5 is not a whole number of bytes"),
        ("racing: {confidence: '0.9'}\n", "'racing.confidence': write a number without quotes"),
        ("recipes: [{name: greedy, max_ingredients: '3'}]\n", "'recipes.0.max_ingredients'"),
        (
            "recipes: [{name: greedy, merge: {rule: ties, density: '0.3'}}]\n",
            "option 'density': write a number without quotes, not '0.3'",
        ),
        (
            "recipes: [{name: search, merge: {rule: task_arithmetic}, option: lambda, "
            "grid: [0.5, '1']}]\n",
            "'recipes.0.grid' (search): write a number without quotes, not '1'",
        ),
        (
            "recipes: [{name: search, merge: {rule: task_arithmetic}, option: lambda, "
            "grid: [0.5], iterations: 3}]\n",
            "a grid tries each of its values: give bounds, or drop iterations",
        ),
        (
            "recipes: [{name: search, merge: {rule: task_arithmetic, lambda_: 2}, "
            "option: lambda, grid: [0.5]}]\n",
            "merge sets lambda, which the search chooses; remove it",
        ),
    ],
)
def test_bad_configs_name_the_bad_key(tmp_path, ckpt_dir, capsys, edit, needle):
    base = CONFIG.format(ckpts=ckpt_dir, out=tmp_path / "out").split("recipes:")[0]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(base + f"output: {tmp_path / 'out'}\n" + edit)
    assert main(["cook", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entry,needle",
    [
        (
            {"name": "greedy", "merge": {"rule": "ties", "density": 2}},
            "cook(): config key 'recipes.0.merge' (greedy): merge rule 'ties': option "
            "'density': Input should be less than or equal to 1",
        ),
        (
            {"name": "greedy", "ordr": "random"},
            "cook(): config key 'recipes.0.ordr' (greedy): unknown option; did you mean 'order'?",
        ),
        ({"name": "pruned", "passes": "many"}, "cook(): config key 'recipes.0.passes' (pruned)"),
    ],
)
def test_bad_recipe_options_in_python_are_one_config_error_line(tmp_path, entry, needle):
    import torch

    from modelsoup.errors import ConfigError

    missing = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]  # never read: checked first
    with pytest.raises(ConfigError) as raised:
        cook(missing, torch.nn.Linear(8, 3), lambda m: 0.0, recipes=[entry], progress=False)
    assert str(raised.value) == needle or str(raised.value).startswith(needle)
    assert "\n" not in str(raised.value)


def test_missing_required_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: digits_kit:model\ningredients: [x]\noutput: o\n")
    assert main(["cook", str(cfg)]) == 2
    assert "'held_out': required key is missing" in capsys.readouterr().err


def test_collapsed_uniform_soup_is_warned_about(tmp_path):
    import torch

    from digits_kit import _train

    # Two unrelated random nets: their average is no better than chance.
    states = []
    for s in range(2):
        torch.manual_seed(100 + s)
        m = DigitsMLP()
        _train(m, lr=0.1, epochs=3, seed=s)
        states.append(m.state_dict())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = cook(states, DigitsMLP, held_out(), progress=False)
    # independently trained from different inits, the plain average loses to both
    assert result.method("uniform").held_out < min(result.individual_held_out)
    assert any("may not share a loss basin" in str(w.message) for w in seen)
    assert result.notes


def test_a_test_loss_judges_a_soup_chosen_by_held_out_accuracy_the_right_way_round():
    # held-out accuracy chooses, test loss judges: a soup with a higher test loss is worse
    from types import SimpleNamespace

    from modelsoup.cook.report import _verdict, report_scale

    result = SimpleNamespace(
        higher_is_better=True,
        test_higher_is_better=False,
        individual_held_out=[0.9, 0.8],
        individual_test=[0.13, 0.2],
    )
    worse = {"text": "+0.046, CI [0.005, 0.076]", "significant": True, "difference": 0.046}
    rows = [
        {
            "kind": "soup",
            "recipe": "uniform",
            "method": "uniform",
            "ingredients": 2,
            "held_out": 0.93,
            "test": 0.18,
            "vs_best_individual": worse,
        },
    ]
    assert report_scale(result) == 1.0  # a loss in [0, 1] is no percentage
    assert "The soup is worse" in _verdict(result, rows, 1.0, "")
    better = {**worse, "difference": -0.046}
    assert "The soup helped" in _verdict(
        result, [{**rows[0], "vs_best_individual": better}], 1.0, ""
    )


def test_soups_an_earlier_run_left_are_named_not_passed_off_as_this_reports(tmp_path, ckpt_dir):
    out = tmp_path / "out"
    common = dict(progress=False, bootstrap_resamples=50, output=out)
    cook([str(ckpt_dir)], DigitsMLP, held_out(), recipes=["uniform", "greedy"], **common)
    assert {p.name for p in (out / "soups").iterdir()} >= {
        "uniform.safetensors",
        "greedy-sorted.safetensors",
        "greedy-sorted.safetensors.json",
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = cook([str(ckpt_dir)], DigitsMLP, held_out(), recipes=["uniform"], **common)
    # greedy's soup (and its card) are the first run's, not this report's
    note = next(n for n in result.notes if "did not make" in n)
    assert "greedy-sorted.safetensors" in note and "uniform" not in note and ".json" not in note
    assert any("did not make" in str(w.message) for w in seen)
    report = (out / "report.md").read_text()
    assert "greedy-sorted.safetensors, which this run did not make" in report
    # a run that saves every soup it reports on writes no such note
    again = cook([str(ckpt_dir)], DigitsMLP, held_out(), recipes=["uniform", "greedy"], **common)
    assert not [n for n in again.notes if "did not make" in n]
    # save: none leaves every earlier soup beside a report that does not describe them
    quiet = cook([str(ckpt_dir)], DigitsMLP, held_out(), recipes=["uniform"], save="none", **common)
    assert "uniform.safetensors" in next(n for n in quiet.notes if "did not make" in n)


def test_a_plain_test_function_still_gets_a_verdict_and_no_ensemble_baseline():
    import math

    import torch

    from modelsoup.cook.report import summarize
    from modelsoup.errors import ConfigError

    def rotation(a):
        return 3 * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    torch.manual_seed(0)
    x = torch.randn(2000, 2)

    def data(w, lo, hi):
        return x[lo:hi], (x[lo:hi] @ w.T).argmax(-1)

    ings = [{"weight": rotation(0.1)}, {"weight": rotation(1.1)}]
    held = Accuracy(data(rotation(0.6), 0, 1000), name="held")
    judge = Accuracy(data(rotation(-0.3), 1000, 2000), name="judge")  # the first one wins

    def plain_test(model) -> float:  # no logits, no per-example results
        return judge.evaluate(model)

    result = cook(ings, torch.nn.Linear(2, 2, bias=False), held, test=plain_test,
                  recipes=["greedy"], progress=False, bootstrap_resamples=100)  # fmt: skip
    assert "ensemble" not in [m.label for m in result.methods]  # it could not be tested
    verdict = summarize(result, bootstrap_resamples=100)["verdict"]
    assert result.method("uniform").test < max(result.individual_test)
    assert "the soup is worse than it on test" in verdict, verdict
    calls = []
    with pytest.raises(ConfigError, match="recipe 'ensemble' averages the models' logits"):
        cook(ings, torch.nn.Linear(2, 2, bias=False), held,
             test=lambda m: calls.append(1) or 0.0, recipes=["greedy", "ensemble"],
             progress=False)  # fmt: skip
    assert not calls  # refused before any evaluation


def test_a_test_score_that_is_not_the_mean_of_its_examples_gets_no_interval():
    import torch

    from modelsoup.cook.report import summarize

    class FirstHalf(Accuracy):  # weighs its examples: the score is not their mean
        def score_logits(self, logits):
            return float(self.per_example(logits)[: len(logits) // 2].float().mean())

    x = torch.eye(2).repeat_interleave(20, dim=0)  # 20 of [1, 0], then 20 of [0, 1]
    y = torch.zeros(40, dtype=torch.long)  # right on the first half only
    ings = [{"weight": torch.tensor([[1.0, 0.0], [0.0, 0.5]])},
            {"weight": torch.tensor([[0.5, 0.0], [0.0, 1.0]])}]  # fmt: skip
    result = cook(ings, torch.nn.Linear(2, 2, bias=False), Accuracy((x, y)),
                  test=FirstHalf((x, y)), recipes=["uniform"], progress=False,
                  bootstrap_resamples=200)  # fmt: skip
    rows = {r["method"]: r for r in summarize(result, bootstrap_resamples=200)["rows"]}
    assert "test_ci" not in rows["uniform"] and "vs_best_individual" not in rows["uniform"]
    result = cook(ings, torch.nn.Linear(2, 2, bias=False), Accuracy((x, y)),
                  test=Accuracy((x, y)), recipes=["uniform"], baselines=False,
                  progress=False, bootstrap_resamples=200)  # fmt: skip
    verdict = summarize(result, bootstrap_resamples=200)["verdict"]
    assert "turn baselines on for an interval" in verdict, verdict


def test_an_exponent_without_a_dot_is_a_number_where_one_goes_and_text_elsewhere():
    # YAML 1.1 reads 1e-3 as text (its floats need a dot), YAML 1.2 as a number; a config
    # means the number for lr and the text for a run folder or label named by its lr
    from modelsoup.cook.config import CookConfig, read_yaml
    from modelsoup.recipes import get_recipe

    text = (
        "model: m:f\nheld_out: m:g\noutput: o\nmax_memory: 8e9\nbootstrap_resamples: 2.5e3\n"
        "ingredients: [1e-3, {path: 3e-4, label: 3e-4}]\n"
        "recipes:\n  - {name: learned, lr: 1e-3, epochs: 2e1}\n"
        "  - {name: search, merge: {rule: ties, lambda: 1e0}, option: density,\n"
        "     grid: [1e-1, 5e-1]}\n"
    )
    config = CookConfig(**read_yaml(text, "soup.yaml"))
    assert [(e.path, e.label) for e in config.ingredients] == [("1e-3", None), ("3e-4", "3e-4")]
    assert config.bootstrap_resamples == 2500 and config.max_memory == "8e9"
    learned, search = (get_recipe(r.name).check_options(r.options()) for r in config.recipes)
    assert (learned.lr, learned.epochs) == (0.001, 20)
    assert search.grid == [0.1, 0.5] and search.merge_rule().canonical()["lambda"] == 1.0
    assert search.merge == {"rule": "ties", "lambda": 1}  # a number in its card and label too
