"""`modelsoup cook` at its edges: an output among its inputs, a second cook on the same
output, a device this machine lacks, Ctrl-C (during a cook and during start-up), what a
killed cook left behind. Each ends in one line and the right exit code."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from modelsoup._util import output_lock
from modelsoup.cli import main

KIT = '''
"""A tiny kitchen for cook configs: the model factory leaves a mark when called."""
import os
from pathlib import Path

import torch

from modelsoup.evaluators import Accuracy

BUILT = Path(__file__).with_name("model-built")


def model():
    BUILT.write_text("built")
    return torch.nn.Linear(4, 3)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)


class Interrupting(Accuracy):
    """Stops like Ctrl-C after $STOP_AFTER evaluations, when that is set."""

    _calls = 0  # private: a counter is not part of what the evaluator measures

    def logits(self, m):
        type(self)._calls += 1
        if type(self)._calls > int(os.environ.get("STOP_AFTER", "1000000")):
            raise KeyboardInterrupt
        return super().logits(m)


def held_out():
    return Interrupting(_data(), name="kit-held-out")
'''


def _kitchen(tmp_path, *, folders=False, output="out", **extra):
    """Three ingredients (files, or HF-style folders), the kit and a config; returns
    the config path and the ingredient paths."""
    (tmp_path / "kit.py").write_text(KIT)
    ings = []
    for seed in range(3):
        torch.manual_seed(seed)
        state = {k: v.contiguous() for k, v in torch.nn.Linear(4, 3).state_dict().items()}
        if folders:
            folder = tmp_path / "runs" / f"run{seed}"
            folder.mkdir(parents=True)
            safetensors.torch.save_file(state, str(folder / "model.safetensors"))
            (folder / "config.json").write_text('{"model_type": "tiny"}')
            ings.append(folder)
        else:
            path = tmp_path / f"ft{seed}.safetensors"
            safetensors.torch.save_file(state, str(path))
            ings.append(path)
    lines = [
        "model: kit:model",
        f"ingredients: {json.dumps([str(p) for p in ings])}",
        "held_out: kit:held_out",
        "recipes: [{name: greedy}]",
        f"output: {output}",
        "bootstrap_resamples: 100",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    cfg = tmp_path / "soup.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, ings


def _one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["the input", "inside the input", "above the inputs"])
def test_cook_refuses_an_output_among_its_inputs(tmp_path, capsys, where):
    output = {
        "the input": tmp_path / "runs" / "run0",
        "inside the input": tmp_path / "runs" / "run0" / "cook",
        "above the inputs": tmp_path / "runs",
    }[where]
    cfg, ings = _kitchen(tmp_path, folders=True, output=output)
    before = _snapshot(tmp_path / "runs")
    assert main(["cook", str(cfg), "-q"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "would overwrite the input" in line and "choose another output" in line
    assert _snapshot(tmp_path / "runs") == before  # nothing written into the model folders
    assert not (tmp_path / "model-built").exists()


def test_cook_beside_its_folder_inputs_is_fine(tmp_path, capsys):
    cfg, _ = _kitchen(tmp_path, folders=True, output=tmp_path / "cooked")
    assert main(["cook", str(cfg), "-q"]) == 0
    capsys.readouterr()
    assert (tmp_path / "cooked" / "soups" / "uniform" / "soup_card.json").exists()


def test_a_second_cook_on_the_same_output_fails_at_once(tmp_path, capsys):
    cfg, _ = _kitchen(tmp_path, output=tmp_path / "out")
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()

    def first_cook():  # holds the output as a running cook does
        with output_lock(tmp_path / "out"):
            ready.set()
            release.wait(30)

    proc = ctx.Process(target=first_cook)
    proc.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        assert main(["cook", str(cfg), "-q"]) == 2
        assert time.monotonic() - started < 20  # it did not wait for the first
        line = _one_error(capsys.readouterr().err)
        assert f"another modelsoup run (process {proc.pid}) is writing this output" in line
        assert not (tmp_path / "model-built").exists() and not (tmp_path / "out").exists()
    finally:
        release.set()
        proc.join(30)
    assert main(["cook", str(cfg), "-q"]) == 0  # the first is done: the output is free


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "gpu", "mps", "tpu"])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_built(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device[5:] or 0):
        pytest.skip(f"this machine has {device}")
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and mps is not None and mps.is_available():
        pytest.skip("this machine has MPS")
    cfg, _ = _kitchen(tmp_path, device=device)
    assert main(["cook", str(cfg), "-q"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert f"device '{device}'" in line and "use" in line
    assert not (tmp_path / "model-built").exists()  # refused at the edge
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_a_cook_says_how_to_resume_and_the_rerun_resumes(
    tmp_path, capsys, monkeypatch
):
    cfg, _ = _kitchen(tmp_path)
    monkeypatch.setenv("STOP_AFTER", "4")
    assert main(["cook", str(cfg), "-q"]) == 130
    line = _one_error(capsys.readouterr().err)
    assert "interrupted" in line and "Run the same command again to resume" in line
    recorded = len((tmp_path / "out" / "journal.jsonl").read_text().splitlines()) - 1
    assert recorded >= 4  # what finished before the interrupt is kept
    monkeypatch.delenv("STOP_AFTER")
    assert main(["cook", str(cfg), "-q"]) == 0
    resumed = json.loads((tmp_path / "out" / "report.json").read_text())["evaluations"]
    fresh_cfg = tmp_path / "fresh.yaml"
    fresh_cfg.write_text(cfg.read_text().replace("output: out", "output: fresh"))
    assert main(["cook", str(fresh_cfg), "-q"]) == 0
    capsys.readouterr()
    fresh = json.loads((tmp_path / "fresh" / "report.json").read_text())["evaluations"]
    # none of what was recorded runs again
    assert resumed["evaluations"] == fresh["evaluations"] - recorded


def test_a_killed_cooks_leftovers_are_removed_on_the_next_run(tmp_path, capsys):
    cfg, _ = _kitchen(tmp_path)
    assert main(["cook", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    dead = _dead_pid()
    # what a `kill -9` in the middle of writing leaves: half a soup, half a report, a
    # half-written soup folder, a figure, cached outputs
    left = [
        out / "soups" / f".uniform.safetensors.tmp-{dead}",
        out / f".report.json.tmp-{dead}",
        out / "figures" / f".methods.png.tmp-{dead}",
        out / "journal.jsonl.outputs" / f".abc.safetensors.tmp-{dead}",
    ]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 1000)
    (out / "soups" / f".greedy.tmp-{dead}").mkdir()
    (out / "soups" / f".greedy.tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 10)
    assert main(["cook", str(cfg)]) == 0
    err = capsys.readouterr().err
    removed = [line for line in err.splitlines() if "left by an interrupted run" in line]
    assert len(removed) == 5, err
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_ctrl_c_while_starting_up_is_one_line_not_a_traceback(tmp_path, delay):
    """SIGINT while the console script imports torch: exit 130 and one error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path("src").resolve())])}
    code = (
        "import modelsoup_launch, sys; sys.argv = ['modelsoup', 'inspect', 'x']; "
        "modelsoup_launch.main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-c", code],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # no terminal's signals; this test sends its own
    )
    lines = []
    # -X importtime reports each import as it finishes: wait for the launcher itself,
    # then interrupt the import of the package (torch takes a while).
    for line in proc.stderr:
        lines.append(line)
        if "modelsoup_launch" in line:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    printed = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 130, printed
    assert printed == [printed[-1]] and printed[-1].startswith("error: interrupted"), printed


