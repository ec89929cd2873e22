"""A cook's output folder: what a cook writes there, and whose folder it is.

A cook replaces its own files in its output folder (``report.md``, ``report.json``,
``soups/``, ``figures/``, ...) on every run, so it must never take a folder whose files
of those names are someone else's. The first thing a cook writes into its folder is
the hidden marker :data:`COOK_MARKER`; a later cook (a rerun, or the resume of a killed
one, even one that kept no journal) finds it and goes on. A folder that holds files of
the cook's names but no marker is refused with a :class:`WriteError` and left as it
is. Folders written before the marker existed are still recognised by their journal,
report or diagnosis. ``modelsoup diagnose`` and the demo keep their output folders by the
same rules, with their own file names.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "cook"
    >>> with held_output(out):
    ...     _ = (out / "report.md").write_text("# modelsoup report")
    >>> check_cook_folder(out)  # a cook's own folder: a rerun may replace its files
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from modelsoup._util import clean_stale_temps, output_lock, write_error
from modelsoup.errors import ConfigError, WriteError
from modelsoup.soup import check_not_input

#: what a cook writes into its output folder (and replaces on a rerun)
COOK_FILES = (
    "soups",
    "figures",
    "aligned",
    "journal.jsonl",
    "journal.jsonl.outputs",
    "report.md",
    "report.json",
)
#: what ``modelsoup diagnose`` writes into its output folder
DIAGNOSIS_FILES = ("diagnosis.json", "similarity.png", "interpolation.png")
#: the hidden file that says a cook wrote this folder, written before anything else
COOK_MARKER = ".modelsoup-cook"
_JOURNAL_FORMAT = "modelsoup.journal/"
_REPORT_FORMAT = "modelsoup.report/"
_DIAGNOSIS_FIELDS = {"labels", "similarity", "barriers", "soupable", "verdict"}


def check_output(pool: Sequence[Any], out: Path) -> None:
    """Refuse a cook output folder that is a file, that holds files of a cook's names
    no cook wrote (:func:`check_cook_folder`), or that is, contains or lies inside an
    ingredient's file or folder: the journal, reports and soups must never land among
    the inputs. Aligned copies in ``<out>/aligned`` are the cook's own and allowed.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> check_output(open_ingredients([{"w": torch.ones(1)}]), Path("out"))
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"{out}: a cook writes a folder there, but it is a file; choose another output"
        )
    own = (out / "aligned").resolve()
    theirs = [ing for ing in pool if ing.path is None or own not in ing.path.resolve().parents]
    check_not_input(theirs, out)
    for part in COOK_FILES:
        check_not_input(theirs, out / part)  # a symlink among them leads elsewhere
    check_cook_folder(out)


def check_cook_folder(out: Path, files: Sequence[str] = COOK_FILES) -> None:
    """Refuse an output folder holding files of the names a cook replaces
    (``files``: :data:`COOK_FILES`) when no cook wrote it: they would be lost.

    A folder a cook wrote holds :data:`COOK_MARKER`, or (written before the marker)
    a modelsoup journal or report. Other files beside the cook's are never touched and
    are no reason to refuse.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "notes.txt").write_text("mine")
        >>> check_cook_folder(out)  # nothing of a cook's names: nothing to lose
        >>> _ = (out / "report.md").write_text("my own report")
        >>> try:
        ...     check_cook_folder(out)
        ... except WriteError as err:
        ...     print(str(err).split(": ", 1)[1].split(" (")[0])
        holds report.md, which no cook wrote
    """
    try:
        present = [name for name in files if _lexists(out / name)]
    except OSError as err:
        raise write_error(out, err, "cannot read the output folder") from err
    if not present or _written_by_a_cook(out):
        return
    shown = ", ".join(present)
    raise WriteError(
        f"{out}: holds {shown}, which no cook wrote (it has no {COOK_MARKER}) and a cook "
        f"would replace; choose another output, or remove {'it' if len(present) == 1 else 'them'}"
    )


@contextlib.contextmanager
def held_output(out: Path, files: Sequence[str] = COOK_FILES) -> Iterator[None]:
    """Hold a cook's output folder while the cook writes it.

    The folder is locked (:func:`~modelsoup._util.output_lock`: a second cook on it
    fails at once), checked again under the lock (:func:`check_cook_folder` of
    ``files``, the names the writer replaces there), tidied
    of what a killed run left (:func:`tidy_output`) and marked as a cook's
    (:data:`COOK_MARKER`). A cook that fails before writing anything else leaves no
    folder behind. Taken again within one process (aligning, then cooking), it holds
    the same folder.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "cook"
        >>> with held_output(out):
        ...     (out / COOK_MARKER).is_file()
        True
    """
    with output_lock(out):
        check_cook_folder(out, files)
        tidy_output(out, files)
        made = not _lexists(out)
        marker = out / COOK_MARKER
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.write_text("written by a modelsoup cook: it may replace its files here\n")
        except OSError as err:
            raise write_error(out, err, "cannot write the output folder") from err
        try:
            yield
        except BaseException:
            _unmark(out, made)
            raise


def tidy_output(out: Path, files: Sequence[str] = COOK_FILES) -> None:
    """Remove what a killed run left in a cook's output folder (half-written soups,
    reports, figures and cached outputs of dead processes; see
    :func:`~modelsoup._util.clean_stale_temps`), and put back a soup folder moved aside.
    In the folder itself only the leftovers of the cook's own ``files`` are touched: it
    may hold the user's files too.

    Example:
        >>> tidy_output(Path("/nonexistent"))
    """
    for name in files:
        clean_stale_temps(out, only=name)
    for folder in {"soups", "figures", "journal.jsonl.outputs"} & set(files):
        clean_stale_temps(out / folder)


def _written_by_a_cook(out: Path) -> bool:
    if (out / COOK_MARKER).is_file():
        return True
    # written before the marker: a modelsoup journal, report or diagnosis says so
    journal = _json_of(out / "journal.jsonl", first_line=True)
    report = _json_of(out / "report.json")
    diagnosis = _json_of(out / DIAGNOSIS_FILES[0])
    return (
        str(journal.get("format")).startswith(_JOURNAL_FORMAT)
        or str(report.get("format")).startswith(_REPORT_FORMAT)
        or _DIAGNOSIS_FIELDS <= set(diagnosis)
    )


def _json_of(path: Path, first_line: bool = False) -> dict:
    """The JSON object in a file (or on a JSON-lines file's first line); ``{}`` if none."""
    try:
        with path.open("rb") as fh:
            text = fh.readline(1 << 20) if first_line else fh.read(1 << 24)
        data = json.loads(text.decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return {}
    return data if isinstance(data, dict) else {}


def _unmark(out: Path, made: bool) -> None:
    """Take the marker back from a folder the failed cook wrote nothing else into."""
    with contextlib.suppress(OSError):
        names = {p.name for p in out.iterdir()}
        if names <= {COOK_MARKER}:
            (out / COOK_MARKER).unlink(missing_ok=True)
            if made:
                out.rmdir()


def _lexists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
