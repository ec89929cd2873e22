"""Soups while training: callbacks for training loops that cook their checkpoints.

:class:`SoupCallback` (Hugging Face ``Trainer``) keeps the run's checkpoints as
ingredients and, when training ends, cooks a recipe (greedy by default; ``lawa`` for
the last k checkpoints) on the Trainer's eval data, writing the soups and the report to
``output_dir/soup/``. :class:`LightningSoupCallback` does the same for a Lightning
``Trainer`` at the end of ``fit``, choosing by a metric the module's validation loop
logs, and writes to ``default_root_dir/soup/``. Each framework is imported only when
its callback is first used.

Example:
    >>> import modelsoup.integrations
    >>> sorted(modelsoup.integrations.__all__)
    ['LightningSoupCallback', 'SoupCallback']
"""

from typing import Any

__all__ = ["LightningSoupCallback", "SoupCallback"]


def __getattr__(name: str) -> Any:
    if name == "SoupCallback":  # a TrainerCallback: defining it imports transformers
        from modelsoup.integrations.hf_trainer import SoupCallback

        return SoupCallback
    if name == "LightningSoupCallback":  # a Lightning Callback: defining it imports lightning
        from modelsoup.integrations.lightning import LightningSoupCallback

        return LightningSoupCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
