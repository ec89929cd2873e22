"""Ingredients as users have them: Trainer runs, timm run folders, Lightning, PEFT adapters.

How they are found, named and checked, and how a soup goes back where it came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import TinyNet, tiny_state
from modelsoup import SoupWarning, average, open_ingredients
from modelsoup.cli import main
from modelsoup.errors import IncompatibleIngredientsError, IngredientError
from modelsoup.formats.training_args import read_training_args
from modelsoup.ingredients import find_checkpoints, unique_labels


@pytest.fixture(scope="module")
def trainer_args():
    """One real TrainingArguments (the first one costs seconds: transformers sets up)."""
    transformers = pytest.importorskip("transformers")
    return transformers.TrainingArguments(output_dir="unused", report_to=[])


def _training_args(args, folder: Path, lr: float, seed: int) -> None:
    args.learning_rate, args.seed = lr, seed
    torch.save(args, folder / "training_args.bin")  # what Trainer does in every checkpoint


def _trainer_checkpoint(folder: Path, seed: int, config: dict | None = None) -> Path:
    """What transformers' Trainer writes into output_dir/checkpoint-N/."""
    folder.mkdir(parents=True)
    safetensors.torch.save_file(tiny_state(seed), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "tiny"}))
    (folder / "trainer_state.json").write_text('{"global_step": 26}')
    torch.save({"state": {}}, folder / "optimizer.pt")
    return folder


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- labels ---------------------------------------------------------------------------


def test_labels_are_the_shortest_distinguishing_path_suffix(tmp_path):
    paths = [
        tmp_path / "runs" / "lr1e-4-s0" / "checkpoint-26",
        tmp_path / "runs" / "lr3e-4-s1" / "checkpoint-26",
        tmp_path / "other" / "final.safetensors",
        tmp_path / "runs" / "lr1e-4-s0" / "checkpoint-26",  # the same path again
    ]
    assert unique_labels(paths + [None], [None] * 4 + [None]) == [
        "lr1e-4-s0/checkpoint-26",
        "lr3e-4-s1/checkpoint-26",
        "final",
        "lr1e-4-s0/checkpoint-26#2",
        "model4",
    ]
    # a given label is kept as is; only the others grow around it
    assert unique_labels(paths[:2], ["mine", None]) == ["mine", "checkpoint-26"]


def _kitchen(tmp_path: Path) -> None:
    (tmp_path / "kitchen.py").write_text(
        "import torch\n"
        "from conftest import TinyNet\n"
        "from modelsoup.evaluators import Accuracy\n"
        "def build():\n    return TinyNet()\n"
        "def _data(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    return Accuracy((torch.randn(48, 8, generator=g), "
        "torch.randint(0, 3, (48,), generator=g)))\n"
        "def held_out():\n    return _data(1)\n"
        "def test():\n    return _data(2)\n"
    )


def test_cook_over_trainer_runs_shows_distinct_labels_paths_and_the_grid(
    tmp_path, caplog, trainer_args
):
    from PIL import Image

    from modelsoup.cook.run import cook_config

    runs = tmp_path / "runs"
    grid = [(1e-4, 0), (3e-4, 1), (1e-4, 1)]
    for i, (lr, seed) in enumerate(grid):
        ckpt = _trainer_checkpoint(runs / f"lr{lr:g}-s{seed}" / "checkpoint-26", i)
        _training_args(trainer_args, ckpt, lr, seed)
    (runs / "logs").mkdir()  # no checkpoints in it: skipped, and said so
    _kitchen(tmp_path)
    (tmp_path / "soup.yaml").write_text(
        "model: kitchen:build\ningredients: [runs/]\nheld_out: kitchen:held_out\n"
        "test: kitchen:test\nrecipes: [{name: greedy}]\noutput: cooked\n"
        "bootstrap_resamples: 200\n"
    )
    with caplog.at_level(logging.INFO, logger="modelsoup"):
        result = cook_config(tmp_path / "soup.yaml", progress=False)
    said = "3 checkpoints found in 3 run folders"
    found = [r.message for r in caplog.records if said in r.message]
    assert found and "skipped logs/" in found[0]
    labels = ["lr0.0001-s0/checkpoint-26", "lr0.0003-s1/checkpoint-26", "lr0.0001-s1/checkpoint-26"]
    assert sorted(ing.label for ing in result.ingredients) == sorted(labels)

    out = tmp_path / "cooked"
    report = json.loads((out / "report.json").read_text())
    individuals = {row["label"]: row for row in report["individuals"]}
    assert set(individuals) == set(labels)
    for label, row in individuals.items():
        assert row["path"] == str(runs / label) and len(row["sha256"]) == 64
        assert row["hyperparameters"]["learning_rate"] in (1e-4, 3e-4)
    assert all(set(r["chosen"]) <= set(labels) for r in report["rows"])
    text = (out / "report.md").read_text()
    assert all(f"| {label} |" in text for label in labels)
    assert "figures/grid.png" in report["figures"]  # learning_rate x seed, from training_args
    figure = Image.open(out / "figures" / "ingredients.png")
    assert all(label in figure.text["Description"] for label in labels)
    assert "ingredients" in figure.text["Title"]
    card = json.loads((out / "soups" / "greedy-sorted" / "soup_card.json").read_text())
    assert set(card["chosen"]) <= set(labels)


