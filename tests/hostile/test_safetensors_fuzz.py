"""A seeded random fuzz of safetensors headers, judged by the reference parser.

Each mutant breaks one to three things in a valid file: offsets, shapes, dtypes, the
header length field, ``__metadata__``, the JSON itself, or the data section. For every
mutant the ``safetensors`` library refuses, modelsoup must refuse it too (with an
:class:`~modelsoup.errors.IngredientError`, never another exception) or read every
tensor exactly as in the intact original. Where both accept a mutant, both must read
the same tensors.
"""

from __future__ import annotations

import json
import random
import struct

import safetensors
import safetensors.torch
import torch

from modelsoup.errors import IngredientError
from modelsoup.formats import SafetensorsSource

MUTANTS = 400
SEED = 20261201
KNOWN = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3"]
# JSON values of every kind, including what json.dumps never writes but a file may hold
ODD = [
    "-1", "1.5", "4.0", "true", "null", '"8"', "[]", "{}", "[1]", "18446744073709551616",
    "9223372036854775808", "1e999", "-1e999", "Infinity", "-Infinity", "NaN", "1" * 5000,
]  # fmt: skip


def _original() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=gen),
        "b": torch.randn(5, generator=gen).half(),
        "c": torch.arange(2, dtype=torch.int64),
        "d": torch.randn(2, 2, generator=gen).bfloat16(),
        "e": torch.arange(3, dtype=torch.uint8),
        "f": torch.tensor([True, False, True, True]),
        "z": torch.zeros(0, 3),
        "s": torch.tensor(2.5, dtype=torch.float64),
    }


class _Mutant:
    """A header (as a JSON-ish dict, with ``@n@`` placeholders for literal text),
    the data bytes and an optional forged header length."""

    def __init__(self, header: dict, data: bytes):
        self.header = json.loads(json.dumps(header))
        self.data = data
        self.literals: list[str] = []
        self.text_edits: list = []  # functions str -> str applied to the JSON text
        self.length: int | None = None
        self.raw_edits: list = []  # functions bytes -> bytes applied to the header bytes
        self.what: list[str] = []

    def literal(self, text: str) -> str:
        self.literals.append(text)
        return f"@{len(self.literals) - 1}@"

    def build(self) -> bytes:
        text = json.dumps(self.header)
        for i, lit in enumerate(self.literals):
            text = text.replace(f'"@{i}@"', lit)
        for edit in self.text_edits:
            text = edit(text)
        blob = text.encode("utf-8")
        for edit in self.raw_edits:
            blob = edit(blob)
        length = len(blob) if self.length is None else self.length
        return struct.pack("<Q", length % 2**64) + blob + self.data


def _names(m: _Mutant) -> list[str]:
    return [k for k in m.header if k != "__metadata__"]


def _entry(m: _Mutant, rng: random.Random) -> dict:
    name = rng.choice(_names(m))
    m.what.append(name)
    if not isinstance(m.header[name], dict):  # an earlier mutation replaced it
        m.header[name] = {}
    return m.header[name]


