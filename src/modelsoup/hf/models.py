"""The architecture of a Hugging Face folder, built offline, with its task head.

Which head: ``task:`` in the cook config when given (``causal_lm``,
``sequence_classification``, ``token_classification``, ``masked_lm``, ...; or any
transformers Auto class by name), otherwise the class ``config.json`` names under
``architectures`` (what ``save_pretrained`` wrote: ``LlamaForCausalLM``,
``GPT2LMHeadModel``, ``BertForTokenClassification``, ...). A folder whose ``config.json``
names no architecture is read as a sequence classifier, as before tasks existed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from modelsoup.errors import ConfigError, IncompatibleIngredientsError, IngredientError
from modelsoup.formats.dispatch import is_adapter_folder
from modelsoup.formats.hf_folder import is_model_folder, open_folder
from modelsoup.formats.peft_adapter import read_adapter_config, resolve_base
from modelsoup.ingredients import find_checkpoints

_logger = logging.getLogger(__name__)

#: ``task:`` names and the transformers Auto class each one builds
TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "question_answering": "AutoModelForQuestionAnswering",
    "multiple_choice": "AutoModelForMultipleChoice",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "image_classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}

#: what ``model: hf`` built before tasks existed, kept for a config.json without architectures
DEFAULT_AUTO_CLASS = TASKS["sequence_classification"]


def require_transformers() -> ModuleType:
    """Import transformers, or explain how to install it.

    Example:
        >>> require_transformers().__name__
        'transformers'
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need transformers: install modelsoup[hf] "
            "(pip install 'modelsoup[hf]')"
        ) from None
    return transformers


def model_folder(ingredients: Sequence[str | Path], base: str | Path | None = None) -> Path:
    """The Hugging Face folder ``model: hf`` builds from: the first ingredient, or, when
    it is a PEFT LoRA adapter, the base model it adapts (``base`` when given, else the
    adapter's ``base_model_name_or_path``). Either must hold ``config.json``.

    Example:
        >>> model_folder(["/nonexistent"])
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: model: hf needs Hugging Face model folders as ingredients...
    """
    # the first ingredient only; open_ingredients says what the whole pool holds
    found = find_checkpoints(ingredients[:1], dedupe=False, quiet=True) if ingredients else []
    first = found[0] if found else Path(str(ingredients[0]) if ingredients else ".")
    if is_adapter_folder(first):
        # an adapter soup is a model over the adapters' base: its architecture is the base's
        try:
            folder = resolve_base(first, read_adapter_config(first), base)
        except IngredientError as err:
            raise ConfigError(f"model: hf: {err}") from None
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model: hf builds the adapters' base model, but {folder} is not a Hugging "
                "Face folder with config.json; give the base's save_pretrained folder as base:"
            )
        return folder
    if not is_model_folder(first) or not (first / "config.json").is_file():
        raise ConfigError(
            "model: hf needs Hugging Face model folders as ingredients, but the first "
            f"ingredient {first} is not one"
            + ("" if not first.is_dir() else " (it has no config.json or no weights)")
        )
    return first


def auto_class_name(task: str) -> str:
    """The transformers Auto class a ``task:`` value stands for.

    A task name from :data:`TASKS`, or the name of an Auto class itself.

    Example:
        >>> auto_class_name("causal_lm"), auto_class_name("AutoModelForCTC")
        ('AutoModelForCausalLM', 'AutoModelForCTC')
        >>> auto_class_name("causal")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: task 'causal' is not known: use one of causal_lm, ...
    """
    if task in TASKS:
        return TASKS[task]
    if task.startswith("AutoModel"):
        return task
    raise ConfigError(
        f"task '{task}' is not known: use one of {', '.join(TASKS)}, or the name of a "
        "transformers Auto class (e.g. AutoModelForCTC)"
    )


def keep_stored_names_only(model: torch.nn.Module, stored: set[str]) -> Any:
    """Hide tied copies (e.g. an LM head tied to the embeddings) from ``state_dict``.

    ``save_pretrained`` stores a tied tensor once; the module still lists every alias.
    Writing a soup into the module copies into the stored name, which the alias
    shares, so the alias is simply left out of the names modelsoup compares. Returns
    the hook's handle (``handle.remove()`` undoes it), or ``None`` when nothing is tied.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> m[1].weight = m[0].weight
        >>> handle = keep_stored_names_only(m, {"0.weight", "0.bias", "1.bias"})
        >>> sorted(m.state_dict())
        ['0.bias', '0.weight', '1.bias']
        >>> handle.remove()
        >>> len(m.state_dict())
        4
    """
    state = model.state_dict(keep_vars=True)
    owners = {
        (t.data_ptr(), tuple(t.shape)): n for n, t in state.items() if n in stored and t.numel()
    }
    aliases = {
        n
        for n, t in state.items()
        if n not in stored and t.numel() and (t.data_ptr(), tuple(t.shape)) in owners
    }
    if not aliases:
        return None

    def drop_aliases(module, state_dict, prefix, local_metadata) -> None:
        for name in aliases:
            state_dict.pop(prefix + name, None)

    return model.register_state_dict_post_hook(drop_aliases)