def test_config_labels_name_ingredients_and_are_checked(tmp_path):
    from modelsoup.cook.config import load_config
    from modelsoup.errors import ConfigError

    for s in range(2):
        safetensors.torch.save_file(tiny_state(s), str(tmp_path / f"m{s}.safetensors"))
    config = tmp_path / "soup.yaml"
    base = "model: m:f\nheld_out: m:e\noutput: o\n"
    entries = "[{path: m0.safetensors, label: first}, m1.safetensors]"
    config.write_text(base + f"ingredients: {entries}\n")
    cfg = load_config(config)
    paths = [str(tmp_path / e.path) for e in cfg.ingredients]
    pool = open_ingredients(paths, labels=[e.label for e in cfg.ingredients])
    assert [ing.label for ing in pool] == ["first", "m1"]

    config.write_text(base + "ingredients: [{path: a, label: x}, {path: b, label: x}]\n")
    with pytest.raises(ConfigError, match="both labelled 'x'"):
        load_config(config)
    config.write_text(base + "ingredients: [{path: a, lable: x}]\n")
    with pytest.raises(ConfigError, match="ingredients.0.lable"):
        load_config(config)
    with pytest.raises(IngredientError, match="holds 2 checkpoints"):
        open_ingredients([tmp_path], labels=["both"])


# --- Trainer runs ---------------------------------------------------------------------


def test_training_args_are_read_without_running_the_pickle(tmp_path):
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "evil.bin"
    torch.save({"learning_rate": Payload(), "seed": 3}, evil)
    assert read_training_args(evil) == {"seed": 3}  # the payload became an inert record
    assert not (tmp_path / "ran").exists()
    (tmp_path / "junk.bin").write_bytes(b"\x80\x05garbage")
    assert read_training_args(tmp_path / "junk.bin") == {}


def test_real_training_args_give_learning_rate_and_seed(tmp_path, trainer_args):
    _training_args(trainer_args, tmp_path, 3e-4, 7)
    got = read_training_args(tmp_path / "training_args.bin")
    assert got["learning_rate"] == 3e-4 and got["seed"] == 7
    assert isinstance(got.get("lr_scheduler_type"), str)  # an enum, read as its value


def test_a_model_folder_says_which_checkpoints_inside_it_are_not_used(tmp_path, caplog):
    out = _trainer_checkpoint(tmp_path / "output_dir", 0)  # trainer.save_model() at the end
    _trainer_checkpoint(out / "checkpoint-10", 1)
    with caplog.at_level(logging.INFO, logger="modelsoup"):
        assert find_checkpoints([out]) == [out]
        assert find_checkpoints([tmp_path]) == [out]
    said = [r.message for r in caplog.records if "checkpoint-10" in r.message]
    assert len(said) == 2 and all("not used" in m for m in said)


# --- timm run folders: copies and integer tensors -------------------------------------


def _timm_folder(tmp_path: Path) -> Path:
    runs = tmp_path / "output" / "train"
    runs.mkdir(parents=True)
    for epoch in (8, 9):
        state = tiny_state(epoch)
        state["bn.num_batches_tracked"] = torch.tensor(100 * epoch)
        torch.save(
            {"epoch": epoch, "arch": "tinynet", "state_dict": state, "version": 2,
             "args": argparse.Namespace(model="tinynet", lr=0.1, seed=0)},
            runs / f"checkpoint-{epoch}.pth.tar",
        )  # fmt: skip
    shutil.copy(runs / "checkpoint-9.pth.tar", runs / "last.pth.tar")
    shutil.copy(runs / "checkpoint-9.pth.tar", runs / "model_best.pth.tar")
    return runs


