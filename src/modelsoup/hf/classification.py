"""Text classification: the built-in evaluator ``hf_text_classification``.

``held_out: {hf_text_classification: held.csv}`` scores candidate soups on a local CSV
or JSON-lines file of texts and labels, tokenized by the first ingredient folder's
tokenizer; labels are class names from ``config.json``'s ``label2id`` or integers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from modelsoup._options import OptionsModel
from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy, ClassifierEvaluator, MeanLoss
from modelsoup.hf.models import fit_max_length, load_tokenizer, local_path, require_transformers


class TextClassificationData(OptionsModel):
    """The config form of the built-in text-classification evaluator (unknown keys are errors).

    Example:
        >>> spec = TextClassificationData(hf_text_classification="held.csv", max_length=64)
        >>> spec.metric, spec.text_column, spec.label_column, spec.batch_size
        ('accuracy', 'text', 'label', 32)
    """

    #: a ``.csv``/``.tsv`` file with a header row, or ``.jsonl`` (one JSON object a line)
    hf_text_classification: str
    text_column: str = "text"
    #: a second text column for pair tasks (NLI, paraphrase), passed as ``text_pair``
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = Field(default=128, ge=1)
    batch_size: int = Field(default=32, ge=1)
    metric: Literal["accuracy", "loss"] = "accuracy"
    #: tokenizer folder; the first ingredient folder by default
    tokenizer: str | None = None
    name: str | None = None


def read_examples(path: str | Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header row) or JSON-lines file, checked to have ``columns``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "held.csv"
        >>> _ = p.write_text("text,label\\ngood film,pos\\n")
        >>> read_examples(p, ["text", "label"])
        [{'text': 'good film', 'label': 'pos'}]
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: evaluation data not found; check the path")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".csv", ".tsv"):
        rows = _read_table(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for number, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path} line {number}: not a JSON object") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: not a JSON object")
            rows.append(row)
    else:
        raise ConfigError(f"{path}: unknown data format; use .csv, .tsv or .jsonl")
    if not rows:
        raise ConfigError(f"{path}: no examples")
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ConfigError(
                f"{path} example {number}: no '{missing[0]}' column (it has: "
                f"{', '.join(sorted(str(k) for k in row))}); set text_column/label_column"
            )
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise ConfigError(f"{path} example {number}: '{empty[0]}' is null; give it a value")
    return rows


def read_text(path: Path) -> str:
    """A data file's text: UTF-8 (a byte-order mark, as Excel writes, is dropped); any
    other encoding is one error naming the file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "d.txt"
        >>> _ = p.write_bytes("\ufeffcaf\u00e9".encode())
        >>> read_text(p)
        'café'
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ConfigError:
    return ConfigError(
        f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
        "save it as UTF-8"
    )


