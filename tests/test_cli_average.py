"""`modelsoup average` and `modelsoup inspect`, and every bad input they must refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import tiny_state
from modelsoup.cli import main


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for s in range(3):
        p = tmp_path / f"ft{s}.safetensors"
        safetensors.torch.save_file(tiny_state(s), str(p))
        paths.append(p)
    return paths


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_average_writes_soup_and_card(tmp_path, ckpts, capsys):
    out = tmp_path / "out" / "soup.safetensors"
    code = main(["average", *map(str, ckpts), "-o", str(out), "--weights", "1,2,1", "-q"])
    assert code == 0
    assert out.exists() and (tmp_path / "out" / "soup.safetensors.json").exists()
    got = safetensors.torch.load_file(str(out))
    states = [tiny_state(s) for s in range(3)]
    ref = (states[0]["fc1.weight"] + 2 * states[1]["fc1.weight"] + states[2]["fc1.weight"]) / 4
    assert torch.allclose(got["fc1.weight"], ref, atol=1e-6)


def test_average_glob_and_out_dtype(tmp_path, ckpts):
    out = tmp_path / "soup_bf16.safetensors"
    code = main(
        ["average", str(tmp_path / "ft*.safetensors"), "-o", str(out), "--out-dtype", "bf16", "-q"]
    )
    assert code == 0
    assert safetensors.torch.load_file(str(out))["fc1.weight"].dtype == torch.bfloat16


def test_inspect_reports_compatibility(tmp_path, ckpts, capsys):
    assert main(["inspect", *map(str, ckpts)]) == 0
    text = capsys.readouterr().out
    assert "soup-compatible: yes" in text and "parameters" in text
    bad = tmp_path / "bad.safetensors"
    sd = tiny_state(0)
    sd["fc2.weight"] = torch.zeros(4, 16)
    safetensors.torch.save_file(sd, str(bad))
    # Incompatible inputs end as `average` would: the table first, then one error line, exit 2.
    assert main(["inspect", str(ckpts[0]), str(bad)]) == 2
    printed = capsys.readouterr()
    assert "soup-compatible: no" in printed.out and "parameters" in printed.out
    errors = printed.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: not soup-compatible: ")
    assert "fc2.weight" in errors[0]
    assert main(["inspect", "--json", str(ckpts[0]), str(bad)]) == 2
    printed = capsys.readouterr()
    assert json.loads(printed.out)["compatible"] is False
    assert printed.err.startswith("error: not soup-compatible: ")


def _truncated(tmp_path, ckpts):
    p = tmp_path / "trunc.safetensors"
    p.write_bytes(ckpts[0].read_bytes()[:-100])
    return [str(p), str(ckpts[1])], "truncated"


def _garbage(tmp_path, ckpts):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a checkpoint at all" * 10)
    return [str(p), str(ckpts[1])], "corrupt"


def _missing(tmp_path, ckpts):
    return [str(tmp_path / "nope.safetensors"), str(ckpts[1])], "not found"


def _shapes(tmp_path, ckpts):
    p = tmp_path / "other.safetensors"
    sd = tiny_state(0)
    sd["fc1.weight"] = torch.zeros(16, 9)
    safetensors.torch.save_file(sd, str(p))
    return [str(ckpts[0]), str(p)], "fc1.weight"


def _nan_weight(tmp_path, ckpts):
    return [str(ckpts[0]), str(ckpts[1]), "--weights", "1,nan"], "finite"


def _neg_weight(tmp_path, ckpts):
    return [str(ckpts[0]), str(ckpts[1]), "--weights", "1,-2"], ">= 0"


def _nan_tensor(tmp_path, ckpts):
    p = tmp_path / "diverged.safetensors"
    sd = tiny_state(0)
    sd["fc2.bias"][1] = float("nan")
    safetensors.torch.save_file(sd, str(p))
    return [str(ckpts[0]), str(p)], "'fc2.bias' contains NaN"


def _inf_tensor(tmp_path, ckpts):
    p = tmp_path / "inf.pt"
    sd = tiny_state(0)
    sd["fc1.weight"][0, 0] = float("inf")
    torch.save(sd, p)
    return [str(p), str(ckpts[0])], "contains Inf"


def _shard_size_for_one_file(tmp_path, ckpts):
    # the output is one .safetensors file: a shard size would be ignored, so it is refused
    return [str(ckpts[0]), str(ckpts[1]), "--max-shard-size", "1KB"], "--max-shard-size"


def _reserved_name(tmp_path, ckpts):
    # safetensors keeps its header's metadata under "__metadata__": no tensor may be so named
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"named{i}.pt")
        torch.save({"__metadata__": torch.full((2,), float(i))}, paths[-1])
    return [str(p) for p in paths], "named '__metadata__' cannot be stored as safetensors"


def _named_pipe(tmp_path, ckpts):
    # opening a pipe waits for a writer: refused before it is opened, not hung on
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    return [str(pipe), str(ckpts[1])], "not a regular file"


def _unknown_format(tmp_path, ckpts):
    p = tmp_path / "weights.npz"
    p.write_bytes(b"x")
    return [str(p)], "unknown checkpoint format"


@pytest.mark.parametrize(
    "make",
    [
        _truncated,
        _garbage,
        _missing,
        _shapes,
        _nan_weight,
        _neg_weight,
        _nan_tensor,
        _inf_tensor,
        _shard_size_for_one_file,
        _reserved_name,
        _named_pipe,
        _unknown_format,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, ckpts, make, capsys):
    args, needle = make(tmp_path, ckpts)
    before = _snapshot(tmp_path)
    out = tmp_path / "soup.safetensors"
    code = main(["average", *args, "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert _snapshot(tmp_path) == before  # nothing written, inputs untouched


def test_refuses_to_overwrite_an_input(tmp_path, ckpts, capsys):
    before = _snapshot(tmp_path)
    code = main(["average", *map(str, ckpts), "-o", str(ckpts[0]), "-q"])
    assert code == 2 and "overwrite the input" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_refuses_to_replace_a_folder_that_is_not_a_soup(tmp_path, ckpts, capsys):
    results = tmp_path / "results"
    (results / "important").mkdir(parents=True)
    (results / "notes.txt").write_text("my notes")
    (results / "important" / "run.csv").write_text("data")
    before = _snapshot(tmp_path)
    code = main(["average", *map(str, ckpts), "-o", str(results), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is not a soup folder (it holds 2 files: important, notes.txt)" in err[0]
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_empty_folder_or_a_previous_soup_folder_is_replaced(tmp_path, ckpts):
    out = tmp_path / "soup"
    out.mkdir()
    assert main(["average", *map(str, ckpts), "-o", str(out), "-q"]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(["average", *map(str, ckpts[:2]), "-o", str(out), "-q"]) == 0  # its own soup
    assert (out / "soup_card.json").is_file() and (out / "model.safetensors").read_bytes() != first


def test_write_adapter_refuses_a_folder_that_is_not_a_soup(tmp_path):
    from modelsoup.errors import WriteError
    from modelsoup.formats.peft_adapter import write_adapter

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WriteError, match="is not a soup folder"):
        write_adapter(out, {"peft_type": "LORA", "r": 1}, {"k": torch.ones(1)})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left


@pytest.mark.parametrize(
    "output, needle",
    [
        (".", "is the current folder (or holds it)"),
        ("..", "is the current folder (or holds it)"),
        ("", "the output path is empty"),
        ("afile/o.safetensors", "afile is a file, not a folder"),
    ],
    ids=["dot", "dotdot", "empty", "inside-a-file"],
)
def test_an_output_that_cannot_be_a_soup_is_one_error_line(
    tmp_path, ckpts, capsys, monkeypatch, output, needle
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    (work / "afile").write_text("a file")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code = main(["average", *map(str, ckpts), "-o", output, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert _snapshot(tmp_path) == before


def test_a_checkpoint_key_that_cannot_apply_is_refused(tmp_path, ckpts, capsys):
    code = main(
        ["average", *map(str, ckpts), "-o", str(tmp_path / "s.safetensors")]
        + ["--checkpoint-key", "nope", "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--checkpoint-key 'nope' cannot apply" in err[0]
    assert not (tmp_path / "s.safetensors").exists()


def test_a_pool_key_is_not_applied_to_a_safetensors_base(tmp_path, ckpts):
    emas = []
    for i, sd in enumerate(tiny_state(s) for s in (5, 6)):
        emas.append(tmp_path / f"ema{i}.pt")
        torch.save({"state_dict": tiny_state(0), "state_dict_ema": sd}, emas[-1])
    args = ["average", *map(str, emas), "--base", str(ckpts[0]), "--merge", "task_arithmetic"]
    args += ["--checkpoint-key", "state_dict_ema", "-o", str(tmp_path / "s.safetensors"), "-q"]
    assert main(args) == 0


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, ckpts, capsys):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_state(0), "extra": payload}, evil)
    code = main(["average", str(evil), str(ckpts[1]), "-o", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "refused to unpickle" in err
    assert not marker.exists()
    assert not (tmp_path / "s.safetensors").exists()


def test_console_script_runs_and_argparse_errors_exit_2(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "modelsoup")
    done = subprocess.run([exe, "average"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1


KIT = """
import torch
from conftest import TinyNet

