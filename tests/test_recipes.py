"""Evaluation-guided recipes on real small networks (digits MLPs fine-tuned from one start)."""

from __future__ import annotations

import pytest
import torch

from digits_kit import DigitsMLP, held_out, on_test
from modelsoup import average, open_ingredients
from modelsoup.evaluators import Accuracy, FunctionEvaluator
from modelsoup.recipes import (
    best_individual,
    forward_selection_soup,
    greedy_ensemble,
    greedy_soup,
    output_ensemble,
    pruned_soup,
    uniform_soup,
)
from modelsoup.tasting import Taster


@pytest.fixture(scope="module")
def pool(digits_ckpts):
    return open_ingredients([digits_ckpts])


def _taster(pool, evaluator=None, **kw):
    return Taster(pool, DigitsMLP(), evaluator or held_out(), **kw)


@pytest.mark.parametrize("order,seed", [("sorted", 0), ("random", 0), ("random", 1), ("random", 7)])
def test_greedy_never_below_its_first_ingredient(pool, order, seed):
    taster = _taster(pool)
    soup = greedy_soup(taster, order=order, seed=seed)
    first = soup.trace[0]["score"]
    assert soup.scores["held_out"] >= first
    # the recorded score is the real score of the chosen soup
    assert taster.score(soup.coefficients) == soup.scores["held_out"]
    if order == "sorted":
        assert first == max(taster.individual_scores())


def test_ties_accept_with_ge_and_reject_with_gt(pool):
    constant = FunctionEvaluator(lambda m: 0.5, name="constant")
    assert greedy_soup(_taster(pool, constant)).size == len(pool)
    assert greedy_soup(_taster(pool, constant), strict=True).size == 1


def test_max_ingredients(pool):
    constant = FunctionEvaluator(lambda m: 0.5, name="constant")
    assert greedy_soup(_taster(pool, constant), max_ingredients=2).size == 2


def test_random_orders_are_reproducible_from_the_seed(pool):
    a = greedy_soup(_taster(pool), order="random", seed=3)
    b = greedy_soup(_taster(pool), order="random", seed=3)
    assert [s["tried"] for s in a.trace] == [s["tried"] for s in b.trace]
    assert a.coefficients == b.coefficients
    c = greedy_soup(_taster(pool), order="random", seed=4)
    assert [s["tried"] for s in a.trace] != [s["tried"] for s in c.trace]


def test_pruned_with_zero_passes_is_the_uniform_soup(pool):
    taster = _taster(pool)
    soup = pruned_soup(taster, passes=0)
    assert soup.coefficients == [1.0] * len(pool)
    assert soup.scores["held_out"] == uniform_soup(taster).scores["held_out"]
    assert taster.evaluations == 1  # the uniform soup, scored once and reused


def test_pruned_never_scores_a_subset_twice_and_never_empties(pool):
    constant = FunctionEvaluator(lambda m: 0.5, name="constant")
    taster = _taster(pool, constant)
    soup = pruned_soup(taster, passes=3, order="random")
    assert soup.size == 1  # every removal ties, so all but the last go
    assert taster.evaluations == len(pool)  # uniform + one per removal, nothing repeated
    taster2 = _taster(pool)
    pruned = pruned_soup(taster2, passes=3)
    assert pruned.size >= 1
    assert pruned.scores["held_out"] >= pruned.trace[0]["score"]


def test_forward_selection_picks_the_known_best_pair():
    # Scalar ingredients; the score peaks where the soup's weight is 2. The best pair is
    # (2.4, 1.6), whose mean is exactly 2; no third ingredient improves on it.
    values = [2.4, 1.6, 0.0, 9.0]
    ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in values])
    score = FunctionEvaluator(lambda m: -abs(float(m.weight.detach()) - 2.0), name="peak")

    def run(**kw):
        return forward_selection_soup(Taster(ings, torch.nn.Linear(1, 1, bias=False), score), **kw)

    soup = run()
    assert sorted(values[i] for i in soup.chosen) == [1.6, 2.4]
    assert soup.scores["held_out"] == pytest.approx(0.0, abs=1e-6)
    assert run(max_ingredients=1).chosen in ([0], [1])  # 2.4 and 1.6 tie as singles


def test_candidates_are_written_in_place_into_one_module(pool):
    model = DigitsMLP()
    ptrs = [p.data_ptr() for p in model.parameters()]
    taster = Taster(pool, model, held_out())
    soup = greedy_soup(taster)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    # the module holds the last candidate; applying the soup gives the chosen one
    fresh = soup.apply(DigitsMLP())
    expected = average([pool[i] for i in soup.chosen]).state_dict()
    assert torch.allclose(fresh.fc1.weight, expected["fc1.weight"], atol=1e-6)


