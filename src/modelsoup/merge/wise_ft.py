"""``wise_ft``: ``(1 - alpha) theta_base + alpha theta_soup`` (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models", Eq. 1).

WiSE-FT interpolates between the pretrained start and a fine-tune; with several members
the fine-tune is their weighted average. ``alpha`` is also an option of every other rule,
which puts WiSE-FT on top of that rule's result (``{rule: ties, density: 0.3, alpha:
0.5}``); this rule is the same on top of the plain average, with ``alpha`` required.
"""

from __future__ import annotations

import torch
from pydantic import Field

from modelsoup.merge.linear import weighted_sum
from modelsoup.merge.registry import MergeOptions, Piece, register_rule


class WiseFTOptions(MergeOptions):
    alpha: float = Field(ge=0.0, le=1.0)


def wise_ft_mix(base: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) base + alpha merged``, written into ``merged``.

    At ``alpha = 1`` the result is ``merged`` exactly, at ``alpha = 0`` the base.

    Example:
        >>> import torch
        >>> wise_ft_mix(torch.zeros(2), torch.ones(2), 0.25)
        tensor([0.2500, 0.2500])
    """
    if alpha == 1.0:
        return merged
    if alpha == 0.0:
        return merged.copy_(base)
    return merged.mul_(alpha).add_(base, alpha=1.0 - alpha)


@register_rule("wise_ft", WiseFTOptions, needs_base=True)
def wise_ft(piece: Piece, options: WiseFTOptions) -> torch.Tensor:
    """WiSE-FT over the weighted average: the average here, ``alpha`` applied after.

    Example:
        >>> import torch
        >>> piece = Piece("w", 0, [torch.ones(1)], [1.0], [0], base=torch.zeros(1))
        >>> wise_ft(piece, WiseFTOptions(alpha=0.3))  # the mixing with the base comes after
        tensor([1.])
    """
    return weighted_sum(piece.members, piece.weights)
