"""Layer-wise soups: average some groups of tensors, take the rest from the best ingredient.

Tensors are split into groups, in stored order. By default a group is a top-level
block found from the names (:func:`discover_groups`); ``groups`` gives regexes or
prefixes instead. Three variants:

- ``all``: average every group over every ingredient (the uniform soup);
- ``classifier``: average only the classifier head (the last group, or the tensors
  matching ``classifier``) and keep the body of the best ingredient;
- ``selective``: start from the best ingredient and, group by group in order, switch
  the group to the uniform average of all ingredients; keep the switch when the
  held-out score does not drop (``>=``, greedy soup's rule, Wortsman et al. 2022,
  Algorithm 1, applied to groups of tensors instead of ingredients). It never scores
  below the best ingredient on held-out.

Every tensor's coefficients go in :attr:`Soup.tensor_coefficients` (one-hot on the
best ingredient for "best", uniform for "averaged"); ``soup.options["groups"]`` records
each group's decision, and the trace records each step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from modelsoup.errors import ConfigError
from modelsoup.merge import MergeSpec
from modelsoup.recipes.registry import MergingOptions, register
from modelsoup.soup import Soup
from modelsoup.tasting import Taster


class LayerwiseOptions(MergingOptions):
    variant: Literal["all", "classifier", "selective"] = "selective"
    #: regexes or prefixes, one per group, tried in order; default: discovered blocks
    groups: list[str] | None = None
    #: regex or prefix of the classifier head (variant ``classifier``); default: last group
    classifier: str | None = None
    #: keep a switch only if it strictly improves held-out (``>``), not on ties
    strict: bool = False


def block_of(name: str) -> str:
    """The block a tensor belongs to, from its name alone.

    The rule: drop the last component (``weight``, ``bias``, ``running_mean``); the
    block is the shortest prefix ending in a numbered component (``layers.0``,
    ``encoder.layer.3``), so each numbered sub-block of a stack is its own block; with
    no numbered component, the first component (``embeddings``, ``fc1``, ``head``). A
    top-level tensor (``cls_token``) is its own block.

    Example:
        >>> block_of("encoder.layer.3.attention.self.query.weight")
        'encoder.layer.3'
        >>> block_of("fc2.bias"), block_of("features.0.weight"), block_of("cls_token")
        ('fc2', 'features.0', 'cls_token')
    """
    parts = name.split(".")
    if len(parts) == 1:
        return name
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def discover_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Tensor names grouped by :func:`block_of`, groups in order of first appearance.

    Example:
        >>> discover_groups(["emb.weight", "layers.0.w", "layers.1.w", "head.weight"])
        {'emb': ['emb.weight'], 'layers.0': ['layers.0.w'], 'layers.1': ['layers.1.w'], \
'head': ['head.weight']}
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(block_of(name), []).append(name)
    return groups


def _matches(pattern: str, name: str) -> bool:
    # A plain prefix such as "encoder.layer.1." works whether or not it is read as a regex.
    return name.startswith(pattern) or re.match(pattern, name) is not None


def pattern_groups(names: Sequence[str], patterns: Sequence[str]) -> dict[str, list[str]]:
    """Tensor names grouped by the first pattern (regex or prefix) each one matches.

    Every tensor must match some pattern, and every pattern some tensor; a final
    ``".*"`` catches the rest.

    Example:
        >>> pattern_groups(["a.w", "a.b", "b.w"], ["a\\\\.", ".*"])
        {'a\\\\.': ['a.w', 'a.b'], '.*': ['b.w']}
    """
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ConfigError(f"group pattern '{p}' is not a valid regex: {err}") from None
    groups: dict[str, list[str]] = {p: [] for p in patterns}
    unmatched = []
    for name in names:
        for p in patterns:
            if _matches(p, name):
                groups[p].append(name)
                break
        else:
            unmatched.append(name)
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (" ..." if len(unmatched) > 3 else "")
        raise ConfigError(
            f"{len(unmatched)} tensors match no group pattern ({shown}); "
            "add a catch-all pattern '.*' at the end"
        )
    empty = [p for p, members in groups.items() if not members]
    if empty:
        raise ConfigError(f"group pattern '{empty[0]}' matches no tensor; check its spelling")
    return groups


def tensor_groups(taster: Taster, patterns: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The taster's tensors in groups: by ``patterns`` if given, else discovered blocks.

    Example:
        >>> import copy, torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> taster = Taster(open_ingredients([net]), copy.deepcopy(net), lambda m: 0.0)
        >>> list(tensor_groups(taster))
        ['0', '2']
    """
    names = taster.ingredients[0].names()
    return pattern_groups(names, patterns) if patterns else discover_groups(names)


