"""``model_stock``: Model Stock (Jang et al. 2024, "Model Stock: all we need is just a few
fine-tuned models", Eq. 5 and its k-model form).

For each tensor, with task vectors ``tau_i = theta_i - theta_base`` of the ``k``
members and ``cos`` the mean of the pairwise cosines between them,

    t = k cos / (1 + (k - 1) cos),    theta = theta_base + t (theta_avg - theta_base)

where ``theta_avg`` is the members' weighted average. ``cos`` is clamped to ``[0, 1]``
(so ``t`` is in ``[0, 1]``: no extrapolation past the average or the base); pairs with a
zero task vector are left out, and with no pair left (one member) ``t = 1``, the
average. The cosines need the whole tensor's dot products: they are summed over the
pieces in a first read, then the tensor is merged piece by piece in a second.
"""

from __future__ import annotations

import math

import torch

from modelsoup.merge.linear import weighted_sum
from modelsoup.merge.registry import MergeOptions, Piece, register_rule
from modelsoup.merge.slerp import gram
from modelsoup.merge.task_arithmetic import add_scaled


def _task_gram(piece: Piece, options: MergeOptions) -> torch.Tensor:
    return gram(piece.task_vectors())


def model_stock_t(stats: torch.Tensor) -> float:
    """Model Stock's interpolation ratio from the Gram matrix of the task vectors.

    Example:
        >>> import math, torch
        >>> c = math.cos(math.radians(60))               # two task vectors 60 degrees apart
        >>> g = torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64)
        >>> round(model_stock_t(g), 6)                    # 2 cos / (1 + cos) = 2/3
        0.666667
    """
    k = stats.shape[0]
    norms = [math.sqrt(max(float(stats[i, i]), 0.0)) for i in range(k)]
    cosines = [
        float(stats[i, j]) / (norms[i] * norms[j])
        for i in range(k)
        for j in range(i + 1, k)
        if norms[i] > 0 and norms[j] > 0
    ]
    if not cosines:
        return 1.0
    cos = max(0.0, min(1.0, sum(cosines) / len(cosines)))
    return k * cos / (1.0 + (k - 1) * cos)


@register_rule("model_stock", MergeOptions, needs_base=True, statistics=_task_gram)
def model_stock(piece: Piece, options: MergeOptions) -> torch.Tensor:
    """The base moved towards the members' average by Model Stock's ratio, per tensor.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])   # orthogonal: t = 0
        >>> piece = Piece("w", 0, [a, b], [0.5, 0.5], [0, 1], base=torch.zeros(2),
        ...               stats=gram([a, b]))
        >>> model_stock(piece, MergeOptions())
        tensor([0., 0.])
    """
    t = model_stock_t(piece.stats)
    return add_scaled(piece.base, weighted_sum(piece.task_vectors(), piece.weights), t)
