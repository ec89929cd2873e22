"""The Hugging Face ``Trainer`` callback: at the end of training, cook the run's checkpoints.

**Ingredients.** The ``output_dir/checkpoint-N`` folders this training run saved, in step
order (plus any ``extra_checkpoints``, e.g. the checkpoints of a sweep's other runs).
Leftovers of an earlier run in a reused ``output_dir`` are not ingredients. A run
resumed with ``resume_from_checkpoint`` continues an earlier one, so the checkpoints up
to the step it resumed from count too when their ``trainer_state.json`` log agrees with
the restored one (those saved after that step by the interrupted attempt do not, unless
this run saves them again).

**Held-out score.** Built from the data the Trainer's own evaluations during training
ran on (its ``eval_dataset``), unless ``held_out=`` gives an evaluator: accuracy
(``metric="accuracy"``) or mean cross-entropy for a classifier (one integer label per
example), the mean token negative log-likelihood for a causal LM (token labels, ``-100``
masked), else (float labels: regression, multi-label) the model's own ``loss``. A dict of
several eval sets needs ``eval_key=`` naming the held-out entry; data passed to
``predict()`` or to an ``evaluate()`` outside training is never used.

The Trainer's model is reused to taste the candidates, and its weights are put back as
they were when the cook ends, so ``trainer.save_model()`` afterwards saves what was
trained. Cooking runs in one process; under multi-process training the callback steps
aside with a warning (run ``modelsoup cook`` on ``output_dir`` afterwards).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modelsoup.cook.results import CookResult
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import Accuracy, Evaluator, MeanLoss, batches_digest, model_device
from modelsoup.formats.hf_folder import open_folder
from modelsoup.hf.language import CausalLMLoss, sequences_from_batches
from modelsoup.hf.models import keep_stored_names_only, refuse_converted_names
from modelsoup.integrations._common import (
    check_cook_options,
    check_step_counters,
    checkpoint_paths,
    cook_in_place,
    recipe_entries,
)

_logger = logging.getLogger(__name__)


class ModelLoss:
    """The model's own ``loss`` on labelled batches, averaged over examples (lower is better).

    Example:
        >>> import torch
        >>> class Model(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(1))
        ...     def forward(self, x, labels):
        ...         return {"loss": ((self.w * x - labels) ** 2).mean()}
        >>> ModelLoss([{"x": torch.ones(2), "labels": torch.zeros(2)}]).evaluate(Model())
        1.0
    """

    higher_is_better = False

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]]):
        self.batches = [dict(b) for b in batches]
        self.name = f"model_loss[{batches_digest(self.batches)}]"

    def evaluate(self, model: torch.nn.Module) -> float:
        device, was_training = model_device(model), model.training
        total, count = 0.0, 0
        model.eval()
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    out = model(**{k: v.to(device) for k, v in batch.items()})
                    loss = out["loss"] if isinstance(out, Mapping) else out.loss
                    rows = len(batch["labels"])
                    total, count = total + float(loss) * rows, count + rows
        finally:
            model.train(was_training)
        return total / count


METRICS = ("loss", "accuracy")


def check_metric(metric: Any) -> str:
    """``metric`` if the callback knows it (``"loss"`` or ``"accuracy"``), else a ConfigError.

    Example:
        >>> check_metric("accuracy")
        'accuracy'
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise ConfigError(
            f"metric={metric!r}: SoupCallback chooses by 'loss' (lower is better) or "
            "'accuracy'; for another metric pass held_out= an evaluator"
        )
    return metric


def _is_regression(model: torch.nn.Module, labels: torch.Tensor) -> bool:
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    return labels.is_floating_point() or problem == "regression"


