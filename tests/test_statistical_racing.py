"""Statistical racing: a candidate against the incumbent, example by example, stopped once
a confidence sequence on the paired differences says it is worse."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modelsoup.cook import cook
from modelsoup.cook.config import CookOptions, load_config
from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy, MeanLoss, StatisticalRacing, confidence_radius
from modelsoup.ingredients import open_ingredients
from modelsoup.journal import Journal
from modelsoup.recipes import forward_selection_soup, greedy_soup, pruned_soup
from modelsoup.tasting import RejectedScore, Taster

STATISTICAL = {"confidence": 0.999}


def _wide_pool(n_bad: int = 6, n: int = 6000):
    """Two good linear classifiers (about 89% on noisy labels) and ``n_bad`` far worse
    ones (36-50%): the candidates differ by large margins."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    w = torch.randn(3, 8, generator=gen)
    y = (x @ w.T).argmax(-1)
    flip = torch.rand(n, generator=gen) < 0.15
    y = torch.where(flip, torch.randint(0, 3, (n,), generator=gen), y)
    # the held-out set ordered by class: only a random order makes early batches fair
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    good = [
        {"weight": w + 0.05 * torch.randn(3, 8, generator=gen), "bias": torch.zeros(3)}
        for _ in range(2)
    ]
    bad = [
        {"weight": 0.6 * w + 1.5 * torch.randn(3, 8, generator=gen), "bias": torch.zeros(3)}
        for _ in range(n_bad)
    ]
    return [*good, *bad], (x, y)


def _taste(pool, data, recipe, racing, evaluator_cls=Accuracy, journal=None):
    evaluator = evaluator_cls(data, batch_size=100, name="wide")
    taster = Taster(
        open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, racing=racing, journal=journal
    )
    return recipe(taster), taster


@pytest.mark.parametrize("recipe", [greedy_soup, forward_selection_soup, pruned_soup])
def test_statistical_racing_agrees_with_full_evaluation_and_stops_early(recipe):
    pool, data = _wide_pool()
    full, _ = _taste(pool, data, recipe, "off")
    exact, exact_t = _taste(pool, data, recipe, "exact")
    stat, stat_t = _taste(pool, data, recipe, STATISTICAL)
    assert stat.chosen == full.chosen == exact.chosen
    assert stat.scores["held_out"] == full.scores["held_out"]
    # every race is statistical; the exact bound, valid in any order, decides some
    assert 0 < stat_t.statistical_races <= stat_t.races
    if recipe is pruned_soup:  # its candidates are near the bar: most run to the end
        assert stat_t.race_examples <= exact_t.race_examples
        return
    # far-below candidates: statistical stops at least 3x sooner than full passes, and
    # sooner than exact racing's proof
    assert stat_t.rejected_early > 0
    assert stat_t.race_examples * 3 <= stat_t.race_full_examples
    assert stat_t.race_examples < exact_t.race_examples
    if recipe is greedy_soup:
        rejected = [e for e in stat.trace if e.get("stopped_early")]
        assert rejected and all(e["stopped_early"]["confidence"] == 0.999 for e in rejected)
    assert stat_t.incumbent_passes == 0  # the incumbents' values came from their own passes


def test_each_rejection_agrees_with_the_full_score():
    pool, data = _wide_pool()
    evaluator = Accuracy(data, batch_size=100, name="wide")
    stat = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, racing=STATISTICAL)
    off = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator, racing="off")
    best = stat.score_members([0, 1])
    decisions = 0
    for i in range(2, len(pool)):
        raced = stat.score_members([0, 1, i], to_beat=best, incumbent=[0, 1])
        truth = off.score_members([0, 1, i])
        assert stat.better(raced, best) == off.better(truth, best)
        if isinstance(raced, RejectedScore):
            decisions += 1
            assert raced.seen < raced.total and truth <= float(raced)  # the bound holds
    assert decisions == len(pool) - 2


def test_exact_stays_the_default_and_unchanged():
    assert CookOptions().racing == "exact"
    pool, data = _wide_pool(3)
    evaluator = Accuracy(data, batch_size=100, name="wide")
    taster = Taster(open_ingredients(pool), torch.nn.Linear(8, 3), evaluator)
    assert taster.racing == "exact"
    soup = greedy_soup(taster)
    assert taster.statistical_races == 0 and taster.rejected_early > 0
    assert all("confidence" not in e.get("stopped_early", {}) for e in soup.trace)
    # the exact proof: each rejection's bound is the running sum plus 1 per example left
    explicit, explicit_t = _taste(pool, data, greedy_soup, "exact")
    assert explicit.trace == soup.trace and explicit_t.race_examples == taster.race_examples


def test_the_order_is_seeded_fixed_and_recorded(tmp_path):
    pool, data = _wide_pool(3)
    ev = Accuracy(data, batch_size=100)
    assert torch.equal(ev.race_order(0), ev.race_order(0))
    assert not torch.equal(ev.race_order(0), ev.race_order(1))
    path = tmp_path / "journal.jsonl"
    _, taster = _taste(
        pool, data, greedy_soup, {"confidence": 0.999, "seed": 4}, journal=Journal(path)
    )
    (test,) = taster.stats()["racing_tests"]
    assert test["order_seed"] == 4 and test["confidence"] == 0.999 and test["order_sha256"]
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    rejected = [e["rejected"] for e in lines if "rejected" in e]
    assert rejected and all(r["test"]["order_sha256"] == test["order_sha256"] for r in rejected)
    assert all("score" not in e for e in lines if "rejected" in e)


