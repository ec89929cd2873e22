"""LAWA: the uniform soup of the last k checkpoints of one run.

Latest weight averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet
and BERT Training with Latest Weight Averaging"; the checkpoint averaging of nanoGPT
and Pythia) averages the ``last`` k checkpoints of a training run. "Last" is the order
of the ingredients: a run's ``checkpoint-N`` folders are found in step order. Lightning
checkpoints record their ``global_step``: when every ingredient does, that is the order
(a ``{val_loss:.2f}-{epoch}`` file name sorts by loss), and two at one step are one
training state (``last.ckpt`` beside the checkpoint it copies) counted once, with a
warning. With fewer than ``last`` ingredients it averages them all, warns, and its report
row says so (``lawa (last 10: all 4)``).
"""

from __future__ import annotations

import re
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
    order = _in_training_order(taster)
    n = len(order)
    members = sorted(order[max(0, n - last) :])
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
        member_weights(len(taster.ingredients), members),
        recipe="lawa",
        options=options,
        scores={"held_out": score},
    )


def _in_training_order(taster: Taster) -> list[int]:
    """The pool's positions, oldest first: by the global step every Lightning checkpoint
    records when all have one (one position per step), else in the pool's order."""
    steps = []
    for ing in taster.ingredients:
        layout = getattr(ing.source, "lightning", None)
        step = layout.extras.get("global_step") if layout is not None else None
        steps.append(step if isinstance(step, int) and not isinstance(step, bool) else None)
    if not steps or any(s is None for s in steps):
        return list(range(len(steps)))
    order, first_at, twins = [], {}, []

    def copy_of_newest(i: int) -> bool:  # Lightning's save_last: last.ckpt, last-v1.ckpt
        path = taster.ingredients[i].path
        return path is not None and re.fullmatch(r"last(-v\d+)?\.ckpt", path.name) is not None

    for i in sorted(range(len(steps)), key=lambda i: (steps[i], copy_of_newest(i), i)):
        if steps[i] in first_at:
            twins.append(
                f"{taster.ingredients[i].label} = {taster.ingredients[first_at[steps[i]]].label}"
            )
            continue
        first_at[steps[i]] = i
        order.append(i)
    if twins:
        warnings.warn(
            f"lawa: {', '.join(twins)}: saved at the same training step, one training state "
            "(Lightning's last.ckpt copies the newest checkpoint), counted once",
            SoupWarning,
            stacklevel=3,
        )
    return order
