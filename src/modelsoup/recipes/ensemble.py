"""Ensembles: average the ingredients' outputs instead of their weights.

Not a soup: an ensemble of k models costs k forward passes. It is the yardstick soups
are judged against (Wortsman et al. 2022 report both). Each ingredient's logits on an
evaluator's data are computed once and cached by the taster, so the greedy ensemble
costs no forward passes beyond those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import PositiveInt

from modelsoup.evaluators import Evaluator
from modelsoup.recipes._common import greedy_walk
from modelsoup.recipes.registry import RecipeOptions, register
from modelsoup.tasting import Taster


@dataclass
class Ensemble:
    """Ingredients whose logits are averaged at inference time.

    Example:
        >>> Ensemble("ensemble", [0, 2]).size
        2
    """

    recipe: str
    members: list[int]
    trace: list[dict] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def chosen(self) -> list[int]:
        return sorted(set(self.members))

    def logits(self, taster: Taster, evaluator: Evaluator) -> torch.Tensor:
        """Mean of the members' logits on the evaluator's data."""
        return torch.stack([taster.outputs(i, evaluator) for i in self.members]).mean(0)

    def score(self, taster: Taster, evaluator: Evaluator) -> float:
        """The evaluator's score of the mean logits (a ConfigError for an evaluator that
        gives no logits, such as a plain function)."""
        logits = self.logits(taster, evaluator)  # first: it says what an evaluator lacks
        return float(evaluator.score_logits(logits))


class EnsembleOptions(RecipeOptions):
    pass


class GreedyEnsembleOptions(RecipeOptions):
    strict: bool = False
    max_ingredients: PositiveInt | None = None


# Both score averaged logits: each ingredient's forward pass, shared with its own score.
@register("ensemble", EnsembleOptions, bound=lambda pool, o: 0)
def output_ensemble(taster: Taster) -> Ensemble:
    """The ensemble of every ingredient: mean logits.

    Example:
        >>> import torch
        >>> from modelsoup.evaluators import Accuracy
        >>> from modelsoup.ingredients import open_ingredients
        >>> x, y = torch.eye(2), torch.tensor([0, 1])
        >>> ings = open_ingredients([{"weight": torch.eye(2)}, {"weight": -torch.eye(2)}])
        >>> t = Taster(ings, torch.nn.Linear(2, 2, bias=False), Accuracy((x, y)))
        >>> output_ensemble(t).members
        [0, 1]
    """
    ens = Ensemble("ensemble", list(range(len(taster.ingredients))))
    ens.scores["held_out"] = ens.score(taster, taster.held_out)
    return ens


@register("greedy_ensemble", GreedyEnsembleOptions, bound=lambda pool, o: 0)
def greedy_ensemble(
    taster: Taster, *, strict: bool = False, max_ingredients: int | None = None
) -> Ensemble:
    """Greedy ensemble: ingredients in order of held-out score, kept if the ensemble holds up.

    Example:
        >>> import torch
        >>> from modelsoup.evaluators import Accuracy
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": s * torch.eye(2)} for s in (1.0, -3.0, 2.0)])
        >>> held_out = Accuracy((torch.eye(2), torch.tensor([0, 1])))
        >>> taster = Taster(ings, torch.nn.Linear(2, 2, bias=False), held_out)
        >>> greedy_ensemble(taster).members  # adding the -3 one would cancel the others out
        [0, 2]
    """
    members, best, trace = greedy_walk(
        taster,
        taster.order(taster.individual_scores()),
        lambda candidate, _: Ensemble("greedy_ensemble", candidate).score(taster, taster.held_out),
        strict=strict,
        max_ingredients=max_ingredients,
    )
    options = {"strict": strict, "max_ingredients": max_ingredients}
    return Ensemble("greedy_ensemble", members, trace, {"held_out": best}, options)
