"""The search recipe: a merge rule's scalar option chosen on held-out, every candidate journaled."""

from __future__ import annotations

import json

import pytest
import torch

from modelsoup.cli import main
from modelsoup.cook import cook
from modelsoup.cook.config import CookConfig, check_recipes
from modelsoup.errors import ConfigError
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import search_soup
from modelsoup.tasting import Taster

BASE = {"weight": torch.ones(1, 1)}


def _taster(journal=None, target=2.0):
    # one member at 3, the base at 1: task arithmetic gives 1 + 2 lambda, best at
    # lambda = (target - 1) / 2
    ings = open_ingredients([{"weight": torch.full((1, 1), 3.0)}])
    model = torch.nn.Linear(1, 1, bias=False)
    return Taster(
        ings,
        model,
        lambda m: -abs(float(m.weight.detach()) - target),
        base=BASE,
        journal=journal,
    )


def test_grid_search_keeps_the_best_value():
    taster = _taster()
    soup = search_soup(
        taster, merge={"rule": "task_arithmetic"}, option="lambda", grid=[0.0, 0.25, 0.5, 1.0]
    )
    assert soup.options["chosen"] == 0.5 and soup.scores["held_out"] == 0.0
    assert [step["lambda"] for step in soup.trace] == [0.0, 0.25, 0.5, 1.0]
    assert soup.state_dict()["weight"].item() == 2.0
    assert taster.evaluations == 4


def test_golden_section_search_finds_the_peak_within_bounds():
    taster = _taster(target=1.6)  # best lambda 0.3
    soup = search_soup(
        taster, merge={"rule": "task_arithmetic"}, option="lambda", bounds=[0, 1], iterations=20
    )
    assert abs(soup.options["chosen"] - 0.3) < 1e-3
    tried = [step["lambda"] for step in soup.trace]
    assert tried[:2] == [0.0, 1.0] and all(0.0 <= v <= 1.0 for v in tried)
    assert len(tried) == 24 and taster.evaluations == 24


def test_wise_ft_alpha_on_top_of_ties_and_density_searched():
    taster = _taster(target=1.5)
    # TIES of one member with density 1 is the member; WiSE-FT: 1 + 2 alpha, best 0.25
    soup = search_soup(
        taster, merge={"rule": "ties", "density": 1.0}, option="alpha", grid=[0, 0.25, 1]
    )
    assert soup.merge.canonical() == {"rule": "ties", "density": 1.0, "lambda": 1.0, "alpha": 0.25}
    taster = _taster(target=3.0)
    soup = search_soup(taster, merge={"rule": "dare_linear"}, option="density", bounds=[0.5, 1])
    assert soup.options["chosen"] == 1.0  # dropping entries of the one task vector only hurts


def test_an_interrupted_search_resumes_from_the_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = _taster(Journal(path))
    search_soup(first, merge={"rule": "task_arithmetic"}, option="lambda", bounds=[0, 2])
    again = _taster(Journal(path))
    soup = search_soup(again, merge={"rule": "task_arithmetic"}, option="lambda", bounds=[0, 2])
    assert again.evaluations == 0 and again.reused == first.evaluations == len(soup.trace)


NAN = float("nan")


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"merge": {"rule": "slerp"}, "option": "lambda", "grid": [1]}, ".grid' .*has no such"),
        ({"merge": {"rule": "ties"}, "option": "density", "grid": [0.5, 1.5]}, ".grid' .*'density"),
        ({"merge": {"rule": "ties", "density": 0.3}, "option": "density"}, ".option' .*remove it"),
        ({"merge": {"rule": "task_arithmetic"}, "option": "lambda", "bounds": [2, 1]}, "low <"),
        ({"merge": {"rule": "ties"}, "option": "lambda"}, "option 'density': required"),
        ({"merge": {"rule": "task_arithmetic"}, "option": "lambda", "grid": [NAN]}, ".grid' "),
        ({"merge": {"rule": "ties"}, "option": "density", "bounds": [0, 1]}, ".bounds' .*than 0"),
    ],
)  # fmt: skip
def test_bad_search_options_fail_at_the_edge(options, needle):
    config = CookConfig(
        model="m:f",
        ingredients=["a"],
        held_out="m:e",
        output="o",
        base="b",
        recipes=[{"name": "search", **options}],
    )
    with pytest.raises(ConfigError, match="config key 'recipes.0.*" + needle):
        check_recipes(config)


