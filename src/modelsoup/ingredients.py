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
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch

from modelsoup.errors import (
    ConfigError,
    IncompatibleIngredientsError,
    IngredientError,
    SoupWarning,
)
from modelsoup.formats.base import (
    DictSource,
    TensorMeta,
    TensorSource,
    check_regular,
    hash_files,
    storage_of,
)
from modelsoup.formats.dispatch import (
    CHECKPOINT_SUFFIXES,
    checkpoint_stem,
    is_adapter_folder,
    is_checkpoint_name,
    is_model_folder,
    open_source,
)
from modelsoup.formats.hf_folder import (
    CARD_FORMAT,
    FOLDER_CARD,
    differing_copied_files,
    is_training_state,
    weight_files,
)
from modelsoup.formats.peft_adapter import AdapterSource, check_adapters, shared_base

_logger = logging.getLogger(__name__)


class Ingredient:
    """One checkpoint, opened lazily.

    Attributes:
        label: a short name for tables and messages (the file stem by default).
        source: the reader behind it.
        path: where it lives on disk, or ``None`` for an in-memory model.
        hyperparameters: read from a ``<stem>.json`` sidecar when one exists
            (as written by :func:`modelsoup.demo.training.train_grid`), else from the
            checkpoint itself (a Trainer's ``training_args.bin``, timm's ``args``,
            Lightning's ``hyper_parameters``).

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
    def identity(self) -> str:
        """How journal keys and alignment records name this ingredient: its sha256, and
        the pickle key it was read from when there is one (one timm file holds the
        weights and their EMA: two ingredients).

        Example:
            >>> import torch
            >>> open_ingredient({"w": torch.ones(1)}).identity == open_ingredient(
            ...     {"w": torch.ones(1)}).sha256
            True
        """
        key = self.source.read_key
        return self.sha256 if key is None else f"{self.sha256}:{key}"

    @property
    def files(self) -> tuple[Path, ...]:
        return self.source.files

    @property
    def architecture(self) -> Mapping[str, object]:
        """What the checkpoint says about its architecture (HF ``config.json``, timm's
        ``args.model``, Lightning's ``hyper_parameters``); empty when it says nothing."""
        return self.source.architecture

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.layout().values())


