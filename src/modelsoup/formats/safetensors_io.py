"""safetensors: a lazy reader that reads one tensor with one ``readinto``, and a streaming writer.

We parse the small JSON header ourselves and read tensor bytes with plain file reads
rather than a memory map, so the pages of a multi-GB ingredient never pile up in the
process's resident memory: reading a tensor costs exactly that tensor.
Every offset in the header is checked before it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from modelsoup._util import atomic_file
from modelsoup.errors import IngredientError, WriteError
from modelsoup.formats import hashcache
from modelsoup.formats.base import RESAVE_HINT, TensorMeta, TensorSource

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

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


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

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> p = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, str(p))
        >>> entries, meta, start, raw = read_header_bytes(p)
        >>> entries["w"].meta.shape, len(raw) == start
        ((2,), True)
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise IngredientError(
                    f"{path}: truncated safetensors file (no header)" + RESAVE_HINT
                )
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise IngredientError(
                    f"{path}: corrupt or truncated safetensors header" + RESAVE_HINT
                )
            header_bytes = fh.read(n)
    except OSError as err:
        raise IngredientError(f"{path}: cannot read ({err.strerror})") from err
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IngredientError(f"{path}: corrupt safetensors header ({err})" + RESAVE_HINT) from err
    if not isinstance(header, dict):
        raise IngredientError(
            f"{path}: corrupt safetensors header (not a JSON object)" + RESAVE_HINT
        )
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise IngredientError(
                f"{path}: corrupt header entry for tensor '{name}'" + RESAVE_HINT
            ) from err
        meta = TensorMeta(shape, dtype)
        if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != meta.nbytes:
            raise IngredientError(f"{path}: corrupt offsets for tensor '{name}'" + RESAVE_HINT)
        if end > data_len:
            raise IngredientError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + end} "
                f"but the file has {size}" + RESAVE_HINT
            )
        entries[name] = _Entry(meta, start, end)
    return entries, metadata, data_start, raw + header_bytes


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
        self.metadata: dict[str, str] = {}
        for index, path in enumerate(self.files):
            entries, metadata, start, raw = read_header_bytes(path)
            self.metadata.update(metadata)
            self._starts.append(start)
            self._headers.append(raw)
            self._sizes.append(path.stat().st_size)
            for name, entry in entries.items():
                if name in self._where:
                    raise IngredientError(f"{self.label}: tensor '{name}' is stored in two shards")
                self._where[name] = (index, entry)
        self._order = sorted(
            self._where, key=lambda n: (self._where[n][0], self._where[n][1].start)
        )
        self._handles: dict[int, object] = {}
        # Hash-while-reading state: the file being hashed and the next byte it expects;
        # nothing to hash when an earlier run remembered the hash of these very files.
        self._known = hashcache.recall(self.files)
        self._hasher = hashlib.sha256(self._headers[0])
        self._hash_file, self._hash_pos = 0, self._starts[0]
        if self._known is not None:
            self._hash_file = len(self.files)
        self._advance_hash()

    def names(self) -> list[str]:
        return list(self._order)

    def meta(self, name: str) -> TensorMeta:
        return self._where[name][1].meta

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
        fh = self._handles.get(index)
        if fh is None:
            fh = self._handles[index] = open(self.files[index], "rb")  # noqa: SIM115
        where = self._starts[index] + entry.start + offset
        fh.seek(where)
        got = fh.readinto(memoryview(out.numpy())) if nbytes else 0
        if got != nbytes:
            raise IngredientError(f"{self.files[index]}: truncated while reading tensor '{name}'")
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

    def fingerprint(self) -> str:
        if self._known is None:
            if self._hash_file >= len(self.files):
                self._known = self._hasher.hexdigest()  # every byte was read, in order
                hashcache.remember(self.files, self._known)
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
