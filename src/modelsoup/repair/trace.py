"""Derive a :class:`PermutationSpec` from a module by ``torch.fx`` tracing.

Every ``Linear``/``Conv``/``Embedding`` output starts a new *unit group* (a set
of hidden units that may be reordered freely). The walk over the traced graph
follows where each group's units travel: elementwise ops, norms, pooling and
flatten keep them, and every parameter they meet gets an axis tied to the
group. Residual additions and gating products force their operands to share
one permutation, so groups are merged with union-find -- the same constraint
Git Re-Basin (Ainsworth et al. 2023, appendix on ResNets) writes by hand.
Groups that reach the network output, or meet an unpermuted tensor, are
merged into the ``FIXED`` group and never permuted.

Anything the walker does not understand that touches a permuted axis raises
:class:`~modelsoup.errors.AlignmentError`; after tracing, the spec is checked
by running the model with random permutations applied, so a wrong spec is an
error rather than a silently broken soup.

Example:
    >>> import torch
    >>> from torch import nn
    >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> trace_permutation_spec(mlp, torch.randn(3, 4)).axes_to_perm
    {'0.weight': ('P_0', None), '0.bias': ('P_0',), '2.weight': (None, 'P_0')}
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from modelsoup.errors import AlignmentError, ConfigError
from modelsoup.repair.spec import PermutationSpec, permute_state_dict

__all__ = ["check_keeps_function", "trace_permutation_spec"]

FIXED = 0  # the group of units that must keep their order (inputs, outputs)
HINT = "write a PermutationSpec by hand for this model (see modelsoup.repair.PermutationSpec)"

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.ZeroPad1d,
    nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.Upsample,
)  # fmt: skip
_LAYER_NORMS = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))  # RMSNorm: torch >= 2.4
# call_function targets are callables and call_method targets are strings, so
# one set per kind of op holds both.
# Ops whose tensor operands combine entry by entry (with broadcasting).
_ELEMENTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.gt, operator.lt, operator.ge, operator.le,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_",
}  # fmt: skip
# Ops that act on one tensor entry by entry (or along an axis, equivariantly).
_UNARY = {
    operator.neg, torch.neg, torch.abs, torch.exp, torch.relu, torch.sigmoid, torch.tanh,
    torch.clamp, torch.softmax, torch.log_softmax, F.relu, F.relu6, F.gelu, F.silu, F.elu,
    F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus,
    F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, F.log_softmax,
    "relu", "relu_", "sigmoid", "tanh", "neg", "abs", "exp", "clamp", "clamp_", "softmax",
    "log_softmax", "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as",
}  # fmt: skip
_RESHAPE = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as",
}  # fmt: skip
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_TRANSPOSE = {torch.permute, torch.transpose, torch.t, "permute", "transpose", "t"}
_EXPAND = {"expand", "expand_as"}  # only repeat size-1 axes (and may add leading ones)
_POOL = {  # function -> number of trailing spatial axes it acts on
    getattr(F, f"{kind}{n}d"): n
    for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
    for n in (1, 2, 3)
}
_SIZE_QUERIES = {"size", "dim", "numel"}
_SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
# Methods whose extra tensor argument only lends its shape or dtype.
_TEMPLATE_METHODS = {"to", "type_as", "view_as", "reshape_as", "expand_as"}


@dataclass(frozen=True)
class _Units:
    """Axis ``axis`` of a value holds the units of ``group`` in runs of ``block``."""

    axis: int
    group: int
    block: int = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        # The smaller id becomes the root, so FIXED (0) always stays FIXED.
        lo, hi = sorted((self.find(a), self.find(b)))
        self.parent[hi] = lo
        return lo


def _nodes_in(*args: Any) -> Iterator[fx.Node]:
    for arg in args:
        if isinstance(arg, fx.Node):
            yield arg
        elif isinstance(arg, (tuple, list)):
            yield from _nodes_in(*arg)
        elif isinstance(arg, dict):
            yield from _nodes_in(*arg.values())


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _reshape_units(u: _Units, shape_in: tuple, shape_out: tuple) -> _Units | None:
    """Where the units of ``u`` land after a row-major reshape, or None if they get mixed.

    Unit ``c`` owns one contiguous chunk of entries inside every slice of the
    leading axes; the reshape keeps that iff some output axis has the same
    leading size and splits evenly into those chunks (e.g. C x H x W -> C*H*W).
    """
    if shape_in == shape_out:
        return u
    units = shape_in[u.axis] // u.block
    outer, chunk = math.prod(shape_in[: u.axis]), u.block * math.prod(shape_in[u.axis + 1 :])
    for axis, length in enumerate(shape_out):
        if (
            math.prod(shape_out[:axis]) == outer
            and length % units == 0
            and length * math.prod(shape_out[axis + 1 :]) == units * chunk
        ):
            return _Units(axis, u.group, length // units)
    return None


class _Walker:
    """Walks a traced graph once, recording unit groups and tensor-axis ties."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.uf = _UnionFind()
        self.units: dict[fx.Node, _Units | None] = {}
        state = {k: t for k, t in module.state_dict(keep_vars=True).items() if torch.is_tensor(t)}
        self.ndims = {name: t.dim() for name, t in state.items()}
        # Tied weights appear under several names; tie every name to the first one.
        first: dict[int, str] = {}
        self.canon = {name: first.setdefault(id(t), name) for name, t in state.items()}
        self.ties: dict[tuple[str, int], tuple[int, int | None]] = {}

    def fail(self, node: fx.Node, why: str) -> AlignmentError:
        if node.op == "call_module":
            kind = type(self.module.get_submodule(node.target)).__name__
            where = f"module '{node.target}' ({kind})"
        else:
            where = (
                f"node '{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)})"
            )
        return AlignmentError(f"cannot trace permutations through {where}: {why}; {HINT}")

    def tie(self, name: str, axis: int, u: _Units | None) -> None:
        if name not in self.canon:
            return
        key = (self.canon[name], axis)
        if u is None:
            # applied to values that are never permuted (a layer also run on the input):
            # this axis must keep its order wherever else the tensor is used
            old = self.ties.setdefault(key, (FIXED, None))
            self.uf.union(old[0], FIXED)
            return
        old = self.ties.setdefault(key, (u.group, u.block))
        if old[1] is None:  # pinned so far, with no layout of its own
            self.ties[key] = old = (old[0], u.block)
        if old[1] != u.block:
            raise AlignmentError(f"tensor {name!r} axis {axis} is used with two layouts; {HINT}")
        self.uf.union(old[0], u.group)

    def fresh(self, prefix: str, axis: int) -> _Units:
        """A new group for the outputs of a Linear/Conv: weight rows and bias follow it."""
        u = _Units(axis, self.uf.new())
        self.tie(prefix + "weight", 0, u)
        self.tie(prefix + "bias", 0, u)
        return u

    def visit(self, node: fx.Node) -> None:
        if node.op == "output":
            for n in _nodes_in(node.args):
                if self.units.get(n) is not None:
                    self.uf.union(self.units[n].group, FIXED)
            return
        if node.op in ("placeholder", "get_attr"):
            result = None
        elif node.op == "call_module":
            result = self.call_module(node)
        else:
            result = self.call_op(node)
        self.units[node] = result

    def permuted(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in _nodes_in(node.args, node.kwargs) if self.units.get(n) is not None]

    def call_module(self, node: fx.Node) -> _Units | None:
        m = self.module.get_submodule(node.target)
        p, moved = node.target + ".", self.permuted(node)
        u = self.units.get(node.args[0]) if node.args else None
        nd_in, out = len(_shape(node.args[0]) or ()), _shape(node)
        if moved and (moved != [node.args[0]] or out is None):
            raise self.fail(node, "unsupported layer on permuted hidden units")
        if isinstance(m, nn.Linear):
            if u is not None and u.axis != nd_in - 1:
                # Linear maps each row independently, so units on another axis (e.g.
                # token mixing) pass through; its own outputs then stay unpermuted.
                return u
            self.tie(p + "weight", 1, u)
            return self.fresh(p, len(out) - 1)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            channel = nd_in - len(m.kernel_size) - 1
            if u is not None and (u.axis != channel or u.block != 1):
                raise self.fail(node, "permuted axis is not the channel axis")
            if m.groups == 1:
                self.tie(p + "weight", 1, u)
                return self.fresh(p, channel)
            if m.groups == m.in_channels == m.out_channels:  # depthwise: channels stay put
                self.tie(p + "weight", 0, u)
                self.tie(p + "bias", 0, u)
                return u
            raise self.fail(node, "grouped convolution mixes channel groups")
        if isinstance(m, nn.Embedding):
            if u is not None:
                raise self.fail(node, "embedding indices cannot be permuted")
            new = _Units(len(out) - 1, self.uf.new())
            self.tie(p + "weight", 1, new)
            return new
        if u is None:  # everything below only passes units through
            return None
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if u.axis != 1:
                raise self.fail(node, "permuted axis is not the channel axis")
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.tie(p + name, 0, u)
            return u
        if isinstance(m, _LAYER_NORMS):
            first = nd_in - len(m.normalized_shape)  # norm is invariant over these axes
            if u.axis >= first:
                self.tie(p + "weight", u.axis - first, u)
                self.tie(p + "bias", u.axis - first, u)
            return u
        if isinstance(m, nn.GroupNorm):
            if u.axis != 1 or 1 < m.num_groups < m.num_channels:
                raise self.fail(node, "GroupNorm with 1 < groups < channels mixes channel groups")
            self.tie(p + "weight", 0, u)
            self.tie(p + "bias", 0, u)
            return u
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1:
                if u.axis != min(1, nd_in - 1):
                    raise self.fail(node, "permuted axis is not the channel axis")
                self.tie(p + "weight", 0, u)
            return u
        if isinstance(m, _ELEMENTWISE_MODULES):
            return u
        if isinstance(m, _SPATIAL_MODULES):
            name = type(m).__name__
            spatial = int(name[-2]) if name[-2].isdigit() else nd_in - 2
            if u.axis >= len(out) - spatial:
                raise self.fail(node, "permuted axis is a spatial axis")
            return u
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshaped(node, u)
        raise self.fail(node, "unsupported layer on permuted hidden units")

    def reshaped(self, node: fx.Node, u: _Units) -> _Units:
        moved = _reshape_units(u, _shape(node.args[0]), _shape(node))
        if moved is None:
            raise self.fail(node, "reshape mixes permuted units with other axes")
        return moved

    def call_op(self, node: fx.Node) -> _Units | None:
        target, out = node.target, _shape(node)
        if target in _ELEMENTWISE:
            return self.elementwise(node)
        if (
            target in _UNARY
            and target not in _TEMPLATE_METHODS
            and any(_shape(n) is not None for n in _nodes_in(node.args[1:], node.kwargs))
        ):
            # a tensor operand beside the input (clamp's min or max): entry by entry
            return self.elementwise(node)
        x = node.args[0] if node.args else None
        moved = self.permuted(node)
        if node.op == "call_method" and target in _TEMPLATE_METHODS:
            moved = [n for n in moved if n is x]
        if not moved:
            return None  # nothing permuted flows in, so nothing permuted flows out
        if moved != [x]:
            raise self.fail(node, "unsupported operation on permuted hidden units")
        u, shape_in = self.units[x], _shape(x)
        if target in _SIZE_QUERIES or (target is getattr and node.args[1] in _SIZE_ATTRIBUTES):
            return None  # sizes are permutation invariant
        if out is None:
            raise self.fail(node, "unsupported operation on permuted hidden units")
        if target in _UNARY:
            return u
        if target in _RESHAPE:
            return self.reshaped(node, u)
        if target in _EXPAND:
            return _Units(u.axis + len(out) - len(shape_in), u.group, u.block)
        if target in _REDUCE:
            return self.reduced(node, u, len(shape_in))
        if target in _TRANSPOSE:
            return self.transposed(node, u, len(shape_in))
        if target in _POOL or target is F.pad:
            spatial = _POOL.get(target) or len(node.args[1]) // 2
            if u.axis >= len(out) - spatial:
                raise self.fail(node, "permuted axis is a spatial axis")
            return u
        raise self.fail(node, "unsupported operation on permuted hidden units")

    def elementwise(self, node: fx.Node) -> _Units | None:
        """Operands combine entry by entry: their units must line up (Git Re-Basin's
        residual constraint). Parameters broadcast along the units get tied;
        unpermuted tensors pin the group to FIXED."""
        out = _shape(node)
        if out is None:
            if self.permuted(node):
                raise self.fail(node, "unsupported operation on permuted hidden units")
            return None
        seen, params, pinned = [], [], False
        for n in _nodes_in(node.args, node.kwargs):
            shape, u = _shape(n), self.units.get(n)
            if shape is None:
                continue  # a Python number
            offset = len(out) - len(shape)
            if u is not None:
                # a single unit broadcast over many is trivially permuted; skip it
                if shape[u.axis] > 1 or out[u.axis + offset] == 1:
                    seen.append(_Units(u.axis + offset, u.group, u.block))
            elif n.op == "get_attr" and n.target in self.canon:
                params.append((n.target, shape, offset))
            else:
                params.append((None, shape, offset))
        if not seen:
            return None
        if len({(u.axis, u.block) for u in seen}) > 1:
            raise self.fail(node, "operands carry permuted units on different axes")
        group = seen[0].group
        for u in seen[1:]:
            group = self.uf.union(group, u.group)
        result = _Units(seen[0].axis, group, seen[0].block)
        for name, shape, offset in params:
            axis = result.axis - offset
            if axis < 0 or shape[axis] == 1:
                continue  # broadcast along the units: same value for every unit
            if name is None:
                pinned = True
            else:
                self.tie(name, axis, result)
        if pinned:
            self.uf.union(group, FIXED)
        return result

    def reduced(self, node: fx.Node, u: _Units, ndim: int) -> _Units | None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            return None  # a full reduction is invariant to any permutation
        dims = [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
        if u.axis in dims:
            return None
        return _Units(u.axis - (0 if keep else sum(d < u.axis for d in dims)), u.group, u.block)

    def transposed(self, node: fx.Node, u: _Units, ndim: int) -> _Units:
        args = list(node.args[1:]) or list(node.kwargs.values())
        if node.target in ("permute", torch.permute):
            order = list(args[0]) if len(args) == 1 else args
        else:
            a, b = (args[0] % ndim, args[1] % ndim) if args else (0, 1)
            order = list(range(ndim))
            order[a], order[b] = order[b], order[a]
        return _Units([d % ndim for d in order].index(u.axis), u.group, u.block)

    def spec(self) -> PermutationSpec:
        aliases: dict[str, list[str]] = {}
        for name, canon in self.canon.items():
            aliases.setdefault(canon, []).append(name)
        names: dict[int, str] = {}
        axes: dict[str, list] = {}
        blocks: dict[str, list] = {}
        for (canon, axis), (group, block) in self.ties.items():
            root = self.uf.find(group)
            if root == FIXED:
                continue
            perm = names.setdefault(root, f"P_{len(names)}")
            for name in aliases[canon]:
                axes.setdefault(name, [None] * self.ndims[name])[axis] = perm
                blocks.setdefault(name, [1] * self.ndims[name])[axis] = block
        return PermutationSpec(axes, blocks)


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _leaves(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _leaves(item)]
    return []


def check_keeps_function(
    module: nn.Module, spec: PermutationSpec, example_input: Any, *, traced: bool = True
) -> None:
    """Raise :class:`~modelsoup.errors.AlignmentError` unless permuting ``module``'s
    weights by ``spec`` (random permutations, in eval mode) leaves its outputs on
    ``example_input`` unchanged, as every permutation spec promises. ``traced`` says
    whether the spec came from tracing (the message then blames an operation) or was
    written by hand.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> check_keeps_function(net, PermutationSpec({"0.weight": ("P_0", None),
        ...     "0.bias": ("P_0",), "2.weight": (None, "P_0")}), torch.randn(4, 2))
        >>> try:
        ...     check_keeps_function(net, PermutationSpec({"0.weight": ("P_0", None)}),
        ...                          torch.randn(4, 2), traced=False)
        ... except AlignmentError as err:
        ...     print(str(err)[:61])
        the permutation spec changes the output of Sequential: it mis
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        _compare_permuted(module, spec, inputs, traced)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def scrambled(state: dict[str, Any], seed: int = 0, scale: float = 0.25) -> dict[str, Any]:
    """``state`` with every floating tensor of finite values randomised: non-negative
    ones (variances, norm scales) scaled entry by entry by ``exp(N(0, scale^2))``, others
    shifted by ``N(0, (scale s)^2)`` (``s`` the tensor's spread, 0.1 if it has none).
    Anything else (integer buffers, a module's extra state) is kept as it is.

    A freshly built model hides a spec's mistakes: BatchNorm statistics and norm
    scales start equal across channels and biases at zero, so leaving them out of a
    spec changes nothing there, and in every trained model it does. Checked on a
    scrambled copy, a permutation spec must keep the function for any weights, as it
    promises.

    Example:
        >>> import torch
        >>> s = scrambled({"var": torch.ones(3), "bias": torch.zeros(3)})
        >>> bool((s["var"] > 0).all()), len(set(s["bias"].tolist()))
        (True, 3)
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if (
            not isinstance(t, torch.Tensor)
            or not t.is_floating_point()
            or t.numel() == 0
            or not bool(torch.isfinite(t).all())
        ):
            out[name] = t
            continue
        x = t.detach().to("cpu", torch.float64)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        if bool((x >= 0).all()) and bool((x > 0).any()):
            x = x * torch.exp(scale * noise)
        else:
            spread = float(x.std()) if x.numel() > 1 else 0.0
            x = x + scale * (spread if spread > 0 else 0.1) * noise
        out[name] = x.to(t.device, t.dtype)
    return out


def _compare_permuted(
    module: nn.Module, spec: PermutationSpec, inputs: tuple, traced: bool
) -> None:
    own = module.state_dict()
    gen = torch.Generator().manual_seed(0)
    perms = {p: torch.randperm(n, generator=gen) for p, n in spec.sizes(own).items()}
    if not perms:
        return
    # functional_call wants one value per tied tensor; aliases follow it.
    first: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    # Scrambled weights, gentler if the model's outputs leave the finite numbers (a
    # parameter that must stay below 1); the model's own weights as a last resort.
    for scale in (0.25, 0.05, 0.0):
        state = scrambled(own, scale=scale) if scale else own
        with torch.no_grad():
            before = _leaves(torch.func.functional_call(module, _one_each(state, first), inputs))
        if all(bool(torch.isfinite(a).all()) for a in before if a.is_floating_point()):
            break
    permuted = _one_each(permute_state_dict(state, spec, perms), first)
    with torch.no_grad():
        after = _leaves(torch.func.functional_call(module, permuted, inputs))
    why = (
        f"(an operation was handled wrongly); {HINT}"
        if traced
        else "it misses tensors that must move together (a layer's bias or norm, the next "
        "layer's input axis) or pairs axes wrongly; fix the spec, or let modelsoup trace "
        "the model"
    )
    what = "traced permutation spec" if traced else "permutation spec"
    for a, b in zip(before, after, strict=True):
        if a.shape != b.shape:
            raise AlignmentError(f"the {what} changes an output shape: {why}")
        if a.numel() == 0:
            continue
        a, b = a.double(), b.double()
        same_gaps = torch.equal(torch.isfinite(a), torch.isfinite(b))
        a, b = torch.nan_to_num(a), torch.nan_to_num(b)  # NaN compares as 0 on both sides
        if not same_gaps or (a - b).abs().max().item() > 1e-4 * (1.0 + a.abs().max().item()):
            raise AlignmentError(
                f"the {what} changes the output of {type(module).__name__}: {why}"
                if not traced
                else f"the {what} changes the output of {type(module).__name__} {why}"
            )


def _one_each(state: dict[str, Any], first: dict[int, str]) -> dict[str, Any]:
    # the tensors functional_call swaps in (a module's extra state is not one)
    return {n: state[n] for n in first.values() if isinstance(state[n], torch.Tensor)}


def trace_permutation_spec(module: nn.Module, example_input: Any) -> PermutationSpec:
    """Find which weight axes can be permuted together without changing ``module``.

    Supports MLPs, plain CNNs (incl. flattening conv maps into a ``Linear``)
    and residual networks with BatchNorm / LayerNorm / GroupNorm (1 or C
    groups), depthwise convs and squeeze-excitation gates. The network input
    and final output are never permuted. ``example_input`` is a tensor or a
    tuple of positional inputs; it is run through the model in eval mode.

    Raises :class:`~modelsoup.errors.AlignmentError` naming the first module
    or op that cannot be handled (e.g. attention, channel concatenation).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
        >>> spec = trace_permutation_spec(cnn, torch.randn(2, 1, 4, 4))
        >>> spec.axes_to_perm["4.weight"], spec.block("4.weight", 1)
        ((None, 'P_0'), 4)
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        graph = fx.symbolic_trace(module)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AlignmentError(
            f"torch.fx cannot trace {type(module).__name__} ({first}); {HINT}"
        ) from err
    modes = {m: m.training for m in module.modules()}
    module.eval()  # so BatchNorm running stats are not touched by the example run
    try:
        try:
            # torch's ShapeProp prints its own traceback to stderr: one line below instead
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                prop = ShapeProp(graph)
                prop.extra_traceback = False
                prop.propagate(*inputs)
        except Exception as err:
            cause = err.__cause__ or err  # ShapeProp wraps the model's own error
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise ConfigError(
                f"running {type(module).__name__} on example_input failed ({first}); pass an "
                "input of the shape the model expects"
            ) from err
        walker = _Walker(module)
        for node in graph.graph.nodes:
            walker.visit(node)
        spec = walker.spec()
        _compare_permuted(module, spec, inputs, traced=True)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return spec
