"""The running weighted sum behind every soup.

``Accumulator`` keeps one float32 (or float64) sum per floating tensor and the total
weight of each ingredient in it. Adding or removing an ingredient is one pass over its
tensors, read one at a time; the mean is then written into an existing module in
place. Greedy and pruned soups move from one candidate to the next this way, never by
re-averaging or building a new model. Memory: one model-sized float32 sum, whatever
the number of ingredients.

LoRA adapters over one base (:mod:`modelsoup.formats.peft_adapter`) are summed as weight
changes: only the tensors some adapter changes have a sum, of ΔW, and the base is added
when the mean is written. The base is never accumulated into, so tasting any number of
candidates leaves no drift in it: every tensor no adapter changes is written as the
base's, bit for bit.

Integer and bool tensors (``num_batches_tracked``, ``position_ids``) are never
averaged: they are taken from the first ingredient, and with ``int_policy="strict"``
(the default) an ingredient whose integer tensors differ is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from modelsoup.errors import (
    ConfigError,
    IncompatibleIngredientsError,
    IngredientError,
    SoupWarning,
)
from modelsoup.formats.base import TensorMeta
from modelsoup.formats.peft_adapter import shared_base
from modelsoup.ingredients import Ingredient, check_same_ints

INT_POLICIES = ("strict", "first")
ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def warn_lost_precision(layout: Mapping[str, TensorMeta], accum_dtype: torch.dtype) -> None:
    """Warn when float64 tensors are to be summed in float32: the soup would keep only
    float32's precision, though it is written back as float64.

    Example:
        >>> warn_lost_precision({"w": TensorMeta((2,), torch.float32)}, torch.float32)
    """
    if accum_dtype != torch.float32:
        return
    wide = next((n for n, m in layout.items() if m.dtype == torch.float64), None)
    if wide is not None:
        warnings.warn(
            f"float64 tensors (e.g. '{wide}') are summed in float32, so the soup keeps only "
            "float32's precision; pass accum_dtype='float64' (--accum-dtype float64) to "
            "keep theirs",
            SoupWarning,
            stacklevel=3,
        )


def check_accum_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: float32 or float64, by name or as a torch dtype
    (a half-precision sum would lose the soup's precision).

    Example:
        >>> check_accum_dtype("float64"), check_accum_dtype(torch.float32)
        (torch.float64, torch.float32)
    """
    if isinstance(dtype, torch.dtype) and dtype in ACCUM_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in ACCUM_DTYPES:
        return ACCUM_DTYPES[dtype]
    shown = str(dtype).removeprefix("torch.")
    raise ConfigError(f"accumulation dtype '{shown}' is unknown; use float32 or float64")


def check_int_policy(policy: str) -> str:
    """Validate an ``int_policy`` value.

    Example:
        >>> check_int_policy("first")
        'first'
    """
    if policy not in INT_POLICIES:
        raise ConfigError(f"int policy '{policy}' is unknown; use one of {', '.join(INT_POLICIES)}")
    return policy


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the 8-bit floats (``float8_e4m3fn``, ``float8_e5m2``, ...).

    Example:
        >>> import torch
        >>> is_fp8(torch.float8_e4m3fn), is_fp8(torch.bfloat16), is_fp8(torch.uint8)
        (True, False, False)
    """
    return dtype.is_floating_point and dtype.itemsize == 1


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` ready for arithmetic: fp8 tensors, which torch does not promote, as float32;
    any other tensor as it is.

    Example:
        >>> import torch
        >>> widened(torch.tensor([1.5]).to(torch.float8_e4m3fn))
        tensor([1.5000])
    """
    return t.float() if is_fp8(t.dtype) else t


