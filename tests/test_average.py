"""The averaging engine: exactness, order, dtypes, integer buffers, the accumulator."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyNet, tiny_state
from modelsoup import Accumulator, SoupWarning, average, open_ingredients
from modelsoup.errors import ConfigError, IncompatibleIngredientsError


def _reference(states, weights):
    total = sum(weights)
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = sum(s[k].double() * w for s, w in zip(states, weights)) / total
            out[k] = acc
        else:
            out[k] = v
    return out


def test_soup_of_identical_ingredients_is_the_ingredient():
    sd = tiny_state(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        got = average([sd, dict(sd), dict(sd)]).state_dict()
        exact = average([sd, dict(sd)], accum_dtype="float64").state_dict()
    # float32 accumulation rounds at most once per term; float64 is exact here.
    assert all(torch.allclose(got[k], sd[k], rtol=3e-7, atol=0) for k in sd)
    assert all(torch.equal(exact[k], sd[k]) for k in sd)


def test_duplicate_ingredient_warns_and_counts_twice(tmp_path):
    import safetensors.torch

    a, b = tiny_state(0), tiny_state(1)
    pa = tmp_path / "a.safetensors"
    safetensors.torch.save_file(a, str(pa))
    with pytest.warns(SoupWarning, match="counts twice"):
        soup = average([pa, pa, b])
    expected = _reference([a, a, b], [1, 1, 1])
    got = soup.state_dict()
    assert torch.allclose(got["fc1.weight"].double(), expected["fc1.weight"], atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.permutations(range(4)), st.lists(st.floats(0.1, 10), min_size=4, max_size=4))
def test_order_does_not_matter(perm, weights):
    states = [tiny_state(s) for s in range(4)]
    a = average(states, weights).state_dict()
    b = average([states[i] for i in perm], [weights[i] for i in perm]).state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
)
def test_matches_float64_reference(dtype, atol):
    states = [tiny_state(s, dtype) for s in range(3)]
    weights = [1.0, 2.0, 0.5]
    got = average(states, weights).state_dict()
    ref = _reference(states, weights)
    for k in got:
        assert got[k].dtype == states[0][k].dtype
        if got[k].is_floating_point():
            assert torch.allclose(got[k].double(), ref[k], atol=atol, rtol=atol)


def test_half_precision_does_not_overflow():
    big = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    got = average([big, dict(big)]).state_dict()["w"]
    assert torch.isfinite(got).all() and got.dtype == torch.float16


@pytest.mark.parametrize(
    "merge, base", [(None, None), ({"rule": "task_arithmetic", "lambda": 1e4}, 0.0)]
)
def test_a_soup_that_does_not_fit_its_output_dtype_is_refused_not_written_as_inf(
    tmp_path, merge, base
):
    # finite in the float32 sum, beyond float16's 65504 once cast: never written as Inf
    states = [{"w": torch.full((3,), 1e5)}, {"w": torch.full((3,), 2e5)}]
    if base is not None:
        states = [{"w": torch.full((3,), 10.0)}, {"w": torch.full((3,), 20.0)}]
        base = {"w": torch.full((3,), base)}
    soup = average(states, base=base, merge=merge)
    out = tmp_path / "soup.safetensors"
    with pytest.raises(ConfigError, match="tensor 'w': values up to 1.5e\\+05 overflow float16"):
        soup.save(out, out_dtype="fp16", progress=False)
    assert not list(tmp_path.iterdir())
    assert torch.equal(soup.tensor("w", "fp32"), torch.full((3,), 1.5e5))


def test_out_dtype_casts_only_floats():
    states = [tiny_state(s) for s in range(2)]
    soup = average(states)
    sd = {n: soup.tensor(n, "bf16") for n in states[0]}
    assert sd["fc1.weight"].dtype == torch.bfloat16
    assert sd["bn.num_batches_tracked"].dtype == torch.int64


def test_integer_buffers_survive_and_must_agree():
    a, b = tiny_state(0), tiny_state(1)
    a["bn.num_batches_tracked"] = torch.tensor(7)
    b["bn.num_batches_tracked"] = torch.tensor(7)
    assert average([a, b]).state_dict()["bn.num_batches_tracked"].item() == 7
    b["bn.num_batches_tracked"] = torch.tensor(9)
    with pytest.raises(IncompatibleIngredientsError, match="num_batches_tracked"):
        average([a, b]).state_dict()
    got = average([a, b], int_policy="first").state_dict()
    assert got["bn.num_batches_tracked"].item() == 7


def test_unnormalized_weights_are_used_as_given():
    a = {"w": torch.ones(2)}
    got = average([a, dict(a)], [1.0, 2.0], normalize=False).state_dict()["w"]
    assert torch.allclose(got, torch.full((2,), 3.0))


@pytest.mark.parametrize("weights", [[1, -1], [1, float("nan")], [0, 0], [1], [1, float("inf")]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ConfigError):
        average([tiny_state(0), tiny_state(1)], weights)


def test_mismatch_names_tensor_shapes_and_sources():
    a, b = tiny_state(0), tiny_state(1)
    b["fc2.weight"] = torch.zeros(5, 16)
    with pytest.raises(IncompatibleIngredientsError, match=r"fc2.weight.*\(3, 16\).*\(5, 16\)"):
        average([a, b])
    c = dict(a)
    del c["fc2.bias"]
    with pytest.raises(IncompatibleIngredientsError, match="fc2.bias.*missing"):
        average([a, c])


def test_accumulator_add_remove_and_write_into_module():
    states = [tiny_state(s) for s in range(3)]
    ings = open_ingredients(states)
    acc = Accumulator(ings)
    for i in range(3):
        acc.add(i)
    acc.remove(1)
    net = TinyNet()
    before = id(net.fc1.weight)
    acc.write_into(net)
    ref = _reference([states[0], states[2]], [1, 1])
    assert id(net.fc1.weight) == before
    assert torch.allclose(net.fc1.weight.double(), ref["fc1.weight"], atol=1e-6)
    acc.set_weights([0, 2, 1])
    ref = _reference(states, [0, 2, 1])
    assert torch.allclose(acc.mean("fc2.bias").double(), ref["fc2.bias"], atol=1e-6)


def test_accumulator_refuses_a_model_of_another_shape():
    acc = Accumulator(open_ingredients([tiny_state(0)]))
    acc.add(0)
    with pytest.raises(IncompatibleIngredientsError, match="model"):
        acc.write_into(torch.nn.Linear(2, 2))


def test_apply_writes_in_place():
    states = [tiny_state(s) for s in range(2)]
    net = TinyNet()
    ptr = net.fc1.weight.data_ptr()
    average(states).apply(net)
    assert net.fc1.weight.data_ptr() == ptr
    ref = _reference(states, [1, 1])
    assert torch.allclose(net.fc1.weight.double(), ref["fc1.weight"], atol=1e-6)


def test_accumulator_soup_of_one_is_exact_after_other_moves():
    states = [tiny_state(s) for s in range(3)]
    acc = Accumulator(open_ingredients(states))
    acc.set_weights([1, 1, 1])
    acc.set_weights([1, 0, 1])
    acc.set_weights([0, 0, 1])
    assert torch.equal(acc.mean("fc1.weight"), states[2]["fc1.weight"])


def test_the_soup_minus_one_is_written_without_touching_the_sum():
    states = [tiny_state(s) for s in range(3)]
    acc = Accumulator(open_ingredients(states))
    acc.set_weights([1, 2, 1])
    before = {n: t.clone() for n, t in acc._sum.items()}
    net = acc.write_into_with(TinyNet(), 1, -2.0)  # pruned's candidate: without 1
    ref = _reference([states[0], states[2]], [1, 1])
    assert torch.allclose(net.fc1.weight.double(), ref["fc1.weight"], atol=1e-6)
    # bit for bit what taking it out of the sum gives, and the sum untouched
    assert acc.weights == [1.0, 2.0, 1.0]
    assert all(torch.equal(acc._sum[n], before[n]) for n in before)
    acc.remove(1)
    assert torch.equal(net.fc1.weight.detach(), acc.mean("fc1.weight"))
    for bad in (-1.5, 0.0):  # more than it has; nothing
        with pytest.raises(ConfigError, match="weight"):
            acc.write_into_with(TinyNet(), 1, bad)
    acc.set_weights([0, 0, 1])
    with pytest.raises(ConfigError, match="leaving a soup behind"):
        acc.write_into_with(TinyNet(), 2, -1.0)  # nothing would be left


def test_pruned_candidates_leave_the_sum_alone_when_rejected():
    from modelsoup.tasting import Taster

    states = [tiny_state(s) for s in range(4)]
    taster = Taster(open_ingredients(states), TinyNet(), lambda m: 0.0, prefetch=False)
    taster.materialise([1, 1, 1, 1])
    sums = {n: t.clone() for n, t in taster.accumulator._sum.items()}
    for i in range(4):  # four rejected "soup minus i" candidates
        taster.materialise([0 if j == i else 1 for j in range(4)])
        ref = _reference([s for j, s in enumerate(states) if j != i], [1, 1, 1])
        assert torch.allclose(taster.model.fc1.weight.double(), ref["fc1.weight"], atol=1e-6)
    assert all(torch.equal(taster.accumulator._sum[n], sums[n]) for n in sums)
    taster.materialise([0, 0, 1, 1])
    taster.materialise([0, 0, 0, 1])  # a soup of one is rebuilt: exactly its ingredient
    assert torch.equal(taster.model.fc1.weight.detach(), states[3]["fc1.weight"])


def test_a_base_the_weighted_average_does_not_read_is_warned_about():
    states = [{"w": torch.zeros(2)}, {"w": torch.ones(2)}]
    with pytest.warns(SoupWarning, match="the base model is not used"):
        average(states, base={"w": torch.full((2,), 5.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupWarning)
        average(states, base={"w": torch.full((2,), 5.0)}, merge="task_arithmetic")


@pytest.mark.parametrize("scale", [1e-50, 1e-42, 1e39, 1e300])
def test_weights_far_from_one_give_the_same_soup_as_weights_near_it(scale):
    a, b = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([3.0, 2.0, 1.0, 0.0])}
    near = average([a, b], weights=[1.0, 3.0]).state_dict()["w"]
    far = average([a, b], weights=[scale, 3 * scale]).state_dict()["w"]
    assert torch.allclose(far, near, rtol=1e-6) and torch.isfinite(far).all()


def test_unnormalized_weights_too_large_for_the_sum_are_one_error():
    from modelsoup.errors import ConfigError

    a, b = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    with pytest.raises(ConfigError, match="too large for a torch.float32 sum"):
        average([a, b], weights=[1e39, 1.0], normalize=False).state_dict()


def test_float64_checkpoints_summed_in_float32_are_warned_about():
    wide = [{"w": torch.full((2,), 1 + 2**-40, dtype=torch.float64)} for _ in range(2)]
    with pytest.warns(SoupWarning, match="keeps only float32's precision"):
        soup = average(wide)
    assert soup.state_dict()["w"].dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = average(wide, accum_dtype="float64")
    assert torch.equal(kept.state_dict()["w"], wide[0]["w"])  # no bit of float64 lost
