"""The Lightning callback: at the end of ``fit``, cook the run's checkpoints into soups.

**Ingredients.** If one of the Trainer's ``ModelCheckpoint`` callbacks keeps several
checkpoints (``save_top_k=-1`` or ``> 1``), the ``.ckpt`` files it wrote during this
fit are the ingredients (not ``last.ckpt``, a copy of the newest). Otherwise (no
``ModelCheckpoint``, or one that keeps only the best) the callback saves its own
weights-only checkpoint at the end of every training epoch (``every="epoch"``) or after
every validation run (``every="validation"``), in ``checkpoint_dir`` (default
``default_root_dir/soup_checkpoints``; the list is kept in the run's full checkpoints, so
a fit resumed with ``ckpt_path=`` still has the earlier ones). Either way they are
ordered by global step, so LAWA's "last k" are the latest; ``extra_checkpoints`` (a
sweep's other runs) follow.

**Held-out score.** By default, the metric ``monitor`` that the module's own validation
loop logs (``self.log("val_loss", ...)`` in ``validation_step`` or
``on_validation_epoch_end``), measured on the fit's validation dataloader, with
``mode="min"`` or ``"max"`` saying which way is better, as for ``ModelCheckpoint``.
``monitor`` and ``mode`` default to those of the Trainer's ``ModelCheckpoint`` when it
monitors something, else ``mode`` to ``"min"``. Each candidate is validated by a quiet
single-device Trainer (no logger, no callbacks, the run's precision and
``limit_val_batches``), so logging a candidate's score never touches the run's loggers
or checkpoints. ``held_out=`` replaces all of this with an evaluator of yours, or a
function ``module -> float`` (higher is better); it, and a ``test=`` evaluator, are
given the LightningModule.

**The cook** runs on rank 0 after the last epoch, tasting candidates in the
LightningModule itself (on its device), whose trained weights are put back afterwards;
``load=`` a report row (``"greedy"``, ``"lawa"``, ``"uniform"``, a label) puts that
soup's weights in the module instead, on every rank. Soups (``.ckpt``, loadable with
``load_from_checkpoint``) and the report go to ``output_dir`` (default
``default_root_dir/soup``). Under multi-process training rank 0 cooks on the whole
validation set and the other ranks wait at a barrier: the cook must end within the
process group's timeout (``DDPStrategy(timeout=...)``, 30 minutes by default). An error
on rank 0 is raised there and, as a :class:`~modelsoup.errors.SoupError` naming it, on
the other ranks.

Lightning is imported from ``lightning.pytorch``, or ``pytorch_lightning`` where only
that is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl

from modelsoup.cook.results import CookResult
from modelsoup.distributed import one_process
from modelsoup.errors import ConfigError, EvaluationError, SoupError
from modelsoup.evaluators import Evaluator, as_evaluator, batches_digest
from modelsoup.formats.torch_pickle import load_pickle
from modelsoup.ingredients import natural_order, open_ingredient
from modelsoup.integrations._common import (
    check_cook_options,
    check_load,
    check_step_counters,
    checkpoint_paths,
    chosen_soup,
    cook_in_place,
    recipe_entries,
)

_logger = logging.getLogger(__name__)

_WHO = "LightningSoupCallback"


class ValidationMetric:
    """A LightningModule's logged validation metric as a held-out evaluator.

    Each call runs the module's validation loop over ``dataloaders`` in a quiet
    single-device Trainer (no logger, checkpoints, progress bar or other callbacks) and
    returns the logged ``monitor``; the module is handed back to ``trainer`` (the fit's
    Trainer) afterwards. ``mode`` is ``"min"`` (lower is better) or ``"max"``.

    Example:
        >>> import torch
        >>> class Fit(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.zeros(1))
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_err", (self.w - batch[0]).abs().mean())
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4)))
        >>> ev = ValidationMetric(Fit(), data, "val_err", "min")
        >>> ev.evaluate(None), ev.higher_is_better, ev.name.startswith("lightning[val_err]")
        (1.0, False, True)
    """

    def __init__(
        self,
        module: pl.LightningModule,
        dataloaders: Any,
        monitor: str,
        mode: Literal["min", "max"] = "min",
        *,
        trainer: pl.Trainer | None = None,
    ):
        if mode not in ("min", "max"):
            raise ConfigError(f"mode={mode!r}: say 'min' (lower is better) or 'max'")
        self.module, self.dataloaders, self.monitor = module, dataloaders, monitor
        self.higher_is_better = mode == "max"
        self.trainer = trainer
        if isinstance(dataloaders, Mapping):
            loaders = list(dataloaders.values())
        else:
            loaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
        self.name = f"lightning[{monitor}][{batches_digest(b for dl in loaders for b in dl)}]"
        self._runner: pl.Trainer | None = None

    def _quiet_trainer(self) -> pl.Trainer:
        if self._runner is None:
            device = next(self.module.parameters(), torch.empty(0)).device
            fit = self.trainer
            options: dict[str, Any] = {
                "accelerator": device.type if device.type in ("cuda", "mps") else "cpu",
                "devices": [device.index or 0] if device.type == "cuda" else 1,
                "logger": False,
                "callbacks": [],
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "default_root_dir": fit.default_root_dir if fit is not None else None,
            }
            if fit is not None:
                options["precision"] = fit.precision
                limit = fit.limit_val_batches
                # as the run validated: an int is a number of batches (1 is one batch), a
                # float a fraction (1.0 is every batch)
                if isinstance(limit, int) or limit != 1.0:
                    options["limit_val_batches"] = limit
            self._runner = _trainer_class(fit)(**options)  # one per cook: it is reused
        return self._runner

    def evaluate(self, model: torch.nn.Module) -> float:
        """Validate the module (whose weights ``model`` is, or is part of)."""
        runner = self._quiet_trainer()
        was_training = self.module.training
        try:
            runner.validate(self.module, dataloaders=self.dataloaders, verbose=False)
        finally:
            if self.trainer is not None:
                self.module.trainer = self.trainer
            self.module.train(was_training)
        logged = runner.callback_metrics
        if self.monitor not in logged:
            raise ConfigError(
                f"{_WHO}: the validation loop logs no {self.monitor!r} (it logs: "
                f"{', '.join(sorted(logged)) or 'nothing'}); log it in validation_step, or "
                "pass monitor= one of those or held_out= an evaluator"
            )
        value = logged[self.monitor]
        return float(value.item() if isinstance(value, torch.Tensor) else value)


def _trainer_class(fit: Any) -> type:
    """The Trainer class of the fit's own Lightning package (``lightning.pytorch`` or
    ``pytorch_lightning``), not a subclass of the user's with another signature."""
    for cls in type(fit).__mro__ if fit is not None else ():
        if cls.__name__ == "Trainer" and cls.__module__.endswith(".trainer.trainer"):
            return cls
    return pl.Trainer


