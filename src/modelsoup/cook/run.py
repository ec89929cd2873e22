"""Cooking: run several recipes over one pool of ingredients and compare them honestly.

:func:`cook` opens the ingredients, builds one :class:`~modelsoup.tasting.Taster`,
runs the baselines (best individual, uniform soup, ensemble) and the requested
recipes, scores every result on the test evaluator (never used for choosing), saves
each soup with its card, and writes ``report.json``, ``report.md`` and figures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from modelsoup._util import (
    build_model,
    check_device,
    check_replaceable,
    slug,
)
from modelsoup.accumulator import ACCUM_DTYPES
from modelsoup.cook.config import (
    CookConfig,
    CookOptions,
    RecipeEntry,
    check_test_data,
    format_error,
    load_config,
    racing_value,
    resolve_alignment_data,
    resolve_parts,
)
from modelsoup.cook.folder import check_output, held_output
from modelsoup.cook.report import write_report
from modelsoup.cook.results import CookResult, MethodResult
from modelsoup.cook.stats import paired_difference
from modelsoup.distributed import DistContext, init_distributed, launched_distributed
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import Accuracy, Evaluator, LogitsEvaluator, as_evaluator
from modelsoup.formats.dispatch import FORMAT_SUFFIXES, takes_key
from modelsoup.formats.hf_folder import FOLDER_CARD
from modelsoup.ingredients import Ingredient, adapters_base, open_ingredient, open_ingredients
from modelsoup.journal import Journal
from modelsoup.merge import as_merge, check_base, check_members
from modelsoup.recipes.ensemble import Ensemble
from modelsoup.recipes.registry import get_recipe
from modelsoup.repair.batchnorm import as_recalibration, has_batchnorm
from modelsoup.repair.pool import align_pool
from modelsoup.soup import Soup, check_adapter_merge
from modelsoup.tasting import Taster, racing_mode

_logger = logging.getLogger(__name__)

BASELINES = ("best_individual", "uniform", "ensemble")


def default_label(name: str, options: Mapping[str, Any]) -> str:
    """A readable row label from a recipe's name and options.

    A search names its rule, the option it tunes and the rule's options it holds fixed,
    so two searches of one option at different fixed values get different rows.

    Example:
        >>> default_label("pruned", {"order": "random", "passes": 3})
        'pruned (random, 3 passes)'
        >>> default_label("search", {"merge": {"rule": "ties", "density": 0.2}, "option": "lambda"})
        'search (ties lambda, density=0.2)'
        >>> default_label("greedy", {"order": "sorted", "merge": {"rule": "linear", "alpha": 0.5}})
        'greedy (sorted, linear alpha=0.5)'
        >>> default_label("lawa", {"last": 10, "available": 4})  # fewer ingredients than asked
        'lawa (last 10: all 4)'
    """
    parts = []
    if "order" in options:
        parts.append(options["order"])
    if options.get("by_layer"):
        parts.append("by layer")
    if "passes" in options:
        parts.append(f"{options['passes']} pass" + ("es" if options["passes"] != 1 else ""))
    if options.get("ingredients") not in (None, "all"):
        parts.append(f"{options['ingredients']} ingredients")
    if options.get("last"):
        short = options.get("available") is not None and options["available"] < options["last"]
        parts.append(f"last {options['last']}" + (f": all {options['available']}" if short else ""))
    if options.get("variant"):
        parts.append(str(options["variant"]))
    if "option" in options and options.get("merge"):  # search: the rule and what it tunes
        merge = options["merge"]
        parts.append(f"{merge.get('rule', 'linear')} {options['option']}")
        parts += [f"{k}={_option_text(v)}" for k, v in merge.items() if k != "rule"]
    elif options.get("merge") and not as_merge(options["merge"]).is_average:
        parts.append(as_merge(options["merge"]).describe())  # WiSE-FT on the average too
    return f"{name} ({', '.join(parts)})" if parts else name


def _option_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def entry_label(entry: RecipeEntry) -> str:
    """The entry's label, or one made from its recipe name and (validated) options."""
    if entry.label:
        return entry.label
    options = get_recipe(entry.name).check_options(entry.options())
    return default_label(entry.name, options.model_dump())


