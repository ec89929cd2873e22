"""Malformed safetensors headers: each refused with one clear error, never read as garbage.

Each case starts from a valid file written by the ``safetensors`` library and breaks one
thing the format requires. The reference parser refuses every one of them too.
"""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import safetensors.torch
import torch
from refusal import refused

from conftest import tiny_state


def _tensors() -> dict[str, torch.Tensor]:
    # two float32 tensors of one size first, so an alias of one by the other is possible
    return {
        "a": torch.arange(4, dtype=torch.float32),
        "b": torch.arange(4, 8, dtype=torch.float32),
        "c": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "n": torch.tensor(7, dtype=torch.int64),
    }


def _parts(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _assemble(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _literal(header: dict, name: str, key: str, text: str) -> str:
    # JSON text with one value replaced by ``text``, which json.dumps would not write
    header[name][key] = "@@"
    return json.dumps(header).replace('"@@"', text)


def _edit(header: dict, data: bytes, case: str) -> bytes:
    """The bytes of the file broken in the way ``case`` names."""
    h = json.loads(json.dumps(header))
    a, b, c = h["a"]["data_offsets"], h["b"]["data_offsets"], h["c"]["data_offsets"]
    text = None
    if case == "alias":  # b reads a's bytes
        h["b"]["data_offsets"] = list(a)
    elif case == "overlap":
        h["b"]["data_offsets"] = [b[0] - 4, b[1] - 4]
    elif case == "shifted-into-neighbour":
        h["a"]["data_offsets"] = [a[0] + 2, a[1] + 2]
    elif case == "gap":
        h["c"]["data_offsets"] = [c[0] + 2, c[1] + 2]
        data = data[: c[0]] + b"\0\0" + data[c[0] :]
    elif case == "swapped-dtype-size":  # an F16 span where F32 is needed
        h["a"]["dtype"] = "F16"
    elif case == "trailing-bytes":
        data = data + b"\0" * 8
    elif case == "truncated-data":
        data = data[:-3]
    elif case == "offsets-float":
        h["a"]["data_offsets"] = [float(a[0]), float(a[1])]
    elif case == "offsets-three":
        h["a"]["data_offsets"] = [a[0], a[1], a[1]]
    elif case == "offsets-negative":
        h["a"]["data_offsets"] = [-16, a[1] - 16]
    elif case == "shape-infinity":
        text = _literal(h, "a", "shape", "[Infinity]")
    elif case == "shape-1e999":
        text = _literal(h, "a", "shape", "[1e999]")
    elif case == "offsets-1e999":
        text = _literal(h, "a", "data_offsets", f"[{a[0]}, 1e999]")
    elif case == "shape-float":
        h["a"]["shape"] = [4.0]
    elif case == "shape-bool":
        h["a"]["shape"] = [True, 4]
    elif case == "shape-negative":
        h["c"]["shape"] = [-2, -3]
    elif case == "shape-huge":
        h["c"]["shape"] = [2**64 + 1, 0]
    elif case == "shape-string":
        h["a"]["shape"] = ["4"]
    elif case == "dtype-unknown":
        h["a"]["dtype"] = "F31"
    elif case == "dtype-not-string":
        h["a"]["dtype"] = 32
    elif case == "entry-not-object":
        h["a"] = [4]
    elif case == "entry-without-offsets":
        del h["a"]["data_offsets"]
    elif case == "metadata-number":
        h["__metadata__"] = {"format": 1}
    elif case == "metadata-list":
        h["__metadata__"] = ["pt"]
    elif case == "metadata-nested":
        h["__metadata__"] = {"format": {"pt": "yes"}}
    elif case == "deep-nesting":
        text = json.dumps(h)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    elif case == "top-level-list":
        text = json.dumps([h])
    elif case == "not-json":
        text = json.dumps(h)[:-3]
    elif case == "not-utf8":
        return _assemble(json.dumps(h).encode() + b"\xff\xfe  ", data)
    elif case == "length-past-end":
        blob = json.dumps(h).encode()
        return _assemble(blob, data, length=len(blob) + len(data) + 1)
    elif case == "length-over-limit":
        blob = json.dumps(h).encode()
        return _assemble(blob, data, length=2**40)
    elif case == "length-zero":
        return _assemble(json.dumps(h).encode(), data, length=0)
    elif case == "no-header":
        return b"\x10\0\0"
    else:
        raise AssertionError(case)
    return _assemble((text or json.dumps(h)).encode(), data)


CASES = {
    # case: what the error must name
    "alias": "overlap",
    "overlap": "overlap",
    "shifted-into-neighbour": "'a'",
    "gap": "between tensors",
    "swapped-dtype-size": "'a'",
    "trailing-bytes": "after the last tensor",
    "truncated-data": "truncated",
    "offsets-float": "'a'",
    "offsets-three": "'a'",
    "offsets-negative": "'a'",
    "shape-infinity": "Infinity",
    "shape-1e999": "'a'",
    "offsets-1e999": "'a'",
    "shape-float": "'a'",
    "shape-bool": "'a'",
    "shape-negative": "'c'",
    "shape-huge": "'c'",
    "shape-string": "'a'",
    "dtype-unknown": "F31",
    "dtype-not-string": "'a'",
    "entry-not-object": "'a'",
    "entry-without-offsets": "data_offsets",
    "metadata-number": "__metadata__",
    "metadata-list": "__metadata__",
    "metadata-nested": "__metadata__",
    "deep-nesting": "nested",
    "top-level-list": "not a JSON object",
    "not-json": "corrupt safetensors header",
    "not-utf8": "UTF-8",
    "length-past-end": "header length",
    "length-over-limit": "limit",
    "length-zero": "corrupt safetensors header",
    "no-header": "no header",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_header_is_refused(tmp_path, capsys, case):
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(_tensors(), str(good), metadata={"format": "pt"})
    header, data = _parts(good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_edit(header, data, case))
    with pytest.raises(Exception):  # noqa: B017 - the reference refuses it too, somehow
        with safetensors.safe_open(str(bad), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open has no __iter__
    line = refused(capsys, tmp_path, good, bad)
    assert str(bad) in line and CASES[case] in line
    assert "re-copy or re-save" in line or "re-save" in line


def test_a_real_file_still_reads(tmp_path):
    # the checks refuse what is wrong, not what is merely unusual: an empty tensor,
    # a scalar, no metadata, tensors listed out of order in the header
    from modelsoup.formats import SafetensorsSource

    tensors = {"z": torch.zeros(0, 3), "s": torch.tensor(2.5), **tiny_state(0)}
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    header, data = _parts(path)
    shuffled = dict(reversed(list(header.items())))
    path.write_bytes(_assemble(json.dumps(shuffled).encode(), data))
    src = SafetensorsSource([path])
    assert sorted(src.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(src.tensor(name), t)
