"""``linear``: the weighted average of the members, ``sum_i w_i theta_i`` (Wortsman et al.
2022). It is the default rule; a soup with it is mixed by the incremental accumulator
(adding or removing one ingredient is one pass over it), so this function only runs
when WiSE-FT is put on top (``alpha``)."""

from __future__ import annotations

import torch

from modelsoup.merge.registry import MergeOptions, Piece, register_rule


def weighted_sum(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i x_i``, written into the first tensor (which changes).

    Example:
        >>> import torch
        >>> weighted_sum([torch.ones(2), torch.zeros(2)], [0.25, 0.75])
        tensor([0.2500, 0.2500])
    """
    out = values[0].mul_(weights[0])
    for x, w in zip(values[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


@register_rule("linear", MergeOptions, needs_base=False)
def linear(piece: Piece, options: MergeOptions) -> torch.Tensor:
    """The weighted average of the members (the model soup).

    Example:
        >>> import torch
        >>> piece = Piece("w", 0, [torch.zeros(1), torch.ones(1)], [0.5, 0.5], [0, 1])
        >>> linear(piece, MergeOptions())
        tensor([0.5000])
    """
    return weighted_sum(piece.members, piece.weights)