def _size(sizes: Sequence[int]) -> float:
    return sizes[0] if len(set(sizes)) == 1 else statistics.fmean(sizes)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def _entries(recipes: Sequence[Any] | None, baselines: bool, has_logits: bool) -> list[RecipeEntry]:
    entries: list[RecipeEntry] = []
    given = []
    for i, r in enumerate(recipes or []):
        try:
            given.append(r if isinstance(r, RecipeEntry) else RecipeEntry.model_validate(r))
        except ValidationError as err:
            raise ConfigError(format_error(err, f"cook() recipes.{i}")) from None
        # the recipe's own options, at the edge: one line naming the key
        get_recipe(given[-1].name).check_options(
            given[-1].options(), source="cook()", where=f"recipes.{i}"
        )
    if baselines:
        names = {e.name for e in given}
        for b in BASELINES:
            if b not in names and (b != "ensemble" or has_logits):
                entries.append(RecipeEntry(name=b))
    entries.extend(given)
    labels: dict[str, str] = {}  # file name of the soup -> the label it comes from
    for e in entries:
        label = entry_label(e)
        if not slug(label) or not label.isprintable():
            raise ConfigError(
                f"recipe label {label!r} cannot name a soup file (it needs letters or digits, "
                "and no line breaks or control characters); give another 'label'"
            )
        if label in labels.values():
            raise ConfigError(f"two recipes are both labelled '{label}'; give one a 'label'")
        other = labels.setdefault(slug(label), label)
        if other != label:
            raise ConfigError(
                f"recipes labelled '{other}' and '{label}' would be saved under one name "
                f"('{slug(label)}'); give one of them another 'label'"
            )
    return entries


def _is_their_mean(per_example: torch.Tensor, score: float) -> bool:
    mean = float(per_example.double().mean()) if per_example.numel() else math.nan
    return math.isfinite(mean) and abs(mean - score) <= 1e-5 * (1.0 + abs(score))


def _check_ensembles(entries: Sequence[RecipeEntry], evaluators: Sequence[Evaluator]) -> None:
    # an ensemble averages logits: refused now, not after every other recipe has run
    for e in entries:
        if e.name not in ("ensemble", "greedy_ensemble"):
            continue
        for ev in evaluators:
            if not isinstance(ev, LogitsEvaluator):
                raise ConfigError(
                    f"recipe '{entry_label(e)}' averages the models' logits, but evaluator "
                    f"{ev.name} gives none (a plain function); use a built-in classifier "
                    "evaluator (Accuracy, MeanLoss, MetricEvaluator) or remove the recipe"
                )


