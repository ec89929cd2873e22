"""Llama-family causal LMs from a GGUF file, as an ordinary Hugging Face folder.

llama.cpp's GGUF files hold a model's weights (often quantized) and its settings.
transformers reads them (``from_pretrained(dir, gguf_file=..., quantization_config=
GgufConfig(dequantize=True))``), but slowly: SmolLM2-135M's 100 MB file took 22 s there,
most of it outside the dequantization. Here the file is read once with the ``gguf``
package (the ``lm`` extra), every tensor dequantized to float32 by its own codec, and the
names and layout turned back into those of transformers' ``LlamaForCausalLM``: about 4 s
for the same file, giving the same tensors bit for bit.

Only the ``llama`` architecture is read (Llama, SmolLM2, Mistral-style dense models).
What this reader does not know how to turn back (another architecture, experts, RoPE
scaling, a tensor it has no name for) is refused with a :class:`ConfigError`: a model
that loads but computes something else would be a silently wrong start.

The one layout change: llama.cpp stores the query and key projections with each head's
rows interleaved in pairs (its rotary embedding rotates adjacent entries), where
transformers rotates the first half of each head against the second half. Reading
undoes that interleaving, head by head.
"""

from __future__ import annotations

import logging
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from modelsoup._util import check_replaceable, replace_folder, temp_sibling
from modelsoup.errors import ConfigError
from modelsoup.hf.models import require_transformers

_logger = logging.getLogger(__name__)

#: GGUF names outside the blocks, and the transformers names they become
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

#: GGUF names inside block ``N`` (``blk.N.<name>``), and their transformers names
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "reading a GGUF file needs the gguf package: install modelsoup[lm] "
            "(pip install 'modelsoup[lm]')"
        ) from None
    return gguf


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_name(gguf_name: str) -> str:
    """The transformers ``LlamaForCausalLM`` name of a GGUF tensor name.

    Example:
        >>> hf_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
    """
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ConfigError(
        f"GGUF tensor {gguf_name!r} has no Llama counterpart that this reader knows; "
        "load the file with transformers (from_pretrained(..., gguf_file=...)) instead"
    )


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of a query or key projection's rows, head by head.

    llama.cpp stores row ``2 j + p`` of a head where transformers has row
    ``p * (head_dim / 2) + j``; this returns the transformers order.

    Example:
        >>> stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])  # one head, rows interleaved
        >>> unpermute_rotary(stored, heads=1)[:, 0].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ConfigError(f"a projection of {rows} rows cannot split into {heads} rotary heads")
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, -1).transpose(1, 2).reshape(weight.shape).contiguous()


