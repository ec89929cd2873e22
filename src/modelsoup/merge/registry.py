"""Where merge rules are registered: adding a rule is one file plus one decorator.

A merge rule says how the members of a soup become one tensor. Each rule is a
function of one :class:`Piece` (a flat slice of one tensor: the members' values, their
coefficients, the base's values) and of its options, a frozen pydantic model, so a bad
option fails at the edge with the key named. A rule declares what it needs:

- ``needs_base``: the rule works on task vectors ``theta_i - theta_base``;
- ``scope="piece"``: elementwise, so a tensor is merged piece by piece, as the
  weighted average is; ``scope="tensor"``: the rule needs the whole tensor at once
  (TIES's top-k by magnitude);
- ``statistics``: a function of a piece whose results add up over the pieces (dot
  products, squared norms); the whole tensor's sum is passed to the rule as
  ``piece.stats`` (SLERP's angle, Model Stock's cosines), at the cost of a second read;
- ``members``: the exact number of members the rule merges (SLERP: two).

Every rule also takes ``alpha``: WiSE-FT on top of the rule's result,
``(1 - alpha) theta_base + alpha theta_merged``.

Example:
    >>> spec = as_merge({"rule": "ties", "density": 0.3})
    >>> spec.rule, spec.options.density, spec.needs_base
    ('ties', 0.3, True)
    >>> as_merge({"rule": "ties", "density": 1.5})
    Traceback (most recent call last):
    ...
    modelsoup.errors.ConfigError: merge rule 'ties': option 'density': ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from modelsoup._options import OptionsModel
from modelsoup.errors import ConfigError

#: at most this many elements per piece of the average and the elementwise rules (1 MiB
#: of float32 per member): the members' pieces then stay in the processor's cache
#: through a rule's several passes, instead of each pass going out to memory
CACHE_ELEMENTS = 1 << 18


class MergeOptions(OptionsModel):
    """Base of every rule's options: unknown keys, wrong types and bad ranges are errors."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    #: WiSE-FT on top of the rule: (1 - alpha) base + alpha merged, alpha in [0, 1]
    alpha: float | None = Field(default=None, ge=0.0, le=1.0)


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{v} is not a finite number")
    return v


class ScaledOptions(MergeOptions):
    """Options of rules that scale the merged task vector by lambda."""

    lambda_: float = Field(default=1.0, alias="lambda")

    @field_validator("lambda_")
    @classmethod
    def _lambda(cls, v: float) -> float:
        return _finite(v)


class DensityOptions(ScaledOptions):
    """Options of rules that keep a fraction ``density`` of each task vector."""

    density: float = Field(gt=0.0, le=1.0)


@dataclass
class Piece:
    """One flat slice of one tensor, as a rule sees it.

    Attributes:
        name: the tensor's name.
        start: where the slice starts in the flattened tensor.
        members: each member's values, in the accumulation dtype (fresh copies: a rule
            may change them in place).
        weights: each member's coefficient (normalised to sum 1 unless the soup says not).
        positions: each member's position in the pool (DARE's seeds derive from it).
        base: the base's values, or ``None`` when the soup has no base.
        stats: the rule's ``statistics`` summed over the whole tensor, or ``None``.
    """

    name: str
    start: int
    members: list[torch.Tensor]
    weights: list[float]
    positions: list[int]
    base: torch.Tensor | None = None
    stats: torch.Tensor | None = None

    def task_vectors(self) -> list[torch.Tensor]:
        """``theta_i - theta_base`` for every member (computed in place: members change)."""
        assert self.base is not None
        return [m.sub_(self.base) for m in self.members]


@dataclass(frozen=True)
class RuleSpec:
    name: str
    fn: Callable[[Piece, MergeOptions], torch.Tensor]
    options: type[MergeOptions]
    needs_base: bool
    scope: Literal["piece", "tensor"]
    statistics: Callable[[Piece, MergeOptions], torch.Tensor] | None
    members: int | None
    summary: str


RULES: dict[str, RuleSpec] = {}


