"""``dare_linear`` and ``dare_ties``: DARE, drop and rescale (Yu et al. 2024, "Language
models are super Mario", Eq. 2).

Each entry of each task vector ``tau_i = theta_i - theta_base`` is dropped with
probability ``1 - density`` and the kept ones are rescaled by ``1 / density``, so the
expected value of the result is ``tau_i`` itself. Then:

- ``dare_linear``: ``theta_base + lambda sum_i w_i tau_i'`` (task arithmetic);
- ``dare_ties``: ``theta_base + lambda disjoint_merge(tau')``, TIES's sign election and
  disjoint mean without the trim (as mergekit's ``dare_ties``).

The drop masks come from ``seed`` (recorded in the soup card), so a soup is
reproducible bit for bit. Scheme ``counter-v1`` (the default, :func:`keep_mask`): whether
entry ``i`` of member ``position``'s task vector in tensor ``name`` is kept is a pure
function of ``(seed, name, position, i)``, an integer hash of the index computed for
many entries at once, so any piece is computed on its own: the same entry gets the same
draw whether the tensor is merged whole or piece by piece, and a member keeps its mask
from one candidate soup to the next. Scheme ``blocks-v0`` (modelsoup before
``counter-v1``, kept to redo older soups): a seeded generator per run of ``BLOCK``
consecutive entries. Elementwise: merged piece by piece.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from typing import Literal

import torch
from pydantic import field_validator

from modelsoup.merge.linear import weighted_sum
from modelsoup.merge.registry import DensityOptions, Piece, register_rule
from modelsoup.merge.task_arithmetic import add_scaled
from modelsoup.merge.ties import disjoint_merge

#: ``blocks-v0``: entries per generator (a piece is cut from whole blocks' draws)
BLOCK = 1 << 16

#: the drop masks' schemes, newest first (docs/merge-rules.md defines them)
MASKS = ("counter-v1", "blocks-v0")

#: ``counter-v1``: entries hashed per batch of torch operations (results never depend
#: on it; a batch's int32 buffers stay in the processor's cache)
HASH_BATCH = 1 << 18

_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (C. Wellons)

#: the smallest density DARE takes: below it the keep probability, a multiple of
#: ``2**-31``, is no longer within 0.01% of ``density``, and under ``2**-32`` nothing is
#: kept at all while the rescale ``1 / density`` still grows (a zero change, silently)
MIN_DENSITY = 1e-5


class DareOptions(DensityOptions):
    #: the drop masks' seed
    seed: int = 0
    #: how masks are made from the seed: ``counter-v1`` (default) or ``blocks-v0``
    mask: Literal["counter-v1", "blocks-v0"] = "counter-v1"

    @field_validator("density")
    @classmethod
    def _representable(cls, v: float) -> float:
        if v < MIN_DENSITY:
            raise ValueError(
                f"{v} is below DARE's smallest density {MIN_DENSITY:g} (its drop masks "
                "cannot keep so few entries faithfully); use a larger density"
            )
        return v


def _block_seed(seed: int, name: str, position: int, block: int) -> int:
    text = f"{seed}\x00{name}\x00{position}\x00{block}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def _int32(value: int) -> int:
    # an unsigned 32-bit value as the int32 with the same bits
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@functools.lru_cache(maxsize=4096)
def _counter_keys(seed: int, name: str, position: int, span: int) -> tuple[int, int]:
    # (k0, k1) of entries span * 2**32 .. (span + 1) * 2**32 - 1, as int32
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{position}\x00{span}".encode()).digest()
    return _int32(int.from_bytes(digest[:4], "little")), _int32(
        int.from_bytes(digest[4:8], "little")
    )


@functools.lru_cache(maxsize=1)
def _batch_index() -> torch.Tensor:
    return torch.arange(HASH_BATCH, dtype=torch.int32)


_local = threading.local()


def _hash_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    # two int32 batches per thread, reused: no fresh pages per mask
    if not hasattr(_local, "buffers"):
        _local.buffers = (
            torch.empty(HASH_BATCH, dtype=torch.int32),
            torch.empty(HASH_BATCH, dtype=torch.int32),
        )
    return _local.buffers


def _mix32(x: torch.Tensor, spare: torch.Tensor) -> None:
    # lowbias32 in place, modulo 2**32 on int32 bits: x ^= x >> 16; x *= M1;
    # x ^= x >> 15; x *= M2; x ^= x >> 16 (logical shifts: the sign bits are masked off)
    for shift, mult in ((16, _MIX1), (15, _MIX2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=spare)
        spare.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(spare)
        if mult is not None:
            x.mul_(_int32(mult))


def counter_mask(
    seed: int, name: str, position: int, start: int, count: int, density: float
) -> torch.Tensor:
    """``counter-v1`` keep mask of entries ``start .. start + count``: entry ``i`` is kept
    when ``h mod 2**31 < round(density 2**31)``, where ``h = mix(mix((i mod 2**32) xor
    k0) xor k1)``, ``mix`` is lowbias32 and ``k0, k1`` are the first 8 bytes of
    ``sha256("{seed}\\0{name}\\0{position}\\0{i div 2**32}")`` (two little-endian
    32-bit words). A pure function of the index: any slice is computed on its own.

    Example:
        >>> whole = counter_mask(0, "w", 1, 0, 10, 0.5)
        >>> torch.equal(whole[4:9], counter_mask(0, "w", 1, 4, 5, 0.5))
        True
        >>> counter_mask(3, "w", 0, 0, 8, 0.5).tolist()
        [False, True, False, False, False, True, False, False]
    """
    return counter_bits(seed, name, position, start, count, density) != 0


def counter_bits(
    seed: int, name: str, position: int, start: int, count: int, density: float
) -> torch.Tensor:
    """:func:`counter_mask` as int32 bit masks: all ones (-1) where kept, 0 where dropped
    (ANDed into a float32's bits it keeps the value or makes it +0; no bool tensors,
    which torch's CPU kernels handle many times slower than int32 and float32 ones).

    Example:
        >>> counter_bits(3, "w", 0, 0, 4, 0.5).tolist()
        [0, -1, 0, 0]
    """
    out = torch.empty(count, dtype=torch.int32)
    threshold = round(density * (1 << 31))
    if threshold >= 1 << 31:
        return out.fill_(-1)
    x, spare = _hash_buffers()
    index = _batch_index()
    end = start + count
    for batch in range(start // HASH_BATCH, (end + HASH_BATCH - 1) // HASH_BATCH):
        lo = batch * HASH_BATCH  # batches never straddle 2**31 or 2**32: int32 adds stay exact
        a, b = max(start, lo), min(end, lo + HASH_BATCH)
        k0, k1 = _counter_keys(seed, name, position, lo >> 32)
        xs, ss = x[: b - a], spare[: b - a]
        torch.add(index[a - lo : b - lo], _int32(lo), out=xs)
        xs.bitwise_xor_(k0)
        _mix32(xs, ss)
        xs.bitwise_xor_(k1)
        _mix32(xs, ss)
        xs.bitwise_and_(0x7FFFFFFF)
        # h - threshold is negative (its sign bit set) exactly where h < threshold
        bits = torch.sub(xs, threshold, out=out[a - start : b - start])
        bits.bitwise_right_shift_(31)  # arithmetic: -1 where kept, 0 where dropped
    return out


def _drop(tau: torch.Tensor, bits: torch.Tensor) -> None:
    # tau where the bits are all ones, +0 where they are 0 (in place)
    if tau.dtype == torch.float32:
        tau.view(torch.int32).bitwise_and_(bits)
    elif tau.dtype == torch.float64:
        tau.view(torch.int64).bitwise_and_(bits.to(torch.int64))  # -1 widens to all ones
    else:
        tau.mul_(bits.neg().to(tau.dtype))


def keep_mask(
    seed: int,
    name: str,
    position: int,
    start: int,
    count: int,
    density: float,
    scheme: str = "counter-v1",
) -> torch.Tensor:
    """Which of entries ``start .. start + count`` of tensor ``name`` member ``position`` keeps.

    Example:
        >>> whole = keep_mask(0, "w", 1, 0, 10, 0.5, "blocks-v0")
        >>> torch.equal(whole[4:9], keep_mask(0, "w", 1, 4, 5, 0.5, "blocks-v0"))
        True
    """
    if scheme == "counter-v1":
        return counter_mask(seed, name, position, start, count, density)
    out = torch.empty(count, dtype=torch.bool)
    gen = torch.Generator()
    for block in range(start // BLOCK, (start + count + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        gen.manual_seed(_block_seed(seed, name, position, block))
        draws = torch.rand(BLOCK, generator=gen)
        a, b = max(start, lo), min(start + count, lo + BLOCK)
        out[a - start : b - start] = draws[a - lo : b - lo] < density
    return out


def drop_and_rescale(
    piece: Piece, density: float, seed: int, scheme: str = "counter-v1"
) -> list[torch.Tensor]:
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
        if scheme == "counter-v1":
            _drop(tau, counter_bits(seed, piece.name, position, piece.start, count, density))
        else:
            tau.mul_(keep_mask(seed, piece.name, position, piece.start, count, density, scheme))
        tau.div_(density)
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
    taus = drop_and_rescale(piece, options.density, options.seed, options.mask)
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
    taus = drop_and_rescale(piece, options.density, options.seed, options.mask)
    return add_scaled(piece.base, disjoint_merge(taus, piece.weights), options.lambda_)
