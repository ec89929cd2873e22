"""Recipes, one file each. A recipe turns a taster's ingredients into a soup.

Evaluation-free: :func:`average` (uniform or weighted). Evaluation-guided, each taking
a :class:`~modelsoup.tasting.Taster`: ``greedy``, ``forward``, ``pruned``, the
``ensemble`` and ``greedy_ensemble`` baselines, ``best_individual`` and ``uniform``;
``lawa`` (the last k checkpoints of a run); ``learned`` (coefficients trained by
gradient), ``layerwise`` (per-group choices) and ``search`` (a merge rule's option
chosen on held-out). ``greedy``, ``forward``, ``pruned`` and ``layerwise`` take
``merge:``, the rule that mixes their candidates.
"""

from modelsoup.recipes.baselines import best_individual
from modelsoup.recipes.ensemble import Ensemble, greedy_ensemble, output_ensemble
from modelsoup.recipes.forward import forward_selection_soup
from modelsoup.recipes.greedy import greedy_soup
from modelsoup.recipes.lawa import lawa_soup
from modelsoup.recipes.layerwise import layerwise_soup
from modelsoup.recipes.learned import learned_soup
from modelsoup.recipes.pruned import pruned_soup
from modelsoup.recipes.registry import RECIPES, get_recipe
from modelsoup.recipes.search import search_soup
from modelsoup.recipes.uniform import average, uniform_soup

__all__ = [
    "RECIPES",
    "Ensemble",
    "average",
    "best_individual",
    "forward_selection_soup",
    "get_recipe",
    "greedy_ensemble",
    "greedy_soup",
    "lawa_soup",
    "layerwise_soup",
    "learned_soup",
    "output_ensemble",
    "pruned_soup",
    "search_soup",
    "uniform_soup",
]
