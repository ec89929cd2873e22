"""``task_arithmetic``: ``theta_base + lambda sum_i w_i tau_i`` with task vectors
``tau_i = theta_i - theta_base`` (Ilharco et al. 2023, "Editing models with task
arithmetic", Sec. 2).

With the soup's weights normalised to sum 1 (the default), ``lambda = 1`` is the
weighted average and the paper's sum of ``k`` task vectors scaled by ``lambda_paper``
is ``lambda = k lambda_paper``. Elementwise: merged piece by piece.
"""

from __future__ import annotations

import torch

from modelsoup.merge.linear import weighted_sum
from modelsoup.merge.registry import Piece, ScaledOptions, register_rule


def add_scaled(base: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``base + lambda delta``, written into ``delta``.

    Example:
        >>> import torch
        >>> add_scaled(torch.ones(2), torch.tensor([1.0, -1.0]), 0.5)
        tensor([1.5000, 0.5000])
    """
    if lambda_ != 1.0:
        delta.mul_(lambda_)
    return delta.add_(base)


@register_rule("task_arithmetic", ScaledOptions, needs_base=True)
def task_arithmetic(piece: Piece, options: ScaledOptions) -> torch.Tensor:
    """The base plus lambda times the weighted sum of the task vectors.

    Example:
        >>> import torch
        >>> piece = Piece("w", 0, [torch.full((1,), 3.0)], [1.0], [0], base=torch.ones(1))
        >>> task_arithmetic(piece, ScaledOptions(**{"lambda": 0.5}))
        tensor([2.])
    """
    return add_scaled(
        piece.base, weighted_sum(piece.task_vectors(), piece.weights), options.lambda_
    )
