"""Checkpoints as training ecosystems write them (timm wrappers with EMA, custom keys,
module extra state, TorchScript, DCP folders, BatchNorm runs), and what a cook may reuse
from an earlier run: never scores of other weights, another measure or another dtype."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest
import torch

import modelsoup
from modelsoup.cook import cook
from modelsoup.errors import ConfigError, IngredientError, SoupWarning
from modelsoup.evaluators import Accuracy, MeanLoss, MetricEvaluator, as_evaluator, identity
from modelsoup.ingredients import open_ingredients
from modelsoup.integrations._common import check_step_counters
from modelsoup.journal import Journal
from modelsoup.repair.pool import align_pool
from modelsoup.tasting import Taster


def _timm_pool(folder, k=3):
    """timm-style files holding the weights and, apart from them, their EMA."""
    torch.manual_seed(0)
    raw, ema, paths = [], [], []
    for i in range(k):
        a = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
        b = {n: v + 1.0 for n, v in a.items()}
        path = folder / f"ckpt{i}.pth.tar"
        torch.save({"state_dict": a, "state_dict_ema": b, "epoch": i, "arch": "lin"}, path)
        raw.append(a)
        ema.append(b)
        paths.append(path)
    return paths, raw, ema


def _weight_sum(model: torch.nn.Module) -> float:
    return float(model.weight.detach().sum())


def test_cook_never_reuses_scores_of_the_weights_under_another_key(tmp_path):
    paths, raw, ema = _timm_pool(tmp_path)
    out = tmp_path / "cooked"

    def run(key):
        return cook(
            paths,
            torch.nn.Linear(4, 3),
            _weight_sum,
            output=out,
            recipes=[],
            progress=False,
            checkpoint_key=key,
            bootstrap_resamples=10,
        )

    mean = lambda sds: float(sum(sd["weight"] for sd in sds).sum() / len(sds))  # noqa: E731
    first = run("state_dict_ema")
    assert first.method("uniform").held_out == pytest.approx(mean(ema), rel=1e-5)
    second = run("state_dict")  # same files, same output: other weights
    assert second.method("uniform").held_out == pytest.approx(mean(raw), rel=1e-5)
    card = json.loads((out / "soups" / "uniform.safetensors.json").read_text())
    assert {i["checkpoint_key"] for i in card["ingredients"]} == {"state_dict"}


def test_loose_tensors_beside_the_weights_are_not_taken_for_the_model(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"net": torch.nn.Linear(4, 3).state_dict(), "acc": torch.tensor(0.6)}, path)
    with pytest.raises(IngredientError, match="under key 'net'.*--checkpoint-key net"):
        modelsoup.average([path, path])
    soup = modelsoup.average([path], key="net")
    assert sorted(soup.state_dict()) == ["bias", "weight"]


class _WithExtra(torch.nn.Linear):
    def get_extra_state(self):
        return {"vocab": ["a", "b"]}

    def set_extra_state(self, state):
        self.extra = state


def test_module_extra_state_left_out_is_warned(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(_WithExtra(2, 1).state_dict(), path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        modelsoup.average([path])
    assert any("'_extra_state' is a module's extra state" in str(w.message) for w in seen)


def test_torchscript_and_dcp_get_their_own_message(tmp_path):
    script = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), script)
    with pytest.raises(IngredientError, match="TorchScript archive"):
        modelsoup.average([script])
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    (dcp / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(IngredientError, match="torch.distributed.checkpoint"):
        modelsoup.average([dcp])


def test_align_under_a_key_returns_one_kind_of_file(tmp_path):
    paths, _raw, ema = _timm_pool(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    pool = [
        {f"0.{n}": v for n, v in torch.load(p, weights_only=True)["state_dict_ema"].items()}
        for p in paths
    ]
    for p, sd in zip(paths, pool, strict=True):
        torch.save({"state_dict": {k: v - 1 for k, v in sd.items()}, "state_dict_ema": sd}, p)
    aligned = align_pool(
        paths,
        model,
        tmp_path / "out",
        example=torch.zeros(1, 4),
        checkpoint_key="state_dict_ema",
        progress=False,
    )
    assert all(str(a).endswith(".safetensors") for a in aligned)
    reference = modelsoup.average([aligned[0]]).state_dict()
    assert torch.equal(reference["0.weight"], ema[0]["weight"])


def test_callbacks_refuse_strict_integers_for_batchnorm_before_training():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(ConfigError, match="num_batches_tracked.*int_policy='first'"):
        check_step_counters(net, {}, "SoupCallback")
    check_step_counters(net, {"int_policy": "first"}, "SoupCallback")
    check_step_counters(torch.nn.Linear(2, 2), {}, "SoupCallback")


def test_evaluator_identity_names_what_is_measured():
    data = (torch.eye(3), torch.tensor([0, 1, 2]))
    ids = {
        identity(Accuracy(data, name="held-out")),
        identity(MeanLoss(data, name="held-out")),
        identity(Accuracy(data, top_k=2, name="held-out")),
        identity(MetricEvaluator(data, lambda logits, y: 1.0, name="held-out")),
        identity(MetricEvaluator(data, lambda logits, y: 2.0, name="held-out")),
        identity(
            MetricEvaluator(data, lambda logits, y: 1.0, name="held-out", higher_is_better=False)
        ),
    }
    assert len(ids) == 6
    assert identity(as_evaluator(lambda m: 1.0)) != identity(as_evaluator(lambda m: 2.0))
    # the same in another process (journals are read back by later runs)
    code = (
        "import torch; from modelsoup.evaluators import identity, MetricEvaluator;"
        "d = (torch.eye(3), torch.tensor([0, 1, 2]));"
        "print(identity(MetricEvaluator(d, lambda l, y: {'a', 'b'} and 1.0, name='h')))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(seen) == 1


def test_scores_are_of_the_soup_as_saved_in_a_coarser_dtype(tmp_path):
    torch.manual_seed(0)
    ings = [{"weight": torch.randn(1, 64) / 3} for _ in range(3)]
    score = lambda m: float(m.weight.detach().double().sum() * 1e3)  # noqa: E731
    plain = Taster(open_ingredients(ings), torch.nn.Linear(64, 1, bias=False), score)
    half = Taster(
        open_ingredients(ings), torch.nn.Linear(64, 1, bias=False), score, out_dtype="fp16"
    )
    mix = sum(sd["weight"] for sd in ings) / 3
    assert plain.score([1, 1, 1]) == pytest.approx(score_of(mix), abs=1e-3)
    assert half.score([1, 1, 1]) == pytest.approx(score_of(mix.half().float()), abs=1e-6)
    assert half.score([1, 1, 1]) != plain.score([1, 1, 1])
    # a cook's report and cards give the scores of the files it saved
    out = tmp_path / "cooked"
    result = cook(
        ings,
        torch.nn.Linear(64, 1, bias=False),
        score,
        output=out,
        recipes=[],
        progress=False,
        out_dtype="fp16",
        bootstrap_resamples=10,
    )
    saved = modelsoup.average([out / "soups" / "uniform.safetensors"]).state_dict()["weight"]
    assert saved.dtype == torch.float16
    assert result.method("uniform").held_out == pytest.approx(score_of(saved.float()), abs=1e-6)


def score_of(weight: torch.Tensor) -> float:
    return float(weight.double().sum() * 1e3)


def test_learned_coefficients_are_not_reused_for_another_architecture(tmp_path):
    from modelsoup.recipes.learned import learned_soup

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    ings = []
    for _ in range(2):
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        ings.append({k: v.clone() for k, v in net.state_dict().items()})
    journal_path = tmp_path / "journal.jsonl"

    def fit(activation):
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), activation, torch.nn.Linear(8, 3))
        taster = Taster(
            open_ingredients(ings), net, Accuracy((x, y)), journal=Journal(journal_path)
        )
        return learned_soup(taster, epochs=1)

    fit(torch.nn.ReLU())
    again = fit(torch.nn.ReLU())
    assert any("reused" in step for step in again.trace)
    other = fit(torch.nn.Tanh())
    assert not any("reused" in step for step in other.trace)


def test_a_rerun_removes_the_earlier_report_before_it_saves_soups(tmp_path, monkeypatch):
    run = importlib.import_module("modelsoup.cook.run")

    ings = [{"weight": torch.full((1, 2), float(v))} for v in (1, 2)]
    out = tmp_path / "cooked"
    kwargs = dict(output=out, recipes=[], progress=False, bootstrap_resamples=10)
    cook(ings, torch.nn.Linear(2, 1, bias=False), _weight_sum, **kwargs)
    assert (out / "report.md").exists()

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_save_soups", killed)
    with pytest.raises(KeyboardInterrupt):
        cook(ings, torch.nn.Linear(2, 1, bias=False), _weight_sum, **kwargs)
    assert not (out / "report.md").exists() and not (out / "report.json").exists()


def test_python_dash_m_modelsoup_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "modelsoup", "average"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("error:")


def test_warning_class_is_soup_warning_for_extra_state(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(_WithExtra(2, 1).state_dict(), path)
    with pytest.warns(SoupWarning, match="extra state"):
        modelsoup.average([path])
