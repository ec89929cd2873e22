"""Merge rules: how the members of a soup become one set of weights, one file each.

``linear`` (the weighted average, the default), ``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, ``slerp``, ``model_stock`` and ``wise_ft``; the rules
that work on task vectors need a base model (the pretrained start). Rules are
registered by name (:mod:`.registry`) and applied per tensor, streamed
(:mod:`.stream`). See docs/merge-rules.md for the formulas and their costs.

Example:
    >>> sorted(RULES)[:3]
    ['dare_linear', 'dare_ties', 'linear']
"""

from modelsoup.merge import (  # noqa: F401  (each module registers its rule)
    dare,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    wise_ft,
)
from modelsoup.merge.registry import (
    RULES,
    MergeOptions,
    MergeSpec,
    Piece,
    RuleSpec,
    as_merge,
    check_base,
    check_members,
    get_rule,
    register_rule,
)
from modelsoup.merge.stream import merged_pieces

__all__ = [
    "RULES",
    "MergeOptions",
    "MergeSpec",
    "Piece",
    "RuleSpec",
    "as_merge",
    "check_base",
    "check_members",
    "get_rule",
    "merged_pieces",
    "register_rule",
]
