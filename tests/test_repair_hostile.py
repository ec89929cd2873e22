"""Recalibration, alignment and diagnosis given data, specs and models that used to give a
wrong result or a traceback: each now gives the right result or one clear error."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

from modelsoup import average
from modelsoup.cli import main
from modelsoup.cook.config import CalledAnew, resolve_unlabeled
from modelsoup.cook.diagnose import diagnose
from modelsoup.errors import AlignmentError, ConfigError, EvaluationError, SoupWarning
from modelsoup.repair import PermutationSpec, recalibrate_bn, recalibrate_soup
from modelsoup.repair.batchnorm import as_recalibration
from modelsoup.repair.pool import align_pool


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))


def mlp_states(count: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append({k: v.clone() for k, v in mlp().state_dict().items()})
    return states


def write_states(folder, states) -> list[str]:
    paths = []
    for i, state in enumerate(states):
        paths.append(str(folder / f"m{i}.safetensors"))
        safetensors.torch.save_file(state, paths[-1])
    return paths


# --- BatchNorm recalibration ---------------------------------------------------------


def test_non_finite_data_is_refused_and_the_old_statistics_kept():
    net = bn_net()
    net[1].running_mean.fill_(3.0)
    data = torch.randn(32, 3)
    data[5, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"BatchNorm '1' are not finite.*check the data"):
        recalibrate_bn(net, data)
    assert torch.equal(net[1].running_mean, torch.full((4,), 3.0))


def test_the_cli_writes_no_soup_with_nan_statistics(tmp_path, capsys, monkeypatch):
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"b{seed}.safetensors"))
        safetensors.torch.save_file(bn_net().state_dict(), paths[-1])
    (tmp_path / "kit.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))\n"
        "def nandata():\n"
        "    x = torch.randn(16, 3)\n"
        "    x[0, 0] = float('nan')\n"
        "    return [x]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "soup.safetensors"
    argv = ["average", *paths, "-o", str(out), "-q", "--model", "kit:build"]
    assert main([*argv, "--recalibrate-bn", "kit:nandata"]) == 2
    assert "not finite" in capsys.readouterr().err and not out.exists()


def test_a_replaced_tensor_holding_nan_is_never_written(tmp_path):
    soup = average([bn_net(), bn_net()])
    soup.overrides = {"1.running_var": torch.full((4,), float("nan"))}
    with pytest.raises(ConfigError, match="replacement of tensor '1.running_var'"):
        soup.save(tmp_path / "s.safetensors", progress=False)
    assert not (tmp_path / "s.safetensors").exists()


def test_a_batchnorm_the_data_never_reaches_keeps_its_statistics():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
            self.b = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    net = TwoHeads()
    net.b[1].running_mean.fill_(3.0)
    net.b[1].num_batches_tracked.fill_(100)
    with pytest.warns(SoupWarning, match=r"never reached BatchNorm 'b.1'"):
        recalibrate_bn(net, torch.randn(32, 3))
    assert torch.equal(net.b[1].running_mean, torch.full((2,), 3.0))
    assert int(net.b[1].num_batches_tracked) == 100 and int(net.a[1].num_batches_tracked) == 1


def test_a_tensor_of_inputs_weighs_every_row_alike():
    torch.manual_seed(0)
    x = torch.randn(258, 3) * torch.tensor([1.0, 2.0, 3.0])
    net = nn.BatchNorm1d(3)
    recalibrate_bn(net, x)  # two batches of 129: their equal-weight mean is the mean of rows
    assert torch.allclose(net.running_mean, x.mean(0), atol=1e-5)
    one_row = nn.BatchNorm1d(3)
    recalibrate_bn(one_row, torch.randn(257, 3))  # 129 + 128 rows, never a batch of one row
    assert int(one_row.num_batches_tracked) == 2


def test_data_the_model_cannot_run_is_one_error():
    with pytest.raises(EvaluationError, match=r"recalibrate_bn: the model failed on a batch"):
        recalibrate_bn(bn_net(), torch.randn(8, 5))


def test_no_batch_is_read_past_num_batches():
    batches = iter([torch.randn(8, 3) for _ in range(4)])
    recalibrate_bn(bn_net(), batches, num_batches=2)
    assert len(list(batches)) == 2


def test_one_shot_iterators_read_once_per_model_are_refused_or_called_again(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="one-shot generator"):
        as_recalibration(torch.randn(8, 3) for _ in range(2))
    (tmp_path / "gen_kit.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    for _ in range(2):\n"
        "        yield torch.randn(16, 3, generator=g)\n"
        "stream = iter([1, 2])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = resolve_unlabeled("gen_kit:batches", str(tmp_path))
    assert isinstance(data, CalledAnew)
    first, second = bn_net(), bn_net()
    second.load_state_dict(first.state_dict())
    for net in (first, second):  # every model sees the same two batches
        recalibrate_bn(net, data)
    assert torch.equal(first[1].running_mean, second[1].running_mean)
    with pytest.raises(ConfigError, match="one-shot list_iterator"):
        resolve_unlabeled("gen_kit:stream", str(tmp_path))


def test_batchnorm_without_running_statistics_has_nothing_to_recalibrate():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ConfigError, match="keeps no running statistics"):
        recalibrate_soup(average([net, net]), net, torch.randn(8, 3))


# --- alignment -------------------------------------------------------------------------

FULL = PermutationSpec(
    {"0.weight": ("P", None), "0.bias": ("P",), "2.weight": (None, "P")}
)  # fmt: skip
PARTIAL = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",)})  # misses 2.weight


def test_with_recalibrated_candidates_every_row_scores_the_soup_it_saves(tmp_path):
    from modelsoup.cook import cook
    from modelsoup.evaluators import Accuracy
    from modelsoup.soup import Soup

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen)
    y = (x @ torch.randn(3, 2, generator=gen)).argmax(-1)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = bn_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        for _ in range(30):  # the statistics drift with training, as in any fine-tune
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[:200]), y[:200]).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    held = Accuracy((x[200:250], y[200:250]), name="held")
    test = Accuracy((x[250:], y[250:]), name="test")
    result = cook(states, bn_net, held, test=test, output=tmp_path / "out",
                  recipes=[{"name": "layerwise", "variant": "classifier"}],
                  recalibrate=torch.randn(64, 3, generator=gen) * 2 + 1,
                  recalibrate_candidates=True, progress=False, bootstrap_resamples=20)  # fmt: skip
    for m in result.methods:
        if not isinstance(m.result, Soup):
            continue
        saved = bn_net()
        saved.load_state_dict(safetensors.torch.load_file(tmp_path / "out" / m.saved))
        assert (held.evaluate(saved), test.evaluate(saved)) == (m.held_out, m.test), m.label


def _bn_fine_tunes() -> tuple[dict, list[dict]]:
    # a base whose running variances are 1 and fine-tunes whose are 0.3: task arithmetic
    # with lambda 2 takes them to 1 + 2 (0.3 - 1) = -0.4
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in bn_net().state_dict().items()}
    tunes = []
    for seed in range(2):
        torch.manual_seed(seed + 1)
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                 for k, v in base.items()}  # fmt: skip
        state["1.running_var"] = torch.full((4,), 0.3)
        tunes.append(state)
    return base, tunes


def test_a_merge_rule_that_takes_a_running_variance_below_zero_is_said_and_recalibrated(
    tmp_path,
):
    from modelsoup.cook import cook

    base, tunes = _bn_fine_tunes()
    rule = {"rule": "task_arithmetic", "lambda": 2.0}
    with pytest.warns(SoupWarning, match="'1.running_var', a BatchNorm running variance"):
        soup = average(tunes[:1], base=base, merge=rule)
        assert float(soup.tensor("1.running_var").min()) < 0
    x = torch.randn(64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        result = cook(tunes, bn_net, lambda m: float(-m(x).abs().mean()), base=base,
                      recipes=[{"name": "forward", "merge": rule, "max_ingredients": 1}],
                      recalibrate=x, output=tmp_path / "out", progress=False,
                      bootstrap_resamples=20)  # fmt: skip
    forward = next(m for m in result.methods if m.label.startswith("forward"))
    assert forward.result.size == 1  # one member, but moved by the rule: recalibrated
    saved = safetensors.torch.load_file(tmp_path / "out" / forward.saved)
    assert float(saved["1.running_var"].min()) > 0


def test_the_self_check_holds_for_bounded_parameters_and_extra_state():
    from modelsoup.repair.trace import check_keeps_function

    class Bounded(nn.Module):  # p must stay below 1: scrambled past it, outputs are NaN
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.p = nn.Parameter(torch.full((3,), 0.9))

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) * torch.log1p(-self.p)

        def get_extra_state(self):  # not a tensor: kept out of the check
            return {"version": 2}

        def set_extra_state(self, state) -> None:
            pass

    right = PermutationSpec({"a.weight": ("P", None), "a.bias": ("P",), "b.weight": (None, "P")})
    check_keeps_function(Bounded(), right, torch.randn(5, 4), traced=False)
    wrong = PermutationSpec({"a.weight": ("P", None), "a.bias": ("P",)})
    with pytest.raises(AlignmentError, match="changes the output"):
        check_keeps_function(Bounded(), wrong, torch.randn(5, 4), traced=False)


def test_a_hand_written_spec_that_changes_the_function_is_refused(tmp_path):
    paths = write_states(tmp_path, mlp_states(2))
    with pytest.raises(AlignmentError, match="permutation spec changes the output of Sequential"):
        align_pool(paths, mlp, tmp_path / "out", spec=PARTIAL, example=torch.randn(4, 3),
                   progress=False)  # fmt: skip
    with pytest.warns(SoupWarning, match="permutation spec given is not checked"):
        align_pool(paths, None, tmp_path / "out", spec=FULL, progress=False)


def test_a_hand_spec_that_leaves_out_batchnorm_is_refused_though_a_fresh_model_hides_it(
    tmp_path,
):
    # a new BatchNorm's statistics and scales are equal across channels, so permuting
    # around them changes nothing there; in trained ingredients it changes the function
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        net = bn_net()
        with torch.no_grad():
            net[1].running_mean.normal_()
            net[1].running_var.uniform_(0.5, 2.0)
            net[1].weight.uniform_(0.5, 1.5)
            net[1].bias.normal_()
        states.append(net.state_dict())
    paths = write_states(tmp_path, states)
    no_bn = PermutationSpec(
        {"0.weight": ("P", None), "0.bias": ("P",), "3.weight": (None, "P")}
    )  # fmt: skip
    with pytest.raises(AlignmentError, match="permutation spec changes the output"):
        align_pool(paths, bn_net, tmp_path / "out", spec=no_bn, example=torch.randn(4, 3),
                   progress=False)  # fmt: skip
    assert not (tmp_path / "out" / "aligned").exists()
    with_bn = PermutationSpec(
        {**no_bn.axes_to_perm, **{f"1.{n}": ("P",) for n in ("weight", "bias",
         "running_mean", "running_var")}}
    )  # fmt: skip
    aligned = align_pool(paths, bn_net, tmp_path / "out", spec=with_bn,
                         example=torch.randn(4, 3), progress=False)  # fmt: skip
    x = torch.randn(8, 3)
    for state, path in zip(states, aligned, strict=True):
        want, got = bn_net().eval(), bn_net().eval()
        want.load_state_dict(state)
        got.load_state_dict(safetensors.torch.load_file(path))
        torch.testing.assert_close(got(x), want(x))


def test_an_aligned_copy_is_made_again_when_the_spec_changes(tmp_path):
    paths = write_states(tmp_path, mlp_states(2))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(FULL.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)
        first = align_pool(paths, None, tmp_path / "out", spec=spec_file, progress=False)[1]
        record = json.loads((tmp_path / "out" / "aligned" / "001-m1.json").read_text())
        assert record["alignment"]["spec_sha256"] and record["alignment"]["method"] == "reference"
        before = safetensors.torch.load_file(first)
        other = PermutationSpec(
            {"0.weight": ("Q", None), "0.bias": ("Q",), "2.weight": (None, "Q")}
        )
        assert align_pool(paths, None, tmp_path / "out", spec=other, progress=False)[1] == first
        again = json.loads((tmp_path / "out" / "aligned" / "001-m1.json").read_text())
        assert again["alignment"]["spec_sha256"] != record["alignment"]["spec_sha256"]
        align_pool(paths, None, tmp_path / "out", spec=FULL, max_iter=3, progress=False)
        third = json.loads((tmp_path / "out" / "aligned" / "001-m1.json").read_text())
        assert third["alignment"]["max_iter"] == 3
    # the same function as before, whatever the spec's names
    assert all(torch.equal(v, safetensors.torch.load_file(first)[k]) for k, v in before.items())


def test_align_pool_leaves_the_callers_module_as_it_was(tmp_path):
    paths = write_states(tmp_path, mlp_states(2))
    module = mlp().train()
    align_pool(paths, module, tmp_path / "out", example=torch.randn(4, 3), progress=False)
    assert module.training and all(m.training for m in module.modules())


def test_generator_data_for_several_activation_alignments_is_refused(tmp_path):
    paths = write_states(tmp_path, mlp_states(3))
    with pytest.raises(ConfigError, match="activation matching: the data is a one-shot"):
        align_pool(paths, mlp, tmp_path / "out", example=torch.randn(4, 3),
                   method="activations", data=(torch.randn(8, 3) for _ in range(2)),
                   progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"axes": []}, "'axes' must map tensor names to lists"),
        ({"axes": {"0.weight": ["P", None]}, "blocks": {"0.weight": [None, 1]}}, "whole numbers"),
        ({"axes": {"0.weight": ["P", None]}, "blocks": [1]}, "'blocks' must map"),
    ],
)
def test_malformed_spec_files_are_one_error_line(tmp_path, capsys, spec, needle):
    paths = write_states(tmp_path, mlp_states(2))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = [
        "align",
        *paths,
        "-o",
        str(tmp_path / "out"),
        "-q",
        "--spec",
        str(tmp_path / "spec.json"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_negative_input_shape_is_one_error_line(tmp_path, capsys):
    paths = write_states(tmp_path, mlp_states(2))
    argv = ["align", *paths, "-o", str(tmp_path / "out"), "-q", "--model", "torch.nn:Identity"]
    assert main([*argv, "--input-shape=-1,3"]) == 2
    assert "must be positive sizes" in capsys.readouterr().err


# --- diagnosis -------------------------------------------------------------------------


@pytest.mark.parametrize("alphas", [(1, 0.5, 0), (0, 0.25, 0.5), (0.5,)])
def test_barriers_are_measured_against_the_ends_whatever_alphas_are_given(alphas):
    # the score falls linearly from one model to the other: no barrier on any path
    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)]
    d = diagnose(ings, nn.Linear(1, 1, bias=False), lambda m: 3 - float(m.weight.detach()),
                 alphas=alphas)  # fmt: skip
    assert d.alphas[0] == 0 and d.alphas[-1] == 1 and d.alphas == sorted(d.alphas)
    assert max(d.barriers.values()) == pytest.approx(0, abs=1e-9) and d.soupable


def test_alphas_outside_the_segment_are_refused():
    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)]
    with pytest.raises(ConfigError, match="alphas: 1.5 is not a number in"):
        diagnose(ings, nn.Linear(1, 1, bias=False), lambda m: 1.0, alphas=(0, 1.5))


def test_a_diagnosis_of_one_ingredient_or_of_a_path_with_nan_is_refused_not_called_fine():
    from modelsoup.cook.diagnose import barrier

    calls = []
    with pytest.raises(ConfigError, match="needs two or more, and found 1"):
        diagnose([{"weight": torch.ones(1, 1)}], nn.Linear(1, 1, bias=False),
                 lambda m: calls.append(1) or 1.0)  # fmt: skip
    assert not calls
    with pytest.raises(EvaluationError, match="not all finite"):
        barrier([0, 0.5, 1], [0.9, float("nan"), 0.8], True)


def test_a_diagnosis_output_that_is_a_file_is_refused_before_any_evaluation(tmp_path):
    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)]
    (tmp_path / "afile").write_text("mine")
    calls = []
    with pytest.raises(ConfigError, match="goes in a folder, but this is a file"):
        diagnose(ings, nn.Linear(1, 1, bias=False), lambda m: calls.append(1) or 1.0,
                 output=tmp_path / "afile")  # fmt: skip
    assert not calls and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("width", [6, 8])  # 8: as many pixels per row as channels
def test_activation_matching_reads_units_only_where_they_are(width):
    from modelsoup.repair import activation_matching, permute_state_dict, trace_permutation_spec

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].weight.uniform_(-1, 1)
    x = torch.randn(128, 3, width, width)
    spec = trace_permutation_spec(net, x[:2])
    state = net.state_dict()
    perms = {p: torch.arange(n) for p, n in spec.sizes(state).items()}
    perms["P_0"] = torch.randperm(8)
    other = permute_state_dict(state, spec, perms)
    found = activation_matching(net, state, other, spec, x)
    back = permute_state_dict(other, spec, found)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_recalibrated_soups_card_says_what_data_it_was_recalibrated_on(tmp_path):
    from modelsoup.soup import card_path

    nets = [bn_net() for _ in range(2)]
    data, other = torch.randn(32, 3), torch.randn(32, 3)

    def soup_of(x):
        return recalibrate_soup(average(nets), bn_net(), x).overrides

    tags = []
    for x in (data, data.clone(), other):
        soup = recalibrate_soup(average(nets), bn_net(), x, num_batches=None)
        out = soup.save(tmp_path / f"s{len(tags)}.safetensors", progress=False)
        tags.append(json.loads(card_path(out).read_text())["options"]["bn_recalibration"])
    assert tags[0] == tags[1] != tags[2]  # the same inputs, then other ones
    assert tags[0].startswith("recalibrated on Tensor ") and tags[0].endswith("batches=all")
    once = recalibrate_soup(average(nets), bn_net(), (b for b in [data]))  # read once: used
    assert once.options["bn_recalibration"].endswith("(one-shot, not hashed), batches=all")
    assert torch.equal(once.overrides["1.running_mean"], soup_of(data)["1.running_mean"])