def test_identical_copies_in_a_folder_count_once_with_one_warning(tmp_path):
    runs = _timm_folder(tmp_path)
    with pytest.warns(SoupWarning, match="2 checkpoints are a byte-identical copy") as seen:
        found = find_checkpoints([runs])
    assert [p.name for p in found] == ["checkpoint-8.pth.tar", "checkpoint-9.pth.tar"]
    assert len([w for w in seen if "byte-identical" in str(w.message)]) == 1
    assert "last.pth.tar = checkpoint-9.pth.tar" in str(seen[0].message)
    assert len(find_checkpoints([runs], dedupe=False)) == 4
    # the same file listed twice keeps its documented meaning: it counts twice
    with pytest.warns(SoupWarning, match="counts twice"):
        soup = average([runs / "last.pth.tar", runs / "last.pth.tar"], int_policy="first")
    assert soup.coefficients == [1.0, 1.0]
    ing = open_ingredients([runs / "checkpoint-9.pth.tar"])[0]
    assert ing.architecture == {"model": "tinynet", "arch": "tinynet"}
    assert ing.hyperparameters["lr"] == 0.1


def test_inspect_runs_the_same_checks_as_average(tmp_path, capsys):
    runs = _timm_folder(tmp_path)
    before = _snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        assert main(["inspect", str(runs)]) == 2  # as average: one error line
        said = capsys.readouterr().out
        assert "soup-compatible: no: integer tensor 'bn.num_batches_tracked' differs" in said
        assert main(["average", str(runs), "-o", str(tmp_path / "s.safetensors"), "-q"]) == 2
        assert "integer tensor 'bn.num_batches_tracked' differs" in capsys.readouterr().err
        assert not (tmp_path / "s.safetensors").exists() and _snapshot(tmp_path) == before
        assert main(["inspect", str(runs), "--int-policy", "first"]) == 0
        assert "soup-compatible: yes" in capsys.readouterr().out
        out = tmp_path / "s.safetensors"
        assert main(["average", str(runs), "-o", str(out), "--int-policy", "first", "-q"]) == 0
    card = json.loads((tmp_path / "s.safetensors.json").read_text())
    assert [i["label"] for i in card["ingredients"]] == ["checkpoint-8", "checkpoint-9"]


# --- architecture metadata ------------------------------------------------------------


@pytest.mark.parametrize(
    "key, a, b",
    [
        ("hidden_act", "silu", "gelu"),
        ("rope_theta", 10000.0, 500000.0),
        ("rope_parameters", {"rope_theta": 1e4}, {"rope_theta": 5e5}),
    ],
)
def test_settings_that_change_what_the_weights_compute_are_architecture(tmp_path, key, a, b):
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    one = _trainer_checkpoint(tmp_path / "a", 0, {**base, key: a})
    two = _trainer_checkpoint(tmp_path / "b", 1, {**base, key: b})
    with pytest.warns(SoupWarning, match=f"different architecture from a .{key} "):
        average([one, two])
    with pytest.raises(IncompatibleIngredientsError, match=key):
        average([one, two], strict=True)


def test_architecture_differences_are_named_warned_and_refused_when_strict(tmp_path, capsys):
    small = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64}
    big = {**small, "hidden_size": 384}
    a = _trainer_checkpoint(tmp_path / "a", 0, small)
    b = _trainer_checkpoint(tmp_path / "b", 1, big)
    with pytest.warns(
        SoupWarning, match="b describes a different architecture from a .hidden_size 64 vs 384"
    ):
        average([a, b])
    with pytest.raises(IncompatibleIngredientsError, match="hidden_size 64 vs 384"):
        average([a, b], strict=True)
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "s"), "--strict", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "hidden_size 64 vs 384" in err[0]
    assert not (tmp_path / "s").exists()
    # when the weights differ too, the error names the config difference first
    c = tmp_path / "c"
    c.mkdir()
    wide = TinyNet(hidden=32).state_dict()
    safetensors.torch.save_file(wide, str(c / "model.safetensors"))
    (c / "config.json").write_text(json.dumps({**small, "hidden_size": 32}))
    with pytest.raises(IncompatibleIngredientsError) as err_info:
        average([a, c])
    named = "a and c are different architectures (hidden_size 64 vs 32)"
    assert str(err_info.value).startswith(named)


def test_cook_config_strict_refuses_different_architectures(tmp_path):
    from modelsoup.cook.run import cook_config

    _trainer_checkpoint(tmp_path / "runs" / "a", 0, {"model_type": "bert"})
    _trainer_checkpoint(tmp_path / "runs" / "b", 1, {"model_type": "gpt2"})
    _kitchen(tmp_path)
    (tmp_path / "soup.yaml").write_text(
        "model: kitchen:build\ningredients: [runs/]\nheld_out: kitchen:held_out\n"
        "output: cooked\nstrict: true\n"
    )
    with pytest.raises(IncompatibleIngredientsError, match="model_type bert vs gpt2"):
        cook_config(tmp_path / "soup.yaml", progress=False)


# --- Lightning ------------------------------------------------------------------------


