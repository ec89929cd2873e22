"""Writing a soup mixes each tensor in pieces: same bytes as mixing it whole, less memory."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

import modelsoup.soup
from conftest import tiny_state
from modelsoup import average, open_ingredient


@pytest.fixture
def small_pieces(monkeypatch):
    # 7 elements: pieces end mid-row and tensors end mid-piece
    monkeypatch.setattr(modelsoup.soup, "PIECE_ELEMENTS", 7)


def _inputs(tmp_path, kind):
    states = [tiny_state(s) for s in range(3)]
    if kind == "memory":
        return states
    paths = []
    for i, sd in enumerate(states):
        if kind == "safetensors":
            path = tmp_path / f"m{i}.safetensors"
            safetensors.torch.save_file(sd, str(path))
        else:
            path = tmp_path / f"m{i}.pt"
            torch.save(sd, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", ["safetensors", "pt", "memory"])
@pytest.mark.parametrize("out_dtype", [None, "bf16"])
def test_pieces_write_the_same_soup_as_whole_tensors(tmp_path, small_pieces, kind, out_dtype):
    soup = average(_inputs(tmp_path, kind), weights=[1, 2, 3])
    out = soup.save(tmp_path / "soup.safetensors", out_dtype=out_dtype, progress=False)
    written = safetensors.torch.load_file(str(out))
    whole = soup.state_dict(out_dtype)
    assert written.keys() == whole.keys()
    for name, value in whole.items():
        assert written[name].dtype == value.dtype and torch.equal(written[name], value), name
    # the mixing buffers never grew past one piece
    assert soup._sum_buffer.numel() <= 7


def test_hash_while_reading_survives_pieces(tmp_path, small_pieces, monkeypatch):
    monkeypatch.setenv("MODELSOUP_HASH_CACHE", "off")
    paths = _inputs(tmp_path, "safetensors")
    out = average(paths).save(tmp_path / "soup.safetensors", progress=False)
    card = json.loads(out.with_name(out.name + ".json").read_text())
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [row["sha256"] for row in card["ingredients"]] == expected


def test_tensor_range_reads_exactly_the_asked_elements(tmp_path):
    path = tmp_path / "w.safetensors"
    w = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)
    safetensors.torch.save_file({"w": w}, str(path))
    ingredient = open_ingredient(path)
    assert torch.equal(ingredient.tensor_range("w", 5, 9), w.reshape(-1)[5:14])
    assert torch.equal(ingredient.tensor_range("w", 20, 10), w.reshape(-1)[20:])


@pytest.mark.parametrize("kind", ["safetensors", "memory"])
def test_apply_writes_pieces_straight_into_the_module(tmp_path, small_pieces, kind):
    from conftest import TinyNet

    soup = average(_inputs(tmp_path, kind), weights=[3, 1, 1])
    net = soup.apply(TinyNet())
    whole = soup.state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(value, whole[name]), name
    assert soup._sum_buffer.numel() <= 7


def test_strided_tensors_read_in_pieces(tmp_path, small_pieces):
    # a pickled transposed view stays strided after loading: pieces must follow row-major order
    a = torch.arange(30.0).reshape(5, 6)
    path = tmp_path / "t.pt"
    torch.save({"w": a.t()}, path)
    soup = average([path, {"w": a.t().contiguous()}])
    out = soup.save(tmp_path / "soup.safetensors", progress=False)
    assert torch.equal(safetensors.torch.load_file(str(out))["w"], a.t())
