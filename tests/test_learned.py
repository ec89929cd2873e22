"""Learned soups (Wortsman et al. 2022, Appendix) on real small networks."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from pydantic import ValidationError

from conftest import TinyNet, tiny_state
from digits_kit import DigitsMLP, held_out, on_test
from modelsoup import open_ingredients
from modelsoup.cook import cook
from modelsoup.errors import ConfigError, MemoryBudgetError
from modelsoup.evaluators import Accuracy, FunctionEvaluator, MeanLoss
from modelsoup.formats.base import DictSource
from modelsoup.ingredients import Ingredient
from modelsoup.memory import learned_soup_bytes
from modelsoup.recipes import average, get_recipe, greedy_soup, learned_soup, uniform_soup
from modelsoup.recipes.learned import SoupMixture
from modelsoup.tasting import Taster


@pytest.fixture(scope="module")
def pool(digits_ckpts):
    return open_ingredients([digits_ckpts])


@pytest.fixture(scope="module")
def states(digits_ckpts):
    return [safetensors.torch.load_file(str(p)) for p in sorted(digits_ckpts.glob("*.safetensors"))]


def garbage_like(state: dict, seed: int) -> dict:
    """Random weights of the same shapes, scaled so a share of them wrecks a soup."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 3 for k, v in state.items()}


def _taster(ings, evaluator=None):
    return Taster(ings, DigitsMLP(), evaluator or held_out())


def _assert_convex(coefs):
    assert all(c >= 0 for c in coefs)
    assert sum(coefs) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("by_layer", [False, True])
def test_coefficients_are_convex(pool, by_layer):
    soup = learned_soup(_taster(pool), by_layer=by_layer, epochs=3, lr=0.3)
    _assert_convex(soup.coefficients)
    if by_layer:
        assert set(soup.tensor_coefficients) == set(pool[0].names())
        for coefs in soup.tensor_coefficients.values():
            _assert_convex(coefs)
    else:
        assert soup.tensor_coefficients is None
    # however far the logits wander, the mixture stays convex
    mix = SoupMixture(DigitsMLP(), pool, by_layer=by_layer)
    with torch.no_grad():
        mix.alpha.normal_(0, 30)
    coefs = mix.coefficients().detach()
    assert (coefs >= 0).all() and torch.allclose(coefs.sum(1), torch.ones(len(coefs)))


@pytest.mark.parametrize("by_layer", [False, True])
def test_no_training_is_the_uniform_soup(pool, by_layer):
    taster = _taster(pool)
    soup = learned_soup(taster, by_layer=by_layer, epochs=0)
    assert soup.coefficients == pytest.approx([1 / len(pool)] * len(pool))
    expected = average(pool).state_dict()
    for name, value in soup.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert soup.scores["held_out"] == pytest.approx(uniform_soup(taster).scores["held_out"])
    assert soup.trace[0]["epoch"] == 0 and len(soup.trace) == 1


@pytest.mark.parametrize("by_layer", [False, True])
def test_gradients_reach_alpha_and_only_alpha(pool, by_layer):
    model = DigitsMLP()
    model.eval()
    mix = SoupMixture(model, pool, by_layer=by_layer, temperature=True)
    x, y = held_out().batches(torch.device("cpu"))[0]
    torch.nn.functional.cross_entropy(mix(x), y).backward()
    assert mix.alpha.grad is not None and torch.isfinite(mix.alpha.grad).all()
    assert (mix.alpha.grad.abs().sum(1) > 0).all()  # every row, i.e. every tensor by layer
    assert mix.scale.grad is not None and mix.scale.grad != 0
    assert all(p.grad is None for p in model.parameters())  # the module is not trained
    assert [n for n, _ in mix.named_parameters()] == ["alpha", "scale"]


def test_a_garbage_ingredient_is_weighted_out(states):
    ings = open_ingredients([*states, garbage_like(states[0], seed=1)])
    taster = _taster(ings)
    uniform = uniform_soup(taster).scores["held_out"]
    soup = learned_soup(taster, lr=0.2, epochs=20)
    assert soup.coefficients[-1] < 0.03
    assert soup.scores["held_out"] > uniform + 0.3
    assert soup.scores["held_out"] == taster.score(soup.coefficients)