def cook(
    ingredients: Sequence[Any],
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    held_out: Evaluator | Callable,
    *,
    test: Evaluator | Callable | None = None,
    recipes: Sequence[Mapping | RecipeEntry] | None = None,
    output: str | Path | None = None,
    recalibrate: Callable[[torch.nn.Module], None] | Any = None,
    options: CookOptions | None = None,
    progress: bool = True,
    labels: Sequence[str | None] | None = None,
    base: Any = None,
    **settings: Any,
) -> CookResult:
    """Cook the given recipes (plus baselines) and report held-out and test scores.

    ``recipes`` entries are dicts like ``{"name": "greedy", "order": "random", "runs": 5}``.
    ``labels`` names the ingredients, one per entry of ``ingredients`` (``None`` keeps
    the default: the shortest path suffix that tells them apart).
    With ``output``, soups, the journal and the report are written there; the folder
    must not be, contain or lie inside an ingredient, nor hold files of the cook's names
    that no cook wrote; it is held for the whole cook
    (:func:`~modelsoup.cook.folder.held_output`: a second cook on it fails at once, and
    what a killed run left in it is tidied first). ``recalibrate``
    re-estimates every soup's BatchNorm statistics: a function ``module -> None``, or the
    unlabeled data itself (a DataLoader, a list of batches or a tensor of inputs).
    ``base`` is the pretrained start that merge rules on task vectors need (a recipe's
    ``merge: {rule: ties, ...}``); given as a path, it is also the base model of PEFT
    adapter ingredients, as ``base:`` in a config is. How the cook runs (``device``, ``seed``,
    ``bootstrap_resamples``, ``save``, ...) is
    a :class:`~modelsoup.cook.config.CookOptions`, given whole as ``options`` or key by
    key as keyword arguments; an unknown key is a :class:`ConfigError`.

    Under ``torchrun`` each rank evaluates a shard of the data and every rank returns
    the same result; only rank 0 writes files (see :mod:`modelsoup.distributed`). A rank
    that stops responding for ``dist_timeout_s`` seconds ends the run with an error.

    Example:
        >>> import torch
        >>> ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 0.0, 3.0)]
        >>> score = lambda m: 1 - abs(float(m.weight.detach()) - 2.0)
        >>> result = cook(ings, torch.nn.Linear(1, 1, bias=False), score,
        ...               recipes=[{"name": "greedy"}], progress=False)
        >>> [(m.label, m.size) for m in result.methods]
        [('best_individual', 1), ('uniform', 3), ('greedy (sorted)', 2)]
    """
    opts = _options(options, settings)
    _entries(recipes, False, False)  # each recipe entry and its options, before any reading
    started = time.perf_counter()
    recalibrate = as_recalibration(recalibrate)  # a hook, or the unlabeled data itself
    device = check_device(opts.device)
    ranks = init_distributed(opts.dist_timeout_s, device)  # None in a single process
    if ranks is not None:
        progress = progress and ranks.is_main
    # A base given as a path is the adapters' base too, as ``base:`` in a config is.
    adapter_base = opts.base
    if adapter_base is None and isinstance(base, (str, os.PathLike)):
        adapter_base = str(base)
    pool = open_ingredients(
        ingredients,
        key=opts.checkpoint_key,
        labels=labels,
        int_policy=opts.int_policy,
        strict=opts.strict,
        base=adapter_base,
    )
    if base is not None:
        key = opts.checkpoint_key if takes_key(base) else None
        base = open_ingredient(base, label="base", key=key)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output([*pool, base] if base is not None else pool, out)
    writes = out is not None and (ranks is None or ranks.is_main)
    # The whole cook holds its output folder: a second cook on it fails at once.
    with held_output(out) if writes else contextlib.nullcontext():
        return _cook(
            pool,
            model,
            held_out,
            test,
            recipes,
            out,
            recalibrate,
            opts,
            progress,
            ranks,
            started,
            base=base,
        )


