"""Every checkpoint format round-trips, and wrapped checkpoints are unwrapped."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import safetensors.torch
import torch

from conftest import tiny_state
from modelsoup import average, open_ingredient
from modelsoup.formats.safetensors_io import SafetensorsSource
from modelsoup.ingredients import find_checkpoints
from modelsoup.soup import card_path


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _read(ing) -> dict:
    return {n: ing.tensor(n) for n in ing.names()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_reader_matches_library(tmp_path, dtype):
    sd = tiny_state(0, dtype)
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(sd, str(path))
    assert _equal(_read(open_ingredient(path)), safetensors.torch.load_file(str(path)))


def test_safetensors_writer_is_readable_by_the_library(tmp_path):
    sd = tiny_state(1, torch.bfloat16)
    out = average([sd]).save(tmp_path / "soup.safetensors", progress=False)
    loaded = safetensors.torch.load_file(str(out))
    assert _equal(loaded, sd)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "pytorch-lightning_version": "2.1.0",
        },
        lambda sd: {"state_dict_ema": sd},
    ],
    ids=["plain", "state_dict", "model", "model_state_dict", "ddp", "lightning", "ema"],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_pickles_unwrap(tmp_path, wrap, suffix):
    sd = tiny_state(2)
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(sd), path)
    assert _equal(_read(open_ingredient(path)), sd)


def test_timm_training_checkpoints_are_found_and_read(tmp_path):
    # timm's train.py saves checkpoint-<epoch>.pth.tar with its argparse arguments inside
    raw, ema = tiny_state(0), tiny_state(1)
    runs = tmp_path / "output"
    runs.mkdir()
    for name in ("checkpoint-9.pth.tar", "model_best.pth.tar"):
        torch.save(
            {
                "epoch": 9,
                "arch": "resnet50",
                "state_dict": raw,
                "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "version": 2,
                "args": argparse.Namespace(model="resnet50", lr=0.1),
                "metric": 77.5,
            },
            runs / name,
        )
    (runs / "summary.csv").write_text("epoch,loss\n")
    found = find_checkpoints([runs])
    assert [p.name for p in found] == ["checkpoint-9.pth.tar", "model_best.pth.tar"]
    ingredient = open_ingredient(found[0])
    assert ingredient.label == "checkpoint-9"
    assert _equal(_read(ingredient), raw)
    assert _equal(_read(open_ingredient(found[1], key="state_dict_ema")), ema)


def test_raw_weights_win_over_ema_unless_asked(tmp_path):
    raw, ema = tiny_state(0), tiny_state(1)
    path = tmp_path / "c.pt"
    torch.save({"state_dict": raw, "state_dict_ema": ema}, path)
    assert _equal(_read(open_ingredient(path)), raw)
    assert _equal(_read(open_ingredient(path, key="state_dict_ema")), ema)


def test_raw_weights_beside_an_ema_only_file_are_warned_about(tmp_path):
    from modelsoup.errors import SoupWarning
    from modelsoup.ingredients import open_ingredients

    both, ema_only = tmp_path / "a.pth.tar", tmp_path / "b.pth.tar"
    torch.save({"state_dict": tiny_state(0), "state_dict_ema": tiny_state(1)}, both)
    torch.save({"state_dict_ema": tiny_state(2)}, ema_only)  # the default finds its EMA
    with pytest.warns(SoupWarning, match=r"mix raw weights \(a\) and EMA weights \(b"):
        open_ingredients([both, ema_only])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one kind from every file: no warning
        open_ingredients([both, ema_only], key="state_dict_ema")
        exported = tmp_path / "exported-ema.safetensors"  # says nothing of its kind
        safetensors.torch.save_file(tiny_state(3), str(exported))
        open_ingredients([exported, ema_only])


def test_weights_nested_deeper_than_a_key_are_named_where_they_are(tmp_path):
    from modelsoup.errors import IngredientError

    deep, shallow = tmp_path / "deep.pt", tmp_path / "shallow.pt"
    torch.save({"epoch": 1, "checkpoint": {"model": tiny_state(0)}}, deep)
    torch.save({"epoch": 1, "net": tiny_state(0)}, shallow)
    with pytest.raises(IngredientError, match=r"at \['checkpoint'\]\['model'\], deeper"):
        open_ingredient(deep)
    with pytest.raises(IngredientError, match="pass --checkpoint-key net"):
        open_ingredient(shallow)


def test_hf_folders_single_and_sharded(tmp_path, states):
    sd = states[0]
    single = tmp_path / "single"
    single.mkdir()
    safetensors.torch.save_file(sd, str(single / "model.safetensors"))
    (single / "config.json").write_text("{}")
    assert _equal(_read(open_ingredient(single)), sd)

    names = list(sd)
    for kind, save, ext in [
        ("st", lambda d, p: safetensors.torch.save_file(d, str(p)), "safetensors"),
        ("bin", lambda d, p: torch.save(d, p), "bin"),
    ]:
        folder = tmp_path / f"sharded-{kind}"
        folder.mkdir()
        base = "model" if kind == "st" else "pytorch_model"
        halves = [names[:3], names[3:]]
        weight_map = {}
        for i, part in enumerate(halves, 1):
            fname = f"{base}-{i:05d}-of-00002.{ext}"
            save({k: sd[k] for k in part}, folder / fname)
            weight_map.update({k: fname for k in part})
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index))
        got = _read(open_ingredient(folder))
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_module_and_state_dict_in_memory(states):
    from conftest import TinyNet

    net = TinyNet()
    assert _equal(_read(open_ingredient(net)), net.state_dict())
    assert _equal(_read(open_ingredient(states[0])), states[0])


@pytest.mark.parametrize("out_name", ["soup.safetensors", "soup.pt", "soupdir"])
def test_outputs_round_trip(tmp_path, states, out_name):
    soup = average(states)
    out = soup.save(tmp_path / out_name, progress=False)
    back = open_ingredient(out)
    expected = soup.state_dict()
    got = _read(back)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    card = json.loads(card_path(out).read_text())  # inside a folder, beside a file
    assert card_path(out).parent == (out if out.is_dir() else tmp_path)
    assert card["recipe"] == "uniform" and len(card["ingredients"]) == 3
    assert all(len(row["sha256"]) == 64 for row in card["ingredients"])
    assert card["versions"]["torch"] == torch.__version__


def test_folder_output_shards_and_copies_config(tmp_path, states):
    src = tmp_path / "ft0"
    src.mkdir()
    safetensors.torch.save_file(states[0], str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "tiny"}')
    (src / "vocab.txt").write_text("a\nb\n")
    soup = average([src, states[1]])
    out = soup.save(tmp_path / "out", max_shard_size=600, progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "vocab.txt" in files
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1
    got = _read(open_ingredient(out))
    expected = soup.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_trainer_output_folder_in_step_order_without_training_state(tmp_path, states):
    # transformers' Trainer: output_dir/checkpoint-<step>/ with weights, config and state
    runs = tmp_path / "output_dir"
    for step, sd in zip((1000, 500, 50), states):
        ckpt = runs / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        safetensors.torch.save_file(sd, str(ckpt / "model.safetensors"))
        (ckpt / "config.json").write_text('{"model_type": "tiny"}')
        (ckpt / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        (ckpt / "training_args.bin").write_bytes(b"not weights")
        torch.save({"state": {}}, ckpt / "optimizer.pt")
    found = find_checkpoints([runs])
    assert [p.name for p in found] == ["checkpoint-50", "checkpoint-500", "checkpoint-1000"]
    out = average(found).save(tmp_path / "soup", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "soup_card.json",
    ]


def test_reader_is_lazy_one_tensor_at_a_time(tmp_path):
    sd = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(sd, str(path))
    src = SafetensorsSource([path])
    # Reading a tensor returns a fresh buffer of exactly that tensor's size.
    t = src.tensor("t3")
    assert t.untyped_storage().nbytes() == 4000 and t[0].item() == 3.0


def test_sha256_while_reading_equals_a_full_read(tmp_path, states):
    import hashlib

    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(states[0], str(path))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    lazy = open_ingredient(path)
    scratch = lazy.scratch()
    for name in lazy.names():  # file order: each byte read once, front to back
        lazy.tensor(name, scratch)
    assert lazy.source._hash_file == 1  # hashed while reading, no second pass needed
    assert lazy.sha256 == expected
    cold = open_ingredient(path)
    cold.tensor(cold.names()[-1])  # out of order: falls back to reading the file
    assert cold.sha256 == expected


def test_same_content_under_two_paths_is_warned_when_saved(tmp_path, states):
    from modelsoup.errors import SoupWarning

    a, b = tmp_path / "a.safetensors", tmp_path / "copy.safetensors"
    safetensors.torch.save_file(states[0], str(a))
    b.write_bytes(a.read_bytes())
    soup = average([a, b, states[1]])
    with pytest.warns(SoupWarning, match="copy and a are the same checkpoint"):
        soup.save(tmp_path / "soup.safetensors", progress=False)


def test_folder_output_config_names_the_saved_dtype(tmp_path, states):
    src = tmp_path / "ft0"
    src.mkdir()
    safetensors.torch.save_file(states[0], str(src / "model.safetensors"))
    original = '{"model_type": "tiny", "torch_dtype": "float32"}'
    (src / "config.json").write_text(original)
    soup = average([src, states[1]])
    cast = soup.save(tmp_path / "bf16", out_dtype="bf16", progress=False)
    assert json.loads((cast / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert open_ingredient(cast).layout()["fc1.weight"].dtype == torch.bfloat16
    kept = soup.save(tmp_path / "as-is", progress=False)
    assert (kept / "config.json").read_text() == original
    assert (src / "config.json").read_text() == original  # the input is never touched


def test_folder_output_copies_config_and_tokenizer_but_no_other_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    safetensors.torch.save_file(tiny_state(0), str(run / "model.safetensors"))
    kept = ["config.json", "generation_config.json", "tokenizer.json", "vocab.txt"]
    kept += ["special_tokens_map.json", "chat_template.jinja", "LICENSE"]
    dropped = ["model.onnx", "model.onnx_data", "rust_model.ot", "model.gguf", "tf_model.h5"]
    dropped += ["flax_model.msgpack", "model.tflite", "weights.npz", "hyperparameters.json"]
    dropped += ["README.md"]  # the ingredient's model card: the soup card describes the soup
    for name in kept + dropped:
        (run / name).write_text("{}" if name.endswith(".json") else "x")
    out = average([run, tiny_state(1)]).save(tmp_path / "soup", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*kept, "model.safetensors", "soup_card.json"]
    )


def test_folder_output_copies_settings_folders_but_no_module_weights(tmp_path):
    from modelsoup.errors import SoupWarning

    run = tmp_path / "run"
    for sub in ("1_Pooling", "2_Normalize", "3_Dense", "additional_chat_templates"):
        (run / sub).mkdir(parents=True)
    safetensors.torch.save_file(tiny_state(0), str(run / "model.safetensors"))
    modules = [{"path": p} for p in ("", "1_Pooling", "2_Normalize", "3_Dense", "../x")]
    (run / "modules.json").write_text(json.dumps(modules))
    (run / "1_Pooling" / "config.json").write_text("{}")
    (run / "3_Dense" / "config.json").write_text("{}")
    safetensors.torch.save_file({"w": torch.ones(2)}, str(run / "3_Dense" / "model.safetensors"))
    (run / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    with pytest.warns(SoupWarning, match="3_Dense: a sentence-transformers module with weights"):
        out = average([run, tiny_state(1)]).save(tmp_path / "soup", progress=False)
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "2_Normalize").is_dir()
    assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert not (out / "3_Dense").exists()


def test_a_folder_with_a_single_file_and_an_index_is_read_from_the_file(tmp_path, caplog):
    # transformers' from_pretrained reads model.safetensors before the index: a re-save
    # as one file beside stale shards must give the soup the new weights, as it does there
    import logging

    folder = tmp_path / "model"
    folder.mkdir()
    old, new = tiny_state(0), tiny_state(1)
    safetensors.torch.save_file(new, str(folder / "model.safetensors"))
    names = list(old)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    for shard, part in shards.items():
        safetensors.torch.save_file({n: old[n] for n in part}, str(folder / shard))
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with caplog.at_level(logging.INFO, logger="modelsoup"):
        got = _read(open_ingredient(folder))
    assert _equal(got, new)
    assert "model.safetensors.index.json ignored" in caplog.text


@pytest.mark.parametrize("prefix", ["_orig_mod.module.", "module._orig_mod.", "module.module."])
def test_nested_wrapper_prefixes_are_all_removed(tmp_path, prefix):
    # torch.compile(DDP(model)).state_dict() names start with '_orig_mod.module.'
    sd = tiny_state(0)
    path = tmp_path / "c.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, path)
    ing = open_ingredient(path)
    assert _equal(_read(ing), sd)
    assert ing.source.note.count("removed") == 2


def test_a_lightning_checkpoint_of_a_compiled_model_is_read_and_written_back(tmp_path):
    from modelsoup.formats.torch_pickle import write_torch

    sd = tiny_state(0)
    path = tmp_path / "l.ckpt"
    wrapped = {"model._orig_mod." + k: v for k, v in sd.items()}
    torch.save({"state_dict": wrapped, "pytorch-lightning_version": "2.6.0"}, path)
    ing = open_ingredient(path)
    assert _equal(_read(ing), sd)
    out = tmp_path / "soup.ckpt"
    write_torch(out, sd, ing.source.lightning)  # the names Lightning saved, put back
    assert set(torch.load(out, weights_only=True)["state_dict"]) == set(wrapped)


@pytest.mark.parametrize("dtype", ["bits8", "bits16"])
def test_a_raw_bits_tensor_is_refused_with_one_line(tmp_path, dtype):
    from modelsoup.errors import IngredientError

    width = {"bits8": torch.uint8, "bits16": torch.int16}[dtype]
    path = tmp_path / "b.pt"
    flags = torch.zeros(2, dtype=width).view(getattr(torch, dtype))
    torch.save({"w": torch.ones(2), "flags": flags}, path)
    with pytest.raises(IngredientError, match=f"tensor 'flags' is {dtype}: raw bits"):
        open_ingredient(path)


def _lfs_pointer(path):
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")


def _safetensors_as_bin(path):
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 2)


@pytest.mark.parametrize(
    "make, needle",
    [
        (_lfs_pointer, "is a Git LFS pointer, not the weights"),
        (_safetensors_as_bin, "is a safetensors file, not a torch pickle"),
        (_random_bytes, "is not a torch checkpoint (corrupt, or another format)"),
    ],
    ids=["lfs-pointer", "safetensors", "random"],
)
def test_a_pickle_that_is_something_else_is_named_for_what_it_is(tmp_path, make, needle):
    from modelsoup.errors import IngredientError

    path = tmp_path / "pytorch_model.bin"
    make(path)
    with pytest.raises(IngredientError) as info:
        open_ingredient(path)
    assert needle in str(info.value) and "import code" not in str(info.value)


def test_suffixes_are_read_in_any_case(tmp_path):
    # MODEL.SAFETENSORS and X.PT (copied from a case-insensitive disk) are what they say:
    # found in a folder, read by their format, and an output named so is one file, not a
    # folder of that name
    folder = tmp_path / "runs"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(folder / "A.SAFETENSORS"))
    torch.save({"w": torch.full((3,), 3.0)}, folder / "B.Pt")
    found = find_checkpoints([folder])
    assert [p.name for p in found] == ["A.SAFETENSORS", "B.Pt"]
    soup = average(found)
    assert [i.label for i in soup.ingredients] == ["A", "B"]
    out = soup.save(tmp_path / "SOUP.SafeTensors", progress=False)
    assert out.is_file() and card_path(out).is_file()
    assert torch.equal(safetensors.torch.load_file(str(out))["w"], torch.full((3,), 1.5))
    pickled = soup.save(tmp_path / "SOUP.PT", progress=False)
    assert pickled.is_file() and torch.equal(torch.load(pickled)["w"], torch.full((3,), 1.5))


def test_a_soup_saved_among_its_ingredients_is_left_out_of_that_folder(tmp_path):
    from modelsoup.errors import SoupWarning

    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(3):
        safetensors.torch.save_file(
            {"w": torch.full((2,), float(i))}, str(runs / f"ck{i}.safetensors")
        )
    average([runs / "ck0.safetensors"]).save(runs / "first.safetensors", progress=False)
    average([runs / "ck1.safetensors", runs / "ck2.safetensors"]).save(
        runs / "pair", progress=False
    )
    for where in ([runs], [str(runs / "*.safetensors")]):
        with pytest.warns(SoupWarning, match="left out .* soup"):
            found = find_checkpoints(where)
        assert [p.name for p in found] == ["ck0.safetensors", "ck1.safetensors", "ck2.safetensors"]
    with pytest.warns(SoupWarning, match="left out"):
        assert torch.equal(average([runs]).tensor("w"), torch.full((2,), 1.0))
    # named, a soup is an ingredient; a folder of soups alone is souped as asked
    assert len(find_checkpoints([runs / "first.safetensors", runs / "ck0.safetensors"])) == 2
    soups = tmp_path / "soups"
    soups.mkdir()
    for name in ("first.safetensors", "first.safetensors.json", "pair"):
        (runs / name).rename(soups / name)
    assert sorted(p.name for p in find_checkpoints([soups])) == ["first.safetensors", "pair"]


def test_a_soup_keeps_the_framework_its_safetensors_ingredients_were_saved_for(tmp_path):
    # transformers reads a safetensors file's names and layouts by its "format" tag
    paths = []
    for i, fmt in enumerate(["flax", "flax", "pt"]):
        paths.append(tmp_path / f"m{i}.safetensors")
        safetensors.torch.save_file(
            {"w": torch.full((2,), float(i))}, str(paths[-1]), {"format": fmt}
        )

    def tag(out):
        files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
        return {SafetensorsSource([f]).metadata["format"] for f in files}

    assert tag(average(paths[:2]).save(tmp_path / "flax.safetensors", progress=False)) == {"flax"}
    assert tag(average(paths[:2]).save(tmp_path / "flax-folder", progress=False)) == {"flax"}
    assert tag(average(paths[1:]).save(tmp_path / "mixed.safetensors", progress=False)) == {"pt"}
    assert tag(
        average([{"w": torch.ones(2)}]).save(tmp_path / "mem.safetensors", progress=False)
    ) == {"pt"}


def test_shards_without_their_index_or_of_another_format_are_named_as_such(tmp_path):
    from modelsoup.errors import IngredientError

    run = tmp_path / "run"
    run.mkdir()
    safetensors.torch.save_file({"a": torch.ones(3)}, str(run / "model-00001-of-00002.safetensors"))
    safetensors.torch.save_file({"b": torch.ones(3)}, str(run / "model-00002-of-00002.safetensors"))
    with pytest.raises(IngredientError, match="shards of one model .* but not their index"):
        find_checkpoints([run])  # not two ingredients that disagree on their tensors
    with pytest.raises(IngredientError, match="one shard of a model whose index"):
        average([str(run / "*.safetensors")])  # nor when globbed, or named
    (run / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors"}})
    )  # fmt: skip
    shard = run / "model-00002-of-00002.safetensors"
    with pytest.raises(IngredientError, match="one shard of the model folder .*give the folder"):
        average([run, shard])
    with pytest.raises(IngredientError, match="one shard of the model folder"):
        average([run, run], base=shard, merge="task_arithmetic")  # nor as the base
    assert find_checkpoints([run]) == [run]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    safetensors.torch.save_file({"a": torch.ones(2)}, str(mixed / "s1.safetensors"))
    torch.save({"b": torch.ones(2)}, mixed / "s2.bin")
    weight_map = {"weight_map": {"a": "s1.safetensors", "b": "s2.bin"}}
    (mixed / "model.safetensors.index.json").write_text(json.dumps(weight_map))
    with pytest.raises(IngredientError, match="names 's2.bin', not a safetensors shard"):
        open_ingredient(mixed)
