"""The journal: every evaluation of a candidate soup, appended to a file as it happens.

Long cooks get interrupted. Each score is written (and flushed to disk) the moment
it is known, keyed by what was evaluated: the evaluator's name, the ingredients'
sha256 hashes with their coefficients, and anything else that changes the weights
(e.g. BatchNorm recalibration). Running the same cook again re-uses every recorded
score instead of evaluating again. The key does not depend on the recipe, so a
subset scored by greedy is not scored again by pruned.

A journal is never trusted silently. Each line read back passes the checks a score
passes when recorded (a finite number, not a string or a boolean; within the
evaluator's range when it has one); a line that fails, or that is not UTF-8 or not
JSON, is named in one warning and ignored, and only its evaluation runs again. The next
entry this journal writes is preceded by a line that names the bad lines by their
sha256, so later runs skip them without warning again (the file stays append-only: the
bad lines are kept, never rewritten). A file written by another format version is set
aside whole.

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
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch

from modelsoup._util import atomic_file, shares, write_error
from modelsoup.errors import SoupWarning
from modelsoup.evaluators import batches_digest, check_score, falls_short

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
        #: candidates stopped early (racing): key -> {"bound", "seen", "total",
        #: "to_beat", "strict"} and, for statistical racing, its "test"; never a score
        self.rejections: dict[str, dict] = {}
        #: the line of the file each loaded score came from (to name it in warnings)
        self.lines: dict[str, int] = {}
        self.reused = 0
        #: whether the file may end in a line cut off by a crash (checked once, on the
        #: first write: every line this journal writes ends the line)
        self._maybe_cut = True
        #: sha256 of the corrupt lines this run warned about, named in the file on the
        #: next write so that later runs ignore them quietly
        self._unnoted: list[str] = []
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            raw = self.path.read_bytes()
        except OSError as err:
            self._set_aside(f"cannot be read ({err.strerror or err})")
            return
        lines = raw.splitlines()
        if not lines:
            return
        try:
            header = json.loads(lines[0].decode("utf-8"))
            ok = isinstance(header, dict) and header.get("format") == FORMAT
        except ValueError:  # UnicodeDecodeError is one
            ok = False
        if not ok:
            self._set_aside("is not a modelsoup journal of this version")
            return
        bad: list[tuple[int, str, str]] = []
        noted: set[str] = set()
        for number, line in enumerate(lines[1:], start=2):
            try:
                ignored = _noted_lines(line)
                if ignored is not None:
                    noted.update(ignored)
                    continue
                key, score, rejected = _parse_entry(line)
            except ValueError as err:
                bad.append((number, str(err), hashlib.sha256(line).hexdigest()))
                continue
            if rejected is not None:
                self.rejections[key] = rejected
                continue
            self.scores[key] = score
            self.lines[key] = number
        bad = [entry for entry in bad if entry[2] not in noted]
        self._unnoted = [digest for _, _, digest in bad]
        if bad:
            shown = "; ".join(f"line {n}: {why}" for n, why, _ in bad[:_SHOWN])
            more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
            warnings.warn(
                f"{self.path}: {len(bad)} corrupt journal line(s) ignored ({shown}{more}); "
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
        merged: dict[str, float] = {}
        for (sha, c), share in zip(mixture, shares(c for _, c in mixture)):
            if c > 0:  # (shares: weights whose sum overflows keep their proportions)
                merged[sha] = merged.get(sha, 0.0) + share
        canon = {
            "evaluator": evaluator,
            "mixture": sorted((sha, round(c, 10)) for sha, c in merged.items()),
            "extra": dict(sorted((extra or {}).items())),
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()

    def lookup(self, key: str, bounds: tuple[float, float] | None = None) -> float | None:
        """The recorded score, or ``None``.

        With ``bounds`` (the evaluator's :func:`~modelsoup.evaluators.score_range`), a
        recorded score outside them is reported, forgotten and ``None`` returned, so the
        evaluation runs again rather than a corrupt score being trusted.
        """
        found = self.scores.get(key)
        if found is None or bounds is None or bounds[0] <= found <= bounds[1]:
            return found
        del self.scores[key]
        where = f"line {self.lines[key]}" if key in self.lines else "a score"
        warnings.warn(
            f"{self.path}: {where} ignored: score {found} is outside the evaluator's range "
            f"[{bounds[0]}, {bounds[1]}]; that evaluation will run again",
            SoupWarning,
            stacklevel=3,
        )
        return None

    @property
    def outputs_dir(self) -> Path | None:
        """Where cached model outputs (logits) live, beside the journal file."""
        return None if self.path is None else self.path.with_name(self.path.name + ".outputs")

    def save_outputs(self, key: str, tensor: torch.Tensor) -> None:
        """Keep a tensor of model outputs (e.g. an ingredient's logits) for later runs."""
        if self.outputs_dir is None:
            return
        # Bytes written by us, not by save_file: a full disk is then an OSError, which
        # atomic_file turns into one clear WriteError (and removes the half-written file).
        tensor = tensor.contiguous()
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            return  # a diverged model's NaN logits: computed again, never cached
        # the file says which key it holds and a hash of its values: a file copied over
        # another, or edited, is recomputed rather than trusted
        meta = {"key": key, "sha256": batches_digest([tensor], 64)}
        data = safetensors.torch.save({"outputs": tensor}, metadata=meta)
        with atomic_file(self.outputs_dir / f"{key}.safetensors") as tmp:
            tmp.write_bytes(data)

    def load_outputs(self, key: str) -> torch.Tensor | None:
        """Cached outputs saved by :meth:`save_outputs`, or ``None`` when absent; one that
        is unreadable, of another key, edited (its hash differs), not floating or not
        finite is warned about and ``None`` (the outputs are computed again)."""
        if self.outputs_dir is None:
            return None
        path = self.outputs_dir / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensor = fh.get_tensor("outputs")
        except Exception:  # a cut-off cache file: recompute rather than trust it
            warnings.warn(f"{path}: unreadable cached outputs ignored", SoupWarning, stacklevel=2)
            return None
        if "sha256" not in meta:
            return None  # written before caches carried their hash: computed again quietly
        if (
            meta.get("key") != key
            or not tensor.is_floating_point()
            or meta.get("sha256") != batches_digest([tensor], 64)
            or not bool(torch.isfinite(tensor).all())
        ):
            warnings.warn(
                f"{path}: cached outputs not written for this key by modelsoup (copied or "
                "edited) are ignored and computed again",
                SoupWarning,
                stacklevel=2,
            )
            return None
        return tensor

    def rejection(
        self, key: str, to_beat: float, strict: bool, higher: bool, test: Mapping | None = None
    ) -> dict | None:
        """A recorded early rejection that still holds against ``to_beat``, made by the
        same ``test`` (``None``: exact racing's proof; else statistical racing's method,
        confidence and clip) or by exact racing's proof, which holds under any test; else
        ``None``. It is never a score: a recipe that needs the candidate's score evaluates
        it in full.

        Example:
            >>> j = Journal(None)
            >>> j.record_rejection("k", bound=0.4, seen=10, total=100, to_beat=0.9, strict=False)
            >>> j.rejection("k", 0.8, False, True)["bound"], j.rejection("k", 0.3, False, True)
            (0.4, None)
            >>> test = {"method": "m", "confidence": 0.9, "clip": None}
            >>> j.rejection("k", 0.8, False, True, test)["bound"]  # a proof holds at any confidence
            0.4
            >>> j.record_rejection("s", bound=0.4, seen=10, total=100, to_beat=0.9, strict=False,
            ...                    test=test)
            >>> j.rejection("s", 0.8, False, True)  # a statistical rejection is no proof
        """
        found = self.rejections.get(key)
        made_by = None if found is None else _test_of(found)
        if found is None or made_by not in (None, _test_of({"test": test})):
            return None
        bound = found["bound"]
        return found if falls_short(bound, to_beat, higher) else None

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
        test: Mapping | None = None,
    ) -> None:
        """Remember that a candidate was stopped early, and why (no score is recorded):
        by exact racing's proof, or by the statistical ``test`` named (its method,
        confidence, clip and the seed of the examples' order)."""
        entry = {"bound": bound, "seen": seen, "total": total, "to_beat": to_beat}
        entry["strict"] = strict
        if test is not None:
            entry["test"] = dict(test)
        self.rejections[key] = entry
        self._append({"key": key, "rejected": entry}, detail)

    def record(self, key: str, score: float, detail: Mapping | None = None) -> None:
        """Remember a score and append it to the file, flushed to disk.

        The score passes the checks a loaded one must (:func:`_parse_entry`): a score
        that could not be read back is never written.
        """
        what = str((detail or {}).get("evaluator", "score"))
        score = check_score(score, what)
        self.scores[key] = score
        self.rejections.pop(key, None)
        self._append({"key": key, "score": score}, detail)

    def _append(self, entry: dict, detail: Mapping | None) -> None:
        if self.path is None:
            return
        entry = {**entry, "time": round(time.time(), 3)}
        if detail:
            entry["detail"] = dict(detail)
        try:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut = not new and self._maybe_cut and _ends_mid_line(self.path)
            self._maybe_cut = False
            with open(self.path, "a", encoding="utf-8") as fh:
                if new:
                    fh.write(json.dumps({"format": FORMAT}) + "\n")
                elif cut:  # a line cut off by a crash: end it, never continue it
                    fh.write("\n")
                if self._unnoted:  # warned about once: later runs skip them quietly
                    fh.write(json.dumps({"ignored_lines": self._unnoted}) + "\n")
                fh.write(json.dumps(entry, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._unnoted = []
        except OSError as err:
            raise write_error(self.path, err, "cannot record in the journal") from err


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


#: bad journal lines named one by one in the warning before "and N more"
_SHOWN = 8
_KEY = re.compile(r"[0-9a-f]{64}")


def _noted_lines(line: bytes) -> list[str] | None:
    """The sha256 digests a line of corrupt lines already warned about names, or
    ``None`` for any other line.

    Example:
        >>> _noted_lines(b'{"ignored_lines": ["%s"]}' % (b"0" * 64)) == ["0" * 64]
        True
        >>> _noted_lines(b'{"key": "x", "score": 1}') is None
        True
    """
    if not line.startswith(b'{"ignored_lines"'):
        return None
    try:
        entry = json.loads(line.decode("utf-8"))
    except ValueError:  # cut off: a corrupt line like any other
        return None
    digests = entry.get("ignored_lines") if isinstance(entry, dict) else None
    if not isinstance(digests, list) or not all(
        isinstance(d, str) and _KEY.fullmatch(d) for d in digests
    ):
        return None
    return digests


def _parse_entry(line: bytes) -> tuple[str, float | None, dict | None]:
    """The (key, score, rejection) of one journal line, checked as a score is on record;
    a ``ValueError`` saying what is wrong otherwise. A score line has no rejection; an
    early-rejection line (racing) has no score.

    Example:
        >>> _parse_entry(b'{"key": "%s", "score": 0.5}' % (b"a" * 64))[1]
        0.5
        >>> _parse_entry(b'{"key": "%s", "score": NaN}' % (b"a" * 64))
        Traceback (most recent call last):
        ...
        ValueError: score nan is not a finite number
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        entry = json.loads(text)
    except ValueError:
        raise ValueError("not JSON (cut off by a crash?)") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(entry, dict):
        raise ValueError(f"a JSON {type(entry).__name__}, not an object")
    key, score = entry.get("key"), entry.get("score")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"key {key!r} is not a sha256 hex digest")
    if "rejected" in entry and score is None:
        try:
            return key, None, _checked_rejection(entry["rejected"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("an early rejection that is not well formed") from None
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f"score {score!r} is a {type(score).__name__}, not a number")
    try:
        value = float(score)
    except OverflowError:
        raise ValueError(f"score {score} is out of range") from None
    if not math.isfinite(value):
        raise ValueError(f"score {value} is not a finite number")
    if not isinstance(entry.get("time", 0), int | float) or isinstance(entry.get("time"), bool):
        raise ValueError(f"time {entry.get('time')!r} is not a number")
    if not isinstance(entry.get("detail", {}), dict):
        raise ValueError(f"detail {entry.get('detail')!r} is not an object")
    return key, value, None


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
    test = value.get("test")
    if test is not None:
        if not isinstance(test, dict) or not isinstance(test.get("method"), str):
            raise ValueError
        confidence = test.get("confidence")
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, float)
            or not 0 < confidence < 1
        ):
            raise ValueError
        out["test"] = test
    return out


def _test_of(entry: Mapping) -> tuple | None:
    """What must match for a rejection to be reused: exact (``None``), or the
    statistical test's method, confidence and clip."""
    test = entry.get("test")
    if test is None:
        return None
    return (test.get("method"), test.get("confidence"), test.get("clip"))
