"""Merge rules against hand-computed references, written from the papers' definitions.

Every expected value below is worked out by hand in the comments (TIES: Yadav et al.
2023, Algorithm 1; DARE: Yu et al. 2024, Eq. 2; SLERP: Shoemake 1985; Model Stock:
Jang et al. 2024, Eq. 5; task arithmetic: Ilharco et al. 2023; WiSE-FT: Wortsman et al.
2022), not computed with the implementation.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import tiny_files, tiny_state
from modelsoup import average
from modelsoup.cli import main
from modelsoup.errors import ConfigError, IncompatibleIngredientsError, IngredientError
from modelsoup.merge import RULES, as_merge
from modelsoup.merge.dare import BLOCK, HASH_BATCH, counter_mask
from modelsoup.soup import card_path

BASE = torch.full((5,), 0.5)


def _members(*task_vectors):
    return [{"w": BASE + torch.tensor(t)} for t in task_vectors]


def _w(soup):
    return soup.tensor("w")


# -- TIES ---------------------------------------------------------------------


def test_ties_trim_elect_and_disjoint_mean_by_hand():
    members = _members(
        [4.0, -3.0, 0.1, 0.0, 0.2],  # keep the 2 largest: [4, -3, 0, 0, 0]
        [-1.0, 3.0, 0.3, 0.0, -5.0],  # [0, 3, 0, 0, -5]
        [2.0, 0.5, -0.2, 0.0, 1.0],  # [2, 0, 0, 0, 1]
    )
    # vote (sum of trimmed values): [6, 0, 0, 0, -4] -> signs [+, tie, none, none, -]
    # entry 0: 4 and 2 agree -> mean 3; entry 1: a tie elects no sign -> stays at base;
    # entries 2, 3: nothing left after trimming (3 is all zero) -> 0; entry 4: -5 agrees.
    # merged task vector [3, 0, 0, 0, -5], lambda 0.5 -> base + [1.5, 0, 0, 0, -2.5]
    soup = average(
        members,
        base={"w": BASE},
        merge={"rule": "ties", "density": 0.4, "lambda": 0.5},
    )
    expected = torch.tensor([2.0, 0.5, 0.5, 0.5, -2.0])
    assert torch.allclose(_w(soup), expected, atol=1e-6)


def test_ties_elects_the_sign_by_weighted_magnitude_not_by_count():
    # two members say -, one says + with more mass: + wins ([1 + 1] vs [5]: -2 + 5 > 0)
    members = _members(*([[-1.0] * 5], [[-1.0] * 5], [[5.0] * 5]))
    members = [{"w": m["w"][0]} for m in members]
    soup = average(members, base={"w": BASE}, merge={"rule": "ties", "density": 1.0})
    assert torch.allclose(_w(soup), BASE + 5.0)
    # weights 3:3:1 turn the vote: -3/7 - 3/7 + 5/7 < 0, mean of the two agreeing -1s
    soup = average(members, [3, 3, 1], base={"w": BASE}, merge={"rule": "ties", "density": 1.0})
    assert torch.allclose(_w(soup), BASE - 1.0)


def test_ties_keeps_entries_tied_with_the_smallest_kept_magnitude():
    # density 0.4 of 5 keeps 2; magnitudes 3, 1, 1, 1, 0: the three 1s tie for 2nd place
    members = _members([3.0, 1.0, -1.0, 1.0, 0.0])
    soup = average(members, base={"w": BASE}, merge={"rule": "ties", "density": 0.4})
    assert torch.allclose(_w(soup), BASE + torch.tensor([3.0, 1.0, -1.0, 1.0, 0.0]))


# -- DARE ---------------------------------------------------------------------


def test_dare_expected_value_is_the_task_vector():
    tau = torch.linspace(-2.0, 2.0, 400)
    base = torch.randn(400, generator=torch.Generator().manual_seed(0))
    member = {"w": base + tau}
    density, seeds = 0.3, 200
    outs = torch.stack(
        [
            average(
                [member],
                base={"w": base},
                merge={"rule": "dare_linear", "density": density, "seed": s},
            ).tensor("w")
            - base
            for s in range(seeds)
        ]
    )
    kept = outs.abs() > 1e-4
    # each entry is kept with probability density, and then it is tau / density
    nonzero = tau.abs() > 1e-3
    assert abs(kept[:, nonzero].float().mean().item() - density) < 0.01
    assert torch.allclose(outs[kept], (tau / density).expand_as(outs)[kept], atol=1e-4)
    # the mean over seeds is tau: per entry the standard error is
    # |tau| sqrt((1/p - 1) / seeds) ~ 0.108 |tau|, so every entry is within 5 of them;
    # over the 400 entries the mean ratio has a standard error of ~0.0054
    per_entry = outs.mean(0)
    err = (per_entry - tau).abs() / (tau.abs() * math.sqrt((1 / density - 1) / seeds))
    assert (err[nonzero] < 5).all()
    assert abs(float((per_entry[nonzero] / tau[nonzero]).mean()) - 1.0) < 0.03


def test_dare_is_bitwise_reproducible_from_its_seed(tmp_path):
    states = [tiny_state(s) for s in range(3)]
    base = tiny_state(9)
    merge = {"rule": "dare_ties", "density": 0.5, "seed": 7}
    a = average(states, base=base, merge=merge)
    b = average(states, base=base, merge=merge)
    other = average(states, base=base, merge={**merge, "seed": 8})
    for name in a.ingredients[0].names():
        assert torch.equal(a.tensor(name), b.tensor(name))
    assert not torch.equal(a.tensor("fc1.weight"), other.tensor("fc1.weight"))
    one = a.save(tmp_path / "a.safetensors", progress=False)
    two = b.save(tmp_path / "b.safetensors", progress=False)
    assert one.read_bytes() == two.read_bytes()
    card = json.loads(card_path(one).read_text())
    assert card["merge"] == {
        "rule": "dare_ties",
        "density": 0.5,
        "lambda": 1.0,
        "seed": 7,
        "mask": "counter-v1",
    }


@pytest.mark.parametrize("mask", ["counter-v1", "blocks-v0"])
def test_dare_masks_cross_generator_blocks_the_same_in_pieces(mask):
    n = max(BLOCK, HASH_BATCH) + 1000  # a tensor that spans two generator / hash batches
    members = [{"w": torch.randn(n, generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    merge = {"rule": "dare_linear", "density": 0.6, "mask": mask}
    soup = average(members, base={"w": torch.zeros(n)}, merge=merge)
    whole = soup.tensor("w")
    pieces = torch.cat([p.clone() for p in soup.pieces("w", max_elements=3001)])
    assert torch.equal(whole, pieces)


def test_dare_counter_masks_keep_density_and_are_independent_across_members_and_seeds():
    n, density = 1 << 20, 0.3
    masks = [counter_mask(0, "layers.0.w", p, 0, n, density) for p in range(3)]
    masks.append(counter_mask(1, "layers.0.w", 0, 0, n, density))  # another seed
    masks.append(counter_mask(0, "layers.1.w", 0, 0, n, density))  # another tensor
    se = math.sqrt(density * (1 - density) / n)  # ~4.5e-4
    for m in masks:
        assert abs(m.float().mean().item() - density) < 5 * se
    joint_se = math.sqrt(density**2 * (1 - density**2) / n)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            both = (masks[i] & masks[j]).float().mean().item()
            assert abs(both - density**2) < 5 * joint_se, (i, j)
    # neighbouring entries are independent too
    m = masks[0]
    assert abs((m[1:] & m[:-1]).float().mean().item() - density**2) < 5 * joint_se
    # a pure function of the index: any slice, anywhere (past 2**31 and 2**32), alone
    far = 5 * (1 << 32) - 1000
    whole = counter_mask(0, "w", 0, far, 3000, density)
    assert torch.equal(whole[1234:2345], counter_mask(0, "w", 0, far + 1234, 1111, density))


@pytest.mark.parametrize("accum_dtype", ["float32", "float64"])
def test_dare_drops_exactly_the_counter_mask_entries(accum_dtype):
    n, density = 5000, 0.4
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    member = {"w": base + 1.0}
    merge = {"rule": "dare_linear", "density": density, "seed": 5}
    soup = average([member], base={"w": base}, merge=merge, accum_dtype=accum_dtype)
    mask = counter_mask(5, "w", 0, 0, n, density)
    out = soup.tensor("w").double() - base.double()
    assert torch.allclose(out[mask], torch.full((int(mask.sum()),), 1 / density, dtype=out.dtype))
    assert (out[~mask].abs() < 1e-6).all()


def test_dare_older_mask_scheme_is_kept_and_differs():
    states = [tiny_state(s) for s in range(2)]
    merge = {"rule": "dare_linear", "density": 0.5, "seed": 7}
    new = average(states, base=tiny_state(9), merge=merge)
    old = average(states, base=tiny_state(9), merge={**merge, "mask": "blocks-v0"})
    assert not torch.equal(new.tensor("fc1.weight"), old.tensor("fc1.weight"))
    assert old.merge.canonical()["mask"] == "blocks-v0"
    with pytest.raises(ConfigError, match="mask"):
        as_merge({**merge, "mask": "counter-v9"})


def test_cli_average_takes_the_older_mask_scheme(tmp_path):
    paths, base = tiny_files(tmp_path, 2)
    dare = ["--merge", "dare_linear", "--density", "0.5", "--base", base]
    out = tmp_path / "old.safetensors"
    assert main(["average", *paths, *dare, "--mask", "blocks-v0", "-o", str(out), "-q"]) == 0
    assert json.loads(card_path(out).read_text())["merge"]["mask"] == "blocks-v0"


# -- SLERP --------------------------------------------------------------------


def test_slerp_returns_the_endpoints_at_t_0_and_1():
    a, b = tiny_state(1), tiny_state(2)
    for t, expected in ((0.0, a), (1.0, b)):
        soup = average([a, b], merge={"rule": "slerp", "t": t})
        for name, value in expected.items():
            assert torch.equal(soup.tensor(name), value), (t, name)


def test_slerp_says_it_does_not_use_the_weights_given_and_never_reads_a_base():
    from modelsoup.errors import SoupWarning

    members = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    with pytest.warns(SoupWarning, match="slerp does not use the members' weights"):
        weighted = average(members, [3, 1], merge={"rule": "slerp", "t": 0.5})
    assert torch.equal(
        weighted.tensor("w"), average(members, merge={"rule": "slerp", "t": 0.5}).tensor("w")
    )
    broken = {"w": torch.tensor([math.inf, 0.0])}  # a base slerp does not read is not read
    with pytest.warns(SoupWarning, match="the base model is not used"):
        soup = average(members, base=broken, merge={"rule": "slerp", "t": 0.5})
    assert torch.isfinite(soup.tensor("w")).all()


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors():
    e1, e2 = {"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0])}
    for t in (0.1, 0.3, 0.5, 0.9):
        w = average([e1, e2], merge={"rule": "slerp", "t": t}).tensor("w")
        # on the quarter circle: (cos(t pi/2), sin(t pi/2), 0)
        angle = t * math.pi / 2
        assert torch.allclose(w, torch.tensor([math.cos(angle), math.sin(angle), 0.0]), atol=1e-6)
        assert abs(w.norm().item() - 1.0) < 1e-6


def test_slerp_falls_back_to_linear_for_parallel_vectors():
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([2.0, 4.0, 6.0])}  # same direction: the angle is zero
    w = average([a, b], merge={"rule": "slerp", "t": 0.25}).tensor("w")
    assert torch.allclose(w, torch.tensor([1.25, 2.5, 3.75]))


def test_slerp_needs_two_members_and_t_in_range():
    states = [tiny_state(s) for s in range(3)]
    with pytest.raises(ConfigError, match="'slerp' merges exactly 2 members; this soup has 3"):
        average(states, merge={"rule": "slerp", "t": 0.5})
    with pytest.raises(ConfigError, match="option 't'"):
        average(states[:2], merge={"rule": "slerp", "t": 1.5})
    with pytest.raises(ConfigError, match="option 't': required"):
        average(states[:2], merge="slerp")


# -- Model Stock --------------------------------------------------------------


def test_model_stock_ratio_for_known_angles():
    base = {"w": torch.zeros(3), "v": torch.ones(2)}
    s3 = math.sqrt(3)
    # w: three unit task vectors pairwise 60 degrees apart: cos 1/2,
    #    t = 3 (1/2) / (1 + 2 (1/2)) = 3/4
    # v: three task vectors pairwise orthogonal... in 2-d only two are: use v = +-e1, e2
    w_vectors = [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([0.5, s3 / 2, 0.0]),
        torch.tensor([0.5, s3 / 6, math.sqrt(2 / 3)]),
    ]
    # v: task vectors at 0, 90 and 90 degrees: cosines 0, 0 and (e2, e2) = 1: mean 1/3,
    #    t = 3 (1/3) / (1 + 2 (1/3)) = 3/5
    v_vectors = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0])]
    members = [{"w": w, "v": 1.0 + v} for w, v in zip(w_vectors, v_vectors)]
    soup = average(members, base=base, merge="model_stock")
    avg_w = sum(w_vectors) / 3
    avg_v = sum(v_vectors) / 3
    assert torch.allclose(soup.tensor("w"), 0.75 * avg_w, atol=1e-6)
    assert torch.allclose(soup.tensor("v"), 1.0 + 0.6 * avg_v, atol=1e-6)


def test_model_stock_of_two_at_sixty_degrees_and_orthogonal():
    c = math.cos(math.radians(60))
    members = [
        {"w": torch.tensor([1.0, 0.0])},
        {"w": torch.tensor([c, math.sin(math.radians(60))])},
    ]
    soup = average(members, base={"w": torch.zeros(2)}, merge="model_stock")
    # Eq. 5 with k = 2: t = 2 cos / (1 + cos) = 2/3
    avg = (members[0]["w"] + members[1]["w"]) / 2
    assert torch.allclose(soup.tensor("w"), avg * 2 / 3, atol=1e-6)
    orthogonal = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    soup = average(orthogonal, base={"w": torch.zeros(2)}, merge="model_stock")
    assert torch.equal(soup.tensor("w"), torch.zeros(2))  # cos 0: t = 0, the base


# -- task arithmetic and WiSE-FT ----------------------------------------------


def test_task_arithmetic_of_one_member_with_lambda_one_is_that_member():
    member, base = tiny_state(1), tiny_state(2)
    soup = average([member], base=base, merge={"rule": "task_arithmetic", "lambda": 1.0})
    for name, value in member.items():
        assert torch.allclose(soup.tensor(name), value, atol=1e-6), name


def test_task_arithmetic_scales_the_summed_task_vectors():
    members = _members([2.0] * 5, [4.0] * 5)
    # weights normalised: base + lambda (tau_1 + tau_2) / 2 = 0.5 + 0.5 * 3
    soup = average(members, base={"w": BASE}, merge={"rule": "task_arithmetic", "lambda": 0.5})
    assert torch.allclose(_w(soup), torch.full((5,), 2.0))
    # not normalised: the paper's sum of task vectors, base + 0.5 * 6
    soup = average(
        members,
        [1, 1],
        normalize=False,
        base={"w": BASE},
        merge={"rule": "task_arithmetic", "lambda": 0.5},
    )
    assert torch.allclose(_w(soup), torch.full((5,), 3.5))


def test_wise_ft_interpolates_between_the_base_and_the_soup():
    members = _members([2.0] * 5, [4.0] * 5)
    base = {"w": BASE}
    # the average is 0.5 + 3 = 3.5; (1 - 0.25) 0.5 + 0.25 3.5 = 1.25
    soup = average(members, base=base, merge={"rule": "wise_ft", "alpha": 0.25})
    assert torch.allclose(_w(soup), torch.full((5,), 1.25))
    assert torch.equal(
        _w(average(members, base=base, merge={"rule": "wise_ft", "alpha": 0.0})), BASE
    )
    # on top of TIES (density 1, both agree: disjoint mean 3): 0.5 (0.5) + 0.5 (3.5) = 2
    soup = average(members, base=base, merge={"rule": "ties", "density": 1.0, "alpha": 0.5})
    assert torch.allclose(_w(soup), torch.full((5,), 2.0))


# -- every rule: pieces, integers, errors ---------------------------------------

ALL_RULES = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.3, "lambda": 1.2},
    "dare_linear": {"density": 0.4, "seed": 3},
    "dare_ties": {"density": 0.4, "seed": 3},
    "slerp": {"t": 0.3},
    "model_stock": {},
    "wise_ft": {"alpha": 0.6},
}


def test_the_table_covers_every_registered_rule():
    assert set(ALL_RULES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_every_rule_piece_by_piece_equals_the_whole_tensor(tmp_path, rule):
    count = 2 if rule == "slerp" else 3
    paths = []
    for s in range(count):
        path = tmp_path / f"m{s}.safetensors"
        safetensors.torch.save_file(tiny_state(s), str(path))
        paths.append(path)
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_state(10), str(base))
    merge = {"rule": rule, **ALL_RULES[rule], "alpha": 0.8} if rule != "wise_ft" else None
    merge = merge or {"rule": rule, **ALL_RULES[rule]}
    for spec in ({"rule": rule, **ALL_RULES[rule]}, merge):
        soup = average(paths, [1, 2, 3][:count], base=base, merge=spec)
        for name, meta in soup.layout().items():
            whole = soup.tensor(name)
            pieces = [p.clone() for p in soup.pieces(name, max_elements=7)]
            assert torch.equal(torch.cat(pieces).reshape(meta.shape), whole), (spec, name)
    # and the file written streaming holds the same tensors
    out = soup.save(tmp_path / "soup.safetensors", progress=False)
    written = safetensors.torch.load_file(str(out))
    for name, value in soup.state_dict().items():
        assert torch.equal(written[name], value), name
    card = json.loads(card_path(out).read_text())
    assert card["merge"]["rule"] == rule
    assert card["base"]["sha256"] == soup.base.sha256 and card["base"]["path"] == str(base)


def test_integer_tensors_follow_the_int_policy_under_every_rule():
    a, b = tiny_state(1), tiny_state(2)
    b["bn.num_batches_tracked"] = torch.tensor(5)
    base = tiny_state(3)
    merge = {"rule": "ties", "density": 0.5}
    with pytest.raises(IncompatibleIngredientsError, match="num_batches_tracked"):
        average([a, b], base=base, merge=merge).tensor("bn.num_batches_tracked")
    soup = average([a, b], base=base, merge=merge, int_policy="first")
    assert torch.equal(soup.tensor("bn.num_batches_tracked"), a["bn.num_batches_tracked"])


def test_a_rule_that_needs_a_base_names_itself_when_there_is_none():
    states = [tiny_state(s) for s in range(2)]
    for rule, opts in ALL_RULES.items():
        if rule in ("linear", "slerp"):
            continue
        with pytest.raises(ConfigError, match=f"merge rule '{rule}' .*needs a base model"):
            average(states, merge={"rule": rule, **opts})
    with pytest.raises(ConfigError, match=r"WiSE-FT \(alpha\) needs a base model"):
        average(states, merge={"rule": "slerp", "t": 0.5, "alpha": 0.5})


def test_bad_options_fail_at_the_edge_with_the_key_named():
    with pytest.raises(ConfigError, match="merge rule 'ties': option 'density'"):
        as_merge({"rule": "ties", "density": 0.0})
    with pytest.raises(ConfigError, match="option 'density'"):
        as_merge({"rule": "dare_ties", "density": 1.01})
    # a density the drop masks cannot represent: nothing kept, yet rescaled by 1/density
    for tiny in (1e-12, 4e-10):
        with pytest.raises(ConfigError, match="option 'density'.*smallest density 1e-05"):
            as_merge({"rule": "dare_linear", "density": tiny})
    assert as_merge({"rule": "dare_linear", "density": 1e-5}).options.density == 1e-5
    with pytest.raises(ConfigError, match="option 'density': required"):
        as_merge("ties")
    with pytest.raises(ConfigError, match="option names must be strings; got 1"):
        as_merge({"rule": "ties", 1: 0.5})
    with pytest.raises(ConfigError, match="option 'alpha'"):
        as_merge({"rule": "wise_ft", "alpha": -0.1})
    with pytest.raises(ConfigError, match="option 'lambda'"):
        as_merge({"rule": "task_arithmetic", "lambda": float("nan")})
    with pytest.raises(ConfigError, match="rule 'linear' has no such option"):
        as_merge({"rule": "linear", "density": 0.5})
    with pytest.raises(ConfigError, match="merge rule 'tie' is unknown; known rules: .*ties"):
        as_merge("tie")


def test_the_base_is_checked_like_an_ingredient():
    states = [tiny_state(s) for s in range(2)]
    wrong = dict(tiny_state(3))
    wrong["fc1.weight"] = torch.zeros(4, 4)
    with pytest.raises(IncompatibleIngredientsError, match="fc1.weight"):
        average(states, base=wrong, merge="model_stock")
    broken = dict(tiny_state(3))
    broken["fc2.bias"] = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(IngredientError, match="base: tensor 'fc2.bias' contains NaN"):
        average(states, base=broken, merge="model_stock").tensor("fc2.bias")


def test_the_base_is_never_overwritten(tmp_path):
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_state(3), str(base))
    soup = average([tiny_state(1)], base=base, merge="model_stock")
    with pytest.raises(Exception, match="would overwrite the input"):
        soup.save(base, progress=False)


# -- the command line ----------------------------------------------------------


def test_cli_average_with_a_base_and_a_merge_rule(tmp_path, capsys):
    paths, base = tiny_files(tmp_path)
    out = tmp_path / "ties.safetensors"
    args = ["average", *paths, "--base", base, "--merge", "ties", "--density", "0.3"]
    assert main([*args, "--lambda", "0.9", "-o", str(out), "-q"]) == 0
    assert "merged with ties density=0.3, lambda=0.9" in capsys.readouterr().out
    expected = average(
        paths, base=base, merge={"rule": "ties", "density": 0.3, "lambda": 0.9}
    ).state_dict()
    written = safetensors.torch.load_file(str(out))
    for name, value in expected.items():
        assert torch.equal(written[name], value), name
    card = json.loads(card_path(out).read_text())
    assert card["merge"] == {"rule": "ties", "density": 0.3, "lambda": 0.9}
    assert card["base"]["sha256"] == hashlib.sha256(Path(base).read_bytes()).hexdigest()


def test_cli_average_slerp_dare_and_wise_ft(tmp_path):
    paths, base = tiny_files(tmp_path)
    out = tmp_path / "s.safetensors"
    assert (
        main(["average", *paths[:2], "--merge", "slerp", "--t", "0.4", "-o", str(out), "-q"]) == 0
    )
    out = tmp_path / "d.safetensors"
    dare = ["--merge", "dare_ties", "--density", "0.5", "--seed", "4"]
    assert main(["average", *paths, "--base", base, *dare, "-o", str(out), "-q"]) == 0
    assert json.loads(card_path(out).read_text())["merge"]["seed"] == 4
    out = tmp_path / "w.safetensors"
    assert main(["average", *paths, "--base", base, "--alpha", "0.5", "-o", str(out), "-q"]) == 0
    assert json.loads(card_path(out).read_text())["merge"] == {"rule": "linear", "alpha": 0.5}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--merge", "ties", "--density", "0.3"], "merge rule 'ties' works on task vectors"),
        (["--merge", "ties", "--density", "0"], "option 'density'"),
        (["--merge", "ties"], "option 'density': required"),
        (["--merge", "slerp", "--t", "0.5"], "'slerp' merges exactly 2 members; this soup has 3"),
        (["--merge", "ties", "--density", "0.3", "--t", "0.5"], "option 't'"),
        (["--merge", "tie"], "merge rule 'tie' is unknown"),
        (["--density", "0.5"], "rule 'linear' has no such option"),
    ],
)
def test_cli_average_bad_merge_flags_are_one_error_line(tmp_path, capsys, extra, needle):
    paths, _ = tiny_files(tmp_path)
    out = tmp_path / "x.safetensors"
    assert main(["average", *paths, *extra, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()
