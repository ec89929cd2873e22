"""Fine-tune soup ingredients: one run, or a hyperparameter grid from one shared start.

Soups only work when every ingredient is fine-tuned from the *same* starting
weights, so :func:`train_grid` builds (or takes) one start state and loads it
into every run. Each run is reproducible from its seed: the seed sets torch's
RNG (dropout) and the generator that shuffles the batches.

Training data is ``(inputs, labels)``: ``inputs`` is a tensor (the model is
called as ``model(x)``) or a dict of tensors such as
:func:`modelsoup.demo.models.tokenize` returns (called as ``model(**batch)``);
``labels`` is an int64 tensor of class indices. With ``objective="causal_lm"`` the
model is a language model and ``labels`` are its token targets, one row per sequence
(unshifted, ``-100`` where a token is not scored, as transformers' causal-LM labels):
each token is predicted from the ones before it.

Example:
    >>> import torch
    >>> from modelsoup.demo.models import digits_mlp
    >>> x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    >>> state = train_ingredient(digits_mlp, (x, y), lr=1e-2, epochs=1, batch_size=32, seed=0)
    >>> sorted(state)[:2]
    ['0.bias', '0.weight']
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsoup._util import atomic_file
from modelsoup._util import progress as stage_progress
from modelsoup.errors import ConfigError
from modelsoup.evaluators import forward_logits

__all__ = ["ingredient_name", "train_grid", "train_ingredient"]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
TrainData = tuple[Inputs, torch.Tensor]
ModelFactory = Callable[[], nn.Module]

# Version of the ``<name>.json`` layout; a cached file with another version is retrained.
_FORMAT = 1
_OPTIMIZERS = ("adamw", "adamw_fused", "sgd")
_SCHEDULES = ("linear", "cosine", "constant")
_OBJECTIVES = ("classification", "causal_lm")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_IGNORE = -100  # a token label that is not scored (transformers' convention)


# --------------------------------------------------------------------------- one run


def _check_data(
    data: TrainData, objective: str = "classification"
) -> tuple[Inputs, torch.Tensor, int]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ConfigError("training data must be a pair (inputs, labels)")
    inputs, labels = data
    if objective == "causal_lm":
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ConfigError(
                "causal_lm labels must be a 2-D tensor of token ids (-100: not scored), "
                "one row per sequence"
            )
    elif not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ConfigError("labels must be a 1-D tensor of class indices")
    n = labels.shape[0]
    tensors = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(
                "inputs must be a tensor or a dict of tensors; tokenize texts first "
                "(modelsoup.demo.models.tokenize)"
            )
        if t.shape[0] != n:
            raise ConfigError(f"inputs have {t.shape[0]} rows but there are {n} labels")
    if n == 0:
        raise ConfigError("training data is empty")
    return inputs, labels.long(), n


def _rows(inputs: Inputs, index: torch.Tensor) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def _loss(
    objective: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy in float32: of the classes, or of each next token (``causal_lm``)."""
    if objective == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
    return nn.functional.cross_entropy(
        logits.float(), labels, ignore_index=_IGNORE, label_smoothing=label_smoothing
    )


