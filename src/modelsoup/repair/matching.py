"""Weight matching: permute one network's hidden units to line up with another's.

Implements the weight matching algorithm of Git Re-Basin (Ainsworth, Hayase
and Srinivasa, ICLR 2023, algorithm 1): maximise the summed inner product
``sum_l <W_ref_l, P_l W_other_l P_{l-1}^T>`` over permutations by coordinate
ascent. With every permutation but one held fixed, the problem for that one
is a linear assignment problem, solved exactly by
``scipy.optimize.linear_sum_assignment``. Sweeps visit the permutations in a
random (seeded) order and stop once a full sweep improves nothing.

Example:
    >>> import torch
    >>> from modelsoup.repair.spec import PermutationSpec, permute_state_dict
    >>> spec = PermutationSpec({"a": ("P_0", None), "b": (None, "P_0")})
    >>> ref = {"a": torch.randn(5, 3), "b": torch.randn(2, 5)}
    >>> other = permute_state_dict(ref, spec, {"P_0": torch.tensor([4, 2, 0, 1, 3])})
    >>> aligned = align_to(ref, other, spec)
    >>> torch.equal(aligned["a"], ref["a"]) and torch.equal(aligned["b"], ref["b"])
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from modelsoup.errors import AlignmentError, ConfigError, SoupWarning
from modelsoup.repair.spec import PermutationSpec, expand_index, permute_state_dict

__all__ = ["align_ingredients", "align_to", "merge_many", "weight_matching"]


def _unit_rows(tensor: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """View ``tensor`` as one row per unit (its block of entries along ``axis``, flattened)."""
    return tensor.movedim(axis, 0).reshape(units, -1).to(torch.float64)


def _permute_other_axes(
    spec: PermutationSpec, name: str, tensor: torch.Tensor, skip: int, perms: dict
) -> torch.Tensor:
    # Git Re-Basin's get_permuted_param(..., except_axis): the axis being solved
    # is left alone, every other permuted axis uses the current guess.
    for axis, perm in enumerate(spec.axes_to_perm[name]):
        if perm is not None and axis != skip:
            index = expand_index(perms[perm], spec.block(name, axis)).to(tensor.device)
            tensor = tensor.index_select(axis, index)
    return tensor


def weight_matching(
    spec: PermutationSpec,
    reference_sd: Mapping[str, torch.Tensor],
    other_sd: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Permutations that make ``other_sd`` as similar as possible to ``reference_sd``.

    Returns ``{permutation name: LongTensor index}`` for
    :func:`~modelsoup.repair.spec.permute_state_dict` applied to ``other_sd``.
    Deterministic for a given ``seed``; at most ``max_iter`` sweeps.

    Example:
        >>> import torch
        >>> spec = PermutationSpec({"w": ("P_0", None)})
        >>> ref = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
        >>> weight_matching(spec, ref, {"w": ref["w"][[2, 0, 1]]})["P_0"]
        tensor([1, 2, 0])
    """
    from scipy.optimize import linear_sum_assignment  # imported here: scipy is slow to load

    if max_iter < 1:
        raise ConfigError(f"max_iter must be at least 1, got {max_iter}")
    sizes = spec.sizes(reference_sd)
    spec.sizes(other_sd)  # raises if other_sd lacks a tensor
    for name in spec.axes_to_perm:
        if name in reference_sd and reference_sd[name].shape != other_sd[name].shape:
            raise AlignmentError(
                f"tensor {name!r} has shape {tuple(other_sd[name].shape)} in one model and "
                f"{tuple(reference_sd[name].shape)} in the reference; only models of the same "
                "architecture can be aligned"
            )
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    for _ in range(max_iter):
        improved = False
        for perm in (names[i] for i in rng.permutation(len(names))):
            n = sizes[perm]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in spec.perm_to_axes[perm]:
                ref = reference_sd[name]
                if not ref.is_floating_point():
                    continue
                other = _permute_other_axes(spec, name, other_sd[name], axis, perms)
                cost += _unit_rows(ref, axis, n).cpu() @ _unit_rows(other, axis, n).cpu().T
            cost_np = cost.numpy()
            rows, cols = linear_sum_assignment(cost_np, maximize=True)
            old = cost_np[np.arange(n), perms[perm].numpy()].sum()
            new = cost_np[rows, cols].sum()
            # only accept strict improvements, so ties cannot make it cycle
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[perm] = torch.as_tensor(cols, dtype=torch.long)
                improved = True
        if not improved:
            break
    return perms


