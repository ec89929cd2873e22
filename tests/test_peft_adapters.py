"""LoRA adapters (PEFT folders) as ingredients: soups are made in weight-change space.

Every test builds a tiny random Llama base and real PEFT adapters in a temporary folder.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import modelsoup  # noqa: E402
from modelsoup.cli import main  # noqa: E402
from modelsoup.errors import ConfigError, IncompatibleIngredientsError, IngredientError  # noqa: E402
from modelsoup.formats.peft_adapter import AdapterSource  # noqa: E402
from modelsoup.ingredients import find_checkpoints, open_ingredients  # noqa: E402
from modelsoup.tasting import Taster  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0, **settings):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **settings,
    )
    return transformers.LlamaForCausalLM(config)


def make_adapter(base_dir: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter with random (non-zero) factors, as a fine-tune leaves them."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    options = {"r": 2, "lora_alpha": 4, "target_modules": TARGETS, **lora}
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    tiny_llama().save_pretrained(base_dir)
    adapters = [make_adapter(base_dir, root / "runs" / f"ad{i}", seed=i) for i in range(3)]
    return root, base_dir, adapters


def base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(base_dir / "model.safetensors"))


def changes64(adapter: Path) -> dict[str, torch.Tensor]:
    """Each target weight's (alpha/r) B @ A in float64, straight from the files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        b = factors[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        r = a.shape[0]
        scale = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
        out[name] = scale * b.double() @ a.double()
    return out


def test_soup_of_adapters_is_base_plus_the_mean_of_their_changes(kitchen):
    _, base_dir, adapters = kitchen
    base = base_state(base_dir)
    weights = [1.0, 2.0, 1.0]
    soup = modelsoup.average(adapters, weights, accum_dtype="float64")
    deltas = [changes64(a) for a in adapters]
    assert set(deltas[0]) and all(set(d) == set(deltas[0]) for d in deltas)
    for name, w in base.items():
        got = soup.tensor(name)
        if name not in deltas[0]:
            assert torch.equal(got, w), name  # untouched tensors are the base, bit for bit
            continue
        mean = sum(c * d[name] for c, d in zip(weights, deltas)) / sum(weights)
        torch.testing.assert_close(soup.changes(name), mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.double(), w.double() + mean, rtol=0, atol=1e-6)
        # averaging the factors instead is not the same soup at all
        factors = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
        key = "base_model.model." + name.removesuffix(".weight")
        mean_a = sum(c * f[key + ".lora_A.weight"] for c, f in zip(weights, factors)) / 4
        mean_b = sum(c * f[key + ".lora_B.weight"] for c, f in zip(weights, factors)) / 4
        wrong = 2.0 * mean_b.double() @ mean_a.double()
        assert (wrong - mean).norm() > 0.1 * mean.norm()


def test_merged_view_matches_peft_merge_and_unload(kitchen, tmp_path):
    _, base_dir, _ = kitchen
    adapter = make_adapter(
        base_dir,
        tmp_path / "ad",
        seed=7,
        r=3,
        use_rslora=True,
        alpha_pattern={"v_proj": 9},
        modules_to_save=["lm_head"],
    )
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    source = AdapterSource(adapter, base=base_dir)
    assert "lm_head.weight" in source.full
    for name, want in merged.items():
        torch.testing.assert_close(source.tensor(name), want, rtol=0, atol=1e-6)
        # any window of the flat tensor, computed from the rows of B @ A it lies in
        flat = want.reshape(-1)
        for start, count in ((0, 1), (5, 29), (flat.numel() - 3, 3)):
            if start >= 0 and start + count <= flat.numel():
                window = source.tensor_range(name, start, count)
                torch.testing.assert_close(window, flat[start : start + count], atol=1e-6, rtol=0)


def test_pieces_of_an_adapter_soup_make_the_whole_tensor(kitchen):
    _, _, adapters = kitchen
    soup = modelsoup.average(adapters)
    name = "model.layers.1.self_attn.v_proj.weight"
    whole = soup.tensor(name).reshape(-1)
    pieces = torch.cat([p.clone() for p in soup.pieces(name, max_elements=7)])
    assert torch.equal(pieces, whole)


