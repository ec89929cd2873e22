"""Soups while training: callbacks for training loops that cook their checkpoints.

:class:`SoupCallback` (Hugging Face ``Trainer``) keeps the run's checkpoints as
ingredients and, when training ends, cooks a recipe (greedy by default; ``lawa`` for
the last k checkpoints) on the Trainer's eval data, writing the soups and the report to
``output_dir/soup/``. transformers is imported only when the callback is first used.

Example:
    >>> import modelsoup.integrations
    >>> "SoupCallback" in modelsoup.integrations.__all__
    True
"""

from typing import Any

__all__ = ["SoupCallback"]


def __getattr__(name: str) -> Any:
    if name == "SoupCallback":  # a TrainerCallback: defining it imports transformers
        from modelsoup.integrations.hf_trainer import SoupCallback

        return SoupCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
