"""Merge rules inside evaluation-guided recipes: tasting, journal keys, cook configs."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from digits_kit import DigitsMLP, held_out, on_test, pretrained_state
from modelsoup import average
from modelsoup.cli import main
from modelsoup.cook import cook
from modelsoup.errors import ConfigError
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import (
    forward_selection_soup,
    greedy_soup,
    layerwise_soup,
    pruned_soup,
)
from modelsoup.tasting import Taster

TIES = {"rule": "ties", "density": 0.3}


@pytest.fixture(scope="module")
def pool(digits_ckpts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    base = folder / "pretrained.safetensors"
    safetensors.torch.save_file(pretrained_state(), str(base))
    return sorted(digits_ckpts.glob("*.safetensors")), base


def _taster(pool, journal=None):
    paths, base = pool
    return Taster(open_ingredients(paths), DigitsMLP(), held_out(), base=base, journal=journal)


def test_a_ties_candidate_scores_as_the_ties_soup_itself(pool):
    paths, base = pool
    taster = _taster(pool)
    with taster.merging(TIES):
        score = taster.score([1, 1, 0, 1, 0])
    soup = average([paths[0], paths[1], paths[3]], base=base, merge=TIES)
    assert score == held_out().evaluate(soup.apply(DigitsMLP()))
    with taster.merging(None):
        linear = taster.score([1, 1, 0, 1, 0])
    assert linear == held_out().evaluate(average(paths[:2] + paths[3:4]).apply(DigitsMLP()))


def test_different_rules_and_options_never_share_a_score(pool, tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    taster = _taster(pool, journal)
    weights = [1, 1, 1, 0, 0]
    specs = [None, TIES, {**TIES, "density": 0.5}, {**TIES, "lambda": 0.8}, "model_stock"]
    keys = set()
    for spec in specs:
        with taster.merging(spec):
            keys.add(taster.key(weights, taster.held_out))
            taster.score(weights)
    assert len(keys) == len(specs) and taster.evaluations == len(specs)
    # a re-run with the same journal file evaluates nothing
    again = _taster(pool, Journal(tmp_path / "journal.jsonl"))
    for spec in specs:
        with again.merging(spec):
            again.score(weights)
    assert again.evaluations == 0 and again.reused == len(specs)
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()[1:]
    assert any("ties density=0.3" in line for line in lines)


def test_a_reordered_pool_never_reuses_an_order_dependent_merge(pool, tmp_path):
    # SLERP starts from the first member and DARE draws each member's mask from its
    # place in the pool: the same files in another order are another soup
    paths, base = pool
    dare = {"rule": "dare_linear", "density": 0.5}
    scores = {}
    for order in (paths[:2], paths[:2][::-1]):
        taster = Taster(
            open_ingredients(order),
            DigitsMLP(),
            held_out(),
            base=base,
            journal=Journal(tmp_path / "journal.jsonl"),
        )
        for spec in ({"rule": "slerp", "t": 0.2}, dare):
            with taster.merging(spec):
                scores.setdefault(spec["rule"], []).append(taster.score([1, 1]))
        assert taster.reused == 0 and taster.evaluations == 2
        with taster.merging(dare):
            assert taster.score([1, 1]) == scores["dare_linear"][-1]
            expected = average(order, base=base, merge=dare).apply(DigitsMLP())
            assert scores["dare_linear"][-1] == held_out().evaluate(expected)
    assert taster.reused == 1
    assert scores["slerp"][0] != scores["slerp"][1]


def test_the_linear_rule_keeps_the_accumulator_fast_path(pool):
    taster = _taster(pool)
    taster.score([1, 1, 0, 0, 0])
    assert taster.accumulator.weights[:2] == [1.0, 1.0]
    with taster.merging(TIES):
        taster.score([1, 0, 1, 0, 0])
    assert taster.accumulator.weights[:3] == [1.0, 1.0, 0.0]  # not touched by TIES


@pytest.mark.parametrize(
    "recipe",
    [greedy_soup, forward_selection_soup, pruned_soup, layerwise_soup],
    ids=lambda f: f.__name__,
)
def test_every_evaluation_guided_recipe_takes_a_merge_rule(pool, recipe):
    taster = _taster(pool)
    soup = recipe(taster, merge=TIES)
    assert soup.merge.rule == "ties" and soup.base is taster.base
    assert taster.merge.is_average  # the rule was the recipe's only
    # the held-out score it reports is the TIES soup's, scored again outside the recipe
    assert taster.score_soup(soup) == soup.scores["held_out"]
    module = soup.apply(DigitsMLP())
    assert held_out().evaluate(module) == pytest.approx(soup.scores["held_out"])


def test_individual_scores_are_the_ingredients_themselves_under_any_rule(pool):
    taster = _taster(pool)
    with taster.merging(TIES):
        scores = taster.individual_scores()
    paths, _ = pool
    assert scores[0] == held_out().evaluate(average([paths[0]]).apply(DigitsMLP()))


def test_a_recipe_with_a_rule_that_needs_a_base_and_none_is_refused(pool):
    paths, _ = pool
    taster = Taster(open_ingredients(paths), DigitsMLP(), held_out())
    with pytest.raises(ConfigError, match="merge rule 'ties'.*needs a base model"):
        greedy_soup(taster, merge=TIES)


def test_cook_config_with_base_and_merge_rules(pool, tmp_path, capsys):
    paths, base = pool
    out = tmp_path / "out"
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"""
model: digits_kit:model
ingredients: ["{paths[0].parent}/*.safetensors"]
base: {base}
held_out: digits_kit:held_out
test: digits_kit:on_test
recipes:
  - {{name: greedy}}
  - {{name: greedy, merge: {{rule: ties, density: 0.3}}}}
  - {{name: pruned, merge: {{rule: task_arithmetic, lambda: 0.8}}}}
