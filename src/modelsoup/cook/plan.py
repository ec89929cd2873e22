"""What a cook would do, before it does it: ``modelsoup cook --dry-run``.

:func:`plan_cook` reads and checks a config as a cook would (import paths, data files,
the ingredients' headers and their compatibility), then stops: nothing is evaluated
and nothing is written. The plan lists the ingredients found, the recipes with their
options, and the most evaluations each can make. The counts are upper bounds:
recipes stop early (greedy keeps trying only while ingredients remain, pruned stops
after a pass that removes nothing), and scores already in the journal are reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsoup._util import check_device
from modelsoup.cook.config import CookConfig, check_test_data, load_config, resolve_parts
from modelsoup.cook.run import (
    _entries,
    check_align,
    check_output,
    check_recipes,
    check_soup_folders,
    entry_label,
)
from modelsoup.evaluators import LogitsEvaluator, as_evaluator
from modelsoup.formats.dispatch import takes_key
from modelsoup.ingredients import Ingredient, open_ingredient, open_ingredients
from modelsoup.recipes.registry import get_recipe


@dataclass
class PlannedRecipe:
    """One report row to come: its label, the options the config gave, how many runs,
    and the most held-out and test evaluations they make (``None``: no bound known)."""

    label: str
    name: str
    options: dict[str, Any]
    runs: int
    held_out: int | None
    test: int


@dataclass
class CookPlan:
    """What :func:`plan_cook` found; :meth:`describe` is what ``--dry-run`` prints."""

    ingredients: list[Ingredient]
    recipes: list[PlannedRecipe]
    has_test: bool
    output: Path
    notes: list[str] = field(default_factory=list)

    @property
    def held_out_total(self) -> int | None:
        """The most held-out evaluations: each ingredient's own score once, then the
        recipes' (``None`` if a recipe gives no bound)."""
        counts = [r.held_out for r in self.recipes]
        if any(c is None for c in counts):
            return None
        return len(self.ingredients) + sum(counts) + (2 if self._checks_collapse else 0)

    @property
    def test_total(self) -> int:
        """The most test evaluations: each ingredient's own test score, one per run."""
        if not self.has_test:
            return 0
        return len(self.ingredients) + sum(r.test for r in self.recipes)

    @property
    def _checks_collapse(self) -> bool:
        return any(r.name == "uniform" for r in self.recipes) and len(self.ingredients) > 1

    def describe(self) -> str:
        """The plan in plain lines.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> plan = CookPlan(open_ingredients([{"w": torch.ones(1)}, {"w": torch.zeros(1)}]),
            ...                 [PlannedRecipe("uniform", "uniform", {}, 1, 1, 1)], True,
            ...                 Path("out"))
            >>> [line for line in plan.describe().splitlines() if line.startswith("evaluations")]
            ['evaluations planned: at most 5 on held-out and 3 on test']
        """
        n = len(self.ingredients)
        lines = [f"ingredients ({n}):"]
        width = max(len(ing.label) for ing in self.ingredients)
        for ing in self.ingredients:
            where = str(ing.path) if ing.path is not None else "(in memory)"
            lines.append(f"  {ing.label:<{width}}  {where}")
        lines.append(f"recipes ({len(self.recipes)}), with the most evaluations each makes:")
        width = max(len(r.label) for r in self.recipes)
        for r in self.recipes:
            given = ", ".join(f"{k}={v}" for k, v in r.options.items()) or "defaults"
            held = "no bound known" if r.held_out is None else f"{r.held_out} held-out"
            test = f", {r.test} test" if self.has_test else ""
            lines.append(f"  {r.label:<{width}}  {held}{test}  ({r.name}: {given})")
        lines.append(f"  + each ingredient's own held-out score: {n}, shared by every recipe")
        if self.has_test:
            lines.append(f"  + each ingredient's own test score: {n}")
        if self._checks_collapse:
            lines.append(
                "  + 2 held-out, only if the uniform soup scores below every ingredient "
                "(to test whether the gap is noise)"
            )
        total = self.held_out_total
        held = "an unknown number" if total is None else f"at most {total}"
        test = f" and {self.test_total} on test" if self.has_test else ""
        lines.append(f"evaluations planned: {held} on held-out{test}")
        lines.extend(self.notes)
        lines.append(
            "These are upper bounds: recipes stop early, and scores already in the journal "
            f"({self.output / 'journal.jsonl'}) are reused. Nothing was evaluated or written."
        )
        return "\n".join(lines)


def plan_cook(config: CookConfig | str | Path) -> CookPlan:
    """Check a cook config and say what cooking it would do, without doing any of it.

    Example:
        >>> plan_cook("missing.yaml")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: missing.yaml: config file not found
    """
    if not isinstance(config, CookConfig):
        config = load_config(config)
    check_device(config.device)  # what the cook refuses first, the plan refuses too
    parts = resolve_parts(config)
    held = as_evaluator(parts.held_out)
    test = as_evaluator(parts.test) if parts.test is not None else None
    check_test_data(held, test)
    pool = open_ingredients(
        parts.ingredients, key=config.checkpoint_key, base=config.options().base
    )
    entries = _entries(config.recipes, config.baselines, isinstance(held, LogitsEvaluator))
    check_align(config, parts)
    base = parts.base
    if base is not None:
        key = config.checkpoint_key if takes_key(base) else None
        base = open_ingredient(base, label="base", key=key)
    check_recipes(entries, pool, base, writes=True, opts=config.options())
    check_output([*pool, base] if base is not None else pool, parts.output)
    check_soup_folders(entries, pool, parts.output, config.options())
    re_scored = config.recalibrate_bn is not None and not config.recalibrate_candidates
    planned = []
    for entry in entries:
        spec = get_recipe(entry.name)
        options = spec.check_options(entry.options())
        runs = getattr(options, "runs", 1)
        per_run = spec.bound(pool, options) if spec.bound is not None else None
        if per_run is not None and re_scored:
            per_run += 1  # the recalibrated soup is scored again
        held_out = None if per_run is None else runs * per_run
        planned.append(
            PlannedRecipe(entry_label(entry), entry.name, entry.options(), runs, held_out, runs)
        )
    notes = []
    if config.align:
        method = "reference" if config.align is True else config.align
        notes.append(
            f"align: {method}: the ingredients are aligned first (written under "
            f"{parts.output / 'aligned'}), then cooked"
        )
    return CookPlan(pool, planned, test is not None, parts.output, notes)
