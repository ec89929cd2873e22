"""What-ifs for the benchmarks: modelsoup without the sha256 of every ingredient byte,
which bench/README.md proposes to make optional. Not library code: it reaches into
private attributes and skips checks.

- :func:`stream_average` (bench/average_bench.py) streams the uniform soup the way
  ``modelsoup.average(paths).save(out)`` does at commit 3210357 (``Soup.tensor`` with
  ``streaming=True``: reused read and sum buffers, one float32 NaN/Inf reduction per
  tensor, then ``write_safetensors``), but does not hash the inputs (modelsoup hashes
  every byte it reads, for the soup card: about 0.5 s per GB of CPU on one core here),
  and writes no card.
- :func:`keyed_by_identity` (bench/recipes_bench.py) identifies each ingredient by
  path, size and mtime instead of the sha256 of its bytes, which the Taster computes
  for every ingredient (duplicate check and journal keys), even with an in-memory
  journal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelsoup.accumulator import checked_float
from modelsoup.formats.safetensors_io import SafetensorsSource, write_safetensors
from modelsoup.ingredients import Ingredient


def read_into(source: SafetensorsSource, name: str, scratch: torch.Tensor) -> torch.Tensor:
    """Read tensor ``name`` into the front of a uint8 ``scratch`` buffer and view it."""
    index, entry = source._where[name]
    out = scratch[: entry.end - entry.start]
    fh = source._handles.get(index)
    if fh is None:
        fh = source._handles[index] = open(source.files[index], "rb")  # noqa: SIM115
    fh.seek(source._starts[index] + entry.start)
    if out.numel() and fh.readinto(memoryview(out.numpy())) != out.numel():
        raise OSError(f"{source.files[index]}: short read of '{name}'")
    return out.view(entry.meta.dtype).reshape(entry.meta.shape)


def stream_average(paths, out) -> None:
    """Uniform soup of fp32 safetensors files, streamed tensor by tensor to ``out``."""
    sources = [SafetensorsSource([p]) for p in paths]
    layout = {n: sources[0].meta(n) for n in sources[0].names()}
    scratch = torch.empty(max(m.nbytes for m in layout.values()), dtype=torch.uint8)
    total = torch.empty(max(m.numel for m in layout.values()), dtype=torch.float32)

    def mean(name: str) -> torch.Tensor:
        acc = total[: layout[name].numel].view(layout[name].shape)
        acc.copy_(read_into(sources[0], name, scratch))
        for source in sources[1:]:
            acc.add_(read_into(source, name, scratch))
        if not bool(torch.isfinite(acc.sum())):  # rare: find the ingredient to blame
            for source in sources:
                checked_float(read_into(source, name, scratch), name, source.label)
        return acc.div_(len(sources))

    write_safetensors(out, layout, mean)


def keyed_by_identity(ingredients: Sequence[Ingredient]) -> None:
    """Give each ingredient a cheap identity in place of its content sha256."""
    for ing in ingredients:
        st = ing.path.stat()
        ing.__dict__["sha256"] = f"{ing.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
