"""torch pickles (``.pt .pth .bin .ckpt .pth.tar``): safe loading and unwrapping.

Loading always uses ``weights_only=True``: a pickle that asks to import anything
outside torch's safe list is refused, never run. ``argparse.Namespace`` is added to that
list, because timm's training script stores its arguments as one. Zip-format files are memory-mapped
so tensors are paged in only when read.

Which tensors count as the weights (first match wins):

1. a flat dict of tensors is the state dict itself;
2. otherwise the first of these keys holding a dict of tensors: ``state_dict``,
   ``model_state_dict``, ``model``, ``module``, ``state_dict_ema``, ``model_ema``, ``ema``
   (so the raw weights win over EMA weights; pass ``key="state_dict_ema"`` to choose EMA);
3. DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes are removed when every
   name has them, however they nest; Lightning's ``model.`` prefix is removed when the
   checkpoint is a Lightning one (``pytorch-lightning_version`` present) and every name
   has it.

What else the checkpoint carries is kept for later: timm's ``args`` and ``arch`` and
Lightning's ``hyper_parameters`` give the source's ``architecture`` and
``hyperparameters``; a Lightning checkpoint's layout (:class:`LightningLayout`) lets a
soup saved as ``.ckpt`` go back into Lightning (:func:`write_torch`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsoup._util import atomic_file
from modelsoup.errors import IngredientError, SoupWarning
from modelsoup.formats.base import (
    RESAVE_HINT,
    HeldSource,
    architecture_of,
    check_regular,
    check_tensor,
    check_unchanged,
    stat_file,
)

#: harmless classes that common training scripts pickle beside the weights
_SAFE_EXTRAS = [argparse.Namespace]

WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "state_dict_ema",
    "model_ema",
    "ema",
)


def load_pickle(path: Path) -> object:
    """``torch.load`` with weights only, memory-mapped when the file allows it.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "w.pt"
        >>> torch.save({"w": torch.ones(1)}, p)
        >>> load_pickle(p)
        {'w': tensor([1.])}
    """
    check_regular(path)
    _check_not_other_format(path)
    try:
        # torch's own warnings while loading (deprecated storages, pickle protocols, beta
        # layouts) are about torch, not about the checkpoint: what matters is refused below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.serialization.safe_globals(_SAFE_EXTRAS):
                    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as err:
                # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
                if "mmap" not in str(err) and "zipfile" not in str(err):
                    raise
                with torch.serialization.safe_globals(_SAFE_EXTRAS):
                    return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise IngredientError(f"{path}: file not found; check the path") from err
    except pickle.UnpicklingError as err:
        if _UNSAFE.search(str(err)):
            raise IngredientError(
                f"{path}: refused to unpickle: the file asks to import code outside torch's "
                "safe list; re-save it as a plain state dict or as safetensors"
            ) from err
        raise IngredientError(
            f"{path}: is not a torch checkpoint (corrupt, or another format)" + RESAVE_HINT
        ) from err
    except Exception as err:  # any failure to parse untrusted bytes means a bad file
        if "TorchScript" in str(err):
            raise IngredientError(
                f"{path}: is a TorchScript archive (torch.jit.save), not a state dict; save "
                "its weights with torch.save(torch.jit.load(path).state_dict(), 'weights.pt')"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IngredientError(
            f"{path}: corrupt or truncated checkpoint ({first})" + RESAVE_HINT
        ) from err


#: what torch's weights-only unpickler says when a pickle names code outside its safe
#: list (a GLOBAL, or a class or function to call); every other failure is a bad file
_UNSAFE = re.compile(r"GLOBAL |add_safe_globals|unrecognized function")
#: the first line of a Git LFS pointer left where the file should be
_LFS_POINTER = b"version https://git-lfs"


def _check_not_other_format(path: Path) -> None:
    """Name the two files most often found under a pickle's name: a Git LFS pointer (the
    weights were never downloaded) and a safetensors file with a pickle's suffix."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_LFS_POINTER))
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return  # torch.load says what is wrong with the path
    if head == _LFS_POINTER:
        raise IngredientError(
            f"{path}: is a Git LFS pointer, not the weights (they were never downloaded); "
            "run 'git lfs pull' in its repository"
        )
    if head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        raise IngredientError(
            f"{path}: is a safetensors file, not a torch pickle; rename it to .safetensors"
        )


