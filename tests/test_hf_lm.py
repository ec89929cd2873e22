"""Language models cooked from YAML alone: tiny random Llama/GPT-2 folders built in tmp_path.

The loss and the multiple-choice accuracy are checked against sums of log-probabilities
computed here by hand, one document at a time, with no padding or windows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from modelsoup.cli import main  # noqa: E402
from modelsoup.cook.config import load_config, resolve_parts  # noqa: E402
from modelsoup.errors import ConfigError  # noqa: E402
from modelsoup.hf import (  # noqa: E402
    CausalLMLoss,
    CausalLMLossData,
    MultipleChoice,
    MultipleChoiceData,
    causal_lm_loss,
    load_architecture,
    multiple_choice,
)
from modelsoup.ingredients import open_ingredients  # noqa: E402
from modelsoup.recipes.ensemble import Ensemble  # noqa: E402
from modelsoup.tasting import Taster  # noqa: E402

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then it was red blue "
    "green sky grass is what colour question answer :"
).split()
SPECIAL = ["[PAD]", "[UNK]", "<s>"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer on our own vocabulary that prepends <s>, built offline."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>"
    )


def _llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def lm_pool(tmp_path_factory):
    """Three "fine-tunes" of one tiny tied Llama: perturbed copies, saved with the tokenizer."""
    root = tmp_path_factory.mktemp("lm")
    tok = _tokenizer()
    base = _llama(0)
    for i in range(3):
        model = _llama(0)
        model.load_state_dict(base.state_dict())
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"ft-{i}")
        tok.save_pretrained(root / f"ft-{i}")
    (root / "held.txt").write_text(
        "the cat sat on the mat\nthe dog ran under the tree\n"
        "a bird flew over the log and then it sat\nthe sky is blue\n"
    )
    rows = [
        {"text": "the grass is green"},
        {"prompt": "what colour is the sky :", "completion": " blue"},
        {"prompt": "question : what sat on the mat answer :", "completion": " the red cat"},
        {"text": "the cat ran over the log"},
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _hand_nll(model, ids: list[int], first: int) -> tuple[float, int]:
    """Sum of -log p(token | all tokens before it) over positions first.., and their count."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    total = -sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))
    return total, len(ids) - first


def test_loss_equals_hand_computed_nll_with_prompt_masking(lm_pool, tmp_path):
    tok = _tokenizer()
    model = transformers.LlamaForCausalLM.from_pretrained(lm_pool / "ft-0").eval()
    docs = [
        {"text": "the cat sat on the mat"},
        {"prompt": "what colour is the sky :", "completion": " blue"},
        {"prompt": "the dog", "completion": " ran under the tree and then it sat"},
    ]
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    sums, counts = [], []
    for d in docs:
        prompt = d.get("prompt", "")
        ids = tok(prompt + d.get("completion", d.get("text", "")))["input_ids"]
        # the prompt's tokens (<s> included) are context only
        first = len(tok(prompt)["input_ids"]) if prompt else 1
        s, n = _hand_nll(model, ids, first)
        sums.append(s)
        counts.append(n)
    assert counts == [6, 1, 8]  # "blue" alone is scored in the second document

    ev = causal_lm_loss(
        CausalLMLossData(hf_causal_lm_loss=str(path), batch_size=2), lm_pool / "ft-0"
    )
    assert ev.higher_is_better is False and ev.name.startswith("causal_lm_loss[")
    assert ev.evaluate(model) == pytest.approx(sum(sums) / sum(counts), rel=1e-6)
    per_doc = ev.per_example(ev.logits(model))
    mean_len = sum(counts) / 3
    assert per_doc.tolist() == pytest.approx([s / mean_len for s in sums], rel=1e-6)
    assert float(per_doc.mean()) == pytest.approx(sum(sums) / sum(counts), rel=1e-6)

    by_doc = causal_lm_loss(
        CausalLMLossData(perplexity=str(path), average="documents"), lm_pool / "ft-0"
    )
    assert by_doc.per_example(by_doc.logits(model)).tolist() == pytest.approx(
        [s / n for s, n in zip(sums, counts)], rel=1e-6
    )
    assert by_doc.name != ev.name  # another way of scoring never shares a journal entry

    # The ensemble's loss is the mixture's: -log of the members' mean probability.
    other = transformers.LlamaForCausalLM.from_pretrained(lm_pool / "ft-1").eval()
    mixed = (ev.logits(model) + ev.logits(other)) / 2
    assert ev.score_logits(mixed) == pytest.approx(float(-mixed.log().mean()), rel=1e-12)
    assert ev.score_logits(mixed) < (ev.evaluate(model) + ev.evaluate(other)) / 2  # Jensen


