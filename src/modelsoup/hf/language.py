"""Language-model evaluators: held-out loss (perplexity) and multiple-choice accuracy.

``held_out: {hf_causal_lm_loss: held.txt}`` (alias ``perplexity``) scores a candidate soup
by the mean negative log-likelihood, in nats, of the tokens of local documents; lower is
better, and the report adds the perplexity ``exp(loss)``. ``{hf_multiple_choice:
mc.jsonl}`` scores it by how often the choice the model finds most likely is the answer,
in the manner of lm-eval-harness's multiple-choice tasks.

How tokens are scored: each document is tokenized whole with the tokenizer's own special
tokens (a BOS it prepends, an EOS it appends). Every token after the first is predicted
from the tokens before it. A document longer than ``max_length`` is read in windows of
``max_length`` tokens: the first window scores its tokens, each later one scores the next
``stride`` tokens with the ``max_length - stride`` tokens before them as context, so every
token is scored exactly once. With ``prompt``/``completion`` fields only the completion's
tokens are scored: ``prompt + completion`` is tokenized as one text, and the tokens past
those of the prompt alone are the completion's (as lm-eval-harness splits them).

Per-document values, for the report's intervals and paired comparisons: with
``average: tokens`` (the default, the usual token-level loss) document d contributes
``sum of its token losses / mean tokens per document``, so the mean over documents is
exactly the token-level loss and a bootstrap over documents resamples whole documents;
with ``average: documents`` each document's own mean token loss counts once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, ConfigDict, Field, model_validator

from modelsoup._options import OptionsModel
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.evaluators import ClassifierEvaluator, forward_logits
from modelsoup.hf.classification import read_examples, read_text
from modelsoup.hf.models import fit_max_length, load_tokenizer, local_path

_logger = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that is context only, as transformers' losses use


class CausalLMLossData(OptionsModel):
    """The config form of ``hf_causal_lm_loss`` (alias ``perplexity``); unknown keys are errors.

    Example:
        >>> spec = CausalLMLossData(perplexity="held.txt", max_length=64)
        >>> spec.hf_causal_lm_loss, spec.window_stride, spec.average
        ('held.txt', 32, 'tokens')
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    #: a ``.txt`` file (one document a line, or blank-line separated paragraphs) or
    #: ``.jsonl`` (``text``, or ``prompt`` and ``completion``, per line)
    hf_causal_lm_loss: str = Field(validation_alias=AliasChoices("hf_causal_lm_loss", "perplexity"))
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    #: ``.txt`` only: ``auto`` reads paragraphs when the file has a blank line, else lines
    split: Literal["auto", "lines", "paragraphs"] = "auto"
    max_length: int = Field(default=512, ge=2)
    #: new tokens each later window of a long document scores (default max_length // 2)
    stride: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    average: Literal["tokens", "documents"] = "tokens"
    #: tokenizer folder; the first ingredient folder by default
    tokenizer: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _stride_leaves_context(self) -> CausalLMLossData:
        if self.stride is not None and self.stride >= self.max_length:
            raise ValueError(
                f"stride {self.stride} must be smaller than max_length {self.max_length}: "
                "each later window keeps max_length - stride tokens of context"
            )
        return self

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.max_length // 2)


class MultipleChoiceData(OptionsModel):
    """The config form of ``hf_multiple_choice``; unknown keys are errors.

    Example:
        >>> spec = MultipleChoiceData(hf_multiple_choice="mc.jsonl", normalize="characters")
        >>> spec.question_field, spec.choices_field, spec.answer_field, spec.separator
        ('question', 'choices', 'answer', ' ')
    """

    #: a ``.jsonl`` file of ``{question, choices, answer}`` objects; ``answer`` is the
    #: 0-based index of the right choice, or its text
    hf_multiple_choice: str
    question_field: str = "question"
    choices_field: str = "choices"
    answer_field: str = "answer"
    #: put between the question and each choice
    separator: str = " "
    #: a choice's score: its total log-likelihood (``none``), or that divided by its
    #: number of tokens or of characters (lm-eval-harness's ``acc_norm``)
    normalize: Literal["none", "tokens", "characters"] = "none"
    max_length: int = Field(default=512, ge=2)
    batch_size: int = Field(default=8, ge=1)
    tokenizer: str | None = None
    name: str | None = None