def saturating_cast(t: torch.Tensor, dtype: torch.dtype, name: str | None = None) -> torch.Tensor:
    """``t`` cast to ``dtype``; to an fp8 dtype, clamped to its finite range first.

    fp8 ranges are narrow (448 for ``float8_e4m3fn``): a mean just above the largest
    value, or a sum that is not divided back, would otherwise cast to Inf or NaN. Any
    other narrower float dtype refuses finite values it would turn into Inf, naming
    tensor ``name``: a soup is never written with infinities its inputs did not have.

    Example:
        >>> import torch
        >>> saturating_cast(torch.tensor([1e6, -1.0]), torch.float8_e5m2).tolist()
        [57344.0, -1.0]
        >>> saturating_cast(torch.tensor([1e6]), torch.float16, "w")
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: tensor 'w': values up to 1e+06 overflow float16 ...
    """
    if t.dtype == dtype:
        return t
    if is_fp8(dtype):
        top = torch.finfo(dtype).max
        return t.clamp(-top, top).to(dtype)
    out = t.to(dtype)
    narrower = (
        dtype.is_floating_point
        and t.dtype.is_floating_point
        and torch.finfo(dtype).max < torch.finfo(t.dtype).max
    )
    if narrower and not is_finite(out) and is_finite(t):
        what = f"tensor '{name}': " if name else ""
        wider = "fp64" if torch.finfo(dtype).bits >= 32 else "fp32"
        raise ConfigError(
            f"{what}values up to {float(t.abs().max()):.3g} overflow "
            f"{str(dtype).removeprefix('torch.')} (largest {torch.finfo(dtype).max:.3g}): "
            f"write the soup in a wider dtype (--out-dtype {wider})"
        )
    return out


def is_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, with one reduction in the common case.

    A NaN or Inf anywhere makes the sum non-finite; only then (or if the sum merely
    overflowed) is the tensor checked element by element.

    Example:
        >>> import torch
        >>> is_finite(torch.ones(3)), is_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    t = widened(t)
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def checked_float(t: torch.Tensor, name: str, label: str) -> torch.Tensor:
    """Refuse a tensor holding NaN or Inf: one such value would poison every soup it enters.

    Example:
        >>> import torch
        >>> checked_float(torch.ones(2), "w", "a").sum().item()
        2.0
    """
    if not is_finite(t):
        bad = "NaN" if bool(torch.isnan(widened(t)).any()) else "Inf"
        fix = (
            "give the pretrained start the ingredients were fine-tuned from"
            if label == "base"
            else "remove this checkpoint from the soup"
        )
        raise IngredientError(
            f"{label}: tensor '{name}' contains {bad} values (diverged training?); {fix}"
        )
    return t