def test_adapters_of_other_ranks_and_targets_are_mixed_as_changes(kitchen, tmp_path):
    _, base_dir, adapters = kitchen
    other = make_adapter(base_dir, tmp_path / "wide", seed=11, r=4, target_modules=["o_proj"])
    soup = modelsoup.average([adapters[0], other], accum_dtype="float64")
    d0, d1 = changes64(adapters[0]), changes64(other)
    base = base_state(base_dir)
    for name in (*d0, *d1):
        want = base[name].double() + (d0.get(name, 0) + d1.get(name, 0)) / 2
        torch.testing.assert_close(soup.tensor(name).double(), want, rtol=0, atol=1e-6)
    out = soup.save(tmp_path / "soup", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4  # the largest rank
    assert len(config["target_modules"]) == 6  # q, v and o of both layers


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_adapter_output_refactors_the_mixed_change_and_loads_in_peft(kitchen, tmp_path):
    _, base_dir, adapters = kitchen
    soup = modelsoup.average(adapters, [1, 2, 3])
    ids = torch.randint(0, 48, (2, 9))
    merged = soup.apply(transformers.LlamaForCausalLM.from_pretrained(base_dir))
    for rank, exact in ((6, True), (2, False)):
        if exact:
            out = soup.save(tmp_path / f"rank{rank}", adapter_rank=rank, progress=False)
        else:
            with pytest.warns(modelsoup.SoupWarning, match="misses"):
                out = soup.save(tmp_path / f"rank{rank}", adapter_rank=rank, progress=False)
        card = json.loads((out / "soup_card.json").read_text())
        error = card["adapter"]["relative_error"]
        refactored = AdapterSource(out, base=base_dir)
        names = sorted(refactored.lora)
        cut = sum((refactored.delta(n) - soup.changes(n)).norm() ** 2 for n in names)
        whole = sum(soup.changes(n).norm() ** 2 for n in names)
        assert abs(float((cut / whole) ** 0.5) - error) < 1e-4
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
        loaded = peft.PeftModel.from_pretrained(model, out)
        close = torch.allclose(_logits(loaded, ids), _logits(merged, ids), atol=1e-4)
        if exact:  # rank 6 = the sum of the ranks: nothing is lost
            assert error < 1e-5 and close
        else:
            assert error > 0.01 and not close


def test_taster_on_adapters_keeps_the_base_exact_after_100_candidates(kitchen):
    _, base_dir, adapters = kitchen
    base = base_state(base_dir)
    ingredients = open_ingredients(adapters)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    taster = Taster(ingredients, model, lambda m: 0.0)
    rng = random.Random(0)
    for _ in range(100):
        weights = [rng.choice([0.0, 0.0, 1.0, 2.5]) for _ in adapters]
        if not any(weights):
            weights[rng.randrange(3)] = 1.0
        taster.materialise(weights)
    deltas = [changes64(a) for a in adapters]
    state = model.state_dict()
    for name, w in base.items():
        if name not in deltas[0]:
            assert torch.equal(state[name], w), name
    # no drift: one adapter alone is base + its change, as if it were the first candidate
    for weights in ([0.0, 1.0, 0.0], [1.0, 1.0, 1.0]):
        taster.materialise(weights)
        fresh = Taster(open_ingredients(adapters), tiny_llama(), lambda m: 0.0)
        fresh.materialise(weights)
        for name in deltas[0]:
            want = base[name].double() + sum(c * d[name] for c, d in zip(weights, deltas)) / sum(
                weights
            )
            got = model.state_dict()[name]
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(got, fresh.model.state_dict()[name], rtol=0, atol=1e-6)
    assert torch.equal(
        load_file(str(base_dir / "model.safetensors"))["lm_head.weight"], base["lm_head.weight"]
    )


def test_cli_average_adapters_end_to_end(kitchen, tmp_path, capsys):
    root, base_dir, adapters = kitchen
    # a Trainer-style folder of adapter folders: each is one ingredient
    assert find_checkpoints([root / "runs"]) == adapters
    out = tmp_path / "soup"
    assert main(["average", str(root / "runs"), "--base", str(base_dir), "-o", str(out)]) == 0
    assert "as a LoRA adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "soup_card.json",
    ]
    card = json.loads((out / "soup_card.json").read_text())
    assert card["adapter"]["rank"] == 2 and 0 < card["adapter"]["relative_error"] < 1
    merged = tmp_path / "merged"
    assert main(["average", *map(str, adapters), "--merge-into-base", "-o", str(merged)]) == 0
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(merged)
    soup = modelsoup.average(adapters)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, soup.tensor(name), rtol=0, atol=0)
    # the adapters' base folder is an input like the adapters: nothing is written in it
    inside = base_dir / "merged"
    args = ["average", *map(str, adapters), "--merge-into-base", "-o", str(inside), "-q"]
    capsys.readouterr()
    assert main(args) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert not inside.exists()