def read_documents(path: str | Path, spec: CausalLMLossData) -> list[tuple[str, str]]:
    """The documents of a ``.txt`` or ``.jsonl`` file as ``(prompt, scored text)`` pairs.

    A plain text has the empty prompt: all of it is scored.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "held.txt"
        >>> _ = p.write_text("one line\\nanother line\\n")
        >>> read_documents(p, CausalLMLossData(hf_causal_lm_loss=str(p)))
        [('', 'one line'), ('', 'another line')]
        >>> _ = p.write_text("a paragraph\\nof two lines\\n\\nand one more\\n")
        >>> read_documents(p, CausalLMLossData(hf_causal_lm_loss=str(p)))
        [('', 'a paragraph\\nof two lines'), ('', 'and one more')]
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: evaluation data not found; check the path")
    if path.suffix.lower() == ".txt":
        text = read_text(path)
        paragraphs = re.search(r"\S[ \t\r]*\n[ \t\r]*\n[ \t\r\n]*\S", text) is not None
        if spec.split == "paragraphs" or (spec.split == "auto" and paragraphs):
            parts = re.split(r"\n[ \t\r]*\n", text)
        else:
            parts = text.splitlines()
        docs = [("", part.strip()) for part in parts if part.strip()]
        if not docs:
            raise ConfigError(f"{path}: no documents (the file is empty)")
        return docs
    docs = []
    for number, row in enumerate(read_examples(path, []), 1):
        if row.get(spec.completion_field) is not None:
            prompt, scored = row.get(spec.prompt_field, ""), row[spec.completion_field]
        elif row.get(spec.text_field) is not None:
            prompt, scored = "", row[spec.text_field]
        else:
            raise ConfigError(
                f"{path} example {number}: no '{spec.text_field}' and no "
                f"'{spec.completion_field}' field (it has: {', '.join(sorted(map(str, row)))}); "
                "set text_field or completion_field"
            )
        if not isinstance(prompt, str) or not isinstance(scored, str):
            raise ConfigError(f"{path} example {number}: the prompt and text must be strings")
        if not scored.strip():
            raise ConfigError(f"{path} example {number}: the text to score is empty")
        docs.append((prompt, scored))
    return docs


def split_ids(tokenizer: Any, prompt: str, scored: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + scored`` and the position of the first scored token: the
    first where they differ from the prompt's own ids (so an end-of-sequence token the
    tokenizer appends to the prompt alone is not counted as the prompt's).

    Example:
        >>> class Chars:  # a tokenizer of one token per character
        ...     def __call__(self, text):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> split_ids(Chars(), "Q:", "ab")
        ([81, 58, 97, 98], 2)
        >>> split_ids(Chars(), "", "ab")
        ([97, 98], 1)
        >>> class WithEnd(Chars):  # appends an end-of-sequence token, 0
        ...     def __call__(self, text):
        ...         return {"input_ids": super().__call__(text)["input_ids"] + [0]}
        >>> split_ids(WithEnd(), "Q:", "ab")
        ([81, 58, 97, 98, 0], 2)
    """
    ids = list(tokenizer(prompt + scored)["input_ids"])
    if not prompt:
        return ids, 1  # the first token has nothing before it to be predicted from
    alone = list(tokenizer(prompt)["input_ids"])
    shared = 0
    while shared < min(len(ids), len(alone)) and ids[shared] == alone[shared]:
        shared += 1
    return ids, max(1, shared)


