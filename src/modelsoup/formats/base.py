"""The reader interface every checkpoint format implements, and the in-memory reader."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from modelsoup.errors import ConfigError, IngredientError
from modelsoup.formats import hashcache


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor, known without reading its data.

    Example:
        >>> import torch
        >>> TensorMeta((3, 4), torch.float16).nbytes
        24
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


#: what an error about a damaged checkpoint file tells the user to do
RESAVE_HINT = "; re-copy or re-save the checkpoint"

#: keys of a checkpoint's own description (an HF ``config.json``, timm's ``args``,
#: Lightning's ``hyper_parameters``) that say which architecture its weights are for;
#: two ingredients that differ in one of these are not fine-tunes of one model
ARCHITECTURE_KEYS = (
    "architectures",
    "model_type",
    "model",
    "arch",
    "architecture",
    "backbone",
    "model_name",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "d_model",
    "num_layers",
    "num_heads",
    "hidden_dim",
    "embed_dim",
    "depth",
    "num_classes",
    "num_labels",
    "in_chans",
    # what the same weights compute: a fine-tune never changes these
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "position_embedding_type",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    # which class each row of a classifier head scores
    "id2label",
    # whether the LM head is the embedding matrix: a model built from a tied config
    # keeps one of two differing stored tensors
    "tie_word_embeddings",
)


def architecture_of(described: Mapping) -> dict[str, object]:
    """The architecture keys of a checkpoint's description, plain values only.

    Example:
        >>> architecture_of({"model_type": "bert", "hidden_size": 384, "lr": 1e-4})
        {'model_type': 'bert', 'hidden_size': 384}
    """
    found = {}
    for key in ARCHITECTURE_KEYS:
        value = described.get(key)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = list(value)
        elif isinstance(value, Mapping) and key.startswith("rope_"):
            value = json.dumps(value, sort_keys=True, default=str)
        elif isinstance(value, Mapping) and key == "id2label":
            value = class_order(value)
            if value is None:
                continue
        elif not isinstance(value, bool | int | float | str):
            continue
        found[key] = value
    return found


def class_order(id2label: Mapping) -> str | None:
    """An HF ``id2label`` mapping as a JSON list of the labels in class-id order, or
    ``None`` if its ids are not the whole numbers 0 to n-1.

    Example:
        >>> class_order({"1": "pos", "0": "neg"})
        '["neg", "pos"]'
    """
    try:
        ids = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if [i for i, _ in ids] != list(range(len(ids))):
        return None
    return json.dumps([label for _, label in ids])


def stat_file(path: Path) -> os.stat_result:
    """``os.stat`` of a checkpoint file, an :class:`IngredientError` naming it if it is
    gone or unreadable.

    Example:
        >>> try:
        ...     stat_file(Path("/nonexistent/a.pt"))
        ... except IngredientError as err:
        ...     print(err)
        /nonexistent/a.pt: file not found; check the path
    """
    try:
        return os.stat(path)
    except FileNotFoundError as err:
        raise IngredientError(f"{path}: file not found; check the path") from err
    except OSError as err:
        raise IngredientError(f"{path}: cannot read ({err.strerror})") from err


def check_regular(path: Path) -> None:
    """Refuse a path that is not a regular file (a named pipe, socket or device) before
    it is opened: opening a pipe waits for a writer, for ever. A missing path is left to
    the reader, which names it.

    Example:
        >>> try:
        ...     check_regular(Path("/dev/null"))
        ... except IngredientError as err:
        ...     print(str(err).split(" (")[0])
        /dev/null: is not a regular file
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise IngredientError(
            f"{path}: is not a regular file (a pipe, socket or device); give the "
            "checkpoint file itself"
        )


