"""Align a pool of checkpoints to one reference, writing aligned checkpoints to disk.

This is what ``align: true`` in a cook config and ``modelsoup align`` do: derive the
permutation spec (by tracing the model, or from a hand-written JSON spec), then permute
every ingredient's hidden units to line up with the reference ingredient (weight
matching, Ainsworth et al. 2023). Aligned checkpoints compute the same functions as
the originals; they are written as safetensors beside a ``<name>.json`` sidecar that
records what they were aligned to, so a re-run skips work already done.

Holds two models in memory at a time (the reference and the one being aligned).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modelsoup.errors import ConfigError
from modelsoup.formats.safetensors_io import atomic_file, write_safetensors
from modelsoup.ingredients import Ingredient, open_ingredients
from modelsoup.repair.matching import align_to
from modelsoup.repair.spec import PermutationSpec
from modelsoup.repair.trace import trace_permutation_spec


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
    checkpoint_key: str | None = None,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Align every ingredient to ``sources[reference]``; return paths to feed any recipe.

    Aligned copies go to ``<output>/aligned/``; the reference is returned as given.

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
    pool = open_ingredients(sources, key=checkpoint_key)
    if not 0 <= reference < len(pool):
        raise ConfigError(f"reference {reference} is not one of the {len(pool)} ingredients")
    if spec is None:
        if model is None or example is None:
            raise ConfigError("alignment needs a model and an example input, or a spec file")
        module = model if isinstance(model, torch.nn.Module) else model()
        spec = trace_permutation_spec(module.cpu().eval(), example_input(example))
    spec = load_spec(spec)
    folder = Path(output) / "aligned"
    ref = pool[reference]
    ref_sd = _full(ref)
    spec.sizes(ref_sd)  # checks the spec names real tensors of the right sizes
    out: list[str] = []
    bar = tqdm(pool, desc="aligning", unit="ingredient", disable=not progress)
    for i, ing in enumerate(bar):
        if i == reference:
            out.append(_as_source(ing))
            continue
        path = folder / f"{i:03d}-{ing.label}.safetensors"
        side = path.with_suffix(".json")
        record = {"source_sha256": ing.sha256, "reference_sha256": ref.sha256}
        if path.exists() and side.exists():
            try:
                if json.loads(side.read_text()).get("alignment") == record:
                    out.append(str(path))
                    continue
            except ValueError:
                pass
        aligned = align_to(ref_sd, _full(ing), spec, max_iter=max_iter, seed=seed)
        layout = ing.layout()
        write_safetensors(path, layout, lambda n, a=aligned: a[n].contiguous())
        with atomic_file(side) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "hyperparameters": ing.hyperparameters,
                        "alignment": record,
                        "aligned_to": ref.label,
                    },
                    indent=2,
                )
            )
        out.append(str(path))
    return out


def _as_source(ing: Ingredient) -> Any:
    if ing.path is not None:
        return str(ing.path)
    return {n: ing.tensor(n) for n in ing.names()}
