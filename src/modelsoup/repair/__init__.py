"""Repairs that make soups of BatchNorm or independently trained networks work.

* :func:`recalibrate_bn` re-estimates BatchNorm statistics after averaging;
  :func:`recalibrate_soup` does it for a soup and keeps them for saving.
* :func:`trace_permutation_spec`, :func:`weight_matching`, :func:`align_to`
  permute hidden units so independently trained networks can be averaged
  (Git Re-Basin weight matching, Ainsworth et al. 2023); :func:`merge_many`
  aligns k networks to each other rather than to one reference;
  :func:`activation_align` matches units by what they compute on real inputs.

Example:
    >>> from modelsoup.repair import has_batchnorm
    >>> from torch import nn
    >>> has_batchnorm(nn.BatchNorm1d(3))
    True
"""

from modelsoup.repair.activations import activation_align, activation_matching
from modelsoup.repair.batchnorm import (
    has_batchnorm,
    keep_bn_statistics,
    recalibrate_bn,
    recalibrate_soup,
)
from modelsoup.repair.matching import align_ingredients, align_to, merge_many, weight_matching
from modelsoup.repair.spec import PermutationSpec, permute_state_dict
from modelsoup.repair.trace import trace_permutation_spec

__all__ = [
    "PermutationSpec",
    "activation_align",
    "activation_matching",
    "align_ingredients",
    "align_to",
    "has_batchnorm",
    "keep_bn_statistics",
    "merge_many",
    "permute_state_dict",
    "recalibrate_bn",
    "recalibrate_soup",
    "trace_permutation_spec",
    "weight_matching",
]