def _choice_ids(tokenizer: Any, question: str, choice: str) -> tuple[list[int], int]:
    # split_ids, less the special tokens the tokenizer appends (an EOS after the choice):
    # a choice is scored by its own tokens, as lm-eval-harness scores a continuation
    ids, first = split_ids(tokenizer, question, choice)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    if not special:
        return ids, first
    plain = list(tokenizer(question + choice, add_special_tokens=False)["input_ids"])
    # the special tokens at the end that the text itself does not end with were appended
    appended = _special_tail(ids, special) - _special_tail(plain, special)
    if 0 < appended < len(ids) - first:  # a choice keeps at least one token of its own
        ids = ids[: len(ids) - appended]
    return ids, first


def _special_tail(ids: list[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[len(ids) - 1 - n] in special:
        n += 1
    return n


def windows(length: int, first: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, first scored, end)`` windows that score positions ``first .. length-1`` once.

    Each window is at most ``max_length`` tokens, and every scored token has at least
    one token of context in its window.

    Example:
        >>> windows(5, 1, 8, 4)
        [(0, 1, 5)]
        >>> windows(10, 1, 4, 2)
        [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    """
    if length <= max_length:
        return [(0, first, length)] if first < length else []
    out = []
    start_scoring, end = first, min(length, max(max_length, first + stride))
    while start_scoring < length:
        out.append((max(0, end - max_length), start_scoring, end))
        start_scoring, end = end, min(length, end + stride)
    return out


class TokenScorer(ClassifierEvaluator):
    """Base of the language-model evaluators: log-probabilities of chosen tokens.

    ``sequences`` are ``(token ids, first scored position)`` pairs, or ``(token ids,
    first scored position, labels)`` where labels (one per token, ``-100`` for context)
    say which tokens to score, as transformers' unshifted ``labels`` do; they are cut into
    windows of at most ``max_length`` tokens, batched and padded on the right. Its
    :meth:`~modelsoup.evaluators.ClassifierEvaluator.logits` give each scored token's
    log-probability (float64), in order; :attr:`owner` names the sequence of each.
    """

    kind = "token_log_prob"

    def __init__(
        self,
        sequences: Sequence[tuple[Sequence[int], int]],
        *,
        pad_id: int = 0,
        max_length: int = 512,
        stride: int | None = None,
        batch_size: int = 4,
        name: str | None = None,
        options: dict | None = None,
    ):
        stride = stride if stride is not None else max(1, max_length // 2)
        items, owner = [], []
        for index, (ids, first, *given) in enumerate(sequences):
            targets = list(given[0]) if given else list(ids)
            for start, scored, end in windows(len(ids), first, max_length, stride):
                labels = [IGNORE] * (scored - start) + targets[scored:end]
                items.append((list(ids[start:end]), labels))
                owner += [index] * sum(t != IGNORE for t in targets[scored:end])
        if not items:
            raise ConfigError("no token to score: every text is shorter than two tokens")
        batches = []
        for at in range(0, len(items), batch_size):
            chunk = items[at : at + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for ids, labels in chunk:
                pad = width - len(ids)
                batch["input_ids"].append(ids + [pad_id] * pad)
                batch["attention_mask"].append([1] * len(ids) + [0] * pad)
                batch["labels"].append(labels + [IGNORE] * pad)
            batches.append({k: torch.tensor(v) for k, v in batch.items()})
        super().__init__(batches, batch_size=batch_size, name=name)
        self.owner = torch.tensor(owner)
        self.num_sequences = len(sequences)
        self.options = dict(options or {})

    def fingerprint(self) -> str:
        """The data's hash and the scoring options: two ways of scoring never share a journal."""
        text = super().fingerprint() + json.dumps(self.options, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def batch_outputs(
        self, model: torch.nn.Module, inputs: Any, labels: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities of the batch's scored tokens (each predicted from those before)."""
        logits = forward_logits(model, inputs)[:, :-1]
        target = labels[:, 1:]
        scored = target != IGNORE
        # Only the scored rows, and no log-softmax over the whole vocabulary: memory
        # stays at one float32 copy of those rows' logits.
        picked = logits[scored].float()
        chosen = picked.gather(-1, target[scored][:, None])[:, 0]
        return (chosen - picked.logsumexp(-1)).double().cpu()

    def score_logits(self, logits: torch.Tensor) -> float:
        """The mean of :meth:`per_example`, in float64."""
        return float(self.per_example(logits).double().mean())

    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of per-token ``values`` (one entry per scored token)."""
        if values.shape[0] != self.owner.shape[0]:
            raise ConfigError(
                f"{values.shape[0]} token scores for {self.owner.shape[0]} scored tokens: "
                "these outputs are not from this evaluator's data"
            )
        sums = torch.zeros(self.num_sequences, dtype=torch.float64)
        return sums.index_add_(0, self.owner, values.double())

    def token_counts(self) -> torch.Tensor:
        """Scored tokens per sequence."""
        return torch.bincount(self.owner, minlength=self.num_sequences).double()


def _scored(sequence: tuple) -> int:
    """How many tokens of a sequence are scored."""
    ids, first, *given = sequence
    return sum(t != IGNORE for t in (given[0] if given else ids)[first:])


def sequences_from_batches(batches: Sequence[dict[str, torch.Tensor]]) -> list[tuple]:
    """``(ids, first, labels)`` sequences from batches of ``input_ids``/``labels`` rows.

    ``labels`` follow transformers' causal-LM convention: unshifted, ``-100`` where a
    token is not scored; padding (``attention_mask`` 0) is dropped.

    Example:
        >>> import torch
        >>> batch = {"input_ids": torch.tensor([[5, 6, 7, 0]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1, 0]]),
        ...          "labels": torch.tensor([[-100, 6, 7, -100]])}
        >>> sequences_from_batches([batch])
        [([5, 6, 7], 1, [-100, 6, 7])]
    """
    out = []
    for batch in batches:
        ids_rows, label_rows = batch["input_ids"], batch.get("labels", batch["input_ids"])
        masks = batch.get("attention_mask", torch.ones_like(ids_rows))
        for ids, labels, mask in zip(ids_rows, label_rows, masks):
            keep = mask.bool()
            ids, labels = ids[keep].tolist(), labels[keep].tolist()
            scored = [t for t, label in enumerate(labels) if label != IGNORE and t > 0]
            out.append((ids, scored[0] if scored else len(ids), labels))
    return out


class CausalLMLoss(TokenScorer):
    """Mean negative log-likelihood of documents' tokens, in nats (lower is better).

    Its "logits" are each scored token's probability (float64), so the mean over an
    ensemble's members is the probability of the mixture of their distributions.
    ``per_example`` gives one value per document (see the module docstring).

    Example:
        >>> import torch
        >>> class Uniform(torch.nn.Module):  # every token equally likely out of 4
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.zeros(*input_ids.shape, 4)
        >>> ev = CausalLMLoss([([0, 1, 2], 1), ([3, 2], 1)])
        >>> round(ev.evaluate(Uniform()), 4), round(float(torch.tensor(4.0).log()), 4)
        (1.3863, 1.3863)
    """

    kind = "causal_lm_loss"
    higher_is_better = False
    #: a negative log-likelihood: a journal score below 0 is not trusted
    score_range = (0.0, math.inf)
    #: the report shows exp(score) beside the score
    reports_perplexity = True

    def __init__(
        self,
        sequences: Sequence[tuple[Sequence[int], int]],
        *,
        average: Literal["tokens", "documents"] = "tokens",
        **kwargs: Any,
    ):
        kept = [s for s in sequences if _scored(s)]
        if len(kept) < len(sequences):
            warnings.warn(
                f"{len(sequences) - len(kept)} of {len(sequences)} documents have no token to "
                "score (shorter than two tokens) and are left out",
                SoupWarning,
                stacklevel=2,
            )
        if not kept:
            raise ConfigError("no document has a token to score: all are shorter than 2 tokens")
        options = {"average": average, **kwargs.pop("options", {})}
        super().__init__(kept, options=options, **kwargs)
        self.average = average

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        return super().logits(model).exp()

    def per_example(self, logits: torch.Tensor) -> torch.Tensor:
        sums = self.sequence_sums(-logits.double().log())
        counts = self.token_counts()
        if self.average == "documents":
            return sums / counts
        return sums * (self.num_sequences / counts.sum())


class MultipleChoice(TokenScorer):
    """Accuracy of picking the most likely choice (higher is better).

    ``questions`` holds, per question, the ``(token ids, first scored position)`` of
    each choice after its question, and ``answers`` the index of the right one. Its
    "logits" are a ``questions x choices`` table of (normalised) log-likelihoods,
    ``-inf`` where a question has fewer choices.

    Example:
        >>> import torch
        >>> class Likes(torch.nn.Module):  # always predicts token 2
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.nn.functional.one_hot(torch.full_like(input_ids, 2), 4) * 5.0
        >>> ev = MultipleChoice([[([0, 1], 1), ([0, 2], 1)], [([0, 2], 1), ([0, 3], 1)]], [1, 1])
        >>> ev.evaluate(Likes())
        0.5
    """

    kind = "multiple_choice"
    higher_is_better = True
    #: an accuracy: a journal score outside [0, 1] is not trusted
    score_range = (0.0, 1.0)

    def __init__(
        self,
        questions: Sequence[Sequence[tuple[Sequence[int], int]]],
        answers: Sequence[int],
        *,
        divisors: Sequence[Sequence[float]] | None = None,
        **kwargs: Any,
    ):
        if len(questions) != len(answers) or not questions:
            raise ConfigError("multiple choice needs one answer per question, and a question")
        self.width = max(len(q) for q in questions)
        slots = [(i, j) for i, q in enumerate(questions) for j in range(len(q))]
        super().__init__([seq for q in questions for seq in q], **kwargs)
        self.slot_rows = torch.tensor([i for i, _ in slots])
        self.slot_cols = torch.tensor([j for _, j in slots])
        self.divisors = torch.tensor(
            [float(d) for row in divisors for d in row] if divisors else [1.0] * len(slots),
            dtype=torch.float64,
        )
        self.answers = torch.tensor(list(answers))
        if bool((self.token_counts() == 0).any()):
            raise ConfigError("a choice has no token to score; give every choice some text")

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        scores = self.sequence_sums(super().logits(model)) / self.divisors
        table = torch.full((len(self.answers), self.width), float("-inf"), dtype=torch.float64)
        table[self.slot_rows, self.slot_cols] = scores
        return table

    def per_example(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == self.answers).float()


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value  # padded positions are masked out and never scored
    return 0


def causal_lm_loss(
    spec: CausalLMLossData | str | Path,
    folder: str | Path,
    *,
    base_dir: str | Path = ".",
    trust_remote_code: bool = False,
) -> CausalLMLoss:
    """The built-in ``hf_causal_lm_loss`` evaluator on a local ``.txt`` or ``.jsonl`` file.

    Example:
        >>> import tempfile, transformers
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> d = Path(tempfile.mkdtemp())
        >>> vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat"])}
        >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
        >>> _ = fast.save_pretrained(d)
        >>> _ = (d / "held.txt").write_text("the cat sat\\nthe cat\\n")
        >>> ev = causal_lm_loss(d / "held.txt", d)
        >>> ev.num_sequences, ev.owner.tolist()
        (2, [0, 0, 1])
    """
    if not isinstance(spec, CausalLMLossData):
        spec = CausalLMLossData(hf_causal_lm_loss=str(spec))
    data_path = local_path(spec.hf_causal_lm_loss, base_dir)
    docs = read_documents(data_path, spec)
    spec = fit_max_length(spec, local_path(folder, base_dir))
    tok_dir = local_path(spec.tokenizer or folder, base_dir)
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
    sequences = []
    for number, (prompt, scored) in enumerate(docs, 1):
        ids, first = split_ids(tokenizer, prompt, scored)
        if prompt and first >= len(ids):
            raise ConfigError(f"{data_path} example {number}: the completion has no tokens")
        sequences.append((ids, first))
    _logger.info(
        "%s: %d documents, %d tokens", data_path, len(docs), sum(len(s) for s, _ in sequences)
    )
    return CausalLMLoss(
        sequences,
        average=spec.average,
        pad_id=_pad_id(tokenizer),
        max_length=spec.max_length,
        stride=spec.window_stride,
        batch_size=spec.batch_size,
        name=spec.name,
    )


def _answer_index(answer: Any, choices: list[str], where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise ConfigError(f"{where}: answer {answer} is not a choice index (0..{len(choices) - 1})")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise ConfigError(
        f"{where}: answer {answer!r} is neither a choice index nor the text of a choice"
    )


def multiple_choice(
    spec: MultipleChoiceData | str | Path,
    folder: str | Path,
    *,
    base_dir: str | Path = ".",
    trust_remote_code: bool = False,
) -> MultipleChoice:
    """The built-in ``hf_multiple_choice`` evaluator on a local ``.jsonl`` file.

    Each choice is scored as the completion of ``question + separator + choice``.

    Example:
        >>> import tempfile, transformers
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> d = Path(tempfile.mkdtemp())
        >>> vocab = {w: i for i, w in enumerate(["[UNK]", "sky", "is", "blue", "green"])}
        >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
        >>> _ = fast.save_pretrained(d)
        >>> row = {"question": "sky is", "choices": ["blue", "green"], "answer": "blue"}
        >>> _ = (d / "mc.jsonl").write_text(json.dumps(row) + "\\n")
        >>> ev = multiple_choice(d / "mc.jsonl", d)
        >>> ev.answers.tolist(), ev.width
        ([0], 2)
    """
    if not isinstance(spec, MultipleChoiceData):
        spec = MultipleChoiceData(hf_multiple_choice=str(spec))
    data_path = local_path(spec.hf_multiple_choice, base_dir)
    fields = [spec.question_field, spec.choices_field, spec.answer_field]
    rows = read_examples(data_path, fields)
    spec = fit_max_length(spec, local_path(folder, base_dir))
    tok_dir = local_path(spec.tokenizer or folder, base_dir)
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
    questions, answers, divisors = [], [], []
    for number, row in enumerate(rows, 1):
        where = f"{data_path} example {number}"
        question, choices = row[spec.question_field], row[spec.choices_field]
        if not isinstance(question, str):
            raise ConfigError(f"{where}: '{spec.question_field}' must be a string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(f"{where}: '{spec.choices_field}' must list two or more texts")
        answers.append(_answer_index(row[spec.answer_field], choices, where))
        seqs = [_choice_ids(tokenizer, question, spec.separator + c) for c in choices]
        for (ids, first), choice in zip(seqs, choices):
            if first >= len(ids):
                raise ConfigError(f"{where}: choice {choice!r} has no tokens of its own")
        questions.append(seqs)
        if spec.normalize == "tokens":
            divisors.append([len(ids) - first for ids, first in seqs])
        elif spec.normalize == "characters":
            divisors.append([len(c) for c in choices])  # the choice's, as lm-eval-harness
        else:
            divisors.append([1.0] * len(choices))
    return MultipleChoice(
        questions,
        answers,
        divisors=divisors,
        pad_id=_pad_id(tokenizer),
        max_length=spec.max_length,
        batch_size=spec.batch_size,
        name=spec.name,
        options={"normalize": spec.normalize},
    )
