"""safetensors: a lazy reader that reads one tensor with one ``readinto``, and a streaming writer.

We parse the small JSON header ourselves and read tensor bytes with plain file reads
rather than a memory map, so the pages of a multi-GB ingredient never pile up in the
process's resident memory: reading a tensor costs exactly that tensor.
Every offset in the header is checked before it is trusted.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from modelsoup._util import atomic_file
from modelsoup.errors import ConfigError, IngredientError, WriteError
from modelsoup.formats import hashcache
from modelsoup.formats.base import (
    RESAVE_HINT,
    TensorMeta,
    TensorSource,
    ThreadedHash,
    check_regular,
    check_unchanged,
)

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_CODES = {v: k for k, v in _DTYPES.items()}

#: the reference parser's limit on the header, in bytes
_MAX_HEADER = 100_000_000
#: a valid header nests three deep (file, tensor, shape); more is refused before parsing,
#: so a hostile header cannot exhaust the parser's recursion
_MAX_DEPTH = 16
#: shapes and offsets must fit torch's int64 sizes
_MAX_INT = 2**63 - 1
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class _Entry:
    __slots__ = ("meta", "start", "end")

    def __init__(self, meta: TensorMeta, start: int, end: int):
        self.meta, self.start, self.end = meta, start, end


def read_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """Parse and validate a safetensors header (see :func:`read_header_bytes`)."""
    entries, metadata, start, _ = read_header_bytes(path)
    return entries, metadata, start


def read_header_bytes(path: Path) -> tuple[dict[str, _Entry], dict[str, str], int, bytes]:
    """Parse and validate a safetensors header: entries, metadata, where data starts, and
    the raw bytes before it (for hashing).

    Nothing in the header is trusted: it must be what the format requires, or the file
    is refused with an :class:`~modelsoup.errors.IngredientError` that names it (and the
    tensor). Every tensor has a known dtype, a shape of non-negative integers and
    integer ``data_offsets`` spanning exactly its ``numel x itemsize`` bytes; the spans,
    in order, tile the data section from its first byte to the end of the file, with no
    gap, overlap or trailing byte; ``__metadata__`` maps strings to strings.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, str(p))
        >>> entries, meta, start, raw = read_header_bytes(p)
        >>> entries["w"].meta.shape, len(raw) == start
        ((2,), True)
    """
    entries, metadata, start, raw, _ = _read_header(path)
    return entries, metadata, start, raw


#: the suffix of a safetensors file (read in any case)
SAFETENSORS_SUFFIXES = (".safetensors",)


def is_safetensors_name(path: Path) -> bool:
    """Whether a file name says safetensors (``.safetensors``, in any case).

    Example:
        >>> is_safetensors_name(Path("a.SafeTensors")), is_safetensors_name(Path("a.pt"))
        (True, False)
    """
    return path.name.lower().endswith(SAFETENSORS_SUFFIXES)


def _read_header(
    path: Path,
) -> tuple[dict[str, _Entry], dict[str, str], int, bytes, os.stat_result]:
    # ... and the file's state as the header was read (one descriptor for both)
    check_regular(path)
    try:
        with open(path, "rb") as fh:
            state = os.fstat(fh.fileno())
            size = state.st_size
            raw = fh.read(8)
            if len(raw) < 8:
                raise IngredientError(
                    f"{path}: truncated safetensors file (no header)" + RESAVE_HINT
                )
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise IngredientError(
                    f"{path}: corrupt safetensors header (its length field says {n} bytes, "
                    f"over the format's limit of {_MAX_HEADER})" + RESAVE_HINT
                )
            if 8 + n > size:
                raise IngredientError(
                    f"{path}: corrupt or truncated safetensors file (its header length field "
                    f"says {n} bytes, but only {size - 8} follow it)" + RESAVE_HINT
                )
            header_bytes = fh.read(n)
    except OSError as err:
        raise IngredientError(f"{path}: cannot read ({err.strerror})") from err
    header = _parse_json(path, header_bytes)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + n
    entries = {name: _check_entry(path, name, info) for name, info in header.items()}
    _check_tiling(path, entries, size - data_start)
    return entries, metadata, data_start, raw + header_bytes, state


def _corrupt(path: Path, what: str) -> IngredientError:
    return IngredientError(f"{path}: corrupt safetensors header ({what})" + RESAVE_HINT)


def _nesting(text: bytes) -> int:
    # How deep the JSON nests, without parsing it: drop the strings, keep the brackets.
    brackets = _STRINGS.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(_STEP[c] for c in brackets), default=0)


def _parse_json(path: Path, header_bytes: bytes) -> dict:
    if _nesting(header_bytes) > _MAX_DEPTH:
        raise _corrupt(path, f"JSON nested more than {_MAX_DEPTH} deep")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    # A tensor named twice needs no check of its own: json keeps the last entry, so the
    # first one's bytes are left uncovered (refused below) unless both entries are one.
    try:
        header = json.loads(header_bytes.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError as err:
        raise _corrupt(path, f"not UTF-8 at byte {8 + err.start}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise _corrupt(path, str(err)) from err
    if not isinstance(header, dict):
        raise _corrupt(path, "not a JSON object")
    return header


def _check_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, f"__metadata__ is {_kind(metadata)}, not an object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _corrupt(path, f"__metadata__['{key}'] is {_kind(value)}, not a string")
    return metadata


def _is_index(value: object) -> bool:
    # a JSON integer that fits int64; bool is an int subclass in Python but not in JSON
    return type(value) is int and 0 <= value <= _MAX_INT


def _check_entry(path: Path, name: str, info: object) -> _Entry:
    where = f"tensor '{name}'"
    if not isinstance(info, dict):
        raise _corrupt(path, f"{where} is described by {_kind(info)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _corrupt(path, f"{where} has no {missing[0]}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
        raise _corrupt(
            path, f"{where} has dtype {json.dumps(code)}; known: {', '.join(sorted(_DTYPES))}"
        )
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise _corrupt(
            path,
            f"{where} has shape {_short(shape)}, not a list of sizes from 0 to 2^63 - 1",
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets)):
        raise _corrupt(
            path,
            f"{where} has data_offsets {_short(offsets)}, not two integers from 0 to 2^63 - 1",
        )
    meta = TensorMeta(tuple(shape), _DTYPES[code])
    numel = math.prod(shape)
    if numel == 0 and math.prod(d for d in shape if d) > _MAX_INT:
        raise _corrupt(path, f"{where} has shape {_short(shape)}, too large for any file")
    start, end = offsets
    if end - start != numel * meta.dtype.itemsize:
        raise _corrupt(
            path,
            f"{where} spans bytes {start}..{end} ({end - start} bytes), but dtype {code} and "
            f"shape {list(shape)} take {numel * meta.dtype.itemsize}",
        )
    return _Entry(meta, start, end)


def _check_tiling(path: Path, entries: Mapping[str, _Entry], data_len: int) -> None:
    # The spans must tile the data section: in order, each starts where the last ended.
    at, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != at:
            if previous is None:
                what = f"tensor '{name}' starts at data byte {entry.start}, not 0"
            elif entry.start < at:
                what = f"tensors '{previous}' and '{name}' overlap"
            else:
                what = f"{entry.start - at} bytes between tensors '{previous}' and '{name}'"
            raise _corrupt(path, f"{what}: each tensor's bytes must follow the last's")
        at, previous = entry.end, name
    if at > data_len:
        raise IngredientError(
            f"{path}: truncated file: tensor '{previous}' ends {at - data_len} bytes past the "
            "end of the file" + RESAVE_HINT
        )
    if at < data_len:
        raise _corrupt(path, f"{data_len - at} bytes after the last tensor")


def _kind(value: object) -> str:
    # the JSON name of a parsed value's type, for messages
    kinds = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"))
    kinds += ((list, "an array"), (dict, "an object"))
    if value is None:
        return "null"
    return next(name for t, name in kinds if isinstance(value, t))


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_key(path: Path, key: str | None) -> None:
    """Refuse a wrapper key (``--checkpoint-key``, ``key=``) for a safetensors checkpoint:
    its tensors are the state dict itself, with no key to choose, so the key would be
    silently ignored.

    Example:
        >>> refuse_key(Path("a.safetensors"), None)  # no key: nothing to refuse
    """
    if key is not None:
        raise ConfigError(
            f"{path}: --checkpoint-key '{key}' cannot apply: a safetensors checkpoint holds "
            "only its tensors, under no wrapper key; drop --checkpoint-key (key=) for it"
        )


class SafetensorsSource(TensorSource):
    """One safetensors file, or the shards of one checkpoint, read lazily.

    Names are listed in file order, so reading every tensor in that order reads each
    file once, front to back; the sha256 of the files is then computed from the bytes
    already read, at no extra cost (otherwise :meth:`fingerprint` reads them again).

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> safetensors.torch.save_file({"w": torch.arange(3.0)}, str(p))
        >>> SafetensorsSource([p]).tensor("w")
        tensor([0., 1., 2.])
    """

    def __init__(self, files: Iterable[Path], label: str | None = None):
        self.files = tuple(Path(f) for f in files)
        self.label = label or str(self.files[0])
        self._where: dict[str, tuple[int, _Entry]] = {}
        self._starts: list[int] = []
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        stats: list[os.stat_result] = []
        self.metadata: dict[str, str] = {}
        for index, path in enumerate(self.files):
            entries, metadata, start, raw, state = _read_header(path)
            self.metadata.update(metadata)
            self._starts.append(start)
            self._headers.append(raw)
            self._sizes.append(state.st_size)
            stats.append(state)
            for name, entry in entries.items():
                if name in self._where:
                    raise IngredientError(f"{self.label}: tensor '{name}' is stored in two shards")
                self._where[name] = (index, entry)
        self._order = sorted(
            self._where, key=lambda n: (self._where[n][0], self._where[n][1].start)
        )
        # Every read checks the file is still the one whose header was read (one fstat):
        # a checkpoint rewritten or replaced since would give another file's bytes at
        # this header's offsets, or values the hash does not describe.
        self.file_stats = tuple(stats)
        self._handles: dict[int, object] = {}
        # Hash-while-reading state: the file being hashed and the next byte it expects;
        # nothing to hash when an earlier run remembered the hash of these very files.
        self._known = hashcache.recall(self.files, stats=self.file_stats)
        # hashed on a background thread, while the caller mixes what it read
        self._hasher = ThreadedHash(self._headers[0])
        self._hash_file, self._hash_pos = 0, self._starts[0]
        if self._known is not None:
            self._hash_file = len(self.files)
        self._advance_hash()

    def names(self) -> list[str]:
        return list(self._order)

    def meta(self, name: str) -> TensorMeta:
        return self._where[name][1].meta

    def file_of(self, name: str) -> Path:
        return self.files[self._where[name][0]]

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor; with a uint8 ``scratch`` buffer large enough, read into it.

        A tensor read into ``scratch`` is only valid until the buffer is reused.
        """
        entry = self._where[name][1]
        out = self._read(name, 0, entry.end - entry.start, scratch)
        return out.view(entry.meta.dtype).reshape(entry.meta.shape)

    def tensor_range(
        self, name: str, start: int, count: int, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``start`` to ``start + count`` of one tensor, flattened: only their
        bytes are read (into ``scratch`` when it is large enough)."""
        entry = self._where[name][1]
        size = entry.meta.dtype.itemsize
        count = max(0, min(count, entry.meta.numel - start))
        return self._read(name, start * size, count * size, scratch).view(entry.meta.dtype)

    def _read(
        self, name: str, offset: int, nbytes: int, scratch: torch.Tensor | None
    ) -> torch.Tensor:
        # bytes offset..offset+nbytes of one tensor's data, hashed if they come next in line
        index, entry = self._where[name]
        if scratch is not None and scratch.numel() >= nbytes:
            out = scratch[:nbytes]
        else:
            out = torch.empty(nbytes, dtype=torch.uint8)
        path = self.files[index]
        fh = self._handles.get(index)
        if fh is None:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - kept open for the next reads
            except OSError as err:
                raise IngredientError(f"{path}: cannot read ({err.strerror})") from err
            try:
                check_unchanged(path, os.fstat(fh.fileno()), self.file_stats[index])
            except IngredientError:
                fh.close()
                raise
            self._handles[index] = fh
        where = self._starts[index] + entry.start + offset
        fh.seek(where)
        got = fh.readinto(memoryview(out.numpy())) if nbytes else 0
        # after the read: bytes a rewrite in place changed under us are not trusted
        check_unchanged(path, os.fstat(fh.fileno()), self.file_stats[index])
        if got != nbytes:
            raise IngredientError(
                f"{self.files[index]}: truncated while reading tensor '{name}' (the file "
                "shrank after it was opened?)" + RESAVE_HINT
            )
        if index == self._hash_file and where == self._hash_pos:
            self._hasher.update(memoryview(out.numpy()))
            self._hash_pos += nbytes
            self._advance_hash()
        return out

    def _advance_hash(self) -> None:
        while self._hash_file < len(self.files) and self._hash_pos >= self._sizes[self._hash_file]:
            self._hash_file += 1
            if self._hash_file < len(self.files):
                self._hasher.update(self._headers[self._hash_file])
                self._hash_pos = self._starts[self._hash_file]
            elif self._known is None:
                # Every byte was read, in order: remember the hash now, so that a later
                # run (a recipe tasted again, with no card asked for) does not hash again.
                self._hasher.when_done(self._hashed)

    def _hashed(self, digest: str) -> None:
        self._known = digest
        hashcache.remember(self.files, digest, stats=self.file_stats)

    def fingerprint(self) -> str:
        if self._known is None:
            if self._hash_file >= len(self.files):
                # every byte was read, in order; _hashed may still be on its way
                self._known = self._hasher.hexdigest()
                hashcache.remember(self.files, self._known, stats=self.file_stats)
            else:
                self._known = super().fingerprint()
        return self._known

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def write_safetensors(
    path: Path,
    layout: Mapping[str, TensorMeta],
    tensor_for: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Stream tensors into one safetensors file; memory holds one tensor (or piece) at a time.

    The header is known from ``layout`` before any data is made, so each tensor is
    produced by ``tensor_for(name)`` and written straight away: a tensor of the layout's
    shape and dtype, or an iterable of flat pieces of that dtype that together make it,
    in row-major order (:meth:`modelsoup.soup.Soup.pieces`). The file appears only when
    complete (written under a temporary name, then renamed).

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "soup.safetensors"
        >>> lay = {"w": TensorMeta((2,), torch.float32)}
        >>> write_safetensors(p, lay, lambda name: torch.ones(2))
        >>> SafetensorsSource([p]).tensor("w")
        tensor([1., 1.])
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, meta in layout.items():
        if meta.dtype not in _CODES:
            raise WriteError(
                f"{path}: dtype {meta.dtype} of '{name}' cannot be stored as safetensors"
            )
        if name == "__metadata__":  # the header's own key: the file would not load
            raise WriteError(
                f"{path}: a tensor named '__metadata__' cannot be stored as safetensors, "
                "which reserves the name; write a .pt output, or rename the tensor"
            )
        header[name] = {
            "dtype": _CODES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8 bytes
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, meta in layout.items():
            made = tensor_for(name)
            if isinstance(made, torch.Tensor):
                if tuple(made.shape) != meta.shape or made.dtype != meta.dtype:
                    raise WriteError(
                        f"{path}: tensor '{name}' is {tuple(made.shape)} {made.dtype}, "
                        f"expected {meta.shape} {meta.dtype}"
                    )
                made = [made]
            written = 0
            for piece in made:
                if piece.dtype != meta.dtype:
                    raise WriteError(
                        f"{path}: tensor '{name}' came as {piece.dtype}, not {meta.dtype}"
                    )
                if piece.numel():
                    flat = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    fh.write(flat.numpy().data)
                    written += flat.numel()
                piece = flat = None  # drop it before the next is made: one piece in memory
            made = None
            if written != meta.nbytes:
                raise WriteError(
                    f"{path}: tensor '{name}' came as {written} bytes, expected {meta.nbytes}"
                )
            if on_tensor:
                on_tensor(name)
