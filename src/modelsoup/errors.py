"""The one small hierarchy of errors modelsoup raises.

Every message says what went wrong, where (file, tensor, key) and what to do
about it. The command line prints ``error: <message>`` and exits with code 2
for any :class:`SoupError`.

Example:
    >>> from modelsoup.errors import SoupError, IngredientError
    >>> try:
    ...     raise IngredientError("a.pt: file not found; check the path")
    ... except SoupError as err:
    ...     print(err)
    a.pt: file not found; check the path
"""

from __future__ import annotations


class SoupError(Exception):
    """Base class of every error modelsoup raises on purpose."""


class IngredientError(SoupError):
    """A checkpoint is missing, corrupt, truncated, unsafe or of unknown format."""


class IncompatibleIngredientsError(SoupError):
    """Ingredients differ in tensor names, shapes or integer buffers."""


class ConfigError(SoupError):
    """A bad option, weight, recipe setting or config file key."""


class WriteError(SoupError):
    """An output cannot be written (it would overwrite an input, or the disk failed)."""


class EvaluationError(SoupError):
    """An evaluator failed or returned something that is not a finite score."""


class MemoryBudgetError(SoupError):
    """A job would need more memory than the budget the user allowed."""


class AlignmentError(SoupError):
    """Permutation alignment cannot handle a model (names the module)."""


class SoupWarning(UserWarning):
    """Something legal but suspicious: a duplicated ingredient, a collapsing soup."""
