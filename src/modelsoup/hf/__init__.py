"""Hugging Face models without code: the architecture from ``config.json``, built-in evaluators.

With ``model: hf`` a cook config builds the model from the first ingredient folder's
``config.json`` through transformers: the head is ``task:`` when the config gives one,
else the class ``config.json``'s ``architectures`` names (a causal LM, a sequence or
token classifier, a masked LM, ...). ``held_out``/``test`` may name a built-in evaluator
on a local file, tokenized by the first ingredient folder's tokenizer:

- ``{hf_text_classification: held.csv}``: accuracy (or loss) of a sequence classifier
  (:mod:`modelsoup.hf.classification`);
- ``{hf_causal_lm_loss: held.txt}`` (alias ``perplexity``): mean token negative
  log-likelihood of a causal LM, with perplexity in the report
  (:mod:`modelsoup.hf.language`);
- ``{hf_multiple_choice: mc.jsonl}``: accuracy of picking the most likely choice.

A llama.cpp GGUF file of a Llama-family model becomes such a folder with
:func:`~modelsoup.hf.gguf.gguf_to_folder` (:mod:`modelsoup.hf.gguf`).

Everything is read from local folders; nothing is fetched from a hub, and code shipped
with a checkpoint runs only when the config says ``trust_remote_code: true``.

transformers is an optional extra (``pip install 'modelsoup[hf]'``): it is imported
inside the functions here, never when modelsoup itself is imported.

Example config::

    model: hf
    ingredients: [runs/*/]                 # HF folders saved by save_pretrained
    held_out: {hf_causal_lm_loss: data/held.txt, max_length: 256}
    test: {hf_causal_lm_loss: data/test.jsonl}
    output: soups/
"""

from modelsoup.hf.classification import (
    TextClassificationData,
    label_ids,
    read_examples,
    text_classification,
)
from modelsoup.hf.gguf import gguf_to_folder, read_gguf_llama
from modelsoup.hf.language import (
    CausalLMLoss,
    CausalLMLossData,
    MultipleChoice,
    MultipleChoiceData,
    causal_lm_loss,
    multiple_choice,
    read_documents,
)
from modelsoup.hf.models import (
    TASKS,
    auto_class_name,
    load_architecture,
    load_tokenizer,
    model_factory,
    model_folder,
    require_transformers,
)

__all__ = [
    "TASKS",
    "CausalLMLoss",
    "CausalLMLossData",
    "MultipleChoice",
    "MultipleChoiceData",
    "TextClassificationData",
    "auto_class_name",
    "causal_lm_loss",
    "gguf_to_folder",
    "label_ids",
    "load_architecture",
    "load_tokenizer",
    "model_factory",
    "model_folder",
    "multiple_choice",
    "read_documents",
    "read_examples",
    "read_gguf_llama",
    "require_transformers",
    "text_classification",
]