def layerwise_soup_of(
    taster: Taster, best: int, groups: dict[str, list[str]], averaged: set[str]
) -> Soup:
    """The soup with ``averaged`` groups uniform over all ingredients, the rest from ``best``.

    ``coefficients`` is the mean of the per-tensor coefficients (for the card); each
    tensor's own coefficients are in ``tensor_coefficients``.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"a.w": torch.zeros(1), "b.w": torch.zeros(1)},
        ...                          {"a.w": torch.ones(1), "b.w": torch.ones(1)}])
        >>> t = Taster(ings, torch.nn.Module(), lambda m: 0.0)
        >>> soup = layerwise_soup_of(t, 1, {"a": ["a.w"], "b": ["b.w"]}, {"a"})
        >>> soup.state_dict()
        {'a.w': tensor([0.5000]), 'b.w': tensor([1.])}
    """
    n = len(taster.ingredients)
    uniform = [1.0 / n] * n
    one_hot = [1.0 if i == best else 0.0 for i in range(n)]
    per_tensor = {}
    for group, names in groups.items():
        for name in names:
            per_tensor[name] = list(uniform if group in averaged else one_hot)
    mean = [sum(c[i] for c in per_tensor.values()) / len(per_tensor) for i in range(n)]
    return taster.soup(
        mean,
        recipe="layerwise",
        tensor_coefficients=per_tensor,
    )


def _head(groups: dict[str, list[str]], classifier: str | None) -> dict[str, list[str]]:
    """Split groups so the classifier head is exactly one group (the last by default)."""
    if classifier is None:
        return groups
    out: dict[str, list[str]] = {}
    head = []
    for group, names in groups.items():
        rest = [n for n in names if not _matches(classifier, n)]
        head += [n for n in names if _matches(classifier, n)]
        if rest:
            out[group] = rest
    if not head:
        raise ConfigError(f"classifier '{classifier}' matches no tensor; give the head's prefix")
    out[classifier] = head
    return out


def _bound(pool: Sequence[Any], options: LayerwiseOptions) -> int:
    """The start and the final soup; for ``selective``, one candidate per group
    (the final soup is then one of them)."""
    if options.variant != "selective":
        return 2
    names = pool[0].names()
    groups = pattern_groups(names, options.groups) if options.groups else discover_groups(names)
    return 1 + len(groups)


@register("layerwise", LayerwiseOptions, bound=_bound)
def layerwise_soup(
    taster: Taster,
    *,
    variant: str = "selective",
    groups: Sequence[str] | None = None,
    classifier: str | None = None,
    strict: bool = False,
    merge: Mapping | MergeSpec | None = None,
) -> Soup:
    """Layer-wise soup: average chosen groups of tensors, the rest from the best ingredient.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> def net(w0, w1):
        ...     return {"0.weight": torch.full((1, 1), w0), "1.weight": torch.full((1, 1), w1)}
        >>> ings = open_ingredients([net(1.0, 1.0), net(3.0, 5.0)])
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False),
        ...                             torch.nn.Linear(1, 1, bias=False))
        >>> score = lambda m: 5 - abs(m[0].weight.item() - 2) - abs(m[1].weight.item() - 5)
        >>> soup = layerwise_soup(Taster(ings, model, score))
        >>> soup.options["groups"], soup.scores["held_out"]
        ({'0': 'averaged', '1': 'best'}, 5.0)
    """
    with taster.merging(merge):
        return _layerwise_soup(
            taster, variant=variant, groups=groups, classifier=classifier, strict=strict
        )


def _layerwise_soup(
    taster: Taster,
    *,
    variant: str = "selective",
    groups: Sequence[str] | None = None,
    classifier: str | None = None,
    strict: bool = False,
) -> Soup:
    if variant not in ("all", "classifier", "selective"):
        raise ConfigError(f"variant '{variant}' is unknown; use all, classifier or selective")
    found = _head(tensor_groups(taster, groups), classifier if variant == "classifier" else None)
    names = list(found)
    scores = taster.individual_scores()
    best = taster.best(scores)
    best_label = taster.ingredients[best].label
    # The start is scored as the exact one-hot soup, not taken from the individual
    # scores: those come from the taster's running sum, whose add/remove rounding can
    # differ in the last bits, and "never below the start" must hold exactly.
    start = taster.score_soup(layerwise_soup_of(taster, best, found, set()))
    trace: list[dict] = [{"step": 0, "start": best_label, "score": start}]
    if variant == "all":
        averaged = set(names)
    elif variant == "classifier":
        averaged = {names[-1]}
    else:
        averaged = set()
        current = start
        for step, group in enumerate(names, start=1):
            candidate = layerwise_soup_of(taster, best, found, averaged | {group})
            score = taster.score_soup(candidate)
            accepted = taster.better(score, current, strict=strict)
            if accepted:
                averaged.add(group)
                current = score
            trace.append(
                {
                    "step": step,
                    "group": group,
                    "tensors": len(found[group]),
                    "score": score,
                    "accepted": accepted,
                    "best": current,
                }
            )
    soup = layerwise_soup_of(taster, best, found, averaged)
    final = taster.score_soup(soup)  # from the journal for ``selective``
    if variant != "selective":
        trace.append({"step": 1, "averaged": sorted(averaged), "score": final})
    soup.options = {
        "variant": variant,
        "patterns": list(groups) if groups else None,
        "classifier": classifier,
        "strict": strict,
        "best_ingredient": best_label,
        "groups": {g: "averaged" if g in averaged else "best" for g in names},
    }
    soup.trace = trace
    return soup.with_scores({"held_out": final})
