"""Hyperparameters from a Trainer's ``training_args.bin``, read without running its pickle.

transformers' ``Trainer`` saves its ``TrainingArguments`` with ``torch.save`` into every
``checkpoint-N/`` folder. That pickle names classes of transformers (the arguments
dataclass, its enums), so it cannot be loaded with ``weights_only=True``, and loading it
in full would import and run whatever it names. Here it is read by a restricted
unpickler: every class the pickle names is replaced by an inert stand-in that only
records the arguments and state it is given, so no object of any real class is built
and no code of the pickle's choosing runs. The learning rate, seed and a few other
plain values are then taken from the recorded state.
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path

_logger = logging.getLogger(__name__)

#: the fields taken, when they are plain numbers, strings or booleans
TRAINING_FIELDS = (
    "learning_rate",
    "seed",
    "weight_decay",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "label_smoothing_factor",
    "optim",
)
#: a training_args.bin is a few kB: anything far larger is not one
_MAX_BYTES = 16 << 20


class _Inert:
    """What the restricted unpickler builds in place of any class: a record, nothing more."""

    _global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Never import: a fresh inert class stands in for whatever was named.
        return type(name, (_Inert,), {"_global": f"{module}.{name}"})

    def persistent_load(self, pid):  # torch's references to tensor storages
        return None


def _plain(value: object) -> object:
    """A plain value, or the value of one of transformers' enums
    (``SchedulerType('linear')`` is ``'linear'``)."""
    if (
        isinstance(value, _Inert)
        and value._global.startswith("transformers.")
        and len(value.args) == 1
    ):
        value = value.args[0]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return _MISSING


_MISSING = object()


def _pickle_bytes(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if len(data) > _MAX_BYTES:
        return []
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names or archive.getinfo(names[0]).file_size > _MAX_BYTES:
                return []  # no arguments in it, or a pickle far too large to be them
            return [archive.read(names[0])]
    return [data]


def read_training_args(path: str | Path) -> dict[str, object]:
    """The plain hyperparameters of a pickled ``TrainingArguments``, or ``{}``.

    Never imports or runs anything the pickle names (see the module docstring). A
    file that is not a readable pickle of such arguments gives ``{}``.

    Example:
        >>> import argparse, tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "training_args.bin"
        >>> torch.save(argparse.Namespace(learning_rate=3e-4, seed=1, output_dir="o"), p)
        >>> read_training_args(p)
        {'learning_rate': 0.0003, 'seed': 1}
    """
    path = Path(path)
    try:
        blobs = _pickle_bytes(path)
    except (OSError, zipfile.BadZipFile, KeyError):
        return {}
    state = None
    for blob in blobs:
        stream = io.BytesIO(blob)
        try:
            # A legacy torch file is several pickles in a row: the arguments are one.
            while stream.tell() < len(blob):
                obj = _RestrictedUnpickler(stream).load()
                found = obj.state if isinstance(obj, _Inert) else obj
                if isinstance(found, dict) and "learning_rate" in found:
                    state = found
                    break
        except Exception as err:  # untrusted bytes: any failure means "no arguments here"
            _logger.debug("%s: not readable as training arguments (%s)", path, err)
    if state is None:
        return {}
    found = {k: _plain(state[k]) for k in TRAINING_FIELDS if k in state}
    return {k: v for k, v in found.items() if v is not _MISSING}