def _cook(
    pool: Sequence[Ingredient],
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    held_out: Evaluator | Callable,
    test: Evaluator | Callable | None,
    recipes: Sequence[Mapping | RecipeEntry] | None,
    out: Path | None,
    recalibrate: Callable[[torch.nn.Module], None] | None,
    opts: CookOptions,
    progress: bool,
    ranks: DistContext | None,
    started: float,
    *,
    base: Ingredient | None = None,
) -> CookResult:
    """The cook itself, once its inputs are checked and its output is held."""
    device = opts.device
    module = build_model(model)
    module.to(device)
    held = as_evaluator(held_out)
    test_ev = as_evaluator(test) if test is not None else None
    check_test_data(held, test_ev)
    if ranks is not None:
        held = ranks.share(held)
        test_ev = ranks.share(test_ev) if test_ev is not None else None
    journal_path = out / "journal.jsonl" if (out is not None and opts.journal) else None
    book = ranks.journal(journal_path) if ranks is not None else Journal(journal_path)
    logits = [ev for ev in (held, test_ev) if ev is not None]
    has_logits = all(isinstance(ev, LogitsEvaluator) for ev in logits)
    entries = _entries(recipes, opts.baselines, has_logits)
    _check_ensembles(entries, logits)
    base = check_recipes(entries, pool, base, writes=out is not None, opts=opts)
    if out is not None:
        check_soup_folders(entries, pool, out, opts)
    taster = Taster(
        pool,
        module,
        held,
        journal=book,
        accum_dtype=ACCUM_DTYPES[opts.accum_dtype],
        int_policy=opts.int_policy,
        recalibrate=recalibrate,
        recalibrate_candidates=opts.recalibrate_candidates,
        share_outputs=any(e.name in ("ensemble", "greedy_ensemble") for e in entries),
        racing=racing_value(opts.racing),
        prefetch=opts.prefetch,
        max_memory=opts.max_memory,
        progress=progress,
        base=base,
        out_dtype=opts.out_dtype,
    )
    methods: list[MethodResult] = []
    for entry in entries:
        methods.append(_run_entry(taster, entry, test_ev, recalibrate, opts.seed))
    individual = taster.individual_scores()
    individual_test = None
    if test_ev is not None:
        individual_test = taster.individual_scores(test_ev)
    collapsed = _collapse_note(taster, methods, recalibrate is not None, opts)
    if ranks is not None:
        ranks.close()  # all evaluation is done: what is left is rank 0 writing files
    result = CookResult(
        methods,
        pool,
        individual,
        individual_test,
        held.name,
        test_ev.name if test_ev else None,
        held.higher_is_better,
        taster.stats(),
        time.perf_counter() - started,
        out,
    )
    if test_ev is not None and test_ev.higher_is_better != held.higher_is_better:
        result.test_higher_is_better = test_ev.higher_is_better
    result.perplexity_columns = [
        column
        for column, ev in (("held_out", held), ("test", test_ev))
        if getattr(ev, "reports_perplexity", False)
    ]
    if collapsed:
        result.notes.append(collapsed)
        warnings.warn(collapsed, SoupWarning, stacklevel=2)
    if out is not None and (ranks is None or ranks.is_main):
        # An earlier run's report describes the soups about to be replaced: it goes first,
        # so a run killed while saving leaves no report beside soups it does not describe
        # (the next run writes it again from the journal).
        for name in ("report.md", "report.json"):
            (out / name).unlink(missing_ok=True)
        if opts.save == "all":
            _save_soups(result, out, opts, progress)
        earlier = _earlier_soups(out, result)
        if earlier:
            result.notes.append(earlier)
            warnings.warn(earlier, SoupWarning, stacklevel=2)
        result.summary = write_report(
            result, out, bootstrap_resamples=opts.bootstrap_resamples, seed=opts.seed
        )
    return result


def _options(options: CookOptions | None, settings: Mapping[str, Any]) -> CookOptions:
    if options is not None and settings:
        raise ConfigError("give cook options either as options= or as keywords, not both")
    if options is not None:
        return options.options()
    try:
        return CookOptions(**settings)
    except ValidationError as err:
        raise ConfigError(format_error(err, "cook()")) from None


