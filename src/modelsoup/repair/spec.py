"""Permutation specs: which tensor axes each hidden-unit permutation acts on.

Two networks that differ only by a reordering of hidden units compute the same
function. A :class:`PermutationSpec` records, for every tensor of a state
dict, which named permutation (``"P_0"``, ``"P_1"``, ...) reorders each of its
axes, so that :func:`permute_state_dict` can reorder a whole network
consistently. The representation follows the ``axes_to_perm`` /
``perm_to_axes`` pair of Git Re-Basin (Ainsworth et al. 2023, section 3).

One extension: an axis may be permuted in *blocks*. When a conv feature map of
``C x H x W`` is flattened into a ``Linear``, channel ``c`` owns the
contiguous input features ``c*H*W ... (c+1)*H*W - 1``, so the channel
permutation acts on that axis with block size ``H*W``.

Example:
    >>> import torch
    >>> spec = PermutationSpec({"fc1.weight": ("P_0", None), "fc1.bias": ("P_0",),
    ...                         "fc2.weight": (None, "P_0")})
    >>> spec.perm_to_axes["P_0"]
    [('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)]
    >>> sd = {"fc1.weight": torch.eye(2), "fc1.bias": torch.tensor([1.0, 2.0]),
    ...       "fc2.weight": torch.tensor([[3.0, 4.0]])}
    >>> permute_state_dict(sd, spec, {"P_0": torch.tensor([1, 0])})["fc2.weight"]
    tensor([[4., 3.]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelsoup.errors import AlignmentError, ConfigError

__all__ = ["PermutationSpec", "permute_state_dict"]


class PermutationSpec:
    """Maps named permutations to the tensor axes they reorder, and back.

    Args:
        axes: tensor name -> one entry per axis of that tensor, each a
            permutation name or ``None`` (axis not permuted). Tensors that are
            not permuted at all may be left out.
        blocks: optional tensor name -> block size per axis (1 = ordinary
            axis). A block size ``b`` means permutation index ``i`` moves the
            ``b`` contiguous entries ``i*b ... i*b+b-1`` together.

    Attributes:
        axes_to_perm: tensor name -> tuple of permutation name or None per axis.
        perm_to_axes: permutation name -> list of ``(tensor name, axis)``.

    Example:
        >>> spec = PermutationSpec({"conv.weight": ("P_0", None, None, None),
        ...                         "fc.weight": (None, "P_0")},
        ...                        blocks={"fc.weight": (1, 16)})
        >>> spec.block("fc.weight", 1), spec.block("conv.weight", 0)
        (16, 1)
        >>> PermutationSpec.from_dict(spec.to_dict()) == spec
        True
    """

    def __init__(
        self,
        axes: Mapping[str, Sequence[str | None]],
        blocks: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.axes_to_perm: dict[str, tuple[str | None, ...]] = {}
        self.perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for what, mapping in (("axes", axes), ("blocks", blocks or {})):
            if not isinstance(mapping, Mapping):
                raise ConfigError(
                    f"permutation spec '{what}' must map tensor names to lists, got a "
                    f"{type(mapping).__name__}"
                )
        for name, entry in axes.items():
            if isinstance(entry, str) or not isinstance(entry, Sequence):
                raise ConfigError(
                    f"permutation spec entry {name!r} must be a list with one permutation "
                    f"name or None per axis, got {entry!r}"
                )
            self.axes_to_perm[name] = tuple(entry)
            for axis, perm in enumerate(entry):
                if perm is None:
                    continue
                if not isinstance(perm, str):
                    raise ConfigError(
                        f"permutation spec entry {name!r} axis {axis}: expected a permutation "
                        f"name or None, got {perm!r}"
                    )
                self.perm_to_axes.setdefault(perm, []).append((name, axis))
        self.blocks: dict[str, tuple[int, ...]] = {}
        for name, sizes in (blocks or {}).items():
            if (
                isinstance(sizes, str)
                or not isinstance(sizes, Sequence)
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in sizes)
            ):
                raise ConfigError(
                    f"permutation spec blocks for {name!r} must be a list of whole numbers, "
                    f"one per axis, got {sizes!r}"
                )
            sizes = tuple(sizes)
            if name not in self.axes_to_perm or len(sizes) != len(self.axes_to_perm[name]):
                raise ConfigError(
                    f"permutation spec blocks for {name!r} must give one size per axis of an "
                    "entry in the axes mapping"
                )
            if any(b < 1 for b in sizes):
                raise ConfigError(f"permutation spec blocks for {name!r} must be >= 1: {sizes}")
            if any(b != 1 for b in sizes):
                self.blocks[name] = sizes

    def block(self, name: str, axis: int) -> int:
        """Block size of ``axis`` of tensor ``name`` (1 unless set).

        Example:
            >>> PermutationSpec({"w": ("P_0",)}).block("w", 0)
            1
        """
        sizes = self.blocks.get(name)
        return 1 if sizes is None else sizes[axis]

    def sizes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Number of units of every permutation, checked against ``state_dict``.

        Raises :class:`~modelsoup.errors.AlignmentError` if a tensor is missing,
        has the wrong number of axes, or two tensors disagree on a size.

        Example:
            >>> import torch
            >>> PermutationSpec({"w": ("P_0", None)}).sizes({"w": torch.zeros(3, 5)})
            {'P_0': 3}
        """
        sizes: dict[str, int] = {}
        for perm, places in self.perm_to_axes.items():
            for name, axis in places:
                if name not in state_dict:
                    raise AlignmentError(
                        f"permutation spec names tensor {name!r}, which the state dict lacks; "
                        "regenerate the spec for this model"
                    )
                tensor = state_dict[name]
                if tensor.dim() != len(self.axes_to_perm[name]):
                    raise AlignmentError(
                        f"tensor {name!r} has {tensor.dim()} axes but the permutation spec "
                        f"lists {len(self.axes_to_perm[name])}; fix the spec entry"
                    )
                length, block = tensor.shape[axis], self.block(name, axis)
                if length % block:
                    raise AlignmentError(
                        f"tensor {name!r} axis {axis} has length {length}, not a multiple of "
                        f"its block size {block}; fix the spec blocks"
                    )
                size = length // block
                if sizes.setdefault(perm, size) != size:
                    raise AlignmentError(
                        f"permutation {perm!r} has {sizes[perm]} units elsewhere but {size} on "
                        f"tensor {name!r} axis {axis}; these axes cannot share a permutation"
                    )
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: ``{"axes": {name: [...]}, "blocks": {name: [...]}}``.

        Example:
            >>> PermutationSpec({"w": ("P_0", None)}).to_dict()
            {'axes': {'w': ['P_0', None]}, 'blocks': {}}
        """
        return {
            "axes": {name: list(perms) for name, perms in self.axes_to_perm.items()},
            "blocks": {name: list(sizes) for name, sizes in self.blocks.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict` (``"blocks"`` may be omitted).

        Example:
            >>> PermutationSpec.from_dict({"axes": {"w": ["P_0", None]}}).axes_to_perm
            {'w': ('P_0', None)}
        """
        if not isinstance(data, Mapping) or "axes" not in data:
            raise ConfigError(
                "a permutation spec dict needs an 'axes' key mapping tensor names to lists of "
                "permutation names or null"
            )
        return cls(data["axes"], data.get("blocks") or {})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return self.axes_to_perm == other.axes_to_perm and self.blocks == other.blocks

    def __repr__(self) -> str:
        return (
            f"PermutationSpec({len(self.perm_to_axes)} permutations over "
            f"{len(self.axes_to_perm)} tensors)"
        )


