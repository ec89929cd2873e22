"""Exact early rejection (racing): same decisions as full evaluation, fewer examples."""

from __future__ import annotations

import json

import pytest
import torch

from digits_kit import held_out, model, write_ingredients
from modelsoup.cook import cook
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import forward_selection_soup, greedy_soup, pruned_soup
from modelsoup.tasting import RejectedScore, Taster

RECIPES = [
    {"name": "greedy"},
    {"name": "greedy", "order": "random", "seed": 3, "label": "greedy random"},
    {"name": "greedy", "strict": True, "label": "greedy strict"},
    {"name": "pruned", "passes": 3},
    {"name": "forward"},
]


def _rows(result):
    return {
        m.label: (m.result.chosen if m.is_soup else None, m.held_out, m.test)
        for m in result.methods
    }


def test_digits_cook_same_picks_and_scores_with_and_without_racing(tmp_path):
    paths = write_ingredients(tmp_path / "runs")
    runs = {}
    for racing in ("exact", "off"):
        runs[racing] = cook(
            paths,
            model,
            held_out(),
            recipes=RECIPES,
            racing=racing,
            bootstrap_resamples=50,
            progress=False,
        )
    assert _rows(runs["exact"]) == _rows(runs["off"])
    for a, b in zip(runs["exact"].methods, runs["off"].methods):
        if not a.is_soup:
            continue
        sa, sb = a.result.state_dict(), b.result.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    stats = runs["exact"].taster_stats
    assert stats["races"] > 0 and runs["off"].taster_stats["races"] == 0
    assert stats["race_examples"] <= stats["race_full_examples"]


def _far_apart_pool(n_bad: int = 6):
    """One good linear classifier and many that are far below it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    w_true = torch.randn(3, 8, generator=gen)
    y = (x @ w_true.T).argmax(-1)
    good = {"weight": w_true.clone(), "bias": torch.zeros(3)}
    bad = [
        {"weight": -5 * w_true + 0.1 * torch.randn(3, 8, generator=gen), "bias": torch.zeros(3)}
        for _ in range(n_bad)
    ]
    return [good, *bad], Accuracy((x, y), batch_size=50, name="far-apart")


@pytest.mark.parametrize("recipe", [greedy_soup, pruned_soup, forward_selection_soup])
def test_far_below_candidates_stop_early_with_identical_picks(recipe):
    pool, evaluator = _far_apart_pool()
    results = {}
    tasters = {}
    for racing in ("exact", "off"):
        taster = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, racing=racing)
        results[racing] = recipe(taster)
        tasters[racing] = taster
    assert results["exact"].chosen == results["off"].chosen
    assert results["exact"].scores["held_out"] == results["off"].scores["held_out"]
    raced = tasters["exact"]
    if recipe is pruned_soup:  # removing a bad ingredient only helps: nothing to stop
        assert raced.races > 0
    else:
        assert raced.rejected_early > 0
        assert raced.race_examples * 1.5 <= raced.race_full_examples


def test_a_rejection_is_journaled_and_never_reused_as_a_score(tmp_path):
    pool, evaluator = _far_apart_pool(2)
    path = tmp_path / "journal.jsonl"
    taster = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, journal=Journal(path))
    greedy_soup(taster)
    assert taster.rejected_early >= 1
    lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    rejected = [e for e in lines if "rejected" in e]
    assert rejected and all("score" not in e for e in rejected)
    # a fresh run: the rejection still proves the loss against the same bar (no evaluation)
    again = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, journal=Journal(path))
    greedy_soup(again)
    assert again.evaluations == 0
    # asking for the candidate's score (no bar) evaluates it in full: a real score
    weights = [1.0, 1.0, 0.0]
    full = again.score(weights)
    assert not isinstance(full, RejectedScore) and again.evaluations == 1
    off = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, racing="off")
    assert full == off.score(weights)
    # and now the journal holds that score for the key: the rejection is superseded
    third = Journal(path)
    assert third.lookup(again.key(weights, evaluator)) == full


def test_unbounded_evaluators_are_evaluated_in_full():
    from modelsoup.evaluators import MeanLoss

    pool, acc = _far_apart_pool(2)
    loss = MeanLoss(acc.data, name="loss")
    taster = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), loss)
    greedy_soup(taster)
    assert taster.races == 0 and taster.rejected_early == 0


class _WeightedAccuracy(Accuracy):
    """Accuracy in which the first ten examples count a hundred times: its score is not
    the plain mean of its per-example values, so no bound on that mean decides."""

    kind = "weighted-accuracy"

    def score_logits(self, logits):
        values = self.per_example(logits).double()
        weights = torch.ones_like(values)
        weights[:10] = 100.0
        return float((values * weights).sum() / weights.sum())


def _right_on_the_first_ten():
    x = torch.eye(4).repeat(25, 1)
    y = x.argmax(1).clone()
    y[10:] = (y[10:] + 1) % 4  # the identity model is right on the first ten only
    return open_ingredients([{"weight": torch.eye(4)}]), (x, y)


@pytest.mark.parametrize("racing", ["exact", {"confidence": 0.999}])
def test_a_score_other_than_the_mean_of_its_values_is_never_raced(racing):
    pool, data = _right_on_the_first_ten()
    evaluator = _WeightedAccuracy(data, batch_size=20, name="weighted")
    full = evaluator.evaluate(torch.nn.Identity())
    assert full > 0.9  # while the plain mean of its values is 0.1
    taster = Taster(pool, torch.nn.Linear(4, 4, bias=False), evaluator, racing=racing)
    score = taster.score([1.0], to_beat=0.8)
    assert not isinstance(score, RejectedScore) and score == pytest.approx(full)
    assert taster.rejected_early == 0


def test_values_outside_the_declared_bounds_stop_the_race_with_an_error():
    from modelsoup.errors import EvaluationError

    class Doubled(Accuracy):  # per-example values of 0 or 2, declared within [0, 1]
        def per_example_of(self, logits, labels):
            return 2 * super().per_example_of(logits, labels)

    pool, data = _right_on_the_first_ten()
    taster = Taster(pool, torch.nn.Linear(4, 4, bias=False), Doubled(data, batch_size=20))
    with pytest.raises(EvaluationError, match="outside its declared bounds"):
        taster.score([1.0], to_beat=0.5)


def test_a_malformed_rejection_line_is_reported_and_ignored(tmp_path):
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    k1, k2 = "a" * 64, "b" * 64
    j.record_rejection(k1, bound=0.2, seen=10, total=100, to_beat=0.9, strict=False)
    with open(path, "a") as fh:
        fh.write(json.dumps({"key": k2, "rejected": {"bound": "0.2"}}) + "\n")
    with pytest.warns(Warning, match="ignored"):
        back = Journal(path)
    assert k1 in back.rejections and k2 not in back.rejections
    assert back.lookup(k1) is None


@pytest.mark.parametrize("size", [1.0, 1e4])
def test_a_rejection_needs_a_margin_beyond_float32_rounding_of_scores_its_size(size):
    # a summed loss near 1e4: float32 means of it round by ~1e-3, so a bound 1e-4 over the
    # score to beat proves nothing, though it is 100 times the margin for scores near 1
    j = Journal(None)
    j.record_rejection("k", bound=size + 1e-4, seen=10, total=100, to_beat=size, strict=False)
    found = j.rejection("k", size, False, False)
    assert (found is not None) == (size == 1.0)
