"""Activation matching: permute one network's hidden units to line up with another's outputs.

Weight matching (:mod:`modelsoup.repair.matching`) compares weights; it works
best when training has moved the weights far from their random start. After a
short training run most of each weight is still initial noise, and matching
what the units *compute* does better: run both networks on the same unlabeled
inputs, correlate every unit of one with every unit of the other, and pair
them up by a linear assignment that maximises the summed correlation (Git
Re-Basin's activation matching, Ainsworth et al. 2023; REPAIR, Jordan et al.
2023). Each permutation is solved once, independently of the others, because
permuting a network's units reorders its activations without changing them.

Which outputs carry which permutation comes from the spec: a module whose
``weight`` has a permutation on axis 0 (a Conv, Linear or norm layer) emits
that permutation's units. Statistics are accumulated batch by batch, so memory
is two models plus one units x units matrix per module.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from modelsoup.repair import permute_state_dict, trace_permutation_spec
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> x = torch.randn(64, 3)
    >>> spec = trace_permutation_spec(net, x[:4])
    >>> shuffled = permute_state_dict(net.state_dict(), spec, {"P_0": torch.randperm(6)})
    >>> back = activation_align(net, net.state_dict(), shuffled, spec, x)
    >>> torch.equal(back["0.weight"], net.state_dict()["0.weight"])
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from modelsoup.errors import AlignmentError, ConfigError
from modelsoup.repair.batchnorm import batches_of, forward_batch
from modelsoup.repair.spec import PermutationSpec, permute_state_dict

__all__ = ["activation_align", "activation_matching"]

_CHANNELS_FIRST = (_ConvNd, _BatchNorm, nn.GroupNorm)
#: the modules whose weight's axis 0 is the axis of their output units: channels (axis 1
#: of the output) for convolutions and norms, the last axis for Linear and LayerNorm
_EMITTERS = (nn.Linear, _ConvNd, _BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _emitters(spec: PermutationSpec, module: nn.Module) -> dict[str, list[str]]:
    """``{permutation: [module names whose output units it permutes]}``: the modules of
    :data:`_EMITTERS` whose weight has the permutation on axis 0, unit by unit (a
    transposed convolution's axis 0 is its input; a PReLU's channels are not its
    output's last axis; a block-permuted weight follows a flatten)."""
    names = dict(module.named_modules())
    out: dict[str, list[str]] = {p: [] for p in spec.perm_to_axes}
    for perm, axes in spec.perm_to_axes.items():
        for tensor, axis in axes:
            owner, _, leaf = tensor.rpartition(".")
            found = names.get(owner)
            if (
                axis == 0
                and leaf == "weight"
                and isinstance(found, _EMITTERS)
                and not getattr(found, "transposed", False)
                and spec.block(tensor, 0) == 1
            ):
                out[perm].append(owner)
    missing = sorted(p for p, mods in out.items() if not mods)
    if missing:
        raise AlignmentError(
            f"no module output carries permutation(s) {', '.join(missing)}; activation "
            "matching cannot see those units: use weight matching (method 'reference')"
        )
    return out


def _units(module: nn.Module, output: Any, device: torch.device) -> torch.Tensor:
    """A module's output as (samples, units) in float64 on ``device``: channels are axis
    1 for convolutions and norm layers, the last axis otherwise (Linear, LayerNorm)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    axis = 1 if isinstance(module, _CHANNELS_FIRST) and output.dim() > 2 else -1
    out = output.detach().movedim(axis, -1)
    return out.reshape(-1, out.shape[-1]).to(device, torch.float64)


class _Moments:
    """Running sums for the correlation of every unit of A with every unit of B."""

    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.sa is None:
            self.sa, self.sb = a.sum(0), b.sum(0)
            self.saa, self.sbb, self.sab = (a * a).sum(0), (b * b).sum(0), a.T @ b
        else:
            self.sa += a.sum(0)
            self.sb += b.sum(0)
            self.saa += (a * a).sum(0)
            self.sbb += (b * b).sum(0)
            self.sab += a.T @ b
        self.n += a.shape[0]

    def correlation(self) -> torch.Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - torch.outer(ma, mb)
        sd_a = (self.saa / self.n - ma * ma).clamp_min(0).sqrt()
        sd_b = (self.sbb / self.n - mb * mb).clamp_min(0).sqrt()
        return cov / (torch.outer(sd_a, sd_b) + 1e-12)


def activation_matching(
    model: nn.Module,
    reference_sd: Mapping[str, torch.Tensor],
    other_sd: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    data: Iterable[Any] | torch.Tensor,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Permutations that pair each unit of ``other_sd`` with its best-correlated reference unit.

    ``model`` gives the architecture (it is copied, never modified); ``data`` is
    unlabeled inputs as for :func:`~modelsoup.repair.recalibrate_bn` (a tensor,
    split into batches of 256, or an iterable of tensors, ``(inputs, labels)``
    or keyword dicts), of which ``num_batches`` batches are used (all if None).
    Both networks run in eval mode on ``device`` (default: the CPU), where the
    batches are moved and the correlations summed. Returns ``{permutation name: index}``
    for :func:`~modelsoup.repair.spec.permute_state_dict` applied to ``other_sd``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modelsoup.repair import trace_permutation_spec
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> spec = trace_permutation_spec(net, torch.randn(4, 2))
        >>> sd = net.state_dict()
        >>> activation_matching(net, sd, sd, spec, torch.randn(32, 2))["P_0"]
        tensor([0, 1, 2])
    """
    from scipy.optimize import linear_sum_assignment  # imported here: scipy is slow to load

    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"num_batches must be at least 1, got {num_batches}")
    sizes = spec.sizes(reference_sd)
    spec.sizes(other_sd)
    emitters = _emitters(spec, model)
    device = torch.device(device if device is not None else "cpu")
    # float64 sums of products: MPS has no float64, so they are summed on the CPU there
    sums_on = device if device.type != "mps" else torch.device("cpu")
    nets = []
    for sd in (reference_sd, other_sd):
        net = copy.deepcopy(model).to(device).eval()
        try:
            net.load_state_dict(dict(sd))
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise AlignmentError(f"the weights do not fit the model: {first}") from None
        nets.append(net)
    watched = sorted({m for mods in emitters.values() for m in mods})
    moments = {m: _Moments() for m in watched}
    seen: list[dict[str, torch.Tensor]] = [{}, {}]
    hooks = []
    for side, net in enumerate(nets):
        modules = dict(net.named_modules())
        for name in watched:

            def hook(mod: nn.Module, _inp: Any, out: Any, name=name, side=side) -> None:
                seen[side][name] = _units(mod, out, sums_on)

            hooks.append(modules[name].register_forward_hook(hook))
    batches = 0
    try:
        with torch.no_grad():
            for batch in batches_of(data, num_batches):
                for net in nets:
                    forward_batch(net, batch, device, "activation matching")
                for name in watched:
                    a, b = seen[0].pop(name, None), seen[1].pop(name, None)
                    if a is not None and b is not None:
                        moments[name].add(a, b)
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ConfigError("activation matching: data yielded no batches; pass unlabeled inputs")
    perms = {}
    for perm, mods in emitters.items():
        size = (sizes[perm], sizes[perm])
        used = [moments[m].correlation().cpu() for m in mods if moments[m].n]
        used = [c for c in used if c.shape == size]  # an output whose units are not these
        if not used:
            raise AlignmentError(
                f"the modules emitting permutation {perm} ({', '.join(mods)}) never ran on the "
                "data; use weight matching (method 'reference')"
            )
        score = sum(used)
        _, cols = linear_sum_assignment(torch.nan_to_num(score).numpy(), maximize=True)
        perms[perm] = torch.as_tensor(cols, dtype=torch.long)
    return perms


def activation_align(
    model: nn.Module,
    reference_sd: Mapping[str, torch.Tensor],
    other_sd: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    data: Iterable[Any] | torch.Tensor,
    **matching: Any,
) -> dict[str, torch.Tensor]:
    """``other_sd`` with its units permuted to match ``reference_sd``'s activations.

    The result computes the same function as ``other_sd``. The arguments, and
    ``num_batches`` in ``matching``, are :func:`activation_matching`'s.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modelsoup.repair import trace_permutation_spec
        >>> a, b = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), nn.Linear(2, 3)
        >>> spec = trace_permutation_spec(a, torch.randn(4, 2))
        >>> other = {**a.state_dict(), "0.weight": b.weight.detach(), "0.bias": b.bias.detach()}
        >>> out = activation_align(a, a.state_dict(), other, spec, torch.randn(8, 2))
        >>> sorted(out) == sorted(other)
        True
    """
    perms = activation_matching(model, reference_sd, other_sd, spec, data, **matching)
    return permute_state_dict(other_sd, spec, perms)
