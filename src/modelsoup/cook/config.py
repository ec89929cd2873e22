"""The cook config: a YAML file validated at the edge, with the bad key named.

Example config::

    model: mypkg.models:build            # returns the architecture (an nn.Module)
    ingredients: [runs/*.safetensors]    # paths, folders or globs, or {path:, label:}
    held_out: mypkg.data:held_out        # returns an evaluator (chooses the soups)
    test: mypkg.data:test                # optional: returns an evaluator (reports only)
    base: runs/pretrained.safetensors    # optional: the start, for merge rules that need it
    recipes:
      - {name: greedy, order: sorted}
      - {name: greedy, merge: {rule: ties, density: 0.3}}
      - {name: greedy, order: random, runs: 5}
      - {name: pruned, passes: 3}
    output: soups/

Import paths are ``module:attribute``, or ``file.py:attribute`` relative to the config
file. Every recipe entry is checked against that recipe's own options.

Hugging Face models need no code: ``model: hf`` builds the architecture from the
first ingredient folder's ``config.json`` (the head from ``architectures``, or from
``task:``), and ``held_out``/``test`` may name a built-in evaluator, e.g.
``{hf_text_classification: held.csv, max_length: 64}``, ``{hf_causal_lm_loss: held.txt}``
(alias ``perplexity``) or ``{hf_multiple_choice: mc.jsonl}`` (see :mod:`modelsoup.hf`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from modelsoup._options import OptionsModel, WrittenNumber
from modelsoup._util import call_factory, spelling_hint
from modelsoup.cook.stats import MAX_RESAMPLES
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import as_evaluator, identity, same_data
from modelsoup.hf import CausalLMLossData, MultipleChoiceData, TextClassificationData
from modelsoup.memory import budget_option
from modelsoup.recipes.registry import get_recipe

DEFAULT_RECIPES = [
    {"name": "greedy", "order": "sorted"},
    {"name": "pruned", "passes": 1},
]


class IngredientEntry(OptionsModel):
    """One ``ingredients:`` entry: a path, folder or glob, and an optional label for the
    one checkpoint it names (written as a plain string when it has no label)."""

    path: str = Field(min_length=1)
    label: str | None = Field(default=None, min_length=1)


class StatisticalRacingOptions(OptionsModel):
    """``racing: {confidence: 0.999}``: statistical racing, at that confidence; ``clip``
    bounds a loss's per-example values; ``seed`` fixes the examples' one random order."""

    confidence: float = Field(gt=0, lt=1)
    clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0)


def _racing_form(value: Any) -> str | None:
    if isinstance(value, str | bool):
        return "racing mode"
    if isinstance(value, dict | StatisticalRacingOptions):
        return "racing options"
    return None


#: ``racing:``: exact (the default), off, or statistical racing's options
RacingSpec = Annotated[
    Annotated[Literal["exact", "off"], Tag("racing mode")]
    | Annotated[StatisticalRacingOptions, Tag("racing options")],
    Discriminator(
        _racing_form,
        custom_error_type="racing_form",
        custom_error_message="write exact, off or {confidence: 0.999}",
    ),
]


def _yaml_off(v: Any) -> Any:
    # YAML reads a bare `off` as false and `on` as true
    return {False: "off", True: "exact"}.get(v, v) if isinstance(v, bool) else v


def racing_value(spec: str | StatisticalRacingOptions) -> str | dict:
    """What :class:`~modelsoup.tasting.Taster` takes for a config's ``racing:``.

    Example:
        >>> racing_value(StatisticalRacingOptions(confidence=0.99)), racing_value("off")
        ({'confidence': 0.99, 'clip': None, 'seed': 0}, 'off')
    """
    return spec.model_dump() if isinstance(spec, BaseModel) else spec


class RecipeEntry(OptionsModel):
    """One recipe to cook: its registered name, an optional label, its own ``racing``
    (the cook's when not given), and its options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    label: str | None = None
    racing: RacingSpec | None = None

    _racing_off = field_validator("racing", mode="before")(_yaml_off)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        # `recipes: [uniform, greedy]`: a bare name is the recipe with its defaults
        return {"name": value} if isinstance(value, str) else value

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


#: the built-in evaluators: the config key that names each, and its options model
BUILT_IN_EVALUATORS = {
    "hf_text_classification": TextClassificationData,
    "hf_causal_lm_loss": CausalLMLossData,
    "perplexity": CausalLMLossData,
    "hf_multiple_choice": MultipleChoiceData,
}
BuiltInEvaluator = TextClassificationData | CausalLMLossData | MultipleChoiceData


def _evaluator_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "import path"
    if isinstance(value, BaseModel) and type(value) in BUILT_IN_EVALUATORS.values():
        return type(value).__name__
    if isinstance(value, dict):
        for key, form in BUILT_IN_EVALUATORS.items():
            if key in value:
                return form.__name__
        return TextClassificationData.__name__  # the first built-in: its error names the key
    return None


#: ``held_out`` and ``test``: an import path, or a mapping that names a built-in evaluator
EvaluatorSpec = Annotated[
    Annotated[str, Tag("import path")]
    | Annotated[TextClassificationData, Tag(TextClassificationData.__name__)]
    | Annotated[CausalLMLossData, Tag(CausalLMLossData.__name__)]
    | Annotated[MultipleChoiceData, Tag(MultipleChoiceData.__name__)],
    Discriminator(
        _evaluator_form,
        custom_error_type="evaluator_form",
        custom_error_message="give an import path (module:function) or a mapping such as "
        "{hf_text_classification: held.csv} or {hf_causal_lm_loss: held.txt}",
    ),
]
#: pydantic's union tags: not config keys
_FORM_TAGS = {"import path", "racing mode", "racing options"} | {
    form.__name__ for form in BUILT_IN_EVALUATORS.values()
}


class CookOptions(OptionsModel):
    """How a cook runs, apart from what it cooks: the keyword options of
    :func:`modelsoup.cook.cook` and the matching keys of a cook config.

    Example:
        >>> CookOptions(seed=3).bootstrap_resamples
        2000
    """

    device: str = "cpu"
    checkpoint_key: str | None = None
    #: the pretrained start the ingredients were fine-tuned from: merge rules take task
    #: vectors from it (a recipe's ``merge: {rule: ties, density: 0.3}``), and LoRA
    #: adapter ingredients are mixed over it (default: the base folder they name)
    base: str | None = None
    #: LoRA adapter ingredients: save soups as merged full models instead of adapters
    merge_into_base: bool = False
    #: LoRA adapter ingredients: rank of saved adapter soups (default: the adapters')
    adapter_rank: int | None = Field(default=None, ge=1)
    #: refuse ingredients whose checkpoints describe different architectures
    strict: bool = False
    accum_dtype: Literal["float32", "float64"] = "float32"
    int_policy: Literal["strict", "first"] = "strict"
    save: Literal["all", "none"] = "all"
    save_format: Literal["safetensors", "folder", "pt"] | None = None
    out_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    journal: bool = True
    baselines: bool = True
    bootstrap_resamples: int = Field(default=2000, ge=1, le=MAX_RESAMPLES)
    seed: int = Field(default=0, ge=0)
    recalibrate_candidates: bool = False
    #: stop a candidate's evaluation once it provably cannot meet the score to beat
    #: (bounded evaluators such as accuracy; decisions equal a full evaluation's), or
    #: ({confidence: 0.999}) once it is worse than the incumbent at that confidence
    racing: RacingSpec = "exact"
    #: read the ingredient the recipe tries next while the evaluator scores the current
    #: candidate (one staging buffer more; on when it fits half the RAM, unless false)
    prefetch: bool | None = None
    #: the memory budget ("8GB"-style or bytes; default half the RAM): prefetch is on
    #: only when it fits, and the learned soup is refused above it
    max_memory: int | float | str | None = None
    #: under torchrun: seconds a collective may wait for the other ranks
    dist_timeout_s: float = Field(default=600.0, gt=0)

    _racing_off = field_validator("racing", mode="before")(_yaml_off)
    _budget = field_validator("max_memory")(budget_option)

    def options(self) -> CookOptions:
        """Only the cook options of this object (a config's other keys dropped)."""
        return CookOptions(**{k: getattr(self, k) for k in CookOptions.model_fields})


class CookConfig(CookOptions):
    """Everything ``modelsoup cook`` needs; unknown keys are errors."""

    model: str
    ingredients: list[IngredientEntry] = Field(min_length=1)
    held_out: EvaluatorSpec
    test: EvaluatorSpec | None = None
    recipes: list[RecipeEntry] = Field(
        default_factory=lambda: [RecipeEntry(**r) for r in DEFAULT_RECIPES]
    )
    output: str
    #: a config asks for intervals worth reading; the API allows fewer (quick tests)
    bootstrap_resamples: int = Field(default=2000, ge=100, le=MAX_RESAMPLES)
    recalibrate_bn: str | None = None
    recalibrate_batches: int | None = Field(default=None, ge=1)
    #: permutation alignment before cooking: true (= "reference": weight matching onto
    #: the first ingredient), "activations" (activation matching onto the first, on
    #: align_data) or "merge_many" (weight matching, each onto the mean of the others)
    align: bool | Literal["reference", "activations", "merge_many"] = False
    #: unlabeled inputs for align: activations (default: the recalibrate_bn data)
    align_data: str | None = None
    align_batches: int | None = Field(default=None, ge=1)
    #: let transformers run code shipped in the ingredient folder (``model: hf``)
    trust_remote_code: bool = False
    #: ``model: hf`` only: the head to build (causal_lm, sequence_classification,
    #: token_classification, masked_lm, ... or an Auto class name); by default the class
    #: config.json's ``architectures`` names
    task: str | None = None
    #: where relative paths are resolved (the config file's folder)
    base_dir: str = "."

    def options(self) -> CookOptions:
        """The cook options of this config, a relative ``base:`` read from the config
        file's folder (as ingredients are).

        Example:
            >>> cfg = CookConfig(model="math:sqrt", ingredients=["a"], held_out="m:f",
            ...                  output="o", base="llm", base_dir="/tmp")
            >>> cfg.options().base
            '/tmp/llm'
        """
        options = super().options()
        if options.base is None or Path(options.base).is_absolute():
            return options
        return options.model_copy(update={"base": str(Path(self.base_dir) / options.base)})

    @field_validator("ingredients", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str | dict) else v
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("ingredients")
    @classmethod
    def _labels_differ(cls, v: list[IngredientEntry]) -> list[IngredientEntry]:
        labels = [e.label for e in v if e.label is not None]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"two ingredients are both labelled '{twice[0]}'; labels must differ")
        return v

    @field_validator("model")
    @classmethod
    def _model_form(cls, v: str) -> str:
        if v == "hf" or ":" in v:
            return v
        if v.strip().lower() == "hf":
            raise ValueError(
                f"'{v}' is not understood; did you mean 'hf' (the architecture from the "
                "first ingredient's config.json)?"
            )
        raise ValueError(
            f"'{v}' is neither hf nor an import path; write module:function (a function "
            "returning the architecture), or hf"
        )

    @model_validator(mode="after")
    def _task_needs_hf(self) -> CookConfig:
        if self.task is not None and self.model != "hf":
            raise ValueError("task: applies to model: hf only; your model function builds the head")
        return self


