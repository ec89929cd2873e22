"""Readers and writers, one file per checkpoint format.

A reader is a :class:`~modelsoup.formats.base.TensorSource`: it lists tensor names
and their shape and dtype without loading anything, and reads one tensor on demand.

Example:
    >>> import torch
    >>> from modelsoup.formats import DictSource
    >>> src = DictSource({"w": torch.ones(2)}, label="demo")
    >>> src.names(), src.meta("w").shape
    (['w'], (2,))
"""

from modelsoup.formats.base import DictSource, TensorMeta, TensorSource
from modelsoup.formats.hf_folder import open_folder
from modelsoup.formats.safetensors_io import SafetensorsSource, write_safetensors
from modelsoup.formats.torch_pickle import TorchSource, write_torch

__all__ = [
    "DictSource",
    "SafetensorsSource",
    "TensorMeta",
    "TensorSource",
    "TorchSource",
    "open_folder",
    "write_safetensors",
    "write_torch",
]
