"""The journal: every evaluation of a candidate soup, appended to a file as it happens.

Long cooks get interrupted. Each score is written (and flushed to disk) the moment
it is known, keyed by what was evaluated: the evaluator's name, the ingredients'
sha256 hashes with their coefficients, and anything else that changes the weights
(e.g. BatchNorm recalibration). Running the same cook again re-uses every recorded
score instead of evaluating again. The key does not depend on the recipe, so a
subset scored by greedy is not scored again by pruned.

A line that does not parse, or a file written by another format version, is reported
with a warning and ignored: a journal is never trusted silently.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "journal.jsonl"
    >>> j = Journal(path)
    >>> key = j.key("acc", [("ab12", 0.5), ("cd34", 0.5)])
    >>> j.record(key, 0.91, detail={"recipe": "greedy"})
    >>> Journal(path).lookup(key)
    0.91
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch

from modelsoup.errors import SoupWarning
from modelsoup.evaluators import RACE_MARGIN

FORMAT = "modelsoup.journal/1"


class Journal:
    """An append-only JSON-lines file of scores, loaded on open.

    ``path=None`` gives an in-memory journal (nothing written).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        #: kept on disk across runs, so keys must name ingredients by content (sha256)
        self.persistent = self.path is not None
        self.scores: dict[str, float] = {}
        #: candidates stopped early (exact racing): key -> {"bound", "seen", "total",
        #: "to_beat", "strict"}; never a score
        self.rejections: dict[str, dict] = {}
        self.reused = 0
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            self._set_aside(f"cannot be read ({err})")
            return
        if not lines:
            return
        try:
            header = json.loads(lines[0])
            ok = isinstance(header, dict) and header.get("format") == FORMAT
        except ValueError:
            ok = False
        if not ok:
            self._set_aside("is not a modelsoup journal of this version")
            return
        bad = 0
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                key = entry["key"]
                if not isinstance(key, str):
                    raise ValueError
                if "rejected" in entry:
                    self.rejections[key] = _checked_rejection(entry["rejected"])
                    continue
                score = float(entry["score"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            self.scores[key] = score
        if bad:
            warnings.warn(
                f"{self.path}: {bad} corrupt journal line(s) ignored (e.g. cut off by a crash); "
                "those evaluations will run again",
                SoupWarning,
                stacklevel=3,
            )

    def _set_aside(self, why: str) -> None:
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.ignored-{int(time.time())}")
        os.replace(self.path, aside)
        warnings.warn(
            f"{self.path} {why}: ignored and kept as {aside.name}; starting a new journal",
            SoupWarning,
            stacklevel=3,
        )

    @staticmethod
    def key(
        evaluator: str, mixture: Sequence[tuple[str, float]], extra: Mapping | None = None
    ) -> str:
        """A stable key for one evaluation: evaluator, (sha256, coefficient) pairs, extras.

        Coefficients are normalised to sum to 1 and the pairs sorted, so the same
        soup gets the same key whatever order it was built in.
        """
        total = sum(c for _, c in mixture) or 1.0
        merged: dict[str, float] = {}
        for sha, c in mixture:
            if c > 0:
                merged[sha] = merged.get(sha, 0.0) + c / total
        canon = {
            "evaluator": evaluator,
            "mixture": sorted((sha, round(c, 10)) for sha, c in merged.items()),
            "extra": dict(sorted((extra or {}).items())),
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()

    def lookup(self, key: str) -> float | None:
        """The recorded score, or ``None``."""
        return self.scores.get(key)

    @property
    def outputs_dir(self) -> Path | None:
        """Where cached model outputs (logits) live, beside the journal file."""
        return None if self.path is None else self.path.with_name(self.path.name + ".outputs")

    def save_outputs(self, key: str, tensor: torch.Tensor) -> None:
        """Keep a tensor of model outputs (e.g. an ingredient's logits) for later runs."""
        if self.outputs_dir is None:
            return
        from modelsoup._util import atomic_file

        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.outputs_dir / f"{key}.safetensors") as tmp:
            safetensors.torch.save_file({"outputs": tensor.contiguous()}, str(tmp))

    def load_outputs(self, key: str) -> torch.Tensor | None:
        """Cached outputs saved by :meth:`save_outputs`, or ``None`` (also if unreadable)."""
        if self.outputs_dir is None:
            return None
        path = self.outputs_dir / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            return safetensors.torch.load_file(str(path))["outputs"]
        except Exception:  # a cut-off cache file: recompute rather than trust it
            warnings.warn(f"{path}: unreadable cached outputs ignored", SoupWarning, stacklevel=2)
            return None

    def rejection(self, key: str, to_beat: float, strict: bool, higher: bool) -> dict | None:
        """A recorded early rejection that still proves this candidate loses against
        ``to_beat``, or ``None``. It is never a score: a recipe that needs the
        candidate's score evaluates it in full.

        Example:
            >>> j = Journal(None)
            >>> j.record_rejection("k", bound=0.4, seen=10, total=100, to_beat=0.9, strict=False)
            >>> j.rejection("k", 0.8, False, True)["bound"], j.rejection("k", 0.3, False, True)
            (0.4, None)
        """
        found = self.rejections.get(key)
        if found is None:
            return None
        bound = found["bound"]
        still = bound < to_beat - RACE_MARGIN if higher else bound > to_beat + RACE_MARGIN
        return found if still else None

    def record_rejection(
        self,
        key: str,
        *,
        bound: float,
        seen: int,
        total: int,
        to_beat: float,
        strict: bool,
        detail: Mapping | None = None,
    ) -> None:
        """Remember that a candidate was stopped early, and why (no score is recorded)."""
        entry = {"bound": bound, "seen": seen, "total": total, "to_beat": to_beat}
        entry["strict"] = strict
        self.rejections[key] = entry
        self._append({"key": key, "rejected": entry}, detail)

    def record(self, key: str, score: float, detail: Mapping | None = None) -> None:
        """Remember a score and append it to the file, flushed to disk."""
        self.scores[key] = score
        self.rejections.pop(key, None)
        self._append({"key": key, "score": score}, detail)

    def _append(self, entry: dict, detail: Mapping | None) -> None:
        if self.path is None:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"format": FORMAT}) + "\n")
            entry = {**entry, "time": round(time.time(), 3)}
            if detail:
                entry["detail"] = dict(detail)
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _checked_rejection(value: object) -> dict:
    """A journal line's rejection record, checked like a score is (finite numbers)."""
    if not isinstance(value, dict):
        raise ValueError
    out = {}
    for name in ("bound", "to_beat"):
        number = value[name]
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError
        if not math.isfinite(number):
            raise ValueError
        out[name] = float(number)
    for name in ("seen", "total"):
        count = value[name]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError
        out[name] = count
    out["strict"] = bool(value.get("strict", False))
    return out