def test_by_layer_takes_the_body_from_a_and_the_head_from_b(states):
    good, junk = states[2], garbage_like(states[2], seed=2)
    a = {k: (good if k.startswith("fc1.") else junk)[k] for k in good}
    b = {k: (junk if k.startswith("fc1.") else good)[k] for k in good}
    taster = _taster(open_ingredients([a, b]))
    soup = learned_soup(taster, by_layer=True, lr=0.2, epochs=20)
    per_tensor = soup.tensor_coefficients
    for name in ("fc1.weight", "fc1.bias"):
        assert per_tensor[name][0] > 0.9, (name, per_tensor[name])
    for name in ("fc2.weight", "fc2.bias"):
        assert per_tensor[name][1] > 0.9, (name, per_tensor[name])
    individual = taster.individual_scores()
    assert soup.scores["held_out"] > max(individual) + 0.4
    assert soup.scores["held_out"] > uniform_soup(taster).scores["held_out"] + 0.4
    # one set of coefficients for the whole model cannot do this
    whole = learned_soup(taster, lr=0.2, epochs=20)
    assert soup.scores["held_out"] > whole.scores["held_out"] + 0.3


def test_batchnorm_statistics_are_averaged_not_learned_or_updated():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ings = open_ingredients([tiny_state(s) for s in range(3)])
    model = TinyNet()
    model.train()
    taster = Taster(ings, model, Accuracy((x, y)))
    soup = learned_soup(taster, by_layer=True, lr=0.3, epochs=3, batch_size=16)
    assert model.training  # the caller's mode is restored
    per_tensor = soup.tensor_coefficients
    follows = torch.tensor([per_tensor["bn.weight"], per_tensor["bn.bias"]]).mean(0)
    for name in ("bn.running_mean", "bn.running_var"):
        assert torch.allclose(torch.tensor(per_tensor[name]), follows, atol=1e-6)
    # the soup's statistics are the mixed ones, untouched by the training forwards
    expected = sum(c * ing.tensor("bn.running_mean") for c, ing in zip(follows, ings))
    assert torch.allclose(soup.tensor("bn.running_mean"), expected, atol=1e-5)
    mix = SoupMixture(model.eval(), ings, by_layer=True)
    weights = mix.weights()
    assert weights["fc1.weight"].requires_grad and not weights["bn.running_mean"].requires_grad
    assert weights["bn.num_batches_tracked"].equal(ings[0].tensor("bn.num_batches_tracked"))


class CountingSource(DictSource):
    """An in-memory checkpoint that counts the tensors read from it."""

    def __init__(self, state, label):
        super().__init__(state, label)
        self.reads = 0

    def tensor(self, name, scratch=None):
        self.reads += 1
        return super().tensor(name)


def test_the_memory_guard_refuses_before_reading_any_tensor(states):
    sources = [CountingSource(s, f"m{i}") for i, s in enumerate(states)]
    ings = [Ingredient(src, src.label) for src in sources]
    taster = _taster(ings)
    for src in sources:
        src.reads = 0
    with pytest.raises(MemoryBudgetError, match="for 5 ingredients.*use ingredients: greedy"):
        learned_soup(taster, max_memory="100KB")
    assert [src.reads for src in sources] == [0] * len(sources)
    # the same job fits a realistic budget
    learned_soup(taster, max_memory="1GB", epochs=1)
    assert all(src.reads > 0 for src in sources)


def test_memory_estimate_grows_with_the_ingredients(pool):
    layout = pool[0].layout()
    one, five = (learned_soup_bytes(layout, k, batch_size=64) for k in (1, 5))
    model = pool[0].nbytes
    assert 4 * model <= five - one < 4 * model + 1000  # + a few logits and optimizer moments
    assert five >= 5 * model
    assert learned_soup_bytes(layout, 5, batch_size=64, rows=4) > five


def test_ingredients_greedy_learns_only_over_the_greedy_soup(states):
    ings = open_ingredients([*states, garbage_like(states[0], seed=3)])
    taster = _taster(ings)
    chosen = greedy_soup(taster).chosen
    soup = learned_soup(taster, ingredients="greedy", epochs=3, lr=0.2)
    assert len(chosen) < len(ings)
    assert soup.chosen == chosen
    outside = [c for i, c in enumerate(soup.coefficients) if i not in chosen]
    assert outside == [0.0] * len(outside)
    _assert_convex(soup.coefficients)
    assert soup.trace[0]["greedy"] == [ings[i].label for i in chosen]


def test_a_learned_temperature_is_recorded(pool):
    soup = learned_soup(_taster(pool, MeanLoss(held_out().data)), temperature=True, epochs=2)
    assert "temperature_scale" in soup.trace[1]
    assert soup.options["learned_temperature_scale"] > 0