def _decoded(lines: Any, path: Path) -> Any:
    # the lines of an open text file, a decoding error named as one error line
    try:
        yield from lines
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _read_table(path: Path, delimiter: str) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header row, each checked to have one field per column.

    A short or long row is reported as such, with its line: read as a mapping it would
    lack a column the header has, or put a value under no column.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(_decoded(fh, path), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
        _check_header(path, header)
        rows = []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                sign = "comma" if delimiter == "," else "tab"
                raise ConfigError(
                    f"{path} line {reader.line_num}: {len(fields)} field(s) where the header "
                    f"has {len(header)} ({', '.join(header)}); give every row one value per "
                    f"column, and quote values that contain a {sign}"
                )
            rows.append(dict(zip(header, fields)))
    return rows


def _check_header(path: Path, header: list[str]) -> None:
    # unnamed columns (a spreadsheet's trailing empty ones) are never read
    twice = next((c for c in header if c and header.count(c) > 1), None)
    if twice is not None:
        raise ConfigError(
            f"{path}: column '{twice}' appears twice in the header; give every column its own name"
        )


def _model_pad_id(folder: Path) -> int | None:
    # config.json's pad_token_id, the id the model itself takes for padding (one of its
    # tokens: an id outside the vocabulary cannot be fed to it)
    try:
        config = json.loads((folder / "config.json").read_text())
        value, vocab = config.get("pad_token_id"), config.get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return value if not isinstance(vocab, int) or value < vocab else None


def label_ids(labels: Sequence[Any], folder: str | Path, source: str = "data") -> list[int]:
    """Class indices for ``labels``: names via ``config.json``'s ``label2id``, or integers.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text('{"label2id": {"neg": 0, "pos": 1}, '
        ...                                    '"id2label": {"0": "neg", "1": "pos"}}')
        >>> label_ids(["pos", "neg", 1], d)
        [1, 0, 1]
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    label2id = config.get("label2id") or {}
    num_labels = len(config["id2label"]) if config.get("id2label") else None
    out = []
    for number, label in enumerate(labels, 1):
        text = str(label).strip()
        if not isinstance(label, bool) and text in label2id:
            value = int(label2id[text])
        elif not isinstance(label, bool) and text.lstrip("-").isdigit():
            value = int(text)
        else:
            known = ", ".join(sorted(label2id)) or "none"
            raise ConfigError(
                f"{source} example {number}: label '{label}' is neither an integer nor a name "
                f"in {folder}/config.json's label2id (known: {known})"
            )
        if value < 0 or (num_labels is not None and value >= num_labels):
            raise ConfigError(
                f"{source} example {number}: label {label!r} is class {value}, but the model "
                f"has {num_labels} classes"
            )
        out.append(value)
    return out


def text_classification(
    spec: TextClassificationData | str | Path,
    folder: str | Path,
    *,
    base_dir: str | Path = ".",
    trust_remote_code: bool = False,
) -> ClassifierEvaluator:
    """The built-in evaluator for sequence classification on a local CSV or JSONL file.

    Texts are tokenized once (truncated to ``max_length``, padded per batch) with the
    tokenizer in ``spec.tokenizer`` or ``folder``; labels may be class names from
    ``config.json``'s ``label2id`` or integers. Returns an
    :class:`~modelsoup.evaluators.Accuracy` (or ``MeanLoss`` with ``metric: loss``) over
    those batches, so logits, per-example results and sharding under torchrun all work.

    Example:
        >>> import tempfile, transformers
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "vocab.txt").write_text("[PAD]\\n[UNK]\\n[CLS]\\n[SEP]\\ngood\\nbad\\n")
        >>> _ = transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
        >>> cfg = transformers.BertConfig(vocab_size=6, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=16)
        >>> transformers.BertForSequenceClassification(cfg).save_pretrained(d)
        >>> _ = (d / "held.csv").write_text("text,label\\ngood,1\\nbad,0\\n")
        >>> ev = text_classification(d / "held.csv", d)
        >>> from modelsoup.hf.models import load_architecture
        >>> 0.0 <= ev.evaluate(load_architecture(d)) <= 1.0
        True
    """
    require_transformers()
    if not isinstance(spec, TextClassificationData):
        spec = TextClassificationData(hf_text_classification=str(spec))
    data_path = local_path(spec.hf_text_classification, base_dir)
    spec = fit_max_length(spec, local_path(folder, base_dir))
    tok_dir = local_path(spec.tokenizer or folder, base_dir)
    columns = [spec.text_column, spec.label_column]
    if spec.text_pair_column:
        columns.append(spec.text_pair_column)
    rows = read_examples(data_path, columns)
    labels = label_ids([r[spec.label_column] for r in rows], folder, str(data_path))
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"{tok_dir}: the tokenizer has no padding token; set pad_token in its "
            "tokenizer_config.json (and pad_token_id in config.json)"
        )
    model_pad = _model_pad_id(local_path(folder, base_dir))
    for i, r in enumerate(rows):
        for column in columns[:1] + columns[2:]:
            if not isinstance(r[column], str):
                raise ConfigError(
                    f"{data_path} example {i + 1}: '{column}' is {type(r[column]).__name__} "
                    f"{r[column]!r}, not a string; give the text as a string"
                )
    batches = []
    for start in range(0, len(rows), spec.batch_size):
        chunk = rows[start : start + spec.batch_size]
        pairs = [r[spec.text_pair_column] for r in chunk] if spec.text_pair_column else None
        encoded = tokenizer(
            [r[spec.text_column] for r in chunk],
            pairs,
            max_length=spec.max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        batch = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        if (
            model_pad is not None
            and model_pad != tokenizer.pad_token_id
            and "attention_mask" in batch
        ):
            # A decoder classifier (Llama, GPT-2) pools the last token before its config's
            # pad id: padding with the tokenizer's other pad id would pool a padding
            # position, and scores would change with the batch size.
            batch["input_ids"] = batch["input_ids"].masked_fill(
                batch["attention_mask"] == 0, model_pad
            )
        batch["labels"] = torch.tensor(labels[start : start + spec.batch_size])
        batches.append(batch)
    kind = Accuracy if spec.metric == "accuracy" else MeanLoss
    return kind(batches, batch_size=spec.batch_size, name=spec.name)
