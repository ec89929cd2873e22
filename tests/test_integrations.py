"""Soups while training: the Trainer callback cooks a tiny causal LM's checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from safetensors.torch import load_file  # noqa: E402

from modelsoup.integrations import SoupCallback  # noqa: E402


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=24,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


def _rows(n: int, seed: int) -> list[dict]:
    """Counting sequences mod 20 (learnable), with the first two tokens as an unscored prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(2, 22, (1,), generator=gen))
        ids = [2 + (start + i) % 20 for i in range(10)]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def test_trainer_callback_cooks_the_checkpoints_of_a_two_epoch_run(tmp_path):
    model = _tiny_llama()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        save_strategy="epoch",
        eval_strategy="epoch",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SoupCallback(last=2, bootstrap_resamples=100)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_rows(32, 0),
        eval_dataset=_rows(12, 1),
        callbacks=[callback],
    )
    trainer.train()

    out = tmp_path / "run" / "soup"
    report = json.loads((out / "report.json").read_text())
    assert report["held_out_evaluator"].startswith("causal_lm_loss[")
    rows = {r["method"]: r for r in report["rows"]}
    assert {"greedy (sorted)", "lawa (last 2)", "uniform", "best_individual"} <= set(rows)
    assert rows["lawa (last 2)"]["chosen"] == ["checkpoint-4", "checkpoint-8"]
    assert (out / "report.md").is_file()
    soup = transformers.AutoModelForCausalLM.from_pretrained(out / rows["lawa (last 2)"]["saved"])
    first = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoint-8" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert torch.allclose(soup.state_dict()[emb], (first[emb] + last[emb]) / 2, atol=1e-6)
    assert callback.result is not None and callback.result.methods

    # The Trainer's model is back to what was trained, with its full state_dict.
    state = trainer.model.state_dict()
    assert "lm_head.weight" in state
    assert all(torch.equal(state[k], last[k]) for k in last)
    # The held-out loss is the Trainer's own eval loss on the same data (token mean).
    scores = {i.get("label"): i["held_out"] for i in report["individuals"]}
    assert scores["checkpoint-8"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-4)