def _run_entry(
    taster: Taster,
    entry: RecipeEntry,
    test: Evaluator | None,
    recalibrate: Callable | None,
    seed: int,
) -> MethodResult:
    spec = get_recipe(entry.name)
    options = spec.check_options(entry.options()).model_dump()
    runs = options.pop("runs", 1)
    label = entry_label(entry)
    before = (taster.evaluations, taster.reused)
    start = time.perf_counter()
    results: list[Soup | Ensemble] = []
    cook_racing = taster.racing
    if entry.racing is not None:  # this recipe races its own way
        taster.racing = racing_mode(racing_value(entry.racing))
    try:
        for r in range(runs):
            kwargs = dict(options)
            if runs > 1 and "seed" in kwargs:
                kwargs["seed"] = kwargs["seed"] + r
            taster.start_bar(label + (f" (run {r + 1}/{runs})" if runs > 1 else ""))
            try:
                results.append(spec.fn(taster, **kwargs))
            finally:
                taster.close_bar()
    finally:
        taster.racing = cook_racing
    available = results[0].options.get("available") if results else None
    if available is not None and not entry.label:  # it had fewer ingredients than asked
        label = default_label(entry.name, {**options, "available": available})
    tests: list[float] = []
    per_run: list[torch.Tensor] = []
    for res in results:
        if (
            isinstance(res, Soup)
            and recalibrate is not None
            and (res.size > 1 or taster.recalibrate_candidates or not res.merge.is_average)
        ):
            # A single ingredient keeps the statistics it was trained with, unless every
            # candidate (it too) was scored recalibrated, so the soup saved is the one
            # scored, or a merge rule moved it (base + lambda tau is not the ingredient).
            taster.recalibrate_soup(res, recalibrate)
        if test is None:
            continue
        if isinstance(res, Ensemble):
            logits = res.logits(taster, test)
        elif isinstance(test, LogitsEvaluator):
            logits = taster.soup_logits(res, test)
        else:
            logits = None
        if logits is not None:
            score = float(test.score_logits(logits))
            # per-example results speak for the score only when it is their mean (a
            # subclass may weigh or pick examples): otherwise no interval is drawn
            found = test.per_example(logits)
            if found is not None and _is_their_mean(found, score):
                per_run.append(found.float())
        else:
            score = taster.score_soup(res, test)
        res.scores["test"] = score
        tests.append(score)
    # Over several runs, each example's result is averaged across runs, so the interval
    # and the paired comparison speak of the mean the row reports, not of one run.
    per_example = torch.stack(per_run).mean(0) if len(per_run) == len(results) else None
    held_mean, held_std = _mean_std([res.scores["held_out"] for res in results])
    test_mean, test_std = _mean_std(tests) if tests else (None, None)
    return MethodResult(
        label,
        entry.name,
        results,
        held_mean,
        test_mean,
        held_std,
        test_std,
        _size([r.size for r in results]),
        taster.evaluations - before[0],
        taster.reused - before[1],
        time.perf_counter() - start,
        per_example,
        tests,
    )


def _collapse_note(
    taster: Taster, methods: Sequence[MethodResult], recalibrated: bool, opts: CookOptions
) -> str | None:
    """The warning for a uniform soup worse than every ingredient, or ``None``.

    Below the worst ingredient is said only when the gap is more than noise: with
    per-example results, a paired comparison of the soup and the worst ingredient on the
    held-out examples (cook/stats.py) must exclude zero. Its two forward passes are run
    only for a soup already below the worst, and are kept in the journal. BatchNorm
    repairs are suggested only for a model that has BatchNorm.
    """
    uniform = next((m for m in methods if m.label == "uniform"), None)
    scores = taster.individual_scores()
    if uniform is None or len(scores) < 2:
        return None
    order = taster.order(scores)
    worst = order[-1]
    if taster.better(uniform.held_out, scores[worst]):
        return None
    held = taster.held_out
    evidence = "no per-example results to tell this gap from noise"
    if isinstance(held, LogitsEvaluator) and isinstance(uniform.result, Soup):
        soup_results = held.per_example(taster.soup_logits(uniform.result, held))
        worst_results = held.per_example(taster.outputs(worst, held))
        if soup_results is not None and worst_results is not None:
            cmp = paired_difference(
                soup_results.float().numpy(),
                worst_results.float().numpy(),
                n_resamples=opts.bootstrap_resamples,
                seed=opts.seed,
            )
            scale = 100 if isinstance(held, Accuracy) else 1
            unit = "points" if scale == 100 else ""
            if not cmp.significant:
                _logger.info(
                    "the uniform soup scores below the worst ingredient on held-out, within "
                    "noise (%s)",
                    cmp.describe(scale=scale, unit=unit, digits=1 if scale == 100 else 4),
                )
                return None
            gap = cmp.describe(scale=scale, unit=unit, digits=1 if scale == 100 else 4)
            evidence = f"{gap} vs the worst ingredient on {cmp.n} held-out examples"
    repair = "try align (modelsoup diagnose measures the barrier)"
    if has_batchnorm(taster.model) and not recalibrated:
        repair = (
            "the model has BatchNorm: set recalibrate_bn to re-estimate its statistics, "
            "and try align (modelsoup diagnose measures the barrier)"
        )
    return (
        f"the uniform soup scores {uniform.held_out:.4g} on held-out, worse than every "
        f"ingredient (worst {taster.ingredients[worst].label}: {scores[worst]:.4g}; "
        f"{evidence}): these ingredients may not share a loss basin; rely on greedy, or "
        f"{repair}"
    )


