"""Small helpers with one home each: atomic files, byte sizes, dtype names, slugs, progress.

Every layer may import from here; this module imports nothing of modelsoup but
:mod:`modelsoup.errors`.
"""

from __future__ import annotations

import contextlib
import decimal
import difflib
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from modelsoup.errors import ConfigError, SoupError, WriteError

_logger = logging.getLogger(__name__)

#: the marker in every temporary name we write: ``.<name>.tmp-<pid>``
TMP_MARK = ".tmp-"
#: the marker of an output moved aside while its replacement is renamed in
OLD_MARK = ".old-"


def temp_sibling(path: Path) -> Path:
    """The hidden temporary sibling of ``path`` that this process writes before renaming.

    The process id is in the name, so a later run can tell a dead writer's leftovers
    (:func:`clean_stale_temps`).

    Example:
        >>> temp_sibling(Path("out/soup.safetensors")).name.startswith(".soup.safetensors.tmp-")
        True
    """
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def old_sibling(path: Path) -> Path:
    """Where an existing output is moved aside, for a moment, while its replacement
    is renamed in (``.<name>.old-<pid>``).

    Example:
        >>> old_sibling(Path("soup")).name.startswith(".soup.old-")
        True
    """
    return path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")


def check_replaceable(path: Path, marker: str | None, what: str = "a soup folder") -> None:
    """Refuse to replace the folder ``path`` unless it is absent, empty, or one of our
    outputs: a folder holding ``marker`` (a soup folder's ``soup_card.json``).

    A folder output replaces what stands at its path, so anything else there (a user's
    results, notes, another model) would be lost: it is refused with a
    :class:`WriteError`, never deleted. With ``marker=None`` only an empty folder is
    replaced.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_replaceable(d / "new", "soup_card.json")  # absent: fine
        >>> _ = (d / "notes.txt").write_text("mine")
        >>> try:
        ...     check_replaceable(d, "soup_card.json")
        ... except WriteError as err:
        ...     print(str(err).split(": ", 1)[1].split(";")[0])
        exists and is not a soup folder (it holds 1 file: notes.txt)
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise WriteError(f"{path}: exists and is not a folder; choose another output")
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as err:
        raise write_error(path, err, "cannot read the existing folder") from err
    if not names or (marker is not None and marker in names):
        return
    n = len(names)
    shown = ", ".join(names[:3]) + (", ..." if n > 3 else "")
    raise WriteError(
        f"{path}: exists and is not {what} (it holds {n} file{'s' if n > 1 else ''}: "
        f"{shown}); choose another output or remove it"
    )


def replace_folder(new: Path, target: Path, marker: str | None) -> None:
    """Rename the complete folder ``new`` to ``target``, replacing what stands there
    only if :func:`check_replaceable` allows it (absent, empty, or holding ``marker``).

    The old folder is moved aside first and removed only once the new one is in place,
    so a failure leaves the old one standing.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / "new").mkdir(); _ = (d / "new" / "soup_card.json").write_text("{}")
        >>> replace_folder(d / "new", d / "soup", "soup_card.json")
        >>> sorted(p.name for p in d.iterdir())
        ['soup']
    """
    check_replaceable(target, marker)  # again at the last moment: a folder appeared since
    old = None
    try:
        if target.exists() or target.is_symlink():
            old = old_sibling(target)
            os.replace(target, old)
        os.replace(new, target)
    except OSError as err:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise write_error(target, err) from err
    if old is not None:
        remove_path(old)


def refuse_overwrite(target: Path, inputs: Iterable[Path], shown: Path | None = None) -> None:
    """Refuse writing ``target`` when it is, contains or sits inside one of ``inputs``
    (``shown`` is the path the error names, ``target`` by default).

    Example:
        >>> try:
        ...     refuse_overwrite(Path("/data/run1/config.json"), [Path("/data/run1")])
        ... except WriteError as err:
        ...     print(str(err)[:57])
        /data/run1/config.json: writing there would overwrite the
    """
    resolved = Path(target).resolve()
    hit = [
        p
        for p in sorted({Path(p).resolve() for p in inputs})
        if resolved == p or resolved in p.parents or p in resolved.parents
    ]
    if hit:
        # name an input that is there (a sidecar that could be written is only guarded)
        named = next((p for p in hit if p.exists()), hit[0])
        raise WriteError(
            f"{shown or target}: writing there would overwrite the input {named}; "
            "choose another output"
        )


def write_error(path: Path, err: OSError, what: str = "cannot write") -> WriteError:
    """A :class:`WriteError` for an ``OSError``, saying what to do about a full disk.

    Example:
        >>> import errno
        >>> str(write_error(Path("x"), OSError(errno.ENOSPC, "No space left on device")))
        'x: cannot write (No space left on device); free some space, or write elsewhere'
    """
    reason = err.strerror or str(err)
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space, or write elsewhere"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a folder you can write to"
    return WriteError(f"{path}: {what} ({reason}){hint}")


class atomic_file:  # noqa: N801 - used as a context manager, reads like a function
    """Write to a temporary sibling and rename it over ``path`` only on success.

    The temporary is a file, or a folder if the block makes one. On any error it is
    removed, and an ``OSError`` (a full disk, say) becomes a :class:`WriteError`.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_file(p) as tmp:
        ...     _ = tmp.write_text("done")
        >>> p.read_text()
        'done'
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = temp_sibling(self.path)

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path.parent, err, "cannot create the folder") from err
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if self.tmp.is_file():
                    with open(self.tmp, "rb+") as fh:
                        os.fsync(fh.fileno())
                os.replace(self.tmp, self.path)
            except OSError as err:
                remove_path(self.tmp)
                raise write_error(self.path, err) from err
            return
        remove_path(self.tmp)
        if isinstance(exc, OSError):
            raise write_error(self.path, exc) from exc


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parents that exists but is not a folder, if any: what
    stops ``path`` being written.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = f.write_text("mine")
        >>> file_in_the_way(f / "out" / "diagnosis.json") == f, file_in_the_way(f)
        (True, None)
    """
    for parent in reversed(Path(os.path.abspath(path)).parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_path(out: str | Path) -> Path:
    """Check a soup's output path at the edge; return it as a :class:`~pathlib.Path`.

    A soup replaces what stands at its path, so the path must name something of its
    own: not empty, not the current folder or one that holds it (``-o .``, ``-o ..``),
    and not inside a file.

    Example:
        >>> check_output_path("soups/greedy.safetensors")
        PosixPath('soups/greedy.safetensors')
        >>> try:
        ...     check_output_path(".")
        ... except WriteError as err:
        ...     print(str(err).split(",")[0])
        .: is the current folder (or holds it)
    """
    if not str(out).strip():
        raise ConfigError("the output path is empty; give a file such as soup.safetensors")
    path = Path(out)
    full, here = path.resolve(), Path.cwd().resolve()
    if full == here or full in here.parents:
        raise WriteError(
            f"{out}: is the current folder (or holds it), which a soup output would replace; "
            "give a new name such as soup.safetensors or soup/"
        )
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise WriteError(f"{out}: {blocker} is a file, not a folder; choose another output")
    return path


#: locks this process holds, by lock file, with how many times each was taken
_HELD: dict[str, int] = {}


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on an output while it is written.

    A second process that asks for the same output fails at once with a clear
    :class:`WriteError` instead of racing the first: run one at a time, or choose another
    output. The lock is the hidden file ``.<name>.lock`` beside the output. Within one
    process the lock may be taken again (a cook holds its output folder and then saves
    into it).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "soup.safetensors"
        >>> with output_lock(out), output_lock(out):
        ...     pass
    """
    given = Path(path)
    # "." and "x/.." have a name to put the lock beside; a symlink to the folder is the
    # folder (two names for one output must not give two locks)
    path = Path(os.path.realpath(given))
    if not path.name:
        raise WriteError(f"{given}: is the root folder, not an output; choose a folder in it")
    lock = path.with_name(f".{path.name}.lock")
    held = str(lock.absolute())
    if held in _HELD:
        _HELD[held] += 1
        try:
            yield
        finally:
            _HELD[held] -= 1
        return
    fh = _acquire(lock, given)
    _HELD[held] = 1
    try:
        yield
    finally:
        del _HELD[held]
        with contextlib.suppress(OSError):
            lock.unlink()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def _acquire(lock: Path, path: Path):
    """Open and lock ``lock``; the open file holds the lock until closed."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock, "a+")
        except OSError as err:
            blocker = file_in_the_way(lock)
            if blocker is not None:
                raise WriteError(
                    f"{path}: {blocker} is a file, not a folder; choose another output"
                ) from err
            raise write_error(lock, err, "cannot create the lock") from err
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise WriteError(
                f"{path}: another modelsoup run (process {holder}) is writing this output; "
                "wait for it to finish, or choose another output"
            ) from None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino
        except OSError:
            same = False
        if not same:  # the holder removed the file as we opened it: lock the new one
            fh.close()
            continue
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        except OSError as err:
            fh.close()
            with contextlib.suppress(OSError):
                lock.unlink()
            raise write_error(lock, err, "cannot write the lock") from err
        return fh


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists; never raises for a missing one.

    Example:
        >>> remove_path(Path("/nonexistent/x"))
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


#: the largest process id Linux hands out (``pid_max`` cannot be set above it)
_PID_MAX = 1 << 22


def clean_stale_temps(folder: Path, only: str | None = None) -> list[Path]:
    """Tidy what a writer killed mid-write left in ``folder``, when that process is dead.

    A ``kill -9`` cannot clean up after itself; the next run does, and says so in one
    log line each. ``.<name>.tmp-<pid>`` (a half-written output) is removed;
    ``.<name>.old-<pid>`` (an output moved aside for its replacement) is put back when
    nothing took its place, else removed. Leftovers of live processes are left alone.
    ``only`` limits it to the leftovers of one output (and of its sidecars, named
    ``<only>.<suffix>``): in a folder that is not
    modelsoup's own (the folder a soup is written into), other files that happen to
    look alike (``.env.old-20240101``) are the user's and are never touched.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / ".soup.safetensors.tmp-4194301").write_text("half")
        >>> [p.name for p in clean_stale_temps(d)]
        ['.soup.safetensors.tmp-4194301']
    """
    removed: list[Path] = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        mark = TMP_MARK if TMP_MARK in name else OLD_MARK if OLD_MARK in name else None
        if not name.startswith(".") or mark is None:
            continue
        stem, pid_text = name[1:].rsplit(mark, 1)
        own = stem.lstrip(".")  # a temporary of a temporary: ..soup.tmp-1.tmp-1
        if only is not None and own != only and not own.startswith(f"{only}."):
            continue  # not this output's, nor its sidecar's (soup.safetensors.json)
        if not pid_text.isdigit() or int(pid_text) > _PID_MAX or _pid_alive(int(pid_text)):
            continue
        target = entry.with_name(stem)
        if mark == OLD_MARK and not target.exists():
            try:
                os.replace(entry, target)
            except OSError:
                continue
            _logger.warning("restored %s, moved aside by an interrupted run", target)
            continue
        size = _size_of(entry)
        remove_path(entry)
        removed.append(entry)
        _logger.warning(
            "removed %s (%s) left by an interrupted run (process %s)",
            entry,
            format_bytes(size),
            pid_text,
        )
    return removed


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    try:
        return path.stat().st_size
    except OSError:
        return 0


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


_SIZE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | float | str) -> int:
    """Parse a byte size such as ``5GB``, ``1.5GiB``, ``500MiB``, ``1e9`` or ``1000000``:
    a whole number of bytes (``1.5``, one and a half bytes, is refused, not cut to 1).

    Example:
        >>> parse_size("2GB"), parse_size("1KiB"), parse_size(10), parse_size("1.5e3MB")
        (2000000000, 1024, 10, 1500000000)
    """
    if isinstance(size, bool):
        raise ConfigError(f"size {size} is not a number of bytes; write e.g. 5GB or 500MB")
    if isinstance(size, int):
        value = decimal.Decimal(size)
    elif isinstance(size, float):
        if not math.isfinite(size):
            raise ConfigError(f"size {size} is not a number of bytes; write e.g. 5GB or 500MB")
        value = decimal.Decimal(size)
    else:
        m = _SIZE.fullmatch(str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"size '{size}' is not understood; write e.g. 5GB or 500MB")
        value = decimal.Decimal(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"size {size} must be positive")
    if value > 10**30:
        raise ConfigError(f"size {size} is more bytes than any machine has; write e.g. 5GB")
    if value != value.to_integral_value():
        raise ConfigError(f"size {size} is not a whole number of bytes; write e.g. 5GB or 500MB")
    return int(value)


def format_bytes(n: float) -> str:
    """A byte count for people, in decimal units.

    Example:
        >>> format_bytes(512), format_bytes(1_500_000)
        ('512 B', '1.5 MB')
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"bf16"``-style names into a torch dtype (``None`` stays ``None``).

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        # a dtype object too: torch.int8 would round a soup to integers
        if name in DTYPE_NAMES.values():
            return name
        name = str(name).removeprefix("torch.")
        raise ConfigError(
            f"dtype '{name}' is not a float dtype a soup is written in; "
            "use one of fp32, fp16, bf16, fp64"
        )
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"dtype '{name}' is unknown; use one of fp32, fp16, bf16, fp64") from None