def align_to(
    reference_sd: Mapping[str, torch.Tensor],
    other_sd: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``other_sd`` with its hidden units permuted to match ``reference_sd``.

    The result computes the same function as ``other_sd``.

    Example:
        >>> import torch
        >>> spec = PermutationSpec({"w": ("P_0",)})
        >>> align_to({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 1.0])}, spec)
        {'w': tensor([1., 2.])}
    """
    perms = weight_matching(spec, reference_sd, other_sd, max_iter=max_iter, seed=seed)
    return permute_state_dict(other_sd, spec, perms)


def align_ingredients(
    reference_sd: Mapping[str, torch.Tensor],
    others: Sequence[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Align each of ``others`` to ``reference_sd`` (the reference itself is not included).

    Example:
        >>> import torch
        >>> spec = PermutationSpec({"w": ("P_0",)})
        >>> ref = {"w": torch.tensor([1.0, 2.0])}
        >>> align_ingredients(ref, [{"w": torch.tensor([2.0, 1.0])}, ref], spec)
        [{'w': tensor([1., 2.])}, {'w': tensor([1., 2.])}]
    """
    return [align_to(reference_sd, sd, spec, max_iter=max_iter, seed=seed) for sd in others]


def merge_many(
    states: Sequence[Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    max_rounds: int = 20,
    max_iter: int = 100,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Align k networks to each other: Git Re-Basin's MergeMany (Ainsworth et al. 2023).

    Aligning every model to one reference suits a two-model average, but in a
    k-model soup each model should line up with the *others*. Each round visits
    the models in a random (seeded) order and re-permutes each one to match the
    mean of all the others (:func:`weight_matching` against that mean); rounds
    repeat until no model changes, or ``max_rounds`` (then a :class:`SoupWarning`
    says it stopped early). Every result computes the same function as its input.
    Holds the k state dicts and one float64 running sum in memory.

    Example:
        >>> import torch
        >>> spec = PermutationSpec({"w": ("P_0", None)})
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> out = merge_many([{"w": w}, {"w": w[[2, 0, 1]]}, {"w": w[[1, 2, 0]]}], spec)
        >>> all(torch.equal(o["w"], out[0]["w"]) for o in out)
        True
    """
    k = len(states)
    if k < 2:
        raise ConfigError(f"MergeMany needs at least 2 models, got {k}")
    if max_rounds < 1:
        raise ConfigError(f"max_rounds must be at least 1, got {max_rounds}")
    pool = [dict(s) for s in states]
    floats = [n for n, t in pool[0].items() if t.is_floating_point()]
    total = {n: sum(s[n].to(torch.float64) for s in pool) for n in floats}
    order = torch.Generator().manual_seed(seed)
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(k, generator=order).tolist():
            others = dict(pool[i])  # non-float tensors (e.g. counters) pass through
            for n in floats:
                others[n] = (total[n] - pool[i][n].to(torch.float64)) / (k - 1)
            perms = weight_matching(spec, others, pool[i], max_iter=max_iter, seed=seed)
            if all(torch.equal(p, torch.arange(len(p))) for p in perms.values()):
                continue
            new = permute_state_dict(pool[i], spec, perms)
            for n in floats:
                total[n] += new[n].to(torch.float64) - pool[i][n].to(torch.float64)
            pool[i] = new
            changed = True
        if not changed:
            return pool
    warnings.warn(
        f"MergeMany stopped after max_rounds={max_rounds} rounds with models still changing; "
        "the alignment is usable but not a fixed point (raise max_rounds to go on)",
        SoupWarning,
        stacklevel=2,
    )
    return pool