def check_recipes(
    entries: Sequence[RecipeEntry],
    pool: Sequence[Ingredient],
    base: Ingredient | None,
    *,
    writes: bool,
    opts: CookOptions,
) -> Ingredient | None:
    """Check, before any evaluation, what each recipe's merge rule needs: a base (named
    with the rule when missing), SLERP's two members for ``search``, and for adapter
    ingredients saved as adapters, the plain average. Returns the base the cook uses:
    ``base``, else the adapters' own.

    Example:
        >>> from modelsoup.ingredients import open_ingredients
        >>> pool = open_ingredients([{"w": torch.ones(1)}, {"w": torch.zeros(1)}])
        >>> entry = RecipeEntry(name="greedy", merge={"rule": "ties", "density": 0.5})
        >>> check_recipes([entry], pool, None, writes=False, opts=CookOptions())
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: merge rule 'ties' works on task vectors ...
    """
    adapters = adapters_base(pool)
    base = base if base is not None else adapters  # adapter ingredients carry their base
    for entry in entries:
        rule = as_merge(get_recipe(entry.name).check_options(entry.options()).merge_rule())
        check_base(rule, base)
        if entry.name == "search":
            check_members(rule, len(pool))
        if adapters is not None and writes and not opts.merge_into_base:
            check_adapter_merge(rule)
    return base


def check_align(config: CookConfig, parts: Any) -> None:
    """Refuse ``align`` where it cannot run: under torchrun, or beside a ``base``.

    Example:
        >>> from types import SimpleNamespace
        >>> check_align(SimpleNamespace(align=True), SimpleNamespace(base="pretrained/"))
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: align and base cannot be combined: ...
    """
    if config.align and launched_distributed():
        raise ConfigError(
            "align: true cannot run under torchrun (every rank would write the aligned "
            "checkpoints); align in one process first, then cook the aligned checkpoints"
        )
    if config.align and parts.base is not None:
        raise ConfigError(
            "align and base cannot be combined: task vectors need the ingredients in the "
            "base's own unit order; fine-tunes of one base need no alignment"
        )


def check_soup_folders(
    entries: Sequence[RecipeEntry], pool: Sequence[Ingredient], out: Path, opts: CookOptions
) -> None:
    """Refuse, before any cooking, a soup folder the cook could not replace when it saves
    its soups as folders (``save: all``): one in ``<out>/soups`` that is not a soup's.

    Example:
        >>> from modelsoup.ingredients import open_ingredients
        >>> pool = open_ingredients([{"w": torch.ones(1)}])
        >>> check_soup_folders(_entries([{"name": "greedy"}], True, False), pool,
        ...                    Path("/nonexistent"), CookOptions())
    """
    if opts.save != "all" or _soup_suffix(pool[0], opts) != "":
        return
    for e in entries:
        check_replaceable(out / "soups" / slug(entry_label(e)), FOLDER_CARD)