def shares(values: Iterable[float]) -> list[float]:
    """Each value divided by their sum, without overflow: values far from 1 are first
    scaled by a power of two (exact, so the shares of ordinary weights are bit for bit
    ``v / sum``). All zero stays all zero.

    Example:
        >>> shares([1, 3])
        [0.25, 0.75]
        >>> shares([1e308, 1e308])  # the plain sum is inf
        [0.5, 0.5]
    """
    values = [float(v) for v in values]
    top = max((abs(v) for v in values), default=0.0)
    if top == 0.0 or not math.isfinite(top):
        return values
    exponent = math.frexp(top)[1]
    scaled = [math.ldexp(v, -exponent) for v in values]
    total = sum(scaled)
    return [v / total for v in scaled] if total else scaled


def slug(label: str) -> str:
    """A file-name-safe form of a label.

    Example:
        >>> slug("greedy (sorted)")
        'greedy-sorted'
    """
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def spelling_hint(key: object, known: Iterable[str]) -> str:
    """What an error about an unknown key adds: the closest known key, if one is close.

    Example:
        >>> spelling_hint("pases", ["passes", "order"]), spelling_hint("zzz", ["order"])
        ("; did you mean 'passes'?", '; check its spelling')
    """
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else "; check its spelling"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, row-major, on the CPU (``b""`` when empty):
    what content hashes read.

    Example:
        >>> tensor_bytes(torch.tensor([1, 2], dtype=torch.uint8)), tensor_bytes(torch.ones(0))
        (b'\\x01\\x02', b'')
    """
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def call_factory(factory: Callable[[], Any], what: str, hint: str) -> Any:
    """What a user's function of no arguments returns; an exception it raises is one
    :class:`ConfigError` line, ``what`` failed (its type and first line), then ``hint``,
    with the exception chained as its cause.

    Example:
        >>> call_factory(lambda: 1 / 0, "data()", "check it")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: data() failed (ZeroDivisionError: division by zero); check it
    """
    try:
        return factory()
    except (SoupError, KeyboardInterrupt):  # ours already says what to do
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: one line, cause chained
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what} failed ({type(err).__name__}: {first}); {hint}") from err


def build_model(model: Any, what: str = "the model factory") -> torch.nn.Module:
    """``model`` when it is a module, else what its factory (no arguments) returns; a
    factory that fails or returns something else is one :class:`ConfigError` line (the
    factory's own exception is chained as its cause).

    Example:
        >>> build_model(torch.nn.Linear(1, 1)).in_features
        1
        >>> build_model(lambda: 42)
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: the model factory returned int, not an nn.Module
    """
    if isinstance(model, torch.nn.Module):
        return model
    module = call_factory(model, what, "check the model: function (it must build the model "
                          "with no arguments)")  # fmt: skip
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{what} returned {type(module).__name__}, not an nn.Module")
    return module


def check_device(name: str | torch.device) -> str:
    """Check a device name at the edge: known to torch, and present on this machine.

    Example:
        >>> check_device("cpu")
        'cpu'
        >>> check_device("gpu")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: device 'gpu' is unknown; use cpu, cuda, cuda:N or mps
    """
    text = str(name)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device '{text}' is unknown; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{text}': CUDA is not available on this machine; use device: cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(
                f"device '{text}': this machine has {count} CUDA device(s); "
                f"use cuda:0 to cuda:{count - 1}, or cpu"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device '{text}': MPS is not available here; use device: cpu")
    elif device.type != "cpu":
        raise ConfigError(f"device '{text}' is not supported; use cpu, cuda, cuda:N or mps")
    return text


class StageLog:
    """What :func:`progress` gives when stderr is not a terminal: no bar, one log line
    when the stage finishes (how many items, how long); a stage that did nothing (every
    score came from the journal, say) says nothing.

    It answers the calls a tqdm bar is given (iteration, ``update``, ``set_postfix``,
    ``close``), so code that shows progress needs no second path.

    Example:
        >>> stage = StageLog(range(3), desc="tasting", unit="soup")
        >>> [i for i in stage], stage.n
        ([0, 1, 2], 3)
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        log: bool = True,
    ):
        self.iterable = iterable
        self.log = log
        self.desc = desc
        self.unit = unit
        self.n = 0
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> StageLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass  # a bar's live detail: nothing to print between stage lines

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """A bar's live status (the current score): not worth a line of its own."""

    def close(self) -> None:
        """Log the stage's one line (once)."""
        if self._closed:
            return
        self._closed = True
        if not self.log or not self.n:
            return
        unit = self.unit if self.n == 1 else f"{self.unit}s"
        _logger.info(
            "%s: %d %s in %.1f s", self.desc, self.n, unit, time.perf_counter() - self._start
        )


def _interactive() -> bool:
    """Can progress be drawn in place: a terminal on stderr, or a notebook's widgets?"""
    import tqdm.auto  # first: it imports autonotebook without its notebook-mode warning
    import tqdm.autonotebook
    import tqdm.std

    if tqdm.autonotebook.tqdm is not tqdm.std.tqdm:  # a Jupyter notebook
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    enabled: bool = True,
    leave: bool = True,
) -> Any:
    """A progress display for one stage: a tqdm bar on a terminal, one log line otherwise.

    Bars redraw themselves with ``\\r`` and cursor moves, which flood a log file or a
    CI log; when stderr is not a terminal the stage is logged once, as it finishes
    (:class:`StageLog`). With ``enabled=False`` nothing is shown at all. ``total`` and
    ``leave`` are the bar's (a count it can show before the end; keep it when done).

    Example:
        >>> bar = progress(range(2), desc="writing", unit="tensor")  # no terminal here
        >>> type(bar).__name__, sum(bar)
        ('StageLog', 1)
    """
    if enabled and _interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
    return StageLog(iterable, desc=desc, unit=unit, log=enabled)
