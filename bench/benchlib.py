"""Small helpers shared by the benchmarks: memory readings, page cache, machine, tables.

Benchmarks are run by hand (``python bench/<name>.py``), never by the test suite.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"  # git-ignored


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` off Linux)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def warm_page_cache(paths: Iterable[Path], chunk: int = 1 << 23) -> int:
    """Read every file once so later reads come from the page cache; returns bytes read."""
    buf = bytearray(chunk)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def drop_page_cache() -> None:
    """Write dirty pages and drop the page cache (Linux, needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def machine() -> str:
    """One line: date, CPU model, cores, RAM, Python and torch versions."""
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{now}; {model}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); modelsoup {revision()}"
    )


def revision() -> str:
    """The git commit measured, and whether src/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {head}" + (" + uncommitted changes in src/" if dirty else "")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def parse_count(text: str) -> int:
    """``50M``, ``2.5M``, ``800k`` or ``1000`` as an integer.

    Example:
        >>> parse_count("2.5M"), parse_count("800k")
        (2500000, 800000)
    """
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def gpt2_shapes(d: int, vocab: int, positions: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``GPT2LMHeadModel.state_dict()`` (untied head) at a given size."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, d),
        "transformer.wpe.weight": (positions, d),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d),
            p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d),
            p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d),
            p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d),
            p + "mlp.c_proj.bias": (d,),
        }
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def run_with_hash_cache(cmd: list[str], folder: Path, *, first_contact: bool) -> str:
    """Run a benchmark child with modelsoup's sha256 cache in ``folder``: the kept one
    (``sha256-cache.jsonl``, so inputs seen before are not hashed again), or, for
    ``first_contact``, a new empty one deleted afterwards. Returns the child's stdout."""
    cache = folder / "sha256-cache.jsonl"
    if first_contact:
        cache = folder / f"sha256-empty-{time.time_ns()}.jsonl"
    env = {**os.environ, "MODELSOUP_HASH_CACHE": str(cache)}
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    finally:
        if first_contact:
            cache.unlink(missing_ok=True)
