"""``slerp``: spherical linear interpolation of two members (Shoemake 1985; as merged
fine-tunes use it, per tensor, e.g. mergekit's ``slerp``).

For each tensor, with ``theta_0, theta_1`` the two members in pool order and
``Omega`` the angle between them, ``theta = sin((1-t) Omega)/sin(Omega) theta_0 +
sin(t Omega)/sin(Omega) theta_1``. When the two are nearly parallel (``|cos Omega| >
0.9995``) or one is zero, the angle says nothing and the rule falls back to ``(1-t)
theta_0 + t theta_1``. The members' weights are not used: ``t`` is the mix. No base.

The angle needs the whole tensor's dot product and norms: they are summed over the
pieces in a first read, then the tensor is merged piece by piece in a second, so
memory stays at the two members' pieces.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from modelsoup.merge.registry import MergeOptions, Piece, register_rule

#: above this |cos|, interpolate linearly (the angle is too small to divide by its sine)
PARALLEL = 0.9995


class SlerpOptions(MergeOptions):
    t: float = Field(ge=0.0, le=1.0)


def gram(values: list[torch.Tensor]) -> torch.Tensor:
    """The matrix of dot products ``<x_i, x_j>``, in float64 (it adds up over pieces).

    Example:
        >>> import torch
        >>> gram([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    wide = [v.to(torch.float64) for v in values]
    k = len(wide)
    out = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = torch.dot(wide[i], wide[j])
    return out


def _members_gram(piece: Piece, options: SlerpOptions) -> torch.Tensor:
    return gram(piece.members)


def slerp_coefficients(stats: torch.Tensor, t: float) -> tuple[float, float]:
    """The two coefficients of SLERP at ``t`` from the 2x2 Gram matrix of the members.

    Example:
        >>> import torch
        >>> c0, c1 = slerp_coefficients(torch.eye(2, dtype=torch.float64), 0.5)
        >>> round(c0, 6), round(c1, 6)
        (0.707107, 0.707107)
    """
    n0, n1, dot = float(stats[0, 0]), float(stats[1, 1]), float(stats[0, 1])
    if n0 <= 0 or n1 <= 0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, dot / math.sqrt(n0 * n1)))
    if abs(cos) > PARALLEL:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


@register_rule("slerp", SlerpOptions, needs_base=False, statistics=_members_gram, members=2)
def slerp(piece: Piece, options: SlerpOptions) -> torch.Tensor:
    """Spherical interpolation of two members at ``t``, per tensor.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> piece = Piece("w", 0, [a, b], [0.5, 0.5], [0, 1], stats=gram([a, b]))
        >>> round(slerp(piece, SlerpOptions(t=0.5)).norm().item(), 6)
        1.0
    """
    c0, c1 = slerp_coefficients(piece.stats, options.t)
    first, second = piece.members
    return first.mul_(c0).add_(second, alpha=c1)