class Accumulator:
    """A running weighted sum of ingredients, addressed by position.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> ings = open_ingredients([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
        >>> acc = Accumulator(ings)
        >>> acc.add(0); acc.add(1)
        >>> acc.mean("w")
        tensor([0.5000, 0.5000])
        >>> acc.remove(0)
        >>> acc.mean("w")
        tensor([1., 1.])
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        *,
        accum_dtype: torch.dtype = torch.float32,
        int_policy: str = "strict",
        device: str | torch.device | None = None,
    ):
        self.ingredients = list(ingredients)
        self.accum_dtype = check_accum_dtype(accum_dtype)
        #: where the running sum lives: the evaluated module's device, so candidates are
        #: mixed where the model is and written into it without a host round trip
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.int_policy = check_int_policy(int_policy)
        self.layout = self.ingredients[0].layout()
        warn_lost_precision(self.layout, self.accum_dtype)
        self.float_names = [n for n, m in self.layout.items() if m.is_floating]
        #: adapters over one base: their changes are summed, and the base added on writing
        self.base = shared_base([ing.source for ing in self.ingredients])
        if self.base is not None:
            srcs = [ing.source for ing in self.ingredients]
            self.float_names = [n for n in self.float_names if any(s.changed(n) for s in srcs)]
        self.int_names = [n for n, m in self.layout.items() if not m.is_floating]
        self._sum = {
            n: torch.zeros(self.layout[n].shape, dtype=accum_dtype, device=self.device)
            for n in self.float_names
        }
        first = self.ingredients[0]
        self._ints = {n: first.tensor(n).clone() for n in self.int_names}
        self._checked = {0}
        self._finite: set[int] = set()  # positions whose tensors were checked for NaN/Inf
        # ingredients are read into one host buffer, pinned when the sum is on a GPU (a
        # faster copy to the device)
        self._scratch = torch.empty(
            max((self.layout[n].nbytes for n in self.float_names), default=0),
            dtype=torch.uint8,
            pin_memory=self.device.type == "cuda",
        )
        self.weights = [0.0] * len(self.ingredients)
        #: one ingredient read ahead (:meth:`stage`): its position and summable tensors
        self._staged_position: int | None = None
        self._staged: dict[str, torch.Tensor] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)

    @property
    def total(self) -> float:
        """Sum of the weights currently in the soup."""
        return sum(self.weights)

    def members(self) -> list[int]:
        """Positions with a non-zero weight."""
        return [i for i, w in enumerate(self.weights) if w > 0]

    def _read(self, position: int, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        # what is summed (on the host): the tensor, widened, or an adapter's change to it
        if position == self._staged_position:
            return self._staged[name]
        ing = self.ingredients[position]
        if self.base is not None:
            return ing.source.delta(name, self.accum_dtype)
        return widened(ing.tensor(name, self._scratch if buffer is None else buffer))

    def staging_bytes(self) -> int:
        """Host memory :meth:`stage` holds: one ingredient's summed tensors (in the
        ingredients' dtype; adapters' changes and fp8 tensors in the sum's dtype).

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"w": torch.zeros(4, dtype=torch.float16)}])
            >>> Accumulator(ings).staging_bytes()
            8
        """
        wide = torch.empty((), dtype=self.accum_dtype).element_size()
        total = 0
        for n in self.float_names:
            meta = self.layout[n]
            widen = self.base is not None or is_fp8(meta.dtype)
            total += meta.numel * wide if widen else meta.nbytes
        return total

    def stage(self, position: int) -> None:
        """Read ingredient ``position`` ahead, into the staging buffer, so that the next
        :meth:`add`, :meth:`remove` or :meth:`write_into_with` of it reads nothing.

        The taster calls it on a background thread while the evaluator scores the
        current candidate; sums are unchanged (the same tensors, read earlier). The
        caller must not use the accumulator until it returns. What was staged before is
        dropped: one ingredient is staged at a time.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> acc = Accumulator(open_ingredients([{"w": torch.zeros(2)}, {"w": torch.ones(2)}]))
            >>> acc.stage(1); acc.add(1); acc.mean("w")
            tensor([1., 1.])
        """
        self._staged_position, self._staged = None, {}
        if self.base is None and self._staging.numel() < self.staging_bytes():
            self._staging = torch.empty(
                self.staging_bytes(), dtype=torch.uint8, pin_memory=self.device.type == "cuda"
            )
        staged, offset = {}, 0
        for n in self.float_names:
            piece = self._staging[offset:]
            t = self._read(position, n, piece)
            if t.data_ptr() == piece.data_ptr():  # read into the buffer: keep its bytes
                offset += t.numel() * t.element_size()
            staged[n] = t
        self._staged, self._staged_position = staged, position

    def _check_ints(self, position: int) -> None:
        if self.int_policy == "strict" and position not in self._checked:
            ing, first = self.ingredients[position], self.ingredients[0]
            for n in self.int_names:
                check_same_ints(n, self._ints[n], ing.tensor(n), first.label, ing.label)
            self._checked.add(position)

    def add(self, position: int, weight: float = 1.0) -> None:
        """Add ``weight`` times ingredient ``position`` to the sum (one pass over it)."""
        if weight <= 0:
            raise ConfigError(f"weight {weight} must be > 0")
        self._check_ints(position)
        ing = self.ingredients[position]
        check = position not in self._finite
        for n in self.float_names:
            t = self._read(position, n)
            if check:
                checked_float(t, n, ing.label)
            self._sum[n].add_(self._here(t), alpha=weight)  # promotes to the sum's dtype
        self._finite.add(position)
        self.weights[position] += weight

    def remove(self, position: int, weight: float | None = None) -> None:
        """Take ingredient ``position`` (all of it by default) back out of the sum."""
        have = self.weights[position]
        weight = have if weight is None else weight
        if weight <= 0 or weight > have * (1 + 1e-9):
            raise ConfigError(
                f"cannot remove weight {weight} of {self.ingredients[position].label}"
                f": it has {have} in the soup"
            )
        self.weights[position] = max(0.0, have - weight)
        if self.total == 0:
            # Nothing left: zero exactly rather than keep float rounding residue.
            for t in self._sum.values():
                t.zero_()
            return
        for n in self.float_names:
            self._sum[n].sub_(self._here(self._read(position, n)), alpha=weight)

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        """An ingredient tensor (read into the host buffer) on the sum's device."""
        if t.device == self.device:
            return t
        # A blocking copy: the next read overwrites the host buffer from the CPU side,
        # which no CUDA stream orders after an asynchronous copy.
        return t.to(self.device)

    def _base_here(self, name: str) -> torch.Tensor:
        # the adapters' shared base tensor, ready to add to the mixed change
        return self._here(widened(self.base.tensor(name)))

    def set_weights(self, target: Sequence[float]) -> None:
        """Move to the soup with these per-position weights, touching only what changes.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> acc = Accumulator(open_ingredients([{"w": torch.zeros(1)}, {"w": torch.ones(1)}]))
            >>> acc.set_weights([1, 3]); acc.mean("w")
            tensor([0.7500])
        """
        if len(target) != len(self.weights):
            raise ConfigError(f"{len(target)} weights given for {len(self.weights)} ingredients")
        if not any(w > 0 for w in target):
            raise ConfigError("a soup needs at least one ingredient with a positive weight")
        changes = sum(1 for i, w in enumerate(target) if w != self.weights[i])
        members = sum(1 for w in target if w > 0)
        if members <= changes:
            # Rebuilding is no dearer than patching, and it is exact: no rounding residue
            # from earlier additions and removals (a soup of one equals its ingredient).
            for t in self._sum.values():
                t.zero_()
            self.weights = [0.0] * len(self.weights)
        # Additions first, so the sum never passes through an empty soup.
        for i, w in enumerate(target):
            if w > self.weights[i]:
                self.add(i, w - self.weights[i])
        for i, w in enumerate(target):
            if w < self.weights[i]:
                self.remove(i, self.weights[i] - w)

    def write_into_with(
        self, module: torch.nn.Module, position: int, weight: float = 1.0
    ) -> torch.nn.Module:
        """Write the mean of the current soup plus ``weight`` x ingredient ``position``,
        leaving the sum itself unchanged. A negative ``weight`` takes that much of a
        member out (at most all of it): pruned soup's candidate, the soup minus one.

        A greedy or pruned candidate is usually rejected: tasting it this way reads the
        ingredient once, where changing the sum and changing it back would read it twice
        (and leave rounding residue in the sum).

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> ings = open_ingredients([{"weight": torch.zeros(1, 1)}, {"weight": torch.eye(1)}])
            >>> acc = Accumulator(ings); acc.add(0)
            >>> lin = acc.write_into_with(torch.nn.Linear(1, 1, bias=False), 1)
            >>> lin.weight.item(), acc.weights
            (0.5, [1.0, 0.0])
            >>> acc.add(1); lin = acc.write_into_with(lin, 0, -1.0)  # the soup without 0
            >>> lin.weight.item(), acc.weights
            (1.0, [1.0, 1.0])
        """
        have = self.weights[position]
        total = self.total + weight
        if weight == 0 or weight < -have * (1 + 1e-9) or total <= 0:
            raise ConfigError(
                f"weight {weight} of {self.ingredients[position].label}: give a positive weight"
                f", or a negative one of at most the {have} it has, leaving a soup behind"
            )
        self._check_ints(position)
        ing = self.ingredients[position]
        check = position not in self._finite

        def into(name: str, dest: torch.Tensor) -> bool:
            if name not in self._sum:
                return False
            x = self._read(position, name)
            if check:
                checked_float(x, name, ing.label)
            x = self._here(x)
            if self.base is not None:
                mixed = torch.add(self._sum[name], x, alpha=weight).div_(total)
                dest.copy_(saturating_cast(mixed.add_(self._base_here(name)), dest.dtype, name))
            elif _same_place(dest, self._sum[name]):
                torch.add(self._sum[name], x, alpha=weight, out=dest)
                dest.div_(total)
            else:  # another dtype or device: mix where the sum is, then copy across
                mixed = torch.add(self._sum[name], x, alpha=weight).div_(total)
                dest.copy_(saturating_cast(mixed, dest.dtype, name))
            return True

        write_state_into(module, self.mean, self.layout, direct=into, ingredients=self.ingredients)
        self._finite.add(position)
        return module

    def mean(self, name: str) -> torch.Tensor:
        """The current weighted mean of one tensor (accumulator dtype; ints as stored)."""
        if name in self._ints:
            return self._ints[name]
        if self.base is not None and name not in self._sum:
            return self.base.tensor(name)  # no adapter changes it: the base, as it is
        total = self.total
        if total <= 0:
            raise ConfigError("the soup is empty: add an ingredient first")
        if self.base is not None:
            return (self._sum[name] / total).add_(self._base_here(name))
        return self._sum[name] / total

    def write_into(self, module: torch.nn.Module) -> torch.nn.Module:
        """Copy the current mean into ``module``'s parameters and buffers, in place.

        Example:
            >>> import torch
            >>> from modelsoup.ingredients import open_ingredients
            >>> lin = torch.nn.Linear(1, 1)
            >>> acc = Accumulator(open_ingredients([lin.state_dict()]))
            >>> acc.add(0)
            >>> acc.write_into(torch.nn.Linear(1, 1)).weight.data.equal(lin.weight.data)
            True
        """
        total = self.total
        if total <= 0:
            raise ConfigError("the soup is empty: add an ingredient first")

        def into(name: str, dest: torch.Tensor) -> bool:
            # Divide straight into the module's tensor: no model-sized temporary.
            if self.base is None and name in self._sum and _same_place(dest, self._sum[name]):
                torch.div(self._sum[name], total, out=dest)
                return True
            return False

        write_state_into(module, self.mean, self.layout, direct=into, ingredients=self.ingredients)
        return module