def test_a_statistical_rejection_is_reused_only_under_the_same_test(tmp_path):
    pool, data = _wide_pool(3)
    path = tmp_path / "journal.jsonl"
    _, first = _taste(pool, data, greedy_soup, STATISTICAL, journal=Journal(path))
    assert first.rejected_early == 3
    _, same = _taste(pool, data, greedy_soup, STATISTICAL, journal=Journal(path))
    assert same.evaluations == 0  # scores and rejections all from the journal
    _, other = _taste(pool, data, greedy_soup, {"confidence": 0.99}, journal=Journal(path))
    assert other.races == 3  # a 0.999 rejection says nothing at 0.99: raced again
    _, exact = _taste(pool, data, greedy_soup, "exact", journal=Journal(path))
    assert exact.races == 3 and exact.statistical_races == 0  # never an exact proof


def test_incumbent_values_missing_from_a_journal_are_recomputed(tmp_path):
    pool, data = _wide_pool(3)
    path = tmp_path / "journal.jsonl"
    _taste(pool, data, greedy_soup, "off", journal=Journal(path))  # scores only
    soup, taster = _taste(pool, data, greedy_soup, STATISTICAL, journal=Journal(path))
    full, _ = _taste(pool, data, greedy_soup, "off")
    assert soup.chosen == full.chosen
    # every score came from the journal; the incumbent's values did not, and were measured
    assert taster.races == 0 and taster.incumbent_passes == 0
    again = Taster(
        open_ingredients(pool),
        torch.nn.Linear(8, 3),
        Accuracy(data, batch_size=100, name="wide"),
        racing=STATISTICAL,
        journal=Journal(path),
    )
    value = again.score_members([0, 2], to_beat=soup.scores["held_out"], incumbent=[0, 1])
    assert again.incumbent_passes == 1  # the incumbent [0, 1]: evaluated in full again
    assert isinstance(value, RejectedScore)


def test_losses_race_with_a_stated_clip_and_otherwise_in_full():
    pool, data = _wide_pool()
    full, _ = _taste(pool, data, greedy_soup, "off", MeanLoss)
    clipped, t = _taste(pool, data, greedy_soup, {"confidence": 0.999, "clip": 5.0}, MeanLoss)
    assert clipped.chosen == full.chosen and clipped.scores["held_out"] == full.scores["held_out"]
    assert t.races == 7 and t.rejected_early == 6 and 0 < t.statistical_races <= 7
    assert t.race_examples < t.race_full_examples
    _, unclipped = _taste(pool, data, greedy_soup, STATISTICAL, MeanLoss)
    assert unclipped.races == 0  # no bound on a loss: evaluated in full


def test_bad_racing_settings_fail_at_the_edge_with_the_key_named(tmp_path):
    base = "model: m:f\ningredients: [a]\nheld_out: m:e\noutput: o\n"
    cases = {
        "racing: {confidence: 1.5}\n": "'racing.confidence'",
        "recipes:\n  - {name: greedy, racing: {confidence: 1.5}}\n": "'recipes.0.racing.conf",
        "racing: {confidence: 0.9, clip: -1}\n": "'racing.clip'",
        "racing: {confidenc: 0.9}\n": "did you mean 'confidence'",
    }
    for extra, named in cases.items():
        cfg = tmp_path / "soup.yaml"
        cfg.write_text(base + extra)
        with pytest.raises(ConfigError, match=named):
            load_config(cfg)
    pool, data = _wide_pool(1, 200)
    with pytest.raises(ConfigError, match="racing.confidence"):
        cook(pool, torch.nn.Linear(8, 3), Accuracy(data), racing={"confidence": 1.5})
    with pytest.raises(ConfigError, match="recipes.0.*racing.confidence"):
        cook(
            pool,
            torch.nn.Linear(8, 3),
            Accuracy(data),
            recipes=[{"name": "greedy", "racing": {"confidence": 1.5}}],
        )
    with pytest.raises(ConfigError, match="between 0 and 1"):
        StatisticalRacing(1.5)


def test_a_recipe_entry_races_its_own_way_in_a_cook():
    pool, data = _wide_pool(3)
    # statistical first: an exact proof journaled before would be reused at any confidence
    recipes = [
        {"name": "greedy", "label": "statistical", "racing": STATISTICAL},
        {"name": "greedy", "label": "exact"},
    ]
    result = cook(
        pool,
        torch.nn.Linear(8, 3),
        Accuracy(data, batch_size=100),
        recipes=recipes,
        bootstrap_resamples=20,
        baselines=False,
        progress=False,
    )
    rows = {m.label: m for m in result.methods}
    assert rows["exact"].result.chosen == rows["statistical"].result.chosen
    stats = result.taster_stats
    assert stats["statistical_races"] > 0 and stats["racing_tests"]