def _nested_state(obj: object, depth: int = 3) -> list:
    # the keys down to the first dict of tensors inside mappings, at most ``depth`` deep
    if not isinstance(obj, Mapping) or depth == 0:
        return []
    for k, v in obj.items():
        if _is_tensor_dict(v):
            return [k]
        inner = _nested_state(v, depth - 1)
        if inner:
            return [k, *inner]
    return []


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: object, key: str | None = None, label: str = "") -> tuple[dict, str, str | None]:
    """Find the state dict inside a checkpoint object; return it, how it was found, and
    the wrapper key it was under (``None`` for a bare state dict).

    Example:
        >>> import torch
        >>> sd, note, key = unwrap({"epoch": 3, "state_dict": {"module.w": torch.ones(1)}})
        >>> list(sd), note, key
        (['w'], "key 'state_dict', prefix 'module.' removed", 'state_dict')
    """
    notes = []
    found = None
    if not isinstance(obj, Mapping):
        raise IngredientError(f"{label}: not a state dict (found {type(obj).__name__})")
    if key is not None:
        if key not in obj or not _is_tensor_dict(obj[key]):
            raise IngredientError(
                f"{label}: no state dict under key '{key}'; keys are {sorted(map(str, obj))[:10]}"
            )
        state, notes, found = obj[key], [f"key '{key}'"], key
    elif all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        state = obj
    else:
        found = next((k for k in WRAPPER_KEYS if _is_tensor_dict(obj.get(k))), None)
        if found is None:
            nested = [str(k) for k, v in obj.items() if _is_tensor_dict(v)]
            if nested and _is_tensor_dict(obj):
                # {'net': state_dict, 'acc': tensor(0.9)}: the loose tensors are not
                # the model, and taking them would soup one scalar
                loose = [str(k) for k, v in obj.items() if isinstance(v, torch.Tensor)]
                raise IngredientError(
                    f"{label}: the weights look to be under key {nested[0]!r} (beside "
                    f"loose tensors {', '.join(map(repr, loose[:3]))}); pass "
                    f"--checkpoint-key {nested[0]} (checkpoint_key in a config or in Python)"
                )
            if _is_tensor_dict(obj):
                state = obj  # a state dict with some non-tensor extras
            else:
                deeper = _nested_state(obj)
                if len(deeper) == 1:
                    raise IngredientError(
                        f"{label}: the weights look to be under key {deeper[0]!r}; pass "
                        f"--checkpoint-key {deeper[0]} (checkpoint_key in a config or in Python)"
                    )
                if deeper:
                    # {'checkpoint': {'model': state_dict}}: a key reads one level only
                    where = "".join(f"[{k!r}]" for k in deeper)
                    raise IngredientError(
                        f"{label}: the weights look to be at {where}, deeper than a "
                        "checkpoint key reaches; re-save them as a state dict: "
                        f"torch.save(torch.load(path){where}, 'weights.pt')"
                    )
                raise IngredientError(
                    f"{label}: no tensors found; expected a state dict or one under "
                    f"{', '.join(WRAPPER_KEYS)}"
                )
        else:
            state, notes = obj[found], [f"key '{found}'"]
    extra = [
        str(k)
        for k, v in state.items()
        if str(k).endswith("_extra_state") and not isinstance(v, torch.Tensor)
    ]
    if extra:
        # a module's get_extra_state(): not weights, so not souped; the soup then lacks
        # a key that load_state_dict(strict=True) asks for
        warnings.warn(
            f"{label}: {extra[0]!r} is a module's extra state (not a tensor), which is not "
            "in the soup: load the soup with load_state_dict(..., strict=False) or set "
            "that state again after loading",
            SoupWarning,
            stacklevel=2,
        )
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for name, t in state.items():
        check_tensor(name, t, label)
    # DDP's and torch.compile's wrappers nest in any order (torch.compile(DDP(model))
    # saves '_orig_mod.module.'), also inside a Lightning module's 'model.' (a
    # LightningModule whose model was compiled saves 'model._orig_mod.'): strip them
    # until no name-wide one is left
    state = _strip_wrappers(state, notes)
    if "pytorch-lightning_version" in obj and _shared_prefix(state, ("model.",)):
        state = {k[len("model.") :]: v for k, v in state.items()}
        notes.append("prefix 'model.' removed")
        state = _strip_wrappers(state, notes)
    return state, ", ".join(notes), found


def _strip_wrappers(state: dict, notes: list[str]) -> dict:
    while state and (found := _shared_prefix(state, ("module.", "_orig_mod."))):
        state = {k[len(found) :]: v for k, v in state.items()}
        notes.append(f"prefix '{found}' removed")
    return state


def _shared_prefix(state: Mapping[str, object], prefixes: tuple[str, ...]) -> str | None:
    """The first of ``prefixes`` that every name of ``state`` starts with, if any."""
    return next((p for p in prefixes if state and all(k.startswith(p) for k in state)), None)


#: what a Lightning checkpoint needs besides its weights to load with
#: ``LightningModule.load_from_checkpoint`` (training state such as optimizer states,
#: loops and callbacks is left out: a soup was not trained)
LIGHTNING_KEYS = (
    "pytorch-lightning_version",
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "epoch",
    "global_step",
)


