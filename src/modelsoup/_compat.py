"""Old module paths, kept working after the layout of 0.2 moved them.

``import modelsoup.report`` (and every ``from modelsoup.<old> import name``) gives the
module at its new home; nothing is copied. The table is the record of what moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old module path -> new module path
MOVED = {
    "modelsoup.config": "modelsoup.cook.config",
    "modelsoup.report": "modelsoup.cook.report",
    "modelsoup.plots": "modelsoup.cook.plots",
    "modelsoup.stats": "modelsoup.cook.stats",
    "modelsoup.diagnose": "modelsoup.cook.diagnose",
    "modelsoup.training": "modelsoup.demo.training",
    "modelsoup.datasets": "modelsoup.demo.datasets",
    "modelsoup.models": "modelsoup.demo.models",
    "modelsoup.repair.permutation": "modelsoup.repair.matching",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed at its new home


def install() -> None:
    """Make the old paths importable (idempotent).

    Example:
        >>> install()
        >>> import importlib
        >>> importlib.import_module("modelsoup.report").__name__
        'modelsoup.cook.report'
    """
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
