"""Layer-wise soups on real small networks: groups, variants, and the never-worse rule."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from digits_kit import DigitsMLP, held_out, splits
from modelsoup import open_ingredients
from modelsoup.errors import ConfigError
from modelsoup.evaluators import MeanLoss
from modelsoup.recipes import average, get_recipe, layerwise_soup, uniform_soup
from modelsoup.recipes.layerwise import block_of, discover_groups, pattern_groups
from modelsoup.tasting import Taster


@pytest.fixture(scope="module")
def states(digits_ckpts):
    return [safetensors.torch.load_file(str(p)) for p in sorted(digits_ckpts.glob("*.safetensors"))]


@pytest.fixture(scope="module")
def pool(states):
    return open_ingredients(states)


def _taster(ings, evaluator=None):
    return Taster(ings, DigitsMLP(), evaluator or held_out())


def test_blocks_are_found_from_names():
    assert block_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_of("layers.0.mlp.fc.bias") == "layers.0"
    assert block_of("layer1.0.conv1.weight") == "layer1.0"  # ResNet stages' sub-blocks
    assert block_of("embeddings.word_embeddings.weight") == "embeddings"
    assert block_of("bn1.num_batches_tracked") == "bn1"
    assert block_of("0.weight") == "0"
    assert block_of("pos_embed") == "pos_embed"
    names = ["cls_token", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    names += ["blocks.1.attn.qkv.weight", "norm.weight", "head.weight", "head.bias"]
    groups = discover_groups(names)
    assert list(groups) == ["cls_token", "blocks.0", "blocks.1", "norm", "head"]
    assert groups["head"] == ["head.weight", "head.bias"]


def test_user_groups_are_regexes_or_prefixes():
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    groups = pattern_groups(names, ["fc1.", r"fc2\.weight", ".*"])
    assert groups == {"fc1.": names[:2], r"fc2\.weight": ["fc2.weight"], ".*": ["fc2.bias"]}
    with pytest.raises(ConfigError, match="match no group pattern.*'\\.\\*'"):
        pattern_groups(names, ["fc1."])
    with pytest.raises(ConfigError, match="'conv' matches no tensor"):
        pattern_groups(names, ["conv", ".*"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        pattern_groups(names, ["fc1[", ".*"])


@pytest.mark.parametrize("evaluator", ["accuracy", "loss"])
@pytest.mark.parametrize("members", [[0, 1, 2, 3, 4], [0, 1], [3, 4, 0]])
def test_selective_never_scores_below_its_start(states, evaluator, members):
    ev = held_out() if evaluator == "accuracy" else MeanLoss(splits()["held_out"])
    taster = _taster(open_ingredients([states[i] for i in members]), ev)
    soup = layerwise_soup(taster, variant="selective")
    start = soup.trace[0]["score"]
    best_individual = (max if ev.higher_is_better else min)(taster.individual_scores())
    assert start == pytest.approx(best_individual, abs=1e-6)
    assert taster.better(soup.scores["held_out"], start)
    # the recorded score is the soup's real score, scored afresh
    assert soup.scores["held_out"] == pytest.approx(_taster(soup.ingredients, ev).score_soup(soup))
    steps = soup.trace[1:]
    assert [s["group"] for s in steps] == ["fc1", "fc2"]
    for s in steps:
        assert soup.options["groups"][s["group"]] == ("averaged" if s["accepted"] else "best")


def test_selective_keeps_the_best_ingredient_when_averaging_hurts(states):
    gen = torch.Generator().manual_seed(0)
    junk = {k: torch.randn(v.shape, generator=gen) * 3 for k, v in states[0].items()}
    ings = open_ingredients([*states, junk])
    taster = _taster(ings)
    soup = layerwise_soup(taster, variant="selective", strict=True)
    assert set(soup.options["groups"].values()) == {"best"}
    best = taster.best(taster.individual_scores())
    assert soup.chosen == [best]
    assert soup.scores["held_out"] == max(taster.individual_scores())


def test_classifier_variant_changes_only_the_head(pool):
    taster = _taster(pool)
    soup = layerwise_soup(taster, variant="classifier")
    best = pool[taster.best(taster.individual_scores())]
    uniform = average(pool).state_dict()
    mixed = soup.state_dict()
    for name in ("fc1.weight", "fc1.bias"):
        assert torch.equal(mixed[name], best.tensor(name)), name
    for name in ("fc2.weight", "fc2.bias"):
        assert torch.allclose(mixed[name], uniform[name], atol=1e-6), name
        assert not torch.equal(mixed[name], best.tensor(name))
    assert soup.options["groups"] == {"fc1": "best", "fc2": "averaged"}


def test_classifier_can_be_named(pool):
    taster = _taster(pool)
    soup = layerwise_soup(taster, variant="classifier", classifier="fc1.", groups=[".*"])
    assert soup.options["groups"] == {".*": "best", "fc1.": "averaged"}
    best = pool[taster.best(taster.individual_scores())]
    assert torch.equal(soup.tensor("fc2.weight"), best.tensor("fc2.weight"))
    with pytest.raises(ConfigError, match="classifier 'head' matches no tensor"):
        layerwise_soup(taster, variant="classifier", classifier="head")


def test_all_variant_is_the_uniform_soup(pool):
    taster = _taster(pool)
    soup = layerwise_soup(taster, variant="all")
    expected = average(pool).state_dict()
    for name, value in soup.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert soup.scores["held_out"] == pytest.approx(uniform_soup(taster).scores["held_out"])
    assert set(soup.options["groups"].values()) == {"averaged"}


def test_per_tensor_coefficients_and_card(pool, tmp_path):
    taster = _taster(pool)
    soup = layerwise_soup(taster, variant="selective", groups=["fc1.weight", ".*"])
    assert set(soup.options["groups"]) == {"fc1.weight", ".*"}
    n = len(pool)
    for coefs in soup.tensor_coefficients.values():
        assert coefs == [1 / n] * n or sorted(coefs) == [0.0] * (n - 1) + [1.0]
    out = soup.save(tmp_path / "layerwise.safetensors", progress=False)
    card = json.loads(out.with_name(out.name + ".json").read_text())
    assert card["recipe"] == "layerwise"
    assert card["options"]["groups"] == soup.options["groups"]
    assert card["options"]["patterns"] == ["fc1.weight", ".*"]
    assert card["tensor_coefficients"] == soup.tensor_coefficients
    assert [s["step"] for s in card["trace"]] == [0, 1, 2]


def test_options_are_validated():
    spec = get_recipe("layerwise")
    assert spec.options().variant == "selective"
    with pytest.raises(ValueError):
        spec.options(variant="some")
