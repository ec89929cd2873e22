"""A full disk (ENOSPC) while writing: one ``error:`` line, exit 2, and never a soup
without its card. The disk is a real, small tmpfs; the tests skip where mounting one is
not permitted."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import safetensors.torch
import torch

from modelsoup.cli import main

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted in ``tmp_path`` (unmounted afterwards)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _free(folder) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _fill(disk, leave: int) -> None:
    """Fill the disk so that ``leave`` bytes (a whole number of pages) stay free."""
    (disk / "filler").unlink(missing_ok=True)
    (disk / "filler").write_bytes(b"\0" * (_free(disk) - leave))
    assert _free(disk) == leave


def _ingredients(folder, numel):
    paths = []
    for v in (0.0, 1.0):
        p = folder / f"ing{int(v)}.safetensors"
        safetensors.torch.save_file({"w": torch.full((numel,), v)}, str(p))
        paths.append(str(p))
    return paths


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _only(disk, *names):
    found = sorted(p.name for p in disk.iterdir())
    assert found == sorted(names), found


@pytest.mark.parametrize("out_name", ["soup.safetensors", "soup.pt", "soupdir"])
def test_a_soup_larger_than_the_disk(tmp_path, small_disk, capsys, out_name):
    ings = _ingredients(tmp_path, 1_000_000)  # a 4 MB soup on a 2 MB disk
    out = small_disk / out_name
    assert main(["average", *ings, "-o", str(out), "-q"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "No space left on device" in line and "free some space" in line
    _only(small_disk)  # no soup, no card, no temporary, no lock


def test_the_soup_fits_but_its_card_does_not(tmp_path, small_disk, capsys):
    """Free space is stepped a page at a time around the soup's size: each run either
    writes soup and card, or fails with one line leaving neither (and the old ones)."""
    ings = _ingredients(tmp_path, 40_000)  # 160 KB of weights
    out = small_disk / "soup.safetensors"
    pages = -(-(160_000 + 200) // PAGE)
    outcomes = []
    for extra in range(-1, 5):
        for p in small_disk.iterdir():
            p.unlink()
        _fill(small_disk, (pages + extra) * PAGE)
        code = main(["average", *ings, "-o", str(out), "-q"])
        err = capsys.readouterr().err
        if code == 0:
            card = json.loads((small_disk / "soup.safetensors.json").read_text())
            assert card["chosen"] and out.stat().st_size > 160_000
            _only(small_disk, "filler", "soup.safetensors", "soup.safetensors.json")
            outcomes.append("written")
        else:
            assert code == 2
            line = _one_error(err)
            assert "No space left on device" in line
            _only(small_disk, "filler")
            outcomes.append("card" if "soup.safetensors.json" in line else "soup")
    # the windows under test were hit: the soup did not fit, then only the card, then both
    assert "soup" in outcomes and "card" in outcomes and "written" in outcomes, outcomes


def test_an_old_soup_keeps_its_card_when_the_new_card_does_not_fit(tmp_path, small_disk, capsys):
    ings = _ingredients(tmp_path, 40_000)
    out = small_disk / "soup.safetensors"
    assert main(["average", *ings, "--weights", "1,3", "-o", str(out), "-q"]) == 0
    old = (out.read_bytes(), (small_disk / "soup.safetensors.json").read_text())
    pages = -(-(160_000 + 200) // PAGE)
    cases = set()
    for extra in range(0, 4):
        (small_disk / "filler").unlink(missing_ok=True)
        _fill(small_disk, (pages + extra) * PAGE)
        code = main(["average", *ings, "-o", str(out), "-q"])
        err = capsys.readouterr().err
        card = json.loads((small_disk / "soup.safetensors.json").read_text())
        share = card["ingredients"][1]["coefficient"]
        value = float(safetensors.torch.load_file(str(out))["w"][0])
        assert value == pytest.approx(share)  # whichever soup stands, its own card
        if code == 0:
            break
        _one_error(err)
        assert (out.read_bytes(), (small_disk / "soup.safetensors.json").read_text()) == old
        cases.add("card" if "soup.safetensors.json" in err else "soup")
    assert code == 0 and "card" in cases, cases


def test_a_cook_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, small_disk, capsys):
    from digits_kit import DigitsMLP

    torch.manual_seed(0)
    for i in range(3):
        net = DigitsMLP()
        safetensors.torch.save_file(net.state_dict(), str(tmp_path / f"ft{i}.safetensors"))
    cfg = tmp_path / "soup.yaml"
    out = small_disk / "cook"
    cfg.write_text(
        f"model: digits_kit:DigitsMLP\ningredients: ['{tmp_path}/ft*.safetensors']\n"
        "held_out: digits_kit:held_out\nrecipes: [{name: greedy}]\n"
        f"output: {out}\nbootstrap_resamples: 100\n"
    )
    soups = out / "soups"
    stages = []
    # A few more pages free at each try: each run gets further (the journal keeps its
    # scores) and stops at a later stage, always with one line, never a soup without card.
    for attempt in range(12):
        _fill(small_disk, (3 + 5 * attempt) * PAGE)
        code = main(["cook", str(cfg), "-q"])
        if code == 0:
            break
        assert code == 2
        line = _one_error(capsys.readouterr().err)
        assert "No space left on device" in line and ".tmp-" not in line
        stages.append(line.split(": cannot")[0].split("/cook/")[-1])
        for soup in soups.glob("*.safetensors") if soups.exists() else []:
            assert (soups / (soup.name + ".json")).exists(), "a soup without its card"
        assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert len(set(stages)) >= 3, stages
    (small_disk / "filler").unlink()
    assert main(["cook", str(cfg), "-q"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert all((out / r["saved"]).exists() for r in report["rows"] if r.get("saved"))
    assert report["evaluations"]["reused"] > 0  # the journal kept what the full disk allowed
