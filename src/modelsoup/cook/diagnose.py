"""Soupability: before cooking, estimate whether averaging these ingredients can work.

Two measurements (the seed paper's failure was a soup of ResNets that collapsed to
chance; these would have said so in advance):

- **weight similarity**: pairwise cosine similarity of the flattened floating weights,
  and each ingredient's distance to the mean, streamed tensor by tensor;
- **interpolation barrier**: the held-out score along the straight line between the
  best ingredient and each other one. Fine-tuned models from one start sit in one
  basin: the line stays at least as good as its endpoints. Independently trained
  ones do not: the middle of the line collapses (Frankle et al. 2020, "linear mode
  connectivity"; Ainsworth et al. 2023).

The verdict is in plain words, with what to do about it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelsoup._util import atomic_file, build_model, check_device, file_in_the_way
from modelsoup.cook.folder import DIAGNOSIS_FILES, check_cook_folder, held_output
from modelsoup.errors import ConfigError, EvaluationError
from modelsoup.evaluators import Evaluator, as_evaluator
from modelsoup.ingredients import Ingredient, open_ingredients
from modelsoup.journal import Journal
from modelsoup.soup import check_not_input
from modelsoup.tasting import Taster

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def weight_similarity(ingredients: Sequence[Ingredient]) -> tuple[list[list[float]], list[float]]:
    """Cosine similarity matrix of the ingredients' weights, and each one's distance to the mean.

    Distances are relative: ``||theta_i - mean|| / ||mean||``. Memory: one tensor per
    ingredient at a time.

    Example:
        >>> import torch
        >>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> ings = open_ingredients([a, b])
        >>> sim, dist = weight_similarity(ings)
        >>> sim[0][1], [round(d, 3) for d in dist]
        (0.0, [1.0, 1.0])
    """
    k = len(ingredients)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for name, meta in ingredients[0].layout().items():
        if not meta.is_floating or meta.numel == 0:
            continue
        flat = torch.stack([ing.tensor(name).reshape(-1).to(torch.float64) for ing in ingredients])
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    cosine = gram / norms[:, None] / norms[None, :]
    mean_sq = gram.sum() / k**2
    dist_sq = gram.diagonal() - 2 * gram.sum(1) / k + mean_sq
    distances = (dist_sq.clamp_min(0).sqrt() / mean_sq.sqrt().clamp_min(1e-300)).tolist()
    return [[round(float(x), 6) for x in row] for row in cosine], distances


def _path_alphas(alphas: Sequence[float]) -> list[float]:
    """The points of an interpolation path: ``alphas`` checked to lie in [0, 1], sorted,
    with both ends added (the barrier is measured against the line between them).

    Example:
        >>> _path_alphas([0.5, 0.25])
        [0.0, 0.25, 0.5, 1.0]
    """
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a <= 1:
            raise ConfigError(f"alphas: {a!r} is not a number in [0, 1]")
    return sorted({0.0, 1.0, *map(float, alphas)})


def barrier(alphas: Sequence[float], scores: Sequence[float], higher_is_better: bool) -> float:
    """How far the path falls below the straight line between its endpoints (>= 0);
    ``alphas`` run from 0 to 1, in order.

    Example:
        >>> round(barrier([0, 0.5, 1], [0.9, 0.1, 0.8], True), 6)
        0.75
    """
    if list(alphas[:1]) + list(alphas[-1:]) != [0, 1] or list(alphas) != sorted(alphas):
        raise ConfigError(f"alphas {list(alphas)} must run from 0 to 1 in order")
    if not all(math.isfinite(s) for s in scores):
        raise EvaluationError(f"the path's scores {list(scores)} are not all finite numbers")
    a0, a1 = scores[0], scores[-1]
    worst = 0.0
    for alpha, s in zip(alphas, scores):
        line = (1 - alpha) * a0 + alpha * a1
        gap = line - s if higher_is_better else s - line
        worst = max(worst, gap)
    return worst


@dataclass
class Diagnosis:
    """What :func:`diagnose` found, and its verdict."""

    labels: list[str]
    individual: list[float]
    similarity: list[list[float]]
    distance_to_mean: list[float]
    alphas: list[float]
    paths: dict[str, list[float]]
    barriers: dict[str, float]
    has_batchnorm: bool
    soupable: bool
    verdict: str
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def diagnose(
    ingredients: Sequence[Any],
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    held_out: Evaluator | Callable,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tolerance: float | None = None,
    recalibrate: Callable[[torch.nn.Module], None] | None = None,
    output: str | Path | None = None,
    checkpoint_key: str | None = None,
    base: str | Path | None = None,
    journal: Journal | str | Path | None = None,
    progress: bool = False,
    device: str = "cpu",
    labels: Sequence[str | None] | None = None,
) -> Diagnosis:
    """Measure similarity and interpolation barriers; say whether a soup can work.

    ``tolerance`` is the largest barrier still called one basin (default: 5% of the
    best ingredient's score). With ``output``, writes ``diagnosis.json``,
    ``similarity.png`` and ``interpolation.png`` there. With ``journal`` (a cook's
    ``journal.jsonl``, or a :class:`~modelsoup.journal.Journal`), scores the cook
    already recorded (each ingredient's own, and any soup on the paths) are reused, and
    new ones are recorded for the next cook. ``labels`` names the
    ingredients, one per entry (as in :func:`~modelsoup.cook.run.cook`). ``base`` is the
    base of LoRA adapter ingredients.

    Example:
        >>> import torch
        >>> ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 1.2)]
        >>> d = diagnose(ings, torch.nn.Linear(1, 1, bias=False),
        ...              lambda m: 1 - abs(float(m.weight.detach()) - 1.1))
        >>> d.soupable
        True
    """
    from modelsoup.repair.batchnorm import has_batchnorm

    alphas = _path_alphas(alphas)
    if output is not None and Path(output).exists() and not Path(output).is_dir():
        raise ConfigError(f"{output}: the diagnosis goes in a folder, but this is a file")
    blocker = None if output is None else file_in_the_way(Path(output))
    if blocker is not None:
        raise ConfigError(f"{output}: {blocker} is a file, not a folder; choose another output")
    pool = open_ingredients(ingredients, key=checkpoint_key, labels=labels, base=base)
    if output is not None:  # nothing is written among the inputs (nor beside their files)
        for name in ("", *DIAGNOSIS_FILES):
            check_not_input(pool, Path(output) / name)
        check_cook_folder(Path(output), DIAGNOSIS_FILES)  # a user's own diagnosis.json
    if len(pool) < 2:
        raise ConfigError(
            f"diagnose compares ingredients: it needs two or more, and found {len(pool)} "
            f"({', '.join(ing.label for ing in pool)})"
        )
    module = build_model(model)
    module.to(check_device(device))
    evaluator = as_evaluator(held_out)
    if journal is not None and not isinstance(journal, Journal):
        journal = Journal(journal)
    taster = Taster(
        pool,
        module,
        evaluator,
        journal=journal,
        recalibrate=recalibrate,
        recalibrate_candidates=recalibrate is not None,
        progress=progress,
    )
    individual = taster.individual_scores()
    best = taster.best(individual)
    similarity, distances = weight_similarity(pool)
    paths, barriers = {}, {}
    hib = evaluator.higher_is_better
    for i in range(len(pool)):
        if i == best:
            continue
        scores = []
        for a in alphas:
            w = [0.0] * len(pool)
            w[best] += 1 - a
            w[i] += a
            scores.append(taster.score(w))
        key = f"{pool[best].label} -> {pool[i].label}"
        paths[key] = scores
        barriers[key] = barrier(alphas, scores, hib)
    tol = tolerance if tolerance is not None else 0.05 * abs(individual[best])
    bn = has_batchnorm(module)
    worst = max(barriers.values(), default=0.0)
    off_diag = [similarity[i][j] for i in range(len(pool)) for j in range(len(pool)) if i != j]
    mean_cos = sum(off_diag) / len(off_diag) if off_diag else 1.0
    soupable = worst <= tol
    facts = (
        f"mean cosine similarity {mean_cos:.4f}, largest barrier {worst:.4g} (tolerance {tol:.4g})"
    )
    advice = []
    if soupable:
        verdict = f"these look fine-tuned from one start: soup away ({facts})"
    else:
        verdict = (
            f"independent basins: a uniform soup will collapse ({facts}); "
            "use align + recalibrate_bn, or greedy (which keeps only what helps)"
        )
        advice.append(
            "align: true in the cook config (or modelsoup align) to permute hidden units"
            + ("; align: merge_many for a soup of more than two" if len(pool) > 2 else "")
        )
    if bn:
        advice.append(
            "the model has BatchNorm: averaged weights need fresh statistics; "
            "set recalibrate_bn in the cook config"
        )
    result = Diagnosis(
        [p.label for p in pool],
        individual,
        similarity,
        distances,
        list(alphas),
        paths,
        barriers,
        bn,
        soupable,
        verdict,
        advice,
    )
    if output is not None:
        with held_output(Path(output), DIAGNOSIS_FILES):
            write_diagnosis(result, Path(output))
    return result


def write_diagnosis(d: Diagnosis, folder: Path) -> list[Path]:
    """Write ``diagnosis.json`` and the two figures into ``folder``."""
    from modelsoup.cook import plots

    folder.mkdir(parents=True, exist_ok=True)
    json_name, heatmap_name, curves_name = DIAGNOSIS_FILES
    with atomic_file(folder / json_name) as tmp:
        tmp.write_text(json.dumps(d.to_dict(), indent=2))
    made = [folder / json_name]
    if len(d.labels) > 1:
        made.append(
            plots.plot_similarity_heatmap(d.similarity, d.labels, path=folder / heatmap_name)
        )
    if d.paths:
        curves = {k: (d.alphas, v) for k, v in d.paths.items() if all(map(math.isfinite, v))}
        made.append(
            plots.plot_interpolation(curves, path=folder / curves_name, ylabel="held-out score")
        )
    return made
