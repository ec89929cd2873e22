"""Hugging Face classifiers cooked from YAML alone: tiny BERT folders built in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modelsoup.cli import main  # noqa: E402
from modelsoup.errors import ConfigError  # noqa: E402
from modelsoup.hf import (  # noqa: E402
    TextClassificationData,
    label_ids,
    load_architecture,
    require_transformers,
    text_classification,
)
from modelsoup.recipes.uniform import average  # noqa: E402

WORDS = (
    "the a an this that movie film story plot acting actor music scene end it was is were "
    "very really quite so too not never good great fine fun superb lovely bad awful dull "
    "boring poor weak love loved hate hated liked enjoyed and but or with without"
).split()
GOOD, BAD = WORDS[24:30], WORDS[30:36]


def _sentences(n: int, seed: int) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=gen))
        pool = GOOD if label else BAD
        filler = [WORDS[int(i)] for i in torch.randint(0, 20, (4,), generator=gen)]
        cue = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        rows.append((" ".join([*filler[:2], cue, *filler[2:]]), "pos" if label else "neg"))
    return rows


def _bert_config(vocab_size: int, **extra) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
        **extra,
    )


def _tokenizer(folder):
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizer(str(vocab))  # a WordPiece tokenizer on our own vocab


@pytest.fixture(scope="module")
def hf_pool(tmp_path_factory):
    """Four fine-tuned-looking BERT classifiers: one start, perturbed and briefly trained."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer(root)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_bert_config(tok.vocab_size))
    train = _sentences(64, seed=1)
    enc = tok([t for t, _ in train], padding=True, return_tensors="pt")
    labels = torch.tensor([1 if lab == "pos" else 0 for _, lab in train])
    for i in range(4):
        model = transformers.BertForSequenceClassification(_bert_config(tok.vocab_size))
        model.load_state_dict(base.state_dict())
        torch.manual_seed(10 + i)
        opt = torch.optim.Adam(model.parameters(), lr=(1e-3, 3e-3, 1e-2, 3e-4)[i])
        model.train()
        for _ in range(8):
            opt.zero_grad()
            model(**enc, labels=labels).loss.backward()
            opt.step()
        folder = root / f"ft-{i}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "vocab.txt").write_text((root / "vocab.txt").read_text())
    held, test = _sentences(40, seed=2), _sentences(30, seed=3)
    (root / "held.csv").write_text(
        "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in held)
    )  # labels by name, mapped through config.json's label2id
    (root / "test.jsonl").write_text(
        "".join(json.dumps({"sentence": t, "y": int(lab == "pos")}) + "\n" for t, lab in test)
    )  # integer labels, other column names
    return root


CONFIG = """
model: hf
ingredients: ["{root}/ft-*"]
held_out: {{hf_text_classification: held.csv, max_length: 16, batch_size: 8}}
test:
  hf_text_classification: test.jsonl
  text_column: sentence
  label_column: y
  max_length: 16
recipes:
  - {{name: greedy}}
  - {{name: pruned}}
output: {out}
bootstrap_resamples: 100
"""


def test_cook_hf_folders_from_yaml_and_load_the_soup(tmp_path, hf_pool, capsys):
    cfg = hf_pool / "soup.yaml"
    out = tmp_path / "out"
    cfg.write_text(CONFIG.format(root=hf_pool, out=out))
    assert main(["cook", str(cfg), "-q"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    held = text_classification(
        TextClassificationData(hf_text_classification="held.csv", max_length=16, batch_size=8),
        hf_pool / "ft-0",
        base_dir=hf_pool,
    )
    for method in ("greedy (sorted)", "uniform"):
        row = next(r for r in report["rows"] if r["method"] == method)
        folder = out / row["saved"]
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= {
            p.name for p in folder.iterdir()
        }
        loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = {w: i for i, w in enumerate((hf_pool / "vocab.txt").read_text().split())}
        assert tok("good film")["input_ids"] == [2, ids["good"], ids["film"], 3]

        # The soup materialised from its card gives the same logits as the saved folder.
        card = json.loads((folder / "soup_card.json").read_text())
        paths = [c["path"] for c in card["ingredients"]]
        soup = average(paths, weights=[c["coefficient"] for c in card["ingredients"]])
        assert soup.size == len(row["chosen"])
        fresh = soup.apply(load_architecture(hf_pool / "ft-0"))
        assert torch.equal(held.logits(loaded), held.logits(fresh))
        assert held.evaluate(loaded) == row["held_out"]


def test_tied_weights_materialise_and_reload(tmp_path):
    tok = _tokenizer(tmp_path)
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        mlm = transformers.BertForMaskedLM(_bert_config(tok.vocab_size))
        folders.append(tmp_path / f"mlm-{i}")
        mlm.save_pretrained(folders[-1])  # stores the tied decoder weight once
    soup = average(folders)
    model = soup.apply(load_architecture(folders[0], auto_class="AutoModelForMaskedLM"))
    emb = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model.cls.predictions.decoder.weight, emb)  # still tied
    assert torch.equal(emb, soup.tensor("bert.embeddings.word_embeddings.weight"))
    out = soup.save(tmp_path / "soup", progress=False)
    loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.cls.predictions.decoder.weight, emb)


