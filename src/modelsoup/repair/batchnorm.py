"""Re-estimate BatchNorm running statistics after weights were averaged.

Averaging weights does not average the activations they produce, so the
averaged running mean/variance of a soup no longer describe its activations
and a ResNet soup can drop to chance accuracy. Recomputing them from a few
batches of unlabeled data repairs that (as ``torch.optim.swa_utils.update_bn``
does for SWA; the REPAIR/Git Re-Basin papers report the same collapse).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> _ = recalibrate_bn(net, torch.randn(64, 3) * 5 + 2)
    >>> int(net[1].num_batches_tracked), net.training
    (1, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import batches_digest, call_model, code_digest

if TYPE_CHECKING:
    from modelsoup.soup import Soup

__all__ = [
    "as_recalibration",
    "batches_of",
    "has_batchnorm",
    "keep_bn_statistics",
    "recalibrate_bn",
    "recalibrate_soup",
]

#: the buffers of a BatchNorm layer that recalibration re-estimates
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

#: the most rows per batch when the data is one tensor of inputs
TENSOR_BATCH_SIZE = 256


def batches_of(data: Iterable[Any] | torch.Tensor, num_batches: int | None = None) -> Iterator:
    """The batches of unlabeled ``data``, at most ``num_batches`` of them (none is read
    past the last one used).

    One tensor of inputs is cut into batches of at most :data:`TENSOR_BATCH_SIZE` rows
    that differ in size by at most one row, so that an equal-weight average over batches
    weighs every row alike (258 rows are two batches of 129, not 256 and 2).

    Example:
        >>> import torch
        >>> [len(b) for b in batches_of(torch.zeros(258, 3))]
        [129, 129]
        >>> list(batches_of(iter(range(5)), num_batches=2))
        [0, 1]
    """
    if isinstance(data, torch.Tensor):
        data = data.tensor_split(max(1, math.ceil(len(data) / TENSOR_BATCH_SIZE)))
    seen = 0
    for batch in data:
        yield batch
        seen += 1
        if num_batches is not None and seen >= num_batches:
            return


def reusable(data: Any, what: str) -> Any:
    """``data``, refused if it is a one-shot iterator (a generator, ``iter(loader)``):
    ``what`` reads it once per model, and every read after the first would get other
    batches or none.

    Example:
        >>> reusable([1, 2], "recalibrate_bn")
        [1, 2]
        >>> try:
        ...     reusable(iter([1, 2]), "recalibrate_bn")
        ... except ConfigError as err:
        ...     print(str(err)[:50])
        recalibrate_bn: the data is a one-shot list_iterat
    """
    if isinstance(data, Iterator):
        raise ConfigError(
            f"{what}: the data is a one-shot {type(data).__name__}, but it is read once per "
            "model; pass a list, a DataLoader or a tensor of inputs"
        )
    return data


def has_batchnorm(module: nn.Module) -> bool:
    """True if ``module`` contains a BatchNorm layer (1d, 2d, 3d, Sync or Lazy).

    Example:
        >>> from torch import nn
        >>> has_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        True
        >>> has_batchnorm(nn.Linear(2, 2))
        False
    """
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def _tracking(module: nn.Module) -> list[_BatchNorm]:
    # the BatchNorm layers with running statistics (track_running_stats=False has none)
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _to(obj: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def forward_batch(
    module: nn.Module, batch: Any, device: torch.device | str | None, what: str = "recalibrate_bn"
) -> None:
    """Run ``module`` on one batch of unlabeled data: a tensor, an ``(inputs, labels)``
    tuple (labels ignored) or a dict of keyword inputs; ``what`` names the caller in errors.

    Example:
        >>> import torch
        >>> forward_batch(torch.nn.Linear(2, 1), (torch.zeros(3, 2), torch.zeros(3)), None)
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError(f"{what}: data yielded an empty tuple; yield inputs")
        batch = batch[0]  # (inputs, labels): labels are not needed
    if not isinstance(batch, Mapping | torch.Tensor):
        raise ConfigError(
            f"{what}: data yielded a {type(batch).__name__}; yield tensors, "
            "(inputs, labels) tuples or dicts of keyword inputs"
        )
    call_model(module, _to(batch, device), what)


