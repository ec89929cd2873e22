"""Helpers every evaluation-guided recipe shares: member weights and the order to try."""

from __future__ import annotations

import random

from modelsoup.tasting import Taster


def member_weights(n: int, members: list[int]) -> list[float]:
    """Uniform weights over ``members`` (positions may repeat) for a pool of ``n``.

    Example:
        >>> member_weights(3, [0, 2])
        [1.0, 0.0, 1.0]
    """
    w = [0.0] * n
    for i in members:
        w[i] += 1.0
    return w


def ingredient_order(taster: Taster, order: str, seed: int) -> list[int]:
    """Positions in the order a recipe should try them.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.2, 0.9, 0.5)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: float(m.weight.detach()))
        >>> ingredient_order(t, "sorted", 0)
        [1, 2, 0]
    """
    if order == "sorted":
        return taster.order(taster.individual_scores())
    positions = list(range(len(taster.ingredients)))
    random.Random(seed).shuffle(positions)
    return positions


def scored(score: float) -> dict:
    """A trace entry's score fields: the score, or how a raced candidate was stopped.

    Example:
        >>> from modelsoup.tasting import RejectedScore
        >>> scored(0.9), scored(RejectedScore(0.4, seen=20, total=100))
        ({'score': 0.9}, {'score': None, 'stopped_early': {'bound': 0.4, 'seen': 20, 'of': 100}})
    """
    if getattr(score, "rejected", False):
        return {
            "score": None,
            "stopped_early": {"bound": float(score), "seen": score.seen, "of": score.total},
        }
    return {"score": score}