def test_adapters_that_cannot_be_souped_are_refused(kitchen, tmp_path, capsys):
    root, base_dir, adapters = kitchen
    other_base = tmp_path / "other-base"
    tiny_llama(seed=1).save_pretrained(other_base)
    stranger = make_adapter(other_base, tmp_path / "stranger", seed=3)
    with pytest.raises(IncompatibleIngredientsError, match="only over one base"):
        open_ingredients([adapters[0], stranger])
    # a hub name is never downloaded
    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "org/some-llm"})
    )
    (hub / "adapter_model.safetensors").write_bytes(
        (adapters[0] / "adapter_model.safetensors").read_bytes()
    )
    capsys.readouterr()
    assert main(["average", str(hub), str(adapters[1]), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--base" in err and err.count("\n") == 1
    assert open_ingredients([hub], base=base_dir)[0].source.base_path == base_dir
    # DoRA is not B @ A
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(IngredientError, match="DoRA"):
        open_ingredients([dora])
    # an adapter soup is one adapter file, never sharded
    with pytest.raises(ConfigError, match="cannot shard a LoRA adapter soup"):
        modelsoup.average(adapters).save(tmp_path / "ad-soup", max_shard_size="1GB", progress=False)
    assert not (tmp_path / "ad-soup").exists()
    # an adapter soup is a folder unless merged
    with pytest.raises(ConfigError, match="adapter folder"):
        modelsoup.average(adapters).save(tmp_path / "soup.safetensors", progress=False)
    assert not (tmp_path / "soup.safetensors").exists()


def test_merge_rules_on_adapters_are_merged_over_their_own_base_never_written_as_adapters(
    kitchen, tmp_path, capsys
):
    _, base_dir, adapters = kitchen
    ties = ["--merge", "ties", "--density", "0.5"]
    # an adapter folder holds the plain average of the changes: a rule is refused there
    out = tmp_path / "ties"
    assert main(["average", *map(str, adapters[:2]), *ties, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--merge-into-base" in err and err.count("\n") == 1
    assert not out.exists()
    # merged into the base, the adapters' own base is the rule's base: no --base needed
    merged, given = tmp_path / "merged", tmp_path / "given"
    args = ["average", *map(str, adapters[:2]), *ties, "--merge-into-base"]
    assert main([*args, "-o", str(merged)]) == 0
    assert main([*args, "--base", str(base_dir), "-o", str(given)]) == 0
    assert (merged / "model.safetensors").read_bytes() == (given / "model.safetensors").read_bytes()
    linear = modelsoup.average(adapters[:2])
    soup = load_file(str(merged / "model.safetensors"))
    assert any(not torch.equal(soup[n], linear.tensor(n)) for n in soup)


def test_peft_extras_an_adapter_soup_cannot_carry_are_refused_or_read(kitchen, tmp_path):
    _, base_dir, adapters = kitchen
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    weights = (adapters[0] / "adapter_model.safetensors").read_bytes()

    def variant(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        (folder / "adapter_model.safetensors").write_bytes(weights)
        return folder

    # PEFT's trained biases (bias="lora_only"): merged they are right; as an adapter, refused
    biased = variant("biased", bias="lora_only")
    soup = modelsoup.average([biased, adapters[1]])
    with pytest.raises(ConfigError, match="bias='lora_only'.*--merge-into-base"):
        soup.save(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(IngredientError, match="trainable tokens"):
        open_ingredients([variant("tokens", trainable_token_indices=[1, 2])])
    # PEFT's frozen copy of a module it trains is not a change of the model
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "adapter_config.json").write_text(json.dumps(config))
    factors = load_file(str(adapters[0] / "adapter_model.safetensors"))
    frozen = "base_model.model.model.norm.original_module.weight"
    save_file({**factors, frozen: torch.zeros(16)}, str(copy / "adapter_model.safetensors"))
    (plain,) = open_ingredients([adapters[0]])
    (with_copy,) = open_ingredients([copy])
    assert torch.equal(with_copy.tensor("model.norm.weight"), plain.tensor("model.norm.weight"))


def test_an_adapter_of_a_tied_head_is_refused_naming_the_tie(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    head = make_adapter(tmp_path / "base", tmp_path / "head", seed=0, target_modules=["lm_head"])
    with pytest.raises(IngredientError, match="ties to its input embeddings"):
        open_ingredients([head])


def test_cook_greedy_on_adapters_saves_adapter_soups(kitchen, tmp_path):
    from modelsoup.cook.run import cook

    _, base_dir, adapters = kitchen
    ids = torch.randint(0, 48, (4, 12))

    def held_out(model) -> float:  # mean next-token loss on fixed random tokens
        with torch.no_grad():
            return -float(model(ids, labels=ids).loss)

    result = cook(
        adapters,
        lambda: transformers.LlamaForCausalLM.from_pretrained(base_dir),
        held_out,
        recipes=[{"name": "greedy"}],
        output=tmp_path / "cooked",
        base=str(base_dir),
        adapter_rank=6,  # the sum of the ranks: the saved adapters lose nothing
        bootstrap_resamples=10,
        progress=False,
    )
    greedy = next(m for m in result.methods if m.label.startswith("greedy"))
    saved = tmp_path / "cooked" / greedy.saved
    assert (saved / "adapter_config.json").is_file()
    # the saved adapter, loaded by PEFT, scores what the Taster measured
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    loaded = peft.PeftModel.from_pretrained(model, saved)
    card = json.loads((saved / "soup_card.json").read_text())
    assert card["adapter"]["relative_error"] < 1e-5
    assert held_out(loaded) == pytest.approx(greedy.result.scores["held_out"], abs=1e-4)


def test_cook_base_path_is_the_base_of_adapters_that_name_another(kitchen, tmp_path):
    from modelsoup.cook.run import cook

    _, base_dir, adapters = kitchen
    moved = []  # adapters trained elsewhere: their config names a base not on this machine
    for i, adapter in enumerate(adapters[:2]):
        folder = tmp_path / f"moved{i}"
        folder.mkdir()
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        shutil.copy(adapter / "adapter_model.safetensors", folder)
        moved.append(folder)
    ids = torch.randint(0, 48, (4, 12))

    def held_out(model) -> float:
        with torch.no_grad():
            return -float(model(ids, labels=ids).loss)

    def model():
        return transformers.LlamaForCausalLM.from_pretrained(base_dir)

    with pytest.raises(IngredientError, match="not a local folder"):
        cook(moved, model, held_out, recipes=[{"name": "uniform"}], progress=False)
    got = cook(moved, model, held_out, recipes=[{"name": "uniform"}], base=base_dir, progress=False)
    want = cook(adapters[:2], model, held_out, recipes=[{"name": "uniform"}], progress=False)
    assert got.method("uniform").held_out == want.method("uniform").held_out


def test_the_language_model_docs_example_runs(tmp_path, monkeypatch):
    import re

    doc = Path(__file__).resolve().parents[1] / "docs" / "language-models.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    block = next(b for b in blocks if "soup-adapter" in b)  # the adapters' example
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(doc), "exec"), {})
    assert (tmp_path / "soup-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "soup-merged" / "config.json").is_file()


@pytest.mark.parametrize("arch", ["gpt2-conv1d", "gpt2-conv1d-and-linear", "llama-embedding"])
def test_transposed_changes_match_peft(arch, tmp_path):
    # GPT-2's Conv1D stores W as (in, out): fan_in_fan_out; embeddings store (B @ A).T
    if arch == "gpt2-conv1d":
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
        load = transformers.GPT2LMHeadModel.from_pretrained
        lora = {"target_modules": ["c_attn"], "fan_in_fan_out": True}
    elif arch == "gpt2-conv1d-and-linear":
        # a square Conv1D (attn.c_proj) and an nn.Linear (score): PEFT transposes the
        # first only, and saves the flag of whichever it saw last
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, vocab_size=40, num_labels=3, pad_token_id=0
        )
        transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "base")
        load = transformers.GPT2ForSequenceClassification.from_pretrained
        lora = {"target_modules": r".*attn\.c_proj|score"}
    else:
        tiny_llama().save_pretrained(tmp_path / "base")
        load = transformers.LlamaForCausalLM.from_pretrained
        lora = {"target_modules": ["embed_tokens", "q_proj"]}
    model = load(tmp_path / "base")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **lora)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "ad")
    merged = peft_model.merge_and_unload().state_dict()
    source = AdapterSource(tmp_path / "ad", base=tmp_path / "base")
    assert any(m.transposed for m in source.lora.values())
    for name in source.names():
        torch.testing.assert_close(source.tensor(name), merged[name], rtol=0, atol=1e-6)
    # the base given as its folder's weights file: its config.json beside it decides
    as_file = AdapterSource(tmp_path / "ad", base=tmp_path / "base" / "model.safetensors")
    for name in source.names():
        torch.testing.assert_close(as_file.tensor(name), merged[name], rtol=0, atol=1e-6)
    # written back as an adapter, PEFT reads the same change
    soup = modelsoup.average([tmp_path / "ad"], base=tmp_path / "base")
    out = soup.save(tmp_path / "soup", progress=False)
    again = peft.PeftModel.from_pretrained(load(tmp_path / "base"), out).merge_and_unload()
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-5)


