"""Soups while training: the Lightning callback cooks a tiny classifier's checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from modelsoup import cook  # noqa: E402
from modelsoup.errors import ConfigError  # noqa: E402
from modelsoup.integrations import LightningSoupCallback  # noqa: E402
from modelsoup.integrations.lightning import ValidationMetric  # noqa: E402


class Classifier(pl.LightningModule):
    """Three classes from four features; logs its validation loss and accuracy."""

    def __init__(self, lr: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Wrapped(Classifier):
    """The common layout that wraps one network as ``self.model``."""

    def __init__(self, lr: float = 0.5):
        super().__init__(lr)
        del self.layer
        layers = [torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def _loaders():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    data = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(data(x[:64], y[:64]), batch_size=16)
    val = torch.utils.data.DataLoader(data(x[64:], y[64:]), batch_size=16)
    return train, val


def _trainer(root, callback, epochs=2, package=pl, **trainer_options):
    options = {
        "max_epochs": epochs,
        "default_root_dir": str(root),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "callbacks": [callback],
        **trainer_options,
    }
    return package.Trainer(**options)


def _fit(root, callback, module=None, epochs=2, ckpt_path=None, **trainer_options):
    torch.manual_seed(0)
    module = module or Classifier()
    trainer = _trainer(root, callback, epochs, **trainer_options)
    train, val = _loaders()
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_a_two_epoch_fit_cooks_its_own_checkpoints_into_lawa_and_greedy(tmp_path):
    callback = LightningSoupCallback(last=2, monitor="val_loss", bootstrap_resamples=100)
    trainer, module = _fit(tmp_path, callback)

    saved = [p.name for p in callback.saved]
    assert saved == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    out = tmp_path / "soup"
    report = json.loads((out / "report.json").read_text())
    assert report["held_out_evaluator"].startswith("lightning[val_loss][")
    rows = {r["method"]: r for r in report["rows"]}
    assert {"greedy (sorted)", "lawa (last 2)", "uniform", "best_individual"} <= set(rows)
    assert (out / "report.md").is_file()

    # LAWA over the last 2 is the mean of the two checkpoints, saved in Lightning's layout
    lawa = out / rows["lawa (last 2)"]["saved"]
    assert lawa.name.endswith(".ckpt")
    first, last = (_weights(p) for p in callback.saved)
    soup = Classifier.load_from_checkpoint(lawa).state_dict()
    for name in first:
        assert torch.allclose(soup[name], (first[name] + last[name]) / 2, atol=1e-6)

    # The held-out score is the run's own logged val_loss on the same data, and the
    # module has its trained weights back
    scores = {i["label"]: i["held_out"] for i in report["individuals"]}
    assert scores["epoch=1-step=8"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    assert all(torch.equal(module.state_dict()[k], last[k]) for k in last)
    assert module.trainer is trainer


def test_model_checkpoint_files_are_the_ingredients_and_load_puts_the_soup_in(tmp_path):
    keep_all = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1)
    (tmp_path / "ckpts").mkdir()
    stale = tmp_path / "ckpts" / "epoch=9-step=99.ckpt"  # an earlier run's: not this fit's
    torch.save({"state_dict": {}}, stale)
    callback = LightningSoupCallback(
        [{"name": "uniform"}], monitor="val_acc", mode="max", load="uniform", save="none"
    )
    _, module = _fit(tmp_path, callback, module=Wrapped(), epochs=3, callbacks=[keep_all, callback])

    found = callback.checkpoints(module.trainer)
    assert [p.name for p in found] == [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(3)]
    assert callback.saved == []  # the ModelCheckpoint's files were enough
    assert callback.result is not None and callback.result.higher_is_better
    states = [_weights(p) for p in found]
    for name, value in module.state_dict().items():  # names keep Lightning's model. prefix
        mean = sum(s[name] for s in states) / 3
        assert torch.allclose(value, mean, atol=1e-6), name


def test_greedy_in_the_callback_picks_what_a_direct_cook_picks(tmp_path):
    callback = LightningSoupCallback(monitor="val_loss", bootstrap_resamples=100)
    _fit(tmp_path, callback, epochs=4)
    assert callback.every == "epoch" and len(callback.saved) == 4

    _, val = _loaders()
    fresh = Classifier()
    direct = cook(
        [str(p) for p in callback.saved],
        fresh,
        ValidationMetric(fresh, val, "val_loss", "min"),
        recipes=[{"name": "greedy"}],
        progress=False,
    )
    ours = callback.result.method("greedy (sorted)")
    theirs = direct.method("greedy (sorted)")
    assert ours.result.chosen == theirs.result.chosen
    assert ours.held_out == pytest.approx(theirs.held_out)


def test_held_out_function_sees_the_module_and_every_validation_saves(tmp_path):
    _, val = _loaders()
    seen = []

    def accuracy(module):
        seen.append(type(module).__name__)
        x, y = val.dataset.tensors
        with torch.no_grad():
            return float((module(x).argmax(1) == y).float().mean())

    callback = LightningSoupCallback(
        held_out=accuracy, every="validation", output_dir=tmp_path / "mine", save="none"
    )
    _fit(tmp_path, callback, module=Wrapped(), val_check_interval=2)
    assert [p.name for p in callback.saved][:3] == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=1-step=6.ckpt",
    ]
    assert set(seen) == {"Wrapped"}  # the module, though the cook writes into its .model
    assert (tmp_path / "mine" / "report.json").is_file()


@pytest.mark.parametrize(
    ("options", "trainer_options", "message"),
    [
        ({}, {}, "needs a held-out score: pass monitor="),
        ({"monitor": "val_loss", "load": "greedy_ensemble"}, {}, "no recipe or report row"),
        # what is known when the callback is built fails then, not after training
        ({"monitor": "val_loss", "recipes": [{"name": "greeedy"}]}, None, "'greeedy' is unknown"),
        ({"monitor": "val_loss", "bootstrap_resample": 10}, None, "'bootstrap_resample'"),
        ({"monitor": "val_loss", "recipes": ["ensemble"]}, None, "ensemble averages logits"),
        (
            {"held_out": lambda m: 1.0, "every": "validation"},
            {"limit_val_batches": 0},
            "no checkpoints from this fit",
        ),
        ({"every": "step"}, None, "every='step'"),
        ({"last": 0}, None, "last=0"),
    ],
)
def test_misuse_is_one_clear_line(tmp_path, options, trainer_options, message):
    with pytest.raises(ConfigError) as err:
        _fit(tmp_path, LightningSoupCallback(**options), epochs=1, **(trainer_options or {}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_monitor_never_logged_fails_after_the_first_validation(tmp_path):
    callback = LightningSoupCallback(monitor="val_f1", mode="max")
    trainer = _trainer(tmp_path, callback, epochs=3)
    train, val = _loaders()
    with pytest.raises(ConfigError) as err:
        trainer.fit(Classifier(), train, val)
    assert str(err.value) == (
        "LightningSoupCallback: monitor 'val_f1' was never logged in this fit (logged: "
        "val_acc, val_loss); log it in validation_step, or pass monitor= one of those"
    )
    assert trainer.current_epoch == 0  # not three epochs later


def test_no_validation_data_fails_before_training(tmp_path):
    callback = LightningSoupCallback(monitor="val_loss")
    trainer = _trainer(tmp_path, callback, epochs=1)
    train, _ = _loaders()
    with pytest.raises(ConfigError, match="no validation data") as err:
        trainer.fit(Classifier(), train)
    assert "\n" not in str(err.value) and trainer.global_step == 0


def test_the_docs_lightning_example_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "language-models.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    block = next(b for b in blocks if "LightningSoupCallback" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(doc), "exec"), {})
    assert "On held-out data" in capsys.readouterr().out
    assert (tmp_path / "lightning-run" / "soup" / "report.md").is_file()
    assert list((tmp_path / "lightning-run" / "soup" / "soups").glob("greedy*.ckpt"))


def test_a_pytorch_lightning_trainer_works_too(tmp_path):
    old = pytest.importorskip("pytorch_lightning")

    class Older(old.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

        training_step = Classifier.training_step
        validation_step = Classifier.validation_step
        forward = Classifier.forward

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    callback = LightningSoupCallback([{"name": "uniform"}], monitor="val_loss", save="none")
    trainer = _trainer(tmp_path, callback, package=old)
    train, val = _loaders()
    trainer.fit(Older(), train, val)
    labels = [i.label for i in callback.result.ingredients]
    scores = dict(zip(labels, callback.result.individual_held_out))
    assert scores["epoch=1-step=8"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))


def test_a_resumed_fit_keeps_the_earlier_checkpoints_as_ingredients(tmp_path):
    _fit(tmp_path, LightningSoupCallback(monitor="val_loss", save="none"))
    resume = tmp_path / "checkpoints" / "epoch=1-step=8.ckpt"  # Lightning's own, full
    callback = LightningSoupCallback([{"name": "uniform"}], monitor="val_loss", save="none")
    _fit(tmp_path, callback, epochs=3, ckpt_path=resume)
    labels = [i.label for i in callback.result.ingredients]
    assert labels == ["epoch=0-step=4", "epoch=1-step=8", "epoch=2-step=12"]


def test_one_validation_batch_is_what_the_cook_scores_too(tmp_path):
    callback = LightningSoupCallback(monitor="val_loss", save="none", bootstrap_resamples=20)
    trainer, _ = _fit(tmp_path, callback, epochs=1, limit_val_batches=1)  # an int: one batch
    logged = float(trainer.callback_metrics["val_loss"])  # the last checkpoint's, one batch
    assert callback.result.individual_held_out[-1] == pytest.approx(logged, rel=1e-5)