def format_error(err: ValidationError, source: str) -> str:
    """One line for a pydantic error: the key, and a spelling suggestion for unknown keys."""
    # a misspelt key also makes the real one "missing": report the misspelling first
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"] if x not in _FORM_TAGS) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        known = _keys_at(CookConfig, first["loc"][:-1])
        msg = "unknown key" + spelling_hint(first["loc"][-1], known)
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{source}: config key '{loc}': {msg}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _keys_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys known at a place in a config (``("held_out",)`` for a built-in evaluator's
    mapping), found by following the models' fields; none if the place is not a model."""
    models = [model]
    for part in loc:
        if part in _FORM_TAGS or isinstance(part, int):
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for f in fields for m in _models_in(f.annotation)]
    return [name for m in models for name in m.model_fields]


def check_recipes(config: CookConfig, source: str = "config") -> None:
    """Validate each recipe entry against its recipe's options model."""
    for i, entry in enumerate(config.recipes):
        get_recipe(entry.name).check_options(entry.options(), source=source, where=f"recipes.{i}")


class _StrictLoader(yaml.SafeLoader):
    """YAML as people mean it: a key given twice, and YAML 1.1's octal (``017``) and
    base-60 (``1:30:00``) integers, are refused, not silently resolved; ``1e-3`` is a
    :class:`~modelsoup._options.WrittenNumber`, a number where a number goes (as in YAML
    1.2, and Python), not only the text YAML 1.1 makes of it without a dot."""