def test_early_stopping_keeps_the_best_validation_coefficients(pool):
    soup = learned_soup(_taster(pool), lr=5.0, epochs=30, patience=2)
    epochs = [e for e in soup.trace if "epoch" in e]
    best = min(e["val_loss"] for e in epochs)
    kept = [e for e in epochs if e["best"]][-1]
    assert kept["val_loss"] == best
    if len(epochs) < 31:
        assert epochs[-1].get("stopped") == "early"


def test_needs_an_evaluator_with_batches(pool):
    taster = _taster(pool, FunctionEvaluator(lambda m: 0.5, name="constant"))
    with pytest.raises(ConfigError, match="classifier evaluator"):
        learned_soup(taster)


def test_options_are_validated_at_the_edge():
    spec = get_recipe("learned")
    assert spec.options(max_memory="8GB", by_layer=True).by_layer
    for bad in ({"max_memory": "lots"}, {"val_fraction": 1.0}, {"layers": True}, {"lr": 0}):
        with pytest.raises(ValidationError):
            spec.options(**bad)


def test_cook_runs_learned_and_layerwise_soups(tmp_path, digits_ckpts):
    out = tmp_path / "out"
    recipes = [
        {"name": "learned", "epochs": 5, "lr": 0.2},
        {"name": "learned", "by_layer": True, "epochs": 5, "lr": 0.2},
        {"name": "layerwise", "variant": "selective"},
    ]
    result = cook(
        [digits_ckpts],
        DigitsMLP,
        held_out(),
        test=on_test(),
        recipes=recipes,
        output=out,
        bootstrap_resamples=50,
        progress=False,
    )
    labels = ["learned", "learned (by layer)", "layerwise (selective)"]
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    for label in labels:
        row = rows[label]
        assert row["kind"] == "soup" and row["test"] is not None
        card = json.loads((out / (row["saved"] + ".json")).read_text())
        assert card["recipe"] == result.method(label).recipe
        soup = result.method(label).result
        assert card["scores"]["held_out"] == pytest.approx(soup.scores["held_out"])
        saved = safetensors.torch.load_file(str(out / row["saved"]))
        for name, value in soup.state_dict().items():
            assert torch.allclose(saved[name], value, atol=1e-6), (label, name)
    by_layer = json.loads((out / (rows["learned (by layer)"]["saved"] + ".json")).read_text())
    assert set(by_layer["tensor_coefficients"]) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }
    layerwise = json.loads((out / (rows["layerwise (selective)"]["saved"] + ".json")).read_text())
    assert set(layerwise["options"]["groups"]) == {"fc1", "fc2"}
    assert "tensor_coefficients" in layerwise


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_mixed_weights_beyond_fp8s_range_saturate_as_every_soup_does(dtype):
    top = torch.finfo(dtype).max
    big = [
        {"weight": torch.full((1, 2), v * top), "bias": torch.tensor([-v * top])} for v in (3, 5)
    ]
    model = torch.nn.Linear(2, 1).to(dtype)
    weights = SoupMixture(model, open_ingredients(big)).weights()
    assert weights["weight"].dtype == dtype
    assert weights["weight"].float().tolist() == [[top, top]]
    assert weights["bias"].float().tolist() == [-top]


class _TiedHead(torch.nn.Module):
    """``lm_head.weight`` is ``model.weight`` (tied), and sorts before it; checkpoints
    store the tensor once, under ``model.weight``, as ``save_pretrained`` does."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(3, 3)
        self.lm_head = torch.nn.Linear(3, 3)
        self.lm_head.weight = self.model.weight
        self.mid = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.mid(torch.tanh(self.model(x)))))


def test_a_by_layer_fit_kept_in_the_journal_is_read_back_onto_the_same_tensors(tmp_path):
    from modelsoup.hf.models import keep_stored_names_only
    from modelsoup.journal import Journal

    x = torch.randn(80, 3, generator=torch.Generator().manual_seed(0))
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append({k: v for k, v in _TiedHead().state_dict().items() if k != "lm_head.weight"})
    soups = []
    for _ in range(2):  # the second run reuses the first one's fit
        model = _TiedHead()
        keep_stored_names_only(model, set(states[0]))
        taster = Taster(
            open_ingredients(states),
            model,
            Accuracy((x, x.argmax(1))),
            journal=Journal(tmp_path / "journal.jsonl"),
            prefetch=False,
        )
        soups.append(learned_soup(taster, by_layer=True, epochs=3, lr=0.5))
    first, again = soups
    assert again.trace[-1] == {"reused": "coefficients fitted by an earlier run (journal)"}
    assert set(first.tensor_coefficients) == set(states[0])  # no row for the alias
    assert again.tensor_coefficients == first.tensor_coefficients
    assert again.coefficients == first.coefficients
