"""Align a pool of checkpoints, writing aligned checkpoints to disk.

This is what ``align: true`` in a cook config and ``modelsoup align`` do: derive the
permutation spec (by tracing the model, or from a hand-written JSON spec), then permute
every ingredient's hidden units (Ainsworth et al. 2023), either to line up with one
reference ingredient by weight matching (``method="reference"``: holds two models in
memory at a time) or by activation matching on unlabeled inputs
(``method="activations"``: better when training was short), or with each other
(``method="merge_many"``: every model weight-matched to the mean of the others until
nothing changes; holds all of them in memory). Aligned checkpoints compute the same
functions as the originals; they are written as safetensors beside a ``<name>.json``
sidecar that records what they were aligned to, so a re-run skips work already done.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from modelsoup._util import atomic_file, build_model, check_device, clean_stale_temps, slug
from modelsoup._util import progress as stage_progress
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.formats.safetensors_io import write_safetensors
from modelsoup.ingredients import Ingredient, open_ingredients
from modelsoup.repair.activations import activation_align
from modelsoup.repair.batchnorm import reusable
from modelsoup.repair.matching import align_to, merge_many
from modelsoup.repair.spec import PermutationSpec
from modelsoup.repair.trace import check_keeps_function, trace_permutation_spec


def example_input(example: Any) -> Any:
    """An example input for tracing: a tensor, or the first batch of an evaluator/loader.

    Example:
        >>> import torch
        >>> from modelsoup.evaluators import Accuracy
        >>> example_input(Accuracy((torch.zeros(20, 3), torch.zeros(20)))).shape
        torch.Size([8, 3])
    """
    if isinstance(example, torch.Tensor):
        return example
    if hasattr(example, "batches"):
        inputs = example.batches(torch.device("cpu"))[0][0]
    elif isinstance(example, tuple | list) and example and isinstance(example[0], torch.Tensor):
        inputs = example[0]
    else:
        try:
            first = next(iter(example))
        except (TypeError, StopIteration):
            raise ConfigError("cannot find an example input to trace the model with") from None
        inputs = first[0] if isinstance(first, tuple | list) else first
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(
            "tracing needs tensor inputs; give a permutation spec (JSON) for this model"
        )
    return inputs[:8]


def load_spec(spec: PermutationSpec | str | Path) -> PermutationSpec:
    """A spec object, or one read from a JSON file written by ``PermutationSpec.to_dict``."""
    if isinstance(spec, PermutationSpec):
        return spec
    try:
        return PermutationSpec.from_dict(json.loads(Path(spec).read_text()))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{spec}: cannot read the permutation spec ({err})") from None


def _full(ing: Ingredient) -> dict[str, torch.Tensor]:
    return {n: ing.tensor(n) for n in ing.names()}


def align_pool(
    sources: Sequence[Any],
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None,
    output: str | Path,
    *,
    example: Any = None,
    spec: PermutationSpec | str | Path | None = None,
    reference: int = 0,
    method: Literal["reference", "activations", "merge_many"] = "reference",
    data: Any = None,
    num_batches: int | None = None,
    checkpoint_key: str | None = None,
    max_iter: int = 100,
    max_rounds: int = 20,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Align the ingredients to each other; return paths to feed any recipe.

    ``method="reference"`` permutes every ingredient onto ``sources[reference]``,
    which is returned as given (copied beside the others when read under a
    ``checkpoint_key``, so that every path returned holds the weights aligned, not a
    file's default ones); ``method="activations"`` does the same by matching
    activations on ``num_batches`` batches of ``data`` (unlabeled inputs: a tensor or
    an iterable of batches, see :func:`~modelsoup.repair.activation_matching`);
    ``method="merge_many"`` re-aligns each one to the
    mean of the others for up to ``max_rounds`` rounds (:func:`merge_many`), and
    every ingredient gets an aligned copy. Aligned copies go to ``<output>/aligned/``.
    ``device``: where activation matching runs the networks (default: the CPU; checked
    here); weight matching compares weights and runs on the CPU.

    A spec given by hand is checked like a traced one when the model and an example
    input are given (permuting must not change the model's outputs), and warned about
    otherwise. A copy made before is reused only if everything that shaped it (the
    ingredient, the reference, the method, the spec, the seed and iterations, the data)
    is the same; the module given as ``model`` is left in its mode and on its device.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> torch.manual_seed(0)
        ... # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> nets = [nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(2)]
        >>> paths = align_pool([n.state_dict() for n in nets], nets[0], tempfile.mkdtemp(),
        ...                    example=torch.randn(4, 3), progress=False)
        >>> len(paths)
        2
    """
    if method not in ("reference", "activations", "merge_many"):
        raise ConfigError(
            f"alignment method must be 'reference', 'activations' or 'merge_many', not {method!r}"
        )
    if method == "activations" and (data is None or model is None):
        raise ConfigError("activation matching needs the model and unlabeled input data")
    if device is not None:
        device = check_device(device)
    if Path(output).exists() and not Path(output).is_dir():
        raise ConfigError(
            f"{output}: aligned copies go in a folder there, but it is a file; choose another"
        )
    pool = open_ingredients(sources, key=checkpoint_key)
    if not 0 <= reference < len(pool):
        raise ConfigError(f"reference {reference} is not one of the {len(pool)} ingredients")
    if method == "activations" and len(pool) > 2:
        data = reusable(data, "activation matching")  # read once per ingredient aligned
    if spec is None:
        if model is None or example is None:
            raise ConfigError("alignment needs a model and an example input, or a spec file")
        module = build_model(model)
        spec = trace_permutation_spec(module, _on_device_of(module, example_input(example)))
    else:
        spec = load_spec(spec)
        if model is not None and example is not None:
            module = build_model(model)
            check_keeps_function(
                module, spec, _on_device_of(module, example_input(example)), traced=False
            )
        else:
            warnings.warn(
                "the permutation spec given is not checked (no model and example input): "
                "if it misses a tensor, the aligned copies compute other functions; give "
                "the model and an example input (--model, --input-shape) to check it",
                SoupWarning,
                stacklevel=2,
            )
    folder = Path(output) / "aligned"
    clean_stale_temps(folder)  # what a killed alignment left (half-written copies)
    shape = {"spec_sha256": _spec_digest(spec), "seed": seed, "max_iter": max_iter}
    if method == "merge_many":
        shape["max_rounds"] = max_rounds
        return _align_merge_many(pool, spec, folder, shape, progress)
    ref = pool[reference]
    ref_sd = _full(ref)
    spec.sizes(ref_sd)  # checks the spec names real tensors of the right sizes
    template = None
    if method == "activations":
        template = build_model(model)
    data_key = _data_fingerprint(data, num_batches) if method == "activations" else None
    out: list[str] = []
    bar = stage_progress(pool, desc="aligning", unit="ingredient", enabled=progress)
    for i, ing in enumerate(bar):
        if i == reference and checkpoint_key is None:
            out.append(_as_source(ing))
            continue
        path = _aligned_path(folder, i, ing)
        record = {"source": ing.identity, "reference": ref.identity, **shape}
        if i == reference:
            # read from under a key (the EMA of a timm file): the file itself would be
            # read as its default weights beside aligned copies of the EMA, so the
            # reference is copied too, unpermuted, and the pool is one of plain files
            record["method"] = "reference (copied)"
        elif method == "activations":
            record |= {"method": "activations", "data": data_key}
        else:
            record["method"] = "reference"
        if data_key != "unhashed" and _already_aligned(path, record):
            out.append(str(path))
            continue
        if i == reference:
            aligned = ref_sd
        elif method == "activations":
            aligned = activation_align(
                template, ref_sd, _full(ing), spec, data, num_batches=num_batches, device=device
            )
        else:
            aligned = align_to(ref_sd, _full(ing), spec, max_iter=max_iter, seed=seed)
        _write_aligned(path, ing, aligned, record, ref.label)
        out.append(str(path))
    return out


