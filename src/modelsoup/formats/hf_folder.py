"""Hugging Face model folders: single-file or sharded weights, and writing one back.

Reading follows transformers' ``from_pretrained``: a single ``model.safetensors`` before
its shard index, safetensors before ``pytorch_model*.bin``.
Writing puts the soup's weights in ``model.safetensors`` (or HF-style shards with
``model.safetensors.index.json`` when larger than ``max_shard_size``) and copies the
first ingredient's config, tokenizer and processor files beside them (:func:`is_copied`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from modelsoup._util import atomic_file, check_replaceable, replace_folder, temp_sibling
from modelsoup.errors import IngredientError, SoupWarning
from modelsoup.formats.base import TensorMeta, TensorSource, architecture_of, check_regular
from modelsoup.formats.safetensors_io import SafetensorsSource, refuse_key, write_safetensors
from modelsoup.formats.torch_pickle import TorchSource
from modelsoup.formats.training_args import read_training_args

_logger = logging.getLogger(__name__)

#: the soup card inside a folder output; it also marks a folder as a soup that a new
#: soup may replace (any other non-empty folder is refused, never deleted)
FOLDER_CARD = "soup_card.json"
#: the ``format`` of every soup card (beside a file soup as ``<name>.json``)
CARD_FORMAT = "modelsoup.card/1"
#: files of one training run that do not describe a soup (transformers' Trainer writes
#: them into every checkpoint-N folder; optimizer and RNG states are weight-suffixed)
TRAINING_STATE = frozenset(
    {
        FOLDER_CARD,  # a soup used as an ingredient: its card is not the next soup's
        "trainer_state.json",
        "training_args.bin",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
    }
)
#: the rest of a Trainer checkpoint: weight-suffixed, but not weights of a model
_TRAINER_STATE_FILE = re.compile(r"(optimizer|scheduler|scaler|rng_state(_\d+)?)\.(pt|pth|bin)")


def is_training_state(name: str) -> bool:
    """Whether a file name is a training run's state rather than model weights.

    Example:
        >>> is_training_state("training_args.bin"), is_training_state("rng_state_3.pth")
        (True, True)
        >>> is_training_state("pytorch_model.bin")
        False
    """
    return name in TRAINING_STATE or _TRAINER_STATE_FILE.fullmatch(name) is not None


#: what a soup folder takes from the first ingredient's folder: the files that say how to
#: load and use the weights (transformers' config and generation config, tokenizers,
#: processors, chat templates, sentence-transformers' module list, remote code and the
#: license), and nothing else. Not its weights in another format (``.onnx``, ``.gguf``,
#: ``.ot``, ``.h5``, ``.msgpack``, ...: they hold the ingredient, not the soup), its model
#: card (``README.md``: the soup card describes the soup), its training state or its
#: ``hyperparameters.json``.
COPIED_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    }
)
_COPIED_PATTERN = re.compile(
    r"vocab[\w.-]*\.(txt|json)|[\w.-]+\.tiktoken|[\w-]+\.py|(LICENSE|LICENCE|NOTICE)[\w.-]*",
    re.IGNORECASE,
)


def copied_folders(folder: Path) -> list[str]:
    """The sub-folders a folder output copies from ``folder``: transformers' named chat
    templates (``additional_chat_templates/``) and the sentence-transformers modules that
    ``modules.json`` lists (``1_Pooling/``, ...), when they hold settings only. A module
    with weights of its own (a ``Dense`` layer) is not copied, with a warning: the soup
    averages the transformer's weights, not the module's, so the first ingredient's would
    pass for the soup's.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}]))
        >>> (d / "1_Pooling").mkdir(); _ = (d / "1_Pooling" / "config.json").write_text("{}")
        >>> copied_folders(d)
        ['1_Pooling']
    """
    found = []
    if (folder / "additional_chat_templates").is_dir():
        found.append("additional_chat_templates")
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        modules = []
    for entry in modules if isinstance(modules, list) else []:
        sub = entry.get("path") if isinstance(entry, dict) else None
        if (
            not isinstance(sub, str)
            or not sub
            or Path(sub).is_absolute()
            or ".." in Path(sub).parts
        ):
            continue
        if not (folder / sub).is_dir():
            continue
        files = [p for p in (folder / sub).rglob("*") if p.is_file()]
        if all(p.parent == folder / sub and is_copied(p.name) for p in files):
            found.append(sub)
        else:
            warnings.warn(
                f"{folder / sub}: a sentence-transformers module with weights of its own, "
                "which the soup does not average; it is not copied into the soup folder",
                SoupWarning,
                stacklevel=3,
            )
    return found


def is_copied(name: str) -> bool:
    """Whether a folder output copies the file ``name`` from the first ingredient's
    folder (:data:`COPIED_FILES`, vocabularies, tiktoken files, remote code, licenses).

    Example:
        >>> is_copied("tokenizer.json"), is_copied("vocab.txt"), is_copied("modeling_x.py")
        (True, True, True)
        >>> is_copied("model.onnx"), is_copied("hyperparameters.json"), is_copied("README.md")
        (False, False, False)
    """
    return name in COPIED_FILES or _COPIED_PATTERN.fullmatch(name) is not None


#: keys of a copied JSON file that change with the saving library's version, not with
#: what the file says (a generation config's ``transformers_version``)
_VOLATILE_KEYS = ("transformers_version", "_name_or_path", "name_or_path")


def _copied_digests(folder: Path) -> dict[str, str]:
    # config.json is left out: its architecture keys are compared one by one
    # (ARCHITECTURE_KEYS), and its other keys (a dtype, a name) may differ harmlessly.
    names = [p.name for p in folder.iterdir() if p.is_file() and is_copied(p.name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SoupWarning)  # copying it warns, not comparing it
        subs = copied_folders(folder)
    for sub in subs:
        names += [f"{sub}/{p.name}" for p in sorted((folder / sub).iterdir()) if p.is_file()]
    return {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
        for n in sorted(names)
        if n != "config.json"
    }


def _json_meaning(path: Path) -> object:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in _VOLATILE_KEYS}
    return value


def differing_copied_files(folders: Sequence[Path]) -> dict[str, list[int]]:
    """The files a folder output copies (:func:`is_copied`; not ``config.json``) that
    differ from the first folder's, each with the positions of the folders whose copy
    differs or is missing (or that have one the first lacks). JSON files are compared
    by content, ignoring the saving library's version; every file is hashed once.

    Example:
        >>> import tempfile
        >>> a, b = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> _ = (a / "tokenizer.json").write_text('{"v": 1}')
        >>> _ = (b / "tokenizer.json").write_text('{"v": 2}')
        >>> _ = (b / "chat_template.jinja").write_text("{{ x }}")
        >>> differing_copied_files([a, b])
        {'chat_template.jinja': [1], 'tokenizer.json': [1]}
    """
    first = _copied_digests(Path(folders[0]))
    found: dict[str, list[int]] = {}
    for i, folder in enumerate(folders[1:], 1):
        mine = _copied_digests(Path(folder))
        for name in sorted(set(first) | set(mine)):
            a, b = first.get(name), mine.get(name)
            if a == b:
                continue
            if (
                a is not None
                and b is not None
                and name.endswith(".json")
                and _json_meaning(Path(folders[0]) / name) == _json_meaning(Path(folder) / name)
            ):
                continue
            found.setdefault(name, []).append(i)
    return found


#: what an error about a broken model folder tells the user to do
_REDO = "; re-download or re-save the model folder"
#: the weights of a model folder, in the order transformers' ``from_pretrained`` looks
#: for them: a single file before a shard index, safetensors before pickles
_LAYOUTS = (
    ("model.safetensors", SafetensorsSource),
    ("model.safetensors.index.json", SafetensorsSource),
    ("pytorch_model.bin", TorchSource),
    ("pytorch_model.bin.index.json", TorchSource),
)


def is_model_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding one model (HF layout).

    Example:
        >>> is_model_folder(Path("/nonexistent"))
        False
    """
    return path.is_dir() and any((path / name).exists() for name, _ in _LAYOUTS)


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file), checked.

    It must map strings to strings, and every shard it names must be a file in the
    index's folder: a path that leaves it (``../x``, ``/etc/x``, a symlink to elsewhere)
    is refused. The one symlink allowed out is the Hugging Face hub cache's, from
    ``snapshots/<revision>/`` to the ``blobs/`` of the same repository.

    Example:
        >>> import json, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "model-1.safetensors").write_bytes(b"")
        >>> _ = (d / "i.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
        >>> read_index(d / "i.json")
        {'w': 'model-1.safetensors'}
    """
    check_regular(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise IngredientError(f"{index_path}: cannot read ({err.strerror})") from err
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
        raise IngredientError(f"{index_path}: corrupt shard index ({err})" + _REDO) from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = "nothing" if weight_map is None else json.dumps(weight_map)[:40]
        raise IngredientError(
            f"{index_path}: corrupt shard index: 'weight_map' must map each tensor name to its "
            f"shard file, but it is {found}" + _REDO
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise IngredientError(
                f"{index_path}: corrupt shard index: tensor '{name}' is mapped to "
                f"{json.dumps(shard)}, not a shard file name" + _REDO
            )
    for shard in sorted(set(weight_map.values())):
        _check_shard_path(index_path, shard)
    return weight_map


def _check_shard_path(index_path: Path, shard: str) -> None:
    folder = index_path.parent.resolve()
    path = index_path.parent / shard
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise IngredientError(
            f"{index_path}: the shard '{shard}' is outside the model folder; an index may "
            "only name files inside its own folder: put the shard there and name it by its "
            "file name"
        )
    if not path.is_file():
        raise IngredientError(f"{index_path}: shard '{shard}' is missing (or not a file)" + _REDO)
    target = path.resolve()
    in_cache = folder.parent.name == "snapshots" and target.parent == folder.parent.parent / "blobs"
    if not (target.is_relative_to(folder) or in_cache):
        raise IngredientError(
            f"{index_path}: the shard '{shard}' is a link to {target}, outside the model "
            "folder; copy the shard into the folder instead of linking it"
        )


def _check_against_index(index_path: Path, weight_map: Mapping[str, str], source) -> None:
    # both ways: the index names no tensor its shard lacks, the shards hold none it omits
    folder = index_path.parent
    stored = {name: source.file_of(name) for name in source.names()}
    for name, shard in weight_map.items():
        if name not in stored:
            raise IngredientError(
                f"{index_path}: the index puts tensor '{name}' in {shard}, but no shard "
                "holds it" + _REDO
            )
        if stored[name] != folder / shard:
            raise IngredientError(
                f"{index_path}: the index puts tensor '{name}' in {shard}, but it is stored "
                f"in {stored[name].relative_to(folder)}" + _REDO
            )
    for name, path in stored.items():
        if name not in weight_map:
            raise IngredientError(
                f"{index_path}: shard {path.relative_to(folder)} holds tensor '{name}', which "
                "the index does not list" + _REDO
            )


def weight_files(path: Path) -> tuple[list[Path], type[TensorSource]]:
    """The weight files of an HF model folder and their reader, found in the order
    transformers' ``from_pretrained`` uses: ``model.safetensors``, its shard index,
    ``pytorch_model.bin``, its shard index (what else is there is ignored, and logged).

    A shard index is checked (:func:`read_index`): a mapping of names to files inside
    the folder.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> safetensors.torch.save_file({"w": torch.ones(1)}, str(d / "model.safetensors"))
        >>> [p.name for p in weight_files(d)[0]]
        ['model.safetensors']
    """
    found = [(name, reader) for name, reader in _LAYOUTS if (path / name).exists()]
    if found:
        (name, reader), ignored = found[0], [n for n, _ in found[1:]]
        if ignored:
            _logger.info(
                "%s: reading %s, as transformers does; %s ignored",
                path,
                name,
                ", ".join(ignored),
            )
        candidate = path / name
        if not name.endswith(".index.json"):
            return [candidate], reader
        shards = sorted({path / shard for shard in read_index(candidate).values()})
        kind = name.removesuffix(".index.json").rsplit(".", 1)[-1]  # safetensors or bin
        other = [
            p.name
            for p in shards
            if p.name.lower().endswith(".safetensors") != (kind == "safetensors")
        ]
        if other:
            raise IngredientError(
                f"{candidate}: names {other[0]!r}, not a {kind} shard; one index holds shards "
                "of one format: fix the index, or re-save the model folder"
            )
        return shards, reader
    raise IngredientError(
        f"{path}: no model weights found (expected model.safetensors, a shard index or "
        "pytorch_model.bin)"
    )


def read_config(path: Path) -> dict:
    """A folder's ``config.json`` as a dict; ``{}`` when absent or not a JSON object.

    Example:
        >>> read_config(Path("/nonexistent"))
        {}
    """
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def open_folder(path: Path, key: str | None = None) -> TensorSource:
    """Open an HF model folder lazily.

    The folder's ``config.json`` gives the source's ``architecture`` (``architectures``,
    ``model_type``, sizes), and a Trainer's ``training_args.bin`` its
    ``hyperparameters`` (read without unpickling code:
    :func:`~modelsoup.formats.training_args.read_training_args`). A sharded folder's
    index is checked against its shards both ways: a tensor the index names but no
    shard holds, or one a shard holds but the index does not name, means the folder is
    incomplete or mixed up, and is refused.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> safetensors.torch.save_file({"w": torch.ones(1)}, str(d / "model.safetensors"))
        >>> _ = (d / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
        >>> src = open_folder(d)
        >>> src.names(), src.architecture
        (['w'], {'model_type': 'bert', 'hidden_size': 8})
    """
    files, reader = weight_files(path)
    if reader is TorchSource:
        source: TensorSource = TorchSource(files, label=str(path), key=key)
    else:
        refuse_key(path, key)
        source = SafetensorsSource(files, label=str(path))
    index = next((path / n for n, _ in _LAYOUTS if (path / n).exists()), None)
    if index is not None and index.name.endswith(".index.json"):  # the one read
        _check_against_index(index, read_index(index), source)
    source.architecture = architecture_of(read_config(path))
    if (path / "training_args.bin").is_file():
        source.hyperparameters = read_training_args(path / "training_args.bin")
    return source


def plan_shards(layout: Mapping[str, TensorMeta], max_shard_size: int) -> list[list[str]]:
    """Split tensor names, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own.

    Example:
        >>> import torch
        >>> lay = {n: TensorMeta((10,), torch.float32) for n in "abc"}
        >>> plan_shards(lay, 80)
        [['a', 'b'], ['c']]
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, meta in layout.items():
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += meta.nbytes
    return shards


def _set_config_dtype(config: Path, dtype: torch.dtype) -> None:
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return  # not ours to repair: copied as it was
    if not isinstance(data, dict):
        return
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(data.get(k), str)]
    if keys and any(data[k] != name for k in keys):
        data.update({k: name for k in keys})
        config.write_text(json.dumps(data, indent=2) + "\n")


def write_folder(
    path: Path,
    layout: Mapping[str, TensorMeta],
    tensor_for: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    *,
    max_shard_size: int,
    copy_from: Path | None = None,
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    torch_dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str | Callable[[], str]] | None = None,
) -> None:
    """Write an HF-style model folder; the folder appears only once complete.

    ``extra_files`` (name to text, or to a function giving it once the weights are
    written, e.g. the soup card) are written inside it before it appears, so they
    stand or fall with the weights.

    The files that describe how to load the weights (config, tokenizer, processor:
    :func:`is_copied`) are copied from ``copy_from``, nothing else; with
    ``torch_dtype`` (the soup was cast), a copied ``config.json`` that names a dtype
    (``torch_dtype``, or ``dtype`` in newer transformers) is updated to it.

    Example:
        >>> import tempfile, torch
        >>> d = Path(tempfile.mkdtemp()) / "soup"
        >>> lay = {"w": TensorMeta((2,), torch.float32)}
        >>> write_folder(d, lay, lambda n: torch.ones(2), max_shard_size=1 << 30)
        >>> sorted(p.name for p in d.iterdir())
        ['model.safetensors']
    """
    path = Path(path)
    check_replaceable(path, FOLDER_CARD)  # before any work: refused, never deleted
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if copy_from is not None:
            for item in sorted(Path(copy_from).iterdir()):
                if is_copied(item.name) and item.is_file():
                    shutil.copy2(item, tmp / item.name)
            for sub in copied_folders(Path(copy_from)):
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                for item in sorted((Path(copy_from) / sub).iterdir()):
                    if item.is_file():
                        shutil.copy2(item, tmp / sub / item.name)
            if torch_dtype is not None and (tmp / "config.json").is_file():
                _set_config_dtype(tmp / "config.json", torch_dtype)
        shards = plan_shards(layout, max_shard_size)
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", layout, tensor_for, metadata, on_tensor)
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                sub = {n: layout[n] for n in names}
                write_safetensors(tmp / fname, sub, tensor_for, metadata, on_tensor)
                weight_map.update({n: fname for n in names})
            total = sum(m.nbytes for m in layout.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with atomic_file(tmp / "model.safetensors.index.json") as t:
                t.write_text(json.dumps(index, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text() if callable(text) else text)
        replace_folder(tmp, path, FOLDER_CARD)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