def test_long_documents_are_read_in_windows_scoring_every_token_once(lm_pool, tmp_path):
    tok = _tokenizer()
    model = transformers.LlamaForCausalLM.from_pretrained(lm_pool / "ft-0").eval()
    text = "the cat sat on the mat and then the dog ran under the tree and it was red"
    path = tmp_path / "long.txt"
    path.write_text(text + "\n")
    ids = tok(text)["input_ids"]
    full = causal_lm_loss(
        CausalLMLossData(hf_causal_lm_loss=str(path), max_length=64), lm_pool / "ft-0"
    )
    s, n = _hand_nll(model, ids, 1)
    assert full.evaluate(model) == pytest.approx(s / n, rel=1e-6)

    windowed = causal_lm_loss(
        CausalLMLossData(hf_causal_lm_loss=str(path), max_length=6, stride=2), lm_pool / "ft-0"
    )
    assert windowed.owner.numel() == len(ids) - 1  # every token after the first, once
    # by hand: the first window scores 1..5; each later one 2 new tokens after 4 of context
    total, ends = _hand_nll(model, ids[:6], 1)[0], list(range(8, len(ids), 2)) + [len(ids)]
    prev = 6
    for end in dict.fromkeys(ends):
        window = ids[end - 6 : end]
        total += _hand_nll(model, window, 6 - (end - prev))[0]
        prev = end
    assert windowed.evaluate(model) == pytest.approx(total / (len(ids) - 1), rel=1e-6)