def test_recipe_labels_that_would_share_a_file_name_are_refused():
    from modelsoup.cook import cook
    from modelsoup.errors import ConfigError

    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)]
    recipes = [{"name": "greedy", "label": "my soup"}, {"name": "uniform", "label": "My-Soup"}]
    with pytest.raises(ConfigError, match=r"'my soup' and 'My-Soup' would be saved under one"):
        cook(ings, torch.nn.Linear(1, 1, bias=False), lambda m: 1.0, recipes=recipes,
             progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "cooked,needle", [(True, "is not a soup folder"), (False, "holds soups, which no cook wrote")]
)
def test_a_folder_a_soup_cannot_replace_is_refused_before_any_evaluation(tmp_path, cooked, needle):
    from modelsoup.cook import cook
    from modelsoup.cook.folder import COOK_MARKER
    from modelsoup.errors import WriteError

    ings = [{"weight": torch.full((1, 1), v)} for v in (1.0, 2.0)]
    taken = tmp_path / "out" / "soups" / "uniform"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    if cooked:  # a cook's folder, in which the user put a folder of a soup's name
        (tmp_path / "out" / COOK_MARKER).write_text("")
    calls = []
    with pytest.raises(WriteError, match=needle):
        cook(ings, torch.nn.Linear(1, 1, bias=False), lambda m: calls.append(1) or 1.0,
             recipes=[{"name": "uniform"}], output=tmp_path / "out", save_format="folder",
             baselines=False, progress=False)  # fmt: skip
    assert not calls and (taken / "notes.txt").read_text() == "mine"