def _on_device_of(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    # the example input where the module's weights are (the module is not moved)
    weight = next(iter(module.parameters()), None)
    return inputs if weight is None else inputs.to(weight.device)


def _spec_digest(spec: PermutationSpec) -> str:
    """sha256 of a permutation spec, for the records of the aligned copies made with it."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def _data_fingerprint(data: Any, num_batches: int | None) -> str:
    """sha256 of input data given as one tensor; iterables cannot be identified cheaply
    (``"unhashed"``: alignments made from them are redone on every run)."""
    if not isinstance(data, torch.Tensor):
        return "unhashed"
    digest = hashlib.sha256(str((tuple(data.shape), str(data.dtype), num_batches)).encode())
    digest.update(data.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _aligned_path(folder: Path, i: int, ing: Ingredient) -> Path:
    return folder / f"{i:03d}-{slug(ing.label)}.safetensors"


def _already_aligned(path: Path, record: dict) -> bool:
    side = path.with_suffix(".json")
    if not (path.exists() and side.exists()):
        return False
    try:
        return json.loads(side.read_text()).get("alignment") == record
    except ValueError:
        return False


def _write_aligned(
    path: Path, ing: Ingredient, aligned: dict[str, torch.Tensor], record: dict, to: str
) -> None:
    write_safetensors(path, ing.layout(), lambda n: aligned[n].contiguous())
    with atomic_file(path.with_suffix(".json")) as tmp:
        tmp.write_text(
            json.dumps(
                {"hyperparameters": ing.hyperparameters, "alignment": record, "aligned_to": to},
                indent=2,
            )
        )


def _align_merge_many(
    pool: list[Ingredient], spec: PermutationSpec, folder: Path, shape: dict, progress: bool
) -> list[str]:
    members = [ing.identity for ing in pool]
    paths = [_aligned_path(folder, i, ing) for i, ing in enumerate(pool)]
    records = [
        {"method": "merge_many", "source": ing.identity, "pool": members, **shape} for ing in pool
    ]
    if all(_already_aligned(p, r) for p, r in zip(paths, records, strict=True)):
        return [str(p) for p in paths]
    states = [_full(ing) for ing in pool]
    spec.sizes(states[0])  # checks the spec names real tensors of the right sizes
    aligned = merge_many(
        states,
        spec,
        max_rounds=shape["max_rounds"],
        max_iter=shape["max_iter"],
        seed=shape["seed"],
    )
    bar = stage_progress(pool, desc="writing aligned", unit="ingredient", enabled=progress)
    for i, ing in enumerate(bar):
        _write_aligned(paths[i], ing, aligned[i], records[i], "the mean of the others")
    return [str(p) for p in paths]


def _as_source(ing: Ingredient) -> Any:
    if ing.path is not None:
        return str(ing.path)
    return {n: ing.tensor(n) for n in ing.names()}