def _same_place(dest: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``out=dest`` may take a result computed from ``source`` (same dtype, device)."""
    return dest.dtype == source.dtype and dest.device == source.device


def write_state_into(
    module: torch.nn.Module, tensor_for, layout, direct=None, ingredients=()
) -> None:
    """Copy ``tensor_for(name)`` into every parameter and buffer of ``module``, in place.

    Names must match the ingredients' exactly; the first difference is named. Where the
    module ties several names to one tensor (an LM head tied to the embeddings), each of
    ``ingredients`` that stores two of them must store them equal
    (:func:`check_tied_equal`): the module can hold only one.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(1, 1, bias=False)
        >>> write_state_into(lin, lambda n: torch.ones(1, 1), {"weight": None})
        >>> lin.weight.item()
        1.0
    """
    target = module.state_dict()
    for name in target:
        if name not in layout:
            raise IncompatibleIngredientsError(
                f"the model has tensor '{name}' but the ingredients do not; check that the model "
                "factory builds the architecture the checkpoints were saved from"
            )
    for name in layout:
        if name not in target:
            raise IncompatibleIngredientsError(
                f"the ingredients have tensor '{name}' but the model does not; check that the "
                "model factory builds the architecture the checkpoints were saved from"
            )
    check_tied_equal(tied_groups(target), ingredients)
    with torch.no_grad():
        for name, dest in target.items():
            meta = layout[name]
            if meta is not None and tuple(dest.shape) != tuple(meta.shape):
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is {tuple(meta.shape)} in the ingredients but "
                    f"{tuple(dest.shape)} in the model"
                )
            if direct is not None and direct(name, dest):
                continue
            src = tensor_for(name)
            if tuple(dest.shape) != tuple(src.shape):
                raise IncompatibleIngredientsError(
                    f"tensor '{name}' is {tuple(src.shape)} in the ingredients but "
                    f"{tuple(dest.shape)} in the model"
                )
            dest.copy_(saturating_cast(src, dest.dtype, name))


def tied_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names in ``state`` that are one tensor (same memory, shape and strides).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> m[1].weight = m[0].weight
        >>> tied_groups(m.state_dict())
        [['0.weight', '1.weight']]
    """
    places: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel():
            key = (t.device, t.data_ptr(), tuple(t.shape), t.stride())
            places.setdefault(key, []).append(name)
    return [names for names in places.values() if len(names) > 1]


def check_tied_equal(groups: Sequence[Sequence[str]], ingredients: Sequence) -> None:
    """Refuse an ingredient that stores two names of one tied group with different values.

    A module that ties them holds one tensor, so writing such an ingredient (or a soup
    of it) keeps one of the two and silently drops the other. Each ingredient's pairs
    are compared once and remembered, so tasting many candidates reads them once.

    Example:
        >>> import torch
        >>> from modelsoup.ingredients import open_ingredients
        >>> sd = {"emb": torch.ones(2, 2), "head": torch.zeros(2, 2)}
        >>> check_tied_equal([["emb", "head"]], open_ingredients([sd], labels=["ft1"]))
        Traceback (most recent call last):
        ...
        modelsoup.errors.IncompatibleIngredientsError: ft1 stores 'emb' and 'head' with ...
    """
    for ing in ingredients:
        if not groups:
            return
        names = None
        known = ing.__dict__.setdefault("_tied_equal", {})
        for group in groups:
            for other in group[1:]:
                pair = (group[0], other)
                if pair not in known:
                    if names is None:
                        names = set(ing.names())
                    known[pair] = (
                        pair[0] not in names
                        or other not in names
                        or torch.equal(ing.tensor(pair[0]), ing.tensor(other))
                    )
                if not known[pair]:
                    raise IncompatibleIngredientsError(
                        f"{ing.label} stores '{pair[0]}' and '{other}' with different values, "
                        "but the model ties them into one tensor (e.g. tie_word_embeddings), "
                        "so a soup written into it would silently drop one; cook with a model: "
                        "function that builds it untied (tie_word_embeddings=False), or leave "
                        "this ingredient out"
                    )
