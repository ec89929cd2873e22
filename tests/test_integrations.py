"""Soups while training: the Trainer callback cooks a tiny causal LM's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

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


# -- a tiny BERT classifier (or regressor): which data chooses, which checkpoints count


def _tiny_bert(num_labels: int = 2) -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
        max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(cfg)


def _labelled(n: int, seed: int, *, flip: bool = False, regression: bool = False) -> list[dict]:
    """Six tokens; the label is whether the first is > 17 (``flip``: the opposite), or for
    ``regression`` the first token / 30."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, 30, (6,), generator=gen)
        label = float(ids[0]) / 30 if regression else int(ids[0] > 17) ^ int(flip)
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": label}
        )
    return rows


def _bert_trainer(tmp_path, callback, eval_dataset, *, epochs=2, num_labels=2, **options):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=options.pop("learning_rate", 5e-3),
        save_strategy="epoch",
        eval_strategy=options.pop("eval_strategy", "epoch"),
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **options,
    )
    return transformers.Trainer(
        model=_tiny_bert(num_labels),
        args=args,
        train_dataset=_labelled(16, 0, regression=num_labels == 1),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )


def test_a_dict_eval_dataset_needs_eval_key_and_the_soup_is_chosen_on_that_entry(tmp_path):
    from modelsoup.errors import ConfigError
    from modelsoup.integrations.hf_trainer import held_out_from_batches

    held, test = _labelled(8, 1), _labelled(8, 2, flip=True)
    trainer = _bert_trainer(tmp_path / "a", SoupCallback(), {"held": held, "test": test})
    with pytest.raises(ConfigError, match="several eval sets \\('held', 'test'\\).*eval_key="):
        trainer.train()  # at the first checkpoint, not after training

    callback = SoupCallback(metric="accuracy", eval_key="held", bootstrap_resamples=50)
    trainer = _bert_trainer(tmp_path / "b", callback, {"held": held, "test": test})
    trainer.predict(test)  # neither predict() nor the last evaluation ("test") chooses
    trainer.train()
    report = json.loads((tmp_path / "b" / "run" / "soup" / "report.json").read_text())
    wanted = held_out_from_batches(
        list(trainer.get_eval_dataloader("held")), trainer.model, "accuracy"
    )
    assert report["held_out_evaluator"] == wanted.name

    with pytest.raises(ConfigError, match="eval_key='valid' is not a key .*'held', 'test'"):
        _bert_trainer(
            tmp_path / "c", SoupCallback(eval_key="valid"), {"held": held, "test": test}
        ).train()


def test_the_callback_refuses_a_run_without_evaluations_before_it_trains(tmp_path):
    from modelsoup.errors import ConfigError

    trainer = _bert_trainer(tmp_path, SoupCallback(), _labelled(8, 1), eval_strategy="no")
    trainer.predict(_labelled(8, 2, flip=True))  # this data must never choose the soup
    with pytest.raises(ConfigError, match="eval_strategy is 'no'"):
        trainer.train()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_regression_model_is_judged_by_its_own_loss(tmp_path):
    from modelsoup.errors import ConfigError
    from modelsoup.integrations.hf_trainer import held_out_from_batches

    callback = SoupCallback(bootstrap_resamples=50)
    trainer = _bert_trainer(tmp_path, callback, _labelled(8, 1, regression=True), num_labels=1)
    trainer.train()
    report = json.loads((tmp_path / "run" / "soup" / "report.json").read_text())
    assert report["held_out_evaluator"].startswith("model_loss[")
    scores = {i["label"]: i["held_out"] for i in report["individuals"]}
    assert scores["checkpoint-4"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="metric='accuracy' needs one integer class label"):
        held_out_from_batches(list(trainer.get_eval_dataloader()), trainer.model, "accuracy")


@pytest.mark.parametrize("metric", ["acc", "Accuracy", "f1", None])
def test_an_unknown_metric_is_refused(metric):
    from modelsoup.errors import ConfigError

    with pytest.raises(ConfigError, match=f"metric={metric!r}: .*'loss'.*'accuracy'"):
        SoupCallback(metric=metric)


def test_cook_keywords_of_the_callback_are_checked_as_cook_takes_them():
    from modelsoup.errors import ConfigError

    SoupCallback(recalibrate=torch.randn(4, 3), labels=None, save="none")  # cook()'s own
    with pytest.raises(ConfigError, match="'bootstrap_resample'"):
        SoupCallback(bootstrap_resample=10)
    with pytest.raises(ConfigError, match="'progress' is set by the callback"):
        SoupCallback(progress=True)


def test_one_extra_checkpoint_given_as_a_string_is_one_path_not_its_characters():
    from modelsoup.errors import ConfigError

    callback = SoupCallback(extra_checkpoints="/runs/other/checkpoint-8")
    assert callback.extra_checkpoints == [Path("/runs/other/checkpoint-8")]
    with pytest.raises(ConfigError, match="give checkpoint paths"):
        SoupCallback(extra_checkpoints=[None])


@pytest.mark.parametrize(
    "subdir", ["checkpoint-6", "../elsewhere", "/abs/soup", "", "a/checkpoint-2"]
)
def test_an_output_subdir_among_the_checkpoints_is_refused_before_training(subdir):
    from modelsoup.errors import ConfigError

    with pytest.raises(ConfigError, match="output_subdir="):
        SoupCallback(output_subdir=subdir)


def test_only_the_checkpoints_of_this_run_are_ingredients(tmp_path):
    held = _labelled(8, 1)
    _bert_trainer(
        tmp_path, SoupCallback(save="none", bootstrap_resamples=50), held, epochs=4
    ).train()
    assert (tmp_path / "run" / "checkpoint-8").is_dir()

    # A new, shorter run in the same output_dir: the first run's checkpoints are leftovers.
    callback = SoupCallback(last=2, save="none", bootstrap_resamples=50)
    _bert_trainer(tmp_path, callback, held, epochs=1, learning_rate=1e-3).train()
    assert [i.label for i in callback.result.ingredients] == ["checkpoint-2"]

    # Resumed from the first run's checkpoint-4, the run goes on with that run: its
    # checkpoint-4 counts (checkpoint-2 is now the second run's, whose log differs), and
    # checkpoint-8 of the abandoned attempt does not; checkpoint-6 is saved again.
    callback = SoupCallback(save="none", bootstrap_resamples=50)
    trainer = _bert_trainer(tmp_path, callback, held, epochs=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert [i.label for i in callback.result.ingredients] == ["checkpoint-4", "checkpoint-6"]