def test_individual_scores_are_computed_once(pool):
    taster = _taster(pool)
    greedy_soup(taster)
    n = taster.evaluations
    best_individual(taster)
    greedy_soup(taster, order="sorted")
    assert taster.evaluations == n


def test_ensemble_averages_logits(pool):
    taster = _taster(pool)
    ens = output_ensemble(taster)
    ev = held_out()
    logits = []
    for ing in pool:
        m = average([ing]).apply(DigitsMLP())
        logits.append(ev.logits(m))
    expected = ev.score_logits(torch.stack(logits).mean(0))
    assert ens.scores["held_out"] == pytest.approx(expected)
    greedy = greedy_ensemble(taster)
    assert greedy.scores["held_out"] >= max(taster.individual_scores())


@pytest.mark.parametrize("recipe", [output_ensemble, greedy_ensemble])
def test_an_ensemble_asks_for_an_evaluator_with_logits(pool, recipe):
    from modelsoup.errors import ConfigError

    accuracy = held_out()
    taster = _taster(pool, FunctionEvaluator(accuracy.evaluate, name="fn_score"))
    with pytest.raises(ConfigError, match="fn_score gives no logits; ensembles need a built-in"):
        recipe(taster)


def test_loss_evaluators_minimise(pool):
    from digits_kit import splits
    from modelsoup.evaluators import MeanLoss

    taster = _taster(pool, MeanLoss(splits()["held_out"]))
    soup = greedy_soup(taster)
    assert soup.scores["held_out"] <= min(taster.individual_scores())
    assert best_individual(taster).scores["held_out"] == min(taster.individual_scores())


def test_on_test_is_never_used_to_choose(pool):
    taster = _taster(pool)
    soup = greedy_soup(taster)
    poisoned = Taster(pool, DigitsMLP(), held_out())
    poisoned_test = on_test()
    # scoring on the test set after choosing does not change the choice
    greedy_soup(poisoned)
    poisoned.score(soup.coefficients, poisoned_test)
    assert greedy_soup(poisoned).coefficients == soup.coefficients


def test_evaluator_fetches_data_once():
    class Counting:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    data = Counting([(x[:10], y[:10]), (x[10:], y[10:])])
    ev = Accuracy(data)
    model = DigitsMLP()
    for _ in range(3):
        ev.evaluate(model)
    assert data.iterations == 1
    top10 = Accuracy((x, y), top_k=10).evaluate(model)
    assert top10 == 1.0


def test_candidate_with_one_more_ingredient_leaves_the_sum_alone(pool):
    taster = _taster(pool)
    taster.materialise([1, 0, 1, 0, 0])
    before = list(taster.accumulator.weights)
    model = taster.materialise([1, 0, 1, 1, 0])  # greedy's candidate: one more ingredient
    assert taster.accumulator.weights == before  # the sum was not touched
    expected = average([pool[0], pool[2], pool[3]]).state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6)
    model = taster.materialise([0, 0, 1, 1, 0])  # any other move goes through the sum
    expected = average([pool[2], pool[3]]).state_dict()
    assert torch.allclose(model.fc1.weight, expected["fc1.weight"], atol=1e-6)


def test_lawa_with_fewer_ingredients_than_last_warns_and_says_so_in_its_row():
    from modelsoup.cook import cook
    from modelsoup.errors import SoupWarning
    from modelsoup.recipes.lawa import lawa_soup

    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)]
    score = lambda m: float(m.weight.detach())  # noqa: E731
    taster = Taster(open_ingredients(ings), torch.nn.Linear(1, 1, bias=False), score)
    with pytest.warns(SoupWarning, match="lawa: last=5 but there are only 2 ingredients"):
        assert lawa_soup(taster, last=5).chosen == [0, 1]
    with pytest.warns(SoupWarning, match="last=5"):
        result = cook(
            ings,
            torch.nn.Linear(1, 1, bias=False),
            score,
            recipes=[{"name": "lawa", "last": 5}, {"name": "lawa", "last": 2}],
            progress=False,
        )
    assert [m.label for m in result.methods if m.recipe == "lawa"] == [
        "lawa (last 5: all 2)",
        "lawa (last 2)",
    ]