def test_causal_lm_cook_from_yaml_end_to_end(lm_pool, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = lm_pool / "soup.yaml"
    cfg.write_text(
        f"""
model: hf
ingredients: ["{lm_pool}/ft-*"]
held_out: {{perplexity: held.txt, max_length: 8, stride: 4, batch_size: 3}}
test: {{hf_causal_lm_loss: test.jsonl}}
recipes: [{{name: greedy}}]
task: causal_lm
output: {out}
bootstrap_resamples: 200
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["higher_is_better"] is False
    assert report["held_out_evaluator"].startswith("causal_lm_loss[")
    rows = {r["method"]: r for r in report["rows"]}
    assert {"best_individual", "uniform", "ensemble", "greedy (sorted)"} <= set(rows)
    for row in rows.values():
        assert row["held_out_perplexity"] == pytest.approx(math.exp(row["held_out"]))
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test"]))
        low, high = row["test_ci"]
        assert low <= row["test"] <= high  # per-document values whose mean is the score
    assert "vs_best_individual" in rows["uniform"]
    assert "(perplexity " in (out / "report.md").read_text()

    # The saved soup is an ordinary causal-LM folder: tied head, no lm_head stored.
    folder = out / rows["uniform"]["saved"]
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    held = causal_lm_loss(
        CausalLMLossData(perplexity="held.txt", max_length=8, stride=4, batch_size=3),
        lm_pool / "ft-0",
        base_dir=lm_pool,
    )
    assert held.evaluate(loaded.eval()) == pytest.approx(rows["uniform"]["held_out"], rel=1e-6)
    singles = [
        held.evaluate(transformers.AutoModelForCausalLM.from_pretrained(lm_pool / f"ft-{i}").eval())
        for i in range(3)
    ]
    assert rows["best_individual"]["held_out"] == pytest.approx(min(singles), rel=1e-6)


def test_multiple_choice_accuracy_on_a_file_with_known_answers(lm_pool, tmp_path):
    tok = _tokenizer()
    model = transformers.LlamaForCausalLM.from_pretrained(lm_pool / "ft-0").eval()
    questions = [
        ("what colour is the sky :", ["blue", "green", "red"]),
        ("the cat sat on the", ["mat", "log under the tree"]),
        ("the bird flew over the", ["tree", "grass", "dog and the cat"]),
    ]

    def scores(question, choices, normalize):
        out = []
        for c in choices:
            ids = tok(question + " " + c)["input_ids"]
            first = len(tok(question)["input_ids"])
            s, n = _hand_nll(model, ids, first)
            out.append(-s / (n if normalize == "tokens" else 1))
        return out

    for normalize in ("none", "tokens"):
        rows, right = [], []
        for k, (q, choices) in enumerate(questions):
            ranked = sorted(range(len(choices)), key=scores(q, choices, normalize).__getitem__)
            # the model's favourite is the answer for two questions; its least favourite for one
            answer = ranked[0] if k == 1 else ranked[-1]
            right.append(k != 1)
            rows.append(
                {"question": q, "choices": choices, "answer": choices[answer] if k else answer}
            )
        path = tmp_path / f"mc-{normalize}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = MultipleChoiceData(hf_multiple_choice=str(path), normalize=normalize, batch_size=2)
        ev = multiple_choice(spec, lm_pool / "ft-0")
        table = ev.logits(model)
        for k, (q, choices) in enumerate(questions):
            assert table[k, : len(choices)].tolist() == pytest.approx(scores(q, choices, normalize))
        assert ev.per_example(table).tolist() == [float(r) for r in right]
        assert ev.evaluate(model) == pytest.approx(2 / 3)


def test_model_hf_builds_the_head_config_json_names(tmp_path):
    gpt2 = transformers.GPT2Config(
        vocab_size=30,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    built = load_architecture(tmp_path / "gpt2")
    assert type(built).__name__ == "GPT2LMHeadModel"
    assert "lm_head.weight" not in built.state_dict()  # tied to wte, stored once
    assert (
        type(load_architecture(tmp_path / "gpt2", task="causal_lm")).__name__ == "GPT2LMHeadModel"
    )
    bert = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=5,
    )
    transformers.BertForTokenClassification(bert).save_pretrained(tmp_path / "ner")
    assert type(load_architecture(tmp_path / "ner")).__name__ == "BertForTokenClassification"
    masked = load_architecture(tmp_path / "ner", task="masked_lm")
    assert type(masked).__name__ == "BertForMaskedLM"
    with pytest.raises(ConfigError, match="task 'causal' is not known"):
        load_architecture(tmp_path / "gpt2", task="causal")


def test_soups_of_a_causal_lm_through_the_taster_match_the_mean_state(lm_pool):
    ev = causal_lm_loss(lm_pool / "held.txt", lm_pool / "ft-0")
    pool = open_ingredients(sorted(lm_pool.glob("ft-*")))
    taster = Taster(pool, load_architecture(lm_pool / "ft-0"), ev)
    score = taster.score_members([0, 1, 2])
    states = [
        transformers.LlamaForCausalLM.from_pretrained(p).state_dict()
        for p in sorted(lm_pool.glob("ft-*"))
    ]
    mean = _llama(0)
    mean.load_state_dict({k: sum(s[k] for s in states) / 3 for k in states[0]})
    assert score == pytest.approx(ev.evaluate(mean), rel=1e-5)
    assert Ensemble("ensemble", [0, 1]).score(taster, ev) < max(taster.individual_scores())


def test_lm_config_errors_name_the_key(lm_pool, tmp_path, capsys):
    base = f"model: hf\ningredients: [{lm_pool}/ft-0]\noutput: {tmp_path / 'o'}\n"
    cases = {
        "held_out: {perplexity: held.txt, max_len: 8}\n": "key 'held_out.max_len': unknown key",
        "held_out: {perplexity: held.txt, max_length: 8, stride: 8}\n": "stride 8 must be smaller",
        "held_out: {hf_multiple_choice: mc.jsonl, normalise: tokens}\n": "'held_out.normalise'",
        "held_out: {perplexity: held.txt}\ntask: causal\n": "task 'causal' is not known",
    }
    for extra, message in cases.items():
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(base + extra)
        assert main(["cook", str(cfg)]) == 2
        assert message in capsys.readouterr().err
    cfg.write_text("model: m:f\ningredients: [a]\nheld_out: m:e\noutput: o\ntask: causal_lm\n")
    with pytest.raises(ConfigError, match="task: applies to model: hf only"):
        load_config(cfg)


def test_bad_lm_data_is_refused_with_the_example_named(lm_pool, tmp_path):
    folder = lm_pool / "ft-0"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "the cat"}) + "\n")
    with pytest.raises(ConfigError, match="example 1: no 'text' and no 'completion' field"):
        causal_lm_loss(bad, folder)
    bad.write_text(json.dumps({"prompt": "the cat", "completion": " "}) + "\n")
    with pytest.raises(ConfigError, match="example 1: the text to score is empty"):
        causal_lm_loss(bad, folder)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "sky", "choices": ["blue", "red"], "answer": 2}) + "\n")
    with pytest.raises(ConfigError, match="answer 2 is not a choice index"):
        multiple_choice(mc, folder)
    mc.write_text(json.dumps({"question": "sky", "choices": ["blue"], "answer": 0}) + "\n")
    with pytest.raises(ConfigError, match="must list two or more texts"):
        multiple_choice(mc, folder)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="no documents"):
        causal_lm_loss(empty, folder)


def test_the_language_models_doc_example_runs(tmp_path, monkeypatch, capsys):
    doc = Path(__file__).resolve().parents[1] / "docs" / "language-models.md"
    block = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(doc), "exec"), {})
    assert "On held-out data the best soup is" in capsys.readouterr().out
    assert (tmp_path / "lm-kitchen" / "soups" / "report.md").is_file()


def test_a_config_names_the_lm_evaluators_and_the_task(lm_pool, tmp_path):
    row = {"question": "the sky is", "choices": ["blue", "green"], "answer": 0}
    (tmp_path / "mc.jsonl").write_text(json.dumps(row) + "\n")
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"model: hf\ningredients: [{lm_pool}/ft-*]\ntask: causal_lm\noutput: out\n"
        f"held_out: {{perplexity: {lm_pool}/held.txt, average: documents}}\n"
        "test: {hf_multiple_choice: mc.jsonl, normalize: characters}\n"
    )
    parts = resolve_parts(load_config(cfg))
    assert isinstance(parts.held_out, CausalLMLoss) and parts.held_out.average == "documents"
    assert isinstance(parts.test, MultipleChoice) and parts.test.answers.tolist() == [0]
    assert parts.test.divisors.tolist() == [4.0, 5.0]  # "blue", "green": lm-eval's acc_norm
    assert type(parts.model()).__name__ == "LlamaForCausalLM"


def test_a_tokenizer_that_appends_an_end_token_still_scores_the_completion():
    from modelsoup.hf.language import split_ids

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", "sky", "is", "blue"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    # "sky is" alone is <s> sky is </s>: its </s> is not the prompt's, "blue" is scored
    assert split_ids(fast, "sky is", " blue") == ([1, 3, 4, 5, 2], 3)
    assert split_ids(_tokenizer(), "sky is", " blue")[1] == 3  # <s> only: as before


def test_a_choice_is_scored_by_its_own_tokens_and_characters_as_lm_eval_harness(tmp_path):
    from modelsoup.hf.language import MultipleChoiceData, multiple_choice

    words = ["[UNK]", "<s>", "</s>", "[PAD]", "sky", "is", "blue", "green", "grass"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )  # an EOS after every text: not part of any choice
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    ).save_pretrained(tmp_path)
    # "blue zzz" ends in [UNK], a special token of the text's own: it is the choice's
    row = {"question": "sky is", "choices": ["blue", "green grass", "blue zzz"], "answer": 0}
    (tmp_path / "mc.jsonl").write_text(json.dumps(row) + "\n")
    spec = MultipleChoiceData(hf_multiple_choice=str(tmp_path / "mc.jsonl"), normalize="tokens")
    assert multiple_choice(spec, tmp_path).divisors.tolist() == [1.0, 2.0, 2.0]  # no </s>
    spec = spec.model_copy(update={"normalize": "characters"})
    assert multiple_choice(spec, tmp_path).divisors.tolist() == [4.0, 11.0, 8.0]  # len(choice)


def test_the_learned_soup_refuses_a_language_model_evaluator(lm_pool, tmp_path, capsys):
    cfg = tmp_path / "learned.yaml"
    cfg.write_text(
        f"""
model: hf
ingredients: ["{lm_pool}/ft-*"]
held_out: {{perplexity: {lm_pool}/held.txt, max_length: 8, batch_size: 3}}
recipes: [{{name: learned}}]
task: causal_lm
baselines: false
output: {tmp_path / "out"}
"""
    )
    assert main(["cook", str(cfg), "-q"]) == 2
    assert "the learned soup fits its coefficients to one class label" in capsys.readouterr().err


def test_model_hf_cooks_lora_adapters_over_their_base(lm_pool, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    base_dir = lm_pool / "ft-0"
    adapters = []
    for i in range(2):
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(10 + i)
        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=False)  # fmt: skip
        tuned = peft.get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn_like(p))
        tuned.save_pretrained(tmp_path / f"ad-{i}")
        adapters.append(tmp_path / f"ad-{i}")
    held_spec = "{perplexity: held.txt, max_length: 8, stride: 4}"
    out = tmp_path / "out"
    for base_line in ("", f"base: {base_dir}\n"):  # named by the adapters, or given
        cfg = lm_pool / "adapters.yaml"
        cfg.write_text(
            f"model: hf\ningredients: [{tmp_path}/ad-*]\nheld_out: {held_spec}\n"
            f"recipes: [uniform]\noutput: {out}\nbootstrap_resamples: 100\n{base_line}"
        )
        assert main(["cook", str(cfg), "-q"]) == 0, capsys.readouterr().err
        rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
        held = causal_lm_loss(
            CausalLMLossData(perplexity="held.txt", max_length=8, stride=4),
            base_dir,
            base_dir=lm_pool,
        )
        merged = [
            peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(base_dir), a
            ).merge_and_unload()
            for a in adapters
        ]
        # each adapter was scored as the model PEFT merges from it over the base
        best = min(held.evaluate(m.eval()) for m in merged)
        assert rows["best_individual"]["held_out"] == pytest.approx(best, rel=1e-5)
    # a base that is no Hugging Face folder cannot give model: hf its architecture
    (tmp_path / "flat").mkdir()
    cfg.write_text(cfg.read_text().replace(f"base: {base_dir}", f"base: {tmp_path}/flat"))
    assert main(["cook", str(cfg), "-q"]) == 2
    assert "is not a Hugging Face folder with config.json" in capsys.readouterr().err