def test_lightning_soup_goes_back_into_lightning_layout(tmp_path):
    hyper = {"lr": 1e-3, "hidden": 16, "model_name": "tiny"}
    states = [tiny_state(s) for s in range(2)]
    paths = []
    for i, sd in enumerate(states):
        p = tmp_path / f"epoch={i}.ckpt"
        torch.save(
            {
                "epoch": i,
                "global_step": 10 * (i + 1),
                "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in sd.items()},
                "hyper_parameters": {**hyper, "lr": hyper["lr"] * (i + 1)},
                "optimizer_states": [{"state": {}}],
                "loops": {},
            },
            p,
        )
        paths.append(p)
    soup = average(paths)
    out = soup.save(tmp_path / "soup.ckpt", progress=False)
    back = torch.load(out, weights_only=True)
    assert back["pytorch-lightning_version"] == "2.4.0"
    assert back["hyper_parameters"] == hyper  # the first ingredient's
    assert back["epoch"] == 0 and "optimizer_states" not in back and "loops" not in back
    assert set(back["state_dict"]) == {f"model.{k}" for k in states[0]}
    expected = (states[0]["fc1.weight"] + states[1]["fc1.weight"]) / 2
    assert torch.allclose(back["state_dict"]["model.fc1.weight"], expected, atol=1e-6)
    # and it reads back as an ingredient, the prefix removed again
    assert open_ingredients([out])[0].names() == list(states[0])
    plain = torch.load(soup.save(tmp_path / "soup.pt", progress=False), weights_only=True)
    assert set(plain) == set(states[0])  # .pt: a plain state dict
    ing = open_ingredients([paths[1]])[0]
    assert ing.hyperparameters["lr"] == 2e-3 and ing.architecture == {"model_name": "tiny"}


# --- PEFT adapters --------------------------------------------------------------------


def _adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    factors = {
        "base_model.model.fc1.lora_A.weight": torch.randn(4, 8),
        "base_model.model.fc1.lora_B.weight": torch.randn(16, 4),
    }
    safetensors.torch.save_file(factors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    return folder


@pytest.mark.parametrize("given", ["folders", "parent", "file"])
def test_lora_adapters_without_a_base_say_to_pass_one(tmp_path, capsys, given):
    a, b = _adapter(tmp_path / "ad" / "a", 0), _adapter(tmp_path / "ad" / "b", 1)
    sources = {
        "folders": [a, b],
        "parent": [tmp_path / "ad"],
        "file": [a / "adapter_model.safetensors", b / "adapter_model.safetensors"],
    }[given]
    before = _snapshot(tmp_path)
    out = tmp_path / "soup"
    assert main(["average", *map(str, sources), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert "--base" in err[0]
    if given == "file":  # the factors alone are not a model: the folder is what to give
        assert "lora_A" in err[0] and f"adapter folder {a}" in err[0]
    else:
        assert "does not name its base model" in err[0]
    assert not out.exists() and _snapshot(tmp_path) == before


def test_lora_adapters_with_a_base_are_souped_as_weight_changes(tmp_path, capsys):
    from modelsoup.formats.peft_adapter import AdapterSource

    base_state = tiny_state(5)
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(base_state, str(base))
    a, b = _adapter(tmp_path / "ad" / "a", 0), _adapter(tmp_path / "ad" / "b", 1)
    changes = []
    for folder in (a, b):
        f = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
        lora_b, lora_a = (f[f"base_model.model.fc1.lora_{x}.weight"] for x in "BA")
        changes.append(2.0 * lora_b.double() @ lora_a.double())  # lora_alpha / r = 8 / 4
    before = _snapshot(tmp_path)

    merged = tmp_path / "merged.safetensors"
    args = ["average", str(tmp_path / "ad"), "--base", str(base), "-q"]
    assert main([*args, "--merge-into-base", "-o", str(merged)]) == 0
    soup = safetensors.torch.load_file(str(merged))
    expected = base_state["fc1.weight"].double() + (changes[0] + changes[1]) / 2
    assert torch.allclose(soup["fc1.weight"].double(), expected, atol=1e-5)
    for name, value in base_state.items():  # what no adapter changes is the base's, exactly
        if name != "fc1.weight":
            assert torch.equal(soup[name], value), name

    out = tmp_path / "soup"  # an adapter again: rank 8 (the sum of the ranks) loses nothing
    assert main([*args, "--adapter-rank", "8", "-o", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "soup_card.json").is_file()
    assert json.loads((out / "soup_card.json").read_text())["adapter"]["rank"] == 8
    back = AdapterSource(out, base=base).tensor("fc1.weight").double()
    assert torch.allclose(back, expected, atol=1e-5)
    assert "LoRA adapter of rank 8" in capsys.readouterr().out
    assert {p: _snapshot(tmp_path)[p] for p in before} == before  # inputs untouched