def register_rule(
    name: str,
    options: type[MergeOptions],
    *,
    needs_base: bool,
    scope: Literal["piece", "tensor"] = "piece",
    statistics: Callable[[Piece, MergeOptions], torch.Tensor] | None = None,
    members: int | None = None,
):
    """Register a merge rule function ``fn(piece, options) -> tensor`` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        RULES[name] = RuleSpec(
            name, fn, options, needs_base, scope, statistics, members, doc[0] if doc else ""
        )
        return fn

    return wrap


def get_rule(name: str) -> RuleSpec:
    """The registered merge rule called ``name``; the error lists the known ones.

    Example:
        >>> get_rule("slerp").members
        2
    """
    try:
        return RULES[name]
    except KeyError:
        known = ", ".join(sorted(RULES))
        raise ConfigError(f"merge rule '{name}' is unknown; known rules: {known}") from None


def _first_problem(err: ValidationError, rule: RuleSpec) -> str:
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    given = ".".join(str(x) for x in first["loc"])
    key = given.replace("lambda_", "lambda")  # lambda is a keyword: lambda_ in Python
    if first["type"] == "extra_forbidden":
        field = rule.options.model_fields.get(given)
        if field is not None and field.alias:  # its Python name beside its config name
            return (
                f"option '{given}' is '{field.alias}' given twice; give it once, as '{field.alias}'"
            )
        known = sorted(
            f.alias or n for n, f in rule.options.model_fields.items() if n != "alpha"
        ) + ["alpha"]
        return (
            f"option '{key}': rule '{rule.name}' has no such option (it takes {', '.join(known)})"
        )
    if first["type"] == "missing":
        return f"option '{key}': required, give a value"
    return f"option '{key}': {first['msg'].removeprefix('Value error, ')}"


class MergeSpec(OptionsModel):
    """A merge rule and its options, as a config writes it: ``{rule: ties, density: 0.3}``.

    Example:
        >>> MergeSpec(rule="task_arithmetic", **{"lambda": 0.5}).canonical()
        {'rule': 'task_arithmetic', 'lambda': 0.5}
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    rule: str = "linear"
    _options: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        # ``merge: model_stock`` in a config: a rule named alone takes its defaults
        return {"rule": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        try:
            spec = get_rule(self.rule)
        except ConfigError as err:  # as a validation error: a config names its key
            raise ValueError(str(err)) from None
        try:
            self._options = spec.options(**(self.model_extra or {}))
        except ValidationError as err:
            raise ValueError(f"merge rule '{self.rule}': {_first_problem(err, spec)}") from None
        return self

    @property
    def spec(self) -> RuleSpec:
        """The registered rule."""
        return get_rule(self.rule)

    @property
    def options(self) -> Any:
        """The rule's validated options."""
        return self._options

    @property
    def needs_base(self) -> bool:
        """Does this rule (or WiSE-FT on top of it) need a base model?"""
        return self.spec.needs_base or self.options.alpha is not None

    @property
    def is_average(self) -> bool:
        """The plain weighted average, which the incremental accumulator computes."""
        return self.rule == "linear" and self.options.alpha is None

    def canonical(self) -> dict[str, Any]:
        """The rule and every option that was set or defaults (for cards and journal keys)."""
        opts = self.options.model_dump(by_alias=True, exclude_none=True)
        return {"rule": self.rule, **opts}

    def describe(self) -> str:
        """A short label: the rule and its options, e.g. ``ties density=0.3``.

        Example:
            >>> as_merge({"rule": "ties", "density": 0.3}).describe()
            'ties density=0.3, lambda=1'
        """
        opts = self.canonical()
        opts.pop("rule")
        if "lambda" in opts and "density" in opts:  # density first: it is the one people tune
            opts = {"density": opts.pop("density"), **opts}
        text = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items()
        )
        return f"{self.rule} {text}".strip()


def as_merge(merge: str | Mapping[str, Any] | MergeSpec | None) -> MergeSpec:
    """A :class:`MergeSpec` from a rule name, a mapping ``{rule: ..., options...}`` or ``None``
    (the weighted average); a bad rule or option is a :class:`ConfigError`.

    Example:
        >>> as_merge(None).is_average, as_merge({"rule": "slerp", "t": 0.5}).rule
        (True, 'slerp')
    """
    if isinstance(merge, MergeSpec):
        return merge
    if merge is None:
        merge = {"rule": "linear"}
    elif isinstance(merge, str):
        merge = {"rule": merge}
    if not isinstance(merge, Mapping):
        raise ConfigError(f"merge must be a rule name or a mapping with 'rule'; got {merge!r}")
    odd = [key for key in merge if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"merge option names must be strings; got {odd[0]!r}: write it as a name")
    try:
        return MergeSpec(**dict(merge))
    except ValidationError as err:
        msg = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(msg) from None


def check_base(merge: MergeSpec, base: object | None) -> None:
    """Refuse a rule that needs a base model when none is given, naming the rule.

    Example:
        >>> check_base(as_merge("task_arithmetic"), None)
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: merge rule 'task_arithmetic' works on task vectors ...
    """
    if base is None and merge.needs_base:
        what = "WiSE-FT (alpha)" if not merge.spec.needs_base else f"merge rule '{merge.rule}'"
        if merge.spec.needs_base:
            what += " works on task vectors theta_i - theta_base and"
        raise ConfigError(
            f"{what} needs a base model: give the pretrained start the ingredients were "
            "fine-tuned from (base= in Python, --base on the command line, base: in a cook config)"
        )


def check_members(merge: MergeSpec, count: int) -> None:
    """Refuse a soup whose number of members the rule cannot merge (SLERP: exactly two).

    Example:
        >>> check_members(as_merge({"rule": "slerp", "t": 0.5}), 3)
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: merge rule 'slerp' merges exactly 2 members; this soup has 3
    """
    want = merge.spec.members
    if want is not None and count != want:
        raise ConfigError(
            f"merge rule '{merge.rule}' merges exactly {want} members; this soup has {count}"
        )