def _state(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def check_unchanged(path: Path, now: os.stat_result, then: os.stat_result) -> None:
    """Refuse a file whose state on disk (size, modification and change times, inode,
    device) is not what it was when it was opened: it was rewritten or replaced (a
    training job still saving it), so what was read would mix two files.

    One ``os.fstat`` (or ``os.stat``) per check: cheap next to any read.

    Example:
        >>> import os, tempfile
        >>> p = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"1234")
        >>> then = os.stat(p)
        >>> check_unchanged(p, os.stat(p), then)
        >>> _ = p.write_bytes(b"12345")
        >>> try:
        ...     check_unchanged(p, os.stat(p), then)
        ... except IngredientError as err:
        ...     print(str(err).split(": ", 1)[1][:42])
        changed while modelsoup was reading it (re
    """
    if _state(now) != _state(then):
        raise IngredientError(
            f"{path}: changed while modelsoup was reading it (rewritten by a running training "
            "job?); run again once it is complete"
        )


def hash_files(files: Sequence[Path], stats: Sequence[os.stat_result] | None = None) -> str:
    """sha256 of files read in order, remembered across runs while they are unchanged
    (:mod:`.hashcache`).

    With ``stats`` (each file's state when its tensors were read), the files must still
    be in that state, before and after hashing (:func:`check_unchanged`), so the hash is
    of what was read. Either way a hash is remembered under the state of the bytes it
    was computed from.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(b"abc")
        >>> hash_files([p])[:12]
        'ba7816bf8f01'
    """
    files = list(files)
    if stats is not None:
        for path, then in zip(files, stats, strict=True):
            check_unchanged(path, stat_file(path), then)
    known = hashcache.recall(files, stats=stats)
    if known is not None:
        return known
    digest = hashlib.sha256()
    seen = []
    for i, path in enumerate(files):
        with open(path, "rb") as fh:
            then = os.fstat(fh.fileno())
            if stats is not None:
                check_unchanged(path, then, stats[i])
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
            check_unchanged(path, os.fstat(fh.fileno()), then)
        seen.append(then)
    hashcache.remember(files, digest.hexdigest(), stats=seen)
    return digest.hexdigest()


class _HashWorker:
    """Background threads that hash, each in the order given, bytes copied into a small
    ring of slots (``SLOT`` bytes, ``SLOTS`` per thread: memory does not grow with the
    tensors). One hash always goes to the same thread, so its bytes stay in order;
    different hashes (the K checkpoints of one average) go to different threads, so on
    a machine with spare cores they are computed side by side."""

    SLOT = 8 << 20
    SLOTS = 4

    def __init__(self, lanes: int | None = None) -> None:
        self.pid = os.getpid()
        if lanes is None:
            lanes = hash_threads()
        self.lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelsoup-sha256")
            for _ in range(lanes)
        ]
        self.slots: list[bytearray | None] = [None] * (self.SLOTS * lanes)
        self.busy: list[Future | None] = [None] * len(self.slots)
        self.next = 0
        self.assigned = 0
        self.lock = threading.Lock()

    def lane(self) -> int:
        """The thread a new hash goes to (in turn)."""
        with self.lock:
            self.assigned += 1
            return self.assigned % max(1, len(self.lanes))

    def feed(self, digest, lane: int, data: memoryview) -> Future | None:
        if not self.lanes:
            digest.update(data)
            return None
        last = None
        with self.lock:
            for start in range(0, len(data), self.SLOT):
                part = data[start : start + self.SLOT]
                i, self.next = self.next, (self.next + 1) % len(self.slots)
                if self.busy[i] is not None:
                    self.busy[i].result()  # its thread is done with this slot
                if self.slots[i] is None:
                    self.slots[i] = bytearray(self.SLOT)
                slot = memoryview(self.slots[i])[: len(part)]
                slot[:] = part
                last = self.busy[i] = self.lanes[lane].submit(digest.update, slot)
        return last


def hash_threads() -> int:
    """How many background threads hash the inputs on first contact (0: inline).

    ``MODELSOUP_HASH_THREADS`` sets it; by default one fewer than the usable cores, at
    most four, and none below four cores: one core is the mixer's, and on a busy 2-core
    machine a hash thread slowed first contact by 10-50% (bench/README.md).

    Example:
        >>> import os
        >>> saved = os.environ.pop("MODELSOUP_HASH_THREADS", None)
        >>> os.environ["MODELSOUP_HASH_THREADS"] = "1"
        >>> hash_threads()
        1
        >>> _ = os.environ.pop("MODELSOUP_HASH_THREADS")
        >>> if saved is not None:
        ...     os.environ["MODELSOUP_HASH_THREADS"] = saved
    """
    setting = os.environ.get("MODELSOUP_HASH_THREADS")
    if setting is not None and setting.strip():
        try:
            threads = int(setting)
        except ValueError:
            threads = -1
        if not 0 <= threads <= 64:
            raise ConfigError(
                f"MODELSOUP_HASH_THREADS={setting!r}: give a whole number from 0 (hash on the "
                "mixing thread) to 64"
            )
        return threads
    cores = _usable_cpus()
    return min(4, cores - 1) if cores >= 4 else 0


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


