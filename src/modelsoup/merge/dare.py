"""``dare_linear`` and ``dare_ties``: DARE, drop and rescale (Yu et al. 2024, "Language
models are super Mario", Eq. 2).

Each entry of each task vector ``tau_i = theta_i - theta_base`` is dropped with
probability ``1 - density`` and the kept ones are rescaled by ``1 / density``, so the
expected value of the result is ``tau_i`` itself. Then:

- ``dare_linear``: ``theta_base + lambda sum_i w_i tau_i'`` (task arithmetic);
- ``dare_ties``: ``theta_base + lambda disjoint_merge(tau')``, TIES's sign election and
  disjoint mean without the trim (as mergekit's ``dare_ties``).

The drop mask is drawn from ``seed`` (recorded in the soup card) so a soup is
reproducible bit for bit. Each run of ``BLOCK`` consecutive entries of a tensor has
its own generator, seeded from ``(seed, tensor name, member position, block)``: the
same entry gets the same draw whether the tensor is merged whole or piece by piece,
and a member keeps its mask from one candidate soup to the next. Elementwise: merged
piece by piece.
"""

from __future__ import annotations

import hashlib

import torch

from modelsoup.merge.linear import weighted_sum
from modelsoup.merge.registry import DensityOptions, Piece, register_rule
from modelsoup.merge.task_arithmetic import add_scaled
from modelsoup.merge.ties import disjoint_merge

#: entries per generator (a piece is cut from whole blocks' draws)
BLOCK = 1 << 16


class DareOptions(DensityOptions):
    #: the drop masks' seed
    seed: int = 0


def _block_seed(seed: int, name: str, position: int, block: int) -> int:
    text = f"{seed}\x00{name}\x00{position}\x00{block}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def keep_mask(
    seed: int, name: str, position: int, start: int, count: int, density: float
) -> torch.Tensor:
    """Which of entries ``start .. start + count`` of tensor ``name`` member ``position`` keeps.

    Example:
        >>> whole = keep_mask(0, "w", 1, 0, 10, 0.5)
        >>> torch.equal(whole[4:9], keep_mask(0, "w", 1, 4, 5, 0.5))
        True
    """
    out = torch.empty(count, dtype=torch.bool)
    gen = torch.Generator()
    for block in range(start // BLOCK, (start + count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        gen.manual_seed(_block_seed(seed, name, position, block))
        draws = torch.rand(BLOCK, generator=gen)
        a, b = max(start, lo), min(start + count, lo + BLOCK)
        out[a - start : b - start] = draws[a - lo : b - lo] < density
    return out


def drop_and_rescale(piece: Piece, density: float, seed: int) -> list[torch.Tensor]:
    """The members' task vectors with entries dropped (prob. ``1 - density``) and the rest
    scaled by ``1 / density`` (in place).

    Example:
        >>> import torch
        >>> piece = Piece("w", 0, [torch.ones(4)], [1.0], [0], base=torch.zeros(4))
        >>> sorted(set(drop_and_rescale(piece, 0.5, 0)[0].tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
    """
    count = piece.members[0].numel()
    taus = piece.task_vectors()
    if density == 1.0:
        return taus
    for tau, position in zip(taus, piece.positions):
        mask = keep_mask(seed, piece.name, position, piece.start, count, density)
        tau.mul_(mask).div_(density)
    return taus


@register_rule("dare_linear", DareOptions, needs_base=True)
def dare_linear(piece: Piece, options: DareOptions) -> torch.Tensor:
    """DARE then task arithmetic: drop, rescale, add the weighted sum to the base.

    Example:
        >>> import torch
        >>> piece = Piece("w", 0, [torch.full((3,), 2.0)], [1.0], [0], base=torch.ones(3))
        >>> dare_linear(piece, DareOptions(density=1.0))
        tensor([2., 2., 2.])
    """
    taus = drop_and_rescale(piece, options.density, options.seed)
    return add_scaled(piece.base, weighted_sum(taus, piece.weights), options.lambda_)


@register_rule("dare_ties", DareOptions, needs_base=True)
def dare_ties(piece: Piece, options: DareOptions) -> torch.Tensor:
    """DARE then TIES's sign election and disjoint mean (no trim), scaled by lambda.

    Example:
        >>> import torch
        >>> members = [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0])]
        >>> piece = Piece("w", 0, members, [0.5, 0.5], [0, 1], base=torch.zeros(2))
        >>> dare_ties(piece, DareOptions(density=1.0))
        tensor([2., 2.])
    """
    taus = drop_and_rescale(piece, options.density, options.seed)
    return add_scaled(piece.base, disjoint_merge(taus, piece.weights), options.lambda_)
