"""Find, open and check ingredients: the fine-tuned checkpoints a soup is made of.

An :class:`Ingredient` is lazy: opening one reads only its header (or memory-maps a
pickle); tensors are read one at a time when a recipe needs them.

Example:
    >>> import torch
    >>> a = open_ingredient({"w": torch.ones(2)}, label="a")
    >>> b = open_ingredient({"w": torch.zeros(2)}, label="b")
    >>> check_compatible([a, b])
    >>> a.meta("w").shape
    (2,)
"""

from __future__ import annotations

import glob
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch

from modelsoup.errors import IncompatibleIngredientsError, IngredientError, SoupWarning
from modelsoup.formats.base import DictSource, TensorMeta, TensorSource
from modelsoup.formats.dispatch import (
    CHECKPOINT_SUFFIXES,
    checkpoint_stem,
    is_model_folder,
    open_source,
)


class Ingredient:
    """One checkpoint, opened lazily.

    Attributes:
        label: a short name for tables and messages (the file stem by default).
        source: the reader behind it.
        path: where it lives on disk, or ``None`` for an in-memory model.
        hyperparameters: read from a ``<stem>.json`` sidecar when one exists
            (as written by :func:`modelsoup.demo.training.train_grid`).

    Example:
        >>> import torch
        >>> ing = Ingredient(DictSource({"w": torch.ones(1)}), label="x")
        >>> ing.tensor("w")
        tensor([1.])
    """

    def __init__(
        self,
        source: TensorSource,
        label: str,
        path: Path | None = None,
        hyperparameters: Mapping | None = None,
    ):
        self.source = source
        self.label = label
        self.path = path
        self.hyperparameters = dict(hyperparameters or {})

    def __repr__(self) -> str:
        return f"Ingredient({self.label!r})"

    def names(self) -> list[str]:
        """Tensor names in stored order."""
        return self.source.names()

    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of one tensor, without reading it."""
        return self.source.meta(name)

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (on CPU, in its stored dtype).

        With a uint8 ``scratch`` buffer, file readers read into it instead of allocating:
        the result is then valid only until the buffer is used again.
        """
        return self.source.tensor(name, scratch)

    def tensor_range(
        self, name: str, start: int, count: int, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``start`` to ``start + count`` of one tensor, flattened; file readers
        read only those bytes (into a uint8 ``scratch`` when given, valid until reused)."""
        return self.source.tensor_range(name, start, count, scratch)

    def scratch(self) -> torch.Tensor:
        """A uint8 buffer big enough for any one of this ingredient's tensors."""
        return torch.empty(
            max((m.nbytes for m in self.layout().values()), default=0), dtype=torch.uint8
        )

    def layout(self) -> dict[str, TensorMeta]:
        """Every tensor's name, shape and dtype."""
        return {n: self.source.meta(n) for n in self.source.names()}

    @cached_property
    def sha256(self) -> str:
        """Content hash of the checkpoint files (or tensors); computed once."""
        return self.source.fingerprint()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.source.files

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.layout().values())


def _sidecar(path: Path) -> dict:
    side = path.with_suffix(".json") if path.is_file() else path / "hyperparameters.json"
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    hp = data.get("hyperparameters", data)
    return hp if isinstance(hp, dict) else {}


def open_ingredient(
    obj: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module | Ingredient,
    *,
    label: str | None = None,
    key: str | None = None,
) -> Ingredient:
    """Open one ingredient from a path, an HF folder, a state dict or a module.

    ``key`` picks a wrapper key in a pickled checkpoint (e.g. ``"state_dict_ema"``);
    by default the rules in :mod:`modelsoup.formats.torch_pickle` apply.

    Example:
        >>> import torch
        >>> open_ingredient(torch.nn.Linear(1, 1), label="lin").names()
        ['weight', 'bias']
    """
    if isinstance(obj, Ingredient):
        return obj
    if isinstance(obj, torch.nn.Module | Mapping):
        return Ingredient(DictSource(obj, label=label or "<memory>"), label or "<memory>")
    path = Path(obj)
    if not path.exists():
        raise IngredientError(f"{path}: file not found; check the path")
    source = open_source(path, key=key)
    if not source.names():
        raise IngredientError(f"{path}: the checkpoint holds no tensors")
    stem = path.name if path.is_dir() else checkpoint_stem(path)
    return Ingredient(source, label or stem, path=path, hyperparameters=_sidecar(path))


def natural_order(path: Path) -> tuple:
    """Sort key that reads runs of digits as numbers, so step 500 comes before step 1000.

    Example:
        >>> names = ["checkpoint-1000", "checkpoint-500", "checkpoint-50"]
        >>> sorted(names, key=lambda n: natural_order(Path(n)))
        ['checkpoint-50', 'checkpoint-500', 'checkpoint-1000']
    """
    parts = re.split(r"(\d+)", str(path))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def find_checkpoints(patterns: Iterable[str | Path]) -> list[Path]:
    """Expand paths, globs and folders of checkpoints into a list, in the order given.

    A folder that is itself an HF model counts as one ingredient; any other folder
    contributes its checkpoint files, and each glob its matches, in natural order
    (:func:`natural_order`: checkpoint-500 before checkpoint-1000).
    The same path given twice stays twice: ingredients are kept by position.

    Example:
        >>> find_checkpoints([])
        []
    """
    found: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted((Path(p) for p in glob.glob(text)), key=natural_order)
            if not matches:
                raise IngredientError(f"{text}: the pattern matches no file")
            found.extend(matches)
            continue
        path = Path(text)
        if path.is_dir() and not is_model_folder(path):
            inside = sorted(
                (
                    p
                    for p in path.iterdir()
                    if (p.name.endswith(CHECKPOINT_SUFFIXES) and p.is_file()) or is_model_folder(p)
                ),
                key=natural_order,
            )
            if not inside:
                raise IngredientError(
                    f"{path}: the folder holds no checkpoints (looked for "
                    f"{', '.join(CHECKPOINT_SUFFIXES)} files and Hugging Face model folders)"
                )
            found.extend(inside)
        else:
            found.append(path)
    return found