_worker: _HashWorker | None = None
_worker_lock = threading.Lock()


def _hash_worker() -> _HashWorker:
    global _worker
    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid():  # none yet, or a forked child
            _worker = _HashWorker()
        return _worker


class ThreadedHash:
    """sha256 of bytes fed in order, computed on a background thread while the caller
    goes on reading and mixing (``hashlib`` releases the GIL on large buffers).

    :meth:`update` copies the bytes (so the caller may reuse its buffer at once) into one
    of a few 8 MiB slots shared by every hash; :meth:`hexdigest` waits for the rest.
    Hashes are spread over up to four threads (one fewer than the usable cores, with four
    or more; with fewer, hashed inline).

    Example:
        >>> h = ThreadedHash(b"a")
        >>> h.update(b"bc")
        >>> h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
        True
    """

    def __init__(self, data: bytes = b""):
        self._digest = hashlib.sha256(data)
        self._last: Future | None = None
        self._lane = _hash_worker().lane()

    def update(self, data) -> None:
        last = _hash_worker().feed(self._digest, self._lane, memoryview(data).cast("B"))
        if last is not None:
            self._last = last

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
            self._last = None
        return self._digest.hexdigest()

    def when_done(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(hexdigest)`` once every byte fed so far is hashed: now when
        hashing is inline or already caught up, else on the hashing thread, so the caller
        does not wait for it.

        Example:
            >>> h = ThreadedHash(b"abc")
            >>> h.when_done(lambda digest: print(digest[:8]))
            ba7816bf
        """
        last = self._last
        if last is None or last.done():
            callback(self.hexdigest())
        else:
            last.add_done_callback(lambda _: callback(self._digest.hexdigest()))


def check_tensor(name: object, t: torch.Tensor, label: str = "") -> None:
    """Refuse a state-dict entry that is not a named, dense, real tensor holding data.

    A pickle may hold anything torch can rebuild, not only what a soup can average:
    a meta tensor has no values (it would average as zeros), sparse and nested tensors
    have no fixed element layout, complex and quantized values are not averaged here, nor
    raw bits (``torch.bits8``, ...) or packed sub-byte values (``torch.uint4``, ...).

    Example:
        >>> import torch
        >>> check_tensor("w", torch.ones(2))
        >>> try:
        ...     check_tensor("w", torch.empty(2, device="meta"), "a.pt")
        ... except IngredientError as err:
        ...     print(str(err)[:44])
        a.pt: tensor 'w' is a meta tensor: it has no
    """
    if not isinstance(name, str):
        raise IngredientError(
            f"{label}: the state dict has the key {name!r} ({type(name).__name__}), not a "
            "tensor name; re-save it as a dict of name -> tensor (model.state_dict())"
        )
    where = f"{label}: tensor '{name}'"
    if t.is_meta:
        raise IngredientError(
            f"{where} is a meta tensor: it has no values (saved from a model built on the "
            "meta device, e.g. with init_empty_weights, before its weights were loaded); "
            "re-save it after loading the real weights"
        )
    if t.is_nested:
        raise IngredientError(
            f"{where} is a nested tensor, which has no fixed shape to average; "
            "re-save it as ordinary tensors"
        )
    if t.layout != torch.strided:
        raise IngredientError(
            f"{where} has the {str(t.layout).removeprefix('torch.')} layout; soups average "
            "dense tensors: re-save it with .to_dense()"
        )
    if str(t.dtype).removeprefix("torch.") in _NO_ARITHMETIC:
        raise IngredientError(
            f"{where} is {str(t.dtype).removeprefix('torch.')}: raw bits or packed values, "
            "with no arithmetic in torch; re-save it as uint8 (tensor.view(torch.uint8)) "
            "or leave it out of the state dict"
        )
    if t.is_quantized or t.is_complex():
        raise IngredientError(
            f"{where} is {str(t.dtype).removeprefix('torch.')}, which modelsoup does not "
            "average; re-save the checkpoint in a real floating dtype (e.g. float32)"
        )


#: torch dtypes of raw bits or packed sub-byte values: torch has no arithmetic (nor any
#: conversion) for them, so a tensor of one can be neither averaged nor copied
_NO_ARITHMETIC = frozenset(
    ["bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float4_e2m1fn_x2"]
    + [f"{kind}{bits}" for kind in ("int", "uint") for bits in range(1, 8)]
)


class TensorSource:
    """A checkpoint opened for lazy, one-tensor-at-a-time reading.

    Subclasses fill ``label`` (a name for messages), ``files`` (what is on disk, for
    hashing and for refusing to overwrite inputs) and implement ``names``, ``meta``
    and ``tensor``.

    Example:
        >>> import torch
        >>> src = DictSource({"b": torch.zeros(1), "a": torch.ones(1)})
        >>> src.names()
        ['b', 'a']
    """

    label: str = "<checkpoint>"
    files: tuple[Path, ...] = ()
    #: folders read as a whole beyond the ingredient's own path (an adapter's base
    #: folder): no output may go in them either
    folders: tuple[Path, ...] = ()
    #: which wrapper key or prefix handling produced the state dict, for messages
    note: str = ""
    #: the key of a pickled checkpoint the weights were read from (``state_dict_ema``):
    #: one file holds several models, so the file's hash alone does not name them
    read_key: str | None = None
    #: whether that key was given (``--checkpoint-key``), not found by looking
    key_given: bool = False
    #: what the checkpoint says about its architecture (:func:`architecture_of`)
    architecture: Mapping[str, object] = MappingProxyType({})
    #: training hyperparameters the checkpoint carries (timm's args, Lightning's)
    hyperparameters: Mapping[str, object] = MappingProxyType({})
    #: each file's ``os.stat`` when it was opened (readers of files set it): the hash
    #: must be of those files, and a file found in another state is refused
    file_stats: tuple[os.stat_result, ...] | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def meta(self, name: str) -> TensorMeta:
        raise NotImplementedError

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name`` (readers of several shards override this).

        Example:
            >>> from pathlib import Path
            >>> src = TensorSource(); src.files = (Path("a.pt"),)
            >>> src.file_of("w")
            PosixPath('a.pt')
        """
        return self.files[0]

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor. Readers that copy from disk may read into a uint8 ``scratch``
        buffer (the result is then valid only until the buffer is reused)."""
        raise NotImplementedError

    def tensor_range(
        self, name: str, start: int, count: int, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``start`` to ``start + count`` of one tensor, flattened (row-major).

        Readers that copy from disk read only those bytes (into ``scratch`` when given);
        this default slices :meth:`tensor`, which costs nothing for memory-mapped tensors.

        Example:
            >>> import torch
            >>> DictSource({"w": torch.arange(6.0).reshape(2, 3)}).tensor_range("w", 2, 3)
            tensor([2., 3., 4.])
        """
        return _flat(self, name, self.tensor(name))[start : start + count]

    def range_as(self, name: str, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`tensor_range` in ``dtype``, for arithmetic in a wider dtype than the one
        stored. A source whose values are computed (a LoRA adapter's base plus its
        change) computes them in ``dtype``, not rounded to the stored dtype first.
        The result is the caller's own (never a view of a tensor the source holds), so
        it may be changed in place.

        Example:
            >>> import torch
            >>> source = DictSource({"w": torch.ones(3, dtype=torch.bfloat16)})
            >>> source.range_as("w", 1, 2, torch.float64)
            tensor([1., 1.], dtype=torch.float64)
        """
        return self.tensor_range(name, start, count).to(dtype, copy=True)

    def fingerprint(self) -> str:
        """sha256 of the files on disk, in order (or of the tensors for in-memory sources);
        remembered across runs while the files are unchanged (:mod:`.hashcache`)."""
        return hash_files(self.files, self.file_stats)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles; reading again reopens them."""


class HeldSource(TensorSource):
    """A source whose tensors are all in memory already, in ``self._tensors`` (name order
    is the checkpoint's): an in-memory state dict, or a torch pickle once loaded.

    Example:
        >>> import torch
        >>> DictSource({"w": torch.zeros(2, 3)}).meta("w").shape
        (2, 3)
    """

    _tensors: dict[str, torch.Tensor]

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)


class DictSource(HeldSource):
    """An in-memory state dict or ``nn.Module`` seen as a checkpoint.

    Non-tensor entries are ignored. Tensors are detached and moved to CPU lazily.

    Example:
        >>> import torch
        >>> src = DictSource(torch.nn.Linear(2, 1), label="linear")
        >>> src.names()
        ['weight', 'bias']
    """

    def __init__(self, obj: Mapping[str, torch.Tensor] | torch.nn.Module, label: str = "<memory>"):
        state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for name, t in self._tensors.items():
            check_tensor(name, t, label)
        self.label = label
        self.files = ()
        # The soup is mixed lazily, from these very tensors: one changed in place later
        # (training goes on, load_state_dict) would give a soup of neither state, under
        # the sha256 of the first. torch counts in-place changes per tensor.
        self._versions = {name: _version(t) for name, t in self._tensors.items()}

    def check_unchanged(self, name: str) -> None:
        """Refuse a tensor changed in place since this source was made (the soup would
        mix values it was not made from).

        Example:
            >>> import torch
            >>> w = torch.zeros(2)
            >>> src = DictSource({"w": w}, label="model")
            >>> _ = w.add_(1)
            >>> try:
            ...     src.tensor("w")
            ... except IngredientError as err:
            ...     print(str(err)[:47])
            model: tensor 'w' was changed in place after th
        """
        if _version(self._tensors[name]) != self._versions[name]:
            raise IngredientError(
                f"{self.label}: tensor '{name}' was changed in place after the soup was "
                "made from it (training went on, or load_state_dict); make the soup again "
                "from the model as it is now, or give it copies (copy.deepcopy(model))"
            )

    def storages(self) -> set[int]:
        """Addresses of the memory that holds these tensors, to catch a destination that
        is the same memory (:func:`modelsoup.ingredients.check_not_sharing`).

        Example:
            >>> import torch
            >>> w = torch.zeros(2)
            >>> DictSource({"w": w}).storages() == {w.untyped_storage().data_ptr()}
            True
        """
        return {p for t in self._tensors.values() if (p := storage_of(t))}

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        self.check_unchanged(name)
        return self._tensors[name].detach().cpu()

    def tensor_range(
        self, name: str, start: int, count: int, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.check_unchanged(name)
        # slice before moving, so a tensor on a GPU is copied one piece at a time
        return _flat(self, name, self._tensors[name].detach())[start : start + count].cpu()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, t in self._tensors.items():
            self.check_unchanged(name)
            t = t.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()


def _version(t: torch.Tensor) -> int | None:
    # tensors made under torch.inference_mode keep no count (and cannot be changed in
    # place outside it)
    try:
        return t._version
    except RuntimeError:
        return None


def storage_of(t: torch.Tensor) -> int:
    """The address of the memory a tensor's values live in (0 when it has none of its own,
    as for a meta tensor): two tensors with the same address share their values.

    Example:
        >>> import torch
        >>> w = torch.zeros(4)
        >>> storage_of(w[2:]) == storage_of(w)
        True
    """
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _flat(source: TensorSource, name: str, t: torch.Tensor) -> torch.Tensor:
    # A contiguous tensor flattens for free. A strided one (a view that was pickled as
    # such) is copied once and kept until another tensor is asked for, so reading it in
    # pieces does not copy it once per piece.
    if t.is_contiguous():
        return t.view(-1)
    # The copy is of these values: the same name read again after an in-place change, or
    # as another tensor, is copied anew.
    key = (name, storage_of(t), _version(t))
    kept = getattr(source, "_flat_copy", None)
    if kept is None or kept[0] != key:
        kept = source._flat_copy = (key, t.reshape(-1))
    return kept[1]