def build():
    return TinyNet()

def inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 8, generator=g) * 3 + 1 for _ in range(4)]

def linear():
    return torch.nn.Linear(8, 3)
"""


def test_average_recalibrates_batchnorm_before_saving(tmp_path, ckpts, monkeypatch, capsys):
    from conftest import TinyNet
    from modelsoup import average
    from modelsoup.repair import recalibrate_bn

    (tmp_path / "kit.py").write_text(KIT)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "soup.safetensors"
    args = ["average", *map(str, ckpts), "-o", str(out), "-q", "--model", "kit.py:build"]
    assert main([*args, "--recalibrate-bn", "kit.py:inputs", "--recalibrate-batches", "3"]) == 0
    assert "BatchNorm statistics re-estimated" in capsys.readouterr().out
    got = safetensors.torch.load_file(str(out))

    # the same by hand: the plain soup in a module, its statistics re-estimated on 3 batches
    net = average(ckpts).apply(TinyNet())
    g = torch.Generator().manual_seed(0)
    recalibrate_bn(net, [torch.randn(32, 8, generator=g) * 3 + 1 for _ in range(3)])
    assert torch.allclose(got["bn.running_mean"], net.bn.running_mean)
    assert torch.allclose(got["bn.running_var"], net.bn.running_var)
    assert int(got["bn.num_batches_tracked"]) == 3
    assert torch.equal(got["fc1.weight"], average(ckpts).state_dict()["fc1.weight"])


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--recalibrate-bn", "kit.py:inputs"], "needs --model"),
        (["--recalibrate-bn", "kit.py:inputs", "--model", "kit.py:linear"], "no BatchNorm"),
        (["--model", "kit.py:build"], "--model is used only to re-estimate BatchNorm"),
        (["--recalibrate-batches", "3"], "--recalibrate-batches is used only"),
        (["--device", "cuda:7"], "--device is used only"),
        (
            [
                "--recalibrate-bn",
                "kit.py:inputs",
                "--model",
                "kit.py:build",
                "--recalibrate-batches",
                "0",
            ],
            "must be at least 1; got 0",
        ),
        (
            ["--recalibrate-bn", "kit.py:inputs", "--model", "kit.py:build", "--device", "cuda:99"],
            "cuda:99",
        ),
    ],
)
def test_average_recalibration_errors(tmp_path, ckpts, monkeypatch, capsys, extra, needle):
    (tmp_path / "kit.py").write_text(KIT)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "soup.safetensors"
    assert main(["average", *map(str, ckpts), "-o", str(out), "-q", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_flags_that_would_be_dropped_silently_are_refused(tmp_path, capsys):
    import yaml

    paths = []
    for i, dtype in enumerate([torch.bfloat16, torch.float32]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        safetensors.torch.save_file({"w": torch.full((2,), float(i)).to(dtype)}, paths[-1])
    out = tmp_path / "o.safetensors"
    assert main(["average", *paths, "--weights=", "-o", str(out), "-q"]) == 2
    assert "--weights '' must be numbers" in capsys.readouterr().err
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": p, "parameters": {"weight": 1.0}} for p in paths]}))  # fmt: skip
    argv = ["average", "--from-mergekit", str(config), "--no-normalize", "-o", str(out), "-q"]
    assert main(argv) == 2
    assert "drop --no-normalize" in capsys.readouterr().err
    # an ingredient with weight 0 is not in the soup: nor is its dtype
    assert main(["average", *paths, "--weights", "0,1", "-o", str(out), "-q"]) == 0
    assert safetensors.torch.load_file(str(out))["w"].dtype == torch.float32


def test_inspect_checks_a_base_and_says_what_it_checks(tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        safetensors.torch.save_file({"w": torch.full((4,), float(i))}, paths[-1])
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(5)}, str(base))
    assert main(["inspect", *paths]) == 0
    assert "NaN or Inf values are found when averaging" in capsys.readouterr().out
    assert main(["inspect", *paths, "--base", str(base)]) == 2
    assert "is (4,) in m0 but (5,) in base" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["ties", "dare_ties"])
def test_no_normalize_with_a_rule_it_cannot_change_is_refused(tmp_path, capsys, rule):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        safetensors.torch.save_file({"w": torch.full((4,), float(i))}, paths[-1])
    argv = ["average", *paths[1:], "--base", paths[0], "--merge", rule, "--density", "1"]
    assert main([*argv, "--no-normalize", "-o", str(tmp_path / "o.safetensors"), "-q"]) == 2
    assert f"has no effect on {rule}" in capsys.readouterr().err


def test_a_folder_output_that_cannot_be_written_names_itself_not_its_staging(tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"named{i}.pt")
        torch.save({"__metadata__": torch.full((2,), float(i))}, paths[-1])
    before = _snapshot(tmp_path)
    out = tmp_path / "soup"
    assert main(["average", *map(str, paths), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'model.safetensors'}: ") and ".tmp-" not in err
    assert _snapshot(tmp_path) == before and not out.exists()


def test_pipes_among_a_folders_files_are_refused_or_passed_by_never_waited_on(tmp_path, ckpts):
    # opening a pipe waits for a writer: an index that is one is refused, a soup card that
    # is one is not read (run in a child with a time limit: a regression would hang)
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "model.safetensors.index.json")
    runs = tmp_path / "runs"
    runs.mkdir()
    for p in ckpts[:2]:
        (runs / p.name).write_bytes(p.read_bytes())
    os.mkfifo(runs / f"{ckpts[0].name}.json")
    cmd = [sys.executable, "-m", "modelsoup", "average", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([*cmd, str(model), str(ckpts[2]), "-o", str(tmp_path / "a.safetensors")],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 2 and "is not a regular file" in done.stderr
    done = subprocess.run([*cmd, str(runs), "-o", str(tmp_path / "b.safetensors")],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0 and (tmp_path / "b.safetensors").is_file()