def read_gguf_llama(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``LlamaConfig`` settings and the float32 state dict of a llama GGUF file.

    The state dict has transformers' ``LlamaForCausalLM`` names; a model whose GGUF has
    no ``output.weight`` ties its head to the embeddings (``tie_word_embeddings``), and
    its state dict then holds the embeddings once, as ``save_pretrained`` stores them.

    Example:
        >>> config, state = read_gguf_llama("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> config["num_hidden_layers"], state["model.embed_tokens.weight"].shape  # doctest: +SKIP
        (30, torch.Size([49152, 576]))
    """
    gguf = _require_gguf()
    path = Path(path)
    try:
        return _read_llama(gguf, path)
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as err:
        # what gguf's parser raises on a truncated or corrupt file
        raise ConfigError(f"{path}: not a readable GGUF file ({err})") from None


def _read_llama(gguf: Any, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(
            f"{path}: GGUF architecture {arch!r}; only 'llama' files are read here. "
            "Load it with transformers (from_pretrained(..., gguf_file=...)) instead"
        )
    # llama.cpp scales RoPE linearly when a file gives only a factor (its default type)
    unsupported = [
        key
        for key, none in (
            ("llama.expert_count", (None, 0)),
            ("llama.rope.scaling.type", (None, "none")),
            ("llama.rope.scaling.factor", (None, 0, 1)),
            ("llama.rope.scale_linear", (None, 0, 1)),
        )
        if _field(reader, key) not in none
    ]
    if unsupported:
        raise ConfigError(
            f"{path}: {', '.join(unsupported)} set; this reader builds dense Llama models "
            "without RoPE scaling. Load it with transformers instead"
        )

    def setting(key: str, default: Any = None) -> Any:
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ConfigError(f"{path}: the GGUF metadata lacks llama.{key}")
        if isinstance(value, list):  # llama.cpp allows one value per block
            if len(set(value)) != 1:
                raise ConfigError(
                    f"{path}: llama.{key} differs from block to block ({value[:4]}...); "
                    "this reader builds models whose blocks are all alike. Load it with "
                    "transformers instead"
                )
            value = value[0]
        return value

    heads = int(setting("attention.head_count"))
    kv_heads = int(setting("attention.head_count_kv", heads))
    hidden = int(setting("embedding_length"))
    head_dim = int(setting("attention.key_length", hidden // heads))
    shapes = {
        "attention.value_length": int(setting("attention.value_length", head_dim)),
        "rope.dimension_count": int(setting("rope.dimension_count", head_dim)),
    }
    for key, value in shapes.items():
        if value != head_dim:
            raise ConfigError(
                f"{path}: llama.{key} is {value} but the heads have {head_dim} dimensions; "
                "a Llama model rotates and reads whole heads. Load it with transformers instead"
            )
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # transformers name -> the file's
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ConfigError(
                f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, "
                "which the installed gguf package cannot dequantize; upgrade gguf"
            ) from None
        # F32 tensors are views of the mapped file: copy them out before it closes
        state[name] = torch.tensor(values, dtype=torch.float32)
        origin[name] = tensor.name
    layers = int(setting("block_count"))
    tied = _TOP_NAMES["output.weight"] not in state
    # transformers would fill a missing tensor with random values and only warn
    expected = {_TOP_NAMES["token_embd.weight"], _TOP_NAMES["output_norm.weight"]}
    expected |= {f"model.layers.{i}.{n}" for i in range(layers) for n in _BLOCK_NAMES.values()}
    if not tied:
        expected.add(_TOP_NAMES["output.weight"])
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has {', '.join(extra[:3])}"
        raise ConfigError(
            f"{path}: the GGUF file {what}{' ...' if len(missing or extra) > 3 else ''} "
            f"for a {layers}-block Llama; it is incomplete or not a Llama model"
        )
    embeddings = state["model.embed_tokens.weight"]
    vocab = int(_field(reader, "llama.vocab_size", embeddings.shape[0]))
    if vocab != embeddings.shape[0]:
        raise ConfigError(
            f"{path}: llama.vocab_size says {vocab} tokens but token_embd has "
            f"{embeddings.shape[0]} rows; transformers could not load that model: the file is "
            "inconsistent, re-convert it"
        )
    inner = int(setting("feed_forward_length"))
    rows = (heads * head_dim, kv_heads * head_dim)
    _check_shapes(path, state, origin, (layers, vocab, hidden, inner) + rows)
    for name, gguf_name in origin.items():
        if gguf_name.endswith("attn_q.weight"):
            state[name] = unpermute_rotary(state[name], heads)
        elif gguf_name.endswith("attn_k.weight"):
            state[name] = unpermute_rotary(state[name], kv_heads)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(setting("context_length")),
        "rms_norm_eps": float(setting("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(setting("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    for token, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[f"{token}_token_id"] = int(value)
    return config, state


def _check_shapes(
    path: Path, state: dict[str, torch.Tensor], origin: dict[str, str], sizes: tuple[int, ...]
) -> None:
    # every tensor the shape the metadata gives it: transformers refuses any other when
    # it loads the folder, long after the minutes of converting
    layers, vocab, hidden, inner, q_rows, kv_rows = sizes
    want = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    block = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
    }
    want |= {f"model.layers.{i}.{n}": shape for i in range(layers) for n, shape in block.items()}
    for name, tensor in state.items():
        shape = want.get(name)
        if shape is not None and tuple(tensor.shape) != shape:
            raise ConfigError(
                f"{path}: tensor {origin[name]} is {list(tensor.shape)} but the metadata "
                f"(heads, lengths) gives it {list(shape)}; the file is inconsistent, re-convert it"
            )


def gguf_to_folder(path: str | Path, folder: str | Path, *, tokenizer: bool = True) -> Path:
    """Write a llama GGUF file as a Hugging Face folder that ``from_pretrained`` loads.

    The folder holds ``config.json``, ``generation_config.json``, a float32
    ``model.safetensors`` and, with ``tokenizer``, the tokenizer transformers builds from
    the GGUF's vocabulary. It is written beside ``folder`` and renamed into place, so a
    killed run leaves no half a model. An existing empty ``folder`` is replaced; one that
    holds anything is refused (:class:`~modelsoup.errors.WriteError`), never deleted.

    Example:
        >>> gguf_to_folder("SmolLM2-135M-Instruct.Q4_1.gguf", "start").name  # doctest: +SKIP
        'start'
    """
    from safetensors.torch import save_file

    transformers = require_transformers()
    path, folder = Path(path), Path(folder)
    check_replaceable(folder, None, "empty")  # before the minutes of reading
    settings, state = read_gguf_llama(path)
    config = transformers.LlamaConfig(**settings, dtype="float32")
    tmp = temp_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        transformers.GenerationConfig.from_model_config(config).save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer:
            try:
                tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except (ImportError, OSError, ValueError) as err:
                raise ConfigError(f"{path}: cannot build its tokenizer ({err})") from None
            tok.save_pretrained(tmp)
        replace_folder(tmp, folder, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("wrote %s from %s (%d tensors)", folder, path, len(state))
    return folder
