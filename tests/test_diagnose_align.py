"""Soupability check, alignment and BatchNorm recalibration wired into cook and the CLI."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from digits_kit import DigitsBNNet, DigitsMLP, held_out, independent, on_test
from modelsoup import average
from modelsoup.cli import main
from modelsoup.cook.diagnose import diagnose, weight_similarity
from modelsoup.ingredients import open_ingredients


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    """Three BatchNorm MLPs trained from different random starts, on disk."""
    folder = tmp_path_factory.mktemp("strangers")
    for s in range(3):
        safetensors.torch.save_file(independent(s), str(folder / f"net{s}.safetensors"))
    return folder


def assert_same_functions(pairs) -> None:
    """Each aligned checkpoint computes what its original did."""
    x = torch.randn(16, 64)
    for original, aligned in pairs:
        a, b = DigitsBNNet().eval(), DigitsBNNet().eval()
        a.load_state_dict(safetensors.torch.load_file(str(original)))
        b.load_state_dict(safetensors.torch.load_file(str(aligned)))
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_fine_tuned_pool_is_called_soupable(digits_ckpts, tmp_path):
    d = diagnose([digits_ckpts], DigitsMLP, held_out(), output=tmp_path)
    assert d.soupable and "soup away" in d.verdict
    assert not d.has_batchnorm
    assert all(row[i] == pytest.approx(1.0) for i, row in enumerate(d.similarity))
    saved = json.loads((tmp_path / "diagnosis.json").read_text())
    assert saved["soupable"] is True
    assert (tmp_path / "similarity.png").exists() and (tmp_path / "interpolation.png").exists()


def test_independent_nets_are_called_independent_basins(strangers):
    d = diagnose([strangers], DigitsBNNet, held_out())
    assert not d.soupable and "independent basins" in d.verdict
    assert d.has_batchnorm and any("BatchNorm" in a for a in d.advice)
    assert max(d.barriers.values()) > 0.05


def test_weight_similarity_matches_a_direct_computation(strangers):
    ings = open_ingredients([strangers])
    sim, _ = weight_similarity(ings)
    flat = [
        torch.cat(
            [ing.tensor(n).reshape(-1).double() for n in ing.names() if ing.meta(n).is_floating]
        )
        for ing in ings
    ]
    direct = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0).item()
    assert sim[0][1] == pytest.approx(direct, abs=1e-6)


def _plain_uniform(strangers, evaluator):
    model = average([strangers]).apply(DigitsBNNet())
    return evaluator.evaluate(model)


def test_align_cli_keeps_functions_and_helps_the_average(strangers, tmp_path, capsys):
    out = tmp_path / "aligned-out"
    code = main(
        [
            "align",
            str(strangers),
            "-o",
            str(out),
            "--model",
            "digits_kit:bn_model",
            "--input-shape",
            "8,64",
            "-q",
            "--write-spec",
            str(tmp_path / "spec.json"),
        ]
    )
    assert code == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 3 and paths[0].endswith("net0.safetensors")
    assert_same_functions(zip(sorted(strangers.glob("*.safetensors"))[1:], paths[1:]))
    ev = held_out()
    aligned_score = ev.evaluate(average(paths).apply(DigitsBNNet()))
    assert aligned_score > _plain_uniform(strangers, ev)
    assert json.loads((tmp_path / "spec.json").read_text())["axes"]


@pytest.mark.parametrize("where", ["input", "no folder"])
def test_align_refuses_a_spec_path_it_must_not_write_before_aligning(
    strangers, tmp_path, capsys, where
):
    first = sorted(strangers.glob("*.safetensors"))[0]
    before = first.read_bytes()
    spec = first if where == "input" else tmp_path / "missing" / "spec.json"
    out = tmp_path / "aligned-out"
    args = ["align", str(strangers), "-o", str(out), "--model", "digits_kit:bn_model"]
    assert main([*args, "--input-shape", "8,64", "-q", "--write-spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert first.read_bytes() == before and not out.exists()


def test_align_cli_merge_many_writes_every_ingredient_and_reuses_them(strangers, tmp_path, capsys):
    out = tmp_path / "mm"
    args = ["align", str(strangers), "-o", str(out), "--model", "digits_kit:bn_model"]
    args += ["--input-shape", "8,64", "--method", "merge_many", "-q"]
    assert main(args) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 3 and all("/aligned/" in p for p in paths)
    assert_same_functions(zip(sorted(strangers.glob("*.safetensors")), paths))
    sidecar = json.loads((out / "aligned" / (paths[1].split("/")[-1][:-12] + ".json")).read_text())
    assert sidecar["alignment"]["method"] == "merge_many"
    stamps = [(out / "aligned" / p.split("/")[-1]).stat().st_mtime_ns for p in paths]
    assert main(args) == 0  # a re-run finds the aligned copies and keeps them
    assert stamps == [(out / "aligned" / p.split("/")[-1]).stat().st_mtime_ns for p in paths]
    with pytest.raises(SystemExit) as exit_:
        main(args[:-3] + ["--method", "nearest"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_align_cli_activation_matching_keeps_functions_and_helps_the_average(
    strangers, tmp_path, capsys
):
    out = tmp_path / "act"
    args = ["align", str(strangers), "-o", str(out), "--model", "digits_kit:bn_model"]
    args += ["--input-shape", "8,64", "--method", "activations", "-q"]
    assert main(args) == 2  # no --data
    assert "--data" in capsys.readouterr().err
    args += ["--data", "digits_kit:train_inputs", "--batches", "4"]
    assert main([*args, "--device", "cpu"]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 3
    assert_same_functions(zip(sorted(strangers.glob("*.safetensors"))[1:], paths[1:]))
    ev = held_out()
    assert ev.evaluate(average(paths).apply(DigitsBNNet())) > _plain_uniform(strangers, ev)


def test_align_without_model_or_spec_is_a_clear_error(strangers, tmp_path, capsys):
    assert main(["align", str(strangers), "-o", str(tmp_path / "o")]) == 2
    assert "--spec" in capsys.readouterr().err


def not_a_model():  # a factory that returns something else
    return 42


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model", "digits_kit:bn_model", "--input-shape", "8,7"], "cannot be multiplied"),
        (["--model", "digits_kit:bn_model", "--input-shape", "100000,100000,64"], "too large"),
        (
            ["--model", "test_diagnose_align:not_a_model", "--input-shape", "8,64"],
            "returned int, not an nn.Module",
        ),  # fmt: skip
    ],
)
def test_align_cli_bad_models_and_inputs_are_one_line(strangers, tmp_path, capsys, flags, needle):
    assert main(["align", str(strangers), "-o", str(tmp_path / "o"), "-q", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_align_cli_writes_the_spec_it_was_given(strangers, tmp_path, capsys):
    traced = tmp_path / "traced.json"
    args = ["align", str(strangers), "-q", "--model", "digits_kit:bn_model"]
    assert main([*args, "-o", str(tmp_path / "a"), "--input-shape", "8,64",
                 "--write-spec", str(traced)]) == 0  # fmt: skip
    again = tmp_path / "again.json"
    assert main(["align", str(strangers), "-q", "-o", str(tmp_path / "b"), "--spec",
                 str(traced), "--write-spec", str(again)]) == 0  # fmt: skip
    assert json.loads(again.read_text()) == json.loads(traced.read_text())


CONFIG = """
model: digits_kit:bn_model
ingredients: ["{src}"]
held_out: digits_kit:held_out
test: digits_kit:on_test
recipes: [{{name: greedy}}]
output: {out}
bootstrap_resamples: 100
save: none
"""


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "recalibrate_bn: digits_kit:train_inputs\n",
        "align: true\nrecalibrate_bn: digits_kit:train_inputs\n",
        "align: merge_many\nrecalibrate_bn: digits_kit:train_inputs\n",
        "align: activations\nrecalibrate_bn: digits_kit:train_inputs\n",
    ],
)
def test_cook_with_align_and_recalibration(strangers, tmp_path, extra):
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(CONFIG.format(src=strangers, out=tmp_path / "out") + extra)
    assert main(["cook", str(cfg), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    uniform = next(r for r in report["rows"] if r["method"] == "uniform")
    best = next(r for r in report["rows"] if r["method"] == "best_individual")
    if "align" in extra:
        # aligned + recalibrated: the uniform soup of strangers becomes usable
        assert uniform["test"] > best["test"] - 0.15
        assert report["evaluations"]["bn_recalibrations"] > 0
    elif extra:
        assert uniform["test"] > 0.6  # fresh BatchNorm statistics alone recover much
    else:
        assert uniform["test"] < best["test"] - 0.15  # the seed paper's collapse
        assert report["notes"]


def test_cook_align_activations_without_data_is_a_clear_error(strangers, tmp_path, capsys):
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(CONFIG.format(src=strangers, out=tmp_path / "out") + "align: activations\n")
    assert main(["cook", str(cfg), "-q"]) == 2
    assert "align_data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_diagnose_cli(digits_ckpts, tmp_path, capsys):
    cfg = tmp_path / "soup.yaml"
    cfg.write_text(
        f"model: digits_kit:model\ningredients: ['{digits_ckpts}']\n"
        f"held_out: digits_kit:held_out\noutput: {tmp_path / 'o'}\n"
    )
    assert main(["diagnose", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    assert "verdict: these look fine-tuned from one start" in out
    assert (tmp_path / "o" / "diagnosis" / "diagnosis.json").exists()


def test_on_test_is_importable():
    assert on_test().name == "digits-test"


def test_cook_in_python_takes_the_recalibration_data_itself(strangers):
    from digits_kit import train_inputs
    from modelsoup.cook import cook
    from modelsoup.errors import SoupWarning

    paths = sorted(strangers.glob("*.safetensors"))
    ev = held_out()
    # unaligned strangers: both uniform soups fall below every ingredient, and cook says so
    with pytest.warns(SoupWarning, match="worse than every ingredient"):
        plain = cook(paths, DigitsBNNet, ev, recipes=[], progress=False)
    with pytest.warns(SoupWarning, match="worse than every ingredient"):
        fresh = cook(paths, DigitsBNNet, ev, recipes=[], recalibrate=train_inputs(), progress=False)
    assert fresh.method("uniform").held_out > plain.method("uniform").held_out + 0.15


def test_a_diagnosis_is_never_written_among_its_inputs_or_below_a_file(tmp_path):
    from modelsoup.errors import SoupError

    folder = tmp_path / "run"
    folder.mkdir()
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(folder / f"ing{seed}.safetensors")
        safetensors.torch.save_file(DigitsMLP().state_dict(), paths[-1])
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.name for p in folder.iterdir())
    for out, needle in ((folder, "ing0.safetensors"), (folder / "ing0.safetensors" / "d", "ing0"),
                        (tmp_path / "notes.txt" / "d", "notes.txt is a file")):  # fmt: skip
        with pytest.raises(SoupError, match=needle):
            diagnose(paths, DigitsMLP, held_out(), output=out)
    assert sorted(p.name for p in folder.iterdir()) == before