def test_an_adapter_config_edited_after_it_was_read_is_refused(kitchen, tmp_path, monkeypatch):
    import shutil
    import time

    from modelsoup.errors import IngredientError

    monkeypatch.setenv("MODELSOUP_HASH_CACHE", str(tmp_path / "cache.jsonl"))
    _, base_dir, adapters = kitchen
    edited = tmp_path / "ad"
    shutil.copytree(adapters[0], edited)
    soup = modelsoup.average([edited, adapters[1]], base=base_dir)
    time.sleep(0.01)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 64}))
    with pytest.raises(IngredientError, match="adapter_config.json: changed while modelsoup"):
        soup.save(tmp_path / "soup", progress=False)


def test_an_adapter_with_no_weights_or_non_finite_values_is_refused(kitchen, tmp_path, capsys):
    root, base_dir, adapters = kitchen
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    weights = load_file(str(adapters[0] / "adapter_model.safetensors"))
    cases = {
        "empty": (config, {}, "holds no LoRA weights"),
        "nan-factor": (
            config,
            {k: v.clone().fill_(float("nan")) if "lora_B" in k else v for k, v in weights.items()},
            "contains NaN or Inf values",
        ),
        "nan-alpha": (
            {**config, "lora_alpha": float("nan")},
            weights,
            "'lora_alpha' is nan; expected a positive number",
        ),
        # PEFT fails on a pattern that is not a regular expression; skipping it gave
        # its modules the default alpha
        "bad-pattern": (
            {**config, "alpha_pattern": {"v_proj[": 9}},
            weights,
            "alpha_pattern key 'v_proj[' is not a valid regular expression",
        ),
    }
    for name, (cfg, state, needle) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(state, str(folder / "adapter_model.safetensors"))
        capsys.readouterr()
        # the adapter output re-factors the mixed change: no SVD of NaN, one error line
        out = tmp_path / f"soup-{name}"
        assert main(["average", str(folder), str(adapters[1]), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (name, err)
        assert not out.exists()


def test_trained_embeddings_over_a_tied_base_warn_that_a_merged_model_is_not_peft(tmp_path):
    from modelsoup.errors import SoupWarning

    base = tmp_path / "base"
    tiny_llama(tie_word_embeddings=True).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "ad", seed=0, modules_to_save=["embed_tokens"])
    with pytest.warns(SoupWarning, match="ties the head to the trained embeddings"):
        AdapterSource(adapter)
    # a LoRA of the embeddings, saved with PEFT's copy of its base layer: merged, PEFT
    # ties the head to the changed embeddings as modelsoup does, so nothing to warn about
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"])
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "emb", save_embedding_layers=True)
    saved = load_file(str(tmp_path / "emb" / "adapter_model.safetensors"))
    assert any(".base_layer." in k for k in saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SoupWarning)
        AdapterSource(tmp_path / "emb")


