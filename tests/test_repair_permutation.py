"""Permutation specs, tracing and weight matching on real small networks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsoup.errors import AlignmentError, ConfigError
from modelsoup.repair import (
    PermutationSpec,
    activation_align,
    activation_matching,
    align_ingredients,
    align_to,
    merge_many,
    permute_state_dict,
    trace_permutation_spec,
    weight_matching,
)


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 32),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(32, 16),
        nn.GELU(),
        nn.Linear(16, 5),
    )


def make_cnn() -> nn.Module:
    # 8x8 input -> conv 6x6 -> pool 3x3 -> conv 3x3: Flatten sees 16 channels x 9 pixels.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 9, 20),
        nn.ReLU(),
        nn.Linear(20, 4),
    )


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # 1x1 projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded model whose BatchNorm affine params and running stats are not 1/0,
    so that permuting them wrongly would show in the outputs."""
    torch.manual_seed(seed)
    model = model()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def random_perms(spec: PermutationSpec, sd: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in spec.sizes(sd).items()}


def outputs_with(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    clone = copy.deepcopy(model)
    clone.load_state_dict(sd)
    with torch.no_grad():
        return clone(x)


CASES = [(make_mlp, (6, 10)), (make_cnn, (6, 3, 8, 8)), (ResNet, (6, 3, 8, 8))]


@pytest.mark.parametrize("factory,shape", CASES, ids=["mlp", "cnn", "resnet"])
def test_random_permutation_preserves_function(factory, shape):
    model = randomized(factory)
    x = torch.randn(*shape)
    spec = trace_permutation_spec(model, x)
    sd = model.state_dict()
    permuted = permute_state_dict(sd, spec, random_perms(spec, sd))
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd), "nothing was permuted"
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(outputs_with(model, permuted, x), expected, atol=1e-5)


def test_mlp_spec_leaves_input_and_output_unpermuted():
    spec = trace_permutation_spec(make_mlp(), torch.randn(2, 10))
    assert spec.axes_to_perm == {
        "0.weight": ("P_0", None),
        "0.bias": ("P_0",),
        "3.weight": ("P_1", "P_0"),
        "3.bias": ("P_1",),
        "5.weight": (None, "P_1"),
    }


def test_cnn_flatten_expands_channel_permutation_to_blocks():
    spec = trace_permutation_spec(make_cnn(), torch.randn(2, 3, 8, 8))
    channel = spec.axes_to_perm["4.weight"][0]
    assert spec.axes_to_perm["8.weight"] == ("P_2", channel)
    assert spec.block("8.weight", 1) == 9  # 3x3 pixels per channel
    assert spec.axes_to_perm["5.running_var"] == (channel,)
    assert "5.num_batches_tracked" not in spec.axes_to_perm


def test_resnet_residual_branches_share_a_permutation():
    spec = trace_permutation_spec(ResNet(), torch.randn(2, 3, 8, 8))
    ax = spec.axes_to_perm
    stem = ax["conv.weight"][0]
    assert ax["layer1.conv2.weight"][0] == stem  # identity shortcut ties block output to input
    assert ax["layer2.shortcut.0.weight"] == (ax["layer2.conv2.weight"][0], stem, None, None)
    assert ax["layer2.shortcut.1.running_mean"] == (ax["layer2.conv2.weight"][0],)
    assert ax["fc.weight"] == (None, ax["layer2.conv2.weight"][0])
    assert len(spec.perm_to_axes) == 4


def test_weight_matching_recovers_inverse_permutation():
    model = randomized(ResNet)
    ref = model.state_dict()
    spec = trace_permutation_spec(model, torch.randn(2, 3, 8, 8))
    perms = random_perms(spec, ref, seed=3)
    other = permute_state_dict(ref, spec, perms)
    found = weight_matching(spec, ref, other)
    for name, perm in perms.items():
        assert torch.equal(found[name], torch.argsort(perm)), name
    aligned = align_to(ref, other, spec)
    assert all(torch.equal(aligned[k], ref[k]) for k in ref)


@pytest.mark.parametrize("factory,shape", CASES, ids=["mlp", "cnn", "resnet"])
def test_activation_matching_recovers_inverse_permutation(factory, shape):
    model = randomized(factory)
    ref = model.state_dict()
    x = torch.randn(*shape)
    spec = trace_permutation_spec(model, x[:2])
    perms = random_perms(spec, ref, seed=4)
    other = permute_state_dict(ref, spec, perms)
    data = torch.randn(64, *shape[1:])
    found = activation_matching(model, ref, other, spec, data)
    for name, perm in perms.items():
        assert torch.equal(found[name], torch.argsort(perm)), name
    back = activation_align(model, ref, other, spec, [(data[:32], None), (data[32:], None)])
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_activation_matching_errors_are_clear():
    model = randomized(make_mlp)
    spec = trace_permutation_spec(model, torch.randn(2, 10))
    sd = model.state_dict()
    with pytest.raises(ConfigError, match="no batches"):
        activation_matching(model, sd, sd, spec, [])
    with pytest.raises(ConfigError, match="at least 1"):
        activation_matching(model, sd, sd, spec, torch.randn(8, 10), num_batches=0)
    only_bias = PermutationSpec({"0.bias": ("P_0",), "3.weight": (None, "P_0")})
    with pytest.raises(AlignmentError, match="P_0.*weight matching"):
        activation_matching(model, sd, sd, only_bias, torch.randn(8, 10))
    with pytest.raises(AlignmentError, match="do not fit"):
        wrong = randomized(make_cnn).state_dict()
        activation_matching(model, sd, wrong, PermutationSpec({}), torch.randn(8, 10))


