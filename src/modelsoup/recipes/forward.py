"""Forward-selection greedy soup (the seed blog's ``GreedySoup``).

Start from the best ingredient. At each step try adding every remaining ingredient
and keep the one whose soup scores best; stop when none improves the held-out score
(strictly, so ties cannot loop) or at ``max_ingredients``. It costs up to k^2/2
evaluations where greedy costs k, and can find pairs that greedy's fixed order misses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import PositiveInt

from modelsoup.merge import MergeSpec
from modelsoup.recipes._common import member_weights
from modelsoup.recipes.registry import MergingOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class ForwardOptions(MergingOptions):
    max_ingredients: PositiveInt | None = None


def _bound(pool: Sequence[Any], options: ForwardOptions) -> int:
    """Step k tries every ingredient not yet in: n-1, n-2, ... up to ``max_ingredients``."""
    n = len(pool)
    size = min(n, options.max_ingredients or n)
    return sum(n - k for k in range(1, size))


@register("forward", ForwardOptions, bound=_bound)
def forward_selection_soup(
    taster: Taster, *, max_ingredients: int | None = None, merge: Mapping | MergeSpec | None = None
) -> Soup:
    """Forward selection: repeatedly add the ingredient that helps most, until none helps.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> vals = (2.5, 0.0, 1.0, 4.0)
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in vals])
        >>> score = lambda m: -abs(float(m.weight.detach()) - 2.0)
        >>> soup = forward_selection_soup(Taster(ings, torch.nn.Linear(1, 1, bias=False), score))
        >>> sorted(ings[i].label for i in soup.chosen)
        ['model0', 'model2']
    """
    with taster.merging(merge):
        return _forward_selection_soup(taster, max_ingredients=max_ingredients)


def _forward_selection_soup(taster: Taster, *, max_ingredients: int | None = None) -> Soup:
    n = len(taster.ingredients)
    individual = taster.individual_scores()
    members = [taster.best(individual)]
    # the start as the rule merges it (task arithmetic scales it, WiSE-FT pulls it to the
    # base): its own score as an ingredient is another model's
    best = taster.score_members(members)
    trace = [
        {
            "step": 1,
            "added": taster.ingredients[members[0]].label,
            "score": best,
            "size": 1,
            "tried": 0,
        }
    ]
    while max_ingredients is None or len(members) < max_ingredients:
        remaining = [i for i in range(n) if i not in members]
        if not remaining:
            break
        # a candidate must beat the soup strictly; one that provably cannot may stop early
        scores = []
        for r, i in enumerate(remaining):
            # the next candidate adds the next remaining ingredient: read it meanwhile
            taster.prefetch(remaining[r + 1] if r + 1 < len(remaining) else None)
            scores.append(
                taster.score_members([*members, i], to_beat=best, strict=True, incumbent=members)
            )
        pick = taster.best(scores)
        if not taster.better(scores[pick], best, strict=True):
            trace.append(
                {
                    "step": len(trace) + 1,
                    "added": None,
                    "score": best,
                    "size": len(members),
                    "tried": len(remaining),
                }
            )
            break
        members.append(remaining[pick])
        best = scores[pick]
        trace.append(
            {
                "step": len(trace) + 1,
                "added": taster.ingredients[remaining[pick]].label,
                "score": best,
                "size": len(members),
                "tried": len(remaining),
            }
        )
    return taster.soup(
        member_weights(n, members),
        recipe="forward",
        options={"max_ingredients": max_ingredients},
        trace=trace,
        scores={"held_out": best},
    )