def test_lawa_takes_lightning_checkpoints_in_step_order_and_last_ckpt_once(tmp_path):
    # Lightning records each checkpoint's global_step: names like "{val_loss}-{epoch}" sort
    # by loss, and last.ckpt (save_last) is a copy of the newest, at the same step
    from modelsoup.errors import SoupWarning
    from modelsoup.ingredients import find_checkpoints
    from modelsoup.recipes.lawa import lawa_soup

    def ckpt(name: str, step: int, value: float) -> None:
        torch.save(
            {
                "pytorch-lightning_version": "2.4.0",
                "global_step": step,
                "epoch": step // 10,
                "state_dict": {"model.weight": torch.full((1, 1), value)},
            },
            tmp_path / name,
        )

    for name, step in [("val_loss=0.30-epoch=3", 40), ("val_loss=0.50-epoch=1", 20),
                       ("val_loss=0.90-epoch=0", 10), ("val_loss=0.31-epoch=2", 30)]:  # fmt: skip
        ckpt(f"{name}.ckpt", step, float(step))
    ckpt("last.ckpt", 40, 40.0)
    ings = open_ingredients(find_checkpoints([tmp_path]))
    score = lambda m: float(m.weight.detach())  # noqa: E731
    taster = Taster(ings, torch.nn.Linear(1, 1, bias=False), score)
    with pytest.warns(SoupWarning, match="lawa: last left out: saved at the step of another"):
        soup = lawa_soup(taster, last=2)
    chosen = sorted(ings[i].label for i in soup.chosen)
    assert chosen == ["val_loss=0.30-epoch=3", "val_loss=0.31-epoch=2"]
    assert soup.scores["held_out"] == 35.0  # steps 30 and 40, the latest two states
    with pytest.warns(SoupWarning, match="only 4 checkpoints, copies left out"):
        assert lawa_soup(taster, last=9).scores["held_out"] == 25.0
    # two runs of a sweep at the same steps: in the pool's order, neither merged nor mixed
    other = tmp_path / "runB"
    other.mkdir()
    for step in (10, 20):
        torch.save({"pytorch-lightning_version": "2.4.0", "global_step": step,
                    "state_dict": {"model.weight": torch.full((1, 1), -float(step))}},
                   other / f"epoch={step // 10}-step={step}.ckpt")  # fmt: skip
    pool = find_checkpoints([tmp_path / "val_loss=0.90-epoch=0.ckpt", other])
    taster = Taster(open_ingredients(pool), torch.nn.Linear(1, 1, bias=False), score)
    assert lawa_soup(taster, last=2).scores["held_out"] == -15.0  # runB's own last two


def test_lawa_over_several_lightning_runs_leaves_out_each_runs_last_ckpt_copy(tmp_path):
    # a sweep of runs, each with save_last: every run's last.ckpt copies its own newest
    # checkpoint, and is left out there; the runs keep the pool's order, each in step order
    from modelsoup.errors import SoupWarning
    from modelsoup.ingredients import find_checkpoints
    from modelsoup.recipes.lawa import _in_training_order, lawa_soup

    runs = []
    for r, sign in (("runA", 1.0), ("runB", -1.0)):
        run = tmp_path / r
        run.mkdir()
        for name, step in [("val_loss=0.2-epoch=2", 30), ("val_loss=0.4-epoch=1", 20),
                           ("val_loss=0.9-epoch=0", 10), ("last", 30)]:  # fmt: skip
            torch.save({"pytorch-lightning_version": "2.4.0", "global_step": step,
                        "state_dict": {"model.weight": torch.full((1, 1), sign * step)}},
                       run / f"{name}.ckpt")  # fmt: skip
        runs.append(run)
    ings = open_ingredients(find_checkpoints(runs))
    score = lambda m: float(m.weight.detach())  # noqa: E731
    taster = Taster(ings, torch.nn.Linear(1, 1, bias=False), score)
    with pytest.warns(SoupWarning, match="lawa: runA/last, runB/last left out: saved at the step"):
        order = _in_training_order(taster)
    labels = [ings[i].label for i in order]
    assert [lab.split("/")[0] for lab in labels] == ["runA"] * 3 + ["runB"] * 3
    assert [float(ings[i].source.tensor(ings[i].source.names()[0])) for i in order] == [
        10.0, 20.0, 30.0, -10.0, -20.0, -30.0]  # fmt: skip
    with pytest.warns(SoupWarning, match="left out"):
        soup = lawa_soup(taster, last=2)
    assert soup.scores["held_out"] == -25.0  # runB's steps 20 and 30, each once