def test_a_statistical_race_stops_where_the_exact_proof_does_even_if_its_test_cannot():
    # an incumbent whose per-example values vary widely makes the paired test slow; the
    # exact bound holds in any order, so a statistical race never runs longer than it
    x, y = torch.eye(4).repeat(25, 1), torch.arange(4).repeat(25)
    evaluator = Accuracy((x, y), batch_size=10)
    wrong = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        wrong.weight.copy_(torch.eye(4).roll(1, 0))
    incumbent = (torch.arange(100) % 2).float()  # right on every other example: 0.5
    exact = evaluator.race(wrong, 0.75)
    racing = StatisticalRacing(1 - 1e-12)
    paired = evaluator.race_paired(wrong, incumbent, 0.75, racing=racing)
    assert exact.rejected and paired.rejected and paired.seen <= exact.seen == 30
    assert paired.test == "exact"  # decided by the proof, and journaled as one


def test_the_confidence_radius_shrinks_to_nothing_on_the_whole_set():
    radii = [confidence_radius(n, 1000, 2.0, 0.3, 1e-4) for n in (10, 100, 500, 999, 1000)]
    assert radii == sorted(radii, reverse=True) and radii[-1] == 0.0
    # a Hoeffding-Serfling radius for values in a range of 2, no variance information
    n, total, delta = 100, 1000, 1e-3
    rho = 1 - (n - 1) / total
    hoeffding = 2.0 * (rho * math.log(2 / delta) / (2 * n)) ** 0.5
    assert confidence_radius(n, total, 2.0, 1.0, delta) == pytest.approx(hoeffding)
    # most paired differences of accuracies are 0: the empirical Bernstein term wins
    big = confidence_radius(2000, 20000, 2.0, 1.0, delta)
    assert confidence_radius(2000, 20000, 2.0, 0.05, delta) < big * 0.6


class _TokenMean(torch.nn.Linear):
    """A linear classifier of the mean token: takes (batch, tokens, 8) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(1)


def _ragged(data, batch_size: int = 100):
    """The same examples as batches of sequences whose length differs from batch to
    batch (every token a copy of the example): they cannot be joined into one order."""
    x, y = data
    return [
        (
            x[s : s + batch_size, None].expand(-1, 1 + (s // batch_size) % 3, -1),
            y[s : s + batch_size],
        )
        for s in range(0, len(y), batch_size)
    ]


def test_data_that_cannot_be_ordered_is_raced_exactly_and_labelled_so(tmp_path, caplog):
    pool, data = _wide_pool(3, 2000)
    path = tmp_path / "journal.jsonl"
    evaluator = Accuracy(_ragged(data), name="ragged")
    assert "differ in shape" in evaluator.reorder_problem(torch.device("cpu"), 0)
    taster = Taster(
        open_ingredients(pool),
        _TokenMean(8, 3),
        evaluator,
        racing=STATISTICAL,
        journal=Journal(path),
    )
    with caplog.at_level("WARNING", logger="modelsoup.tasting"):
        soup = greedy_soup(taster)
    exact, exact_t = _taste(pool, data, greedy_soup, "exact")
    assert soup.chosen == exact.chosen
    # every decision was exact racing's proof, and says so
    assert taster.races == exact_t.races > 0 and taster.rejected_early == exact_t.rejected_early
    assert taster.race_examples == exact_t.race_examples
    stats = taster.stats()
    assert stats["statistical_races"] == 0 and stats["racing_tests"] == []
    assert "differ in shape" in stats["racing_fallbacks"]["ragged"]
    rejected = [e for e in soup.trace if e.get("stopped_early")]
    assert rejected and all("confidence" not in e["stopped_early"] for e in rejected)
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    journaled = [e["rejected"] for e in lines if "rejected" in e]
    assert len(journaled) == taster.rejected_early and all("test" not in r for r in journaled)
    warned = [r for r in caplog.records if "statistical racing is off" in r.getMessage()]
    assert len(warned) == 1 and "differ in shape" in warned[0].getMessage()
    # an exact proof holds at any confidence: a statistical re-run reuses every one
    again = Taster(
        open_ingredients(pool),
        _TokenMean(8, 3),
        Accuracy(_ragged(data), name="ragged"),
        racing=STATISTICAL,
        journal=Journal(path),
    )
    greedy_soup(again)
    assert again.evaluations == 0


def test_the_report_says_when_statistical_racing_fell_back():
    from modelsoup.cook.report import render_markdown, summarize

    pool, data = _wide_pool(3, 2000)
    result = cook(
        pool,
        _TokenMean(8, 3),
        Accuracy(_ragged(data), name="ragged"),
        recipes=[{"name": "greedy"}],
        racing=STATISTICAL,
        bootstrap_resamples=20,
        baselines=False,
        progress=False,
    )
    text = render_markdown(summarize(result, bootstrap_resamples=20))
    assert "Exact racing: " in text and "every decision is the one a full evaluation" in text
    assert "Statistical racing was off for evaluator ragged: its batches" in text
    assert "Statistical racing (" not in text
