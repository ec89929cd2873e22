"""modelsoup: average fine-tuned checkpoints into one better model, and say whether it helped.

This module only re-exports the public API; each name lives in its layer (see the
README's Layout section).

Example:
    >>> import torch, modelsoup
    >>> soup = modelsoup.average([{"w": torch.zeros(1)}, {"w": torch.ones(1)}])
    >>> soup.state_dict()["w"]
    tensor([0.5000])
"""

import logging

from modelsoup import _compat
from modelsoup.accumulator import Accumulator
from modelsoup.cook import cook, cook_config
from modelsoup.cook.diagnose import diagnose
from modelsoup.errors import (
    AlignmentError,
    ConfigError,
    EvaluationError,
    IncompatibleIngredientsError,
    IngredientError,
    MemoryBudgetError,
    SoupError,
    SoupWarning,
    WriteError,
)
from modelsoup.evaluators import (
    Accuracy,
    Evaluator,
    LogitsEvaluator,
    MeanLoss,
    MetricEvaluator,
)
from modelsoup.ingredients import Ingredient, check_compatible, open_ingredient, open_ingredients
from modelsoup.recipes import (
    forward_selection_soup,
    greedy_ensemble,
    greedy_soup,
    output_ensemble,
    pruned_soup,
)
from modelsoup.recipes.uniform import average
from modelsoup.repair import align_to, recalibrate_bn, trace_permutation_spec
from modelsoup.soup import Soup, library_version, save_soup
from modelsoup.tasting import Taster

__version__ = library_version()

_compat.install()
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Accumulator",
    "Accuracy",
    "Evaluator",
    "LogitsEvaluator",
    "MeanLoss",
    "MetricEvaluator",
    "Taster",
    "align_to",
    "cook",
    "cook_config",
    "diagnose",
    "forward_selection_soup",
    "greedy_ensemble",
    "greedy_soup",
    "output_ensemble",
    "pruned_soup",
    "recalibrate_bn",
    "trace_permutation_spec",
    "AlignmentError",
    "ConfigError",
    "EvaluationError",
    "IncompatibleIngredientsError",
    "Ingredient",
    "IngredientError",
    "MemoryBudgetError",
    "Soup",
    "SoupError",
    "SoupWarning",
    "WriteError",
    "average",
    "check_compatible",
    "open_ingredient",
    "open_ingredients",
    "save_soup",
]
