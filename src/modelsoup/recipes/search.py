"""Search: choose one scalar option of a merge rule on held-out data.

Task arithmetic's ``lambda`` and WiSE-FT's ``alpha`` are chosen on held-out data in
their papers (Ilharco et al. 2023, Sec. 2; Wortsman et al. 2022, Sec. 3); TIES's and
DARE's ``density`` and SLERP's ``t`` are tuned the same way. This recipe does it for
any rule's ``lambda``, ``density``, ``t`` or ``alpha``: the soup of every ingredient
(uniform weights) is merged with each candidate value and scored, and the best one is
kept (the first, on ties). Candidates come from a ``grid``, or from golden-section
search within ``bounds`` (both ends, then ``iterations`` steps, each shrinking the
interval by 0.618), which assumes one peak between the bounds. Values are rounded to
6 significant digits, and every candidate is journaled under its rule and options,
so an interrupted search resumes where it stopped.

Example config entry::

    - {name: search, merge: {rule: task_arithmetic}, option: lambda, bounds: [0, 2]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import PositiveInt, ValidationInfo, field_validator, model_validator

from modelsoup._options import WrittenNumber
from modelsoup.errors import ConfigError
from modelsoup.merge import MergeSpec, as_merge, check_members
from modelsoup.recipes.registry import RecipeOptions, get_recipe, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster

#: where each option is searched when no bounds are given (density 0 keeps nothing)
DEFAULT_BOUNDS = {
    "lambda": (0.0, 2.0),
    "density": (0.05, 1.0),
    "t": (0.0, 1.0),
    "alpha": (0.0, 1.0),
}
#: 1 / golden ratio
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


class SearchOptions(RecipeOptions):
    #: the rule and its other options, e.g. ``{rule: ties, density: 0.3}``
    merge: dict[str, Any]
    option: Literal["lambda", "density", "t", "alpha"]
    grid: list[float] | None = None
    bounds: tuple[float, float] | None = None
    #: golden-section steps after the two bounds and the two first inner points
    iterations: PositiveInt | None = None

    def steps(self) -> int:
        """Golden-section steps (8 unless given).

        Example:
            >>> SearchOptions(merge={"rule": "task_arithmetic"}, option="lambda").steps()
            8
        """
        return 8 if self.iterations is None else self.iterations

    @field_validator("merge")
    @classmethod
    def _numbers(cls, merge: dict[str, Any]) -> dict[str, Any]:
        # the rule's options as numbers (density: 2e-1), as a merge rule reads them: the
        # row's label and the card show what the rule used
        return {k: v.number() if isinstance(v, WrittenNumber) else v for k, v in merge.items()}

    @field_validator("option")
    @classmethod
    def _chosen(cls, option: str, info: ValidationInfo) -> str:
        merge = info.data.get("merge") or {}
        if option in {k.removesuffix("_") for k in merge}:  # lambda_ is lambda
            raise ValueError(f"merge sets {option}, which the search chooses; remove it")
        return option

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if grid is not None and not grid:
            raise ValueError("grid is empty; give at least one value")
        if grid is not None and not all(math.isfinite(v) for v in grid):
            raise ValueError(f"grid {grid} holds a value that is not a finite number")
        _check_values(grid or (), info.data)
        return grid

    @field_validator("bounds")
    @classmethod
    def _bounds(
        cls, bounds: tuple[float, float] | None, info: ValidationInfo
    ) -> tuple[float, float] | None:
        if bounds is not None and not all(math.isfinite(v) for v in bounds):
            raise ValueError(f"bounds {list(bounds)} must be finite numbers")
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"bounds {list(bounds)} must be [low, high] with low < high")
        _check_values(bounds or (), info.data)
        return bounds

    @model_validator(mode="after")
    def _check(self) -> SearchOptions:
        if self.grid is not None and self.bounds is not None:
            raise ValueError("give grid or bounds, not both")
        if self.grid is not None and self.iterations is not None:
            raise ValueError(
                "iterations counts golden-section steps within bounds; a grid tries each of "
                "its values: give bounds, or drop iterations"
            )
        if self.grid is None and self.bounds is None:
            _check_values(self.search_bounds(), {"merge": self.merge, "option": self.option})
        return self

    def search_bounds(self) -> tuple[float, float]:
        """The interval a golden-section search explores."""
        return self.bounds or DEFAULT_BOUNDS[self.option]

    def merge_rule(self) -> MergeSpec:
        first = self.grid[0] if self.grid else self.search_bounds()[0]
        return as_merge({**self.merge, self.option: first})


def _check_values(values: Any, given: Mapping[str, Any]) -> None:
    # each value the search would try is a valid option of the rule (merge and option
    # are checked first: when either failed, there is nothing to check against)
    merge, option = given.get("merge"), given.get("option")
    if merge is None or option is None:
        return
    for value in values:
        try:
            spec = as_merge({**merge, option: value})
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if option not in spec.canonical():
            raise ValueError(f"merge rule '{spec.rule}' has no option '{option}'")


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def golden_section(
    score: Any, low: float, high: float, iterations: int, better: Any
) -> list[float]:
    """Golden-section search for the best of ``score`` on ``[low, high]``; returns every
    value tried, in order (the bounds first).

    Example:
        >>> tried = golden_section(lambda x: -(x - 0.3) ** 2, 0.0, 1.0, 20, lambda a, b: a >= b)
        >>> abs(max(tried, key=lambda x: -(x - 0.3) ** 2) - 0.3) < 1e-3
        True
    """
    tried = [low, high]
    score(low)
    score(high)
    a, b = low, high
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = score(c), score(d)
    tried += [c, d]
    for _ in range(iterations):
        if better(fc, fd):  # the peak is left of d
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = score(c)
            tried.append(c)
        else:
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = score(d)
            tried.append(d)
    return tried


def _bound(pool: Sequence[Any], options: SearchOptions) -> int:
    """One evaluation per value tried: each grid value, or both bounds, the two first
    inner points and one per golden-section step."""
    if options.grid is not None:
        return len({_rounded(v) for v in options.grid})
    return 4 + options.steps()


@register("search", SearchOptions, bound=_bound)
def search_soup(
    taster: Taster,
    *,
    merge: Mapping[str, Any],
    option: str,
    grid: Sequence[float] | None = None,
    bounds: Sequence[float] | None = None,
    iterations: int | None = None,
) -> Soup:
    """Search: the soup of every ingredient, with the merge option held-out likes best.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), 3.0)}])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False),
        ...            lambda m: -abs(float(m.weight.detach()) - 2.0),   # best weight: 2
        ...            base={"weight": torch.ones(1, 1)})
        >>> soup = search_soup(t, merge={"rule": "task_arithmetic"}, option="lambda",
        ...                    grid=[0.0, 0.5, 1.0])
        >>> soup.options["chosen"], soup.merge.options.lambda_
        (0.5, 0.5)
    """
    given = {"merge": dict(merge), "option": option}
    if iterations is not None:  # a grid takes none
        given["iterations"] = iterations
    if grid is not None:
        given["grid"] = list(grid)
    if bounds is not None:
        given["bounds"] = tuple(bounds)
    opts = get_recipe("search").check_options(given, source="search_soup()")
    check_members(opts.merge_rule(), len(taster.ingredients))  # slerp: two, before any work
    weights = [1.0] * len(taster.ingredients)
    scores: dict[float, float] = {}
    trace: list[dict] = []

    def score(value: float) -> float:
        value = _rounded(value)
        if value not in scores:
            with taster.merging({**opts.merge, option: value}):
                scores[value] = taster.score(weights)
            trace.append({"step": len(trace) + 1, option: value, "score": scores[value]})
        return scores[value]

    if opts.grid is not None:
        for value in opts.grid:
            score(value)
    else:
        low, high = opts.search_bounds()
        golden_section(score, low, high, opts.steps(), taster.better)
    values = list(scores)
    best = values[taster.best([scores[v] for v in values])]
    with taster.merging({**opts.merge, option: best}):
        return taster.soup(
            weights,
            recipe="search",
            options={
                "merge": dict(opts.merge),
                "option": option,
                "grid": opts.grid,
                "bounds": list(opts.search_bounds()) if opts.grid is None else None,
                "iterations": opts.steps() if opts.grid is None else None,
                "chosen": best,
            },
            trace=trace,
            scores={"held_out": scores[best]},
        )
