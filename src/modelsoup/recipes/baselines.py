"""The best single ingredient: the baseline every report includes (uniform is in uniform.py)."""

from __future__ import annotations

from modelsoup.recipes._common import member_weights
from modelsoup.recipes.registry import RecipeOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class NoOptions(RecipeOptions):
    pass


@register("best_individual", NoOptions, bound=lambda pool, o: 0)
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
    return taster.soup(
        member_weights(n, [best]),
        recipe="best_individual",
        trace=trace,
        scores={"held_out": scores[best]},
    )
