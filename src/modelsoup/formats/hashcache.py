"""Remembered sha256 hashes of checkpoint files, so each file is hashed once, not per run.

Every soup card and journal key names its ingredients by the sha256 of their files, and
hashing is the slowest part of averaging (about 2 GB/s on one core, against 8 GB/s for
reading from the page cache). A computed hash is therefore remembered, keyed by the file's
identity on disk: absolute path, size, modification and change times (nanoseconds),
inode and device, like git's index. Rewriting, replacing, truncating or touching a file
changes one of these and the hash is computed afresh; the change time cannot be set back
by any ordinary tool.

The cache is one JSON-lines file, ``$XDG_CACHE_HOME/modelsoup/sha256.jsonl`` (that is
``~/.cache/modelsoup/sha256.jsonl`` by default). ``MODELSOUP_HASH_CACHE`` names another
file, or turns the cache off with ``off``. The cache only ever saves work: a missing,
unreadable, unwritable or corrupt cache just means hashing again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

#: lines kept when the file is rewritten without its stale entries
_COMPACT_AT = 20000

_loaded: dict[str, tuple[Path, dict[str, str]]] = {}
_writing = threading.Lock()


def cache_file() -> Path | None:
    """Where hashes are remembered, or ``None`` when ``MODELSOUP_HASH_CACHE=off``.

    Example:
        >>> import os
        >>> saved = os.environ.get("MODELSOUP_HASH_CACHE")
        >>> os.environ["MODELSOUP_HASH_CACHE"] = "/tmp/hashes.jsonl"
        >>> cache_file()
        PosixPath('/tmp/hashes.jsonl')
        >>> os.environ["MODELSOUP_HASH_CACHE"] = "off"
        >>> cache_file() is None
        True
        >>> os.environ["MODELSOUP_HASH_CACHE"] = saved or "off"
    """
    setting = os.environ.get("MODELSOUP_HASH_CACHE")
    if setting is not None:
        return None if setting.strip().lower() in ("", "0", "off", "no", "false") else Path(setting)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home directory to be found: no cache
            return None
    return Path(base) / "modelsoup" / "sha256.jsonl"


def identity(paths: Sequence[Path], stats: Sequence[os.stat_result] | None = None) -> str | None:
    """A key naming these files' current state on disk (``None`` if one cannot be read),
    or the state given in ``stats`` (what ``os.fstat`` said when each file was read, so
    a hash is filed under the file it was computed from, not under a later one).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"1234")
        >>> key = identity([p])
        >>> _ = p.write_bytes(b"12345")
        >>> identity([p]) == key
        False
    """
    parts = []
    for i, path in enumerate(paths):
        try:
            st = stats[i] if stats is not None else os.stat(path)
        except OSError:
            return None
        parts.append(
            [str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
             st.st_ino, st.st_dev]
        )  # fmt: skip
    return json.dumps(parts, separators=(",", ":"))


def _entries(where: Path) -> dict[str, str]:
    cached = _loaded.get(str(where))
    if cached is not None:
        return cached[1]
    entries: dict[str, str] = {}
    try:
        with open(where, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    entries[row["files"]] = row["sha256"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn or foreign line: ignore it
    except OSError:
        pass
    _loaded[str(where)] = (where, entries)
    return entries


def recall(
    paths: Sequence[Path],
    cache: Path | None = None,
    stats: Sequence[os.stat_result] | None = None,
) -> str | None:
    """The remembered sha256 of these files as they are now (or as they were in
    ``stats``, see :func:`identity`), if any (``cache``: the cache file, default
    :func:`cache_file`).

    Example:
        >>> import tempfile
        >>> cache = Path(tempfile.mkdtemp()) / "sha256.jsonl"
        >>> p = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = p.write_bytes(b"weights")
        >>> recall([p], cache) is None
        True
        >>> remember([p], "ab" * 32, cache)
        >>> recall([p], cache) == "ab" * 32
        True
        >>> _ = p.write_bytes(b"other weights")
        >>> recall([p], cache) is None
        True
    """
    where = cache or cache_file()
    key = identity(paths, stats) if where is not None and paths else None
    if key is None:
        return None
    return _entries(where).get(key)


def remember(
    paths: Sequence[Path],
    digest: str,
    cache: Path | None = None,
    stats: Sequence[os.stat_result] | None = None,
) -> None:
    """Record the sha256 of these files, as they are now or as they were in ``stats``
    (silently does nothing if the cache is off or cannot be written).

    Example:
        >>> remember([], "ab" * 32)  # nothing to remember for in-memory sources
    """
    where = cache or cache_file()
    key = identity(paths, stats) if where is not None and paths else None
    if key is None:
        return
    # hash threads remember what they finish (formats/base.py): one writer at a time
    with _writing:
        _remember(where, key, digest)


def _remember(where: Path, key: str, digest: str) -> None:
    entries = _entries(where)
    if entries.get(key) == digest:
        return
    entries[key] = digest
    line = json.dumps({"files": key, "sha256": digest}) + "\n"
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        if len(entries) > _COMPACT_AT:
            _compact(where, entries)
            return
        # One short write in append mode: concurrent writers do not interleave lines.
        with open(where, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError:
        return


def _compact(where: Path, entries: dict[str, str]) -> None:
    # Keep the newest half, dropping entries whose files are gone or changed.
    alive = {}
    for key, digest in list(entries.items())[-_COMPACT_AT // 2 :]:
        files = [Path(row[0]) for row in json.loads(key)]
        if identity(files) == key:
            alive[key] = digest
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"files": k, "sha256": d}) + "\n" for k, d in alive.items()))
    os.replace(tmp, where)
    entries.clear()
    entries.update(alive)
