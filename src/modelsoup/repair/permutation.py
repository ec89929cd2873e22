"""Permutation alignment of independently trained networks (Git Re-Basin).

One import path for the three parts: :mod:`modelsoup.repair.spec` (what may be
permuted), :mod:`modelsoup.repair.trace` (derive that from a model) and
:mod:`modelsoup.repair.matching` (find the permutations, Ainsworth et al. 2023).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> spec = trace_permutation_spec(net, torch.randn(1, 4))
    >>> aligned = align_to(net.state_dict(), net.state_dict(), spec)
    >>> all(torch.equal(aligned[k], v) for k, v in net.state_dict().items())
    True
"""

from modelsoup.repair.matching import align_ingredients, align_to, weight_matching
from modelsoup.repair.spec import PermutationSpec, permute_state_dict
from modelsoup.repair.trace import trace_permutation_spec

__all__ = [
    "PermutationSpec",
    "align_ingredients",
    "align_to",
    "permute_state_dict",
    "trace_permutation_spec",
    "weight_matching",
]
