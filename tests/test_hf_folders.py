"""Hugging Face folders that disagree beyond their weights: tied heads, tokenizers and
checkpoint names that transformers converts on load. Tiny models built in tmp_path."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from modelsoup.accumulator import Accumulator  # noqa: E402
from modelsoup.cli import main  # noqa: E402
from modelsoup.errors import IncompatibleIngredientsError, SoupWarning  # noqa: E402
from modelsoup.hf import load_architecture  # noqa: E402
from modelsoup.ingredients import open_ingredients  # noqa: E402
from modelsoup.soup import Soup  # noqa: E402


def _llama_config(tie: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def tied_and_untied(tmp_path):
    """ft0: config ties the head, its file stores lm_head too (equal); ft1: untied."""
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(_llama_config(tie=True))
    folders = []
    for i, tie in enumerate([True, False]):
        m = transformers.LlamaForCausalLM(_llama_config(tie))
        m.load_state_dict(start.state_dict(), strict=False)
        if not tie:
            with torch.no_grad():
                m.lm_head.weight.copy_(m.model.embed_tokens.weight)
        _perturbed(m, i).save_pretrained(tmp_path / f"ft{i}")
        if tie:
            path = tmp_path / f"ft{i}" / "model.safetensors"
            sd = load_file(path)
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
            save_file(sd, path, metadata={"format": "pt"})
        folders.append(tmp_path / f"ft{i}")
    return folders


def test_ingredients_that_disagree_on_tie_word_embeddings_are_warned(tied_and_untied):
    with pytest.warns(SoupWarning, match="tie_word_embeddings True vs False"):
        open_ingredients(tied_and_untied)
    with pytest.raises(IncompatibleIngredientsError, match="tie_word_embeddings"):
        open_ingredients(tied_and_untied, strict=True)


def test_differing_copies_of_a_tied_tensor_are_refused_when_written(tied_and_untied):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        ings = open_ingredients(tied_and_untied)
    model = load_architecture(tied_and_untied[0])  # tied: head and embeddings are one
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = r"ft1 stores 'model.embed_tokens.weight' and 'lm_head.weight' with different"
    with pytest.raises(IncompatibleIngredientsError, match=expected):
        Soup(ings, [1, 1]).apply(model)
    acc = Accumulator(ings)
    acc.add(0)
    with pytest.raises(IncompatibleIngredientsError, match=expected):
        acc.write_into(model)
    with pytest.raises(IncompatibleIngredientsError, match=expected):
        acc.write_into_with(model, 1)
    # ft0's two copies are equal: it alone is written, and both names read it back
    Soup(ings[:1], [1]).apply(model)
    stored = load_file(tied_and_untied[0] / "model.safetensors")
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])


def _llama_folders(tmp_path, second_differs: bool):
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(_llama_config())
    for i in range(2):
        m = transformers.LlamaForCausalLM(_llama_config())
        m.load_state_dict(start.state_dict())
        if i == 1 and second_differs:
            m.generation_config.eos_token_id = 3
        _perturbed(m, i).save_pretrained(tmp_path / f"ft{i}")
        (tmp_path / f"ft{i}" / "tokenizer_config.json").write_text(json.dumps({"x": 1}))
    if second_differs:
        (tmp_path / "ft1" / "chat_template.jinja").write_text("{{ messages }}")
    return [tmp_path / "ft0", tmp_path / "ft1"]


def test_tokenizer_and_generation_files_that_differ_are_warned(tmp_path):
    folders = _llama_folders(tmp_path, second_differs=True)
    with pytest.warns(SoupWarning) as caught:
        open_ingredients(folders)
    text = " ".join(str(w.message) for w in caught)
    assert "ft1 and ft0 differ in chat_template.jinja, generation_config.json" in text
    assert "config.json," not in text.replace("generation_config.json,", "")
    assert "tokenizer_config.json" not in text  # the same in both
    with pytest.raises(IncompatibleIngredientsError, match="chat_template.jinja"):
        open_ingredients(folders, strict=True)
    # the CLI warns, whichever comes first, and says whose copy the soup gets
    assert main(["average", str(folders[1]), str(folders[0]), "-o", str(tmp_path / "s")]) == 0


def test_same_files_saved_by_another_transformers_version_are_not_warned(tmp_path):
    folders = _llama_folders(tmp_path, second_differs=False)
    gen = folders[1] / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "transformers_version": "4.0"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupWarning)
        open_ingredients(folders)


def _vit_folders(tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    for i in range(2):
        _perturbed(transformers.ViTForImageClassification(cfg), i).save_pretrained(
            tmp_path / f"vit{i}"
        )
    return [tmp_path / "vit0", tmp_path / "vit1"]


def test_checkpoint_names_transformers_converts_on_load_are_refused_up_front(tmp_path):
    folders = _vit_folders(tmp_path)
    stored = set(load_file(folders[0] / "model.safetensors"))
    module = set(transformers.ViTForImageClassification.from_pretrained(folders[0]).state_dict())
    if stored == module:
        pytest.skip("this transformers stores ViT tensors under the module's names")
    with pytest.raises(IncompatibleIngredientsError, match="converts on load; model: hf cannot"):
        load_architecture(folders[0])
    # a plain average needs no module, and stays right
    out = tmp_path / "soup"
    assert main(["average", *map(str, folders), "-o", str(out)]) == 0
    soup = load_file(out / "model.safetensors")
    a, b = (load_file(f / "model.safetensors") for f in folders)
    assert set(soup) == stored
    for name in stored:
        torch.testing.assert_close(soup[name], (a[name] + b[name]) / 2)
