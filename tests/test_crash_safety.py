"""Crash safety of the writers: a real writer in a child process is killed (SIGKILL) at
each step of publishing a soup, and what it leaves must be safe: a soup never stands
beside a card that is not its own, a folder output is never lost between its two
renames, and the next run tidies every leftover. Plus the output lock.

The crash is injected at the file system's rename and unlink calls (each one a step) in a
forked child: the writes themselves are real, on the real disk.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal

import pytest
import safetensors.torch
import torch

from modelsoup._util import clean_stale_temps, output_lock
from modelsoup.errors import WriteError
from modelsoup.ingredients import open_ingredients
from modelsoup.soup import Soup, card_path
from modelsoup.writer import FOLDER_CARD

SIZE = 50_000  # elements: 200 KB of float32

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
)


def _soup(weights):
    """Ingredients all 0 and all 1: a soup's value is the second one's share, which its
    card states, so card and soup can be checked against each other."""
    ings = open_ingredients([{"w": torch.zeros(SIZE)}, {"w": torch.ones(SIZE)}])
    return Soup(ings, weights)


def _crash_at(step, job):
    """Run ``job`` in a forked child killed just before its ``step``-th rename or unlink.
    Returns the child's exit code (``-SIGKILL`` when the crash happened)."""

    def child():
        count = 0

        def hooked(real):
            def call(*args, **kwargs):
                nonlocal count
                count += 1
                if count == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            return call

        os.replace, os.rename, os.unlink = map(hooked, (os.replace, os.rename, os.unlink))
        job()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)  # also reaps it: a dead writer's pid is then really dead
    assert proc.exitcode is not None, "the child writer hung"
    return proc.exitcode


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _weights_value(path):
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".pt":
        w = torch.load(path, weights_only=True)["w"]
    else:
        w = safetensors.torch.load_file(str(path))["w"]
    assert torch.all(w == w[0]), "a soup file mixing two writes"
    return float(w[0])


def _assert_consistent(out):
    """Whatever soup stands at ``out`` has its own card beside (or inside) it."""
    card = card_path(out)
    if not out.exists():
        return None
    assert card.exists(), f"{out} stands without a card"
    share = json.loads(card.read_text())["ingredients"][1]["coefficient"]
    assert _weights_value(out) == pytest.approx(share), "a soup beside another soup's card"
    return share


@pytest.mark.parametrize("name", ["soup.safetensors", "soup.pt", "soupdir"])
def test_killed_at_every_step_of_publishing(tmp_path, name, caplog):
    out = tmp_path / name
    seen_crashes = 0
    for step in range(1, 40):
        _soup([1, 1]).save(out, progress=False)  # the old output: share 0.5
        code = _crash_at(step, lambda: _soup([1, 3]).save(out, progress=False))  # 0.75
        if code == 0:
            break
        assert code == -signal.SIGKILL
        seen_crashes += 1
        share = _assert_consistent(out)
        if name == "soupdir":
            # Between the folder's two renames it is missing; the next run restores it.
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="modelsoup"):
                clean_stale_temps(tmp_path)
            share = _assert_consistent(out)
            assert share in (0.5, 0.75), f"step {step}: the folder output was lost"
        # The next run removes what the dead writer left, says so, and writes afresh.
        leftovers = [n for n in _hidden(tmp_path) if ".tmp-" in n or ".old-" in n]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modelsoup"):
            _soup([1, 3]).save(out, progress=False)
        removed = [r.getMessage() for r in caplog.records if "interrupted run" in r.getMessage()]
        assert len(removed) == len(leftovers), (step, leftovers, removed)
        assert _hidden(tmp_path) == [], f"step {step}: {_hidden(tmp_path)} left behind"
        assert _assert_consistent(out) == 0.75
        if share is None:
            assert name != "soupdir"  # a single file may be gone for a moment, never a folder
    else:
        pytest.fail("the writer never finished")
    assert seen_crashes >= 3  # the windows under test were really hit
    assert _assert_consistent(out) == 0.75
    if name == "soupdir":
        assert (out / FOLDER_CARD).exists() and not (tmp_path / "soupdir.json").exists()


def test_temp_files_of_a_writer_killed_mid_write_are_removed_next_run(tmp_path, caplog):
    out = tmp_path / "soup.safetensors"
    # Step 1 is the first rename: the data is written in full, nothing published yet.
    assert _crash_at(1, lambda: _soup([1, 1]).save(out, progress=False)) == -signal.SIGKILL
    left = _hidden(tmp_path)
    assert any(".tmp-" in n for n in left) and not out.exists()
    # A live process's temp files are left alone.
    mine = tmp_path / f".other.safetensors.tmp-{os.getpid()}"
    mine.write_bytes(b"in progress")
    with caplog.at_level(logging.WARNING, logger="modelsoup"):
        _soup([1, 1]).save(out, progress=False)
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records)
    assert _hidden(tmp_path) == [mine.name]
    assert _assert_consistent(out) == 0.5


def test_a_second_writer_of_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "soup.safetensors"
    ready, release = multiprocessing.get_context("fork").Event(), None
    release = multiprocessing.get_context("fork").Event()

    def holder():
        with output_lock(out):
            ready.set()
            release.wait(30)

    proc = multiprocessing.get_context("fork").Process(target=holder)
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(WriteError, match=rf"process {proc.pid}\) is writing this output"):
            _soup([1, 1]).save(out, progress=False)
        assert not out.exists()
    finally:
        release.set()
        proc.join(30)
    _soup([1, 1]).save(out, progress=False)  # free again once the first is done
    assert _assert_consistent(out) == 0.5


def test_files_beside_an_output_that_only_look_like_leftovers_are_left_alone(tmp_path):
    from modelsoup.cli import main

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        safetensors.torch.save_file({"w": torch.full((2,), float(i))}, paths[-1])
    mine = [tmp_path / ".env.old-20240101", tmp_path / ".draft.tmp-424242"]
    for path in mine:
        path.write_text("the user's")
    (tmp_path / ".results.old-2023").mkdir()
    stale = tmp_path / ".soup.safetensors.tmp-999999"  # this output's own leftover
    stale.write_text("half")
    assert main(["average", *paths, "-o", str(tmp_path / "soup.safetensors"), "-q"]) == 0
    assert all(p.read_text() == "the user's" for p in mine)
    assert (tmp_path / ".results.old-2023").is_dir() and not stale.exists()
