"""What the training-loop callbacks share: their recipes, the data digest that names
their evaluators, and the cook that hands the trained weights back afterwards.

Nothing here imports a training framework, so both callbacks (Hugging Face ``Trainer``
and Lightning) build on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from modelsoup.cook.config import CookOptions, RecipeEntry, format_error
from modelsoup.cook.results import CookResult
from modelsoup.cook.run import BASELINES, cook, entry_label
from modelsoup.errors import ConfigError
from modelsoup.evaluators import model_device
from modelsoup.recipes.registry import get_recipe
from modelsoup.soup import Soup

_logger = logging.getLogger(__name__)


def recipe_entries(recipes: Sequence[Mapping[str, Any]] | None, last: int | None) -> list[dict]:
    """The callback's recipe entries: ``recipes`` (default: greedy), then LAWA over the
    ``last`` k checkpoints when ``last`` is given.

    Example:
        >>> recipe_entries(None, 3)
        [{'name': 'greedy'}, {'name': 'lawa', 'last': 3}]
    """
    entries = [r if isinstance(r, str) else dict(r) for r in (recipes or [{"name": "greedy"}])]
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ConfigError(f"last={last!r}: LAWA averages the last k checkpoints, k >= 1")
        entries.append({"name": "lawa", "last": last})
    # a misspelt recipe or option fails now, not after the whole training run
    return [e.model_dump(exclude_none=True) for e in check_entries(entries, "the callback")]


def check_entries(recipes: Sequence[Any], who: str) -> list[RecipeEntry]:
    """Recipe entries, checked as a cook checks them: a known recipe, known options.

    Example:
        >>> [e.name for e in check_entries(["greedy", {"name": "lawa", "last": 2}], "cb")]
        ['greedy', 'lawa']
        >>> check_entries([{"name": "greeedy"}], "cb")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: recipe 'greeedy' is unknown; known recipes: ...
    """
    checked = []
    for i, r in enumerate(recipes):
        try:
            entry = r if isinstance(r, RecipeEntry) else RecipeEntry.model_validate(r)
        except ValidationError as err:
            raise ConfigError(format_error(err, f"{who} recipes.{i}")) from None
        get_recipe(entry.name).check_options(entry.options(), source=who, where=f"recipes.{i}")
        checked.append(entry)
    return checked


#: keywords of :func:`~modelsoup.cook.run.cook` itself (not cook options) a callback
#: passes on as given
COOK_KEYWORDS = ("recalibrate", "labels", "base")


def check_cook_options(cook_options: Mapping[str, Any], who: str) -> None:
    """A callback's extra cook options, checked now (a misspelt key fails before training).

    Example:
        >>> check_cook_options({"bootstrap_resample": 100}, "cb")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: cb: config key 'bootstrap_resample': ...
    """
    # cook()'s own keywords a callback passes on are checked by cook; what the callback
    # sets itself (output, progress) or anything else is a cook option, checked here
    own = next((k for k in ("output", "progress") if k in cook_options), None)
    if own is not None:
        raise ConfigError(
            f"{who}: '{own}' is set by the callback (the soups go beside the run's "
            "checkpoints, and progress follows the run); remove it"
        )
    options = {k: v for k, v in cook_options.items() if k not in COOK_KEYWORDS}
    try:
        CookOptions(**options)
    except ValidationError as err:
        raise ConfigError(format_error(err, who)) from None


def check_load(load: str | None, entries: Sequence[Mapping[str, Any]], who: str) -> None:
    """``load=``: a recipe name or report label the cook will have (a baseline, or one of
    ``entries``), checked before training.

    Example:
        >>> check_load("greedyy", [{"name": "greedy"}], "cb")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: cb(load='greedyy'): no recipe ... is named so; ...
    """
    if load is None:
        return
    checked = check_entries(entries, who)
    known = {*BASELINES, *(e.name for e in checked), *(entry_label(e) for e in checked)}
    if load not in known:
        raise ConfigError(
            f"{who}(load={load!r}): no recipe or report row is named so; name one of "
            f"{', '.join(sorted(known))}"
        )


def checkpoint_paths(extra: str | Path | Sequence[str | Path], who: str) -> list[Path]:
    """A callback's ``extra_checkpoints``: one path, or a sequence of them (a single
    string is one checkpoint, never its characters).

    Example:
        >>> checkpoint_paths("other/checkpoint-8", "SoupCallback")
        [PosixPath('other/checkpoint-8')]
        >>> checkpoint_paths([1], "SoupCallback")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: SoupCallback(extra_checkpoints=[1]): give checkpoint ...
    """
    items = [extra] if isinstance(extra, str | Path) else list(extra)
    if not all(isinstance(p, str | Path) and str(p) for p in items):
        raise ConfigError(
            f"{who}(extra_checkpoints={extra!r}): give checkpoint paths, as a list of "
            "files or folders (or one path)"
        )
    return [Path(p) for p in items]


def check_step_counters(model: torch.nn.Module, cook_options: Mapping[str, Any], who: str) -> None:
    """Refuse, before training, the default ``int_policy="strict"`` for a model with
    BatchNorm layers: their ``num_batches_tracked`` counts training steps, so it differs
    between every two checkpoints of one run, and the cook would fail after training.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> check_step_counters(net, {"int_policy": "first"}, "SoupCallback")
        >>> try:
        ...     check_step_counters(net, {}, "SoupCallback")
        ... except ConfigError as err:
        ...     print(str(err)[:43])
        SoupCallback: the model's BatchNorm counter
    """
    if cook_options.get("int_policy", "strict") != "strict":
        return
    counter = next((n for n, _ in model.named_buffers() if n.endswith("num_batches_tracked")), None)
    if counter is not None:
        raise ConfigError(
            f"{who}: the model's BatchNorm counter '{counter}' counts training steps, so it "
            "differs between this run's checkpoints; pass int_policy='first' (the soup takes "
            "it from the first checkpoint)"
        )


def cook_in_place(
    ingredients: Sequence[str | Path],
    model: torch.nn.Module,
    held_out: Any,
    *,
    output: Path,
    recipes: Sequence[Mapping[str, Any]],
    test: Any = None,
    who: str = "SoupCallback",
    **cook_options: Any,
) -> CookResult:
    """Cook ``ingredients`` tasting them in the training run's own ``model``, then put
    the model's trained weights back, whatever happened (as ``update_bn`` restores what
    it touches). The cook runs on the model's device unless ``device`` is given.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> for v in (1.0, 3.0):
        ...     torch.save({"weight": torch.full((1, 1), v)}, folder / f"c{v:g}.pt")
        >>> lin = torch.nn.Linear(1, 1, bias=False)
        >>> trained = lin.weight.item()
        >>> score = lambda m: 1 - abs(float(m.weight.detach()) - 2.0)
        >>> result = cook_in_place([folder / "c1.pt", folder / "c3.pt"], lin, score,
        ...                        output=folder / "soup", recipes=[{"name": "greedy"}],
        ...                        bootstrap_resamples=100)
        >>> result.method("uniform").held_out, lin.weight.item() == trained
        (1.0, True)
    """
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    options = {"device": str(model_device(model)), **cook_options}
    try:
        result = cook(
            [str(p) for p in ingredients],
            model,
            held_out,
            test=test,
            recipes=recipes,
            output=output,
            progress=False,
            **options,
        )
    finally:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(trained[name])
    _logger.info("%s: %s", who, (result.summary or {}).get("verdict", ""))
    return result


def chosen_soup(result: CookResult, which: str) -> Soup:
    """The soup of the method ``which`` names: a report label (``"lawa (last 3)"``) or a
    recipe name (``"greedy"``, ``"uniform"``, ``"best_individual"``; the first such row).

    Example:
        >>> import torch
        >>> ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)]
        >>> result = cook(ings, torch.nn.Linear(1, 1, bias=False),
        ...               lambda m: float(m.weight.detach()), recipes=[], progress=False)
        >>> chosen_soup(result, "uniform").chosen
        [0, 1]
    """
    for method in result.methods:
        if which in (method.label, method.recipe):
            if not method.is_soup:
                raise ConfigError(
                    f"load={which!r}: {method.label} is an ensemble, not one set of weights; "
                    "load a soup (greedy, uniform, lawa, ...)"
                )
            return method.result
    labels = ", ".join(m.label for m in result.methods)
    raise ConfigError(f"load={which!r} names no row of the report; the rows are: {labels}")