def test_byte_sizes_read_as_written():
    from modelsoup._util import parse_size
    from modelsoup.cook.config import CookOptions
    from modelsoup.errors import ConfigError

    # scientific notation (a YAML 1e16 is a string, 1.0e+16 a float), fractions of a unit
    for text, want in [("1e16", 10**16), ("1.0e+16", 10**16), ("1.5GB", 1_500_000_000),
                       (".5KiB", 512), (1.0e16, 10**16), ("12", 12)]:  # fmt: skip
        assert parse_size(text) == want
        assert CookOptions(max_memory=text).max_memory == text or text == 1.0e16
    for bad in ("1.5", 0.5, float("nan"), "-1GB", True, "1e-3"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_an_output_reached_through_symlinks_is_one_output_and_never_the_inputs(tmp_path):
    import os

    from modelsoup._util import output_lock
    from modelsoup.cook.run import check_output
    from modelsoup.errors import WriteError
    from modelsoup.ingredients import open_ingredients

    out = tmp_path / "out"
    out.mkdir()
    os.symlink(out, tmp_path / "alias")
    env = {**os.environ, "PYTHONPATH": str(Path("src").resolve())}
    holder = subprocess.Popen(  # another process cooks into the folder
        [sys.executable, "-c", "import sys, time; from modelsoup._util import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriteError, match="another modelsoup run"):
            with output_lock(tmp_path / "alias"):  # the folder by another name
                pass
    finally:
        holder.kill()
        holder.wait()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    torch.save({"w": torch.ones(1)}, inputs / "a.pt")
    pool = open_ingredients([inputs / "a.pt"])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.symlink(inputs, fresh / "soups")  # the soups would land among the inputs
    with pytest.raises(WriteError, match="would overwrite the input"):
        check_output(pool, fresh)


def test_a_model_factory_that_fails_is_one_config_error_line():
    from modelsoup.cook import cook
    from modelsoup.errors import ConfigError

    def broken():
        raise RuntimeError("CUDA out of memory\nmore detail")

    with pytest.raises(ConfigError, match=r"factory failed \(RuntimeError: CUDA out of memory\)"):
        cook([{"w": torch.ones(1)}] * 2, broken, lambda m: 1.0, progress=False)


def test_an_evaluator_or_data_function_that_fails_is_one_config_error_line(tmp_path):
    from modelsoup.cook.config import resolve_evaluator, resolve_unlabeled
    from modelsoup.errors import ConfigError

    (tmp_path / "kit.py").write_text("def held():\n    raise OSError('no such file: held.csv')\n")
    for resolve in (resolve_evaluator, resolve_unlabeled):
        with pytest.raises(ConfigError, match=r"^kit.py:held\(\) failed \(OSError: no such"):
            resolve("kit.py:held", str(tmp_path))


@pytest.mark.parametrize("how", ["file", "module"])
def test_a_kitchen_that_raises_as_it_is_imported_is_one_config_error_line(tmp_path, how):
    from modelsoup.cook.config import resolve
    from modelsoup.errors import ConfigError

    (tmp_path / "broken_kitchen_mod.py").write_text("raise ValueError('bad setting')\n")
    (tmp_path / "broken_kitchen_pkg").mkdir()
    (tmp_path / "broken_kitchen_pkg" / "__init__.py").write_text("")
    (tmp_path / "broken_kitchen_pkg" / "kit.py").write_text("raise ValueError('bad setting')\n")
    # a file beside the config, or a dotted module imported from the config's folder
    target = "broken_kitchen_mod.py:held" if how == "file" else "broken_kitchen_pkg.kit:held"
    with pytest.raises(ConfigError, match=r"importing .*failed \(ValueError: bad setting\)"):
        resolve(target, tmp_path)


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_a_config_that_cannot_be_read_as_text_is_one_error_line(tmp_path, capsys, kind):
    config = tmp_path / "soup.yaml"
    if kind == "folder":
        config.mkdir()
    else:
        config.write_bytes(b"\xff\xfe\x00model: m\n")
    assert main(["cook", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "soup.yaml" in err[0], err
