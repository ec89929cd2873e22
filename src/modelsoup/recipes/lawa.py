"""LAWA: the uniform soup of the last k checkpoints of one run.

Latest weight averaging (Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet
and BERT Training with Latest Weight Averaging"; the checkpoint averaging of nanoGPT
and Pythia) averages the ``last`` k checkpoints of a training run. "Last" is the order
of the ingredients: a run's ``checkpoint-N`` folders are found in step order. Lightning
checkpoints record their ``global_step``: within each run (one folder), that is the
order (a ``{val_loss:.2f}-{epoch}`` file name sorts by loss), and a ``last.ckpt`` at the
step of another checkpoint of its run (save_last's copy of it) is left out, with a
warning; the runs of a sweep keep the pool's order. With fewer than ``last``
ingredients it averages them all, warns, and its report row says so
(``lawa (last 10: all 4)``).
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
        what = "ingredients" if n == len(taster.ingredients) else "checkpoints, copies left out"
        warnings.warn(
            f"lawa: last={last} but there are only {n} {what}; averaging all {n}; save "
            "more checkpoints or lower last",
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
    """The pool's positions, oldest first. The checkpoints of each Lightning run (one
    folder, each recording its global step) are put in step order within the places the
    run holds in the pool, and a ``last.ckpt`` at the step of another checkpoint of its
    run (save_last's copy of it) is left out; the runs keep the pool's order (those of a
    sweep are never interleaved), as does anything else."""
    runs: dict = {}  # folder -> positions, for the checkpoints that record a step
    for i, ing in enumerate(taster.ingredients):
        layout = getattr(ing.source, "lightning", None)
        step = layout.extras.get("global_step") if layout is not None else None
        known = isinstance(step, int) and not isinstance(step, bool) and ing.path is not None
        runs.setdefault(ing.path.parent if known else i, []).append((step, i) if known else None)
    order = list(range(len(taster.ingredients)))
    copies: list[int] = []
    for run in runs.values():
        if None in run:  # a position of its own, or a run with a checkpoint of no step
            continue
        saved_at = {step for step, i in run if not _copy_of_newest(taster, i)}
        copies += [i for step, i in run if _copy_of_newest(taster, i) and step in saved_at]
        for slot, (_, i) in zip(sorted(i for _, i in run), sorted(run)):
            order[slot] = i
    if copies:
        warnings.warn(
            f"lawa: {', '.join(taster.ingredients[i].label for i in sorted(copies))} left "
            "out: saved at the step of another checkpoint of its run, of which Lightning's "
            "save_last keeps a copy",
            SoupWarning,
            stacklevel=3,
        )
    return [i for i in order if i not in copies]


def _copy_of_newest(taster: Taster, i: int) -> bool:
    # Lightning's save_last writes last.ckpt (last-v1.ckpt, ... beside older ones)
    return re.fullmatch(r"last(-v\d+)?\.ckpt", taster.ingredients[i].path.name) is not None
