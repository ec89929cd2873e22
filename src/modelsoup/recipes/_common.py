"""Helpers every evaluation-guided recipe shares: member weights, the order to try, the
greedy walk."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

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
        stopped = {"bound": float(score), "seen": score.seen, "of": score.total}
        if getattr(score, "confidence", None) is not None:  # statistical racing
            stopped["confidence"] = score.confidence
        return {"score": None, "stopped_early": stopped}
    return {"score": score}


def greedy_walk(
    taster: Taster,
    positions: Sequence[int],
    score: Callable[[list[int], float | None], float],
    *,
    strict: bool = False,
    max_ingredients: int | None = None,
    trace_best: bool = False,
) -> tuple[list[int], float, list[dict]]:
    """Start from ``positions[0]``; keep each next position if the candidate holds up.

    ``score(candidate, best)`` scores a list of members (``best`` is the score to beat,
    None for the first). Returns the members kept, their score and the trace, one entry
    per position tried (with the best score so far when ``trace_best``).

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.zeros(1)} for _ in range(3)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 0.0)
        >>> members, best, trace = greedy_walk(t, [2, 0, 1], lambda c, b: -abs(sum(c) - 2))
        >>> members, best, len(trace)
        ([2, 0], 0, 3)
    """
    members = [positions[0]]
    best = score(members, None)
    label = taster.ingredients[positions[0]].label
    trace = [{"step": 1, "tried": label, "score": best, "accepted": True, "size": 1}]
    for step, i in enumerate(positions[1:], start=2):
        if max_ingredients is not None and len(members) >= max_ingredients:
            break
        # the next candidate adds the position after this one: read it while this is scored
        taster.prefetch(positions[step] if step < len(positions) else None)
        candidate = score([*members, i], best)
        accepted = taster.better(candidate, best, strict=strict)
        if accepted:
            members, best = [*members, i], candidate
        entry = {
            "step": step,
            "tried": taster.ingredients[i].label,
            **scored(candidate),
            "accepted": accepted,
            "size": len(members),
        }
        if trace_best:
            entry["best"] = best
        trace.append(entry)
    return members, best, trace
