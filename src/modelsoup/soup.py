"""``Soup``: which ingredients went in, with what coefficients, and how they were chosen.

A soup is a recipe's answer, not a tensor blob: it keeps the ingredients (lazily
opened), one coefficient per ingredient (or per tensor and ingredient, for layer-wise
and learned-by-layer soups), the merge rule that mixes them (the weighted average by
default; see :mod:`modelsoup.merge`) with its base model, the recipe's options, a trace
of every step and its scores. Weights are made on demand, tensor by tensor:

- :meth:`Soup.apply` writes them into an existing module, in place;
- :meth:`Soup.state_dict` returns them as a dict;
- :meth:`Soup.save` streams them to disk with a soup card (see :mod:`modelsoup.writer`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelsoup._util import (
    check_output_path,
    check_replaceable,
    clean_stale_temps,
    output_lock,
    parse_dtype,
    refuse_overwrite,
    shares,
    write_error,
)
from modelsoup.accumulator import (
    check_accum_dtype,
    check_int_policy,
    check_same_ints,
    checked_float,
    is_finite,
    saturating_cast,
    widened,
    write_state_into,
)
from modelsoup.errors import ConfigError, SoupWarning
from modelsoup.formats.base import TensorMeta, TensorSource
from modelsoup.formats.dispatch import output_format
from modelsoup.formats.hf_folder import CARD_FORMAT
from modelsoup.formats.peft_adapter import (
    KEY_PREFIX,
    AdapterSource,
    lora_keys,
    refactor,
    shared_base,
    write_adapter,
)
from modelsoup.ingredients import (
    Ingredient,
    adapters_base,
    check_compatible,
    check_not_sharing,
    open_ingredient,
    warn_if_duplicated,
)
from modelsoup.merge import MergeSpec, as_merge, check_base, check_members, merged_pieces
from modelsoup.merge.registry import CACHE_ELEMENTS
from modelsoup.writer import FOLDER_CARD, sidecar_path, write_tensors

_logger = logging.getLogger(__name__)

#: elements mixed at a time when a soup is written (4 Mi: 16 MiB of float32 sum)
PIECE_ELEMENTS = 1 << 22


def check_coefficients(values: Sequence[float], count: int) -> list[float]:
    """Validate per-ingredient coefficients: right count, finite, >= 0, not all zero.

    Example:
        >>> check_coefficients([1, 2], 2)
        [1.0, 2.0]
    """
    try:
        if isinstance(values, str | bytes | Mapping):
            raise TypeError
        listed = list(values)
    except TypeError:
        raise ConfigError(
            f"weights are {type(values).__name__}; give a list of numbers, one per ingredient"
        ) from None
    values = [_weight(i, v) for i, v in enumerate(listed)]
    if len(values) != count:
        raise ConfigError(f"{len(values)} weights given for {count} ingredients; give one each")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ConfigError(f"weight {i + 1} is {v}; weights must be finite numbers")
        if v < 0:
            raise ConfigError(f"weight {i + 1} is {v}; weights must be >= 0")
    if not any(v > 0 for v in values):
        raise ConfigError("all weights are zero; give at least one ingredient a positive weight")
    return values


def _weight(i: int, v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"weight {i + 1} is {v!r}; weights must be numbers") from None


def _card_path(path: str | Path | None) -> str | None:
    """A card names its inputs by absolute path: read from any folder, it names the
    same files (a path relative to where the soup was made would not)."""
    return None if path is None else os.path.abspath(path)


@dataclass
class Soup:
    """A weighted average of ingredients, kept as a recipe until its weights are needed.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
        >>> soup = Soup(ings, [0.25, 0.75])
        >>> soup.state_dict()["w"]
        tensor([0.7500, 0.7500])
    """

    ingredients: list[Ingredient]
    coefficients: list[float]
    recipe: str = "weighted"
    options: dict = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    #: per-tensor coefficients that override ``coefficients`` (layer-wise, learned by layer)
    tensor_coefficients: dict[str, list[float]] | None = None
    accum_dtype: torch.dtype = torch.float32
    int_policy: str = "strict"
    #: tensors that replace the mix, e.g. BatchNorm statistics re-estimated after averaging
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the merge rule and its options (a name, a mapping ``{rule: ..., ...}`` or a spec)
    merge: MergeSpec | str | Mapping | None = None
    #: the base model (pretrained start) that task vectors are taken from
    base: Ingredient | None = None

    def __post_init__(self) -> None:
        self.coefficients = check_coefficients(self.coefficients, len(self.ingredients))
        if self.tensor_coefficients is not None:
            self.tensor_coefficients = self._checked_tensor_coefficients(self.tensor_coefficients)
        self.accum_dtype = check_accum_dtype(self.accum_dtype)
        check_int_policy(self.int_policy)
        self.merge = as_merge(self.merge)
        if self.base is not None:
            self.base = open_ingredient(self.base, label="base")
            check_compatible([self.base, self.ingredients[0]], warn_duplicates=False)
        elif self.merge.needs_base:
            self.base = adapters_base(self.ingredients)  # adapters carry their base
        check_base(self.merge, self.base)
        check_members(self.merge, len(self.chosen))

    def _checked_tensor_coefficients(self, given: Mapping) -> dict[str, list[float]]:
        # per tensor as for the whole soup: one weight per ingredient, finite, >= 0, not
        # all zero (a zero sum would write NaN); and only tensors the ingredients have
        if not isinstance(given, Mapping):
            raise ConfigError(
                f"tensor_coefficients is {type(given).__name__}; give a mapping of tensor "
                "name -> one weight per ingredient"
            )
        names = set(self.ingredients[0].names())
        checked = {}
        for name, values in given.items():
            if name not in names:
                raise ConfigError(
                    f"tensor_coefficients names '{name}', which the ingredients do not have"
                )
            try:
                checked[name] = check_coefficients(values, len(self.ingredients))
            except ConfigError as err:
                raise ConfigError(f"tensor_coefficients of '{name}': {err}") from None
        return checked

    @property
    def _lead(self) -> Ingredient:
        # the first ingredient in the soup: the dtype its floating tensors are written in
        chosen = self.chosen
        return self.ingredients[chosen[0] if chosen else 0]

    @property
    def chosen(self) -> list[int]:
        """Positions of the ingredients that take part (non-zero coefficient somewhere)."""
        used = {i for i, c in enumerate(self.coefficients) if c > 0}
        for coefs in (self.tensor_coefficients or {}).values():
            used.update(i for i, c in enumerate(coefs) if c > 0)
        return sorted(used)

    @property
    def size(self) -> int:
        """Number of ingredients in the soup."""
        return len(self.chosen)

    def coefficients_for(self, name: str) -> list[float]:
        """The per-ingredient coefficients used for tensor ``name``."""
        if self.tensor_coefficients and name in self.tensor_coefficients:
            return self.tensor_coefficients[name]
        return self.coefficients

    def layout(self, out_dtype: torch.dtype | str | None = None) -> dict[str, TensorMeta]:
        """Names, shapes and output dtypes of the soup's tensors.

        Floating tensors keep the dtype of the first ingredient in the soup (the first
        with a weight above 0) unless ``out_dtype`` is given; integer tensors always keep
        theirs.
        """
        out_dtype = parse_dtype(out_dtype)
        lay = self._lead.layout()
        if out_dtype is None:
            return lay
        return {n: TensorMeta(m.shape, out_dtype) if m.is_floating else m for n, m in lay.items()}

    def tensor(self, name: str, out_dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """Mix one tensor: read it from each chosen ingredient, sum in float32, cast.

        Writers use :meth:`pieces` instead, which holds a piece, not the whole tensor.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"w": torch.zeros(1)}, {"w": torch.ones(1)}])
            >>> Soup(ings, [1, 1]).tensor("w", "bf16")
            tensor([0.5000], dtype=torch.bfloat16)
        """
        meta = self._lead.meta(name)
        if name in self.overrides:
            # a copy: the caller may change what it gets, the soup stays as it is
            value = self.overrides[name].detach().clone()
            if (
                tuple(value.shape) != tuple(meta.shape)
                or value.is_floating_point() != meta.is_floating
            ):
                raise ConfigError(
                    f"the soup's replacement of tensor '{name}' is {tuple(value.shape)} "
                    f"{str(value.dtype).removeprefix('torch.')}, the ingredients' "
                    f"{tuple(meta.shape)} {str(meta.dtype).removeprefix('torch.')}"
                )
            if not meta.is_floating:
                return value
            if not is_finite(value):  # re-estimated statistics of NaN data, say
                raise ConfigError(
                    f"the soup's replacement of tensor '{name}' (BatchNorm recalibration?) "
                    "holds NaN or Inf values; recalibrate on finite data"
                )
            return saturating_cast(value, parse_dtype(out_dtype) or meta.dtype, name)
        used, total = self._mix_plan(name)
        if not meta.is_floating:
            first = self.ingredients[used[0][0]]
            value = first.tensor(name)
            if self.int_policy == "strict":
                for i, _ in used[1:]:
                    other = self.ingredients[i]
                    check_same_ints(name, value, other.tensor(name), first.label, other.label)
            return value.clone()
        if not self.merge.is_average:
            whole = _joined(self._merged(name, max(1, meta.numel)), meta.numel)
            return saturating_cast(
                whole.reshape(meta.shape), parse_dtype(out_dtype) or meta.dtype, name
            )
        base = self.adapter_base()
        if base is not None:
            flat = self._mix_changes(base, name, 0, meta.numel, used, total, buffer=False)
            return saturating_cast(
                flat.reshape(meta.shape), parse_dtype(out_dtype) or meta.dtype, name
            )
        acc = torch.zeros(meta.shape, dtype=self.accum_dtype)
        scratch = self._buffer("_read_buffer", meta.nbytes, torch.uint8)
        for i, c in used:
            acc.add_(widened(self.ingredients[i].tensor(name, scratch)), alpha=c)
        return saturating_cast(
            self._finish(name, acc, used, total), parse_dtype(out_dtype) or meta.dtype, name
        )

    def pieces(
        self,
        name: str,
        out_dtype: torch.dtype | str | None = None,
        *,
        max_elements: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Mix one tensor piece by piece: flat slices, in order, of ``max_elements`` or
        fewer (default :data:`PIECE_ELEMENTS`), so that writing a soup holds a few
        pieces, not its largest tensor.

        Each piece lives in buffers that the next one reuses: write it before asking for
        the next. Integer tensors and overrides come whole, as one flat piece.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"w": torch.zeros(5)}, {"w": torch.ones(5)}])
            >>> [p.tolist() for p in Soup(ings, [1, 1]).pieces("w", max_elements=2)]
            [[0.5, 0.5], [0.5, 0.5], [0.5]]
        """
        meta = self._lead.meta(name)
        if name in self.overrides or not meta.is_floating:
            yield self.tensor(name, out_dtype).reshape(-1)
            return
        dtype = parse_dtype(out_dtype) or meta.dtype
        step = max(1, int(max_elements or PIECE_ELEMENTS))
        if not self.merge.is_average:
            for piece in self._merged(name, step):
                yield saturating_cast(piece, dtype, name)
            return
        used, total = self._mix_plan(name)
        base = self.adapter_base()
        step = min(step, CACHE_ELEMENTS)  # the sum's piece stays in cache (merge.registry)
        for start in range(0, meta.numel, step):
            count = min(step, meta.numel - start)
            if base is not None:
                yield saturating_cast(
                    self._mix_changes(base, name, start, count, used, total), dtype, name
                )
                continue
            acc = self._buffer("_sum_buffer", count, self.accum_dtype)[:count].zero_()
            scratch = self._buffer("_read_buffer", count * meta.dtype.itemsize, torch.uint8)
            for i, c in used:
                piece = self.ingredients[i].tensor_range(name, start, count, scratch)
                acc.add_(widened(piece), alpha=c)
            yield saturating_cast(self._finish(name, acc, used, total), dtype, name)

    def adapter_base(self) -> TensorSource | None:
        """The one base of a soup of LoRA adapters (mixed as weight changes), else ``None``."""
        if "_base" not in self.__dict__:
            self.__dict__["_base"] = shared_base([ing.source for ing in self.ingredients])
        return self.__dict__["_base"]

    def changes(self, name: str) -> torch.Tensor:
        """The mixed weight change of tensor ``name`` in a soup of adapters over one base:
        ``sum_i c_i ΔW_i / sum_i c_i`` (accumulation dtype), never built from merged weights.

        Example:
            >>> from modelsoup.ingredients import open_ingredients
            >>> soup = Soup(open_ingredients([{"w": torch.ones(1)}]), [1])
            >>> try:
            ...     soup.changes("w")
            ... except ConfigError as err:
            ...     print(str(err)[:42])
            the soup's ingredients are not LoRA adapte
        """
        base = self.adapter_base()
        if base is None:
            raise ConfigError(
                "the soup's ingredients are not LoRA adapters over one base: they have no "
                "weight changes to mix"
            )
        meta = self.ingredients[0].meta(name)
        used, total = self._mix_plan(name)
        acc = torch.zeros(meta.numel, dtype=self.accum_dtype)
        for i, c in used:
            source = self.ingredients[i].source
            if source.changed(name):
                acc.add_(source.delta_range(name, 0, meta.numel, self.accum_dtype), alpha=c)
        return self._finish(name, acc, used, total).reshape(meta.shape)

    def _mix_changes(
        self,
        base: TensorSource,
        name: str,
        start: int,
        count: int,
        used: list[tuple[int, float]],
        total: float,
        *,
        buffer: bool = True,
    ) -> torch.Tensor:
        # Adapters over one base: the base plus the mixed changes, so the soup is the soup
        # of the merged models; a tensor no chosen adapter changes is the base's, exactly.
        share = sum(c for _, c in used) / total  # 1 unless normalize=False
        changed = [(i, c) for i, c in used if self.ingredients[i].source.changed(name)]
        if not changed and share == 1.0:
            return base.tensor_range(name, start, count).clone()
        if buffer:
            acc = self._buffer("_sum_buffer", count, self.accum_dtype)[:count].zero_()
        else:
            acc = torch.zeros(count, dtype=self.accum_dtype)
        for i, c in changed:
            delta = self.ingredients[i].source.delta_range(name, start, count, self.accum_dtype)
            acc.add_(delta, alpha=c)
        acc = self._finish(name, acc, used, total)
        return acc.add_(widened(base.tensor_range(name, start, count)), alpha=share)

    def _merged(self, name: str, step: int) -> Iterator[torch.Tensor] | list[torch.Tensor]:
        # a merge rule other than the plain average: members' pieces, mixed by the rule
        used, total = self._mix_plan(name)
        meta = self.ingredients[0].meta(name)
        if meta.numel == 0:
            return []
        members = [(i, self.ingredients[i], c / total) for i, c in used]
        pieces = merged_pieces(
            self.merge,
            name,
            meta,
            members,
            self.base,
            step=step,
            accum_dtype=self.accum_dtype,
        )
        if name.endswith("running_var") and name not in self.overrides:
            return _said_if_negative(name, pieces, self.merge)
        return pieces

    def _mix_plan(self, name: str) -> tuple[list[tuple[int, float]], float]:
        # (position, coefficient) of every ingredient in this tensor, and what to divide by
        used = [(i, c) for i, c in enumerate(self.coefficients_for(name)) if c > 0]
        if not self.options.get("normalize", True):
            big = next((c for _, c in used if c > torch.finfo(self.accum_dtype).max), None)
            if big is not None:
                raise ConfigError(
                    f"weight {big:g} is too large for a {self.accum_dtype} sum without "
                    "normalizing; scale the weights down or let them be normalized"
                )
            return used, 1.0
        # Normalized weights only matter relative to each other: ones far from 1 (1e-50,
        # 1e39) are scaled by a power of two, exactly, so that float32 neither rounds them
        # to 0 nor overflows on them; weights near 1 are used as given, bit for bit.
        exponent = math.frexp(max((c for _, c in used), default=1.0))[1]
        if not -_SCALE_EXPONENT <= exponent <= _SCALE_EXPONENT:
            used = [(i, math.ldexp(c, -exponent)) for i, c in used]
        return used, sum(c for _, c in used)

    def _finish(
        self, name: str, acc: torch.Tensor, used: list[tuple[int, float]], total: float
    ) -> torch.Tensor:
        if not is_finite(acc):
            # Rare: find the ingredient to blame (the sum may also just have overflowed).
            for i, _ in used:
                ing = self.ingredients[i]
                checked_float(ing.tensor(name), name, ing.label)
            raise ConfigError(
                f"tensor '{name}': the weighted sum overflows {self.accum_dtype}; "
                "use accum_dtype float64"
            )
        if total != 1.0:
            acc.div_(total)  # sum first, divide once: one rounding instead of one per term
        return acc

    def _buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        # Buffers kept per soup and grown to the largest tensor: no allocation per tensor.
        buf = self.__dict__.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            self.__dict__[key] = None  # free the old one before allocating the new
            buf = torch.empty(numel, dtype=dtype)
            self.__dict__[key] = buf
        return buf

    def state_dict(self, out_dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """All the soup's tensors in a dict (holds the whole soup in memory)."""
        return {n: self.tensor(n, out_dtype) for n in self.ingredients[0].names()}

    def apply(self, module: torch.nn.Module) -> torch.nn.Module:
        """Write the soup's weights into ``module`` in place and return it.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
            >>> soup = Soup(open_ingredients([a, b]), [1, 1])
            >>> m = soup.apply(torch.nn.Linear(2, 1))
            >>> torch.allclose(m.bias, (a.bias + b.bias) / 2)
            True
        """
        check_not_sharing(module, [*self.ingredients, self.base], "the module to apply the soup to")
        lay = self.ingredients[0].layout()

        def in_pieces(name: str, dest: torch.Tensor) -> bool:
            # mixed piece by piece straight into the module: no whole-tensor sum in memory
            if not dest.is_contiguous():
                return False
            flat, at = dest.view(-1), 0
            for piece in self.pieces(name):
                flat[at : at + piece.numel()].copy_(saturating_cast(piece, dest.dtype, name))
                at += piece.numel()
            return True

        write_state_into(module, self.tensor, lay, direct=in_pieces, ingredients=self.ingredients)
        return module

    def save(self, out: str | Path, **kwargs) -> Path:
        """Stream the soup to ``out`` with its card; see :func:`save_soup`."""
        return save_soup(self, out, **kwargs)

    def describe_coefficients(self) -> list[dict]:
        """One entry per ingredient: label, path, sha256 and coefficient (for cards/reports)."""
        normalize = self.options.get("normalize", True)
        # shares: weights whose plain sum overflows (1e308, 1e308) are recorded as 0.5
        given = shares(self.coefficients) if normalize else self.coefficients
        rows = []
        for ing, c in zip(self.ingredients, given):
            rows.append(
                {
                    "label": ing.label,
                    "path": _card_path(ing.path),
                    "sha256": ing.sha256,
                    **_read_key(ing),
                    "coefficient": c,
                    "hyperparameters": ing.hyperparameters,
                }
            )
        return rows

    def with_scores(self, scores: Mapping[str, float]) -> Soup:
        """Record scores (e.g. ``held_out``, ``test``) and return the soup."""
        self.scores.update(scores)
        return self


def _read_key(ing: Ingredient) -> dict:
    # which of a pickle's models was read (its weights or their EMA): a card with only the
    # file's hash would not say
    key = ing.source.read_key
    if key is None:
        return {}
    return {
        "checkpoint_key": key,
        **({"checkpoint_key_given": True} if ing.source.key_given else {}),
    }


def card_path(out: str | Path) -> Path:
    """Where the soup card of ``out`` goes: ``<out>.json`` beside a file, or
    ``soup_card.json`` inside a folder output (so copying the folder keeps it).

    Example:
        >>> card_path(Path("soups/greedy.safetensors"))
        PosixPath('soups/greedy.safetensors.json')
    """
    return sidecar_path(Path(out))


def _said_if_negative(
    name: str, pieces: Iterable[torch.Tensor], merge: MergeSpec
) -> Iterator[torch.Tensor]:
    # A rule on task vectors (task arithmetic, DARE, TIES, WiSE-FT) moves a BatchNorm
    # running variance like a weight, and can take it below zero: the model then
    # computes NaN until its statistics are re-estimated.
    said = False
    for piece in pieces:
        if not said and bool((piece < 0).any()):
            said = True
            warnings.warn(
                f"tensor '{name}', a BatchNorm running variance, has negative entries "
                f"after {merge.describe()}: the model computes NaN until its statistics "
                "are re-estimated; recalibrate the soup (--recalibrate-bn, recalibrate=) "
                "or use the linear rule",
                SoupWarning,
                stacklevel=3,
            )
        yield piece


def protected_paths(soup: Soup | Sequence[Ingredient]) -> set[Path]:
    """Input files and folders (and hyperparameter sidecars) of a soup (its base
    included), or of a pool of ingredients, that no output may replace."""
    paths: set[Path] = set()
    if isinstance(soup, Soup):
        inputs = [*soup.ingredients, *([soup.base] if soup.base is not None else [])]
    else:
        inputs = list(soup)
    for ing in inputs:
        for f in ing.files:
            paths.add(f.resolve())
            paths.add(f.with_suffix(".json").resolve())
        paths.update(folder.resolve() for folder in ing.source.folders)
        if ing.path is not None:
            paths.add(ing.path.resolve())
    return paths


#: normalized weights whose largest is within 2**±this are used as given (_mix_plan)
_SCALE_EXPONENT = 60


def check_not_input(soup: Soup | Sequence[Ingredient], out: Path) -> None:
    """Refuse an output path that is, contains or sits inside any ingredient (of a soup,
    or of a pool of ingredients: a cook's output folder is checked before it starts).

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> check_not_input(Soup(open_ingredients([{"w": torch.ones(1)}]), [1]), Path("x.pt"))
    """
    protected = protected_paths(soup)
    for target in (out, card_path(out)):
        refuse_overwrite(target, protected, shown=out)


def soup_card(soup: Soup, out_dtype: torch.dtype | None = None) -> dict:
    """The soup card: everything needed to know, and redo, how the soup was made.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> card = soup_card(Soup(open_ingredients([{"w": torch.ones(1)}]), [1]))
        >>> card["recipe"], card["ingredients"][0]["coefficient"]
        ('weighted', 1.0)
    """
    card = {
        "format": CARD_FORMAT,
        "recipe": soup.recipe,
        "options": soup.options,
        "ingredients": soup.describe_coefficients(),
        "chosen": [soup.ingredients[i].label for i in soup.chosen],
        "dtype_policy": {
            "accumulate": str(soup.accum_dtype).replace("torch.", ""),
            "output": str(out_dtype).replace("torch.", "") if out_dtype else "as ingredient",
            # the floating dtypes the soup's tensors were written in (mergekit's out_dtype)
            "written": sorted(
                {
                    str(m.dtype).replace("torch.", "")
                    for m in soup.layout(out_dtype).values()
                    if m.is_floating
                }
            ),
            "integers": f"copied from the first ingredient ({soup.int_policy})",
        },
        "scores": soup.scores,
        "trace": soup.trace,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"modelsoup": library_version(), "torch": torch.__version__},
    }
    if soup.tensor_coefficients:
        card["tensor_coefficients"] = soup.tensor_coefficients
    card["merge"] = soup.merge.canonical()
    if soup.base is not None:
        base = soup.base
        card["base"] = {
            "label": base.label,
            "path": _card_path(base.path),
            "sha256": base.sha256,
            **_read_key(base),
        }
    return card