def recalibrate_bn(
    module: nn.Module,
    data: Iterable[Any] | torch.Tensor,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Reset and re-estimate the running stats of every BatchNorm in ``module``.

    Statistics are a cumulative (equal-weight) average over up to
    ``num_batches`` batches of ``data``: a DataLoader or any iterable of
    tensors, ``(inputs, labels)`` tuples or dicts of keyword inputs, or one
    tensor of inputs (split into batches of at most 256 rows of equal size,
    :func:`batches_of`). Inputs are moved to ``device`` if given. Only BatchNorm
    layers run in train mode; the rest of the network (e.g. Dropout) stays in
    eval mode so the statistics match the activations seen at inference.
    Training flags and momenta are restored; the module is modified in place
    and returned. A module without BatchNorm is returned untouched. A BatchNorm
    layer the data never reaches (another head of the network) keeps its
    statistics, with a warning that names it.

    Raises :class:`~modelsoup.errors.ConfigError` if ``data`` yields nothing or
    the new statistics are not finite (NaN or Inf in the data), and
    :class:`~modelsoup.errors.EvaluationError` if the model fails on a batch; the
    old statistics are then kept.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
        >>> loader = [(torch.randn(8, 3), torch.zeros(8)) for _ in range(5)]
        >>> _ = recalibrate_bn(net, loader, num_batches=2)
        >>> int(net[1].num_batches_tracked), net.training
        (2, False)
    """
    norms = _tracking(module)
    if not norms:
        return module
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"recalibrate_bn: num_batches must be at least 1, got {num_batches}")
    modes = {m: m.training for m in module.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
             for m in norms}  # fmt: skip
    seen = 0
    try:
        module.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # None = cumulative moving average over all batches
            m.train()
        with torch.no_grad():
            for batch in batches_of(data, num_batches):
                forward_batch(module, batch, device)
                seen += 1
        if seen == 0:
            raise ConfigError(
                "recalibrate_bn: data yielded no batches; pass a non-empty DataLoader, "
                "iterable or tensor of inputs"
            )
        names = {m: name for name, m in module.named_modules()}
        for m in norms:
            if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
                raise ConfigError(
                    f"recalibrate_bn: the new statistics of BatchNorm '{names[m]}' are not "
                    "finite: the data holds NaN or Inf values (or the model's activations "
                    "overflow); check the data"
                )
        unreached = [m for m in norms if int(m.num_batches_tracked) == 0]
        for m in unreached:  # another head, say: what it had is better than mean 0, var 1
            mean, var, count = saved[m]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        if unreached:
            shown = ", ".join(f"'{names[m]}'" for m in unreached[:5])
            more = f" and {len(unreached) - 5} more" if len(unreached) > 5 else ""
            warnings.warn(
                f"recalibrate_bn: the data never reached BatchNorm {shown}{more}; "
                "their statistics are kept as they were",
                SoupWarning,
                stacklevel=2,
            )
    except BaseException:
        for m, (mean, var, count) in saved.items():  # leave the model as it was
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return module


def keep_bn_statistics(soup: Soup, module: nn.Module, tag: str | None = None) -> Soup:
    """Store ``module``'s BatchNorm statistics in ``soup`` (as overrides of the averaged
    ones), so that saving or applying the soup uses them; returns the soup. ``tag`` says
    what they were estimated on (:func:`recalibration_tag`); the soup card records it as
    ``options.bn_recalibration``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modelsoup import average
        >>> nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
        >>> soup = average(nets)
        >>> net = soup.apply(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        >>> _ = recalibrate_bn(net, torch.randn(64, 3))
        >>> sorted(keep_bn_statistics(soup, net).overrides)
        ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    state = module.state_dict()
    soup.overrides = {
        name: state[name].detach().cpu().clone() for name in state if name.endswith(BN_STATISTICS)
    }
    soup.options["bn_recalibrated"] = True
    if tag is not None:
        soup.options["bn_recalibration"] = tag
    return soup


def recalibrate_soup(
    soup: Soup,
    module: nn.Module,
    data: Iterable[Any] | torch.Tensor,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> Soup:
    """Write ``soup`` into ``module``, re-estimate its BatchNorm statistics on ``data``
    (:func:`recalibrate_bn`) and keep them in the soup, so that ``soup.save`` writes them.

    Raises :class:`~modelsoup.errors.ConfigError` if ``module`` has no BatchNorm layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modelsoup import average
        >>> nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
        >>> template = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> soup = recalibrate_soup(average(nets), template, torch.randn(64, 3) + 5)
        >>> bool(soup.state_dict()["1.running_mean"].abs().sum() > 0)
        True
    """
    if not _tracking(module):
        what = "keeps no running statistics" if has_batchnorm(module) else "has no BatchNorm layer"
        raise ConfigError(f"{type(module).__name__} {what} to recalibrate; drop the option")
    tag = _data_tag(data, num_batches)  # before the pass reads the data
    soup.apply(module)
    recalibrate_bn(module, data, num_batches, device)
    return keep_bn_statistics(soup, module, tag)


def as_recalibration(
    recalibrate: Callable[[nn.Module], Any] | Iterable[Any] | torch.Tensor | None,
    num_batches: int | None = None,
) -> Callable[[nn.Module], Any] | None:
    """What ``recalibrate=`` may be: a function ``module -> None``, or the unlabeled data
    itself (a DataLoader, an iterable of batches, a tensor of inputs), which becomes
    ``lambda m: recalibrate_bn(m, data, num_batches)``; ``None`` stays ``None``.

    Example:
        >>> import torch
        >>> hook = as_recalibration(torch.randn(64, 3))
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> hook(net) is net, hook.tag.startswith("recalibrated on Tensor ")
        (True, True)
        >>> hook.tag == as_recalibration(torch.randn(64, 3)).tag  # other data, other tag
        False
    """
    if recalibrate is None:
        return None
    if callable(recalibrate):
        return recalibrate  # journal keys name it by its code: recalibration_tag
    data = reusable(recalibrate, "recalibrate")

    def hook(module: nn.Module) -> nn.Module:
        return recalibrate_bn(module, data, num_batches=num_batches)

    hook.tag = _data_tag(data, num_batches)
    return hook


def recalibration_tag(recalibrate: Callable[[nn.Module], Any]) -> str:
    """How journal keys name a recalibration: its data's digest (set by
    :func:`as_recalibration`), or for a function of yours its code and what it reads.

    Example:
        >>> recalibration_tag(as_recalibration(torch.ones(2, 3))).startswith("recalibrated on")
        True
    """
    tag = getattr(recalibrate, "tag", None)
    return tag if isinstance(tag, str) else f"recalibrated by {code_digest(recalibrate)}"


def _data_tag(data: Any, num_batches: int | None) -> str:
    # a one-shot iterator is read once, by the recalibration: it is named, not hashed
    digest = "(one-shot, not hashed)" if isinstance(data, Iterator) else _data_digest(data)
    return f"recalibrated on {type(data).__name__} {digest}, batches={num_batches or 'all'}"


def _data_digest(data: Any) -> str:
    # what the statistics are estimated on, so journal keys tell other data apart: a
    # tensor or a list of batches whole; a loader of tensors by its tensors, batching and
    # shuffling; any other loader by its length and first batch (reading it all would
    # cost a pass; a shuffled one then gets new keys each run, which only costs evaluations)
    if isinstance(data, torch.Tensor):
        return batches_digest([data])
    if isinstance(data, list | tuple):
        return batches_digest(data)
    batching = [getattr(data, "batch_size", None), getattr(data, "drop_last", None)]
    tensors = getattr(getattr(data, "dataset", None), "tensors", None)
    shuffled = type(getattr(data, "sampler", None)).__name__ == "RandomSampler"
    if isinstance(tensors, tuple) and getattr(data, "collate_fn", None) in (
        None,
        _default_collate(),
    ):
        return batches_digest([tensors, batching, shuffled])
    first = next(iter(data), None)
    try:
        size = len(data)
    except TypeError:  # an iterable dataset without a length
        size = "?"
    return f"{size}x{batches_digest([first, batching])}"


def _default_collate() -> Any:
    from torch.utils.data import default_collate

    return default_collate
