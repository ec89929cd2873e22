"""Memory budgets: estimate what a job needs from tensor headers, and refuse it early.

Most of modelsoup streams one tensor at a time, so memory does not grow with the number
of ingredients. The learned soup cannot: its weights are a differentiable function of
every ingredient at once (Wortsman et al. 2022, Appendix, "learned soup"), so it holds
``k`` model copies. These helpers estimate that from the ingredients' layout (shapes
and dtypes only; no tensor is read) and raise
:class:`~modelsoup.errors.MemoryBudgetError` before anything is loaded.

Example:
    >>> import torch
    >>> from modelsoup.formats.base import TensorMeta
    >>> layout = {"w": TensorMeta((1000, 1000), torch.float16)}
    >>> format_bytes(learned_soup_bytes(layout, 4, batch_size=1))
    '28.0 MB'
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from modelsoup._util import format_bytes, parse_size
from modelsoup.errors import MemoryBudgetError, SoupError
from modelsoup.formats.base import TensorMeta

FLOAT32_BYTES = 4


def total_ram() -> int:
    """Physical memory of this machine, in bytes (from ``os.sysconf``).

    Example:
        >>> total_ram() > 0
        True
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        # Not every platform reports it; 8 GB is a conservative stand-in, and the user
        # can always give ``max_memory`` explicitly.
        return 8 * 10**9


def memory_budget(max_memory: int | str | None = None) -> int:
    """The budget in bytes: ``max_memory`` (``"8GB"``-style or bytes), else half the RAM.

    Example:
        >>> memory_budget("2GB")
        2000000000
        >>> memory_budget() == total_ram() // 2
        True
    """
    if max_memory is None:
        return total_ram() // 2
    return parse_size(max_memory)


def budget_option(max_memory: int | str | None) -> int | str | None:
    """A ``max_memory`` option as given, once :func:`parse_size` reads it (``None``: the
    default budget); a ``ValueError`` otherwise, so an options model names its key.

    Example:
        >>> budget_option("8GB"), budget_option(None)
        ('8GB', None)
        >>> budget_option("lots")
        Traceback (most recent call last):
        ...
        ValueError: size 'lots' is not understood; write e.g. 5GB or 500MB
    """
    if max_memory is not None:
        try:
            parse_size(max_memory)
        except SoupError as err:
            raise ValueError(str(err)) from None
    return max_memory


def learned_soup_bytes(
    layout: Mapping[str, TensorMeta],
    k: int,
    *,
    batch_size: int,
    rows: int = 1,
    positions: int = 1,
) -> int:
    """A rough upper estimate of the memory a learned soup of ``k`` ingredients needs.

    It counts, in float32 (the mixing dtype): ``k`` stacked copies of every floating
    tensor; the mixed weights, their gradients and one temporary of the same size
    (3 model copies); the mixing logits with their gradient and two AdamW moments
    (``rows * k`` numbers, ``rows`` = 1 or the number of tensors); and activations,
    guessed as ``batch_size`` x ``positions`` (tokens of a sequence, pixels of an
    image: each a layer computes its outputs at) x the sum of every tensor's leading
    dimension (the output width of a linear layer), twice for the backward pass. It
    leaves out attention's ``positions`` x ``positions`` scores and pooling, so for long
    sequences it is still a floor.

    Example:
        >>> import torch
        >>> layout = {"w": TensorMeta((10, 10), torch.float32), "n": TensorMeta((), torch.int64)}
        >>> learned_soup_bytes(layout, 2, batch_size=1)
        2112
    """
    floats = [m for m in layout.values() if m.is_floating]
    model = sum(m.numel for m in floats) * FLOAT32_BYTES
    alphas = 4 * rows * k * FLOAT32_BYTES
    width = sum(m.shape[0] if m.shape else 1 for m in floats)
    activations = 2 * batch_size * positions * width * FLOAT32_BYTES
    return (k + 3) * model + alphas + activations


def positions_per_example(inputs: Any) -> int:
    """How many positions a model computes each example's activations at, from one
    batch of inputs: the tokens of integer ids ``(batch, tokens)``, the pixels of float
    ``(batch, channels, *spatial)`` inputs, 1 for ``(batch, features)``. A dict of
    inputs is read by its ``input_ids``, else its first tensor.

    Example:
        >>> import torch
        >>> positions_per_example({"input_ids": torch.zeros(4, 128, dtype=torch.long)})
        128
        >>> positions_per_example(torch.zeros(4, 3, 32, 32))
        1024
        >>> positions_per_example(torch.zeros(4, 8))
        1
    """
    if isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        inputs = inputs.get("input_ids", tensors[0] if tensors else None)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return 1
    shape = inputs.shape[1:] if not inputs.is_floating_point() else inputs.shape[2:]
    return max(1, math.prod(shape))


def check_budget(needed: int, budget: int, what: str, advice: str, *, detail: str = "") -> None:
    """Raise :class:`MemoryBudgetError` if ``needed`` bytes exceed ``budget``.

    The message reads ``<what> needs ~X GB <detail>; budget is Y GB; <advice>``.

    Example:
        >>> check_budget(10, 100, "a job", "raise max_memory")
        >>> check_budget(5 * 10**9, 10**9, "a soup", "raise max_memory", detail="for 3 ingredients")
        Traceback (most recent call last):
        ...
        modelsoup.errors.MemoryBudgetError: a soup needs ~5.0 GB for 3 ingredients; budget is \
1.0 GB; raise max_memory
    """
    if needed > budget:
        detail = f" {detail}" if detail else ""
        raise MemoryBudgetError(
            f"{what} needs ~{format_bytes(needed)}{detail}; budget is {format_bytes(budget)}; "
            f"{advice}"
        )
