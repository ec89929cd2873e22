"""What a cook returns: one :class:`MethodResult` per report row, in a :class:`CookResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsoup.ingredients import Ingredient
from modelsoup.recipes.ensemble import Ensemble
from modelsoup.soup import Soup


@dataclass
class MethodResult:
    """One row of the report: a recipe's result(s) and their scores.

    ``runs`` holds one result per run (several for random orders); the first is the
    one saved. Scores are means over runs; ``*_std`` their standard deviation.
    """

    label: str
    recipe: str
    runs: list[Soup | Ensemble]
    held_out: float
    test: float | None = None
    held_out_std: float | None = None
    test_std: float | None = None
    size: float = 0
    evaluations: int = 0
    reused: int = 0
    seconds: float = 0.0
    test_per_example: Any = None
    test_runs: list[float] = field(default_factory=list)
    saved: str | None = None

    @property
    def result(self) -> Soup | Ensemble:
        return self.runs[0]

    @property
    def is_soup(self) -> bool:
        return isinstance(self.result, Soup)


@dataclass
class CookResult:
    """Everything a cook produced; :mod:`modelsoup.cook.report` turns it into files."""

    methods: list[MethodResult]
    ingredients: list[Ingredient]
    individual_held_out: list[float]
    individual_test: list[float] | None
    held_out_name: str
    test_name: str | None
    higher_is_better: bool
    taster_stats: dict
    seconds: float
    output: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: the score columns ("held_out", "test") that are mean token negative
    #: log-likelihoods: the report shows their perplexity, exp(score), too
    perplexity_columns: list[str] = field(default_factory=list)
    #: the test evaluator's direction when it differs from the held-out one's (a held-out
    #: accuracy chooses, a test loss judges); ``None``: the same
    test_higher_is_better: bool | None = None
    #: what ``report.json`` holds (set when the report is written): the one summary that
    #: the report files and the CLI's printed verdict both come from
    summary: dict | None = None

    def method(self, label: str) -> MethodResult:
        for m in self.methods:
            if m.label == label:
                return m
        raise KeyError(label)
