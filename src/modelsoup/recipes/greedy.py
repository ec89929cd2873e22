"""Greedy soup (Wortsman et al. 2022, Algorithm 1; the seed paper's Algorithm 1).

Order the ingredients by their own held-out score (``order="sorted"``) or at random
(``order="random"``, from ``seed``). Start from the first; try adding each next one,
and keep it if the candidate soup scores at least as well (``>=``, the paper's rule;
``strict=True`` gives ``>``, the official code's rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import PositiveInt

from modelsoup.merge import MergeSpec
from modelsoup.recipes._common import greedy_walk, ingredient_order, member_weights
from modelsoup.recipes.registry import MergingOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class GreedyOptions(MergingOptions):
    order: Literal["sorted", "random"] = "sorted"
    seed: int = 0
    strict: bool = False
    max_ingredients: PositiveInt | None = None
    #: random orders to run (the report shows mean and std); the first run's soup is kept
    runs: PositiveInt = 1


def _bound(pool: Sequence[Any], options: GreedyOptions) -> int:
    """Each ingredient after the first is tried once; the first's score is its own, unless
    a merge rule moves it (``base + lambda tau`` is not the ingredient): then it is scored
    as merged too."""
    rule = options.merge_rule()
    return len(pool) - 1 + (rule is not None and not rule.is_average)


@register("greedy", GreedyOptions, bound=_bound)
def greedy_soup(
    taster: Taster,
    *,
    order: str = "sorted",
    seed: int = 0,
    strict: bool = False,
    max_ingredients: int | None = None,
    merge: Mapping | MergeSpec | None = None,
) -> Soup:
    """Greedy soup: add ingredients one by one, keep each that does not hurt held-out.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (1.0, 0.0, 3.0)])
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> score = lambda m: 1 - abs(float(m.weight.detach()) - 2.0)   # best soup: weight 2
        >>> soup = greedy_soup(Taster(ings, model, score))
        >>> [ings[i].label for i in soup.chosen], soup.scores["held_out"]
        (['model0', 'model2'], 1.0)
    """
    with taster.merging(merge):
        return _greedy_soup(
            taster, order=order, seed=seed, strict=strict, max_ingredients=max_ingredients
        )


def _greedy_soup(
    taster: Taster,
    *,
    order: str = "sorted",
    seed: int = 0,
    strict: bool = False,
    max_ingredients: int | None = None,
) -> Soup:
    positions = ingredient_order(taster, order, seed)
    members, best, trace = greedy_walk(
        taster,
        positions,
        lambda candidate, best: taster.score_members(
            candidate, to_beat=best, strict=strict, incumbent=candidate[:-1]
        ),
        strict=strict,
        max_ingredients=max_ingredients,
        trace_best=True,
    )
    options = {"order": order, "seed": seed, "strict": strict, "max_ingredients": max_ingredients}
    return taster.soup(
        member_weights(len(taster.ingredients), members),
        recipe="greedy",
        options=options,
        trace=trace,
        scores={"held_out": best},
    )