# YAML 1.1 floats need a dot and a signed exponent ("1.0e-3", "1.5e+3"); an exponent
# written otherwise (1e-3, 1.5e3) makes a WrittenNumber: the number where a number goes,
# the text where text goes
_EXPONENT_TAG = "tag:modelsoup,2026:written-number"
_StrictLoader.add_implicit_resolver(
    _EXPONENT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)
_StrictLoader.add_constructor(
    _EXPONENT_TAG, lambda loader, node: WrittenNumber(loader.construct_scalar(node))
)


class _Refused(yaml.YAMLError):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.message, self.line = message, node.start_mark.line + 1


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _Refused(f"key {key!r} is given twice; give it once", key_node)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _integer(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    digits = str(text).replace("_", "").lstrip("+-")
    if ":" in digits or (len(digits) > 1 and digits.startswith("0") and digits.isdigit()):
        raise _Refused(
            f"{text!r} reads as a YAML 1.1 octal or base-60 number; write the number in "
            "plain decimal, or quote it if it is text",
            node,
        )
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _integer)


def read_yaml(text: str, source: str) -> Any:
    """Parse a config's YAML text; a duplicate key or a YAML 1.1 octal or base-60
    integer is a one-line error naming ``source`` and the line, as bad YAML is.

    Example:
        >>> read_yaml("seed: 3\\nruns: [1, 2]\\nlr: 1e-3", "soup.yaml")
        {'seed': 3, 'runs': [1, 2], 'lr': '1e-3'}
        >>> read_yaml("seed: 1\\nseed: 2", "soup.yaml")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: soup.yaml (line 2): key 'seed' is given twice; give it once
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as err:
        raise ConfigError(f"{source} (line {err.line}): {err.message}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None


def load_config(path: str | Path) -> CookConfig:
    """Read and validate a cook config file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "soup.yaml"
        >>> text = "model: m:f\\ningredients: [a]\\nheld_out: m:e\\noutput: o\\nbatch: 3\\n"
        >>> _ = p.write_text(text)
        >>> load_config(p)
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: ...: config key 'batch': unknown key; check its spelling
    """
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config is not UTF-8 text; give a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    raw.setdefault("base_dir", str(path.parent.resolve()))
    try:
        config = CookConfig(**raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, str(path))) from None
    check_recipes(config, str(path))
    return config


def _load_file(file: Path) -> Any:
    """Import a user's ``.py`` file under a name unique to its full path.

    Two configs' ``kitchen.py`` in different folders are two modules, and ``sys.path``
    is only extended (by the file's own folder, so it can import its neighbours) while
    the file runs.
    """
    file = file.resolve()
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:12]
    name = f"_modelsoup_user_{file.stem}_{digest}"
    stamp = file.stat().st_mtime_ns
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "_modelsoup_mtime", None) == stamp:
        return loaded
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    module._modelsoup_mtime = stamp
    sys.modules[name] = module
    with _on_path(file.parent):
        try:  # a file that raises as it runs is one line naming it, not a traceback
            call_factory(lambda: spec.loader.exec_module(module), f"importing {file}",
                         "fix the error in that file")  # fmt: skip
        except BaseException:
            del sys.modules[name]
            raise
    return module


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def resolve(target: str, base_dir: str | Path = ".") -> Any:
    """Import ``module:attr`` or ``file.py:attr`` (relative to ``base_dir``).

    A top-level module that is a file in ``base_dir`` is loaded from there, under a name unique to
    its path; other modules are imported as usual, with ``base_dir`` on ``sys.path``
    only while importing.

    Example:
        >>> resolve("math:sqrt")(4.0)
        2.0
    """
    if ":" not in target:
        raise ConfigError(f"'{target}' is not an import path; write module:function")
    module_name, attr = target.rsplit(":", 1)
    base = Path(base_dir)
    local = base / f"{module_name}.py"
    if module_name.endswith(".py"):
        file = base / module_name
        if not file.exists():
            raise ConfigError(f"'{target}': {file} not found")
        module = _load_file(file)
    elif "." not in module_name and local.is_file():
        module = _load_file(local)
    else:

        def load() -> Any:
            try:
                return importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(f"'{target}': cannot import {module_name} ({err})") from None

        with _on_path(base.resolve()):
            module = call_factory(load, f"importing {module_name}", "fix the error in it")
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"'{target}': {module_name} has no attribute '{attr}'") from None


def resolve_evaluator(
    target: str | BuiltInEvaluator | None,
    base_dir: str | Path = ".",
    ingredients: Sequence[str | Path] = (),
    *,
    trust_remote_code: bool = False,
    base_model: str | Path | None = None,
) -> Any:
    """Resolve an evaluator import path: an evaluator, a function ``model -> score``
    (taken as it is), or a factory of no arguments (called once) that returns either.

    A built-in form such as ``{hf_text_classification: held.csv}`` is built with the
    tokenizer (and labels) of the first of ``ingredients`` (see :mod:`modelsoup.hf`), or of
    LoRA adapters' base model (``base_model`` when given).

    Example:
        >>> resolve_evaluator(None) is None
        True
    """
    if target is None:
        return None
    if isinstance(target, BaseModel):
        from modelsoup import hf

        build = {
            TextClassificationData: hf.text_classification,
            CausalLMLossData: hf.causal_lm_loss,
            MultipleChoiceData: hf.multiple_choice,
        }[type(target)]
        folder = hf.model_folder(ingredients, base_model)
        return build(target, folder, base_dir=base_dir, trust_remote_code=trust_remote_code)
    obj = resolve(target, base_dir)
    if hasattr(obj, "evaluate"):
        return obj
    what = (
        "an evaluator (with evaluate(model)), a function model -> score, or a function "
        "of no arguments that returns one of those"
    )
    if not callable(obj) or _is_model(obj):
        raise ConfigError(f"{target} is a {type(obj).__name__}, not an evaluator: name {what}")
    if _required_arguments(obj) >= 1:
        return obj  # the evaluator itself: model -> score
    built = call_factory(obj, f"{target}()", "check that function (it must build the evaluator "
                         "with no arguments)")  # fmt: skip
    if _is_model(built) or not (hasattr(built, "evaluate") or callable(built)):
        raise ConfigError(f"{target}() returned a {type(built).__name__}: name {what}")
    return built


def _is_model(obj: Any) -> bool:
    import torch

    module = torch.nn.Module
    return isinstance(obj, module) or (isinstance(obj, type) and issubclass(obj, module))


def _required_arguments(fn: Callable) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: treat as a factory
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


class CalledAnew:
    """The batches of a function that returns a one-shot iterator (a generator
    function): each read calls it again, so every model sees the same batches.

    Example:
        >>> def batches():
        ...     yield from range(3)
        >>> data = CalledAnew(batches, "data")
        >>> list(data), list(data)
        ([0, 1, 2], [0, 1, 2])
    """

    def __init__(self, factory: Callable[[], Any], reference: str):
        self.factory = factory
        self.reference = reference

    def __iter__(self) -> Any:
        return iter(self.factory())

    def __repr__(self) -> str:
        return f"CalledAnew({self.reference})"


def resolve_unlabeled(reference: str, base_dir: str) -> Any:
    """Unlabeled inputs named by a config: a function returning batches, or a loader
    itself. A function that returns a one-shot iterator (a generator function) is called
    again for each model that reads the batches (:class:`CalledAnew`); a one-shot
    iterator named directly is refused, since only the first model would see batches.

    Example:
        >>> resolve_unlabeled("math:pi", ".")
        3.141592653589793
    """
    from modelsoup.repair.batchnorm import reusable

    source = resolve(reference, base_dir)
    if not callable(source) or hasattr(source, "__iter__"):
        return reusable(source, reference)
    data = call_factory(source, f"{reference}()", "check that function (it must return the "
                        "batches with no arguments)")  # fmt: skip
    return CalledAnew(source, reference) if isinstance(data, Iterator) else data


def resolve_alignment_data(config: CookConfig) -> Any:
    """The unlabeled inputs ``align: activations`` matches units on, or ``None`` otherwise."""
    if config.align != "activations":
        return None
    reference = config.align_data or config.recalibrate_bn
    if not reference:
        raise ConfigError(
            "align: activations needs unlabeled inputs: set align_data (or recalibrate_bn) "
            "to a function returning them"
        )
    return resolve_unlabeled(reference, config.base_dir)


def resolve_recalibration(config: CookConfig) -> Any:
    """The BatchNorm recalibration hook a config asks for (``recalibrate_bn``), or ``None``.

    The target is a function returning unlabeled batches (or a loader itself).
    """
    if not config.recalibrate_bn:
        return None
    from modelsoup.repair import recalibrate_bn

    data = resolve_unlabeled(config.recalibrate_bn, config.base_dir)
    batches = config.recalibrate_batches

    def recalibrate(module: Any) -> None:
        recalibrate_bn(module, data, num_batches=batches)

    recalibrate.tag = f"recalibrated on {config.recalibrate_bn}, batches={batches}"
    return recalibrate


def _same_file(held: Any, test: Any, base: Path) -> Path | None:
    """The data file two built-in evaluator specs both read (other options may differ)."""
    if not (isinstance(held, TextClassificationData) and isinstance(test, TextClassificationData)):
        return None
    files = []
    for spec in (held, test):
        path = Path(spec.hf_text_classification)
        files.append((path if path.is_absolute() else base / path).resolve())
    return files[0] if files[0] == files[1] else None


def check_test_data(held: Any, test: Any) -> None:
    """Warn if the test evaluator scores the same examples as the held-out one; refuse
    two different evaluators that journals and caches could not tell apart (two
    functions, or two objects of one class without a ``name``, both called alike),
    since one's scores would then be reported as the other's.

    Example:
        >>> import warnings
        >>> score = lambda m: 1.0
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     check_test_data(score, score)
        >>> len(seen)
        1
    """
    if test is None:
        return
    if same_data(held, test):
        warn_test_is_held_out("the test evaluator scores the same examples as held_out")
        return
    name = identity(as_evaluator(held))
    if name == identity(as_evaluator(test)):
        raise ConfigError(
            f"held_out and test are different evaluators that are both named '{name}', so "
            "the scores of one would be reported as the other's: give each its own name "
            "(FunctionEvaluator(fn, name='test') for a function, or a name attribute)"
        )


def warn_test_is_held_out(what: str) -> None:
    """Warn that test scores come from the held-out data, which chose the soups.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_test_is_held_out("held_out and test both read held.csv")
        >>> "not an honest test" in str(seen[0].message)
        True
    """
    warnings.warn(
        f"{what}: the recipes chose on these examples, so their test scores are not an "
        "honest test of the soups; give test a separate data set",
        SoupWarning,
        stacklevel=3,
    )


@dataclass
class ConfigParts:
    """What a cook config names, resolved: paths made absolute, factories imported."""

    ingredients: list[str]
    model: Any
    held_out: Any
    test: Any
    recalibrate: Callable | None
    output: Path
    #: one per entry of ``ingredients``: the config's label, or ``None``
    labels: list[str | None]
    base: str | None = None


def resolve_parts(config: CookConfig) -> ConfigParts:
    """Resolve a config's paths (relative to the config file) and import paths.

    Shared by ``cook`` and ``diagnose``, so both read a config the same way (``model: hf``
    and the built-in text evaluator included).

    Example:
        >>> cfg = CookConfig(model="math:sqrt", ingredients=["a"], held_out="builtins:len",
        ...                  output="o", base_dir="/tmp")
        >>> resolve_parts(cfg).ingredients
        ['/tmp/a']
    """
    base = Path(config.base_dir)
    paths = [e.path for e in config.ingredients]
    ingredients = [p if Path(p).is_absolute() else str(base / p) for p in paths]
    base_model = None
    if config.base is not None:
        base_model = config.base if Path(config.base).is_absolute() else str(base / config.base)
    if config.model == "hf":  # the architecture from the first folder's config.json
        from modelsoup.hf import model_factory

        model = model_factory(
            ingredients,
            task=config.task,
            trust_remote_code=config.trust_remote_code,
            base=base_model,
        )
    else:
        model = resolve(config.model, base)
    trust = config.trust_remote_code
    built_in = dict(trust_remote_code=trust, base_model=base_model)
    held = resolve_evaluator(config.held_out, base, ingredients, **built_in)
    if config.test is not None and config.test == config.held_out:
        test = held  # one evaluator: cook warns that test then proves nothing
    else:
        test = resolve_evaluator(config.test, base, ingredients, **built_in)
        same = _same_file(config.held_out, config.test, base)
        if same is not None and not same_data(held, test):  # if same_data, cook warns
            warn_test_is_held_out(f"held_out and test both read {same}")
    output = Path(config.output)
    if not output.is_absolute():
        output = base / output
    labels = [e.label for e in config.ingredients]
    recalibrate = resolve_recalibration(config)
    return ConfigParts(ingredients, model, held, test, recalibrate, output, labels, base_model)
