"""mergekit configs: export a soup card, read a config back, and (where mergekit is
installed) check that mergekit's merge of the exported config equals the soup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from conftest import tiny_files
from modelsoup.cli import main
from modelsoup.soup import card_path


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--weights", "1,2,1"],
        ["--merge", "task_arithmetic", "--lambda", "0.7"],
        ["--merge", "ties", "--density", "0.3", "--lambda", "1.1"],
        ["--merge", "dare_linear", "--density", "0.5"],
        # summed in float64, written in float32 or float16: both come back as they were
        ["--accum-dtype", "float64"],
        ["--merge", "ties", "--density", "0.3", "--accum-dtype", "float64", "--out-dtype", "fp16"],
    ],
    ids=lambda f: f[1] if f[:1] == ["--merge"] else "linear" + "".join(f[1:]),
)
def test_export_then_read_back_gives_the_same_soup(tmp_path, flags):
    paths, base = tiny_files(tmp_path)
    out = tmp_path / "soup.safetensors"
    with_base = ["--base", base] if "--merge" in flags else []
    assert main(["average", *paths, *with_base, *flags, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 0
    written = yaml.safe_load(config.read_text())
    assert [m["model"] for m in written["models"]] == paths
    again = tmp_path / "again.safetensors"
    assert main(["average", "--from-mergekit", str(config), "-o", str(again), "-q"]) == 0
    first, second = (safetensors.torch.load_file(str(p)) for p in (out, again))
    for name in first:  # the card's coefficients are normalised: equal up to rounding
        assert torch.allclose(first[name], second[name], atol=1e-6), name
        assert first[name].dtype == second[name].dtype, name
    card = json.loads(card_path(again).read_text())
    original = json.loads(card_path(out).read_text())
    assert card["merge"] == original["merge"]
    assert card["dtype_policy"]["accumulate"] == original["dtype_policy"]["accumulate"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--merge", "slerp", "--t", "0.5"], "'slerp' has no mergekit equivalent"),
        (["--merge", "model_stock"], "'model_stock' has no mergekit equivalent"),
        (["--alpha", "0.5"], "mergekit has no WiSE-FT"),
    ],
)
def test_rules_mergekit_cannot_reproduce_are_not_exported(tmp_path, capsys, flags, needle):
    paths, base = tiny_files(tmp_path, 2)
    out = tmp_path / "soup.safetensors"
    assert main(["average", *paths, "--base", base, *flags, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 2
    assert needle in capsys.readouterr().err and not config.exists()


def _linear_with_lambda(config: dict) -> None:
    config.update(merge_method="linear")
    config["parameters"]["lambda"] = 0.5
    for model in config["models"]:
        model["parameters"].pop("density")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: c.update(slices=[{"sources": []}]), "key 'slices'"),
        (lambda c: c.update(merge_method="slerp"), "key 'merge_method': 'slerp'"),
        (lambda c: c["parameters"].update(weight=[0.1, 0.9]), "'parameters.weight'"),
        (lambda c: c["models"][0]["parameters"].update(density=[0.2, 0.4]), "not a gradient"),
        (lambda c: c["models"][0]["parameters"].update(density=0.9), "one density"),
        (lambda c: c.pop("base_model"), "key 'base_model'"),
        (lambda c: c["parameters"].update(normalize=False), "set normalize: true"),
        (lambda c: c.update(tokenizer_source="base"), "key 'tokenizer_source'"),
        # mergekit's TIES rescales nothing by default; with rescale it is another rule
        (lambda c: c["parameters"].update(rescale=True), "'parameters.rescale'"),
        (lambda c: c["parameters"].update(lambda_="x"), "'parameters.lambda_'"),
        (lambda c: c["parameters"].update({"lambda": "x"}), "'x' is not a number"),
        (lambda c: c["models"][0]["parameters"].update(weight=None), "None is not a number"),
        (lambda c: c["models"][0].update(parameters=[1]), "give a mapping"),
        (lambda c: c.update(parameters=3), "key 'parameters': give a mapping"),
        (lambda c: c.update(base_model=5), "give a path, not 5"),
        (lambda c: c.update(dtype="int8"), "key 'dtype': 'int8'"),
        (lambda c: c.update(dtype=["float16"]), "key 'dtype': ['float16']"),
        (lambda c: c.update(dtype="float8", out_dtype="float16"), "key 'dtype': 'float8'"),
        (lambda c: c.update(out_dtype="torch.int8"), "key 'out_dtype': 'torch.int8'"),
        (lambda c: c["parameters"].update(normalize="false"), "write true or false, not 'false'"),
        # a model without a density has mergekit's 1.0: two densities, not one
        (lambda c: c["models"][1]["parameters"].pop("density"), "or to none"),
        (lambda c: c["models"][0].update(paramters={"weight": 2}), "'models.0.paramters'"),
        # what mergekit would ignore or refuse is never dropped without a word
        (lambda c: c["models"][0]["parameters"].pop("weight"), "'models.0.parameters.weight'"),
        (lambda c: c.update(merge_method="task_arithmetic"), "task_arithmetic keeps every"),
        (_linear_with_lambda, "linear has no lambda"),  # fmt: skip
    ],
)
def test_unsupported_mergekit_configs_are_refused_with_the_key(tmp_path, capsys, edit, needle):
    paths, base = tiny_files(tmp_path, 2)
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.3}} for p in paths],
        "parameters": {"normalize": True},
    }
    edit(config)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "x.safetensors"
    assert main(["average", "--from-mergekit", str(path), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_base_a_linear_mergekit_config_does_not_list_is_warned_about(tmp_path):
    from modelsoup.errors import SoupWarning
    from modelsoup.merge.mergekit import mergekit_to_average

    paths, base = tiny_files(tmp_path, 2)
    config = {
        "merge_method": "linear",
        "base_model": base,
        "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths],
    }
    with pytest.warns(SoupWarning, match="does not use a base"):
        plan = mergekit_to_average(config)
    assert plan.sources == paths and plan.base is None


def _merged_from(tmp_path, config: dict) -> Path:
    """``modelsoup average --from-mergekit`` of ``config``, which must succeed."""
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "x.safetensors"
    assert main(["average", "--from-mergekit", str(path), "-o", str(out), "-q"]) == 0
    return out


def test_a_linear_mergekit_config_averages_the_base_it_lists_and_writes_its_dtype(tmp_path):
    # mergekit's linear merge averages every model listed, the base_model among them
    paths, base = tiny_files(tmp_path, 1)
    config = {
        "merge_method": "linear",
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, paths[0])],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    out = _merged_from(tmp_path, config)
    got = safetensors.torch.load_file(str(out))
    a, b = (safetensors.torch.load_file(p) for p in (base, paths[0]))
    for name, value in got.items():
        if value.is_floating_point():
            assert value.dtype == torch.bfloat16
            expected = (0.5 * a[name].double() + 0.5 * b[name].double()).to(torch.bfloat16)
            assert torch.equal(value, expected), name


def test_mergekit_dtype_names_are_read_as_mergekit_reads_them(tmp_path):
    # mergekit's dtype_from_name takes "torch.float32" as float32
    paths, base = tiny_files(tmp_path, 2)
    config = {
        "merge_method": "linear",
        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
        "dtype": "torch.float64",
        "out_dtype": "torch.bfloat16",
    }
    out = _merged_from(tmp_path, config)
    card = json.loads(card_path(out).read_text())
    assert card["dtype_policy"]["accumulate"] == "float64"
    assert card["dtype_policy"]["written"] == ["bfloat16"]


@pytest.mark.parametrize(
    "card, needle",
    [
        ({"format": "modelsoup.card/1"}, "KeyError: 'ingredients'"),
        ({"format": "modelsoup.card/1", "merge": "ties", "ingredients": []}, "damaged soup card"),
    ],
)
def test_a_damaged_soup_card_is_one_error_line(tmp_path, capsys, card, needle):
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    out = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and not out.exists()


def test_from_mergekit_takes_nothing_else(tmp_path, capsys):
    paths, _ = tiny_files(tmp_path, 1)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": paths[0]}]}))
    out = str(tmp_path / "x.safetensors")
    assert main(["average", paths[0], "--from-mergekit", str(path), "-o", out, "-q"]) == 2
    assert "drop SRC" in capsys.readouterr().err


@pytest.mark.parametrize(
    "out_dtype, name",
    [("bf16", "bfloat16"), ("fp16", "float16"), ("fp64", "float64"), (None, None)],
)
def test_the_exported_config_writes_the_soups_dtype(tmp_path, out_dtype, name):
    paths, _ = tiny_files(tmp_path, 2)
    out = tmp_path / "soup.safetensors"
    flags = ["--out-dtype", out_dtype] if out_dtype else []
    assert main(["average", *paths, *flags, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 0
    written = yaml.safe_load(config.read_text())
    assert written["dtype"] == "float32" and written.get("out_dtype") == name
    again = tmp_path / "again.safetensors"
    assert main(["average", "--from-mergekit", str(config), "-o", str(again), "-q"]) == 0
    first, second = (safetensors.torch.load_file(str(p)) for p in (out, again))
    assert {v.dtype for v in second.values()} == {v.dtype for v in first.values()}
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_soup_written_in_two_float_dtypes_is_not_exported(tmp_path, capsys):
    paths = []
    for s in range(2):  # a float32 weight beside a bfloat16 one, kept as they are
        state = {"w": torch.full((3,), float(s)), "h": torch.full((2,), float(s)).bfloat16()}
        paths.append(str(tmp_path / f"m{s}.safetensors"))
        safetensors.torch.save_file(state, paths[-1])
    out = tmp_path / "soup.safetensors"
    assert main(["average", *paths, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 2
    assert "bfloat16, float32" in capsys.readouterr().err and not config.exists()


def _llama_folders(tmp_path, count):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(cfg)
    folders = []
    for i in range(count + 1):
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(start.state_dict())
        if i:  # fine-tunes: the start plus a small random change
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        folder = tmp_path / ("base" if i == 0 else f"ft{i}")
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders[0], folders[1:]


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--merge", "task_arithmetic", "--lambda", "0.8"],
        ["--merge", "ties", "--density", "0.5"],
        ["--out-dtype", "bf16"],
    ],
    ids=["linear", "task_arithmetic", "ties", "linear-bf16"],
)
def test_mergekit_merges_the_exported_config_into_the_same_soup(tmp_path, flags):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, members = _llama_folders(tmp_path, 3)
    out = tmp_path / "soup"
    with_base = ["--base", base] if "--merge" in flags else []
    assert main(["average", *members, *with_base, *flags, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 0
    theirs = tmp_path / "mergekit"
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    run_merge(merge_config, str(theirs), options=MergeOptions(copy_tokenizer=False))
    mine = safetensors.torch.load_file(str(out / "model.safetensors"))
    got = {}
    for shard in theirs.glob("*.safetensors"):
        got.update(safetensors.torch.load_file(str(shard)))
    assert set(got) == set(mine) and len(mine) > 10
    for name, value in mine.items():
        assert got[name].dtype == value.dtype, name
        assert torch.allclose(got[name].float(), value.float(), atol=1e-6, rtol=1e-5), name


def test_an_export_from_another_folder_names_the_same_inputs_and_never_overwrites_one(
    tmp_path, monkeypatch, capsys
):
    runs = tmp_path / "runs"
    runs.mkdir()
    paths, base = tiny_files(runs, 2)
    monkeypatch.chdir(tmp_path)
    relative = [str(Path(p).relative_to(tmp_path)) for p in paths]
    out = Path("runs") / "soup.safetensors"
    flags = ["--base", str(Path(base).relative_to(tmp_path)), "--merge", "ties", "--density", "0.5"]
    assert main(["average", *relative, *flags, "-o", str(out), "-q"]) == 0
    monkeypatch.chdir(runs)
    before = Path(paths[0]).read_bytes()
    target = Path(paths[0]).name  # from here, the first ingredient's own file name
    assert main(["export-mergekit", "soup.safetensors.json", "-o", target]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert Path(paths[0]).read_bytes() == before
    assert main(["export-mergekit", "soup.safetensors.json", "-o", "merge.yaml"]) == 0
    written = yaml.safe_load(Path("merge.yaml").read_text())
    assert [m["model"] for m in written["models"]] == paths  # absolute: usable from anywhere


def test_a_dare_export_says_mergekit_matches_it_only_statistically(tmp_path, capsys):
    import shlex

    paths, base = tiny_files(tmp_path, 3)
    out = tmp_path / "soup.safetensors"
    flags = ["--base", base, "--merge", "dare_ties", "--density", "0.5", "--seed", "4"]
    # the middle member has weight 0: the others' masks still follow their places in the pool
    flags += ["--weights", "1,0,2", "--accum-dtype", "float64", "--out-dtype", "fp16"]
    assert main(["average", *paths, *flags, "-o", str(out), "-q"]) == 0
    config = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(config)]) == 0
    err = capsys.readouterr().err
    assert "--seed 4" in err and config.exists()
    # the command it gives redoes the soup bit for bit
    words = shlex.split(err.strip().split("exactly with: ", 1)[1])
    assert words[:2] == ["modelsoup", "average"] and words[-2:] == ["-o", "OUT"]
    again = tmp_path / "again.safetensors"
    assert main([*words[1:-1], str(again), "-q"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_the_dare_redo_command_gives_only_a_checkpoint_key_that_was_given(tmp_path, capsys):
    import shlex

    paths, base = tiny_files(tmp_path, 2)
    wrapped = tmp_path / "wrapped.pt"  # its weights under "state_dict", found by looking
    torch.save({"state_dict": safetensors.torch.load_file(paths[0])}, wrapped)
    out = tmp_path / "soup.safetensors"
    flags = ["--base", base, "--merge", "dare_ties", "--density", "0.5", "--seed", "2"]
    assert main(["average", str(wrapped), paths[1], *flags, "-o", str(out), "-q"]) == 0
    assert main(["export-mergekit", str(card_path(out)), "-o", str(tmp_path / "m.yaml")]) == 0
    words = shlex.split(capsys.readouterr().err.strip().split("exactly with: ", 1)[1])
    assert "--checkpoint-key" not in words  # a safetensors input would refuse it
    again = tmp_path / "again.safetensors"
    assert main([*words[1:-1], str(again), "-q"]) == 0
    soup, redone = (safetensors.torch.load_file(str(p)) for p in (out, again))
    assert all(torch.equal(soup[k], redone[k]) for k in soup)


def test_an_export_never_overwrites_the_folder_soup_its_card_describes(tmp_path, capsys):
    paths, _ = tiny_files(tmp_path, 2)
    soup = tmp_path / "soup"
    assert main(["average", *paths, "-o", str(soup), "-q"]) == 0
    weights = soup / "model.safetensors"
    before = weights.read_bytes()
    card = str(soup / "soup_card.json")
    assert main(["export-mergekit", card, "-o", str(weights)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert weights.read_bytes() == before
    assert main(["export-mergekit", card, "-o", str(tmp_path / "merge.yaml")]) == 0


def test_weights_whose_sum_overflows_are_carded_and_exported_as_their_shares(tmp_path):
    paths, _ = tiny_files(tmp_path, 2)
    out = tmp_path / "soup.safetensors"
    assert main(["average", *paths, "--weights", "1e308,1e308", "-o", str(out), "-q"]) == 0
    card = json.loads(card_path(out).read_text())
    assert [row["coefficient"] for row in card["ingredients"]] == [0.5, 0.5]
    merge = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(card_path(out)), "-o", str(merge)]) == 0
    models = yaml.safe_load(merge.read_text())["models"]
    assert [m["parameters"]["weight"] for m in models] == [0.5, 0.5]


@pytest.mark.parametrize(
    "coefficients, needle",
    [([0.0, 0.0], "no ingredient has a coefficient above zero"), ([float("nan"), 1.0], "nan")],
)
def test_a_card_with_no_usable_coefficients_is_not_exported(tmp_path, capsys, coefficients, needle):
    paths, _ = tiny_files(tmp_path, 2)
    out = tmp_path / "soup.safetensors"
    assert main(["average", *paths, "-o", str(out), "-q"]) == 0
    card = json.loads(card_path(out).read_text())
    for row, c in zip(card["ingredients"], coefficients):
        row["coefficient"] = c
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(card))
    merge = tmp_path / "merge.yaml"
    assert main(["export-mergekit", str(damaged), "-o", str(merge)]) == 2
    err = capsys.readouterr().err
    assert "damaged soup card" in err and needle in err and not merge.exists()