def test_search_in_a_cook_config(digits_ckpts, tmp_path):
    import safetensors.torch

    from digits_kit import pretrained_state

    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(pretrained_state(), str(base))
    out = tmp_path / "out"
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"""
model: digits_kit:model
ingredients: ["{digits_ckpts}/*.safetensors"]
base: {base}
held_out: digits_kit:held_out
recipes:
  - {{name: search, merge: {{rule: task_arithmetic}}, option: lambda, grid: [0.5, 1.0, 1.5]}}
output: {out}
baselines: false
bootstrap_resamples: 100
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    assert row["method"] == "search (task_arithmetic lambda)" and row["evaluations"] == 3
    card = json.loads((out / (row["saved"] + ".json")).read_text())
    assert card["merge"]["rule"] == "task_arithmetic"
    assert card["merge"]["lambda"] == card["options"]["chosen"]


def test_slerp_is_searched_over_exactly_two_ingredients_and_refused_in_greedy():
    two = open_ingredients([{"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}])
    taster = Taster(two, torch.nn.Linear(1, 1, bias=False), lambda m: -abs(m.weight.item() - 0.3))
    soup = search_soup(taster, merge={"rule": "slerp"}, option="t", grid=[0.1, 0.3, 0.5])
    assert soup.options["chosen"] == 0.3  # a zero member: slerp falls back to linear
    three = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.0, 1.0, 2.0)])
    taster = Taster(three, torch.nn.Linear(1, 1, bias=False), lambda m: 0.0)
    with pytest.raises(ConfigError, match="'slerp' merges exactly 2 members; this soup has 3"):
        search_soup(taster, merge={"rule": "slerp"}, option="t", grid=[0.5])
    assert taster.evaluations == 0
    config = CookConfig(
        model="m:f",
        ingredients=["a"],
        held_out="m:e",
        output="o",
        recipes=[{"name": "greedy", "merge": {"rule": "slerp", "t": 0.5}}],
    )
    with pytest.raises(ConfigError, match="recipes.0.merge.*candidates change in size"):
        check_recipes(config)


def test_two_searches_of_one_option_at_different_fixed_values_get_their_own_rows():
    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)]
    searches = [
        {"name": "search", "merge": {"rule": "ties", "density": d}, "option": "lambda", "grid": g}
        for d, g in ((0.5, [0.5, 1.0]), (1.0, [1.0, 1.5]))
    ]
    result = cook(
        ings,
        torch.nn.Linear(1, 1, bias=False),
        lambda m: -abs(m.weight.item() - 2.0),
        recipes=searches,
        base={"weight": torch.zeros(1, 1)},
        baselines=False,
        progress=False,
    )
    labels = [m.label for m in result.methods]
    assert labels == ["search (ties lambda, density=0.5)", "search (ties lambda, density=1)"]
    assert [m.result.options["chosen"] for m in result.methods] == [1.0, 1.0]


@pytest.mark.parametrize("grid", [[float("nan"), 0.5], [float("inf")]])
def test_search_soup_called_from_python_says_what_is_wrong_in_one_line(grid):
    from modelsoup.errors import ConfigError
    from modelsoup.ingredients import open_ingredients
    from modelsoup.recipes.search import search_soup
    from modelsoup.tasting import Taster

    ings = open_ingredients([{"weight": torch.full((1, 1), 3.0)}])
    taster = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 1.0,
                    base={"weight": torch.ones(1, 1)})  # fmt: skip
    with pytest.raises(ConfigError, match="finite number"):
        search_soup(taster, merge={"rule": "task_arithmetic"}, option="lambda", grid=grid)
