"""The one table from a path to its reader and writer.

Adding a format means adding its reader/writer module and one row here: nothing
above :mod:`modelsoup.formats` looks at suffixes.

Example:
    >>> from pathlib import Path
    >>> output_format(Path("soup.safetensors")), output_format(Path("soup/"))
    ('safetensors', 'folder')
"""

from __future__ import annotations

import warnings
from pathlib import Path

from modelsoup.errors import ConfigError, IngredientError, SoupWarning
from modelsoup.formats.base import TensorSource
from modelsoup.formats.hf_folder import is_model_folder, open_folder, weight_files
from modelsoup.formats.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSource
from modelsoup.formats.safetensors_io import (
    SAFETENSORS_SUFFIXES,
    SafetensorsSource,
    is_safetensors_name,
    refuse_key,
)
from modelsoup.formats.torch_pickle import TorchSource

#: torch pickles; ``.pth.tar`` is what timm's training script saves
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
CHECKPOINT_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)
#: the file suffix each output format is saved with (folders have none)
FORMAT_SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt", "folder": ""}

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "FORMAT_SUFFIXES",
    "PICKLE_SUFFIXES",
    "checkpoint_stem",
    "is_adapter_folder",
    "is_checkpoint_name",
    "is_model_folder",
    "is_pickle_name",
    "is_safetensors_name",
    "open_source",
    "output_format",
]


def is_pickle_name(path: Path) -> bool:
    """Whether a file name says torch pickle (``.pt .pth .bin .ckpt .pth.tar``, in any
    case, as every suffix here: ``MODEL.PT`` is a pickle too).

    Example:
        >>> is_pickle_name(Path("model_best.pth.tar")), is_pickle_name(Path("A.PT"))
        (True, True)
    """
    return path.name.lower().endswith(PICKLE_SUFFIXES)


def is_checkpoint_name(path: Path) -> bool:
    """Whether a file name is one of the checkpoint formats we read.

    Example:
        >>> is_checkpoint_name(Path("a.safetensors")), is_checkpoint_name(Path("a.json"))
        (True, False)
    """
    return path.name.lower().endswith(CHECKPOINT_SUFFIXES)


def checkpoint_stem(path: Path) -> str:
    """A checkpoint file's name without its format suffix: the default label.

    Example:
        >>> checkpoint_stem(Path("runs/checkpoint-9.pth.tar")), checkpoint_stem(Path("a.pt"))
        ('checkpoint-9', 'a')
    """
    for suffix in CHECKPOINT_SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json`` with
    ``adapter_model.safetensors`` or ``.bin``) rather than a whole model: it is read as
    the model it stands for, over its base
    (:class:`~modelsoup.formats.peft_adapter.AdapterSource`).

    A folder that also holds a full model's weights (``model.safetensors``, ...) is a
    model folder: its full weights are what is read.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "adapter_config.json").write_text("{}")
        >>> _ = (d / "adapter_model.safetensors").write_bytes(b"")
        >>> is_adapter_folder(d), is_adapter_folder(d.parent)
        (True, False)
    """
    return (
        path.is_dir()
        and (path / ADAPTER_CONFIG).is_file()
        and any((path / name).is_file() for name in ADAPTER_WEIGHTS)
        and not is_model_folder(path)
    )


def open_source(
    path: Path, *, key: str | None = None, base: str | Path | None = None
) -> TensorSource:
    """The lazy reader for a checkpoint file, model folder or LoRA adapter folder, chosen
    by its name.

    ``key`` picks a wrapper key in a pickled checkpoint (e.g. ``"state_dict_ema"``);
    ``base`` is the base model of an adapter folder (default: the one its config names,
    when that is a local path).

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> p = Path(tempfile.mkdtemp()) / "a.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(1)}, str(p))
        >>> open_source(p).names()
        ['w']
    """
    if is_adapter_folder(path):
        if key is not None:
            raise ConfigError(
                f"{path}: --checkpoint-key '{key}' cannot apply: a LoRA adapter folder holds "
                "its factors under no wrapper key; drop --checkpoint-key (key=) for it"
            )
        return AdapterSource(path, base=base)
    if path.name in ADAPTER_WEIGHTS and is_adapter_folder(path.parent):
        # the factors alone are not a model: read as one, they would be souped factor by factor
        raise IngredientError(
            f"{path}: the lora_A/lora_B factors of a PEFT adapter, not a model; give the "
            f"adapter folder {path.parent} instead (with its base model as --base), and it "
            "is read as the merged model"
        )
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() and any((path / n).is_file() for n in ADAPTER_WEIGHTS):
            warnings.warn(
                f"{path}: holds a full model and a LoRA adapter; the full model's weights "
                "are read and the adapter is not applied (to soup the adapter, give a "
                "folder holding the adapter alone)",
                SoupWarning,
                stacklevel=2,
            )
        return open_folder(path, key=key)
    if is_safetensors_name(path):
        refuse_key(path, key)
        return SafetensorsSource([path])
    if is_pickle_name(path):
        return TorchSource([path], key=key)
    raise IngredientError(
        f"{path}: unknown checkpoint format; expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)} or a Hugging Face model folder"
    )


def takes_key(obj: object) -> bool:
    """Whether a wrapper key (``--checkpoint-key``) can apply to this checkpoint: a torch
    pickle (or a model folder of them) can hold its weights under one, safetensors
    cannot. A pool's key is passed on to its base only where it can apply.

    Example:
        >>> takes_key(Path("base.safetensors")), takes_key(Path("ema.pth.tar"))
        (False, True)
    """
    if not isinstance(obj, str | Path):
        return True  # in memory: no wrapper to unwrap, and nothing to refuse
    path = Path(obj)
    if path.is_dir():
        return not is_model_folder(path) or weight_files(path)[1] is TorchSource
    return not is_safetensors_name(path)


def output_format(path: Path) -> str:
    """The format an output path asks for: ``safetensors``, ``pt`` (a torch pickle) or
    ``folder`` (anything else: a Hugging Face style folder).

    Example:
        >>> output_format(Path("soup.ckpt"))
        'pt'
    """
    if is_safetensors_name(path):
        return "safetensors"
    if is_pickle_name(path):
        return "pt"
    return "folder"