def test_a_model_folder_that_also_holds_an_adapter_says_the_adapter_is_not_applied(
    kitchen, tmp_path
):
    from modelsoup.errors import SoupWarning

    _, base_dir, adapters = kitchen
    both = tmp_path / "both"
    shutil.copytree(base_dir, both)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters[0] / name, both)
    with pytest.warns(SoupWarning, match="the adapter is not applied"):
        (ing,) = open_ingredients([both])
    with pytest.raises(ConfigError, match="cannot apply: a LoRA adapter folder"):
        open_ingredients([adapters[0]], key="state_dict")
    assert torch.equal(
        ing.source.tensor("model.norm.weight"), base_state(base_dir)["model.norm.weight"]
    )


def test_a_saved_fan_in_fan_out_holds_for_a_conv1d_model_of_another_name(tmp_path):
    # remote-code copies of GPT-2 (Jais) keep its Conv1D layers under their own model_type:
    # PEFT's saved true is what tells their square c_proj apart from an nn.Linear
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "ad")
    merged = peft_model.merge_and_unload().state_dict()
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**saved, "model_type": "jais"}))
    source = AdapterSource(tmp_path / "ad", base=tmp_path / "base")
    for name in source.names():
        torch.testing.assert_close(source.tensor(name), merged[name], rtol=0, atol=1e-6)
    flag = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(
        json.dumps({**flag, "fan_in_fan_out": "no"})
    )
    with pytest.raises(IngredientError, match="'fan_in_fan_out' is 'no'; expected true or false"):
        AdapterSource(tmp_path / "ad", base=tmp_path / "base")


