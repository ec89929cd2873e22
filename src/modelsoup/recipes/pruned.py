"""Pruned soup (the seed paper's Algorithm 2, Dansereau et al.).

Start from the uniform soup of every ingredient. For each of ``passes`` passes, try
removing each ingredient still in the soup, in order (by held-out score, best first,
as the paper does, or at random); keep a removal when the soup's score does not drop
(``>=``). The last ingredient is never removed. No subset is scored twice: repeated
subsets in later passes come from the journal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import NonNegativeInt, PositiveInt

from modelsoup.merge import MergeSpec
from modelsoup.recipes._common import ingredient_order, member_weights
from modelsoup.recipes.registry import MergingOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class PrunedOptions(MergingOptions):
    passes: NonNegativeInt = 1
    order: Literal["sorted", "random"] = "sorted"
    seed: int = 0
    strict: bool = False
    #: random orders to run (the report shows mean and std); the first run's soup is kept
    runs: PositiveInt = 1


# the uniform soup, then at most one removal per ingredient per pass
@register("pruned", PrunedOptions, bound=lambda pool, o: 1 + o.passes * len(pool))
def pruned_soup(
    taster: Taster,
    *,
    passes: int = 1,
    order: str = "sorted",
    seed: int = 0,
    strict: bool = False,
    merge: Mapping | MergeSpec | None = None,
) -> Soup:
    """Pruned soup: from the uniform soup, remove ingredients while held-out does not drop.

    Example:
        >>> from modelsoup.ingredients import open_ingredients
        >>> import torch
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (2.0, 9.0, 2.2)])
        >>> score = lambda m: -abs(float(m.weight.detach()) - 2.0)
        >>> soup = pruned_soup(Taster(ings, torch.nn.Linear(1, 1, bias=False), score), passes=2)
        >>> [ings[i].label for i in soup.chosen]
        ['model0']
    """
    with taster.merging(merge):
        return _pruned_soup(taster, passes=passes, order=order, seed=seed, strict=strict)


def _pruned_soup(
    taster: Taster, *, passes: int = 1, order: str = "sorted", seed: int = 0, strict: bool = False
) -> Soup:
    n = len(taster.ingredients)
    members = list(range(n))
    baseline = taster.score_members(members)
    trace = [{"pass": 0, "score": baseline, "size": n}]
    positions = ingredient_order(taster, order, seed) if passes else []
    for p in range(1, passes + 1):
        removed_any = False
        for j, i in enumerate(positions):
            if i not in members or len(members) == 1:
                continue
            candidate = [m for m in members if m != i]
            # the next candidate removes the next member in order (in this pass, or at the
            # start of the next one): read it meanwhile
            later = [m for m in positions[j + 1 :] if m in candidate]
            if not later and p < passes:
                later = [m for m in positions if m in candidate]
            taster.prefetch(later[0] if later and len(candidate) > 1 else None)
            score = taster.score_members(
                candidate, to_beat=baseline, strict=strict, incumbent=members
            )
            if taster.better(score, baseline, strict=strict):
                members, baseline, removed_any = candidate, score, True
                trace.append(
                    {
                        "pass": p,
                        "removed": taster.ingredients[i].label,
                        "score": score,
                        "size": len(members),
                    }
                )
        trace.append({"pass": p, "score": baseline, "size": len(members), "end_of_pass": True})
        if not removed_any:
            # A pass that removes nothing leaves the soup, and every later pass, unchanged.
            for q in range(p + 1, passes + 1):
                trace.append(
                    {
                        "pass": q,
                        "score": baseline,
                        "size": len(members),
                        "end_of_pass": True,
                        "skipped": True,
                    }
                )
            break
    options = {"passes": passes, "order": order, "seed": seed, "strict": strict}
    return taster.soup(
        member_weights(n, members),
        recipe="pruned",
        options=options,
        trace=trace,
        scores={"held_out": baseline},
    )
