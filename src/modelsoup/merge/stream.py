"""Merging one tensor with a rule, streamed: what a soup calls for each floating tensor.

:func:`merged_pieces` reads the members' (and the base's) values of one tensor, a
piece at a time, hands each piece to the rule and yields the result. What stays in
memory is the members' pieces of one tensor (``k + 1`` pieces, in the accumulation
dtype), whatever the size of the model:

- elementwise rules (``linear``, ``task_arithmetic``, ``dare_*``, ``wise_ft``): one
  read of each member;
- rules with whole-tensor statistics (``slerp``, ``model_stock``): the statistics are
  summed over pieces of :data:`STATS_ELEMENTS` in a first read, then the tensor is
  merged piece by piece in a second, so each member is read twice;
- ``ties``: the top-k trim needs the whole tensor: the members' whole tensors are read
  once and held together (``k + 1`` copies of that tensor), then cut into pieces.

Statistics are always summed over the same blocks, and every rule is elementwise given
its statistics, so a tensor merged piece by piece equals the tensor merged whole, bit
for bit, whatever the piece size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from modelsoup.accumulator import checked_float, is_finite
from modelsoup.errors import ConfigError
from modelsoup.formats.base import TensorMeta
from modelsoup.ingredients import Ingredient
from modelsoup.merge.registry import (
    CACHE_ELEMENTS,
    MergeSpec,
    Piece,
    check_base,
    check_members,
)
from modelsoup.merge.wise_ft import wise_ft_mix

#: elements per block when a rule's statistics are summed (fixed: results never depend
#: on the piece size a writer asks for)
STATS_ELEMENTS = 1 << 22


def merged_pieces(
    merge: MergeSpec,
    name: str,
    meta: TensorMeta,
    members: Sequence[tuple[int, Ingredient, float]],
    base: Ingredient | None,
    *,
    step: int,
    accum_dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Merge tensor ``name`` of ``members`` (``(position, ingredient, weight)``) with a rule.

    Yields flat pieces of at most ``step`` elements, in order, in ``accum_dtype``.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredient
        >>> from modelsoup.merge import as_merge
        >>> base = open_ingredient({"w": torch.zeros(3)})
        >>> a = open_ingredient({"w": torch.tensor([1.0, 2.0, 3.0])})
        >>> merge = as_merge({"rule": "task_arithmetic", "lambda": 0.5})
        >>> pieces = merged_pieces(merge, "w", a.meta("w"), [(0, a, 1.0)], base, step=2)
        >>> [p.tolist() for p in pieces]
        [[0.5, 1.0], [1.5]]
    """
    check_base(merge, base)
    check_members(merge, len(members))
    spec, options = merge.spec, merge.options
    numel = meta.numel

    # one buffer per member (and the base), reused from piece to piece: a piece is read
    # straight into it when the file holds the accumulation dtype (no copy, no fresh
    # pages), and the rule changes it in place
    buffers: dict[int, torch.Tensor] = {}

    def read(start: int, count: int, stats: torch.Tensor | None) -> Piece:
        def into(slot: int, ing: Ingredient) -> torch.Tensor:
            if slot not in buffers or buffers[slot].numel() < count:
                buffers[slot] = torch.empty(count, dtype=accum_dtype)
            return _read(ing, name, start, buffers[slot][:count])

        values = [into(slot, ing) for slot, (_, ing, _) in enumerate(members)]
        used = base is not None and (spec.needs_base or options.alpha is not None)
        base_values = into(-1, base) if used else None  # slerp alone never reads it
        return Piece(
            name,
            start,
            values,
            [w for _, _, w in members],
            [p for p, _, _ in members],
            base_values,
            stats,
        )

    def merged(piece: Piece) -> torch.Tensor:
        base_values = piece.base.clone() if options.alpha is not None else None
        out = spec.fn(piece, options)
        if base_values is not None:
            out = wise_ft_mix(base_values, out, options.alpha)
        if not is_finite(out):
            raise ConfigError(
                f"tensor '{name}': merging with rule '{merge.rule}' overflows {accum_dtype}; "
                "use accum_dtype float64 (--accum-dtype float64), and write the soup in "
                "float64 (--out-dtype fp64) if it is that large"
            )
        return out

    stats = None
    if spec.statistics is not None:
        for start in range(0, numel, STATS_ELEMENTS):
            found = spec.statistics(read(start, min(STATS_ELEMENTS, numel - start), None), options)
            stats = found if stats is None else stats.add_(found)
    if spec.scope == "tensor":
        whole = merged(read(0, numel, stats)) if numel else torch.empty(0, dtype=accum_dtype)
        for start in range(0, numel, step):
            yield whole[start : start + step]
        return
    step = min(step, CACHE_ELEMENTS)
    for start in range(0, numel, step):
        yield merged(read(start, min(step, numel - start), stats))


def _read(ing: Ingredient, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
    # elements start.. of one tensor in ``out`` (the accumulation dtype; rules change it
    # in place): read into its bytes when the stored dtype is the same, else converted
    if ing.meta(name).dtype == out.dtype:
        got = ing.tensor_range(name, start, out.numel(), out.view(torch.uint8))
    else:  # in the accumulation dtype (a LoRA change is not rounded to its base's dtype)
        got = ing.source.range_as(name, start, out.numel(), out.dtype)
    if got.data_ptr() != out.data_ptr():
        out.copy_(got)
    return checked_float(out, name, ing.label)
