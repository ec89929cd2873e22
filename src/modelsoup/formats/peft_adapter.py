"""LoRA adapters (PEFT folders) read as the full models they stand for, and written back.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``): for each target module a pair of factors ``lora_A`` (r x in) and ``lora_B``
(out x r), and the tensors of ``modules_to_save`` in full. The model it stands for is
its base with each target weight changed by

    ΔW = scaling · B @ A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

(transposed for ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``, and for embeddings),
as PEFT's ``merge_and_unload`` computes it.

Averaging the factors is not averaging the adapters: ``mean(B) @ mean(A)`` is not
``mean(B @ A)``. So an :class:`AdapterSource` shows the *merged* weights, like any other
checkpoint, and also each weight's change from the base (:meth:`AdapterSource.delta_range`),
computed one block of rows at a time (memory holds one piece of one ΔW, never every ΔW).
Soups of adapters over one base are mixed in that weight-change space: the base is kept
as it is and only the changes are summed, so the soup equals the soup of the merged
models, and every tensor no adapter changes is the base's, bit for bit.

In that space an adapter's rank and its list of target modules do not matter (a module
an adapter does not target has ΔW = 0), so adapters of different ranks or targets are
mixed as they are; adapters over different bases are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsoup._util import check_replaceable, replace_folder, temp_sibling
from modelsoup.errors import IncompatibleIngredientsError, IngredientError, SoupWarning
from modelsoup.formats.base import (
    TensorMeta,
    TensorSource,
    check_regular,
    check_unchanged,
    hash_files,
    stat_file,
)
from modelsoup.formats.hf_folder import FOLDER_CARD, open_folder
from modelsoup.formats.safetensors_io import (
    SafetensorsSource,
    is_safetensors_name,
    write_safetensors,
)
from modelsoup.formats.torch_pickle import TorchSource

_logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
#: the weight files PEFT writes, the first one present is read
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: PEFT's prefix of every saved key: the PeftModel's ``base_model.model``
KEY_PREFIX = "base_model.model."
#: rows of B @ A are computed in blocks of about this many elements
_BLOCK_ELEMENTS = 1 << 20
#: architectures whose attention and MLP layers are transformers' Conv1D, stored (in, out):
#: PEFT sets fan_in_fan_out for those modules and not for their nn.Linear ones (a
#: classifier's ``score``), but saves only one value of it
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
#: the input-embedding modules of common architectures (a tied head is stored as them)
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in"})
_MERGE_HINT = "merge it into its base with PEFT's merge_and_unload() and soup the merged models"
#: PEFT's LoRA variants (its fields marked ``is_lora_variant``, and lora_B biases and the
#: like): each changes a layer's forward beyond ``W + s B @ A``
_REFUSED_VARIANTS = {
    "use_dora": "a DoRA adapter (its change is not B @ A)",
    "lora_bias": "a LoRA adapter with trained lora_B biases",
    "target_parameters": "a LoRA adapter on bare parameters (target_parameters)",
    "layer_replication": "a LoRA adapter with layer replication",
    "trainable_token_indices": "a LoRA adapter with trainable tokens",
    "velora_config": "a VeLoRA adapter",
    "monteclora_config": "a MonteCLoRA adapter",
    "use_bdlora": "a block-diagonal LoRA adapter (use_bdlora)",
    "arrow_config": "an Arrow adapter (routed among several LoRAs)",
    "kasa_config": "a KaSA adapter",
    "use_qalora": "a QA-LoRA adapter",
}
#: initialisations that move the base weights (PiSSA, CorDA, OLoRA, LoRA-GA, LoftQ)
_RESIDUAL_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")
#: the adapter_config.json keys of PEFT's LoraConfig (0.21) and PeftConfig that leave a
#: module's change at B @ A; any other set key is warned about
_KNOWN_OPTIONS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
        "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
        "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
        "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
        "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
        "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size",
        "ensure_weight_tying", *_REFUSED_VARIANTS, "alora_invocation_tokens",
    }
)  # fmt: skip


@dataclass(frozen=True)
class LoraModule:
    """How one base tensor is changed by one adapter's factors: the stored change is
    ``scaling * left @ right``, with ``left``/``right`` = ``lora_B``/``lora_A`` as saved,
    or ``lora_A.T``/``lora_B.T`` when ``transposed`` (``fan_in_fan_out``, embeddings).

    Example:
        >>> LoraModule("q.lora_A.weight", "q.lora_B.weight", 2.0, False, "linear").rank_key
        'q.lora_A.weight'
    """

    key_a: str
    key_b: str
    scaling: float
    transposed: bool
    kind: str  # "linear" or "embedding"

    @property
    def rank_key(self) -> str:
        return self.key_a


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    # PEFT's rule for rank_pattern/alpha_pattern: a key matches a module name that is
    # the key itself or ends with "." + key (keys may be regular expressions)
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_adapter_config(folder: Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a LoRA adapter we can soup.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        >>> try:
        ...     read_adapter_config(d)
        ... except IngredientError as err:
        ...     print(str(err).split(": ", 1)[1][:45])
        a IA3 adapter; only LoRA adapters can be soup
    """
    path = folder / ADAPTER_CONFIG
    check_regular(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IngredientError(f"{path}: unreadable adapter config ({err})") from err
    if not isinstance(config, dict):
        raise IngredientError(f"{path}: the adapter config is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise IngredientError(
            f"{folder}: a {kind} adapter; only LoRA adapters can be souped: {_MERGE_HINT}"
        )
    if config.get("alora_invocation_tokens"):
        raise IngredientError(
            f"{folder}: an activated LoRA (alora_invocation_tokens) changes the model only "
            "after its invocation tokens, so no merged model stands for it and it cannot be "
            "souped; leave it out"
        )
    for key, what in _REFUSED_VARIANTS.items():
        if config.get(key):
            raise IngredientError(f"{folder}: {what} cannot be souped yet: {_MERGE_HINT}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise IngredientError(f"{folder}: a MiCA adapter cannot be souped yet: {_MERGE_HINT}")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        warnings.warn(
            f"{folder}: initialised with init_lora_weights={init!r}, which changes the base "
            "weights: the adapter is relative to the residual base PEFT saved then, so give "
            "that as the base, or re-save the adapter with save_pretrained("
            "path_initial_model_for_weight_conversion=...) to make it relative to the "
            "pretrained model",
            SoupWarning,
            stacklevel=2,
        )
    unknown = sorted(k for k, v in config.items() if v and k not in _KNOWN_OPTIONS)
    if unknown:
        warnings.warn(
            f"{path}: sets {', '.join(map(repr, unknown))}, which modelsoup does not know "
            "(a newer PEFT's option?); the adapter is read as a plain LoRA (B @ A per "
            "module): check the soup, or merge it with merge_and_unload() first",
            SoupWarning,
            stacklevel=2,
        )
    fifo = config.get("fan_in_fan_out", False)
    if fifo is not None and not isinstance(fifo, bool):
        raise IngredientError(f"{path}: 'fan_in_fan_out' is {fifo!r}; expected true or false")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise IngredientError(f"{path}: '{key}' is {value!r}; expected a positive number")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise IngredientError(f"{path}: '{key}' must be a mapping of module names to numbers")
        for pattern in patterns:
            # PEFT matches these keys as regular expressions and fails on a bad one;
            # skipping it would give its modules the default alpha
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as err:
                raise IngredientError(
                    f"{path}: {key} key {pattern!r} is not a valid regular expression "
                    f"({err}); fix or remove it"
                ) from None
    return config


def resolve_base(folder: Path, config: Mapping, base: str | Path | None) -> Path:
    """The local base model folder of an adapter: ``base`` when given, else its
    ``base_model_name_or_path`` when that is a local folder (as given, or relative to
    the adapter's folder). Nothing is downloaded.

    Example:
        >>> try:
        ...     resolve_base(Path("ad"), {"base_model_name_or_path": "org/llm"}, None)
        ... except IngredientError as err:
        ...     print(str(err)[:50])
        ad: the adapter's base 'org/llm' is not a local fo
    """
    if base is not None:
        path = Path(base)
        if not path.exists():
            raise IngredientError(f"{path}: base model not found; check the --base path")
        return path
    named = config.get("base_model_name_or_path")
    if not named or not isinstance(named, str):
        raise IngredientError(
            f"{folder}: the adapter does not name its base model; pass it with --base "
            "(or base= / base: in the config)"
        )
    for candidate in (Path(named).expanduser(), folder / named):
        if candidate.is_dir():
            return candidate
    raise IngredientError(
        f"{folder}: the adapter's base '{named}' is not a local folder; pass the base model "
        "folder with --base (or base= / base: in the config); nothing is downloaded"
    )


def open_base(path: Path) -> TensorSource:
    """The base model of an adapter: an HF folder or a single checkpoint file.

    Example:
        >>> import tempfile, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> safetensors.torch.save_file({"w": torch.ones(1)}, str(d / "model.safetensors"))
        >>> open_base(d).names()
        ['w']
    """
    if path.is_dir():
        return open_folder(path)
    if is_safetensors_name(path):
        return SafetensorsSource([path])
    return TorchSource([path])


class AdapterSource(TensorSource):
    """A LoRA adapter folder seen as the merged model: its base with each target weight
    changed by ``scaling · B @ A``, and ``modules_to_save`` tensors replaced.

    Args:
        folder: the PEFT adapter folder.
        base: the base model's folder or file (default: ``base_model_name_or_path`` from
            the adapter config, when it is a local path).

    Example:
        >>> import tempfile, json, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> base = {"q.weight": torch.zeros(2, 3)}
        >>> safetensors.torch.save_file(base, str(d / "base.safetensors"))
        >>> (d / "ad").mkdir()
        >>> config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q"]}
        >>> _ = (d / "ad" / "adapter_config.json").write_text(json.dumps(config))
        >>> factors = {"base_model.model.q.lora_A.weight": torch.ones(1, 3),
        ...            "base_model.model.q.lora_B.weight": torch.ones(2, 1)}
        >>> safetensors.torch.save_file(factors, str(d / "ad" / "adapter_model.safetensors"))
        >>> src = AdapterSource(d / "ad", base=d / "base.safetensors")
        >>> src.tensor("q.weight")
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """

    def __init__(self, folder: Path, base: str | Path | None = None):
        self.folder = Path(folder)
        config_file = self.folder / ADAPTER_CONFIG
        before = stat_file(config_file)
        self.config = read_adapter_config(self.folder)
        # the state of the config that was read: the card's hash must be of it
        self._config_stat = stat_file(config_file)
        check_unchanged(config_file, self._config_stat, before)
        self.base_path = resolve_base(self.folder, self.config, base)
        self.base = open_base(self.base_path)
        found = (self.folder / n for n in ADAPTER_WEIGHTS if (self.folder / n).is_file())
        weights = next(found, None)
        if weights is None:
            raise IngredientError(
                f"{self.folder}: no adapter weights (expected {' or '.join(ADAPTER_WEIGHTS)})"
            )
        self.weights_file = weights
        self.factors: TensorSource = (
            SafetensorsSource([weights])
            if weights.suffix == ".safetensors"
            else TorchSource([weights])
        )
        self.label = str(self.folder)
        self.adapter_files = (self.folder / ADAPTER_CONFIG, weights)
        self.files = (*self.adapter_files, *self.base.files)
        self.folders = (self.base_path,) if self.base_path.is_dir() else ()
        self.lora: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        self._map_keys()
        if not self.lora and not self.full:
            raise IngredientError(
                f"{weights}: holds no LoRA weights; an empty adapter would be averaged in "
                "as no change at all: re-save the adapter, or leave it out"
            )
        ranks = sorted(self.ranks())
        self.note = (
            f"LoRA adapter over {self.base_path}: {len(self.lora)} modules, rank "
            f"{'/'.join(map(str, ranks)) or '-'}"
            + (f", {len(self.full)} tensors saved in full" if self.full else "")
        )
        self._kept: tuple[str, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    # -- reading the adapter file ------------------------------------------------
    def _map_keys(self) -> None:
        base_names = set(self.base.names())
        fan_in_fan_out = self.config.get("fan_in_fan_out") is True  # checked to be a bool
        pairs: dict[str, dict[str, str]] = {}
        for key in self.factors.names():
            inner = key.removeprefix(KEY_PREFIX)
            found = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", inner) or re.fullmatch(
                r"(.+)\.lora_embedding_(A|B)", inner
            )
            if found:
                kind = "embedding" if "lora_embedding_" in inner else "linear"
                pairs.setdefault(found.group(1), {"kind": kind})[found.group(2)] = key
                continue
            if "lora_magnitude_vector" in inner:
                raise IngredientError(
                    f"{self.folder}: a DoRA adapter cannot be souped yet: {_MERGE_HINT}"
                )
            if ".original_module." in inner:
                continue  # PEFT's frozen copy of a module it trains in modules_to_save
            if re.search(r"(^|\.)lora_\w", inner):
                # a LoRA tensor of another kind (KaSA's lora_diag, a named adapter's
                # lora_A.<name>.weight): not a base tensor saved in full
                raise IngredientError(
                    f"{self.folder}: adapter tensor '{key}' is a LoRA tensor of a kind "
                    f"modelsoup cannot soup yet: {_MERGE_HINT}"
                )
            name = inner.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
            if name not in base_names:
                raise self._no_counterpart(f"adapter tensor '{key}'", name)
            self._check_shape(name, tuple(self.factors.meta(key).shape), key)
            self.full[name] = key
            trained = ".base_layer." not in inner  # not PEFT's copy of a LoRA's base layer
            if trained and name.rsplit(".", 2)[-2] in INPUT_EMBEDDINGS and self._base_ties_head():
                warnings.warn(
                    f"{self.folder}: the adapter saves the input embeddings '{name}' in full "
                    "(modules_to_save) over a base that ties its head to them; PEFT keeps the "
                    "base's head, but a merged model (--merge-into-base, and the models a cook "
                    "tastes) ties the head to the trained embeddings, so it differs from "
                    "PEFT's; an adapter soup (the default output) is exact",
                    SoupWarning,
                    stacklevel=2,
                )
        for module, keys in pairs.items():
            if "A" not in keys or "B" not in keys:
                raise IngredientError(
                    f"{self.folder}: module '{module}' has only one of its two LoRA factors"
                )
            self._add_module(module, keys, fan_in_fan_out, base_names)

    def _add_module(self, module: str, keys: dict, fan_in_fan_out: bool, base_names: set) -> None:
        name = f"{module}.weight"
        if name not in base_names:
            raise self._no_counterpart(f"LoRA module '{module}'", name)
        a, b = (tuple(self.factors.meta(keys[x]).shape) for x in "AB")
        if len(a) != 2 or len(b) != 2:
            raise IngredientError(
                f"{self.folder}: LoRA module '{module}' has factors of shape {a} and {b}; "
                f"only linear and embedding layers can be souped: {_MERGE_HINT}"
            )
        rank = a[0]
        if b[1] != rank:
            raise IngredientError(
                f"{self.folder}: LoRA module '{module}' has factors {a} and {b} of unequal rank"
            )
        transposed = self._transposed(module, keys["kind"], name, a, b, fan_in_fan_out)
        changed = (a[1], b[0]) if transposed else (b[0], a[1])
        self._check_shape(name, changed, keys["A"])
        alpha = float(self.config["lora_alpha"])
        patterns = self.config.get("alpha_pattern") or {}
        hit = _pattern_key(patterns, module)
        if hit is not None:
            alpha = patterns[hit]
            if (
                isinstance(alpha, bool)
                or not isinstance(alpha, int | float)
                or not math.isfinite(alpha)
                or alpha <= 0
            ):
                raise IngredientError(
                    f"{self.folder / ADAPTER_CONFIG}: alpha_pattern['{hit}'] is {alpha!r}; "
                    "expected a positive number"
                )
        root = math.sqrt(rank) if self.config.get("use_rslora") else rank
        scaling = float(alpha) / root
        self.lora[name] = LoraModule(keys["A"], keys["B"], scaling, transposed, keys["kind"])

    def _transposed(
        self, module: str, kind: str, name: str, a: tuple, b: tuple, saved: bool
    ) -> bool:
        # is the module's weight stored as (in, out), so that its change is (B @ A).T?
        # PEFT decides by the module's class (transformers' Conv1D: yes, nn.Linear: no),
        # not by the saved fan_in_fan_out, which holds the value of the last module set up
        if kind == "embedding":
            return True
        conv1d_name = module.rsplit(".", 1)[-1] in CONV1D_MODULES
        model_type = self._model_type()
        if model_type in CONV1D_MODEL_TYPES:
            return conv1d_name
        plain, flipped = (b[0], a[1]), (a[1], b[0])
        have = tuple(self.base.meta(name).shape)
        if plain != flipped and have in (plain, flipped):
            return have == flipped  # the shape says which, whatever the saved flag
        if saved:
            # PEFT saves true only when the last module it set up was a Conv1D (GPT-2's
            # copies under other names keep them: remote-code models such as Jais)
            return True
        if model_type is not None or not conv1d_name:
            return False  # an nn.Linear, as PEFT's saved false says
        # false may be the last module's (a Linear head beside Conv1D layers): only the
        # architecture can tell a square c_proj apart
        raise IngredientError(
            f"{self.folder}: cannot tell whether '{name}' (square) is a Conv1D stored (in, "
            f"out), as in GPT-2, or an nn.Linear: no config.json with a model_type beside "
            f"the base {self.base_path} says its architecture; give the base as its model "
            "folder, with its config.json"
        )

    @functools.cached_property
    def _base_config(self) -> dict:
        # the base's config.json, read once (every LoRA module asks about it); a base given
        # as a weights file has it beside it (model.safetensors in its folder)
        home = self.base_path if self.base_path.is_dir() else self.base_path.parent
        check_regular(home / "config.json")
        try:
            config = json.loads((home / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def _model_type(self) -> str | None:
        return self._base_config.get("model_type")

    def _base_ties_head(self) -> bool:
        return self._base_config.get("tie_word_embeddings", False) is True

    def _no_counterpart(self, what: str, name: str) -> IngredientError:
        # A base that ties its head to the embeddings stores the head once, as the
        # embeddings: an adapter that changes the head then has nothing to change.
        tied = self._base_ties_head()
        if tied and name.rsplit(".", 2)[-2] in ("lm_head", "embed_out", "output"):
            return IngredientError(
                f"{self.folder}: {what} changes '{name}', which the base {self.base_path} "
                f"ties to its input embeddings (tie_word_embeddings): an adapter of a tied "
                f"head cannot be souped yet: {_MERGE_HINT}"
            )
        return IncompatibleIngredientsError(
            f"{self.folder}: {what} has no counterpart '{name}' in the base "
            f"{self.base_path}; pass the base it was trained on with --base"
        )

    def _check_shape(self, name: str, shape: tuple, key: str) -> None:
        have = tuple(self.base.meta(name).shape)
        if have != shape:
            raise IncompatibleIngredientsError(
                f"{self.folder}: '{key}' changes a {shape} tensor but '{name}' is {have} in "
                f"the base {self.base_path}; pass the base it was trained on with --base"
            )

    def lora_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the module changing tensor ``name``, as saved (its change, in PEFT's
        orientation, is ``scaling · B @ A``)."""
        mod = self.lora[name]
        factors = [self.factors.tensor(key) for key in (mod.key_a, mod.key_b)]
        for key, factor in zip((mod.key_a, mod.key_b), factors):
            if factor.is_floating_point() and not bool(torch.isfinite(factor).all()):
                raise IngredientError(
                    f"{self.weights_file}: LoRA factor '{key}' contains NaN or Inf values "
                    "(diverged training?); leave this adapter out"
                )
        return factors[0].to(dtype), factors[1].to(dtype)

    def ranks(self) -> set[int]:
        """The ranks of the adapter's LoRA modules."""
        return {self.factors.meta(m.key_a).shape[0] for m in self.lora.values()}

    @property
    def base_name(self) -> str | None:
        """The base as the adapter config names it (``base_model_name_or_path``)."""
        return self.config.get("base_model_name_or_path")

    # -- the merged model ------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def changed(self, name: str) -> bool:
        """Whether the adapter changes base tensor ``name``."""
        return name in self.lora or name in self.full

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        if not self.changed(name):
            return self.base.tensor(name, scratch)
        return self.tensor_range(name, 0, self.meta(name).numel).reshape(self.meta(name).shape)

    def tensor_range(
        self, name: str, start: int, count: int, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.changed(name):
            return self.base.tensor_range(name, start, count, scratch)
        dtype = self.meta(name).dtype
        if name not in self.lora:
            return self.factors.tensor_range(self.full[name], start, count).to(dtype)
        return self.range_as(name, start, count, torch.promote_types(dtype, torch.float32)).to(
            dtype
        )

    def range_as(self, name: str, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        # base + change computed in ``dtype``: a merge rule subtracts the base again, and a
        # change below the base dtype's step (bf16: 1/128 near 1) must not round away first
        # (a copy: a pickled base's tensor_range is a view of the tensor it holds, and
        # adding the change into it would change the base for every later read)
        if name not in self.lora:
            return super().range_as(name, start, count, dtype)
        merged = self._before_lora(name, start, count).to(dtype, copy=True)
        merged += self._lora_range(name, start, count, dtype)
        return merged

    def _before_lora(self, name: str, start: int, count: int) -> torch.Tensor:
        # what the factors are added to: the base's tensor, or the adapter's own copy of
        # it (PEFT saves an embedding's base layer beside its factors)
        if name in self.full:
            return self.factors.tensor_range(self.full[name], start, count)
        return self.base.tensor_range(name, start, count)

    # -- the change ------------------------------------------------------------
    def _lora_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # the factors of the module being read are kept, so reading its ΔW in pieces
        # reads them once
        if self._kept is None or self._kept[:2] != (name, dtype):
            a, b = self.lora_factors(name, dtype)
            left, right = (a.T, b.T) if self.lora[name].transposed else (b, a)
            self._kept = (name, dtype, left.contiguous(), right.contiguous())
        return self._kept[2], self._kept[3]

    def delta_range(
        self, name: str, start: int, count: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Elements ``start`` to ``start + count`` of tensor ``name``'s change from the
        base (flat, row-major, in ``dtype``): only the rows of ``B @ A`` they lie in are
        computed. Zero for a tensor the adapter does not change.

        Example:
            >>> import tempfile, json, safetensors.torch
            >>> d = Path(tempfile.mkdtemp())
            >>> base = {"q.weight": torch.ones(2, 2)}
            >>> safetensors.torch.save_file(base, str(d / "b.safetensors"))
            >>> (d / "ad").mkdir()
            >>> cfg = {"r": 1, "lora_alpha": 1, "base_model_name_or_path": str(d / "b.safetensors")}
            >>> _ = (d / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
            >>> f = {"base_model.model.q.lora_A.weight": torch.tensor([[1.0, 2.0]]),
            ...      "base_model.model.q.lora_B.weight": torch.tensor([[1.0], [3.0]])}
            >>> safetensors.torch.save_file(f, str(d / "ad" / "adapter_model.safetensors"))
            >>> src = AdapterSource(d / "ad", base=d / "b.safetensors")
            >>> src.delta_range("q.weight", 1, 2)
            tensor([2., 3.])
        """
        if not self.changed(name):
            return torch.zeros(count, dtype=dtype)
        change = None
        if name in self.full:
            change = self.factors.tensor_range(self.full[name], start, count).to(dtype, copy=True)
            change -= self.base.tensor_range(name, start, count).to(dtype)
        if name not in self.lora:
            return change
        lora = self._lora_range(name, start, count, dtype)
        return lora if change is None else change.add_(lora)

    def _lora_range(self, name: str, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        left, right = self._lora_factors(name, dtype)
        cols = right.shape[1]
        # Rows are computed in blocks of a fixed grid, whatever the range asked for: a
        # matrix product's rounding may depend on its shape, and this way every window
        # of ΔW, and the whole of it, has the same bits.
        step = max(1, _BLOCK_ELEMENTS // cols)
        first = start // cols // step * step
        last = -(-(start + count) // cols)
        blocks = [torch.mm(left[row : row + step], right) for row in range(first, last, step)]
        block = (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).mul_(self.lora[name].scaling)
        offset = start - first * cols
        return block.reshape(-1)[offset : offset + count]

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole change of tensor ``name``, shaped like it."""
        meta = self.meta(name)
        return self.delta_range(name, 0, meta.numel, dtype).reshape(meta.shape)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"lora-adapter|")
        stats = (self._config_stat, *self.factors.file_stats)  # what was read at open
        digest.update(hash_files(self.adapter_files, stats).encode())
        digest.update(self.base.fingerprint().encode())
        return digest.hexdigest()

    def close(self) -> None:
        self.base.close()
        self.factors.close()


def shared_base(sources: Sequence[TensorSource]) -> TensorSource | None:
    """The one base of a list of adapters (its source), or ``None`` unless every source is
    an :class:`AdapterSource` over the same base.

    Example:
        >>> from modelsoup.formats.base import DictSource
        >>> shared_base([DictSource({"w": torch.ones(1)})]) is None
        True
    """
    if not sources or not all(isinstance(s, AdapterSource) for s in sources):
        return None
    first = sources[0].base_path.resolve()
    if any(s.base_path.resolve() != first for s in sources[1:]):
        return None
    return sources[0].base


def check_adapters(sources: Sequence[TensorSource]) -> None:
    """Refuse adapters over different bases; say how ranks and targets that differ are mixed.

    Example:
        >>> check_adapters([])
    """
    adapters = [s for s in sources if isinstance(s, AdapterSource)]
    if not adapters:
        return
    first = adapters[0]
    for other in adapters[1:]:
        if other.base_path.resolve() != first.base_path.resolve():
            raise IncompatibleIngredientsError(
                f"{first.label} is an adapter of {first.base_path} but {other.label} of "
                f"{other.base_path}; adapters can be souped only over one base (pass it with "
                "--base if they were trained on the same one)"
            )
    names = {s.base_name for s in adapters}
    if len(names) > 1:
        _logger.warning(
            "the adapters name different bases (%s); all are applied to %s",
            ", ".join(sorted(map(str, names))),
            first.base_path,
        )
    ranks = {r for s in adapters for r in s.ranks()}
    targets = {frozenset(s.lora) for s in adapters}
    if len(ranks) > 1 or len(targets) > 1:
        _logger.info(
            "the adapters differ in %s: they are mixed as weight changes, where a module an "
            "adapter does not target changes by 0 and the rank does not matter",
            " and ".join(
                w for w, d in (("rank", len(ranks) > 1), ("target modules", len(targets) > 1)) if d
            ),
        )


def write_adapter(
    path: Path,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``
    + ``extra_files``); the folder appears only once complete.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "ad"
        >>> write_adapter(out, {"peft_type": "LORA", "r": 1}, {"k": torch.ones(1)})
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    path = Path(path)
    check_replaceable(path, FOLDER_CARD)  # before any work: refused, never deleted
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2) + "\n")
        layout = {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in tensors.items()}
        write_safetensors(
            tmp / ADAPTER_WEIGHTS[0], layout, lambda k: tensors[k].contiguous(), {"format": "pt"}
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_folder(tmp, path, FOLDER_CARD)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refactor(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Factor the weight change ``left @ right`` (out x K times K x in, e.g. the stacked
    ``c_i · scaling_i · B_i`` and ``A_i`` of a soup of adapters) into LoRA factors of
    ``rank`` by truncated SVD: the best rank-``rank`` approximation in the Frobenius norm
    (Eckart-Young), split evenly as ``B = U √S``, ``A = √S Vᵀ`` and zero-padded when the
    change has lower rank.

    The change is never formed: QR of both sides leaves a K x K core to decompose, so the
    cost is O((out + in) K²) and the SVD is exact.

    Returns ``(A, B, discarded, total)``: the squared Frobenius norms of what was cut and
    of the whole change, so errors over many modules can be summed.

    Example:
        >>> left, right = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 0.0, 4.0]])
        >>> a, b, cut, whole = refactor(torch.cat([left, left], 1), torch.cat([right, right]), 1)
        >>> torch.allclose(b @ a, 2 * left @ right), cut < 1e-9, round(whole, 3)
        (True, True, 500.0)
    """
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = torch.zeros(left.shape[0], rank, dtype=left.dtype)
    a = torch.zeros(rank, right.shape[1], dtype=left.dtype)
    b[:, :keep] = (q_left @ u[:, :keep]) * root
    a[:keep] = root[:, None] * (vh[:keep] @ q_right.T)
    squares = s.double().square()
    return a, b, float(squares[keep:].sum()), float(squares.sum())


def lora_keys(module: str, kind: str) -> tuple[str, str]:
    """PEFT's saved names of one module's factors ``(A, B)``.

    Example:
        >>> lora_keys("model.layers.0.q_proj", "linear")[0]
        'base_model.model.model.layers.0.q_proj.lora_A.weight'
    """
    if kind == "embedding":
        return f"{KEY_PREFIX}{module}.lora_embedding_A", f"{KEY_PREFIX}{module}.lora_embedding_B"
    return f"{KEY_PREFIX}{module}.lora_A.weight", f"{KEY_PREFIX}{module}.lora_B.weight"