def expand_index(index: torch.Tensor, block: int) -> torch.Tensor:
    """Turn a permutation of units into one of their ``block``-sized runs of entries.

    Example:
        >>> import torch
        >>> expand_index(torch.tensor([1, 0]), 2)
        tensor([2, 3, 0, 1])
    """
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block)).reshape(-1)


def permute_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Reorder every permuted axis of ``state_dict``; returns a new dict.

    ``perms[name]`` is an index tensor: the permuted tensor takes entry
    ``perms[name][i]`` of the original at position ``i`` along each axis the
    permutation acts on. Tensors the spec does not mention are passed through
    unchanged (same objects).

    Example:
        >>> import torch
        >>> spec = PermutationSpec({"w": ("P_0", None)})
        >>> permute_state_dict({"w": torch.tensor([[1], [2]])}, spec, {"P_0": torch.tensor([1, 0])})
        {'w': tensor([[2],
                [1]])}
    """
    sizes = spec.sizes(state_dict)
    index: dict[str, torch.Tensor] = {}
    for perm, size in sizes.items():
        if perm not in perms:
            raise ConfigError(f"no index given for permutation {perm!r}; pass one for every name")
        idx = torch.as_tensor(perms[perm], dtype=torch.long).cpu()
        if idx.shape != (size,) or not torch.equal(idx.sort().values, torch.arange(size)):
            raise ConfigError(
                f"index for permutation {perm!r} must be a reordering of 0..{size - 1}"
            )
        index[perm] = idx
    out = dict(state_dict)
    for name, axis_perms in spec.axes_to_perm.items():
        tensor = state_dict[name] if any(axis_perms) else None
        if tensor is None:
            continue
        for axis, perm in enumerate(axis_perms):
            if perm is not None:
                idx = expand_index(index[perm], spec.block(name, axis)).to(tensor.device)
                tensor = tensor.index_select(axis, idx)
        out[name] = tensor
    return out
