"""``ties``: TIES-merging (Yadav et al. 2023, "Resolving interference when merging
models", Sec. 3 and Algorithm 1).

For each tensor, with task vectors ``tau_i = theta_i - theta_base``:

1. **trim**: keep the ``floor(density n)`` largest magnitudes (at least one) of each
   ``tau_i``, as mergekit does (entries tied with the smallest kept magnitude are kept
   too), zero the rest;
2. **elect**: the sign of each entry is ``sgn(sum_i w_i trimmed_i)``: the side with the
   greater total (weighted) magnitude. A tie in this vote elects no sign (``sgn(0) =
   0``, as in the paper's equation), so no member agrees and the entry stays at the
   base's value (mergekit picks ``+`` there instead);
3. **disjoint mean**: average only the non-zero entries whose sign agrees with the
   elected one, weighted by ``w_i``; an entry that no member moves stays at 0;
4. ``theta = theta_base + lambda tau_merged``.

Trimming by magnitude needs the whole tensor (its top-k), so this rule holds one
tensor's members at a time (``k`` copies of the largest tensor, in float32), not a
piece: it is the one rule whose memory grows with the largest tensor. The sign
election and disjoint mean are elementwise (done a cache-sized slice at a time, so their
temporaries are small), and are shared with ``dare_ties``.
"""

from __future__ import annotations

import math

import torch

from modelsoup.merge.registry import CACHE_ELEMENTS, DensityOptions, Piece, register_rule
from modelsoup.merge.task_arithmetic import add_scaled

#: the integer type with a float's bits
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``floor(density n)`` largest magnitudes of ``tau`` (in place).

    Example:
        >>> import torch
        >>> trim(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
        tensor([ 0., -3.,  2.,  0.])
    """
    n = tau.numel()
    keep = max(1, math.floor(round(density * n, 6)))  # rounded: 0.29 * 100 is 29, not 28
    if keep >= n:
        return tau
    magnitude = tau.abs()
    # the keep-th largest magnitude is the (n - keep + 1)-th smallest
    threshold = magnitude.kthvalue(n - keep + 1).values
    bits = _INT_OF.get(tau.dtype)
    if bits is None:
        return tau.masked_fill_(magnitude < threshold, 0.0)
    # Non-negative floats order as their bit patterns do: magnitude - threshold, in
    # integers, is negative exactly where magnitude < threshold, so shifted right it is
    # all ones there and 0 elsewhere; its complement ANDed into tau zeroes the dropped
    # entries (+0, as masked_fill) without bool tensors, which torch's CPU kernels
    # handle many times slower
    drop = (
        magnitude.view(bits).sub_(threshold.view(bits)).bitwise_right_shift_(tau.itemsize * 8 - 1)
    )
    tau.view(bits).bitwise_and_(drop.bitwise_not_())
    return tau


def disjoint_merge(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect a sign per entry by summed magnitude; average the agreeing non-zero entries.

    Example:
        >>> import torch
        >>> disjoint_merge([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])], [0.5, 0.5])
        tensor([2., 2.])
    """
    # Sign and disjoint mean do not change when every weight is scaled: scaled so the
    # largest is 1, equal weights are exactly 1 and a tied vote sums to exactly 0.
    top = max(weights)
    weights = [w / top for w in weights]
    vote = torch.mul(taus[0], weights[0])
    for tau, w in zip(taus[1:], weights[1:]):
        vote.add_(tau, alpha=w)
    elected = vote.sign_()
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    agree = torch.empty_like(taus[0])
    for tau, w in zip(taus, weights):
        # tau elected is |tau| where tau is non-zero with the elected sign, else <= 0:
        # clamped at 0, its sign is 1 where the member agrees, else 0, and times elected
        # (+-1) again it is tau there, 0 elsewhere (float32 operations only: torch's CPU
        # kernels handle bool tensors many times slower)
        tau.mul_(elected).clamp_(min=0)
        count.add_(torch.sign(tau, out=agree), alpha=w)
        total.add_(tau.mul_(elected), alpha=w)
    # where no member agrees, total is 0 and so is the merged entry
    return total.div_(count.clamp_(min=torch.finfo(count.dtype).tiny))


@register_rule("ties", DensityOptions, needs_base=True, scope="tensor")
def ties(piece: Piece, options: DensityOptions) -> torch.Tensor:
    """TIES-merging: trim, elect sign, disjoint mean, scale by lambda.

    Example:
        >>> import torch
        >>> members = [torch.tensor([1.0, 0.1]), torch.tensor([-0.5, 2.0])]
        >>> piece = Piece("w", 0, members, [0.5, 0.5], [0, 1], base=torch.zeros(2))
        >>> ties(piece, DensityOptions(density=0.5))
        tensor([1., 2.])
    """
    taus = [trim(tau, options.density) for tau in piece.task_vectors()]
    # the rest is elementwise: merged a cache-sized slice at a time, into the base
    out = piece.base
    for start in range(0, out.numel(), CACHE_ELEMENTS):
        part = slice(start, start + CACHE_ELEMENTS)
        merged = disjoint_merge([tau[part] for tau in taus], piece.weights)
        out[part].copy_(add_scaled(out[part], merged, options.lambda_))
    return out