def test_merge_many_lines_up_permuted_copies_exactly():
    model = randomized(ResNet)
    ref = model.state_dict()
    spec = trace_permutation_spec(model, torch.randn(2, 3, 8, 8))
    copies = [permute_state_dict(ref, spec, random_perms(spec, ref, seed=s)) for s in (1, 2, 3)]
    merged = merge_many([ref, *copies], spec)
    x = torch.randn(4, 3, 8, 8)
    for sd in merged:  # all four end up as one state dict, still the same function
        assert all(torch.equal(sd[k], merged[0][k]) for k in ref)
        assert torch.allclose(outputs_with(model, sd, x), outputs_with(model, ref, x), atol=1e-5)


def test_merge_many_of_strangers_keeps_functions_and_pulls_them_together():
    nets = [randomized(make_mlp, s) for s in range(4)]
    x = torch.randn(8, 10)
    spec = trace_permutation_spec(nets[0], x)
    states = [n.state_dict() for n in nets]
    merged = merge_many(states, spec, seed=1)

    def spread(pool: list[dict]) -> float:
        return sum(
            (a[k] - b[k]).pow(2).sum().item()
            for i, a in enumerate(pool)
            for b in pool[i + 1 :]
            for k in spec.axes_to_perm
        )

    assert spread(merged) < spread(align_ingredients(states[0], states[1:], spec) + states[:1])
    for net, sd in zip(nets, merged):
        with torch.no_grad():
            assert torch.allclose(outputs_with(net, sd, x), net(x), atol=1e-5)
    again = merge_many(states, spec, seed=1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(merged, again) for k in a)


def test_merge_many_refuses_a_single_model_and_warns_when_cut_short():
    nets = [randomized(make_mlp, s) for s in range(3)]
    spec = trace_permutation_spec(nets[0], torch.randn(2, 10))
    with pytest.raises(ConfigError, match="at least 2"):
        merge_many([nets[0].state_dict()], spec)
    with pytest.warns(UserWarning, match="max_rounds"):
        merge_many([n.state_dict() for n in nets], spec, max_rounds=1)


def test_matching_independent_nets_preserves_function_and_reduces_distance():
    ref_model, other_model = randomized(make_mlp, 0), randomized(make_mlp, 1)
    x = torch.randn(8, 10)
    spec = trace_permutation_spec(ref_model, x)
    ref, other = ref_model.state_dict(), other_model.state_dict()
    aligned = align_ingredients(ref, [other], spec)[0]

    def distance(sd: dict) -> float:
        return sum((sd[k] - ref[k]).pow(2).sum().item() for k in spec.axes_to_perm)

    assert distance(aligned) < distance(other)
    with torch.no_grad():
        expected = other_model(x)
    assert torch.allclose(outputs_with(other_model, aligned, x), expected, atol=1e-5)
    again = weight_matching(spec, ref, other, seed=0)
    assert all(torch.equal(again[p], v) for p, v in weight_matching(spec, ref, other).items())


def test_aligned_soup_of_independent_nets_beats_naive_soup():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)

    def train(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # a different initialisation per run
        net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(10):
            for idx in torch.randperm(1400, generator=gen).split(64):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        return net

    a, b = train(0), train(1)
    spec = trace_permutation_spec(a, x[:2])
    ref, other = a.state_dict(), b.state_dict()
    aligned = align_to(ref, other, spec)

    def soup_accuracy(sd: dict) -> float:
        soup = {k: (ref[k] + sd[k]) / 2 for k in ref}
        with torch.no_grad():
            return (outputs_with(a, soup, x[1400:]).argmax(1) == y[1400:]).float().mean().item()

    assert soup_accuracy(aligned) > soup_accuracy(other) + 0.05  # about 0.89 vs 0.70 here


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(self.attn(h, h, h)[0])


class ConcatChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class ChannelsLastFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC flattening interleaves channels: no block permutation can follow it
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))