def open_ingredients(
    sources: Sequence[str | Path | Mapping | torch.nn.Module | Ingredient],
    *,
    key: str | None = None,
    check: bool = True,
) -> list[Ingredient]:
    """Open many ingredients (expanding globs and folders) and check they can be souped.

    Example:
        >>> import torch
        >>> ings = open_ingredients([{"w": torch.ones(1)}, {"w": torch.zeros(1)}])
        >>> len(ings)
        2
    """
    items: list = []
    for s in sources:
        if isinstance(s, str | Path):
            items.extend(find_checkpoints([s]))
        else:
            items.append(s)
    if not items:
        raise IngredientError("no ingredients given; pass checkpoint files, folders or globs")
    labels: list[str | None] = [None] * len(items)
    for i, item in enumerate(items):
        if not isinstance(item, str | Path | Ingredient):
            labels[i] = f"model{i}"
    ingredients = [open_ingredient(x, label=lab, key=key) for x, lab in zip(items, labels)]
    if check:
        check_compatible(ingredients)
    return ingredients


def check_compatible(ingredients: Sequence[Ingredient], *, warn_duplicates: bool = True) -> None:
    """Raise if ingredients differ in tensor names, shapes or kinds; warn on duplicates.

    Example:
        >>> import torch
        >>> a = open_ingredient({"w": torch.ones(2)}, label="a")
        >>> b = open_ingredient({"w": torch.ones(3)}, label="b")
        >>> check_compatible([a, b])
        Traceback (most recent call last):
        ...
        modelsoup.errors.IncompatibleIngredientsError: tensor 'w' is (2,) in a but (3,) in b
    """
    if not ingredients:
        raise IncompatibleIngredientsError("no ingredients to check")
    first = ingredients[0]
    ref = first.layout()
    for other in ingredients[1:]:
        lay = other.layout()
        for name in ref:
            if name not in lay:
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is in {first.label} but missing from {other.label}"
                )
        for name in lay:
            if name not in ref:
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is in {other.label} but missing from {first.label}"
                )
        for name, meta in ref.items():
            o = lay[name]
            if o.shape != meta.shape:
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is {meta.shape} in {first.label} "
                    f"but {o.shape} in {other.label}"
                )
            if o.is_floating != meta.is_floating:
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is {meta.dtype} in {first.label} but {o.dtype} in "
                    f"{other.label}; a float tensor cannot be averaged with an integer one"
                )
    if warn_duplicates:
        warn_if_duplicated(ingredients)


def warn_if_duplicated(ingredients: Sequence[Ingredient], *, by_content: bool = False) -> None:
    """Warn when the same checkpoint appears twice (legal: it then counts twice).

    By default only the same path (or in-memory object) is caught, which costs nothing;
    ``by_content=True`` also compares sha256 hashes (which reads every file unless it
    has already been read in full).

    Example:
        >>> import torch, warnings
        >>> a = open_ingredient({"w": torch.ones(1)}, label="a")
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_if_duplicated([a, a])
        >>> "twice" in str(seen[0].message)
        True
    """
    seen: dict[object, str] = {}
    hashes: dict[str, str] = {}
    for ing in ingredients:
        key = ing.path.resolve() if ing.path is not None else id(ing.source)
        if by_content:
            # Same path was already reported when the ingredients were opened.
            other = hashes.get(ing.sha256) if key not in seen else None
            hashes.setdefault(ing.sha256, ing.label)
        else:
            other = seen.get(key)
        if other is not None:
            warnings.warn(
                f"{ing.label} and {other} are the same checkpoint: it is used twice and "
                "counts twice in the average",
                SoupWarning,
                stacklevel=2,
            )
        seen.setdefault(key, ing.label)


def describe_ingredients(ingredients: Sequence[Ingredient]) -> dict:
    """Counts, dtypes and sizes of each ingredient, and whether they can be souped together.

    Example:
        >>> import torch
        >>> info = describe_ingredients([open_ingredient({"w": torch.ones(2, 3)}, label="a")])
        >>> info["ingredients"][0]["parameters"], info["compatible"]
        (6, True)
    """
    rows = []
    for ing in ingredients:
        lay = ing.layout()
        dtypes: dict[str, int] = {}
        for m in lay.values():
            key = str(m.dtype).replace("torch.", "")
            dtypes[key] = dtypes.get(key, 0) + 1
        rows.append(
            {
                "label": ing.label,
                "path": str(ing.path) if ing.path is not None else None,
                "tensors": len(lay),
                "parameters": sum(m.numel for m in lay.values() if m.is_floating),
                "bytes": sum(m.nbytes for m in lay.values()),
                "dtypes": dtypes,
                "note": ing.source.note,
            }
        )
    try:
        check_compatible(ingredients, warn_duplicates=False)
        problem = None
    except IncompatibleIngredientsError as err:
        problem = str(err)
    return {"ingredients": rows, "compatible": problem is None, "problem": problem}