def test_a_square_conv1d_style_weight_without_a_config_is_refused(tmp_path):
    # GPT-2's square attn.c_proj (Conv1D) beside a Linear head: PEFT saved false (the
    # head's); with no config.json to name the architecture, it cannot be told apart
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=40, num_labels=3, pad_token_id=0
    )
    model = transformers.GPT2ForSequenceClassification(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=r".*attn\.c_proj|score", init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "ad")
    flag = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"]
    assert flag is False  # the head's, set up last
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "base" / "model.safetensors", alone / "weights.safetensors")
    with pytest.raises(IngredientError, match="cannot tell whether .*c_proj.* no config.json"):
        AdapterSource(tmp_path / "ad", base=alone / "weights.safetensors")
    # beside it, the architecture's config.json decides, whatever the file's name (or case)
    shutil.copy(tmp_path / "base" / "config.json", alone / "config.json")
    (alone / "weights.safetensors").rename(alone / "WEIGHTS.SAFETENSORS")
    merged = peft_model.merge_and_unload().state_dict()
    source = AdapterSource(tmp_path / "ad", base=alone / "WEIGHTS.SAFETENSORS")
    for name in source.names():
        torch.testing.assert_close(source.tensor(name), merged[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"alora_invocation_tokens": [5, 6]}, "activated LoRA .* no merged model"),
        ({"velora_config": {"rank": 2}}, "VeLoRA"),
        ({"kasa_config": {"x": 1}}, "KaSA"),
        ({"use_bdlora": {"block": 2}}, "block-diagonal"),
        ({"arrow_config": {"top_k": 2}}, "Arrow"),
        ({"monteclora_config": {"n": 2}}, "MonteCLoRA"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"init_lora_weights": "mica"}, "MiCA"),
    ],
)
def test_lora_variants_whose_change_is_not_b_at_a_are_refused(kitchen, tmp_path, changes, needle):
    _, _, adapters = kitchen
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    variant = tmp_path / "variant"
    shutil.copytree(adapters[0], variant)
    (variant / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(IngredientError, match=needle):
        open_ingredients([variant])


def test_residual_initialisations_and_unknown_options_are_warned_about(kitchen, tmp_path):
    from modelsoup.errors import SoupWarning

    _, _, adapters = kitchen
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    for name, changes, needle in [
        ("pissa", {"init_lora_weights": "pissa_niter_4"}, "residual base"),
        ("newer", {"future_option": {"on": True}}, "'future_option', which modelsoup does not"),
    ]:
        folder = tmp_path / name
        shutil.copytree(adapters[0], folder)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        with pytest.warns(SoupWarning, match=needle):
            open_ingredients([folder])


def test_an_adapter_soup_names_a_base_given_relative_to_its_adapters_absolutely(
    kitchen, tmp_path, monkeypatch
):
    # adapters that name their base "../base" (relative to their own folder): the soup,
    # written elsewhere, names the base's absolute path, so PEFT and modelsoup find it
    _, base_dir, adapters = kitchen
    root = tmp_path / "project"
    shutil.copytree(base_dir, root / "base")
    relative = []
    for i, adapter in enumerate(adapters[:2]):
        folder = root / f"ad{i}"
        shutil.copytree(adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "../base"
        (folder / "adapter_config.json").write_text(json.dumps(config))
        relative.append(folder)
    monkeypatch.chdir(tmp_path)  # "../base" from here is not the base
    out = modelsoup.average(relative).save(tmp_path / "out" / "soup", progress=False)
    written = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(written).is_absolute() and Path(written).samefile(root / "base")
    (again,) = open_ingredients([out])
    assert again.source.base_path.samefile(root / "base")


def test_task_vectors_of_adapters_over_a_bf16_base_keep_their_small_changes(tmp_path):
    # a change below bf16's step (1/128 near 1) must not be rounded away before a rule
    # subtracts the base again: task arithmetic at lambda 1 is the plain average of changes
    base_dir = tmp_path / "base"
    tiny_llama().to(torch.bfloat16).save_pretrained(base_dir)
    adapters = []
    for i in range(2):
        adapters.append(make_adapter(base_dir, tmp_path / f"ad{i}", seed=i))
        # changes of about 1e-3: well below the base's bf16 step
        factors = load_file(str(adapters[-1] / "adapter_model.safetensors"))
        save_file(
            {k: v * 0.05 for k, v in factors.items()},
            str(adapters[-1] / "adapter_model.safetensors"),
        )
    linear = modelsoup.average(adapters)
    ta = modelsoup.average(adapters, merge={"rule": "task_arithmetic"}, base=base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    exact = base_state(base_dir)[name].double() + sum(changes64(a)[name] for a in adapters) / 2
    got = ta.tensor(name, torch.float32)
    assert float((got.double() - exact).abs().max()) < 1e-6
    torch.testing.assert_close(got, linear.tensor(name, torch.float32), rtol=0, atol=1e-7)
    ties = modelsoup.average(adapters, merge={"rule": "ties", "density": 0.5}, base=base_dir)
    moved = ties.tensor(name, torch.float32) != base_state(base_dir)[name].float()
    assert int(moved.sum()) > moved.numel() // 4  # TIES keeps half of each change


def test_reading_an_adapter_over_a_pickled_base_never_changes_the_base(tmp_path):
    # a pickled float32 base is held in memory: reading base + change must not add the
    # change into the base's own tensor, or each read adds it again
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    adapter = make_adapter(base_dir, tmp_path / "ad", seed=1)
    state = base_state(base_dir)
    torch.save(state, tmp_path / "base.pt")
    source = AdapterSource(adapter, base=tmp_path / "base.pt")
    name = "model.layers.0.self_attn.q_proj.weight"
    first = source.tensor(name).clone()
    again = source.tensor(name)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(first, state[name])  # the adapter does change it
    torch.testing.assert_close(source.base.tensor(name), state[name], rtol=0, atol=0)
    piece = source.range_as(name, 3, 5, torch.float32).clone()
    torch.testing.assert_close(source.range_as(name, 3, 5, torch.float32), piece, rtol=0, atol=0)
    torch.testing.assert_close(piece, first.reshape(-1)[3:8], rtol=0, atol=0)


def test_reading_the_change_of_a_pickled_adapters_saved_module_never_changes_it(tmp_path):
    # the same for a module saved in full in a pickled adapter_model.bin: its change is
    # the saved tensor minus the base's, computed in a copy
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    adapter = make_adapter(base_dir, tmp_path / "ad", seed=1, modules_to_save=["lm_head"])
    weights = adapter / "adapter_model.safetensors"
    saved = load_file(str(weights))
    torch.save(saved, adapter / "adapter_model.bin")
    weights.unlink()
    source = AdapterSource(adapter, base=base_dir)
    name = "lm_head.weight"
    assert name in source.full
    first = source.delta(name).clone()
    torch.testing.assert_close(source.delta(name), first, rtol=0, atol=0)
    torch.testing.assert_close(source.tensor(name), saved[source.full[name]], rtol=0, atol=0)