def _soup_suffix(first: Ingredient, opts: CookOptions) -> str:
    """The suffix of the soups a cook saves: ``""`` for HF-style folders."""
    fmt = opts.save_format or (
        "folder" if first.path is not None and first.path.is_dir() else "safetensors"
    )
    suffix = FORMAT_SUFFIXES[fmt]
    if fmt == "pt" and getattr(first.source, "lightning", None) is not None:
        suffix = ".ckpt"  # in Lightning's layout, for load_from_checkpoint
    return suffix


def _save_soups(result: CookResult, out: Path, opts: CookOptions, progress: bool) -> None:
    suffix = _soup_suffix(result.ingredients[0], opts)
    for m in result.methods:
        if not m.is_soup:
            continue
        soup = m.result
        path = out / "soups" / f"{slug(m.label)}{suffix}"
        soup.save(
            path,
            out_dtype=opts.out_dtype,
            progress=progress,
            adapter_rank=opts.adapter_rank if soup.adapter_base() is not None else None,
            merge_into_base=opts.merge_into_base,
        )
        m.saved = str(path.relative_to(out))


def _earlier_soups(out: Path, result: CookResult) -> str | None:
    """A note naming the soups in ``out/soups`` that this run did not make (an earlier
    run's, under labels this run no longer has, or all of them with ``save: none``):
    they lie beside this run's report, which does not describe them."""
    folder = out / "soups"
    try:
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return None
    made = {Path(m.saved).name for m in result.methods if m.saved}
    present = set(names)
    # a single-file soup's card is <soup>.json beside it: counted with its soup
    others = [
        n
        for n in names
        if n not in made and not (n.endswith(".json") and n[: -len(".json")] in present)
    ]
    if not others:
        return None
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return (
        f"{folder} also holds {shown}, which this run did not make (an earlier run left "
        "them): they are not this report's soups; remove them, or cook into a fresh folder"
    )


def cook_config(
    config: CookConfig | str | Path, *, progress: bool = True, device: str | None = None
) -> CookResult:
    """Cook from a config file (or a validated :class:`CookConfig`); ``device``, if
    given, overrides the config's.

    Example:
        >>> cook_config("missing.yaml")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: missing.yaml: config file not found
    """
    if not isinstance(config, CookConfig):
        config = load_config(config)
    if device is not None:
        config = config.model_copy(update={"device": device})
    check_device(config.device)  # before any model or data is built
    parts = resolve_parts(config)
    ingredients, model, held, output = parts.ingredients, parts.model, parts.held_out, parts.output
    test, recalibrate, labels = parts.test, parts.recalibrate, parts.labels
    check_align(config, parts)
    if config.align:  # aligned copies are written into the output: check it first
        # opened once here, so the aligned copies keep the labels of what they came from
        pool = open_ingredients(
            ingredients,
            key=config.checkpoint_key,
            labels=labels,
            check=False,
            base=config.options().base,
        )
        check_output(pool, output)
        labels = [ing.label for ing in pool]
    # Aligning is part of the cook: it holds the output, and cook() takes the lock again.
    with held_output(output) if config.align else contextlib.nullcontext():
        if config.align:
            method = "reference" if config.align is True else config.align
            ingredients = align_pool(
                pool,
                model,
                output,
                checkpoint_key=config.checkpoint_key,
                example=held,
                method=method,
                data=resolve_alignment_data(config),
                num_batches=config.align_batches,
                seed=config.seed,
                device=config.device,
            )
        options = config.options()
        if config.align and config.checkpoint_key is not None:
            # the aligned copies are plain files of the weights under that key
            options = options.model_copy(update={"checkpoint_key": None})
        return cook(
            ingredients,
            model,
            held,
            test=test,
            recipes=config.recipes,
            output=output,
            recalibrate=recalibrate,
            options=options,
            progress=progress,
            labels=labels,
            base=parts.base,
        )