def _sidecar(path: Path) -> dict:
    # a sidecar written beside the checkpoint wins over what the checkpoint carries
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
    base: str | Path | None = None,
) -> Ingredient:
    """Open one ingredient from a path, an HF folder, a LoRA adapter folder, a state dict
    or a module.

    ``key`` picks a wrapper key in a pickled checkpoint (e.g. ``"state_dict_ema"``);
    by default the rules in :mod:`modelsoup.formats.torch_pickle` apply. ``base`` is the
    base model of a LoRA adapter (default: the local folder its config names); the
    adapter is read as the merged model (:mod:`modelsoup.formats.peft_adapter`).

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
    _refuse_shard(path)  # an ingredient, a base: one shard is never a model
    source = open_source(path, key=key, base=base)
    if not source.names():
        raise IngredientError(f"{path}: the checkpoint holds no tensors")
    stem = path.name if path.is_dir() else checkpoint_stem(path)
    hyper = _sidecar(path) or dict(source.hyperparameters)
    return Ingredient(source, label or stem, path=path, hyperparameters=hyper)


def natural_order(path: Path) -> tuple:
    """Sort key that reads runs of digits as numbers, so step 500 comes before step 1000.

    Example:
        >>> names = ["checkpoint-1000", "checkpoint-500", "checkpoint-50"]
        >>> sorted(names, key=lambda n: natural_order(Path(n)))
        ['checkpoint-50', 'checkpoint-500', 'checkpoint-1000']
    """
    parts = re.split(r"(\d+)", str(path))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _is_ingredient(path: Path) -> bool:
    """A checkpoint file, a model folder, or a LoRA adapter folder."""
    if path.is_dir():
        return is_model_folder(path) or is_adapter_folder(path)
    return is_checkpoint_name(path) and not is_training_state(path.name)


#: a shard of a model folder, as transformers names them (model-00001-of-00003.safetensors)
_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", re.IGNORECASE)


def _refuse_shard(path: Path) -> None:
    """A file named as one shard of a model folder is not a model: refused, naming the
    folder to give (or the missing index)."""
    if path.is_dir() or not _SHARD_NAME.fullmatch(path.name):
        return
    if is_model_folder(path.parent):
        raise IngredientError(
            f"{path}: is one shard of the model folder {path.parent}, not a model; give the "
            "folder itself"
        )
    raise IngredientError(
        f"{path}: is one shard of a model whose index (model.safetensors.index.json or "
        "pytorch_model.bin.index.json) is not beside it; restore the index and give the "
        "folder, or re-save the model folder"
    )


def _is_soup(path: Path) -> bool:
    """A soup modelsoup wrote: a folder holding its soup card, or a file with one beside it."""
    if path.is_dir():
        return (path / FOLDER_CARD).is_file()
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():  # nor a pipe, which would wait for a writer
        return False
    try:
        card = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("format") == CARD_FORMAT


def _without_soups(paths: list[Path], where: str) -> list[Path]:
    """Leave out the soups a folder or glob holds beside other checkpoints: a soup saved
    among its ingredients would otherwise join the next soup of that folder. A folder of
    soups alone keeps them (souping soups is then what was asked)."""
    soups = [p for p in paths if _is_soup(p)]
    if not soups or len(soups) == len(paths):
        return paths
    warnings.warn(
        f"{where}: left out {len(soups)} soup(s) modelsoup wrote there, with a soup card "
        f"({_names([p.name for p in soups])}); name a soup's path to use it as an ingredient",
        SoupWarning,
        stacklevel=3,
    )
    return [p for p in paths if p not in soups]


def _in_order(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural_order)


def _nested_checkpoints(folder: Path) -> list[str]:
    """Checkpoint folders inside a model folder (a Trainer's ``checkpoint-N/``)."""
    return [p.name for p in _in_order(folder) if p.is_dir() and _is_ingredient(p)]


def _names(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _folder_checkpoints(folder: Path, quiet: bool = False) -> list[Path]:
    """The ingredients in a folder: its checkpoints and model folders, and those of its
    run folders (sub-folders that are not models but hold some), in natural order."""
    found: list[Path] = []
    runs: list[str] = []
    skipped: list[str] = []
    unused: list[str] = []
    for item in _in_order(folder):
        if _is_ingredient(item):
            found.append(item)
            if item.is_dir():
                unused += [f"{item.name}/{n}" for n in _nested_checkpoints(item)]
        elif item.is_dir():
            inner = [p for p in _in_order(item) if _is_ingredient(p)]
            if inner:
                runs.append(item.name)
                found.extend(inner)
                for p in inner:
                    if p.is_dir():
                        unused += [f"{item.name}/{p.name}/{n}" for n in _nested_checkpoints(p)]
            else:
                skipped.append(item.name + "/")
    shards = [p.name for p in found if _SHARD_NAME.fullmatch(p.name)]
    if shards:
        raise IngredientError(
            f"{folder}: holds shards of one model ({_names(shards, 2)}) but not their index "
            "(model.safetensors.index.json or pytorch_model.bin.index.json), without which "
            "they are not one model: restore the index, or re-save the model folder"
        )
    if not found and (folder / ".metadata").is_file() and any(folder.glob("*.distcp")):
        raise IngredientError(
            f"{folder}: is a torch.distributed.checkpoint (DCP) folder, which modelsoup does "
            "not read; convert it first with torch.distributed.checkpoint.format_utils."
            "dcp_to_torch_save(folder, 'model.pt')"
        )
    if not found:
        raise IngredientError(
            f"{folder}: the folder holds no checkpoints (looked for "
            f"{', '.join(CHECKPOINT_SUFFIXES)} files and Hugging Face model folders, in it and "
            "in its sub-folders)"
        )
    line = f"{folder}: {len(found)} checkpoint{'s' if len(found) != 1 else ''} found"
    if runs:
        line += f" in {len(runs)} run folder{'s' if len(runs) != 1 else ''} ({_names(runs)})"
    if skipped:
        line += f"; skipped {_names(skipped)} (no checkpoints in them)"
    if unused:
        line += (
            f"; not used: {_names(unused)} inside model folders (name them, e.g. with a "
            "glob, to soup them)"
        )
    if not quiet:
        _logger.info(line)
    return found


def _content_files(path: Path) -> list[Path] | None:
    """The files whose bytes are a checkpoint's content (``None``: not compared)."""
    if path.is_file():
        return [path]
    if is_model_folder(path):
        return weight_files(path)[0]
    return None


def _sampled_digest(files: Sequence[Path], blocks: int = 8, size: int = 1 << 16) -> str:
    """A cheap digest of a few blocks spread over the files: different digests mean
    different content; equal ones are then confirmed by a full hash."""
    digest = hashlib.sha256()
    for path in files:
        check_regular(path)
        length = path.stat().st_size
        with open(path, "rb") as fh:
            for i in range(blocks):
                fh.seek(length * i // blocks)
                digest.update(fh.read(size))
    return digest.hexdigest()


def _drop_same_content(paths: list[Path], where: str) -> list[Path]:
    """Keep the first of checkpoints with byte-identical content (timm's ``last``,
    ``model_best`` and ``checkpoint-N`` copies), and say which were dropped."""
    files = {p: _content_files(p) for p in paths}
    by_size: dict[tuple, list[Path]] = {}
    for p, fs in files.items():
        if fs:
            by_size.setdefault(tuple(f.stat().st_size for f in fs), []).append(p)
    same: dict[Path, Path] = {}
    for group in by_size.values():
        if len(group) < 2:
            continue
        first_of: dict[str, Path] = {}
        for p in group:
            key = _sampled_digest(files[p])
            if key in first_of and hash_files(files[p]) == hash_files(files[first_of[key]]):
                same[p] = first_of[key]
            else:
                first_of.setdefault(key, p)
    if not same:
        return paths
    pairs = [f"{p.name} = {q.name}" for p, q in same.items()]
    warnings.warn(
        f"{where}: {len(same)} checkpoint{'s are' if len(same) != 1 else ' is'} a byte-identical "
        f"copy of another ({_names(pairs)}) and counted once; list a file twice to weight it "
        "twice",
        SoupWarning,
        stacklevel=3,
    )
    return [p for p in paths if p not in same]


def find_checkpoints(
    patterns: Iterable[str | Path], *, dedupe: bool = True, quiet: bool = False
) -> list[Path]:
    """Expand paths, globs and folders of checkpoints into a list, in the order given.

    A folder that is itself an HF model or a LoRA adapter counts as one ingredient; any
    other folder contributes its checkpoint files and model folders, and those of its run folders
    (sub-folders holding checkpoints, e.g. one Trainer ``output_dir`` per run), in natural
    order (:func:`natural_order`: checkpoint-500 before checkpoint-1000); each glob
    contributes its matches. What a folder gave, and what it skipped, is logged in one
    line (unless ``quiet``). Within one folder or glob, byte-identical copies (timm's
    ``last`` and ``model_best``) count once, with a warning, unless ``dedupe=False``. A
    path given twice stays twice: ingredients are kept by position.

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
            matches = _without_soups(matches, text)
            found.extend(_drop_same_content(matches, text) if dedupe else matches)
            continue
        path = Path(text)
        if path.is_dir() and not _is_ingredient(path):
            inside = _without_soups(_folder_checkpoints(path, quiet), text)
            found.extend(_drop_same_content(inside, text) if dedupe else inside)
        else:
            if not quiet and is_model_folder(path) and _nested_checkpoints(path):
                _logger.info(
                    "%s: a model folder: its own weights are the ingredient; not used: %s "
                    "inside it (name them, e.g. %s/checkpoint-*, to soup them)",
                    path,
                    _names(_nested_checkpoints(path)),
                    path,
                )
            found.append(path)
    return found


def _path_parts(path: Path) -> list[str]:
    """The folders of an absolute path, and the checkpoint's stem (or folder name) last."""
    whole = list(Path(os.path.abspath(path)).parts[1:]) or [str(path)]
    whole[-1] = path.name if path.is_dir() else checkpoint_stem(Path(whole[-1]))
    return whole


def unique_labels(paths: Sequence[Path | None], given: Sequence[str | None]) -> list[str]:
    """Labels for a pool: ``given`` where set, else each file's stem (a folder's name),
    lengthened by parent folders where two would be the same, until they differ
    (``lr3e-4-s1/checkpoint-26``): the shortest distinguishing path suffix.

    A path given twice (or in-memory models without a label) gets ``#2``, ``#3``.

    Example:
        >>> unique_labels([Path("a/run1/checkpoint-26"), Path("a/run2/checkpoint-26"),
        ...                Path("b/final.safetensors")], [None, None, None])
        ['run1/checkpoint-26', 'run2/checkpoint-26', 'final']
    """
    parts: list[list[str] | None] = []
    first_at: dict[tuple, int] = {}
    for i, p in enumerate(paths):
        whole = None
        if p is not None:
            whole = _path_parts(p)
            if given[i] is None and first_at.setdefault(tuple(whole), i) != i:
                whole = None  # the same path again: labelled like its first, then numbered
        parts.append(whole)
    depth = [1] * len(paths)
    labels = [
        g if g is not None else ("/".join(ps[-1:]) if ps else f"model{i}")
        for i, (g, ps) in enumerate(zip(given, parts))
    ]
    while True:
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        grown = False
        for members in groups.values():
            if len(members) < 2:
                continue
            for i in members:
                ps = parts[i]
                if given[i] is None and ps is not None and depth[i] < len(ps):
                    depth[i] += 1
                    labels[i] = "/".join(ps[-depth[i] :])
                    grown = True
        if not grown:
            break
    for i, p in enumerate(paths):
        if p is not None and parts[i] is None and given[i] is None:
            labels[i] = labels[first_at[tuple(_path_parts(p))]]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab}#{seen[lab]}"
    return labels


def open_ingredients(
    sources: Sequence[str | Path | Mapping | torch.nn.Module | Ingredient],
    *,
    key: str | None = None,
    check: bool = True,
    labels: Sequence[str | None] | None = None,
    int_policy: str | None = None,
    strict: bool = False,
    base: str | Path | None = None,
) -> list[Ingredient]:
    """Open many ingredients (expanding globs and folders) and check they can be souped.

    Labels are unique over the pool (:func:`unique_labels`); ``labels`` gives one per
    source (``None`` for the default), and a labelled source must be one checkpoint.
    With ``check``, :func:`check_compatible` runs with ``int_policy`` and ``strict``.
    ``base`` is the base model of LoRA adapter folders among them (see
    :func:`open_ingredient`).

    Example:
        >>> import torch
        >>> ings = open_ingredients([{"w": torch.ones(1)}, {"w": torch.zeros(1)}],
        ...                         labels=["one", None])
        >>> [ing.label for ing in ings]
        ['one', 'model1']
    """
    if labels is not None and len(labels) != len(sources):
        raise IngredientError(
            f"{len(labels)} labels given for {len(sources)} ingredient entries; give one each "
            "(or none)"
        )
    given_labels = list(labels) if labels is not None else [None] * len(sources)
    named = [g for g in given_labels if g is not None]
    for g in named:
        if not isinstance(g, str) or not g.strip():
            raise IngredientError(f"ingredient label {g!r} must be a non-empty string")
    if len(set(named)) != len(named):
        twice = next(g for g in named if named.count(g) > 1)
        raise IngredientError(f"two ingredients are both labelled '{twice}'; labels must differ")
    items: list = []
    given: list[str | None] = []
    for s, lab in zip(sources, given_labels):
        if isinstance(s, str | Path):
            found = find_checkpoints([s])
            if lab is not None and len(found) != 1:
                raise IngredientError(
                    f"{s}: labelled '{lab}' but holds {len(found)} checkpoints; a label names "
                    "one checkpoint: list them one by one to label them"
                )
            items.extend(found)
            given.extend([lab] * len(found))
        else:
            items.append(s)
            given.append(lab if lab is not None else getattr(s, "label", None))
    if not items:
        raise IngredientError("no ingredients given; pass checkpoint files, folders or globs")
    paths = [Path(x) if isinstance(x, str | Path) else None for x in items]
    final = unique_labels(paths, given)
    ingredients = []
    for x, lab in zip(items, final):
        ing = open_ingredient(x, label=lab, key=key, base=base)
        if isinstance(x, Ingredient) and ing.label != lab:
            ing = Ingredient(ing.source, lab, path=ing.path, hyperparameters=ing.hyperparameters)
        ingredients.append(ing)
    _warn_mixed_weights(ingredients)
    if check:
        check_compatible(ingredients, int_policy=int_policy, strict=strict)
    return ingredients


def _warn_mixed_weights(ingredients: Sequence[Ingredient]) -> None:
    # one file's raw weights beside another's EMA average (a file that holds only its
    # EMA is read from there): a soup of both kinds is rarely what was meant
    # only pickles read from a wrapper key say which kind they hold (a safetensors file
    # may hold an exported EMA)
    keyed = [i for i in ingredients if i.source.read_key is not None]
    ema = [i for i in keyed if "ema" in i.source.read_key.lower()]
    raw = [i for i in keyed if i not in ema]
    if ema and raw:
        warnings.warn(
            f"ingredients mix raw weights ({raw[0].label}) and EMA weights ({ema[0].label}, "
            f"under '{ema[0].source.read_key}'); pass --checkpoint-key (checkpoint_key) to "
            "read one kind from every file",
            SoupWarning,
            stacklevel=3,
        )


def adapters_base(ingredients: Sequence[Ingredient]) -> Ingredient | None:
    """The base model of LoRA adapter ingredients that share one, as an ingredient
    (labelled ``base``), else ``None``: the base merge rules take task vectors from
    when none is given, since an adapter is its base plus its change.

    Example:
        >>> import torch
        >>> adapters_base([open_ingredient({"w": torch.ones(1)})]) is None
        True
    """
    shared = shared_base([ing.source for ing in ingredients])
    if shared is None:
        return None
    first = ingredients[0].source
    assert isinstance(first, AdapterSource)
    return Ingredient(shared, "base", path=first.base_path)


def architecture_difference(a: Ingredient, b: Ingredient) -> str | None:
    """How two ingredients' architecture metadata differ (keys both carry), or ``None``.

    Example:
        >>> import torch
        >>> a = open_ingredient({"w": torch.ones(1)}, label="a")
        >>> a.source.architecture = {"model_type": "bert", "hidden_size": 384}
        >>> b = open_ingredient({"w": torch.ones(1)}, label="b")
        >>> b.source.architecture = {"model_type": "bert", "hidden_size": 64}
        >>> architecture_difference(a, b)
        'hidden_size 384 vs 64'
    """
    mine, theirs = a.architecture, b.architecture
    keys = [k for k in mine if k in theirs and mine[k] != theirs[k]]
    if not keys:
        return None
    return ", ".join(f"{k} {_show(mine[k])} vs {_show(theirs[k])}" for k in keys)


def _show(value: object) -> str:
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def check_same_ints(
    name: str, a: torch.Tensor, b: torch.Tensor, label_a: str, label_b: str
) -> None:
    """Refuse to soup ingredients whose integer tensor ``name`` differs.

    Example:
        >>> import torch
        >>> check_same_ints("n", torch.tensor(1), torch.tensor(1), "a", "b")
    """
    if a.shape != b.shape or not torch.equal(a, b):
        raise IncompatibleIngredientsError(
            f"integer tensor '{name}' differs between {label_a} and {label_b}; integer tensors "
            "are copied, not averaged: pass --int-policy first (int_policy='first' in a config "
            "or in Python) to take them from the first ingredient"
        )


def check_compatible(
    ingredients: Sequence[Ingredient],
    *,
    warn_duplicates: bool = True,
    int_policy: str | None = None,
    strict: bool = False,
) -> None:
    """Raise if ingredients cannot be souped; warn on duplicates and architecture doubts.

    Tensor names, shapes and kinds must match. Where checkpoints describe their
    architecture (:attr:`Ingredient.architecture`), a difference is warned about, or
    refused with ``strict``, and named in any mismatch error. With
    ``int_policy="strict"``, integer tensors (which are copied, not averaged) must be
    equal, as :func:`modelsoup.average` requires.

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
    check_adapters([ing.source for ing in ingredients])
    first = ingredients[0]
    ref = first.layout()
    differing: dict[str, list[str]] = {}  # architecture difference -> who differs so
    for other in ingredients[1:]:
        _check_class_order(first, other)
        differ = architecture_difference(first, other)
        try:
            _check_layouts(first, ref, other, other.layout())
        except IncompatibleIngredientsError as err:
            if differ is None:
                raise
            raise IncompatibleIngredientsError(
                f"{first.label} and {other.label} are different architectures ({differ}); "
                f"their weights do not match either ({err})"
            ) from None
        if differ is not None:
            differing.setdefault(differ, []).append(other.label)
    silent = [ing.label for ing in ingredients if not ing.architecture]
    if 0 < len(silent) < len(ingredients):
        _logger.info(
            "%s carr%s no architecture metadata: only tensor names and shapes show that "
            "it is the same model as the others",
            _names(silent),
            "ies" if len(silent) == 1 else "y",
        )
    for differ, others in differing.items():
        text = (
            f"{_names(others)} describe{'s' if len(others) == 1 else ''} a different "
            f"architecture from {first.label} ({differ}) although the tensor names and shapes "
            "match"
        )
        if strict:
            raise IncompatibleIngredientsError(text + "; refused because of --strict")
        warnings.warn(
            text + ": are they fine-tunes of one model? (--strict refuses this)",
            SoupWarning,
            stacklevel=2,
        )
    _check_copied_files(ingredients, strict)
    if int_policy == "strict":
        ints = [n for n, m in ref.items() if not m.is_floating]
        kept = {n: first.tensor(n).clone() for n in ints}
        for other in ingredients[1:]:
            for n in ints:
                check_same_ints(n, kept[n], other.tensor(n), first.label, other.label)
    if warn_duplicates:
        warn_if_duplicated(ingredients)


def _check_copied_files(ingredients: Sequence[Ingredient], strict: bool) -> None:
    # A soup folder copies its tokenizer, chat template and generation config from one
    # ingredient, and text evaluators tokenize with the first's: where the folders
    # disagree, the soup would depend on the order they were given in.
    folders = [
        ing
        for ing in ingredients
        if ing.path is not None and ing.path.is_dir() and not isinstance(ing.source, AdapterSource)
    ]
    if len(folders) < 2:
        return
    first = folders[0].label
    by_who: dict[tuple[int, ...], list[str]] = {}
    for name, who in differing_copied_files([ing.path for ing in folders]).items():
        by_who.setdefault(tuple(who), []).append(name)
    for who, names in by_who.items():
        text = (
            f"{_names([folders[i].label for i in who])} and {first} differ in "
            f"{', '.join(names)} (content, or a file only one has): a soup folder copies "
            "these files from its first chosen ingredient "
            f"({first}'s in this order), and text evaluators tokenize with {first}'s tokenizer"
        )
        if strict:
            raise IncompatibleIngredientsError(text + "; refused because of --strict")
        warnings.warn(
            text + "; give every ingredient the same files, or list first the one whose "
            "files the soup should have (--strict refuses this)",
            SoupWarning,
            stacklevel=3,
        )


def _check_class_order(a: Ingredient, b: Ingredient) -> None:
    # Two classifiers over the same labels in another order: row i of one head scores
    # another class than row i of the other, so averaging them mixes classes.
    mine, theirs = a.architecture.get("id2label"), b.architecture.get("id2label")
    if not (isinstance(mine, str) and isinstance(theirs, str)) or mine == theirs:
        return
    ours, others = json.loads(mine), json.loads(theirs)
    if sorted(ours) == sorted(others):
        raise IncompatibleIngredientsError(
            f"{a.label} and {b.label} order their classes differently (id2label "
            f"{ours} vs {others}): row i of one classifier head is another class than row i "
            "of the other, so they cannot be averaged; fine-tune every ingredient with the "
            "same label2id"
        )


def _check_layouts(first: Ingredient, ref: dict, other: Ingredient, lay: dict) -> None:
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
                f"tensor '{name}' is {meta.shape} in {first.label} but {o.shape} in {other.label}"
            )
        if o.is_floating != meta.is_floating:
            raise IncompatibleIngredientsError(
                f"tensor '{name}' is {meta.dtype} in {first.label} but {o.dtype} in "
                f"{other.label}; a float tensor cannot be averaged with an integer one"
            )


def check_not_sharing(
    module: torch.nn.Module, ingredients: Sequence[Ingredient | None], what: str = "the model"
) -> None:
    """Refuse a module to write soups into whose weights are the memory of an in-memory
    ingredient (or base): a state dict taken with ``model.state_dict()`` shares the
    model's tensors, so writing a soup into that model would change the ingredient, and
    every later soup would be mixed from the changed values.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> ings = [open_ingredient(model.state_dict(), label="ft-1")]
        >>> try:
        ...     check_not_sharing(model, ings)
        ... except ConfigError as err:
        ...     print(str(err)[:56])
        the model shares the memory of ingredient ft-1's tensors
    """
    owners: dict[int, str] = {}
    for ing in ingredients:
        storages = getattr(ing.source, "storages", None) if ing is not None else None
        for address in storages() if storages is not None else ():
            owners.setdefault(address, ing.label)
    if not owners:
        return
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        owner = owners.get(storage_of(t))
        if owner is not None:
            raise ConfigError(
                f"{what} shares the memory of ingredient {owner}'s tensors (its '{name}'; "
                "a state_dict() taken without .clone()): writing soups into it would change "
                "that ingredient; pass a fresh module (copy.deepcopy(model))"
            )


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
        key = ing.path.resolve() if ing.path is not None else _memory_key(ing)
        if by_content:
            # Same path was already reported when the ingredients were opened.
            other = hashes.get(ing.sha256) if key not in seen else None
            hashes.setdefault(ing.sha256, ing.label)
        else:
            other = seen.get(key)
        if other is not None:
            memory = (
                " (the same tensors in memory: a state_dict() kept without .clone() follows "
                "the model as it trains)"
                if ing.path is None and not isinstance(key, int)
                else ""
            )
            warnings.warn(
                f"{ing.label} and {other} are the same checkpoint{memory}: it is used twice "
                "and counts twice in the average",
                SoupWarning,
                stacklevel=2,
            )
        seen.setdefault(key, ing.label)


def _memory_key(ing: Ingredient) -> object:
    # State dicts taken from one model without .clone() are the same tensors, whatever
    # the objects holding them: the model's last weights, counted once per dict.
    storages = getattr(ing.source, "storages", None)
    held = storages() if storages is not None else set()
    return frozenset(held) if held else id(ing.source)


def describe_ingredients(
    ingredients: Sequence[Ingredient], *, int_policy: str = "strict", strict: bool = False
) -> dict:
    """Counts, dtypes and sizes of each ingredient, and whether they can be souped together
    (the same checks as :func:`modelsoup.average` with these ``int_policy`` and ``strict``;
    architecture differences it would warn about are listed as ``warnings``).

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
                "architecture": dict(ing.architecture),
                "hyperparameters": ing.hyperparameters,
            }
        )
    problem = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", SoupWarning)
        try:
            check_compatible(ingredients, int_policy=int_policy, strict=strict)
        except IncompatibleIngredientsError as err:
            problem = str(err)
    notes = [str(w.message) for w in seen if issubclass(w.category, SoupWarning)]
    return {
        "ingredients": rows,
        "compatible": problem is None,
        "problem": problem,
        "warnings": notes,
    }