def offsets(m: _Mutant, rng: random.Random) -> None:
    e = _entry(m, rng)
    off = e.get("data_offsets")
    if not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) for o in off):
        off = [0, 0]
    kind = rng.randrange(6)
    if kind == 0:  # nudge one end
        off[rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif kind == 1:  # shift the span
        d = rng.choice([-8, -2, -1, 1, 2, 8])
        off = [off[0] + d, off[1] + d]
    elif kind == 2:  # take another tensor's span (alias)
        other = m.header[rng.choice(_names(m))]
        if isinstance(other, dict) and isinstance(other.get("data_offsets"), list):
            off = list(other["data_offsets"])
    elif kind == 3:  # an odd value in one place
        off[rng.randrange(2)] = m.literal(rng.choice(ODD))
    elif kind == 4:  # the wrong number of offsets
        off = off[: rng.choice([0, 1])] if rng.random() < 0.5 else [*off, off[-1]]
    else:  # not a list at all
        off = m.literal(rng.choice(ODD + ['"0,8"']))
    e["data_offsets"] = off
    m.what.append(f"offsets {kind}")


def shape(m: _Mutant, rng: random.Random) -> None:
    e = _entry(m, rng)
    sh = e.get("shape")
    sh = list(sh) if isinstance(sh, list) else []
    kind = rng.randrange(5)
    if kind == 0 and sh:  # one size changed
        i = rng.randrange(len(sh))
        if isinstance(sh[i], int):
            sh[i] += rng.choice([-2, -1, 1, 2])
    elif kind == 1:  # a dimension of 1 added, or one removed (numel may stay)
        sh = [*sh, 1] if rng.random() < 0.5 or not sh else sh[:-1]
    elif kind == 2:  # dimensions reversed: same numel, other shape
        sh = sh[::-1]
    elif kind == 3 and sh:
        sh[rng.randrange(len(sh))] = m.literal(rng.choice(ODD))
    else:
        sh = m.literal(rng.choice(ODD))
    e["shape"] = sh
    m.what.append(f"shape {kind}")


def dtype(m: _Mutant, rng: random.Random) -> None:
    e = _entry(m, rng)
    if rng.random() < 0.6:
        e["dtype"] = rng.choice(KNOWN)
    else:
        e["dtype"] = (
            rng.choice(["F31", "f32", "", "float32", "C64"])
            if rng.random() < 0.5
            else (m.literal(rng.choice(ODD)))
        )
    m.what.append("dtype")


def header_length(m: _Mutant, rng: random.Random) -> None:
    base = len(m.build()) - 8 - len(m.data)
    m.length = rng.choice(
        [base + d for d in (-9, -8, -1, 1, 7, 8, 64)] + [0, 1, 2, 7, 100_000_001, 2**63, 2**64 - 1]
    )
    m.what.append(f"length {m.length}")


def metadata(m: _Mutant, rng: random.Random) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        m.header["__metadata__"] = {"format": m.literal(rng.choice(ODD))}
    elif kind == 1:
        m.header["__metadata__"] = m.literal(rng.choice(ODD + ['"pt"']))
    elif kind == 2:
        m.header["__metadata__"] = {"format": {"nested": "x"}}
    else:
        m.header.pop("__metadata__", None)  # legal: the reference and we both accept
    m.what.append(f"metadata {kind}")


def structure(m: _Mutant, rng: random.Random) -> None:
    kind = rng.randrange(9)
    if kind == 0:  # cut the JSON short
        cut = rng.randrange(1, 200)
        m.text_edits.append(lambda t: t[: max(0, len(t) - cut)])
    elif kind == 1:  # deep nesting
        depth = rng.choice([20, 200, 5000, 100_000])
        m.text_edits.append(lambda t: t[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}")
    elif kind == 2:  # one tensor given twice
        name = rng.choice(_names(m))
        m.text_edits.append(
            lambda t: t[:-1] + f", {json.dumps(name)}: {json.dumps(m.header[name])}" + "}"
        )
    elif kind == 3:
        m.text_edits.append(lambda t: f"[{t}]")
    elif kind == 4:  # a tensor's entry lost: its bytes are left uncovered
        del m.header[rng.choice(_names(m))]
    elif kind == 5:  # an entry that is not an object
        m.header[rng.choice(_names(m))] = m.literal(rng.choice(ODD))
    elif kind == 6:  # a key of an entry lost
        e = _entry(m, rng)
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    elif kind == 7:  # one byte of the header text flipped
        pos, bit = rng.randrange(10_000), 1 << rng.randrange(8)
        m.raw_edits.append(lambda b: _flip(b, pos, bit))
    else:  # whitespace around the JSON (legal JSON; the reference wants '{' first)
        m.text_edits.append(lambda t: "  " + t + "  ")
    m.what.append(f"structure {kind}")


def data_section(m: _Mutant, rng: random.Random) -> None:
    kind = rng.randrange(3)
    if kind == 0:
        m.data = m.data[: -rng.randrange(1, 9)]
    elif kind == 1:
        m.data = m.data + bytes(rng.randrange(1, 9))
    else:  # one data byte changed: still a valid file, read the same way by both
        pos = rng.randrange(len(m.data))
        m.data = m.data[:pos] + bytes([m.data[pos] ^ 0x40]) + m.data[pos + 1 :]
    m.what.append(f"data {kind}")


#: each mutant gets one to three of these (offsets, shapes and structure weigh double)
MUTATORS = [offsets, offsets, shape, shape, dtype, header_length, metadata, structure]
MUTATORS += [structure, data_section]


def _flip(blob: bytes, pos: int, bit: int) -> bytes:
    if not blob:
        return blob
    pos %= len(blob)
    return blob[:pos] + bytes([blob[pos] ^ bit]) + blob[pos + 1 :]


def _reference(path) -> dict[str, torch.Tensor] | None:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    except Exception:  # the reference refuses it, however it says so
        return None


def _ours(path) -> dict[str, torch.Tensor] | None:
    try:
        src = SafetensorsSource([path])
        try:
            return {n: src.tensor(n).clone() for n in src.names()}
        finally:
            src.close()
    except IngredientError:
        return None


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if sorted(a) != sorted(b):
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def test_fuzzed_headers_are_refused_or_read_exactly(tmp_path):
    rng = random.Random(SEED)
    intact = tmp_path / "intact.safetensors"
    safetensors.torch.save_file(_original(), str(intact), metadata={"format": "pt"})
    raw = intact.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    original = _ours(intact)
    assert original is not None and _same(original, _original())

    refused_by_reference = 0
    for i in range(MUTANTS):
        m = _Mutant(header, data)
        for mutate in rng.sample(MUTATORS, rng.choice([1, 1, 2, 3])):
            mutate(m, rng)
        path = tmp_path / f"mutant-{i:03d}.safetensors"
        path.write_bytes(m.build())
        theirs = _reference(path)
        try:
            ours = _ours(path)
        except Exception as err:  # anything but IngredientError is a bug
            raise AssertionError(f"mutant {i} ({m.what}): {type(err).__name__}: {err}") from err
        if theirs is None:
            refused_by_reference += 1
            assert ours is None or _same(ours, original), f"mutant {i} ({m.what}) read as garbage"
        elif ours is not None:
            assert _same(ours, theirs), f"mutant {i} ({m.what}): we read it otherwise"
        path.unlink()
    # the fuzz is only worth something if most mutants are really broken
    assert refused_by_reference >= 200, refused_by_reference