@pytest.mark.parametrize(
    "model,x,culprit",
    [
        (WithAttention(), torch.randn(2, 3, 4), "'attn' (MultiheadAttention)"),
        (ConcatChannels(), torch.randn(2, 3, 2, 2), "cat"),
        (ChannelsLastFlatten(), torch.randn(2, 3, 2, 2), "flatten"),
        (nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)), torch.randn(2, 3, 2, 2), "'1'"),
    ],
    ids=["attention", "concat", "channels-last-flatten", "groupnorm"],
)
def test_tracer_refuses_what_it_cannot_align(model, x, culprit):
    with pytest.raises(AlignmentError, match="by hand") as err:
        trace_permutation_spec(model, x)
    assert culprit in str(err.value)


def test_residual_to_input_pins_that_stream_but_not_the_hidden_layer():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return x + self.down(F.relu(self.up(x)))

    spec = trace_permutation_spec(Residual(), torch.randn(2, 4))
    assert spec.axes_to_perm == {
        "up.weight": ("P_0", None),
        "up.bias": ("P_0",),
        "down.weight": (None, "P_0"),
    }


def test_tied_weights_get_one_permutation():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(self.norm(self.emb(tokens)))

    model = TiedLM()
    spec = trace_permutation_spec(model, torch.randint(0, 10, (2, 5)))
    assert spec.axes_to_perm["emb.weight"] == spec.axes_to_perm["out.weight"] == (None, "P_0")
    assert spec.axes_to_perm["norm.weight"] == ("P_0",)


def test_hand_written_spec_round_trips_through_json():
    spec = PermutationSpec(
        {
            "conv.weight": ("P_0", None, None, None),
            "conv.bias": ("P_0",),
            "fc.weight": (None, "P_0"),
        },
        blocks={"fc.weight": (1, 4)},
    )
    again = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.perm_to_axes == {"P_0": [("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1)]}
    traced = trace_permutation_spec(make_cnn(), torch.randn(1, 3, 8, 8))
    assert PermutationSpec.from_dict(json.loads(json.dumps(traced.to_dict()))) == traced


def test_hand_written_spec_matches_traced_one_for_an_mlp():
    model = randomized(make_mlp)
    by_hand = PermutationSpec(
        {
            "0.weight": ("A", None),
            "0.bias": ("A",),
            "3.weight": ("B", "A"),
            "3.bias": ("B",),
            "5.weight": (None, "B"),
        }
    )
    sd = model.state_dict()
    perms = random_perms(by_hand, sd)
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(outputs_with(model, permute_state_dict(sd, by_hand, perms), x), expected)


def test_bad_specs_and_indices_are_reported():
    with pytest.raises(ConfigError):
        PermutationSpec({"w": "P_0"})
    spec = PermutationSpec({"a": ("P_0", None), "b": ("P_0",)})
    with pytest.raises(AlignmentError, match="units"):
        spec.sizes({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(AlignmentError, match="lacks"):
        spec.sizes({"a": torch.zeros(3, 2)})
    sd = {"a": torch.zeros(3, 2), "b": torch.zeros(3)}
    with pytest.raises(ConfigError, match="P_0"):
        permute_state_dict(sd, spec, {})
    with pytest.raises(ConfigError, match="reordering"):
        permute_state_dict(sd, spec, {"P_0": torch.tensor([0, 0, 1])})


class Capped(nn.Module):
    """Per-unit clamp bounds: parameters that must move with the hidden units."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 3)
        self.cap = nn.Parameter(torch.ones(8))  # equal at init: a fresh model hides them
        self.floor = nn.Parameter(-torch.ones(8))

    def forward(self, x):
        h = torch.clamp(self.up(x), max=self.cap).clamp(min=self.floor)
        return self.down(F.relu(h))


def test_clamp_bounds_of_each_unit_move_with_their_units():
    spec = trace_permutation_spec(Capped(), torch.randn(2, 4))
    assert spec.axes_to_perm["cap"] == spec.axes_to_perm["floor"] == ("P_0",)
    # trained bounds differ per unit: aligned copies still compute what they came from
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        m = Capped()
        with torch.no_grad():
            m.cap.uniform_(0.0, 0.5)
            m.floor.uniform_(-0.5, 0.0)
        models.append(m)
    x = torch.randn(16, 4)
    aligned = Capped()
    aligned.load_state_dict(align_to(models[0].state_dict(), models[1].state_dict(), spec))
    assert not torch.equal(aligned.cap, models[1].cap)  # it was permuted, and still
    torch.testing.assert_close(aligned(x), models[1](x))  # computes what it came from


def test_a_layer_also_run_on_the_input_keeps_its_input_axis_and_the_rest_is_aligned():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.up, self.down = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.shared(self.down(F.relu(self.up(self.shared(x)))))

    spec = trace_permutation_spec(Shared(), torch.randn(2, 4))
    assert spec.axes_to_perm == {
        "up.weight": ("P_0", None),
        "up.bias": ("P_0",),
        "down.weight": (None, "P_0"),
    }
