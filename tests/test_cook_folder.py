"""A cook's output folder: it replaces its own files there, and never anyone else's."""

from __future__ import annotations

import json

import pytest
import torch

from modelsoup.cook import cook
from modelsoup.cook.folder import COOK_MARKER
from modelsoup.errors import WriteError

INGREDIENTS = [{"weight": torch.full((1, 1), v)} for v in (1.0, 3.0)]


def _score(model: torch.nn.Module) -> float:
    return 1 - abs(float(model.weight.detach()) - 2.0) / 4


def _cook(out, score=_score, **options):
    return cook(
        INGREDIENTS,
        torch.nn.Linear(1, 1, bias=False),
        score,
        output=out,
        progress=False,
        bootstrap_resamples=100,
        **options,
    )


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "mine",
    [
        "report.md",
        "report.json",
        "figures/methods.png",
        "journal.jsonl",
        "soups/uniform.safetensors",
    ],
)
def test_a_folder_holding_files_a_cook_would_replace_is_refused_untouched(tmp_path, mine):
    out = tmp_path / "results"
    (out / mine).parent.mkdir(parents=True, exist_ok=True)
    (out / mine).write_text('{"format": "my own"}\n')
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    calls = []
    with pytest.raises(WriteError, match=f"holds {mine.split('/')[0]}, which no cook wrote"):
        _cook(out, lambda m: calls.append(1) or _score(m))
    assert not calls  # refused before any evaluation
    assert _tree(out) == before  # nothing replaced, set aside or added


def test_a_cook_writes_beside_other_files_and_reruns_over_its_own(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = out / ".env.tmp-4194301"  # looks like a dead writer's leftover: it is the user's
    stale.write_text("SECRET=1")
    first = _cook(out)
    assert (out / COOK_MARKER).is_file() and (out / "report.md").is_file()
    assert (out / "notes.txt").read_text() == "mine" and stale.read_text() == "SECRET=1"
    again = _cook(out)  # the cook's own folder: its files are replaced
    assert [m.held_out for m in again.methods] == [m.held_out for m in first.methods]
    assert stale.read_text() == "SECRET=1"


def test_a_cook_killed_while_saving_without_a_journal_is_resumed(tmp_path):
    out = tmp_path / "out"
    _cook(out, journal=False)
    # a kill while saving soups leaves them without the reports, and there is no journal
    for name in ("report.md", "report.json"):
        (out / name).unlink()
    assert not (out / "journal.jsonl").exists()
    _cook(out, journal=False)
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("left", ["journal.jsonl", "report.json"])
def test_a_folder_cooked_before_the_marker_is_still_a_cooks(tmp_path, left):
    out = tmp_path / "out"
    _cook(out)
    (out / COOK_MARKER).unlink()
    for name in {"journal.jsonl", "report.json"} - {left}:
        (out / name).unlink()
    assert json.loads((out / left).read_text().splitlines()[0] if left.endswith("l") else
                      (out / left).read_text())["format"].startswith("modelsoup.")  # fmt: skip
    _cook(out)
    assert (out / COOK_MARKER).is_file()


@pytest.mark.parametrize("existed", [False, True])
def test_a_cook_that_fails_before_writing_leaves_the_folder_as_it_was(tmp_path, existed):
    out = tmp_path / "out"
    if existed:
        out.mkdir()

    def broken(model):
        raise ValueError("the evaluator is broken")

    with pytest.raises(ValueError, match="broken"):
        _cook(out, broken)
    assert out.is_dir() == existed
    assert not existed or list(out.iterdir()) == []


def test_diagnose_never_replaces_a_diagnosis_it_did_not_write(tmp_path):
    from modelsoup.cook.diagnose import diagnose

    def run(out):
        return diagnose(INGREDIENTS, torch.nn.Linear(1, 1, bias=False), _score, output=out)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "diagnosis.json").write_text('{"mine": true}')
    with pytest.raises(WriteError, match="holds diagnosis.json, which no cook wrote"):
        run(theirs)
    assert (theirs / "diagnosis.json").read_text() == '{"mine": true}'
    ours = tmp_path / "ours"
    run(ours)
    assert (ours / COOK_MARKER).is_file()
    (ours / COOK_MARKER).unlink()  # a diagnosis written before the marker is still ours
    assert run(ours).verdict == json.loads((ours / "diagnosis.json").read_text())["verdict"]