@contextmanager
def _local_metrics(module: torch.nn.Module) -> Iterator[None]:
    """torchmetrics metrics compute on this rank's data alone: under multi-process
    training, rank 0 validates while the others wait, so a metric that gathered across
    ranks would wait for ranks that never come."""
    changed = []
    for sub in module.modules():
        if callable(getattr(sub, "distributed_available_fn", None)):
            changed.append((sub, sub.distributed_available_fn))
            sub.distributed_available_fn = _never_distributed
    try:
        yield
    finally:
        for sub, fn in changed:
            sub.distributed_available_fn = fn


def _never_distributed() -> bool:
    return False


def _keeps_several(callback: Any) -> bool:
    top_k = getattr(callback, "save_top_k", None)
    return isinstance(top_k, int) and (top_k == -1 or top_k > 1) and bool(callback.dirpath)


def _step_of(path: Path) -> tuple:
    """A Lightning checkpoint's place in its run: global step, epoch, then the name."""
    try:
        obj = load_pickle(path)
    except Exception:  # unreadable here: the cook names the file and what is wrong
        obj = {}
    step = obj.get("global_step", -1) if isinstance(obj, Mapping) else -1
    epoch = obj.get("epoch", -1) if isinstance(obj, Mapping) else -1
    return (int(step), int(epoch), natural_order(path))


