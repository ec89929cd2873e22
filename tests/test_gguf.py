"""Llama GGUF files read into Hugging Face folders (``modelsoup.hf.gguf``).

A tiny random Llama is written as GGUF the way llama.cpp's converter lays it out (query
and key rows interleaved per head, written here from that definition), then read back:
the tensors must equal the model's own, and transformers' GGUF loader must agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from modelsoup.errors import ConfigError  # noqa: E402
from modelsoup.hf.gguf import gguf_to_folder, hf_name, read_gguf_llama  # noqa: E402

HEADS, KV_HEADS, HIDDEN, LAYERS, VOCAB = 4, 2, 64, 2, 96


def tiny_llama(tied: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout: row p * half + j of each head is stored at row 2 j + p."""
    rows = weight.shape[0]
    head_dim, half = rows // heads, rows // heads // 2
    index = np.empty(rows, dtype=np.int64)
    for h in range(heads):
        for j in range(half):
            for p in range(2):
                index[h * head_dim + 2 * j + p] = h * head_dim + p * half + j
    return weight[index]


GGUF_OF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model, path, *, arch="llama", quantize=None, extra=None, vocab=True):
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    extra = dict(extra or {})  # a key in extra replaces the writer's own
    kv_key, rope_key = f"{arch}.attention.head_count_kv", f"{arch}.rope.dimension_count"
    extra.setdefault(kv_key, cfg.num_key_value_heads)
    extra.setdefault(rope_key, cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if vocab:  # transformers' reader wants a vocabulary
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
        writer.add_token_types([1] * cfg.vocab_size)
        writer.add_token_merges([])
    for key, value in extra.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    tied = cfg.tie_word_embeddings
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        short = name.removeprefix("model.layers.")
        if short != name:
            block, rest = short.split(".", 1)
            gguf_name = f"blk.{block}.{GGUF_OF[rest]}"
        else:
            gguf_name = GGUF_OF[name]
        array = value.numpy().copy()
        if gguf_name.endswith("attn_q.weight"):
            array = interleave(array, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = interleave(array, cfg.num_key_value_heads)
        if quantize is not None and array.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, quantize), raw_dtype=quantize)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_a_float32_gguf_reads_back_as_the_model_it_was_written_from(tmp_path, tied):
    model = tiny_llama(tied)
    config, state = read_gguf_llama(write_gguf(model, tmp_path / "tiny.gguf"))
    expected = model.state_dict()
    if tied:
        expected.pop("lm_head.weight")
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == pytest.approx(1e-5)


def test_the_folder_loads_and_computes_what_the_model_computes(tmp_path):
    model = tiny_llama()
    folder = gguf_to_folder(
        write_gguf(model, tmp_path / "tiny.gguf"), tmp_path / "start", tokenizer=False
    )
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not list(tmp_path.glob(".start*"))  # no temporary left beside it


def test_quantized_tensors_match_transformers_gguf_loader(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    path = write_gguf(model, tmp_path / "q8.gguf", quantize=gguf.GGMLQuantizationType.Q8_0)
    _, state = read_gguf_llama(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, quantization_config=transformers.GgufConfig(dequantize=True)
    ).state_dict()
    for name, value in state.items():
        assert torch.equal(value, reference[name].float()), name
    # quantized, so not the model's own weights, but close to them
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    got = state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(got, q) and torch.allclose(got, q, atol=0.01)


def test_what_the_reader_cannot_turn_back_is_refused(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="architecture 'qwen2'"):
        read_gguf_llama(write_gguf(model, tmp_path / "q.gguf", arch="qwen2"))
    experts = write_gguf(model, tmp_path / "e.gguf", extra={"llama.expert_count": 8})
    with pytest.raises(ConfigError, match="expert_count"):
        read_gguf_llama(experts)
    with pytest.raises(ConfigError, match="no Llama counterpart"):
        hf_name("blk.0.ffn_gate_exps.weight")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        read_gguf_llama(tmp_path / "junk.gguf")


@pytest.mark.parametrize(
    "extra, match",
    [
        # llama.cpp scales linearly when only the factor is given
        ({"llama.rope.scaling.factor": 4.0}, "rope.scaling.factor"),
        ({"llama.rope.scale_linear": 2.0}, "rope.scale_linear"),
        ({"llama.attention.head_count_kv": [2, 1]}, "differs from block to block"),
        ({"llama.rope.dimension_count": 4}, "rope.dimension_count is 4 but the heads have 16"),
        ({"llama.attention.key_length": 8}, "rope.dimension_count is 16 but the heads have 8"),
    ],
)
def test_metadata_the_reader_would_drop_is_refused(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        read_gguf_llama(write_gguf(tiny_llama(), tmp_path / "m.gguf", extra=extra))


def test_settings_given_once_per_block_read_when_every_block_agrees(tmp_path):
    model = tiny_llama()
    kv = [model.config.num_key_value_heads] * model.config.num_hidden_layers
    path = write_gguf(model, tmp_path / "m.gguf", extra={"llama.attention.head_count_kv": kv})
    config, state = read_gguf_llama(path)
    assert config["num_key_value_heads"] == kv[0]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)


def test_a_gguf_missing_a_tensor_is_refused_not_filled_at_random(tmp_path):
    model = tiny_llama()
    state = model.state_dict()

    class Without:  # the model with one block's down projection left out
        config = model.config

        @staticmethod
        def state_dict():
            return {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}

    with pytest.raises(ConfigError, match="lacks model.layers.1.mlp.down_proj.weight"):
        read_gguf_llama(write_gguf(Without, tmp_path / "short.gguf"))


def test_a_truncated_gguf_is_refused(tmp_path):
    whole = write_gguf(tiny_llama(), tmp_path / "tiny.gguf").read_bytes()
    for cut in (20, len(whole) // 2, len(whole) - 10):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(ConfigError):
            read_gguf_llama(tmp_path / "cut.gguf")


def test_a_vocab_size_other_than_the_embedding_rows_is_refused(tmp_path):
    import copy

    model = tiny_llama()

    class Wider:  # llama.vocab_size says more tokens than token_embd has rows
        config = copy.deepcopy(model.config)
        state_dict = staticmethod(model.state_dict)

    Wider.config.vocab_size += 16
    with pytest.raises(ConfigError, match="vocab_size says .* but token_embd has"):
        read_gguf_llama(write_gguf(Wider, tmp_path / "wide.gguf", vocab=False))


@pytest.mark.parametrize(
    "setting, value, culprit",
    [
        ("num_key_value_heads", HEADS, "blk.0.attn_k.weight"),  # 4 kv heads said, 2 stored
        ("intermediate_size", 96, "blk.0.ffn_gate.weight"),
        ("hidden_size", 32, "token_embd.weight"),
    ],
)
def test_tensors_of_other_shapes_than_the_metadata_gives_are_refused(
    tmp_path, setting, value, culprit
):
    import copy

    model = tiny_llama()

    class Mislabelled:  # the model's tensors under metadata that gives them other shapes
        config = copy.deepcopy(model.config)
        state_dict = staticmethod(model.state_dict)

    setattr(Mislabelled.config, setting, value)
    path = write_gguf(Mislabelled, tmp_path / "bad.gguf", vocab=False)
    with pytest.raises(ConfigError, match=rf"tensor {culprit} is \[.*\] but the metadata"):
        read_gguf_llama(path)
    out = tmp_path / "folder"  # refused before the folder that would not load is written
    with pytest.raises(ConfigError, match="inconsistent, re-convert it"):
        gguf_to_folder(path, out, tokenizer=False)
    assert not out.exists()