_keep_stored_names_only = keep_stored_names_only  # its name before hf became a package


def _converts_names_on_load(model: torch.nn.Module, stored: set[str], names: set[str]) -> bool:
    # transformers 5 renames (and for mixtures of experts stacks) a checkpoint's tensors
    # on load (transformers.conversion_mapping): the cause when a stored name missing from
    # the module is converted to one the module has. Older versions have no such table.
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    try:
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        for name in sorted(stored - names):
            renamed = rename_source_key(name, renamings, converters)[0]
            if renamed != name and renamed in names:
                return True
    except Exception:  # noqa: BLE001 - a private table: unknown means "not known to convert"
        return False
    return False


def refuse_converted_names(model: torch.nn.Module, stored: set[str], advice: str) -> None:
    """Refuse a transformers module whose ``state_dict`` names are not the names its
    checkpoints store because transformers converts them on load (ViT, DeiT, Mixtral,
    Qwen2-MoE in transformers 5): a soup written by name would miss every converted
    tensor. ``advice`` says what to do instead. Other differences pass, for the writer
    to name.

    Example:
        >>> import torch
        >>> refuse_converted_names(torch.nn.Linear(1, 1), {"weight"}, "use average")
    """
    names = set(model.state_dict())
    if names == stored or not _converts_names_on_load(model, stored, names):
        return
    mine = sorted(names - stored) or sorted(names)
    theirs = sorted(stored - names) or sorted(stored)
    raise IncompatibleIngredientsError(
        f"{type(model).__name__} checkpoints use other tensor names than its transformers "
        f"module (e.g. '{theirs[0]}' stored, '{mine[0]}' in the module), which transformers "
        f"converts on load; {advice}"
    )


#: what to do instead when ``model: hf`` meets a checkpoint whose names are converted
CONVERTED_NAMES_ADVICE = (
    "model: hf cannot write soups into it: cook with your own model: function that returns a "
    "module whose state_dict names match the checkpoint, or use `modelsoup average`"
)


