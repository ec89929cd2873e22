"""LAWA: the uniform soup of the last k checkpoints of one run.

Latest weight averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet
and BERT Training with Latest Weight Averaging"; the checkpoint averaging of nanoGPT
and Pythia) averages the ``last`` k checkpoints of a training run. "Last" is the order
of the ingredients: a run's ``checkpoint-N`` folders are found in step order.
"""

from __future__ import annotations

from pydantic import PositiveInt

from modelsoup.recipes._common import member_weights
from modelsoup.recipes.registry import RecipeOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class LawaOptions(RecipeOptions):
    #: how many of the latest checkpoints to average
    last: PositiveInt


@register("lawa", LawaOptions)
def lawa_soup(taster: Taster, *, last: int) -> Soup:
    """LAWA: the uniform soup of the last ``last`` ingredients, with its held-out score.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.0, 1.0, 2.0)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: float(m.weight.detach()))
        >>> soup = lawa_soup(t, last=2)
        >>> soup.chosen, soup.scores["held_out"]
        ([1, 2], 1.5)
    """
    n = len(taster.ingredients)
    members = list(range(max(0, n - last), n))
    score = taster.score_members(members)
    return taster.soup(
        member_weights(n, members),
        recipe="lawa",
        options={"last": last},
        scores={"held_out": score},
    )
