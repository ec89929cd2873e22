"""Where recipes are registered: adding a recipe is one file plus one decorator.

Each recipe declares a frozen pydantic model of its options, so a bad config fails
at the edge with the key named; :func:`get_recipe` finds a recipe by name. A recipe
may also say how many held-out evaluations one run can make at most (``bound``), which
``modelsoup cook --dry-run`` adds up before anything is evaluated.

Example:
    >>> from modelsoup.recipes import get_recipe
    >>> get_recipe("greedy").options(order="random").order
    'random'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError, field_validator

from modelsoup._options import OptionsModel
from modelsoup._util import spelling_hint
from modelsoup.errors import ConfigError
from modelsoup.merge import MergeSpec


class RecipeOptions(OptionsModel):
    """Base of every recipe's options: unknown keys and wrong types are errors."""

    def merge_rule(self) -> MergeSpec | None:
        """The merge rule the recipe mixes its candidates with (``None``: the average)."""
        return None


class MergingOptions(RecipeOptions):
    """Options of a recipe whose candidates may be mixed with any merge rule."""

    #: the merge rule and its options, e.g. ``{rule: ties, density: 0.3}``; default: the
    #: weighted average (the accumulator's fast path)
    merge: MergeSpec | None = None

    @field_validator("merge")
    @classmethod
    def _any_size(cls, v: MergeSpec | None) -> MergeSpec | None:
        if v is not None and v.spec.members is not None:
            raise ValueError(
                f"merge rule '{v.rule}' merges exactly {v.spec.members} members, but this "
                "recipe's candidates change in size; use the search recipe on two ingredients, "
                "or modelsoup average"
            )
        return v

    def merge_rule(self) -> MergeSpec | None:
        return self.merge


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    fn: Callable
    options: type[RecipeOptions]
    #: does it need a taster (held-out evaluations)? uniform and weighted do not
    tastes: bool = True
    summary: str = ""
    #: ``bound(ingredients, options)``: the most held-out evaluations one run makes,
    #: each ingredient's own score aside (those are shared by every recipe); ``None``
    #: when the recipe cannot say
    bound: Callable[[Sequence[Any], RecipeOptions], int] | None = None

    def check_options(
        self, options: Mapping[str, Any], *, source: str | None = None, where: str = ""
    ) -> RecipeOptions:
        """The recipe's options, validated; an unknown key, a wrong type or a value out of
        range is a one-line :class:`~modelsoup.errors.ConfigError` naming the key (under
        ``where``, e.g. ``recipes.0``, in ``source``, e.g. the config file).

        Example:
            >>> from modelsoup.recipes import get_recipe
            >>> get_recipe("greedy").check_options({"order": "random"}).order
            'random'
            >>> get_recipe("greedy").check_options({"ordr": "random"}, where="recipes.0")
            Traceback (most recent call last):
            ...
            modelsoup.errors.ConfigError: config key 'recipes.0.ordr' (greedy): unknown option; did you mean 'order'?
        """  # noqa: E501
        try:
            return self.options(**options)
        except ValidationError as err:
            # a misspelt key also makes the real one "missing": report the misspelling first
            first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
            key = ".".join(str(x) for x in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = "unknown option" + spelling_hint(key, self.options.model_fields)
            elif first["type"] == "missing":
                msg = "required option is missing"
            place = ".".join(p for p in (where, key) if p) or "(top level)"
            prefix = f"{source}: " if source else ""
            raise ConfigError(f"{prefix}config key '{place}' ({self.name}): {msg}") from None


RECIPES: dict[str, RecipeSpec] = {}


def register(
    name: str,
    options: type[RecipeOptions],
    *,
    tastes: bool = True,
    bound: Callable[[Sequence[Any], RecipeOptions], int] | None = None,
):
    """Register a recipe function under ``name`` with its options model (and, if it can
    say, the most held-out evaluations one run makes: ``bound(ingredients, options)``)."""

    def wrap(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        RECIPES[name] = RecipeSpec(name, fn, options, tastes, doc[0] if doc else "", bound)
        return fn

    return wrap


def get_recipe(name: str) -> RecipeSpec:
    """The registered recipe called ``name``; the error lists the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ConfigError(f"recipe '{name}' is unknown; known recipes: {known}") from None