def test_bad_hf_evaluator_keys_are_named(tmp_path, hf_pool, capsys):
    cfg = tmp_path / "bad.yaml"
    text = CONFIG.format(root=hf_pool, out=tmp_path / "out").replace(
        "max_length: 16,", "max_len: 16,"
    )
    cfg.write_text(text)
    assert main(["cook", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config key 'held_out.max_len': unknown key" in err


def test_unknown_label_names_are_refused(hf_pool, tmp_path):
    with pytest.raises(ConfigError, match="label 'meh' is neither an integer nor a name"):
        label_ids(["pos", "meh"], hf_pool / "ft-0", "held.csv")
    with pytest.raises(ConfigError, match="the model has 2 classes"):
        label_ids([2], hf_pool / "ft-0")
    bad = tmp_path / "held.csv"
    bad.write_text("sentence,label\nfun,pos\n")
    with pytest.raises(ConfigError, match="no 'text' column"):
        text_classification(bad, hf_pool / "ft-0")


def test_non_folder_ingredients_are_refused_for_model_hf(tmp_path, capsys):
    (tmp_path / "a.safetensors").write_bytes(b"")
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(f"model: hf\ningredients: [{tmp_path / 'a.safetensors'}]\nheld_out: m:f\n")
    cfg.write_text(cfg.read_text() + f"output: {tmp_path / 'out'}\n")
    assert main(["cook", str(cfg)]) == 2
    assert "needs Hugging Face model folders" in capsys.readouterr().err


def test_core_does_not_import_transformers():
    code = (
        "import sys, modelsoup, modelsoup.cook, modelsoup.cli, modelsoup.hf, "
        "modelsoup.distributed; print('transformers' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr


def test_missing_transformers_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r"install modelsoup\[hf\]"):
        require_transformers()


def test_classifiers_that_order_their_classes_differently_are_refused(tmp_path):
    from modelsoup.errors import IncompatibleIngredientsError
    from modelsoup.ingredients import check_compatible, open_ingredients

    transformers = pytest.importorskip("transformers")
    folders = []
    for i, labels in enumerate([("neg", "pos"), ("pos", "neg"), ("neg", "pos")]):
        cfg = transformers.BertConfig(
            vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, id2label=dict(enumerate(labels)),
            label2id={name: n for n, name in enumerate(labels)},
        )  # fmt: skip
        torch.manual_seed(0)
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    with pytest.raises(IncompatibleIngredientsError, match="order their classes differently"):
        check_compatible(open_ingredients(folders[:2]))
    check_compatible(open_ingredients([folders[0], folders[2]]))  # the same order: fine


def test_data_files_in_other_encodings_and_with_a_byte_order_mark(hf_pool, tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9 fun,pos\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.csv: not UTF-8 text \(byte 0xe9"):
        text_classification(latin, hf_pool / "ft-0")
    excel = tmp_path / "excel.csv"
    excel.write_bytes("\ufefftext,label\nfun,pos\ndull,neg\n".encode())  # as Excel saves it
    assert len(text_classification(excel, hf_pool / "ft-0").labels) == 2


def test_max_length_is_fitted_to_the_models_positions(hf_pool, tmp_path):
    from modelsoup.hf import TextClassificationData

    positions = json.loads((hf_pool / "ft-0" / "config.json").read_text())[
        "max_position_embeddings"
    ]
    held = hf_pool / "held.csv"
    ev = text_classification(held, hf_pool / "ft-0")  # the default 512 is lowered
    assert max(x["input_ids"].shape[1] for x, _ in ev.batches(torch.device("cpu"))) <= positions
    too_long = TextClassificationData(hf_text_classification=str(held), max_length=positions + 1)
    with pytest.raises(ConfigError, match=f"longer than the {positions} positions"):
        text_classification(too_long, hf_pool / "ft-0")


def test_a_decoder_classifier_padded_with_another_id_than_its_config_scores_alike_in_any_batch(
    hf_pool, tmp_path
):
    # the tokenizer pads with [PAD] (0); config.json says pad_token_id 3, the id the
    # classifier looks for to find each example's last token
    tok = _tokenizer(tmp_path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
        pad_token_id=3,
    )  # fmt: skip
    folder = tmp_path / "llama-cls"
    transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = transformers.LlamaForSequenceClassification.from_pretrained(folder).eval()
    held = tmp_path / "held.csv"  # texts of different lengths: batches are padded
    rows = [(" ".join(t.split()[: 2 + i % 4]), lab) for i, (t, lab) in enumerate(_sentences(24, 5))]
    held.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    scores = [
        text_classification(
            TextClassificationData(hf_text_classification=str(held), metric="loss",
                                   batch_size=size),
            folder,
        ).evaluate(model)
        for size in (1, 8)
    ]  # fmt: skip
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


def test_text_that_is_not_a_string_and_a_column_named_twice_are_refused(hf_pool, tmp_path):
    listed = tmp_path / "held.jsonl"
    listed.write_text(json.dumps({"text": ["good", "film"], "label": "pos"}) + "\n")
    with pytest.raises(ConfigError, match="example 1: 'text' is list .*not a string"):
        text_classification(listed, hf_pool / "ft-0")
    twice = tmp_path / "twice.csv"
    twice.write_text("text,label,text\ngood,pos,bad\n")
    with pytest.raises(ConfigError, match="column 'text' appears twice"):
        text_classification(twice, hf_pool / "ft-0")
    blank = tmp_path / "blank.csv"  # a spreadsheet's trailing unnamed columns are fine
    blank.write_text("text,label,,\ngood film,pos,,\nbad film,neg,,\n")
    assert len(text_classification(blank, hf_pool / "ft-0").labels) == 2