def _load_start(model: nn.Module, start_state: Mapping[str, torch.Tensor]) -> None:
    """Load ``start_state`` strictly against the names ``model.state_dict()`` lists.

    A tied copy (an LM head tied to the embeddings) is hidden from ``state_dict`` by
    :func:`modelsoup.hf.models.keep_stored_names_only` and shares the stored tensor, so
    it is neither expected in ``start_state`` nor left behind when it is absent.
    """
    names = set(model.state_dict())
    missing, unexpected = sorted(names - set(start_state)), sorted(set(start_state) - names)
    if missing or unexpected:
        raise ConfigError(
            "start_state does not match the model: "
            f"missing {', '.join(missing[:5]) or 'nothing'}; "
            f"unexpected {', '.join(unexpected[:5]) or 'nothing'}"
        )
    model.load_state_dict(start_state, strict=False)


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(
    model: nn.Module, optimizer: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (is everything frozen?)")
    # Standard fine-tuning practice: no weight decay on biases and LayerNorm gains.
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if optimizer == "adamw_fused":
        # one kernel over every tensor (HF Trainer's "adamw_torch_fused"): on a 2-core CPU
        # 0.1 s per step of SmolLM2-135M against 0.45 s; its rounding differs from adamw's
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _keeps_global_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on a forked torch RNG so its seeding leaves the caller's random state alone."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


@_keeps_global_rng
def train_ingredient(
    model_factory: ModelFactory | nn.Module,
    train_data: TrainData,
    *,
    lr: float,
    weight_decay: float = 0.0,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    schedule: str = "linear",
    warmup_frac: float = 0.0,
    label_smoothing: float = 0.0,
    max_grad_norm: float | None = 1.0,
    objective: str = "classification",
    autocast: str | None = None,
    start_state: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fine-tune one model and return its full state dict (CPU tensors, frozen ones too).

    ``model_factory`` is a zero-argument callable returning a fresh model, or a
    model (it is deep-copied, never modified). ``start_state`` is loaded before
    training; pass the same one to every ingredient of a soup. Only parameters
    with ``requires_grad`` are trained. The learning rate warms up linearly for
    ``warmup_frac`` of the steps, then follows ``schedule``. ``objective`` is
    ``classification`` (labels are class indices) or ``causal_lm`` (labels are each
    sequence's token targets). ``autocast="bf16"`` (or ``"fp16"``) runs the forward
    and backward passes under CPU autocast; the weights and optimizer stay float32.
    ``optimizer`` is ``adamw``, ``adamw_fused`` (the same update in one fused kernel,
    several times faster on large models, rounded differently) or ``sgd``.

    Example:
        >>> import torch
        >>> from modelsoup.demo.models import digits_mlp
        >>> data = (torch.rand(32, 64), torch.randint(0, 10, (32,)))
        >>> a = train_ingredient(digits_mlp, data, lr=0.1, optimizer="sgd", seed=3)
        >>> b = train_ingredient(digits_mlp, data, lr=0.1, optimizer="sgd", seed=3)
        >>> all(torch.equal(a[k], b[k]) for k in a)
        True
    """
    if optimizer not in _OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r}: choose one of {', '.join(_OPTIMIZERS)}")
    if schedule not in _SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}: choose one of {', '.join(_SCHEDULES)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr}: must be a positive number")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay={weight_decay}: cannot be negative")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs={epochs}, batch_size={batch_size}: both must be at least 1")
    if not 0.0 <= warmup_frac < 1.0:
        raise ConfigError(f"warmup_frac={warmup_frac}: must be in [0, 1)")
    if objective not in _OBJECTIVES:
        raise ConfigError(f"objective={objective!r}: choose one of {', '.join(_OBJECTIVES)}")
    if autocast is not None and autocast not in _AUTOCAST:
        raise ConfigError(f"autocast={autocast!r}: choose one of {', '.join(_AUTOCAST)} or None")
    inputs, labels, n = _check_data(train_data, objective)

    # The seed covers model construction too, so a factory that initializes
    # randomly still gives the same weights for the same seed.
    torch.manual_seed(seed)
    if isinstance(model_factory, nn.Module):
        model = copy.deepcopy(model_factory)
    else:
        model = model_factory()
    if start_state is not None:
        _load_start(model, start_state)
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    base_lrs = [g["lr"] for g in opt.param_groups]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # only the forward and backward passes are cast; the weights stay float32
    cast = (
        functools.partial(torch.autocast, "cpu", dtype=_AUTOCAST[autocast])
        if autocast is not None
        else contextlib.nullcontext
    )

    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    warmup = int(warmup_frac * total)
    shuffle = torch.Generator().manual_seed(seed)
    bar = _progress_bar(total, progress, desc="training")
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            factor = _lr_factor(schedule, step, total, warmup)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * factor
            with cast():
                logits = forward_logits(model, _rows(inputs, index))
            loss = _loss(objective, logits, labels[index], label_smoothing)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at step {step} (loss {loss.item()}); lower lr={lr}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    # Clone into contiguous, unshared CPU tensors: what safetensors needs to save.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _progress_bar(total: int, enabled: bool, desc: str, unit: str = "step"):
    if not enabled:
        return None
    return stage_progress(total=total, desc=desc, unit=unit, leave=False)


# --------------------------------------------------------------------------- grid


_TRAIN_KEYS = tuple(
    name
    for name, p in inspect.signature(train_ingredient).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("start_state", "progress")
)
_SHORT = {"lr": "lr", "weight_decay": "wd", "epochs": "ep", "batch_size": "bs", "seed": "seed"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def ingredient_name(hparams: Mapping[str, Any], keys: Sequence[str]) -> str:
    """File stem for one grid point, built from the hyperparameters that vary.

    Example:
        >>> ingredient_name({"lr": 3e-05, "weight_decay": 0.1, "seed": 0}, ["lr", "weight_decay"])
        'lr3e-05_wd0.1'
    """
    parts = [f"{_SHORT.get(k, k)}{_fmt(hparams[k])}" for k in keys]
    name = "_".join(parts) if parts else "ingredient"
    # Keep names portable: only characters that are safe in file names everywhere.
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name)


def _fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        # Hash the raw bytes; a uint8 view works for every dtype, including bfloat16.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _fingerprint_data(data: TrainData) -> str:
    inputs, labels = data
    tensors = dict(inputs) if isinstance(inputs, Mapping) else {"x": inputs}
    tensors["__labels__"] = labels
    return _fingerprint_tensors(tensors)


def _cached(meta_path: Path, weights_path: Path, record: Mapping[str, Any]) -> bool:
    if not (meta_path.is_file() and weights_path.is_file()):
        return False
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False  # unreadable sidecar: retrain and overwrite it
    keys = ("format", "hyperparameters", "start_fingerprint", "data_fingerprint")
    return all(old.get(k) == record[k] for k in keys)


def train_grid(
    model_factory: ModelFactory,
    train_data: TrainData,
    grid: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    *,
    start_state: Mapping[str, torch.Tensor] | None = None,
    seeds: Sequence[int] = (0,),
    start_seed: int = 0,
    progress: bool = True,
    **fixed: Any,
) -> list[Path]:
    """Fine-tune every grid point (times every seed) from one shared start; return file paths.

    ``grid`` maps :func:`train_ingredient` keyword names to lists of values;
    ``fixed`` gives the other keywords (e.g. ``epochs=2``). Each run is saved as
    ``out_dir/<name>.safetensors`` plus ``out_dir/<name>.json`` (hyperparameters,
    fingerprints of the start weights and the data, training time). A run whose
    files exist with the same hyperparameters, start and data is skipped, so a
    re-run only trains what is new. Without ``start_state`` the start is
    ``model_factory()`` built under ``torch.manual_seed(start_seed)``.

    Example:
        >>> import torch, tempfile
        >>> from modelsoup.demo.models import digits_mlp
        >>> data = (torch.rand(64, 64), torch.randint(0, 10, (64,)))
        >>> paths = train_grid(digits_mlp, data, {"lr": [1e-3, 1e-2]}, tempfile.mkdtemp(),
        ...                    epochs=1, progress=False)
        >>> [p.name for p in paths]
        ['lr0.001.safetensors', 'lr0.01.safetensors']
    """
    unknown = sorted((set(grid) | set(fixed)) - set(_TRAIN_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {', '.join(unknown)}; "
            f"train_ingredient accepts {', '.join(_TRAIN_KEYS)}"
        )
    if "seed" in fixed:
        raise ConfigError("give seeds through seeds=[...] (or a 'seed' grid entry), not seed=")
    grid = dict(grid)
    if "seed" not in grid:
        grid["seed"] = list(seeds)
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"grid[{key!r}] must be a non-empty list of values")
    _check_data(train_data, fixed.get("objective", "classification"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    template = _build_start(model_factory, start_seed)
    if start_state is None:
        start_state = {k: v.detach().clone() for k, v in template.state_dict().items()}
    start_fp = _fingerprint_tensors(start_state)
    data_fp = _fingerprint_data(train_data)
    # Name files after the grid keys; the seed joins the name only when several are used.
    name_keys = [k for k in grid if k != "seed"] + (["seed"] if len(grid["seed"]) > 1 else [])

    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = [ingredient_name(p, name_keys) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points give the same file name; remove duplicate values")
    defaults = {
        name: p.default
        for name, p in inspect.signature(train_ingredient).parameters.items()
        if name in _TRAIN_KEYS and p.default is not inspect.Parameter.empty
    }
    bar = _progress_bar(len(points), progress, desc="ingredients", unit="ingredient")
    paths: list[Path] = []
    for point, name in zip(points, names):
        hparams = {**defaults, **fixed, **point}
        weights_path, meta_path = out / f"{name}.safetensors", out / f"{name}.json"
        record = {
            "format": _FORMAT,
            "name": name,
            "hyperparameters": json.loads(json.dumps(hparams)),
            "start_fingerprint": start_fp,
            "data_fingerprint": data_fp,
        }
        if bar is not None:
            bar.set_postfix_str(name, refresh=True)
        if not _cached(meta_path, weights_path, record):
            began = time.perf_counter()
            state = train_ingredient(template, train_data, start_state=start_state, **hparams)
            record["train_seconds"] = round(time.perf_counter() - began, 3)
            _save(weights_path, meta_path, state, record)
        paths.append(weights_path)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return paths


def _save(
    weights_path: Path, meta_path: Path, state: dict[str, torch.Tensor], record: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    # The record also goes into the safetensors header, so a copied weights file
    # still says how it was trained. The JSON is written last: it marks completion.
    metadata = {"modelsoup": json.dumps(record, sort_keys=True)}
    with atomic_file(weights_path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    with atomic_file(meta_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _build_start(model_factory: ModelFactory, start_seed: int) -> nn.Module:
    torch.manual_seed(start_seed)
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_factory returned {type(model).__name__}, not a torch module")
    return model
