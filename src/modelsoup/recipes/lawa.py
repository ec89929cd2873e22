"""LAWA: the uniform soup of the last k checkpoints of one run.

Latest weight averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet
and BERT Training with Latest Weight Averaging"; the checkpoint averaging of nanoGPT
and Pythia) averages the ``last`` k checkpoints of a training run. "Last" is the order
of the ingredients: a run's ``checkpoint-N`` folders are found in step order. With
fewer than ``last`` ingredients it averages them all, warns, and its report row says so
(``lawa (last 10: all 4)``).
"""

from __future__ import annotations

import warnings

from pydantic import PositiveInt

from modelsoup.errors import SoupWarning
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
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     lawa_soup(t, last=5).options, str(caught[0].message).split(";")[0]
        ({'last': 5, 'available': 3}, 'lawa: last=5 but there are only 3 ingredients')
    """
    n = len(taster.ingredients)
    members = list(range(max(0, n - last), n))
    options: dict = {"last": last}
    if n < last:
        warnings.warn(
            f"lawa: last={last} but there are only {n} ingredients; averaging all {n} "
            "(the uniform soup); save more checkpoints or lower last",
            SoupWarning,
            stacklevel=2,
        )
        options["available"] = n  # the row reads "lawa (last 10: all 4)"
    score = taster.score_members(members)
    return taster.soup(
        member_weights(n, members),
        recipe="lawa",
        options=options,
        scores={"held_out": score},
    )
