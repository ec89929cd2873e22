"""The Hugging Face ``Trainer`` callback: at the end of training, cook the run's checkpoints.

The ingredients are the run's ``output_dir/checkpoint-N`` folders in step order (plus
any ``extra_checkpoints``, e.g. the checkpoints of a sweep's other runs). The held-out
evaluator is built from the Trainer's eval dataloader unless one is given: accuracy or
mean cross-entropy for a classifier (one label per example), the mean token negative
log-likelihood for a causal LM (token labels, ``-100`` masked), else the model's own
``loss``. The Trainer's model is reused to taste the candidates, and its weights are put
back as they were when the cook ends, so ``trainer.save_model()`` afterwards saves what
was trained. Cooking runs in one process; under multi-process training the callback
steps aside with a warning (run ``modelsoup cook`` on ``output_dir`` afterwards).
"""

from __future__ import annotations

import glob
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from modelsoup.cook.results import CookResult
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import Accuracy, Evaluator, MeanLoss, model_device
from modelsoup.formats.hf_folder import open_folder
from modelsoup.hf.language import CausalLMLoss, sequences_from_batches
from modelsoup.hf.models import keep_stored_names_only
from modelsoup.ingredients import natural_order
from modelsoup.integrations._common import batches_digest, cook_in_place, recipe_entries

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
    """
    kept = [
        {k: v.detach().cpu() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches
    ]
    if not kept or "labels" not in kept[0]:
        raise ConfigError(
            "SoupCallback needs labelled eval batches: give the Trainer an eval_dataset with "
            "labels (and an eval_strategy), or pass held_out= an evaluator"
        )
    if kept[0]["labels"].dim() == 1:
        return Accuracy(kept) if metric == "accuracy" else MeanLoss(kept)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {
        n
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for n in ([v] if isinstance(v, str) else v)
    }
    if type(model).__name__ in names and "input_ids" in kept[0]:
        width = max(b["input_ids"].shape[1] for b in kept)
        return CausalLMLoss(
            sequences_from_batches(kept), max_length=width, batch_size=len(kept[0]["labels"])
        )
    return ModelLoss(kept)


class SoupCallback(transformers.TrainerCallback):
    """Cook the run's checkpoints into soups when training ends; results in ``output_dir/soup/``.

    ``recipes`` are cook recipe entries (default: greedy); ``last=k`` adds LAWA, the
    uniform soup of the last k checkpoints. ``held_out`` replaces the evaluator built
    from the eval dataloader, ``test`` adds a test evaluator for the report, and other
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
        extra_checkpoints: Sequence[str | Path] = (),
        output_subdir: str = "soup",
        **cook_options: Any,
    ):
        self.recipes = recipe_entries(recipes, last)
        self.held_out, self.test, self.metric = held_out, test, metric
        self.extra_checkpoints = [Path(p) for p in extra_checkpoints]
        self.output_subdir = output_subdir
        self.cook_options = cook_options
        self.result: CookResult | None = None

    def checkpoints(self, output_dir: str | Path) -> list[Path]:
        """The run's ``checkpoint-N`` folders in step order, then the extra checkpoints."""
        found = sorted(glob.glob(str(Path(output_dir) / "checkpoint-*")), key=natural_order)
        return [Path(p) for p in found if Path(p).is_dir()] + self.extra_checkpoints

    def on_train_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
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
                f"SoupCallback: no checkpoints in {args.output_dir} (set save_strategy); "
                "no soup cooked",
                SoupWarning,
                stacklevel=2,
            )
            return
        held = self.held_out
        if held is None:
            if eval_dataloader is None:
                raise ConfigError(
                    "SoupCallback found no eval dataloader: give the Trainer an eval_dataset "
                    "and an eval_strategy, or pass held_out= an evaluator"
                )
            held = held_out_from_batches(list(eval_dataloader), model, self.metric)
        handle = keep_stored_names_only(model, set(open_folder(found[0]).names()))
        try:
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
