"""Cooking and reporting: the config, the run, its results, the report and its figures.

:func:`cook` runs recipes over one pool and compares them honestly;
:func:`cook_config` does it from a YAML config. :mod:`~modelsoup.cook.report`,
:mod:`~modelsoup.cook.plots` and :mod:`~modelsoup.cook.stats` turn the results into
``report.json``, ``report.md`` and figures; :mod:`~modelsoup.cook.diagnose` looks at a
pool before cooking.
"""

from modelsoup._util import slug
from modelsoup.cook.config import ConfigParts, CookConfig, CookOptions, resolve_parts
from modelsoup.cook.results import CookResult, MethodResult
from modelsoup.cook.run import BASELINES, cook, cook_config, default_label, entry_label

__all__ = [
    "BASELINES",
    "ConfigParts",
    "CookConfig",
    "CookOptions",
    "CookResult",
    "MethodResult",
    "cook",
    "cook_config",
    "default_label",
    "entry_label",
    "resolve_parts",
    "slug",
]
