"""What every hostile-input test asserts: the CLI refuses the input the way it promises.

One ``error:`` line and exit 2; no output, not even a hidden temporary file; every input
byte for byte as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from modelsoup.cli import main


def tree(root: Path) -> dict[Path, str]:
    """sha256 of every file under ``root``, hidden ones included (links not followed)."""
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<folder>"
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, tmp_path: Path, *inputs: Path, args: tuple[str, ...] = ()) -> str:
    """Run ``modelsoup average`` on ``inputs`` into ``tmp_path/soups``; assert the
    refusal and return its one ``error:`` line."""
    capsys.readouterr()
    before = tree(tmp_path)
    out = tmp_path / "soups" / "soup.safetensors"
    code = main(["average", *map(str, inputs), "-o", str(out), "-q", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert tree(tmp_path) == before, "an output or temporary file was left, or an input changed"
    return lines[0]
