"""fp8 checkpoints (``F8_E4M3``/``F8_E5M2`` safetensors, ``float8_*`` pickles) are averaged:
summed in float32, written back in fp8, saturated to the dtype's finite range."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from modelsoup.accumulator import Accumulator
from modelsoup.cli import main
from modelsoup.ingredients import open_ingredients
from modelsoup.soup import Soup

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _fp8_states(count: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    # values spread over the dtype's range, the largest ones included
    top = torch.finfo(dtype).max
    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        w = (torch.rand(8, 16, generator=gen) * 2 - 1) * top
        w[0, :2] = torch.tensor([top, -top])
        out.append({"w": w.to(dtype), "b": torch.randn(16, generator=gen).to(dtype)})
    return out


def _bits(t: torch.Tensor) -> list[int]:
    # fp8 compared bit for bit: the exact value the cast must give, NaN patterns included
    return t.contiguous().view(torch.uint8).reshape(-1).tolist()


def _by_hand(states, name, weights, dtype):
    # the reference: widen to float32, weighted mean, clamp to the finite range, cast
    acc = sum(w * s[name].to(torch.float32) for w, s in zip(weights, states))
    top = torch.finfo(dtype).max
    return (acc / sum(weights)).clamp(-top, top).to(dtype)


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fp8_average_through_the_cli(tmp_path, capsys, dtype, suffix):
    states = _fp8_states(3, dtype)
    paths = []
    for i, sd in enumerate(states):
        paths.append(tmp_path / f"ft{i}{suffix}")
        if suffix == ".safetensors":
            safetensors.torch.save_file(sd, str(paths[-1]))
        else:
            torch.save(sd, paths[-1])
    out = tmp_path / "soup.safetensors"
    code = main(["average", *map(str, paths), "-o", str(out), "--weights", "1,2,3", "-q"])
    assert code == 0, capsys.readouterr().err
    got = safetensors.torch.load_file(str(out))
    for name in ("w", "b"):
        assert got[name].dtype == dtype
        want = _by_hand(states, name, [1, 2, 3], dtype)
        assert _bits(got[name]) == _bits(want), name
    assert torch.isfinite(got["w"].float()).all()


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_sum_saturates_instead_of_overflowing(tmp_path, dtype):
    # an unnormalised soup (a sum) of values near the top of the range overflows fp8:
    # it saturates to the largest finite value, never Inf or NaN
    states = _fp8_states(2, dtype)
    top = torch.finfo(dtype).max
    soup = Soup(open_ingredients(states), [1.0, 1.0], options={"normalize": False})
    got = soup.tensor("w")
    acc = states[0]["w"].float() + states[1]["w"].float()
    assert got.dtype == dtype and torch.isfinite(got.float()).all()
    assert got.float().abs().max() == top
    assert _bits(got) == _bits(acc.clamp(-top, top).to(dtype))
    out = soup.save(tmp_path / "sum.safetensors", progress=False)
    assert _bits(safetensors.torch.load_file(str(out))["w"]) == _bits(got)


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_in_the_running_sum(dtype):
    # the accumulator behind greedy soups: add, remove and write into an fp8 module
    states = _fp8_states(3, dtype)
    acc = Accumulator(open_ingredients(states))
    for i in range(3):
        acc.add(i)
    acc.remove(1)
    want = (states[0]["w"].float() + states[2]["w"].float()) / 2
    assert torch.allclose(acc.mean("w"), want, rtol=0, atol=1e-3)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(8, 16, dtype=dtype))
            self.register_buffer("b", torch.zeros(16, dtype=dtype))

    held = acc.write_into(Holder())
    assert _bits(held.w) == _bits(_by_hand([states[0], states[2]], "w", [1, 1], dtype))
    held = acc.write_into_with(Holder(), 1)
    assert _bits(held.w) == _bits(_by_hand(states, "w", [1, 1, 1], dtype))


def test_fp8_with_a_nan_is_refused(tmp_path, capsys):
    # float8_e4m3fn has NaN but no Inf: a NaN in a checkpoint is named, not averaged
    states = _fp8_states(2, torch.float8_e4m3fn)
    states[1]["w"].view(torch.uint8)[3, 3] = 0x7F  # the e4m3fn NaN
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for p, sd in zip(paths, states):
        safetensors.torch.save_file(sd, str(p))
    code = main(["average", *map(str, paths), "-o", str(tmp_path / "soup.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "b: tensor 'w' contains NaN" in err
