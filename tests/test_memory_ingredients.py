"""In-memory ingredients (state dicts and modules): the soup is mixed lazily from the very
tensors the user holds, so it must not be written into them, nor mixed from them after
they changed, and what it accepts is checked as a file's tensors are."""

from __future__ import annotations

import warnings

import pytest
import torch

import modelsoup
from modelsoup.errors import ConfigError, IngredientError, SoupWarning
from modelsoup.evaluators import Accuracy
from modelsoup.ingredients import open_ingredients
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


def _fine_tunes(k: int = 3) -> tuple[list[dict], torch.nn.Linear]:
    torch.manual_seed(0)
    start = torch.nn.Linear(8, 3)
    states = []
    for _ in range(k):
        model = torch.nn.Linear(8, 3)
        model.load_state_dict(start.state_dict())
        with torch.no_grad():
            model.weight.add_(0.5 * torch.randn_like(model.weight))
        states.append(model.state_dict())  # shares the model's tensors
    return states, model


def test_taster_refuses_a_model_whose_tensors_are_an_ingredient():
    # The README's loop with the last fine-tune given as the model: tasting wrote every
    # candidate into it, so ingredient 2 changed and later soups were mixed from that.
    states, last = _fine_tunes()
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    held_out = Accuracy((torch.randn(64, 8), torch.randint(0, 3, (64,))))
    with pytest.raises(ConfigError, match="shares the memory of ingredient"):
        Taster(open_ingredients(states), last, held_out)
    assert all(torch.equal(s["weight"], b["weight"]) for s, b in zip(states, before))
    # a fresh module is fine
    Taster(open_ingredients(states), torch.nn.Linear(8, 3), held_out)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 3)
        self.head = torch.nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight


def test_apply_refuses_an_ingredient_and_is_exact_into_a_fresh_module():
    torch.manual_seed(1)
    m0, m1 = _Tied(), _Tied()
    want = (m0.emb.weight.detach() + m1.emb.weight.detach()) / 2
    soup = modelsoup.average([m0, m1])
    with pytest.raises(ConfigError, match="module to apply the soup to shares the memory"):
        soup.apply(m0)
    out = soup.apply(_Tied())
    assert torch.equal(out.emb.weight.detach(), want)
    assert torch.equal(soup.state_dict()["emb.weight"], want)


def test_apply_into_half_precision_refuses_overflow():
    a = {"weight": torch.full((2, 2), 7e4), "bias": torch.zeros(2)}
    soup = modelsoup.average([a, {k: v.clone() for k, v in a.items()}])
    with pytest.raises(ConfigError, match="overflow float16"):
        soup.apply(torch.nn.Linear(2, 2).half())


def test_an_ingredient_changed_in_place_is_refused_not_mixed():
    # a strided tensor (its flat copy was kept) and a contiguous one
    sd0 = {"w": torch.zeros(3, 2).t(), "v": torch.zeros(2)}
    sd1 = {"w": torch.ones(3, 2).t(), "v": torch.ones(2)}
    soup = modelsoup.average([sd0, sd1])
    assert soup.state_dict()["w"].eq(0.5).all()
    with torch.no_grad():
        sd0["w"].add_(10)
    with pytest.raises(IngredientError, match="'w' was changed in place after the soup"):
        soup.state_dict()
    with pytest.raises(IngredientError, match="changed in place"):
        soup.ingredients[0].source.fingerprint()


def test_in_memory_tensors_are_checked_as_file_tensors_are():
    for bad, what in [
        (torch.zeros(2, dtype=torch.complex64), "complex64"),
        (torch.empty(2, device="meta"), "meta tensor"),
        (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "qint8"),
        (torch.ones(2, 2).to_sparse(), "sparse_coo layout"),
    ]:
        with pytest.raises(IngredientError, match=what):
            modelsoup.average([{"w": bad}, {"w": bad}], int_policy="first")


def test_dtype_objects_are_checked_as_names_are():
    soup = modelsoup.average([{"w": torch.tensor([0.4])}, {"w": torch.tensor([0.6])}])
    with pytest.raises(ConfigError, match="'int8' is not a float dtype"):
        soup.state_dict(torch.int8)
    assert soup.state_dict(torch.float64)["w"].dtype == torch.float64
    for accum in (torch.float16, torch.bfloat16, torch.int32):
        with pytest.raises(ConfigError, match="accumulation dtype"):
            modelsoup.average([{"w": torch.ones(1)}] * 2, accum_dtype=accum)
    with pytest.raises(ConfigError, match="accumulation dtype"):
        Soup(open_ingredients([{"w": torch.ones(1)}]), [1], accum_dtype=torch.float16)


def test_tensor_coefficients_are_checked_like_weights():
    ings = open_ingredients([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    for coefs, what in [
        ([0, 0], "all weights are zero"),
        ([1, -1], "must be >= 0"),
        ([1, float("nan")], "must be finite"),
        ([1], "1 weights given for 2"),
    ]:
        with pytest.raises(ConfigError, match=f"tensor_coefficients of 'w': .*{what}"):
            Soup(ings, [1, 1], tensor_coefficients={"w": coefs})
    with pytest.raises(ConfigError, match="names 'x', which the ingredients do not have"):
        Soup(ings, [1, 1], tensor_coefficients={"x": [1, 1]})
    good = Soup(ings, [1, 1], tensor_coefficients={"w": [1, 3]})
    assert good.state_dict()["w"].tolist() == [0.75, 0.75]


def test_weights_that_are_not_a_list_of_numbers_are_one_error():
    pair = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    for weights, what in [
        ("13", "weights are str"),
        ({"a": 1, "b": 3}, "weights are dict"),
        (5, "weights are int"),
        ([1, None], "weight 2 is None"),
        ([1, 3j], "weight 2 is 3j"),
    ]:
        with pytest.raises(ConfigError, match=what):
            modelsoup.average(pair, weights=weights)
    soup = modelsoup.average(pair, weights=torch.tensor([1.0, 3.0]))
    assert soup.state_dict()["w"].tolist() == [0.75]


def test_state_dicts_of_one_model_taken_twice_are_warned_as_duplicates():
    model = torch.nn.Linear(2, 1)
    snapshots = [model.state_dict() for _ in range(2)]  # without .clone(): one model
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        modelsoup.average(snapshots)
    messages = [str(w.message) for w in seen if issubclass(w.category, SoupWarning)]
    assert any("same tensors in memory" in m for m in messages)
    # copies are distinct ingredients
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        modelsoup.average([{k: v.clone() for k, v in s.items()} for s in snapshots])
    assert not [w for w in seen if "same checkpoint" in str(w.message)]


def test_a_replaced_tensor_is_given_as_a_copy_and_checked():
    soup = modelsoup.average([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    soup.overrides = {"w": torch.full((2,), 3.0)}
    got = soup.state_dict()["w"]
    got.add_(1)
    assert soup.state_dict()["w"].tolist() == [3.0, 3.0]
    soup.overrides = {"w": torch.zeros(3)}
    with pytest.raises(ConfigError, match="replacement of tensor 'w' is"):
        soup.state_dict()
