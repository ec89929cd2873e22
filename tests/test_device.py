"""Mixing where the model lives: the sum's device and dtype need not be the module's."""

from __future__ import annotations

import pytest
import torch

from digits_kit import write_ingredients
from modelsoup.accumulator import Accumulator
from modelsoup.cli import main
from modelsoup.ingredients import open_ingredients


def _pool():
    gen = torch.Generator().manual_seed(1)
    return [
        {"weight": torch.randn(4, 3, generator=gen), "bias": torch.randn(4, generator=gen)}
        for _ in range(3)
    ]


def test_a_float64_sum_on_an_explicit_device_writes_a_float32_module():
    pool = _pool()
    acc = Accumulator(open_ingredients(pool), accum_dtype=torch.float64, device="cpu")
    acc.add(0)
    acc.add(2, 3.0)
    module = acc.write_into(torch.nn.Linear(3, 4))
    want = (pool[0]["weight"].double() + 3 * pool[2]["weight"].double()) / 4
    assert module.weight.dtype == torch.float32
    assert torch.equal(module.weight.detach(), want.float())
    module = acc.write_into_with(torch.nn.Linear(3, 4), 1, 2.0)
    want = (
        pool[0]["weight"].double() + 3 * pool[2]["weight"].double() + 2 * pool[1]["weight"].double()
    ) / 6
    assert torch.equal(module.weight.detach(), want.float())
    assert acc.weights == [1.0, 0.0, 3.0] and acc.device == torch.device("cpu")


def _config(tmp_path):
    paths = write_ingredients(tmp_path / "runs", grid=[(0.01, 1), (0.03, 2)])
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        "model: digits_kit:model\n"
        f"ingredients: [{', '.join(str(p) for p in paths)}]\n"
        "held_out: digits_kit:held_out\n"
        "output: out\n"
    )
    return cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["cook", "diagnose"])
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:7"])
def test_an_unavailable_or_unknown_device_is_one_error_line(tmp_path, capsys, command, device):
    code = main([command, str(_config(tmp_path)), "--device", device, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: device")
    assert not (tmp_path / "out").exists()


def test_average_recalibrate_on_an_unknown_device_is_one_error_line(tmp_path, capsys):
    paths = write_ingredients(tmp_path / "runs", grid=[(0.01, 1), (0.03, 2)])
    out = tmp_path / "soup.safetensors"
    code = main(
        ["average", *map(str, paths), "-o", str(out), "--recalibrate-bn", "digits_kit:x"]
        + ["--model", "digits_kit:model", "--device", "gpu", "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: device 'gpu' is unknown; use cpu, cuda, cuda:N or mps"]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_align_on_an_unavailable_or_unknown_device_is_one_error_line(tmp_path, capsys, device):
    paths = write_ingredients(tmp_path / "runs", grid=[(0.01, 1), (0.03, 2)])
    out = tmp_path / "aligned-out"
    code = main(
        ["align", *map(str, paths), "-o", str(out), "--model", "digits_kit:model"]
        + ["--input-shape", "8,64", "--method", "activations", "--data", "digits_kit:x"]
        + ["--device", device, "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: device '{device}'")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_align_pool_checks_its_device_before_reading_anything(tmp_path):
    from modelsoup.errors import ConfigError
    from modelsoup.repair.pool import align_pool

    with pytest.raises(ConfigError, match="CUDA is not available"):
        align_pool(
            [tmp_path / "missing.safetensors"] * 2,
            torch.nn.Linear(3, 2),
            tmp_path / "out",
            example=torch.zeros(1, 3),
            method="activations",
            data=torch.zeros(4, 3),
            device="cuda",
        )
    assert not (tmp_path / "out").exists()