output: {out}
bootstrap_resamples: 100
baselines: false
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    labels = [r["method"] for r in report["rows"]]
    assert labels == [
        "greedy (sorted)",
        "greedy (sorted, ties density=0.3, lambda=1)",
        "pruned (sorted, 1 pass, task_arithmetic lambda=0.8)",
    ]
    md = (out / "report.md").read_text()
    assert "| greedy (sorted, ties density=0.3, lambda=1) |" in md
    row = report["rows"][1]
    card = json.loads((out / (row["saved"] + ".json")).read_text())
    assert card["merge"] == {"rule": "ties", "density": 0.3, "lambda": 1.0}
    assert card["base"]["path"] == str(base)
    # the saved soup is the TIES soup: its test score is what the report says
    weights = safetensors.torch.load_file(str(out / row["saved"]))
    module = DigitsMLP()
    module.load_state_dict(weights)
    assert on_test().evaluate(module) == pytest.approx(row["test"])


def test_a_merge_rule_that_needs_a_base_fails_before_any_evaluation(pool):
    paths, _ = pool
    calls = []

    def held(module):
        calls.append(1)
        return 0.0

    with pytest.raises(ConfigError, match="merge rule 'ties'.*needs a base model"):
        cook(paths, DigitsMLP, held, recipes=[{"name": "greedy", "merge": TIES}], progress=False)
    assert not calls


def test_bad_merge_options_in_a_config_name_the_key(pool, tmp_path, capsys):
    paths, base = pool
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"""
model: digits_kit:model
ingredients: ["{paths[0].parent}/*.safetensors"]
base: {base}
held_out: digits_kit:held_out
recipes:
  - {{name: greedy, merge: {{rule: ties, density: 2}}}}
output: {tmp_path / "out"}
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "recipes.0.merge" in err and "option 'density'" in err
    assert "ties" in err
    cfg.write_text(cfg.read_text().replace("rule: ties, density: 2", "rule: tie"))
    assert main(["cook", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "recipes.0.merge" in err and "merge rule 'tie' is unknown" in err


def test_align_and_base_are_refused_together(pool, tmp_path, capsys):
    paths, base = pool
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"""
model: digits_kit:model
ingredients: ["{paths[0]}", "{paths[1]}"]
base: {base}
held_out: digits_kit:held_out
align: true
output: {tmp_path / "out"}
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 2
    assert "align and base cannot be combined" in capsys.readouterr().err


def test_soup_of_a_ties_recipe_differs_from_the_linear_one(pool):
    taster = _taster(pool)
    plain = greedy_soup(taster)
    ties = greedy_soup(taster, merge=TIES)
    a, b = plain.state_dict(), ties.state_dict()
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


@pytest.mark.parametrize("name", ["greedy", "forward", "pruned", "layerwise"])
@pytest.mark.parametrize("merge", [{"rule": "task_arithmetic", "lambda": 0.5}, {"alpha": 0.5}])
def test_the_score_a_recipe_reports_is_its_soups_when_it_keeps_the_start(name, merge):
    # one ingredient as the rule merges it is another model than the ingredient itself:
    # a recipe that keeps its start must report the merged start's score
    ings = [{"weight": torch.full((1, 1), v)} for v in (2.0, 9.0)]
    base = {"weight": torch.zeros(1, 1)}

    def score(model) -> float:
        return -abs(float(model.weight.detach()) - 1.0)

    result = cook(ings, torch.nn.Linear(1, 1, bias=False), score, base=base, baselines=False,
                  recipes=[{"name": name, "merge": merge}], progress=False)  # fmt: skip
    (method,) = result.methods
    soup = method.result
    assert method.held_out == score(soup.apply(torch.nn.Linear(1, 1, bias=False)))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("greedy", {"merge": TIES}),
        ("greedy", {"merge": {"rule": "linear", "alpha": 0.5}}),
        ("greedy", {}),
        ("pruned", {"merge": TIES, "passes": 1}),
        ("forward", {"merge": TIES}),
        ("search", {"merge": {"rule": "ties"}, "option": "density", "grid": [0.2, 0.5, 0.2]}),
        ("search", {"merge": {"rule": "task_arithmetic"}, "option": "lambda", "iterations": 3}),
    ],
)
def test_a_recipes_planned_bound_holds_under_a_merge_rule(pool, name, options):
    # --dry-run's "at most N on held-out": the evaluations past each ingredient's own score
    from modelsoup.recipes import get_recipe

    spec = get_recipe(name)
    checked = spec.check_options(options)
    taster = _taster(pool)
    taster.individual_scores()
    before = taster.evaluations
    spec.fn(taster, **options)
    assert spec.bound is not None
    assert taster.evaluations - before <= spec.bound(taster.ingredients, checked)