def _files(folder: Path, extension: str) -> dict[Path, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {
        p: (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.iterdir()
        if p.name.endswith(extension) and p.is_file() and not p.is_symlink()
    }


class LightningSoupCallback(pl.Callback):
    """Cook the run's checkpoints into soups when ``fit`` ends (see the module docstring).

    ``recipes`` are cook recipe entries (default: greedy); ``last=k`` adds LAWA, the
    uniform soup of the last k checkpoints. ``monitor``/``mode`` name the logged
    validation metric that chooses (``held_out`` replaces it), ``test`` adds a test
    evaluator for the report, ``load`` puts a soup in the module afterwards, and other
    keywords are :func:`modelsoup.cook.cook` options (``save``, ``seed``, ...). The
    :class:`~modelsoup.cook.results.CookResult` is kept as :attr:`result` (on rank 0).

    Example:
        >>> callback = LightningSoupCallback(last=3, monitor="val_loss")
        >>> [r["name"] for r in callback.recipes], callback.every
        (['greedy', 'lawa'], 'epoch')
    """

    def __init__(
        self,
        recipes: Sequence[Mapping[str, Any]] | None = None,
        *,
        last: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        held_out: Any = None,
        test: Any = None,
        every: Literal["epoch", "validation"] = "epoch",
        checkpoint_dir: str | Path | None = None,
        extra_checkpoints: str | Path | Sequence[str | Path] = (),
        output_dir: str | Path | None = None,
        load: str | None = None,
        **cook_options: Any,
    ):
        if every not in ("epoch", "validation"):
            raise ConfigError(f"every={every!r}: save a checkpoint each 'epoch' or 'validation'")
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode={mode!r}: say 'min' (lower is better) or 'max'")
        self.recipes = recipe_entries(recipes, last)
        self.monitor, self.mode = monitor, mode
        self.held_out, self.test, self.load = held_out, test, load
        check_load(load, self.recipes, _WHO)
        if held_out is None and any(
            e["name"] in ("ensemble", "greedy_ensemble") for e in self.recipes
        ):
            raise ConfigError(
                f"{_WHO}: an ensemble averages logits, and the held-out evaluator it builds "
                "from the validation loop gives a metric only; pass held_out= (e.g. "
                "modelsoup.Accuracy) or drop the ensemble recipe"
            )
        self.every = every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.extra_checkpoints = checkpoint_paths(extra_checkpoints, "LightningSoupCallback")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        # soups as .ckpt in Lightning's layout, for load_from_checkpoint
        self.cook_options = {"save_format": "pt", **cook_options}
        check_cook_options(self.cook_options, _WHO)
        self.result: CookResult | None = None
        #: the checkpoints this callback saved itself (kept in the run's checkpoints)
        self.saved: list[Path] = []
        self._own = True
        self._before: dict[Path, dict[Path, tuple[int, int]]] = {}
        self._last_saved_step = -1
        self._monitor_seen = False

    # -- state kept in the run's own checkpoints, so a resumed fit knows its ingredients
    def state_dict(self) -> dict[str, Any]:
        return {"saved": [str(p) for p in self.saved]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = [Path(p) for p in state_dict.get("saved", [])]

    # -- before training: check what can be checked, note what is on disk already
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed fit restores what this callback saved
            self.saved, self._last_saved_step, self._monitor_seen = [], -1, False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor_and_mode(trainer)  # a misconfiguration fails now, not after training
        check_step_counters(pl_module, self.cook_options, _WHO)
        if self.held_out is None and not _has_validation(trainer):
            raise ConfigError(
                f"{_WHO} has no validation data to choose with: give fit() val_dataloaders "
                "(or define val_dataloader), or pass held_out= an evaluator"
            )
        keepers = [c for c in trainer.checkpoint_callbacks if _keeps_several(c)]
        self._own = not keepers
        self._before = {Path(c.dirpath): _files(Path(c.dirpath), c.FILE_EXTENSION) for c in keepers}
        if self._own:
            _logger.info(
                "%s: no ModelCheckpoint keeps several checkpoints; saving one each %s in %s",
                _WHO,
                self.every,
                self._checkpoint_dir(trainer),
            )

    def _checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        return self.checkpoint_dir or Path(trainer.default_root_dir) / "soup_checkpoints"

    def _monitor_and_mode(self, trainer: pl.Trainer) -> tuple[str, Literal["min", "max"]]:
        monitor, mode = self.monitor, self.mode
        if monitor is None:
            watched = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
            if watched:
                monitor, mode = watched[0].monitor, mode or watched[0].mode
        if monitor is None and self.held_out is None:
            raise ConfigError(
                f"{_WHO} needs a held-out score: pass monitor= a metric your validation_step "
                "logs (with mode='min' or 'max'), or held_out= an evaluator"
            )
        return monitor or "", mode or "min"

    # -- during training: the callback's own checkpoints
    def _save(self, trainer: pl.Trainer) -> None:
        if not self._own or trainer.sanity_checking or trainer.global_step == self._last_saved_step:
            return
        path = self._checkpoint_dir(trainer) / (
            f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        )
        trainer.save_checkpoint(path, weights_only=True)  # every rank: Lightning's rule
        self._last_saved_step = trainer.global_step
        if path not in self.saved:
            self.saved.append(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every == "epoch":
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.held_out is None and not self._monitor_seen:
            self._check_logged(trainer)  # after the first validation, not after training
            self._monitor_seen = True
        if self.every == "validation":
            self._save(trainer)

    def _check_logged(self, trainer: pl.Trainer) -> None:
        monitor, _ = self._monitor_and_mode(trainer)
        if monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise ConfigError(
                f"{_WHO}: monitor {monitor!r} was never logged in this fit (logged: "
                f"{logged}); log it in validation_step, or pass monitor= one of those"
            )

    def checkpoints(self, trainer: pl.Trainer) -> list[Path]:
        """The ingredients: this fit's checkpoints in step order, then the extra ones."""
        if self._own:
            found = [p for p in self.saved if p.is_file()]
        else:
            found = []
            for callback in trainer.checkpoint_callbacks:
                if not _keeps_several(callback):
                    continue
                folder = Path(callback.dirpath)
                before = self._before.get(folder, {})
                last = callback.CHECKPOINT_NAME_LAST
                found += [
                    p
                    for p, stamp in _files(folder, callback.FILE_EXTENSION).items()
                    if before.get(p) != stamp and not p.name.startswith(last)
                ]
        unique = sorted(set(found), key=_step_of)
        return unique + self.extra_checkpoints

    # -- after training: rank 0 cooks, the others wait
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        soup_state, failure = None, None
        if trainer.is_global_zero:
            try:
                soup_state = self._cook(trainer, pl_module)
            except Exception as err:
                if trainer.world_size == 1:
                    raise
                failure = err  # the others must hear of it, not wait for a soup
        if trainer.world_size > 1:
            trainer.strategy.barrier("modelsoup")
            why = None if failure is None else str(failure).splitlines()[0]
            soup_state, why = trainer.strategy.broadcast((soup_state, why), src=0)
            if failure is not None:
                raise failure
            if why is not None:
                raise SoupError(f"{_WHO}: the cook on rank 0 failed: {why}")
        if soup_state is not None:
            target = _target(pl_module, set(soup_state))
            target.load_state_dict(soup_state)

    def _cook(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, torch.Tensor] | None:
        found = self.checkpoints(trainer)
        if not found:
            where = (
                self._checkpoint_dir(trainer)
                if self._own
                else ", ".join(str(c.dirpath) for c in trainer.checkpoint_callbacks)
            )
            raise ConfigError(
                f"{_WHO}: no checkpoints from this fit in {where} (did an epoch end?); "
                "nothing to cook"
            )
        target = _target(pl_module, set(open_ingredient(found[0]).names()))
        held = self.held_out
        if held is None:
            self._check_logged(trainer)
            monitor, mode = self._monitor_and_mode(trainer)
            loaders = _validation_source(trainer)
            held = ValidationMetric(pl_module, loaders, monitor, mode, trainer=trainer)
        test = self.test
        if target is not pl_module:  # the user's evaluators are given the LightningModule
            held = _OnModule(as_evaluator(held), pl_module)
            test = _OnModule(as_evaluator(test), pl_module) if test is not None else None
        output = self.output_dir or Path(trainer.default_root_dir) / "soup"
        _logger.info("%s: cooking %d checkpoints into %s", _WHO, len(found), output)
        with one_process(), _local_metrics(pl_module):
            self.result = cook_in_place(
                found,
                target,
                held,
                test=test,
                recipes=self.recipes,
                output=output,
                who=_WHO,
                **self.cook_options,
            )
        if self.load is None:
            return None
        soup = chosen_soup(self.result, self.load)
        _logger.info("%s: the module now holds the %s soup", _WHO, self.load)
        return soup.state_dict()


class _OnModule:
    """A user's evaluator given the LightningModule, when the cook writes into its
    ``model``: the evaluator sees the module it was written for, as in the fit."""

    def __init__(self, inner: Evaluator, module: pl.LightningModule):
        self.inner, self.module = inner, module
        self.name, self.higher_is_better = inner.name, inner.higher_is_better

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.inner.evaluate(self.module)

    def __getattr__(self, attr: str) -> Any:
        if attr in ("inner", "module"):  # not set yet (e.g. while copying)
            raise AttributeError(attr)
        found = getattr(self.inner, attr)
        if attr == "logits":  # the one other method that is given the model
            return lambda model: found(self.module)
        return found


def _target(module: pl.LightningModule, names: set[str]) -> torch.nn.Module:
    """The part of ``module`` whose state dict the checkpoints hold: the module itself,
    or its ``model`` when the reader removed Lightning's ``model.`` prefix (every weight
    of a module that wraps one network as ``self.model``)."""
    own = set(module.state_dict())
    if names == own:
        return module
    inner = getattr(module, "model", None)
    if isinstance(inner, torch.nn.Module) and {f"model.{n}" for n in names} == own:
        return inner
    missing = sorted(own - names) or sorted(own - {f"model.{n}" for n in names})
    raise ConfigError(
        f"{_WHO}: the checkpoints do not hold this module's weights (e.g. "
        f"{(missing or sorted(names))[0]!r} differs); give checkpoints of this LightningModule"
    )


def _has_validation(trainer: pl.Trainer) -> bool:
    source = _source(trainer)
    return (source is not None and source.is_defined()) or trainer.val_dataloaders is not None


def _source(trainer: pl.Trainer) -> Any:
    loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
    return getattr(loop, "_data_source", None)


def _validation_source(trainer: pl.Trainer) -> Any:
    """The fit's validation dataloader(s) as the user gave them (not the per-rank copies
    with a distributed sampler), or ``None``."""
    source = _source(trainer)
    try:
        if source is not None and source.is_defined():
            found = source.dataloader()
            if found is not None:
                return found
    except Exception as err:  # a val_dataloader hook that fails: the user's to see
        raise EvaluationError(f"{_WHO}: the validation dataloader failed: {err}") from err
    return trainer.val_dataloaders
