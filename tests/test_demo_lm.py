"""`modelsoup demo --lm`'s code path on a tiny random Llama (no SmolLM2 needed): seconds."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from modelsoup.demo import SMOLLM2, format_summary, run_demo  # noqa: E402
from modelsoup.demo.datasets import DataSplit, Subset  # noqa: E402
from modelsoup.errors import ConfigError  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log and then slept ate fish bone".split()


def _texts(settings) -> DataSplit:
    """Random little stories, a different set for train, held-out and test."""
    rng = random.Random(settings.split_seed)

    def part(n: int) -> Subset:
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]
        return Subset(texts, torch.zeros(n, dtype=torch.long))

    return DataSplit(part(settings.train), part(settings.heldout), part(settings.test), ("t",))


@pytest.fixture
def tiny_start(tmp_path):
    """A random 1-layer Llama with tied embeddings and a word-level tokenizer, saved."""
    folder = tmp_path / "tiny-llama"
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>"
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _settings(start) -> object:
    return dataclasses.replace(
        SMOLLM2,
        description="a tiny random Llama on random word stories",
        start_folder=str(start),
        texts=_texts,
        train=32,
        heldout=12,
        test=20,
        max_len=12,
        grid={"lr": (3e-3,)},
    )


def _nll(model, tokenizer, texts, max_len) -> float:
    """The token-level mean NLL of each text's first max_len tokens, by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_len]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
    return total / count


def test_lm_demo_cooks_by_held_out_loss_then_reruns_from_cache(tiny_start, tmp_path):
    settings = _settings(tiny_start)
    out, work = tmp_path / "out", tmp_path / "work"
    # progress on, without a terminal (as under make or CI): one log line per stage
    result = run_demo(settings=settings, output=out, workdir=work, progress=True)
    report = result.report

    assert [r["method"] for r in report["rows"]] == [
        "best_individual",
        "uniform",
        "ensemble",
        "greedy (sorted)",
    ]
    assert report["higher_is_better"] is False
    for row in report["rows"]:
        assert 0.0 < row["test"] < 10.0 and row["test_perplexity"] > 1.0
    assert result.trained == 3 and len(report["individuals"]) == 3

    # Three data orders from one start: every ingredient moved, and each differently.
    start = load_file(str(tiny_start / "model.safetensors"))
    paths = sorted((work / "smollm2" / "ingredients").glob("*.safetensors"))
    assert [p.stem for p in paths] == ["lr0.003_seed0", "lr0.003_seed1", "lr0.003_seed2"]
    states = [load_file(str(p)) for p in paths]
    embeddings = "model.embed_tokens.weight"
    for state in states:
        assert "lm_head.weight" not in state and set(state) == set(start)  # tied: stored once
        assert not torch.equal(state[embeddings], start[embeddings])
    assert not torch.equal(states[0]["model.norm.weight"], states[1]["model.norm.weight"])

    # The report's test loss of each ingredient is the mean token NLL computed by hand.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_start)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_start).eval()
    test_texts = _texts(settings).test.x
    by_test = sorted(i["test"] for i in report["individuals"])
    by_hand = []
    for state in states:
        model.load_state_dict(state, strict=False)  # lm_head is the tied embeddings
        assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
        by_hand.append(_nll(model, tokenizer, test_texts, settings.max_len))
    assert sorted(by_hand) == pytest.approx(by_test, rel=1e-5)

    printed = format_summary(result)
    assert "held-out nats" in printed and "greedy (sorted)" in printed
    assert f"Verdict: {report['verdict']}" in printed
    assert (out / "report.md").is_file() and (out / "soup.safetensors").is_file()

    again = run_demo(settings=settings, output=out, workdir=work, progress=False)
    assert again.trained == 0
    assert again.report["evaluations"]["evaluations"] == 0
    assert [r["test"] for r in again.report["rows"]] == [r["test"] for r in report["rows"]]


def test_lm_demo_refuses_two_variants_and_a_folder_without_weights(tmp_path):
    with pytest.raises(ConfigError, match="choose one demo variant"):
        run_demo(quick=True, lm=True, output=tmp_path / "o", workdir=tmp_path / "w")
    settings = dataclasses.replace(SMOLLM2, start_folder=str(tmp_path), texts=_texts)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        run_demo(settings=settings, output=tmp_path / "o", workdir=tmp_path / "w", progress=False)