def library_version() -> str:
    """modelsoup's installed version (from the package metadata).

    Example:
        >>> library_version().count(".") >= 1
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelsoup")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _joined(pieces: Iterable[torch.Tensor], numel: int) -> torch.Tensor:
    # one flat tensor from flat pieces that may share buffers (each copied as it comes)
    pieces = iter(pieces)
    first = next(pieces, None)
    if first is None:
        return torch.empty(0)
    if first.numel() == numel:
        return first
    whole = torch.empty(numel, dtype=first.dtype)
    whole[: first.numel()].copy_(first)
    at = first.numel()
    for piece in pieces:
        whole[at : at + piece.numel()].copy_(piece)
        at += piece.numel()
    return whole


def save_soup(
    soup: Soup,
    out: str | Path,
    *,
    out_dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = True,
    adapter_rank: int | None = None,
    merge_into_base: bool = False,
) -> Path:
    """Stream ``soup`` to ``out`` (format from the suffix) with its soup card.

    A soup of LoRA adapters over one base is written as an adapter folder (see
    :func:`save_adapter_soup`, ``adapter_rank``), or with ``merge_into_base=True`` as
    the merged full model, in the base's format and with the base's config files.
    ``max_shard_size`` (default 5GB) splits a folder output into shards; any other
    output is one file, so giving it there is refused rather than ignored.

    While it writes, ``out`` is locked (:func:`modelsoup._util.output_lock`): a second
    process writing the same output fails at once with a clear error.

    Example:
        >>> import tempfile, torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> soup = Soup(open_ingredients([{"w": torch.zeros(1)}, {"w": torch.ones(1)}]), [1, 1])
        >>> out = save_soup(soup, Path(tempfile.mkdtemp()) / "s.safetensors", progress=False)
        >>> card_path(out).exists()
        True
    """
    out = check_output_path(out)
    adapter = soup.adapter_base() is not None and not merge_into_base
    if max_shard_size is not None and (adapter or output_format(out) != "folder"):
        what = (
            "a LoRA adapter soup, whose adapter file is written whole"
            if adapter
            else "one file; it applies only to a model folder output (a path without a suffix)"
        )
        raise ConfigError(
            f"{out}: max_shard_size (--max-shard-size) cannot shard {what}; leave it out"
        )
    if adapter:
        return save_adapter_soup(soup, out, rank=adapter_rank, out_dtype=out_dtype)
    if adapter_rank is not None:
        raise ConfigError(
            "--adapter-rank applies only to a soup of LoRA adapters written as an adapter"
        )
    dtype = parse_dtype(out_dtype)
    check_not_input(soup, out)
    first = soup.ingredients[soup.chosen[0]]
    home = first.source.base_path if isinstance(first.source, AdapterSource) else first.path
    copy_from = home if home is not None and home.is_dir() else None
    with output_lock(out):
        clean_stale_temps(out.parent, only=out.name)

        def card_text() -> str:  # after the weights: their reads computed the hashes
            return json.dumps(soup_card(soup, dtype), indent=2, default=str)

        write_tensors(
            out,
            soup.layout(dtype),
            lambda n: soup.pieces(n, dtype),
            sidecar=card_text,
            metadata={"format": _tensor_format(soup), "modelsoup.recipe": soup.recipe},
            max_shard_size=max_shard_size or "5GB",
            copy_from=copy_from,
            torch_dtype=dtype,
            lightning=getattr(first.source, "lightning", None),
            progress=progress,
        )
    if output_format(out) == "folder" and not (copy_from and (copy_from / "config.json").is_file()):
        warnings.warn(
            f"{out}: written as a Hugging Face style folder without config.json ("
            f"{first.label} has none), so from_pretrained cannot load it; copy the base "
            "model's config.json into it, or write a .safetensors file instead",
            SoupWarning,
            stacklevel=2,
        )
    # Hashes are free now: streaming the soup read every chosen file front to back.
    warn_if_duplicated([soup.ingredients[i] for i in soup.chosen], by_content=True)
    return out


def _tensor_format(soup: Soup) -> str:
    # the safetensors "format" the chosen ingredients were saved with (transformers reads
    # a "flax" or "tf" file's names and layouts as that framework's), "pt" unless they agree
    # on another
    tags = {
        getattr(soup.ingredients[i].source, "metadata", {}).get("format", "pt") for i in soup.chosen
    }
    return tags.pop() if len(tags) == 1 else "pt"


def _stacked_factors(soup: Soup, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # The mixed change of one LoRA module as one product: sum_i w_i s_i B_i @ A_i is
    # [w_1 s_1 B_1, ..., w_k s_k B_k] @ [A_1; ...; A_k]
    used, total = soup._mix_plan(name)
    lefts, rights = [], []
    for i, c in used:
        source = soup.ingredients[i].source
        if name in source.lora:
            a, b = source.lora_factors(name, soup.accum_dtype)
            lefts.append(b * (c / total * source.lora[name].scaling))
            rights.append(a)
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)


def _base_name(adapters: Sequence[AdapterSource]) -> str:
    # The hub name the adapters agree on (their base was given locally with --base), or
    # the local base folder, absolute, so the adapter loads from anywhere on this machine.
    named = adapters[0].base_name
    # local as given, or relative to an adapter's folder (as resolve_base reads it): a
    # relative name would point elsewhere from the soup's folder
    local = isinstance(named, str) and any(
        p.exists() for a in adapters for p in (Path(named).expanduser(), a.folder / named)
    )
    if named and not local and all(a.base_name == named for a in adapters):
        return named
    return str(adapters[0].base_path.resolve())


def check_adapter_merge(merge: MergeSpec) -> None:
    """Refuse a merge rule other than the weighted average for a soup written as a LoRA
    adapter: the adapter holds the average of the adapters' changes, re-factored.

    Example:
        >>> check_adapter_merge(as_merge("linear"))
        >>> try:
        ...     check_adapter_merge(as_merge({"rule": "ties", "density": 0.5}))
        ... except ConfigError as err:
        ...     print(str(err)[-55:])
        write it with --merge-into-base (merge_into_base: true)
    """
    if not merge.is_average:
        raise ConfigError(
            "a LoRA adapter soup holds the weighted average of the adapters' changes, not a "
            f"merge by {merge.describe()}: write it with --merge-into-base "
            "(merge_into_base: true)"
        )


def save_adapter_soup(
    soup: Soup,
    out: str | Path,
    *,
    rank: int | None = None,
    out_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a soup of LoRA adapters as a PEFT adapter folder that ``PeftModel.from_pretrained``
    loads over the same base.

    Each target module's mixed weight change (:meth:`Soup.changes`) is re-factored by
    truncated SVD to ``rank`` (default: the largest rank of the ingredients), exactly and
    without forming it, from the adapters' stacked factors
    (:func:`~modelsoup.formats.peft_adapter.refactor`), with
    ``lora_alpha = rank``, so the factors carry the scale themselves. Tensors an adapter
    saves in full (``modules_to_save``) are written in full. The relative reconstruction
    error ``||ΔW - B A||_F / ||ΔW||_F`` over all target modules is logged and kept in the
    soup card (``adapter.relative_error``); a rank of at least the sum of the ingredients'
    ranks makes it zero (up to rounding).

    Example:
        >>> from modelsoup.ingredients import open_ingredients
        >>> try:
        ...     save_adapter_soup(Soup(open_ingredients([{"w": torch.ones(1)}]), [1]), "x")
        ... except ConfigError as err:
        ...     print(str(err)[:42])
        the soup's ingredients are not LoRA adapte
    """
    out = check_output_path(out)
    base = soup.adapter_base()
    if base is None:
        soup.changes("")  # raises the error that says why
    if output_format(out) != "folder":
        raise ConfigError(
            f"{out}: a soup of LoRA adapters is written as an adapter folder; give a folder "
            "path, or --merge-into-base to write the merged model there"
        )
    if not soup.options.get("normalize", True) or soup.overrides:
        what = "replaced tensors" if soup.overrides else "unnormalised weights"
        raise ConfigError(
            f"a soup of adapters with {what} is not base + a weight change: write it with "
            "--merge-into-base"
        )
    check_adapter_merge(soup.merge)
    check_not_input(soup, out)
    check_replaceable(out, FOLDER_CARD)  # before the re-factoring, not after
    chosen = [soup.ingredients[i].source for i in soup.chosen]
    biased = next((s for s in chosen if s.config.get("bias", "none") != "none"), None)
    if biased is not None:
        raise ConfigError(
            f"{biased.label} was trained with PEFT bias='{biased.config['bias']}', whose "
            "biases an adapter soup cannot carry yet: write the soup with --merge-into-base"
        )
    rank = int(rank) if rank is not None else max(r for s in chosen for r in s.ranks() or {1})
    if rank < 1:
        raise ConfigError(f"adapter rank {rank} must be a positive integer")
    dtype = parse_dtype(out_dtype)
    lora: dict[str, object] = {}
    full: set[str] = set()
    for source in chosen:
        full.update(source.full)
        for name, mod in source.lora.items():
            seen = lora.setdefault(name, mod)
            if (seen.transposed, seen.kind) != (mod.transposed, mod.kind):
                raise ConfigError(
                    f"'{name}' is a {mod.kind} LoRA module in {source.label} but a "
                    f"{seen.kind} one (or with another fan_in_fan_out) in another adapter"
                )
    tensors: dict[str, torch.Tensor] = {}
    cut = whole = 0.0
    for name in base.names():
        if name in full:
            factor_dtype = dtype or base.meta(name).dtype
            tensors[KEY_PREFIX + name] = soup.tensor(name, factor_dtype)
        elif name in lora:
            mod = lora[name]
            a, b, lost, total = refactor(*_stacked_factors(soup, name), rank)
            cut, whole = cut + lost, whole + total
            owner = next(s for s in chosen if name in s.lora)
            factor_dtype = dtype or owner.factors.meta(mod.key_a).dtype
            key_a, key_b = lora_keys(name.removesuffix(".weight"), mod.kind)
            tensors[key_a], tensors[key_b] = a.to(factor_dtype), b.to(factor_dtype)
    error = math.sqrt(cut / whole) if whole > 0 else 0.0
    targets = sorted(n.removesuffix(".weight") for n in lora if n not in full)
    first = chosen[0]
    inputs = [s.config.get("target_modules") for s in chosen]
    same = all(t == inputs[0] for t in inputs) and not (full & set(lora))
    config = {
        **first.config,
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": inputs[0] if same and inputs[0] else targets,
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in full}) or None,
        "fan_in_fan_out": any(m.transposed and m.kind == "linear" for m in lora.values()),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": _base_name(chosen),
    }
    _logger.info(
        "adapter soup re-factored to rank %d: relative reconstruction error %.3g "
        "(Frobenius, over %d target modules)",
        rank,
        error,
        len(targets),
    )
    if error > 0.05:
        warnings.warn(
            f"the adapter soup at rank {rank} misses {error:.1%} of the mixed weight change; "
            f"--adapter-rank {sum(max(s.ranks() or {0}) for s in chosen)} (the sum of the "
            "adapters' ranks) loses nothing, and --merge-into-base writes the merged model",
            SoupWarning,
            stacklevel=2,
        )
    card = soup_card(soup, dtype)
    card["adapter"] = {
        "rank": rank,
        "lora_alpha": rank,
        "relative_error": error,
        "target_modules": len(targets),
        "full_tensors": sorted(full),
        "base": str(first.base_path),
    }
    with output_lock(out):
        clean_stale_temps(out.parent, only=out.name)
        try:
            card_text = json.dumps(card, indent=2, default=str)
            write_adapter(out, config, tensors, {FOLDER_CARD: card_text})
        except OSError as err:  # a full disk while writing the weights or the card
            raise write_error(out, err) from err
    return out
