"""Sharded Hugging Face folders whose index is malformed, disagrees with its shards, or
points outside the folder: each refused with one clear error."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from refusal import refused

from conftest import tiny_state
from modelsoup.formats import open_folder


def _sharded(folder, seed=0, kind="safetensors"):
    """A two-shard HF folder of ``tiny_state(seed)``; returns it and its weight map."""
    folder.mkdir(parents=True)
    state = tiny_state(seed)
    names = list(state)
    shards = {
        f"model-0000{i}-of-00002.{'safetensors' if kind == 'safetensors' else 'bin'}": part
        for i, part in ((1, names[:3]), (2, names[3:]))
    }
    for fname, part in shards.items():
        sub = {n: state[n] for n in part}
        if kind == "safetensors":
            safetensors.torch.save_file(sub, str(folder / fname))
        else:
            torch.save(sub, folder / fname)
    weight_map = {n: fname for fname, part in shards.items() for n in part}
    _write_index(folder, weight_map, kind)
    (folder / "config.json").write_text("{}")
    return folder, weight_map


def _index_name(kind):
    prefix = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    return f"{prefix}.index.json"


def _write_index(folder, weight_map, kind="safetensors", whole=None):
    index = whole if whole is not None else {"metadata": {}, "weight_map": weight_map}
    (folder / _index_name(kind)).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "weight_map, says",
    [
        (["model-00001-of-00002.safetensors"], "weight_map"),
        ({}, "weight_map"),
        ({"fc1.weight": 1}, "'fc1.weight' is mapped to 1"),
        ({"fc1.weight": None}, "'fc1.weight' is mapped to null"),
        ("model.safetensors", "weight_map"),
    ],
    ids=["list", "empty", "integer-value", "null-value", "string"],
)
def test_malformed_weight_map_is_refused(tmp_path, capsys, weight_map, says):
    folder, _ = _sharded(tmp_path / "ft")
    _write_index(folder, weight_map)
    line = refused(capsys, tmp_path, folder, folder)
    assert "model.safetensors.index.json" in line and says in line


@pytest.mark.parametrize(
    "index", [[], {"metadata": {}}, "x"], ids=["list", "no-weight-map", "string"]
)
def test_malformed_index_is_refused(tmp_path, capsys, index):
    folder, _ = _sharded(tmp_path / "ft")
    _write_index(folder, None, whole=index)
    assert "weight_map" in refused(capsys, tmp_path, folder, folder)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path, capsys, kind):
    # the case that exited 0, averaged with itself: the soup silently lost the tensor
    folder, weight_map = _sharded(tmp_path / "ft", kind=kind)
    weight_map["head.extra"] = next(iter(weight_map.values()))
    _write_index(folder, weight_map, kind)
    line = refused(capsys, tmp_path, folder, folder)
    assert "'head.extra'" in line and "no shard holds it" in line


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_shard_tensor_the_index_omits_is_refused(tmp_path, capsys, kind):
    folder, weight_map = _sharded(tmp_path / "ft", kind=kind)
    dropped = sorted(weight_map)[0]
    del weight_map[dropped]
    _write_index(folder, weight_map, kind)
    line = refused(capsys, tmp_path, folder, folder)
    assert f"'{dropped}'" in line and "does not list" in line


def test_tensor_in_the_wrong_shard_is_refused(tmp_path, capsys):
    folder, weight_map = _sharded(tmp_path / "ft")
    first, second = sorted(set(weight_map.values()))
    name = next(n for n, f in weight_map.items() if f == first)
    weight_map[name] = second
    _write_index(folder, weight_map)
    line = refused(capsys, tmp_path, folder, folder)
    assert f"'{name}'" in line and f"stored in {first}" in line


def _redirect_first_shard(folder, weight_map, to):
    first = sorted(set(weight_map.values()))[0]
    _write_index(folder, {n: (to if f == first else f) for n, f in weight_map.items()})


def test_shard_path_up_and_out_is_refused(tmp_path, capsys):
    folder, weight_map = _sharded(tmp_path / "ft")
    other, _ = _sharded(tmp_path / "other", seed=1)  # a real shard: it must not be read
    first = sorted(set(weight_map.values()))[0]
    _redirect_first_shard(folder, weight_map, f"../other/{first}")
    line = refused(capsys, tmp_path, folder, other)
    assert f"'../other/{first}'" in line and "outside the model folder" in line


@pytest.mark.parametrize("target", ["/etc/hostname", "ABSOLUTE"])
def test_absolute_shard_path_is_refused(tmp_path, capsys, target):
    folder, weight_map = _sharded(tmp_path / "ft")
    if target == "ABSOLUTE":  # an absolute path to a real shard of this very folder
        target = str(folder / sorted(set(weight_map.values()))[0])
    _redirect_first_shard(folder, weight_map, target)
    assert "outside the model folder" in refused(capsys, tmp_path, folder, folder)


def test_shard_linked_from_outside_is_refused(tmp_path, capsys):
    folder, weight_map = _sharded(tmp_path / "ft")
    first = sorted(set(weight_map.values()))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.replace(folder / first, elsewhere)
    (folder / first).symlink_to(elsewhere)
    line = refused(capsys, tmp_path, folder, folder)
    assert "is a link to" in line and "outside the model folder" in line


def test_shards_linked_inside_the_folder_or_from_the_hub_cache_are_read(tmp_path):
    # legitimate links: a shard linked within its folder, and the hub cache's layout
    # (snapshots/<revision>/<file> -> ../../blobs/<sha>)
    folder, weight_map = _sharded(tmp_path / "ft")
    first = sorted(set(weight_map.values()))[0]
    (folder / "real").mkdir()
    os.replace(folder / first, folder / "real" / first)
    (folder / first).symlink_to(folder / "real" / first)
    assert sorted(open_folder(folder).names()) == sorted(tiny_state(0))

    repo = tmp_path / "models--org--tiny"
    cached, weight_map = _sharded(repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    for fname in set(weight_map.values()):
        blob = repo / "blobs" / f"sha-{fname}"
        os.replace(cached / fname, blob)
        (cached / fname).symlink_to(os.path.relpath(blob, cached))
    src = open_folder(cached)
    for name, t in tiny_state(0).items():
        assert torch.equal(src.tensor(name), t)
