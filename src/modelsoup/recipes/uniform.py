"""Uniform and weighted soups: :func:`average` needs no evaluation; the ``uniform`` recipe
scores the same soup on held-out for the report."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from modelsoup.accumulator import check_accum_dtype, warn_lost_precision
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.formats.dispatch import takes_key
from modelsoup.ingredients import Ingredient, adapters_base, open_ingredient, open_ingredients
from modelsoup.merge import MergeSpec, as_merge
from modelsoup.recipes.baselines import NoOptions
from modelsoup.recipes.registry import register
from modelsoup.soup import Soup, check_coefficients
from modelsoup.tasting import Taster


def average(
    sources: Sequence[str | Path | Mapping | torch.nn.Module | Ingredient],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    accum_dtype: str | torch.dtype = "float32",
    int_policy: str = "strict",
    key: str | None = None,
    strict: bool = False,
    base: str | Path | Mapping | torch.nn.Module | Ingredient | None = None,
    merge: str | Mapping | MergeSpec | None = None,
) -> Soup:
    """The uniform soup of ``sources``, or their weighted average with ``weights``.

    Weights must be finite and >= 0; they are normalised to sum to 1 unless
    ``normalize=False``. Checkpoints are opened lazily and checked for compatible
    names and shapes, and for equal integer tensors under ``int_policy="strict"``,
    before any arithmetic (:func:`~modelsoup.ingredients.check_compatible`); checkpoints
    that describe different architectures are warned about, or refused with ``strict``.
    ``merge`` picks another merge rule than the weighted average, e.g. ``{"rule":
    "ties", "density": 0.3}`` (see :mod:`modelsoup.merge`); ``base`` is the pretrained
    start that task vectors are taken from, checked for compatibility like an ingredient.
    LoRA adapter folders are mixed as weight changes over their base (``base``, or the
    local folder their config names).

    Example:
        >>> import torch
        >>> soup = average([{"w": torch.zeros(1)}, {"w": torch.ones(1)}], weights=[1, 3])
        >>> soup.state_dict()["w"]
        tensor([0.7500])
        >>> ta = average([{"w": torch.full((1,), 3.0)}], base={"w": torch.ones(1)},
        ...              merge={"rule": "task_arithmetic", "lambda": 0.5})
        >>> ta.state_dict()["w"]
        tensor([2.])
    """
    # a base given as a path is also the base of any LoRA adapter folders among sources
    adapter_base = base if isinstance(base, str | Path) else None
    ingredients = open_ingredients(
        sources, key=key, int_policy=int_policy, strict=strict, base=adapter_base
    )
    if base is not None:
        base = open_ingredient(base, label="base", key=key if takes_key(base) else None)
        rule = as_merge(merge)
        if not rule.needs_base and adapters_base(ingredients) is None:
            kind = "the weighted average" if rule.is_average else f"merged by {rule.rule}"
            warnings.warn(
                f"the base model{f' {base.path}' if base.path else ''} is not used: only "
                "merge rules on task "
                "vectors (--merge task_arithmetic, ties, ...) and WiSE-FT (--alpha) read it, "
                f"and this soup is {kind}",
                SoupWarning,
                stacklevel=2,
            )
    if weights is None:
        coefs = [1.0] * len(ingredients)
        recipe = "uniform"
    else:
        coefs = check_coefficients(weights, len(ingredients))
        recipe = "weighted"
    members = [ing.label for ing, c in zip(ingredients, coefs) if c > 0]
    spec = as_merge(merge)
    if spec.spec.members is not None and len({c for c in coefs if c > 0}) > 1:
        warnings.warn(
            f"{spec.rule} does not use the members' weights ({', '.join(map(str, weights))}): "
            f"its own option mixes them (--t); the weights only say which members take part",
            SoupWarning,
            stacklevel=2,
        )
    rule = spec.rule
    if not normalize and rule in ("ties", "dare_ties"):
        raise ConfigError(
            f"--no-normalize (normalize=False) has no effect on {rule}: its disjoint mean "
            "divides by the agreeing weights whatever their sum; drop it, or use "
            "task_arithmetic or dare_linear to sum the task vectors as weighted"
        )
    if len(members) == 1 and as_merge(merge).is_average:  # other rules use a base: no copy
        why = "it is the only ingredient" if len(ingredients) == 1 else "only it has weight > 0"
        warnings.warn(
            f"this soup is a copy of {members[0]}, not an average ({why}); give two or "
            "more ingredients to average",
            SoupWarning,
            stacklevel=2,
        )
    warn_lost_precision(ingredients[0].layout(), check_accum_dtype(accum_dtype))
    return Soup(
        ingredients,
        coefs,
        recipe=recipe,
        options={"normalize": normalize},
        accum_dtype=check_accum_dtype(accum_dtype),
        int_policy=int_policy,
        merge=merge,
        base=base,
    )


@register("uniform", NoOptions, bound=lambda pool, o: 1)
def uniform_soup(taster: Taster) -> Soup:
    """The uniform soup of every ingredient, with its held-out score.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"weight": torch.full((1, 1), v)} for v in (0.0, 1.0)])
        >>> t = Taster(ings, torch.nn.Linear(1, 1, bias=False), lambda m: float(m.weight.detach()))
        >>> uniform_soup(t).scores["held_out"]
        0.5
    """
    n = len(taster.ingredients)
    score = taster.score_members(list(range(n)))
    return taster.soup(
        [1.0] * n,
        recipe="uniform",
        scores={"held_out": score},
    )
