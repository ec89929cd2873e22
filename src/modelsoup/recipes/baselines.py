"""The baselines every report includes: the best single ingredient and the uniform soup."""

from __future__ import annotations

from modelsoup.recipes.forward import member_weights
from modelsoup.recipes.registry import RecipeOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class NoOptions(RecipeOptions):
    pass


@register("best_individual", NoOptions)
def best_individual(taster: Taster) -> Soup:
    """The single ingredient with the best held-out score (a soup of one).

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.1, 0.7)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: float(m.weight.detach()))
        >>> best_individual(t).chosen
        [1]
    """
    scores = taster.individual_scores()
    best = taster.best(scores)
    n = len(taster.ingredients)
    trace = [{"label": ing.label, "score": s} for ing, s in zip(taster.ingredients, scores)]
    return Soup(
        taster.ingredients,
        member_weights(n, [best]),
        recipe="best_individual",
        trace=trace,
        scores={"held_out": scores[best]},
        int_policy=taster.int_policy,
    )


@register("uniform", NoOptions)
def uniform_soup(taster: Taster) -> Soup:
    """The uniform soup of every ingredient, with its held-out score.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.0, 1.0)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: float(m.weight.detach()))
        >>> uniform_soup(t).scores["held_out"]
        0.5
    """
    n = len(taster.ingredients)
    score = taster.score_members(list(range(n)))
    return Soup(
        taster.ingredients,
        [1.0] * n,
        recipe="uniform",
        scores={"held_out": score},
        accum_dtype=taster.accumulator.accum_dtype,
        int_policy=taster.int_policy,
    )
