"""Hugging Face classifiers without code: the architecture from ``config.json``, a text evaluator.

With ``model: hf`` a cook config builds the model from the first ingredient folder's
``config.json`` through transformers' Auto classes, and with
``held_out: {hf_text_classification: held.csv}`` it scores candidate soups on a local
CSV or JSON-lines file of texts and labels, tokenized by the first ingredient folder's
tokenizer. Everything is read from local folders; nothing is fetched from a hub, and
code shipped with a checkpoint runs only when the config says ``trust_remote_code: true``.

transformers is an optional extra (``pip install 'modelsoup[hf]'``): it is imported
inside the functions here, never when modelsoup itself is imported.

Example config::

    model: hf
    ingredients: [runs/*/]                 # HF folders saved by save_pretrained
    held_out: {hf_text_classification: data/held.csv, max_length: 128}
    test: {hf_text_classification: data/test.jsonl, metric: accuracy}
    output: soups/
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy, ClassifierEvaluator, MeanLoss
from modelsoup.formats.hf_folder import is_model_folder, open_folder
from modelsoup.ingredients import find_checkpoints


class TextClassificationData(BaseModel):
    """The config form of the built-in text-classification evaluator (unknown keys are errors).

    Example:
        >>> spec = TextClassificationData(hf_text_classification="held.csv", max_length=64)
        >>> spec.metric, spec.text_column, spec.label_column, spec.batch_size
        ('accuracy', 'text', 'label', 32)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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


def require_transformers() -> ModuleType:
    """Import transformers, or explain how to install it.

    Example:
        >>> require_transformers().__name__
        'transformers'
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need transformers: install modelsoup[hf] "
            "(pip install 'modelsoup[hf]')"
        ) from None
    return transformers


def model_folder(ingredients: Sequence[str | Path]) -> Path:
    """The first ingredient, which must be a Hugging Face model folder with ``config.json``.

    Example:
        >>> model_folder(["/nonexistent"])
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: model: hf needs Hugging Face model folders as ingredients...
    """
    # the first ingredient only; open_ingredients says what the whole pool holds
    found = find_checkpoints(ingredients[:1], dedupe=False, quiet=True) if ingredients else []
    first = found[0] if found else Path(str(ingredients[0]) if ingredients else ".")
    if not is_model_folder(first) or not (first / "config.json").is_file():
        raise ConfigError(
            "model: hf needs Hugging Face model folders as ingredients, but the first "
            f"ingredient {first} is not one"
            + ("" if not first.is_dir() else " (it has no config.json or no weights)")
        )
    return first


def _keep_stored_names_only(model: torch.nn.Module, stored: set[str]) -> None:
    """Hide tied copies (e.g. an LM head tied to the embeddings) from ``state_dict``.

    ``save_pretrained`` stores a tied tensor once; the module still lists every alias.
    Writing a soup into the module copies into the stored name, which the alias
    shares, so the alias is simply left out of the names modelsoup compares.
    """
    state = model.state_dict(keep_vars=True)
    owners = {
        (t.data_ptr(), tuple(t.shape)): n for n, t in state.items() if n in stored and t.numel()
    }
    aliases = {
        n
        for n, t in state.items()
        if n not in stored and t.numel() and (t.data_ptr(), tuple(t.shape)) in owners
    }
    if not aliases:
        return

    def drop_aliases(module, state_dict, prefix, local_metadata) -> None:
        for name in aliases:
            state_dict.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop_aliases)


def load_architecture(
    folder: str | Path,
    *,
    auto_class: str = "AutoModelForSequenceClassification",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A freshly initialised model of the architecture in ``folder/config.json`` (offline).

    The weights are random: a cook overwrites them with each candidate soup.

    Example:
        >>> import tempfile, transformers
        >>> d = Path(tempfile.mkdtemp())
        >>> cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=16)
        >>> transformers.BertForSequenceClassification(cfg).save_pretrained(d)
        >>> type(load_architecture(d)).__name__
        'BertForSequenceClassification'
    """
    transformers = require_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; model: hf needs a save_pretrained folder")
    auto = getattr(transformers, auto_class, None)
    if auto is None or not hasattr(auto, "from_config"):
        raise ConfigError(f"'{auto_class}' is not a transformers Auto class")
    try:
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        hint = (
            "; the model's code ships with the checkpoint: set trust_remote_code: true in the "
            "cook config if you trust it"
            if "trust_remote_code" in str(err)
            else ""
        )
        raise ConfigError(f"{folder}/config.json: cannot build the model ({err}){hint}") from None
    _keep_stored_names_only(model, set(open_folder(folder).names()))
    return model


def model_factory(
    ingredients: Sequence[str | Path], *, trust_remote_code: bool = False
) -> Callable[[], torch.nn.Module]:
    """What ``model: hf`` stands for: builds the first ingredient folder's architecture.

    Example:
        >>> model_factory(["/nonexistent"])
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: model: hf needs ...
    """
    folder = model_folder(ingredients)
    require_transformers()  # fail at config time, not after the ingredients are opened

    def build() -> torch.nn.Module:
        return load_architecture(folder, trust_remote_code=trust_remote_code)

    return build


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
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def _read_table(path: Path, delimiter: str) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header row, each checked to have one field per column.

    A short or long row is reported as such, with its line: read as a mapping it would
    lack a column the header has, or put a value under no column.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
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
        >>> 0.0 <= ev.evaluate(load_architecture(d)) <= 1.0
        True
    """
    transformers = require_transformers()
    if not isinstance(spec, TextClassificationData):
        spec = TextClassificationData(hf_text_classification=str(spec))
    base = Path(base_dir)
    data_path = Path(spec.hf_text_classification)
    data_path = data_path if data_path.is_absolute() else base / data_path
    tok_dir = Path(spec.tokenizer) if spec.tokenizer else Path(folder)
    tok_dir = tok_dir if tok_dir.is_absolute() else base / tok_dir
    columns = [spec.text_column, spec.label_column]
    if spec.text_pair_column:
        columns.append(spec.text_pair_column)
    rows = read_examples(data_path, columns)
    labels = label_ids([r[spec.label_column] for r in rows], folder, str(data_path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tok_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError) as err:
        raise ConfigError(f"{tok_dir}: cannot load a tokenizer ({err})") from None
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"{tok_dir}: the tokenizer has no padding token; set pad_token in its "
            "tokenizer_config.json (and pad_token_id in config.json)"
        )
    batches = []
    for start in range(0, len(rows), spec.batch_size):
        chunk = rows[start : start + spec.batch_size]
        pairs = [str(r[spec.text_pair_column]) for r in chunk] if spec.text_pair_column else None
        encoded = tokenizer(
            [str(r[spec.text_column]) for r in chunk],
            pairs,
            max_length=spec.max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        batch = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        batch["labels"] = torch.tensor(labels[start : start + spec.batch_size])
        batches.append(batch)
    kind = Accuracy if spec.metric == "accuracy" else MeanLoss
    return kind(batches, batch_size=spec.batch_size, name=spec.name)