@dataclass(frozen=True)
class LightningLayout:
    """How a Lightning checkpoint wraps its weights: the ``state_dict`` key, the name
    prefix the reader removed (``model.``), and the entries Lightning reads on load.

    Example:
        >>> import torch
        >>> layout = LightningLayout("model.", {"pytorch-lightning_version": "2.4.0"})
        >>> sorted(layout.wrap({"w": torch.ones(1)}))
        ['pytorch-lightning_version', 'state_dict']
        >>> list(layout.wrap({"w": torch.ones(1)})["state_dict"])
        ['model.w']
    """

    prefix: str
    extras: Mapping[str, object] = field(default_factory=dict)

    def wrap(self, state: Mapping[str, torch.Tensor]) -> dict:
        """The checkpoint dict to save: the extras, and the weights under ``state_dict``
        with the prefix restored."""
        return {**self.extras, "state_dict": {self.prefix + k: v for k, v in state.items()}}


def _scalars(mapping: object) -> dict[str, object]:
    items = vars(mapping) if isinstance(mapping, argparse.Namespace) else mapping
    if not isinstance(items, Mapping):
        return {}
    return {
        str(k): v
        for k, v in items.items()
        if isinstance(v, bool | int | float | str) and isinstance(k, str)
    }


def _described(obj: Mapping, state: Mapping) -> tuple[dict, dict, LightningLayout | None]:
    """Architecture, hyperparameters and Lightning layout of an unpickled checkpoint."""
    hyper = _scalars(obj.get("args"))  # timm's train.py: its argparse arguments
    arch = architecture_of(hyper)
    if isinstance(obj.get("arch"), str):
        arch.setdefault("arch", obj["arch"])
    lightning = None
    if "pytorch-lightning_version" in obj:
        hyper = _scalars(obj.get("hyper_parameters"))
        arch = architecture_of(hyper)
        raw = obj.get("state_dict")
        prefix = ""
        if isinstance(raw, Mapping) and raw and state:  # what unwrap removed, put back on save
            first_raw, first = next(iter(raw)), next(iter(state))
            if isinstance(first_raw, str) and first_raw.endswith(first):
                found = first_raw[: len(first_raw) - len(first)]
                prefix = found if all(f"{found}{k}" in raw for k in state) else ""
        lightning = LightningLayout(prefix, {k: obj[k] for k in LIGHTNING_KEYS if k in obj})
    return arch, hyper, lightning


class TorchSource(HeldSource):
    """A torch pickle, or the ``pytorch_model-*.bin`` shards of one checkpoint.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "w.pt"
        >>> torch.save({"state_dict": {"w": torch.ones(2)}}, p)
        >>> src = TorchSource([p])
        >>> src.names(), src.note
        (['w'], "key 'state_dict'")
    """

    def __init__(self, files: list[Path], label: str | None = None, key: str | None = None):
        self.files = tuple(Path(f) for f in files)
        self.label = label or str(self.files[0])
        self.key_given = key is not None
        self._tensors: dict[str, torch.Tensor] = {}
        self._shard: dict[str, int] = {}
        #: set when the (first) file is a Lightning checkpoint
        self.lightning: LightningLayout | None = None
        notes = []
        stats = []
        for index, path in enumerate(self.files):
            # The tensors are memory-mapped from the file torch opened: its state before
            # and after loading names that file, and the hash must be of it.
            before = stat_file(path)
            obj = load_pickle(path)
            stats.append(stat_file(path))
            check_unchanged(path, stats[-1], before)
            state, note, self.read_key = unwrap(obj, key, str(path))
            if not notes:
                self.architecture, self.hyperparameters, self.lightning = _described(obj, state)
            notes.append(note)
            for name, t in state.items():
                if name in self._tensors:
                    raise IngredientError(f"{self.label}: tensor '{name}' is stored in two shards")
                self._tensors[name] = t
                self._shard[name] = index
        self.note = notes[0] if notes else ""
        self.file_stats = tuple(stats)

    def file_of(self, name: str) -> Path:
        return self.files[self._shard[name]]

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        # The tensors are pages of the file torch memory-mapped: a training job that
        # re-saves it in place changes them under us. Each read checks the file first
        # (one stat; copying the pages to check again after the read cost 1.14-1.25x,
        # bench/README.md), so only a rewrite in the moment of the read itself is missed.
        index = self._shard[name]
        path = self.files[index]
        check_unchanged(path, stat_file(path), self.file_stats[index])
        return self._tensors[name]


def write_torch(
    path: Path, state: Mapping[str, torch.Tensor], lightning: LightningLayout | None = None
) -> None:
    """Save a plain state dict with ``torch.save``, atomically; with ``lightning``, in
    Lightning's layout (weights under ``state_dict`` with their prefix restored, the
    version and hyperparameters beside them), so ``load_from_checkpoint`` reads it.

    Unlike safetensors output this needs the whole soup in memory at once.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "soup.pt"
        >>> write_torch(p, {"w": torch.zeros(1)})
        >>> torch.load(p, weights_only=True)
        {'w': tensor([0.])}
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(lightning.wrap(state) if lightning is not None else dict(state), fh)
        except RuntimeError as err:
            # torch.save reports a failed write (a full disk) as a RuntimeError; given a
            # file object, the OSError behind it is kept as the context: raise that.
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