#: config.json keys that give how many positions a model reads
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def fit_max_length(spec: Any, folder: str | Path) -> Any:
    """``spec`` (an evaluator's options with ``max_length``) fitted to the positions the
    model in ``folder`` reads (``config.json``'s ``max_position_embeddings`` or
    ``n_positions``): the default ``max_length`` is lowered to them, a ``max_length``
    you set above them is an error (the position embeddings would be read past their
    end).

    Example:
        >>> import tempfile
        >>> from pydantic import BaseModel
        >>> class Spec(BaseModel):
        ...     max_length: int = 512
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text('{"n_positions": 16}')
        >>> fit_max_length(Spec(), d).max_length
        16
        >>> try:
        ...     fit_max_length(Spec(max_length=64), d)
        ... except ConfigError as err:
        ...     print(str(err).split(": ", 1)[1][:45])
        max_length 64 is longer than the 16 positions
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return spec
    if not isinstance(config, dict):
        return spec
    for key in _POSITIONS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < spec.max_length:
            if "max_length" in spec.model_fields_set:
                raise ConfigError(
                    f"{folder}: max_length {spec.max_length} is longer than the {value} "
                    f"positions the model reads (config.json {key}); set max_length: {value} "
                    "or less"
                )
            stride = getattr(spec, "stride", None)
            if stride is not None and stride >= value:
                raise ConfigError(
                    f"{folder}: stride {stride} must be smaller than the {value} positions "
                    f"the model reads (config.json {key}); set a smaller stride"
                )
            _logger.info("%s reads %d positions (%s): max_length %d -> %d", folder, value,
                         key, spec.max_length, value)  # fmt: skip
            return spec.model_copy(update={"max_length": value})
    return spec


def _architectures(folder: Path) -> list[str]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}/config.json: not readable JSON ({err})") from None
    names = raw.get("architectures") if isinstance(raw, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []


def _build(
    transformers: ModuleType,
    folder: Path,
    config: Any,
    auto_class: str | None,
    trust_remote_code: bool,
) -> torch.nn.Module:
    """The model, from an Auto class, or from the class ``architectures`` names."""
    if auto_class is not None:
        auto = getattr(transformers, auto_class, None)
        if auto is None or not hasattr(auto, "from_config"):
            raise ConfigError(f"'{auto_class}' is not a transformers Auto class")
        return auto.from_config(config, trust_remote_code=trust_remote_code)
    names = _architectures(folder)
    if not names:
        _logger.info("%s/config.json names no architecture: %s", folder, DEFAULT_AUTO_CLASS)
        return getattr(transformers, DEFAULT_AUTO_CLASS).from_config(config)
    name = names[0]
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls(config)
    # Not a transformers class: the code ships with the checkpoint (config.json auto_map).
    auto_map = getattr(config, "auto_map", None) or {}
    for auto_name, ref in auto_map.items():
        refs = ref if isinstance(ref, list | tuple) else [ref]
        if auto_name.startswith("AutoModel") and any(str(r).endswith("." + name) for r in refs):
            return getattr(transformers, auto_name).from_config(
                config, trust_remote_code=trust_remote_code
            )
    raise ConfigError(
        f"{folder}/config.json: architecture '{name}' is neither a transformers class nor in "
        f"its auto_map; set task: in the cook config (one of {', '.join(TASKS)})"
    )


def load_architecture(
    folder: str | Path,
    *,
    auto_class: str | None = None,
    task: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A freshly initialised model of the architecture in ``folder/config.json`` (offline).

    The head is the one ``task`` (see :data:`TASKS`) or ``auto_class`` names, else the
    class in ``config.json``'s ``architectures``. The weights are random: a cook
    overwrites them with each candidate soup. Tied copies (an LM head tied to the
    embeddings, which ``save_pretrained`` stores once) stay tied, and only the stored
    name is compared with the ingredients.

    Example:
        >>> import tempfile, transformers
        >>> d = Path(tempfile.mkdtemp())
        >>> cfg = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2,
        ...                               n_positions=16, bos_token_id=0, eos_token_id=0)
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        >>> type(load_architecture(d)).__name__
        'GPT2LMHeadModel'
        >>> type(load_architecture(d, task="sequence_classification")).__name__
        'GPT2ForSequenceClassification'
    """
    transformers = require_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; model: hf needs a save_pretrained folder")
    if task is not None and auto_class is not None:
        raise ConfigError("give task or auto_class, not both")
    if task is not None:
        auto_class = auto_class_name(task)
    try:
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        model = _build(transformers, folder, config, auto_class, trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        hint = (
            "; the model's code ships with the checkpoint: set trust_remote_code: true in the "
            "cook config if you trust it"
            if "trust_remote_code" in str(err)
            else ""
        )
        raise ConfigError(f"{folder}/config.json: cannot build the model ({err}){hint}") from None
    stored = set(open_folder(folder).names())
    keep_stored_names_only(model, stored)
    refuse_converted_names(model, stored, CONVERTED_NAMES_ADVICE)
    return model


def model_factory(
    ingredients: Sequence[str | Path],
    *,
    task: str | None = None,
    trust_remote_code: bool = False,
    base: str | Path | None = None,
) -> Callable[[], torch.nn.Module]:
    """What ``model: hf`` stands for: builds the first ingredient folder's architecture
    (of LoRA adapters, their base's; ``base`` is the cook's ``base:``).

    Example:
        >>> model_factory(["/nonexistent"])
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: model: hf needs ...
    """
    if task is not None:
        auto_class_name(task)  # a misspelt task fails at config time
    folder = model_folder(ingredients, base)
    require_transformers()  # fail at config time, not after the ingredients are opened

    def build() -> torch.nn.Module:
        return load_architecture(folder, task=task, trust_remote_code=trust_remote_code)

    return build


def local_path(path: str | Path, base_dir: str | Path = ".") -> Path:
    """A path from a cook config: relative paths are relative to ``base_dir``.

    Example:
        >>> str(local_path("held.txt", "/runs")), str(local_path("/data/held.txt", "/runs"))
        ('/runs/held.txt', '/data/held.txt')
    """
    path = Path(path)
    return path if path.is_absolute() else Path(base_dir) / path


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in ``folder`` (offline), or a config error saying why not.

    Example:
        >>> load_tokenizer("/nonexistent")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: /nonexistent: cannot load a tokenizer (...)
    """
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError) as err:
        raise ConfigError(f"{folder}: cannot load a tokenizer ({err})") from None
