"""Write a soup to disk, streaming tensor by tensor, with its soup card beside it.

The output format follows the path:

- ``*.safetensors``: one safetensors file (streamed: memory holds one tensor);
- ``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``: a torch pickle (needs the whole soup in memory);
- anything else: a Hugging Face style folder, ``model.safetensors`` or shards of at most
  ``max_shard_size`` bytes with ``model.safetensors.index.json``; the first ingredient's
  ``config.json``, tokenizer and other non-weight files are copied in.

Every file appears only when complete, and no output may overwrite an input.
The soup card is ``<out>.json``: recipe, ingredients (path, sha256, coefficient),
dtype policy, scores, trace, and library versions.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modelsoup.errors import ConfigError, WriteError
from modelsoup.formats.hf_folder import write_folder
from modelsoup.formats.safetensors_io import atomic_file, write_safetensors
from modelsoup.formats.torch_pickle import write_torch
from modelsoup.ingredients import is_pickle_name, warn_if_duplicated
from modelsoup.soup import Soup, parse_dtype

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1000000``.

    Example:
        >>> parse_size("2GB"), parse_size("1KiB"), parse_size(10)
        (2000000000, 1024, 10)
    """
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"size '{size}' is not understood; write e.g. 5GB or 500MB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"size {size} must be positive")
    return value


def card_path(out: Path) -> Path:
    """Where the soup card of ``out`` goes: ``<out>.json``.

    Example:
        >>> card_path(Path("soups/greedy.safetensors"))
        PosixPath('soups/greedy.safetensors.json')
    """
    return out.with_name(out.name + ".json")


def protected_paths(soup: Soup) -> set[Path]:
    """Input files (and their hyperparameter sidecars) that no output may replace."""
    paths: set[Path] = set()
    for ing in soup.ingredients:
        for f in ing.files:
            paths.add(f.resolve())
            paths.add(f.with_suffix(".json").resolve())
        if ing.path is not None:
            paths.add(ing.path.resolve())
    return paths


def check_not_input(soup: Soup, out: Path) -> None:
    """Refuse an output path that would overwrite or replace any ingredient.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> check_not_input(Soup(open_ingredients([{"w": torch.ones(1)}]), [1]), Path("x.pt"))
    """
    protected = protected_paths(soup)
    targets = [out.resolve(), card_path(out).resolve()]
    for target in targets:
        for p in protected:
            if target == p or target in p.parents:
                raise WriteError(
                    f"{out}: writing there would overwrite the input {p}; choose another output"
                )


def soup_card(soup: Soup, out_dtype: torch.dtype | None = None) -> dict:
    """The soup card: everything needed to know, and redo, how the soup was made.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> card = soup_card(Soup(open_ingredients([{"w": torch.ones(1)}]), [1]))
        >>> card["recipe"], card["ingredients"][0]["coefficient"]
        ('weighted', 1.0)
    """
    from modelsoup import __version__

    card = {
        "format": "modelsoup.card/1",
        "recipe": soup.recipe,
        "options": soup.options,
        "ingredients": soup.describe_coefficients(),
        "chosen": [soup.ingredients[i].label for i in soup.chosen],
        "dtype_policy": {
            "accumulate": str(soup.accum_dtype).replace("torch.", ""),
            "output": str(out_dtype).replace("torch.", "") if out_dtype else "as ingredient",
            "integers": f"copied from the first ingredient ({soup.int_policy})",
        },
        "scores": soup.scores,
        "trace": soup.trace,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"modelsoup": __version__, "torch": torch.__version__},
    }
    if soup.tensor_coefficients:
        card["tensor_coefficients"] = soup.tensor_coefficients
    return card


def save_soup(
    soup: Soup,
    out: str | Path,
    *,
    out_dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Stream ``soup`` to ``out`` (format from the suffix) and write ``<out>.json``.

    Example:
        >>> import tempfile, torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> soup = Soup(open_ingredients([{"w": torch.zeros(1)}, {"w": torch.ones(1)}]), [1, 1])
        >>> out = save_soup(soup, Path(tempfile.mkdtemp()) / "s.safetensors", progress=False)
        >>> card_path(out).exists()
        True
    """
    out = Path(out)
    dtype = parse_dtype(out_dtype)
    check_not_input(soup, out)
    shard = parse_size(max_shard_size)
    layout = soup.layout(dtype)
    bar = tqdm(total=len(layout), desc=f"writing {out.name}", unit="tensor", disable=not progress)
    try:
        if out.suffix == ".safetensors":
            write_safetensors(
                out,
                layout,
                lambda n: soup.pieces(n, dtype),
                {"format": "pt", "modelsoup.recipe": soup.recipe},
                on_tensor=lambda n: bar.update(),
            )
        elif is_pickle_name(out):
            state = {}
            for name in layout:
                state[name] = soup.tensor(name, dtype)
                bar.update()
            write_torch(out, state)
        else:
            first = soup.ingredients[soup.chosen[0]]
            copy_from = first.path if first.path is not None and first.path.is_dir() else None
            write_folder(
                out,
                layout,
                lambda n: soup.pieces(n, dtype),
                max_shard_size=shard,
                copy_from=copy_from,
                metadata={"format": "pt"},
                on_tensor=lambda n: bar.update(),
                torch_dtype=dtype,
            )
    finally:
        bar.close()
    # Hashes are free now: streaming the soup read every chosen file front to back.
    warn_if_duplicated([soup.ingredients[i] for i in soup.chosen], by_content=True)
    with atomic_file(card_path(out)) as tmp:
        tmp.write_text(json.dumps(soup_card(soup, dtype), indent=2, default=str))
    return out