def held_out_from_batches(
    batches: Sequence[Mapping[str, Any]],
    model: torch.nn.Module,
    metric: Literal["loss", "accuracy"] = "loss",
) -> Evaluator:
    """The held-out evaluator a Trainer's eval batches call for (see the module docstring).

    Example:
        >>> import torch
        >>> batch = {"x": torch.eye(2), "labels": torch.tensor([0, 1])}
        >>> type(held_out_from_batches([batch], torch.nn.Identity(), "accuracy")).__name__
        'Accuracy'
        >>> batch = {"x": torch.eye(2), "labels": torch.tensor([0.5, 1.5])}  # regression
        >>> type(held_out_from_batches([batch], torch.nn.Identity())).__name__
        'ModelLoss'
    """
    metric = check_metric(metric)
    kept = [
        {k: v.detach().cpu() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches
    ]
    if not kept or "labels" not in kept[0]:
        raise ConfigError(
            "SoupCallback needs labelled eval batches: give the Trainer an eval_dataset with "
            "labels (and an eval_strategy), or pass held_out= an evaluator"
        )
    labels = kept[0]["labels"]
    classes = labels.dim() == 1 and not _is_regression(model, labels)
    if metric == "accuracy" and not classes:
        raise ConfigError(
            f"metric='accuracy' needs one integer class label per example, but the eval "
            f"labels are {labels.dtype} of shape {tuple(labels.shape)}; use metric='loss' "
            "(the model's own loss) or pass held_out= an evaluator"
        )
    if classes:
        return Accuracy(kept) if metric == "accuracy" else MeanLoss(kept)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {
        n
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for n in ([v] if isinstance(v, str) else v)
    }
    if type(model).__name__ in names and "input_ids" in kept[0] and labels.dim() == 2:
        width = max(b["input_ids"].shape[1] for b in kept)
        return CausalLMLoss(sequences_from_batches(kept), max_length=width, batch_size=len(labels))
    return ModelLoss(kept)


def _evaluated_set(metrics: Mapping[str, Any] | None) -> str | None:
    """The metric prefix of one ``Trainer.evaluate`` call (``eval``, ``eval_<key>`` for a
    dict eval_dataset), read from the speed metrics every evaluation reports."""
    for key in metrics or {}:
        if key.endswith("_runtime"):
            prefix = key[: -len("_runtime")]
            if f"{prefix}_samples_per_second" in metrics:
                return prefix
    return None


def _same_run(folder: Path, history: list[dict], step: int) -> bool:
    """Whether the checkpoint ``folder`` (of ``step``) was saved by the run whose log
    ``history`` a resumed Trainer restored: its own log is that history up to its step."""
    try:
        saved = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return saved == [entry for entry in history if entry.get("step", 0) <= step]


def _multi_process() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SoupCallback(transformers.TrainerCallback):
    """Cook the run's checkpoints into soups when training ends; results in ``output_dir/soup/``.

    ``recipes`` are cook recipe entries (default: greedy); ``last=k`` adds LAWA, the
    uniform soup of the last k checkpoints. The soup is chosen on the Trainer's
    ``eval_dataset`` (``eval_key`` names the held-out entry of a dict of them) by
    ``metric`` (``"loss"`` or ``"accuracy"``); ``held_out`` replaces that with an
    evaluator of yours, ``test`` adds a test evaluator for the report, and other
    keywords are :func:`modelsoup.cook.cook` options (``save``, ``seed``, ...). The
    :class:`~modelsoup.cook.results.CookResult` is kept as :attr:`result`.

    Example:
        >>> callback = SoupCallback(last=3)
        >>> [r["name"] for r in callback.recipes]
        ['greedy', 'lawa']
    """

    def __init__(
        self,
        recipes: Sequence[Mapping[str, Any]] | None = None,
        *,
        last: int | None = None,
        held_out: Any = None,
        test: Any = None,
        metric: Literal["loss", "accuracy"] = "loss",
        eval_key: str | None = None,
        extra_checkpoints: str | Path | Sequence[str | Path] = (),
        output_subdir: str = "soup",
        **cook_options: Any,
    ):
        self.recipes = recipe_entries(recipes, last)
        self.held_out, self.test, self.metric = held_out, test, check_metric(metric)
        if eval_key is not None and (not isinstance(eval_key, str) or not eval_key):
            raise ConfigError(
                f"eval_key={eval_key!r}: name the held-out entry of the Trainer's dict "
                "eval_dataset (a key such as 'validation')"
            )
        self.eval_key = eval_key
        self.extra_checkpoints = checkpoint_paths(extra_checkpoints, "SoupCallback")
        if not isinstance(output_subdir, str) or not output_subdir.strip():
            raise ConfigError(f"output_subdir={output_subdir!r}: name a folder, such as 'soup'")
        parts = Path(output_subdir).parts
        if (
            Path(output_subdir).is_absolute()
            or ".." in parts
            or any(p.startswith("checkpoint-") for p in parts)
        ):
            # the Trainer's checkpoints are the ingredients: the soups must not land in them
            raise ConfigError(
                f"output_subdir={output_subdir!r}: soups go in a folder of the run's "
                "output_dir beside its checkpoint-* folders, never in one; choose another "
                "name, such as 'soup'"
            )
        self.output_subdir = output_subdir
        check_cook_options(cook_options, "SoupCallback")  # a misspelt key fails now
        self.cook_options = cook_options
        self.result: CookResult | None = None
        self._training = False
        self._saved: set[int] = set()  # steps whose checkpoint-N this run saved
        self._resumed: set[int] = set()  # checkpoint-N up to the step a resumed run began at
        self._evaluated: dict[str | None, Any] = {}  # eval_dataset key -> its dataloader

    def checkpoints(self, output_dir: str | Path) -> list[Path]:
        """The ``checkpoint-N`` folders of ``output_dir`` this training run saved (with,
        for a resumed run, those up to the step it resumed from) in step order, then the
        extra checkpoints.

        Example:
            >>> callback = SoupCallback(extra_checkpoints=["other/checkpoint-8"])
            >>> [p.as_posix() for p in callback.checkpoints("run")]  # before training: the extras
            ['other/checkpoint-8']
        """
        steps = sorted(self._saved | self._resumed)
        found = [Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{n}" for n in steps]
        return [p for p in found if p.is_dir()] + self.extra_checkpoints

    def on_train_begin(self, args, state, control, **kwargs):
        if self.held_out is None and args.eval_strategy == "no" and not _multi_process():
            raise ConfigError(
                "SoupCallback chooses the soup on the Trainer's evaluations, but "
                "eval_strategy is 'no': set eval_strategy (e.g. 'epoch') with an "
                "eval_dataset, or pass held_out= an evaluator"
            )
        if kwargs.get("model") is not None:
            check_step_counters(kwargs["model"], self.cook_options, "SoupCallback")
        self._training, self._saved, self._evaluated = True, set(), {}
        # A resumed run (its state restored from a checkpoint, so global_step > 0) goes on
        # with the run that saved the checkpoints its log history agrees with.
        self._resumed = set()
        if state.global_step > 0:
            for path in Path(args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
                if step.isdigit() and int(step) <= state.global_step:
                    if _same_run(path, state.log_history, int(step)):
                        self._resumed.add(int(step))

    def on_save(self, args, state, control, **kwargs):
        if self._training:
            self._saved.add(state.global_step)
            if self.held_out is None and self._evaluated:
                self._held_out_loader()  # a misconfigured eval set fails now, not after training

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        prefix = _evaluated_set(metrics)
        if self._training and prefix == "eval":  # the Trainer's one eval_dataset
            self._evaluated[None] = eval_dataloader
        elif self._training and prefix is not None and prefix.startswith("eval_"):
            self._evaluated[prefix[len("eval_") :]] = eval_dataloader  # a dict's entry

    def _held_out_loader(self) -> Any:
        """The dataloader of the eval set that chooses: never one ``predict()`` or a
        later evaluation on other data left behind."""
        if not self._evaluated:
            raise ConfigError(
                "SoupCallback: the Trainer ran no evaluation during training: give it an "
                "eval_dataset and an eval_strategy, or pass held_out= an evaluator"
            )
        keys = sorted(self._evaluated, key=str)
        if self.eval_key is not None:
            if self.eval_key not in self._evaluated:
                named = ", ".join(repr(k) for k in keys if k is not None)
                raise ConfigError(
                    f"eval_key={self.eval_key!r} is not a key of the Trainer's eval_dataset"
                    + (f" (its keys: {named})" if named else " (it is one dataset: drop eval_key)")
                )
            return self._evaluated[self.eval_key]
        if len(keys) > 1:
            named = ", ".join(repr(k) for k in keys if k is not None)
            raise ConfigError(
                f"SoupCallback: the Trainer evaluated several eval sets ({named}); name the "
                "held-out one with eval_key=, or pass held_out= an evaluator"
            )
        return self._evaluated[keys[0]]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        if _multi_process():
            warnings.warn(
                "SoupCallback cooks in one process only: run `modelsoup cook` on "
                f"{args.output_dir} after this multi-process run",
                SoupWarning,
                stacklevel=2,
            )
            return
        found = self.checkpoints(args.output_dir)
        if not found:
            warnings.warn(
                f"SoupCallback: this run saved no checkpoints in {args.output_dir} (set "
                "save_strategy); no soup cooked",
                SoupWarning,
                stacklevel=2,
            )
            return
        held = self.held_out
        if held is None:
            held = held_out_from_batches(list(self._held_out_loader()), model, self.metric)
        stored = set(open_folder(found[0]).names())
        handle = keep_stored_names_only(model, stored)
        try:
            refuse_converted_names(
                model,
                stored,
                "SoupCallback cannot cook soups in place into it: run `modelsoup average` on "
                f"the checkpoints in {args.output_dir}, or `modelsoup cook` with your own "
                "model: function whose module's state_dict names match the checkpoint",
            )
            self.result = cook_in_place(
                found,
                model,
                held,
                test=self.test,
                recipes=self.recipes,
                output=Path(args.output_dir) / self.output_subdir,
                **self.cook_options,
            )
        finally:
            if handle is not None:
                handle.remove()
        return control
