"""mergekit configs: a soup card written as one, and the subset modelsoup reads.

:func:`card_to_mergekit` turns a soup card into a mergekit YAML config (``merge_method``,
``base_model``, ``models`` with their weights, the rule's options) for the rules whose
definitions the two share:

- ``linear``, ``task_arithmetic`` and ``ties``: mergekit's merge of the config equals
  the soup within float rounding (TIES: both keep ``floor(density n)`` magnitudes; in
  the rare entry whose sign vote is an exact tie mergekit picks ``+``, modelsoup none);
- ``dare_linear`` and ``dare_ties``: the drop masks differ (mergekit draws them from
  torch's global generator, and rescales by the L1 norm rather than by ``1/density``),
  so the two agree only statistically.

``slerp`` (mergekit 0.1.5 interpolates each row, modelsoup each tensor), ``model_stock``,
``wise_ft`` and ``alpha``, and per-tensor coefficients (layer-wise soups) have no
equivalent config and are refused. :func:`mergekit_to_average` reads the same subset:
whole-model ``models:`` lists (no ``slices:``), one value per option, and refuses
anything else with the key named.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelsoup._options import WrittenNumber
from modelsoup.errors import ConfigError, SoupWarning

#: modelsoup rule -> mergekit ``merge_method``, for the rules a config reproduces
EXPORTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: mergekit's own default of ``normalize`` per method (its registry)
_DEFAULT_NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
}


def card_to_mergekit(card: Mapping[str, Any]) -> dict[str, Any]:
    """A mergekit config that redoes the soup of ``card`` (a soup card, as a dict).

    Example:
        >>> card = {"merge": {"rule": "ties", "density": 0.3, "lambda": 1.0},
        ...         "base": {"path": "base/"}, "options": {"normalize": True},
        ...         "ingredients": [{"path": "a/", "coefficient": 0.5},
        ...                         {"path": "b/", "coefficient": 0.5}]}
        >>> config = card_to_mergekit(card)
        >>> config["merge_method"], config["base_model"], config["models"][0]
        ('ties', 'base/', {'model': 'a/', 'parameters': {'weight': 0.5, 'density': 0.3}})
    """
    merge = dict(card.get("merge") or {"rule": "linear"})
    rule = merge.pop("rule")
    if merge.get("alpha") is not None or rule == "wise_ft":
        raise ConfigError("mergekit has no WiSE-FT (alpha): this soup has no mergekit config")
    if rule not in EXPORTED:
        raise ConfigError(
            f"merge rule '{rule}' has no mergekit equivalent that reproduces it; "
            f"exported rules: {', '.join(EXPORTED)}"
        )
    if card.get("tensor_coefficients"):
        raise ConfigError("a soup with per-tensor coefficients (layer-wise) has no mergekit config")
    models = []
    for row in card["ingredients"]:
        if not math.isfinite(row["coefficient"]) or row["coefficient"] < 0:
            raise ValueError(f"ingredient {row.get('label')} has coefficient {row['coefficient']}")
        if row["coefficient"] == 0:
            continue
        if row.get("path") is None:
            raise ConfigError(f"ingredient {row.get('label')} was in memory: it has no path")
        params: dict[str, Any] = {"weight": row["coefficient"]}
        if "density" in merge:
            params["density"] = merge["density"]
        models.append({"model": row["path"], "parameters": params})
    if not models:
        raise ValueError("no ingredient has a coefficient above zero")
    config: dict[str, Any] = {"merge_method": rule, "models": models}
    parameters: dict[str, Any] = {}
    if rule == "linear":
        parameters["normalize"] = bool((card.get("options") or {}).get("normalize", True))
    else:
        base = card.get("base") or {}
        if base.get("path") is None:
            raise ConfigError(f"merge rule '{rule}' needs a base model on disk; the card has none")
        config["base_model"] = base["path"]
        # the coefficients are already normalised: the rule's own division where it has one
        parameters["normalize"] = rule in ("ties", "dare_ties")
        parameters["lambda"] = merge.get("lambda", 1.0)
    config["parameters"] = parameters
    # the dtype mergekit computes in: the one the soup was summed in (float32 by default)
    config["dtype"] = (card.get("dtype_policy") or {}).get("accumulate", "float32")
    written = (card.get("dtype_policy") or {}).get("written")
    if written is not None:
        if len(written) != 1 or written[0] not in _MERGEKIT_DTYPES:
            raise ConfigError(
                f"the soup was written in {', '.join(written) or 'no floating dtype'}; a "
                "mergekit config names one output dtype (out_dtype) of "
                f"{', '.join(_MERGEKIT_DTYPES)}: write the soup with --out-dtype to export it"
            )
        if written[0] != config["dtype"]:  # mergekit writes in `dtype` unless told
            config["out_dtype"] = written[0]
    return config


@dataclass(frozen=True)
class MergekitAverage:
    """What ``modelsoup average`` needs to redo a mergekit config."""

    sources: list[str]
    weights: list[float] | None
    base: str | None
    merge: dict[str, Any]
    normalize: bool
    #: the dtype mergekit would write (``out_dtype``, else ``dtype``), as ``--out-dtype``
    #: names it
    out_dtype: str | None = None
    #: the dtype to sum in: float64 when mergekit's ``dtype`` is, else float32 (mergekit's
    #: float16 and bfloat16 arithmetic is not redone)
    accum_dtype: str = "float32"


#: the floating dtypes mergekit 0.1.5 writes (its ``dtype_from_name``)
_MERGEKIT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtype names (mergekit's, a soup card's) -> ``--out-dtype`` names
OUT_DTYPE_FLAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
#: what mergekit's ``rescale`` must be for the rule modelsoup computes (DARE: by
#: 1/density; TIES: none), by method
_RESCALE = {"ties": False, "dare_ties": True, "dare_linear": True}


def _number(value: Any, where: str) -> float:
    if isinstance(value, WrittenNumber):  # density: 1e-1, a number to mergekit too
        value = value.number()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {value!r} is not a number")
    return float(value)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: give a mapping of option names to values")
    return dict(value)


#: the methods that drop entries by ``density``
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
_ALLOWED_TOP = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype"}


def mergekit_to_average(config: Any, source: str = "mergekit config") -> MergekitAverage:
    """Read the subset of mergekit configs modelsoup supports; refuse the rest, naming the key.

    Example:
        >>> plan = mergekit_to_average({"merge_method": "task_arithmetic", "base_model": "b",
        ...     "models": [{"model": "x", "parameters": {"weight": 1.0}}],
        ...     "parameters": {"lambda": 0.5}})
        >>> plan.sources, plan.merge, plan.normalize
        (['x'], {'rule': 'task_arithmetic', 'lambda': 0.5}, False)
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: a mergekit config is a mapping of keys to values")
    if "slices" in config:
        raise ConfigError(f"{source}: key 'slices': only whole-model 'models:' lists are read")
    for key in config:
        if key not in _ALLOWED_TOP:
            raise ConfigError(f"{source}: key '{key}' is not supported; remove it")
    method = config.get("merge_method")
    if method not in EXPORTED:
        raise ConfigError(
            f"{source}: key 'merge_method': '{method}' is not supported; "
            f"use one of {', '.join(EXPORTED)}"
        )
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: key 'models': a non-empty list of {{model: path}} is needed")
    shared = _mapping(config.get("parameters"), f"{source}: key 'parameters'")
    for key, value in shared.items():
        if key not in ("normalize", "lambda", "int8_mask", "rescale"):
            raise ConfigError(f"{source}: key 'parameters.{key}' is not supported")
        if isinstance(value, list | dict):
            raise ConfigError(f"{source}: key 'parameters.{key}': give one value, not a gradient")
        if key != "lambda" and not isinstance(value, bool):
            raise ConfigError(
                f"{source}: key 'parameters.{key}': write true or false, not {value!r}"
            )
    base = config.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{source}: key 'base_model': give a path, not {base!r}")
    sources, weights, densities, undensed = [], [], set(), 0
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise ConfigError(f"{source}: key 'models.{i}': give {{model: path, parameters: ...}}")
        for key in entry:
            if key not in ("model", "parameters"):
                raise ConfigError(f"{source}: key 'models.{i}.{key}' is not supported; remove it")
        params = _mapping(entry.get("parameters"), f"{source}: key 'models.{i}.parameters'")
        for key, value in params.items():
            if key not in ("weight", "density"):
                raise ConfigError(f"{source}: key 'models.{i}.parameters.{key}' is not supported")
            if isinstance(value, list | dict):
                raise ConfigError(
                    f"{source}: key 'models.{i}.parameters.{key}': give one value, not a gradient"
                )
        if entry["model"] == base and method != "linear":
            continue  # its task vector is zero: mergekit's task-vector methods skip it
        where = f"{source}: key 'models.{i}.parameters"
        if "weight" not in params:
            raise ConfigError(
                f"{where}.weight' is missing; mergekit's {method} needs a weight for every "
                "model: give one"
            )
        if "density" in params and method not in _DENSITY_METHODS:
            raise ConfigError(
                f"{where}.density': {method} keeps every entry (mergekit ignores a density "
                f"there); remove it, or use one of {', '.join(_DENSITY_METHODS)}"
            )
        sources.append(entry["model"])
        weights.append(_number(params["weight"], f"{where}.weight'"))
        if "density" in params:
            densities.add(_number(params["density"], f"{where}.density'"))
        else:
            undensed += 1
    if not sources:
        raise ConfigError(f"{source}: key 'models': no model besides the base")
    if len(densities) > 1 or (densities and undensed):
        # a model without one has mergekit's default, 1.0: that is a second density too
        raise ConfigError(
            f"{source}: key 'models': one density for every model is supported; give the "
            "same density to every model, or to none"
        )
    if method != "linear" and base is None:
        raise ConfigError(f"{source}: key 'base_model': '{method}' needs one")
    if method == "linear" and "lambda" in shared:
        raise ConfigError(
            f"{source}: key 'parameters.lambda': linear has no lambda (mergekit ignores it "
            "there); remove it, or use task_arithmetic"
        )
    if method == "linear" and base is not None and base not in sources:
        warnings.warn(
            f"{source}: key 'base_model': linear averages the models and does not use a "
            f"base; {base} is not part of the soup",
            SoupWarning,
            stacklevel=2,
        )
    if shared.get("int8_mask"):
        raise ConfigError(f"{source}: key 'parameters.int8_mask' is not read; remove it")
    if "rescale" in shared and bool(shared["rescale"]) != _RESCALE.get(method):
        done = {True: "rescales by 1/density", False: "does not rescale"}
        raise ConfigError(
            f"{source}: key 'parameters.rescale': modelsoup's {method} "
            f"{done.get(_RESCALE.get(method), 'has no rescale')}; remove the key"
        )
    normalize = bool(shared.get("normalize", _DEFAULT_NORMALIZE[method]))
    merge: dict[str, Any] = {"rule": method}
    if method != "linear":
        merge["lambda"] = _number(shared.get("lambda", 1.0), f"{source}: key 'parameters.lambda'")
    named = {}
    for key in ("dtype", "out_dtype"):  # each checked: a bad dtype beside out_dtype is no dtype
        given = config.get(key)
        if isinstance(given, str):
            given = given.removeprefix("torch.")  # as mergekit's dtype_from_name reads it
        if config.get(key) is not None and (
            not isinstance(given, str) or given not in OUT_DTYPE_FLAGS
        ):
            raise ConfigError(
                f"{source}: key '{key}': {config.get(key)!r} is not one of "
                f"{', '.join(OUT_DTYPE_FLAGS)}"
            )
        named[key] = given
    dtype = named["out_dtype"] or named["dtype"]
    if method in _DENSITY_METHODS:
        merge["density"] = densities.pop() if densities else 1.0
    if method in ("ties", "dare_ties") and not normalize:
        raise ConfigError(
            f"{source}: key 'parameters.normalize': {method} without normalize sums the "
            "agreeing entries; modelsoup takes their disjoint mean (TIES): set normalize: true"
        )
    return MergekitAverage(
        sources,
        weights,
        base if method != "linear" else None,
        merge,
        normalize,
        OUT_DTYPE_FLAGS.get(dtype) if dtype is not None else None,
        "float64" if named["dtype"] == "float64" else "float32",
    )
