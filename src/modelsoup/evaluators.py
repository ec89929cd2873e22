"""Evaluators: how a recipe tastes a candidate soup.

An evaluator scores a model. Anything with ``evaluate(model) -> float`` (and optionally
``name`` and ``higher_is_better``) is one; so is a plain callable ``model -> float``
wrapped by :func:`as_evaluator`. Recipes choose on a *held-out* evaluator only; the
report also scores the chosen soups on a separate *test* evaluator.

The built-in classifier evaluators fetch their data once, keep it in memory on the
model's device, and run under ``torch.inference_mode()``. They also expose the model's
logits and per-example results, which the ensemble baselines and the confidence
intervals in the report need.

Batches may be ``(inputs, labels)`` pairs or dicts with a ``labels`` entry (the rest is
passed to the model as keyword arguments). The model may return logits, a tuple whose
first item is the logits, or an object with a ``.logits`` attribute (Hugging Face).

Example:
    >>> import torch
    >>> x, y = torch.eye(3), torch.tensor([0, 1, 2])
    >>> Accuracy((x, y)).evaluate(torch.nn.Identity())
    1.0
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from modelsoup._util import tensor_bytes
from modelsoup.errors import ConfigError, EvaluationError, SoupError


@runtime_checkable
class Evaluator(Protocol):
    """What recipes need: a name, a direction, and ``evaluate(model) -> float``."""

    name: str
    higher_is_better: bool

    def evaluate(self, model: torch.nn.Module) -> float: ...


@runtime_checkable
class LogitsEvaluator(Evaluator, Protocol):
    """An evaluator that also gives the model's logits and scores them: what the
    ensemble baselines, shared outputs and per-example intervals need.

    The built-in classifier evaluators (:class:`Accuracy`, :class:`MeanLoss`,
    :class:`MetricEvaluator`) are ones.
    """

    def logits(self, model: torch.nn.Module) -> torch.Tensor: ...

    def score_logits(self, logits: torch.Tensor) -> float: ...

    def per_example(self, logits: torch.Tensor) -> torch.Tensor | None: ...


class NamedEvaluator:
    """A user's evaluator object with the name or direction it lacks, left unmodified.

    Every other attribute is the wrapped object's own.

    Example:
        >>> class Score:
        ...     def evaluate(self, model):
        ...         return 1.0
        >>> ev = NamedEvaluator(Score(), name="Score", higher_is_better=False)
        >>> ev.name, ev.higher_is_better, ev.evaluate(None)
        ('Score', False, 1.0)
    """

    def __init__(self, inner: Any, *, name: str, higher_is_better: bool):
        self.inner = inner
        self.name = name
        self.higher_is_better = higher_is_better

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.inner.evaluate(model)

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(attr)
        return getattr(self.inner, attr)


class FunctionEvaluator:
    """A plain ``model -> float`` callable seen as an evaluator.

    Example:
        >>> ev = FunctionEvaluator(lambda m: 0.5, name="half")
        >>> ev.evaluate(None), ev.higher_is_better
        (0.5, True)
    """

    def __init__(
        self,
        fn: Callable[[torch.nn.Module], float],
        *,
        name: str | None = None,
        higher_is_better: bool = True,
    ):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.higher_is_better = higher_is_better

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.fn(model)


def as_evaluator(obj: Any, *, higher_is_better: bool | None = None) -> Evaluator:
    """Accept an evaluator object or a callable; check it has what recipes need.

    Example:
        >>> as_evaluator(lambda m: 1.0).higher_is_better
        True
    """
    if obj is None:
        raise ConfigError("no evaluator given; pass held_out= an evaluator or a model->float")
    if hasattr(obj, "evaluate"):
        hib = higher_is_better
        if hib is None:
            hib = getattr(obj, "higher_is_better", True)
        name = getattr(obj, "name", None) or type(obj).__name__
        complete = hasattr(obj, "name") and hasattr(obj, "higher_is_better")
        if complete and hib == obj.higher_is_better:
            return obj  # already complete: used as it is
        return NamedEvaluator(obj, name=name, higher_is_better=hib)
    if callable(obj):
        hib = True if higher_is_better is None else higher_is_better
        return FunctionEvaluator(obj, higher_is_better=hib)
    raise ConfigError(f"{obj!r} is not an evaluator: give it evaluate(model) or make it callable")


def identity(evaluator: Any) -> str:
    """How journals and caches tell evaluators apart: the name, with a hash of the data
    added when the evaluator can hash its data (``fingerprint()``) and the name does
    not already carry it. A name given by the user (``name="held-out"``) then never
    lets scores on other data, or on the test split, pass for this evaluator's.

    Example:
        >>> import torch
        >>> a = Accuracy((torch.eye(2), torch.tensor([0, 1])), name="acc")
        >>> b = Accuracy((torch.eye(2), torch.tensor([1, 0])), name="acc")
        >>> identity(a) == identity(b), identity(a).startswith("acc[")
        (False, True)
    """
    known = vars(evaluator).get("_identity") if hasattr(evaluator, "__dict__") else None
    if known is not None:
        return known
    name = evaluator.name
    fingerprint = getattr(evaluator, "fingerprint", None)
    if callable(fingerprint):
        short = str(fingerprint())[:12]
        if short not in name:
            name = f"{name}[{short}]"
    # What it measures, too: the same name and data scored as a loss, as top-3 or by
    # another metric function must not find this one's scores
    name = f"{name}<{measure_digest(evaluator)}>"
    if hasattr(evaluator, "__dict__"):
        vars(evaluator)["_identity"] = name  # the data never changes once fetched
    return name


def batches_digest(batches: Any, length: int = 12) -> str:
    """A short sha256 of every tensor and plain value (numbers, strings) in ``batches``
    (nested dicts, lists and tuples), in order: it names data by what it holds, so a
    journal never reuses a score measured on other data.

    Example:
        >>> import torch
        >>> batches_digest([{"x": torch.ones(2)}]) == batches_digest([{"x": torch.ones(2)}])
        True
        >>> batches_digest([(torch.ones(2),)]) == batches_digest([(torch.zeros(2),)])
        False
        >>> batches_digest([{"scale": 1.0}]) == batches_digest([{"scale": -1.0}])
        False
    """
    digest = hashlib.sha256()

    def add(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            digest.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
            digest.update(tensor_bytes(obj))
        elif isinstance(obj, Mapping):
            digest.update(b"{")
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                add(obj[key])
            digest.update(b"}")
        elif isinstance(obj, list | tuple):
            digest.update(b"(")
            for item in obj:
                add(item)
            digest.update(b")")
        elif isinstance(obj, str | bytes | int | float | complex | bool | None):
            digest.update(repr(obj).encode())
        elif type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):
            # a numpy array or scalar, as a tensor is: dtype, shape, bytes
            digest.update(f"{obj.dtype}{getattr(obj, 'shape', ())}".encode() + obj.tobytes())

    for batch in batches:
        add(batch)
    return digest.hexdigest()[:length]


def code_digest(fn: Callable) -> str:
    """A short hash of a function of yours as journal keys see it: its code and what it
    reads (closed-over values, globals, helpers of yours), as for an evaluator.

    Example:
        >>> code_digest(lambda m: 1) == code_digest(lambda m: 2)
        False
    """
    return hashlib.sha256(_code_of(fn).encode()).hexdigest()[:12]


def measure_digest(evaluator: Any) -> str:
    """A short hash of what an evaluator measures, whatever its name: its class, its
    direction, its kind and top-k, and code: the function it calls (a metric, or the
    ``model -> float`` function itself) and the methods of a class of yours, with the
    values they read (settings, tensors, the globals and helpers of their module).

    Example:
        >>> import torch
        >>> data = (torch.eye(2), torch.tensor([0, 1]))
        >>> measure_digest(Accuracy(data)) == measure_digest(Accuracy(data, top_k=2))
        False
    """
    inner = getattr(evaluator, "inner", evaluator)  # a NamedEvaluator's user object
    kind = type(inner)
    parts = [
        f"{kind.__module__}.{kind.__qualname__}",
        str(getattr(evaluator, "higher_is_better", "")),
    ]
    parts += [f"{a}={getattr(inner, a)}" for a in ("kind", "top_k") if hasattr(inner, a)]
    fn = getattr(inner, "metric", None) or getattr(inner, "fn", None)
    if callable(fn):
        parts.append(_code_of(fn))
    parts += _user_class_parts(inner)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _ours(module: str | None) -> bool:
    return (module or "").split(".")[0] in ("modelsoup", "builtins")


def _user_class_parts(obj: Any) -> list[str]:
    # an evaluator class of the user's (or a subclass of a built-in): an edited method, a
    # class setting or an instance's setting is another measure; modelsoup's own classes
    # are named by their class alone (their code is this version's)
    parts = []
    for klass in type(obj).__mro__:
        if _ours(klass.__module__):
            continue
        for attr, value in sorted(vars(klass).items()):
            if attr.startswith("_") and attr not in ("__call__", "__init__"):
                continue  # private: caches and counters, not what is measured
            target = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            if isinstance(target, property):
                target = target.fget
            if isinstance(target, types.FunctionType):
                parts.append(f"{klass.__qualname__}.{attr}:{_code_of(target)}")
            elif _plain(value):
                parts.append(f"{klass.__qualname__}.{attr}={_stable(value)}")
    if parts and hasattr(obj, "__dict__"):
        # public settings only (numbers, strings, tensors, your config objects): private
        # caches and counters fill up as the evaluator is used
        settings = vars(obj).items()
        parts += [f"{k}={_stable(v)}" for k, v in sorted(settings) if _setting(k, v)]
    return parts


#: how deep settings inside settings are read (an evaluator's config object's options)
_SETTINGS_DEPTH = 3


def _setting(key: str, value: Any, depth: int = 0) -> bool:
    # a public attribute that is part of what an object measures: numbers, strings,
    # tensors, containers of them, and objects of your classes holding such settings
    if key.startswith("_"):
        return False
    if isinstance(value, str | bytes | int | float | complex | bool | torch.Tensor):
        return True
    if isinstance(value, tuple | list | frozenset):
        return bool(value) and all(_setting("", v, depth) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(
            isinstance(k, str | int) and _setting("", v, depth) for k, v in value.items()
        )
    return depth < _SETTINGS_DEPTH and _your_object(value)


def _your_object(value: Any) -> bool:
    # an instance of a class of yours (not modelsoup's, not a library's) with settings;
    # a module of yours is a model, not a setting (its mode and weights change as it runs)
    kind = type(value)
    if _ours(kind.__module__) or not isinstance(getattr(value, "__dict__", None), dict):
        return False
    if isinstance(value, torch.nn.Module):
        return False
    module = sys.modules.get(kind.__module__)
    path = getattr(module, "__file__", None)
    return path is None or not _library_file(path)


def _plain(value: Any) -> bool:
    # a value whose text (or bytes) is what it is: a setting, not an object
    if isinstance(value, str | bytes | int | float | complex | bool | None | torch.Tensor):
        return True
    if isinstance(value, tuple | list | frozenset):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):  # CONFIG = {"threshold": 0.5}
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    return False


def _code_of(fn: Callable, seen: set[int] | None = None) -> str:
    # two lambdas share a name: their code tells them apart (and a function edited
    # between runs is another measure), with what it reads: the values it closes over
    # (the code of functions of yours among them: what a decorator wraps), and the plain
    # globals and functions of yours it names
    target = fn.func if isinstance(fn, functools.partial) else fn
    code = getattr(target, "__code__", None)
    if code is None:  # an object with a __call__ method, its class's or a base's
        call = next(
            (vars(k)["__call__"] for k in type(target).__mro__ if "__call__" in vars(k)), None
        )
        code = getattr(call, "__code__", None)
    qualname = getattr(target, "__qualname__", type(target).__qualname__)
    where = f"{getattr(target, '__module__', '')}.{qualname}"
    if code is None:
        return where
    bound = (fn.args, sorted(fn.keywords.items())) if isinstance(fn, functools.partial) else ()
    seen = set() if seen is None else seen
    seen.add(id(target))
    closure = []
    for cell in getattr(target, "__closure__", None) or ():
        value = _cell(cell)
        traced = _traced(value, seen)
        closure.append(_stable(value) if traced is None else traced)
    wrapped = getattr(target, "__wrapped__", None)  # functools.wraps / update_wrapper
    inner = _traced(inspect.unwrap(target), seen) if wrapped is not None else None
    reads = _globals_read(target, code, seen)
    # a callable object's or a bound method's own settings and data (``self.x``, a
    # threshold), and its class's other methods: ``Scorer(new_data).score`` is another
    # measure than ``Scorer(old_data).score``, as an object with ``evaluate`` is
    owner = _owner(target)
    state = ";".join(_user_class_parts(owner)) if owner is not None else ""
    return f"{where}|{_stable(code)}|{_stable(bound)}|{','.join(closure)}|{inner}|{reads}|{state}"


def _owner(target: Any) -> Any:
    # the object of yours whose state a callable reads: a bound method's ``self``, or a
    # callable instance itself; None for functions, classes' methods and modelsoup's own
    if isinstance(target, types.MethodType):
        target = target.__self__
    elif isinstance(target, types.FunctionType | types.BuiltinFunctionType | type):
        return None
    if isinstance(target, type | types.ModuleType) or _ours(type(target).__module__):
        return None
    return target


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    # where Python's own library and installed packages live: this environment's, the
    # user site's, the system's (Debian's dist-packages) and any such folder on sys.path
    import site

    found = [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    found += list(getattr(site, "getsitepackages", list)())
    user = getattr(site, "getusersitepackages", None)
    if user is not None:
        found.append(user())
    found += [p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))]
    return tuple(sorted({os.path.realpath(p) for p in found if p}))


@functools.lru_cache(maxsize=256)
def _library_file(path: str) -> bool:
    # a file of Python's own library or of an installed package (torch, numpy, ...):
    # their code is their version's, not a user's edit
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in _library_roots())


def _yours(fn: Any) -> bool:
    # a Python function of the user's: not modelsoup's, not a library's
    if not isinstance(fn, types.FunctionType) or _ours(fn.__module__):
        return False
    return not _library_file(fn.__code__.co_filename)


def _traced(value: Any, seen: set[int]) -> str | None:
    # the code (and what it reads) of a function of yours not yet traced, else None
    if not _yours(value) or id(value) in seen or len(seen) >= 32:
        return None
    return _code_of(value, seen)


def _globals_read(fn: Any, code: types.CodeType, seen: set[int]) -> str:
    namespace = getattr(fn, "__globals__", None)
    if not isinstance(namespace, dict) or _ours(namespace.get("__name__")):
        return ""
    found = []
    names = _names(code)
    for name in sorted(names):
        if name not in namespace:
            continue
        value = namespace[name]
        if name.startswith("_") and isinstance(value, dict | list):
            continue  # a private container: a cache (_CACHE = {}) fills as the evaluator runs
        if _plain(value):
            found.append(f"{name}={_stable(value)}")
        elif isinstance(value, types.ModuleType):
            # `import helpers` then `helpers.cutoff(x)`: what it names of a module of yours
            path = getattr(value, "__file__", None)
            if path is None or _ours(value.__name__) or _library_file(path):
                continue
            for attr in sorted(names & set(vars(value))):
                item = vars(value)[attr]
                traced = _traced(item, seen)
                if _plain(item):
                    found.append(f"{name}.{attr}={_stable(item)}")
                elif traced is not None:
                    found.append(f"{name}.{attr}:{traced}")
        else:
            traced = _traced(value, seen)
            if traced is not None:
                found.append(f"{name}:{traced}")
    return ";".join(found)


def _names(code: types.CodeType) -> set[str]:
    # the global names a function's code (and the code nested in it) reads
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


#: tensors up to this many elements are hashed whole; larger ones (a dataset an evaluator
#: holds) by their sums and a spread sample, which costs no copy off their device
TENSOR_HASH_ELEMENTS = 1 << 22


def _tensor_digest(value: torch.Tensor) -> str:
    t = value.detach()
    shown = f"{t.dtype},{tuple(t.shape)}"
    if t.numel() <= TENSOR_HASH_ELEMENTS:
        return f"tensor({shown},{hashlib.sha256(tensor_bytes(t)).hexdigest()})"
    flat = t.contiguous().reshape(-1)
    step = flat.numel() // TENSOR_HASH_ELEMENTS + 1
    sample = flat[::step].cpu().contiguous()
    # every entry counts: the sum of the raw bits as integers, exact in any order (so
    # in any process, on any number of threads), where a float sum's rounding is not
    if t.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    total = str(int(flat.view(bits).sum(dtype=torch.int64)))
    digest = hashlib.sha256(tensor_bytes(sample) + total.encode())
    return f"tensor({shown},sampled {step},{digest.hexdigest()})"


def _stable(value: Any, _depth: int = 0) -> str:
    # the same text in every process: nested code by its bytes, not its address, sets
    # sorted (string hashing differs between processes), and a tensor by its contents
    if isinstance(value, types.CodeType):
        inner = "".join(_stable(c) for c in value.co_consts)
        return f"code({value.co_code.hex()},{inner},{value.co_names})"
    if isinstance(value, tuple | list):
        return "(" + ",".join(_stable(v, _depth) for v in value) + ")"
    if isinstance(value, frozenset | set):
        return "{" + ",".join(sorted(_stable(v, _depth) for v in value)) + "}"
    if isinstance(value, dict):
        items = (f"{_stable(k)}:{_stable(v, _depth)}" for k, v in value.items())
        return "{" + ",".join(sorted(items)) + "}"
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, str | bytes | int | float | complex | bool | None):
        return repr(value)
    kind = type(value)
    if not _ours(kind.__module__) and isinstance(getattr(value, "__dict__", None), dict):
        # an object of the user's (a target, a config): its public settings, and those of
        # the objects of yours among them, a few levels deep
        depth = _depth + 1
        found = sorted((k, v) for k, v in vars(value).items() if _setting(k, v, depth))
        text = ",".join(f"{k}={_stable(v, depth)}" for k, v in found)
        return f"{kind.__qualname__}({text})"
    return kind.__qualname__


def score_range(evaluator: Any) -> tuple[float, float] | None:
    """The scores an evaluator can give (``score_range`` attribute), or ``None`` if unknown.

    Example:
        >>> score_range(Accuracy(([], []))), score_range(as_evaluator(lambda m: 1.0))
        ((0.0, 1.0), None)
    """
    found = getattr(evaluator, "score_range", None)
    return (float(found[0]), float(found[1])) if found is not None else None


def check_score(value: Any, name: str, bounds: tuple[float, float] | None = None) -> float:
    """The checks every score passes, whether just measured or read back from a journal:
    a real number (not a string, not a boolean), finite, and within ``bounds`` if known.

    Example:
        >>> check_score(0.5, "acc", (0.0, 1.0))
        0.5
        >>> check_score("0.5", "acc")
        Traceback (most recent call last):
        ...
        modelsoup.errors.EvaluationError: evaluator acc returned '0.5'; it must return a number
    """
    kind = getattr(value, "dtype", None)  # numpy and torch scalars carry their dtype
    boolean = kind is not None and str(kind).removeprefix("torch.") == "bool"
    if isinstance(value, bool | str | bytes) or boolean:
        raise EvaluationError(f"evaluator {name} returned {value!r}; it must return a number")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise EvaluationError(
            f"evaluator {name} returned {value!r}; it must return a number"
        ) from None
    if not math.isfinite(value):
        raise EvaluationError(
            f"evaluator {name} returned {value}; the candidate soup may have diverged"
        )
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise EvaluationError(
            f"evaluator {name} returned {value}, outside its range [{bounds[0]}, {bounds[1]}]"
        )
    return value


def same_data(a: Any, b: Any) -> bool:
    """Do two evaluators score the same examples? Then a test score is no honest check.

    True for one object given twice (or one function, or one wrapped object), and for
    built-in classifier evaluators whose labels and inputs are identical.

    Example:
        >>> import torch
        >>> x, y = torch.eye(2), torch.tensor([0, 1])
        >>> same_data(Accuracy((x, y)), Accuracy((x.clone(), y.clone()))), same_data(
        ...     Accuracy((x, y)), Accuracy((x, 1 - y)))
        (True, False)
    """
    a, b = (_unwrapped(e) for e in (a, b))
    if a is b:
        return True
    if not (isinstance(a, ClassifierEvaluator) and isinstance(b, ClassifierEvaluator)):
        return False
    if a.data is b.data:
        return True
    # labels first: cheap, and different for nearly every pair of distinct data sets
    if a.labels.shape != b.labels.shape or not torch.equal(a.labels, b.labels):
        return False
    return a.fingerprint() == b.fingerprint()


def _unwrapped(evaluator: Any) -> Any:
    if isinstance(evaluator, NamedEvaluator):
        return evaluator.inner
    if isinstance(evaluator, FunctionEvaluator):
        return evaluator.fn
    return evaluator


def checked_score(evaluator: Evaluator, model: torch.nn.Module) -> float:
    """Run an evaluator and insist on a finite float within its range (:func:`check_score`).

    Example:
        >>> checked_score(as_evaluator(lambda m: 2), None)
        2.0
    """
    try:
        value = evaluator.evaluate(model)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        raise EvaluationError(f"evaluator {evaluator.name} ran out of memory: {err}") from err
    return checked_value(evaluator, value)


def checked_value(evaluator: Evaluator, value: Any) -> float:
    """Insist that an evaluator's result is a finite float within its known range.

    Example:
        >>> checked_value(as_evaluator(lambda m: 0), 0.5)
        0.5
    """
    return check_score(value, evaluator.name, score_range(evaluator))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def call_model(model: Any, inputs: Any, what: str = "") -> Any:
    """``model(**inputs)`` for a dict of keyword inputs, else ``model(inputs)``; the
    model's own error on the batch is one :class:`EvaluationError` line (``what`` names
    the caller), not a traceback. Out-of-memory errors pass through as they are.

    Example:
        >>> import torch
        >>> try:
        ...     call_model(torch.nn.Linear(2, 1), torch.ones(1, 3), "recalibrate_bn")
        ... except EvaluationError as err:
        ...     print(str(err)[:48])
        recalibrate_bn: the model failed on a batch of t
    """
    try:
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    except (SoupError, torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as err:  # the model's own error on this data: one line, not a traceback
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise EvaluationError(
            f"{what + ': ' if what else ''}the model failed on a batch of the "
            f"{'data' if what else 'evaluation data'} ({type(err).__name__}: {first}); check "
            "that the data fits the model (input shapes, max_length within its positions, "
            "a padding token)"
        ) from err


def forward_logits(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on one batch of inputs and return its logits tensor.

    Example:
        >>> import torch
        >>> forward_logits(torch.nn.Identity(), torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    out = call_model(model, inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise EvaluationError(f"the model returned {type(out).__name__}, not a logits tensor")
    return out


def _split(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, dict):
        if "labels" not in batch and "label" not in batch:
            raise ConfigError("dict batches need a 'labels' entry")
        rest = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        return rest, batch.get("labels", batch.get("label"))
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError("batches must be (inputs, labels) pairs or dicts with 'labels'")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _take(inputs: Any, rows: torch.Tensor) -> Any:
    if isinstance(inputs, dict):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def _batches(data: Any, batch_size: int) -> list[tuple[Any, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        inputs, labels = data
        n = len(labels)
        out = []
        for s in range(0, n, batch_size):
            if isinstance(inputs, dict):
                chunk = {k: v[s : s + batch_size] for k, v in inputs.items()}
            else:
                chunk = inputs[s : s + batch_size]
            out.append((chunk, labels[s : s + batch_size]))
        return out
    if isinstance(data, Iterable):
        return [_split(b) for b in data]
    raise ConfigError("data must be (inputs, labels) tensors or an iterable of batches")


@dataclass(frozen=True)
class Race:
    """The outcome of :meth:`ClassifierEvaluator.race`: a full score, or a proof of loss.

    ``score`` is the full-pass score when the candidate was evaluated to the end, else
    ``None``; then ``bound`` is the best score it could still have reached after
    ``seen`` of ``total`` examples, and it cannot meet the score to beat.
    """

    score: float | None
    bound: float
    seen: int
    total: int
    #: every example's value, in the data's own order, when evaluated to the end
    values: torch.Tensor | None = None
    #: which test decided: ``"exact"`` (the proof of :meth:`ClassifierEvaluator.race`)
    #: or ``"statistical"`` (:meth:`ClassifierEvaluator.race_paired`)
    test: str = "exact"
    #: why statistical racing was asked for but the race was exact, else ``None``
    fallback: str | None = None

    @property
    def rejected(self) -> bool:
        return self.score is None


#: how far a bound must fall short of the score to beat before a race stops, for scores
#: near 1: more than any float32 rounding of a mean, so the decision is the full
#: evaluation's; larger scores (a summed loss) get a margin in proportion (falls_short)
RACE_MARGIN = 1e-6


def falls_short(bound: float, to_beat: float, higher_is_better: bool) -> bool:
    """Whether a race's bound on a candidate's full score proves it cannot reach ``to_beat``:
    by more than float32 rounding of scores their size (``RACE_MARGIN`` near 1).

    Example:
        >>> falls_short(0.5, 0.9, True), falls_short(0.9 - 1e-9, 0.9, True)
        (True, False)
        >>> falls_short(1000.0, 1000.0 - 1e-5, False)  # within float32 rounding of 1000
        False
    """
    size = max(abs(bound), abs(to_beat))
    margin = max(RACE_MARGIN, 8 * torch.finfo(torch.float32).eps * size)
    if higher_is_better:
        return bound < to_beat - margin
    return bound > to_beat + margin


#: statistical racing's confidence sequence: the tighter of two finite-population bounds
RACING_METHOD = "hoeffding/bernstein-serfling, union over looks"
#: the constant of the empirical Bernstein-Serfling bound (Bardenet & Maillard 2015, Thm 3)
_KAPPA = 7 / 3 + 3 / math.sqrt(2)


@dataclass(frozen=True)
class StatisticalRacing:
    """How statistical racing stops a candidate: at ``confidence``, a confidence sequence
    on its per-example differences from the incumbent, over the held-out examples in one
    fixed random order (``seed``). Per-example values of an evaluator without bounds (a
    loss) are clipped to ``[0, clip]`` in the test; without ``clip`` it is evaluated in full.

    Example:
        >>> round(StatisticalRacing(0.999).delta(1), 6)
        0.0005
        >>> StatisticalRacing(1.5)
        Traceback (most recent call last):
        ...
        modelsoup.errors.ConfigError: racing confidence 1.5 must be between 0 and 1 (e.g. 0.999)
    """

    confidence: float
    clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < 1:
            raise ConfigError(f"racing confidence {c} must be between 0 and 1 (e.g. 0.999)")
        clip = self.clip
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf
        ):
            raise ConfigError(f"racing clip {clip} must be a positive number (a loss bound)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"racing seed {self.seed!r} must be a whole number")

    def delta(self, look: int) -> float:
        """The error allowed at the ``look``-th look (1, 2, ...): (1 - confidence) / (k (k+1)),
        which sums to 1 - confidence over every look (a union bound)."""
        return (1 - self.confidence) / (look * (look + 1))

    def tag(self) -> dict:
        """What a journaled rejection records of the test that made it."""
        return {"method": RACING_METHOD, "confidence": self.confidence, "clip": self.clip}


def confidence_radius(n: int, total: int, width: float, std: float, delta: float) -> float:
    """How far, with probability at least ``1 - delta``, the mean of all ``total`` values
    of a finite population can lie above (or, alike, below) the mean of ``n`` of them
    drawn without replacement, for values within a range of ``width`` whose ``n`` drawn
    ones have (biased) standard deviation ``std``.

    The smaller of the Hoeffding-Serfling bound (Serfling 1974; Bardenet & Maillard 2015,
    Cor. 2.5) and the empirical Bernstein-Serfling bound (Bardenet & Maillard 2015,
    Thm. 3), each at ``delta / 2``; 0 once every value is seen.

    Example:
        >>> round(confidence_radius(1000, 20000, 2.0, 0.0, 0.001), 4)
        0.0821
        >>> confidence_radius(20000, 20000, 2.0, 0.5, 0.001)
        0.0
    """
    if n >= total:
        return 0.0
    rho = 1 - (n - 1) / total if n <= total / 2 else (1 - n / total) * (1 + 1 / n)
    hoeffding = width * math.sqrt(rho * math.log(2 / delta) / (2 * n))
    log_b = math.log(10 / delta)  # Theorem 3 holds with probability 1 - 5 d; d = delta / 10
    bernstein = std * math.sqrt(2 * rho * log_b / n) + _KAPPA * width * log_b / n
    return min(hoeffding, bernstein)


class ClassifierEvaluator:
    """Base of the built-in evaluators: logits over cached data, then a score.

    Subclasses define :meth:`per_example` (one number per example) and may override
    :meth:`score_logits` (the mean of ``per_example`` by default). Those whose score is
    the mean of per-example values within known limits set ``bounds = (low, high)``;
    they can be raced (:meth:`race`).
    """

    higher_is_better = True
    kind = "classifier"
    #: (low, high) of every per-example value when the score is their mean, else None
    bounds: tuple[float, float] | None = None
    #: the scores it can give, when known (a journal score outside it is not trusted)
    score_range: tuple[float, float] | None = None
    #: set by :mod:`modelsoup.distributed` under torchrun: this rank runs only its share
    #: of the batches and ``sharding.gather`` puts every rank's logits back in order
    sharding = None

    def __init__(self, data: Any, *, batch_size: int = 256, name: str | None = None):
        self.data = data
        self.batch_size = batch_size
        self._name = name
        self._cache: list[tuple[Any, torch.Tensor]] | None = None
        self._device: torch.device | None = None
        self._labels: torch.Tensor | None = None

    @property
    def name(self) -> str:
        if self._name is None:
            # The data never changes once fetched, so its hash is computed once.
            self._name = f"{self.kind}[{self.fingerprint()[:12]}]"
        return self._name

    def batches(self, device: torch.device) -> list[tuple[Any, torch.Tensor]]:
        """The data as batches on ``device``, fetched once and kept."""
        if self._cache is None:
            self._cache = _batches(self.data, self.batch_size)
            if not self._cache:
                raise ConfigError("the evaluation data is empty")
        if self._device != device:
            self._cache = [(_to(x, device), y.to(device)) for x, y in self._cache]
            self._device = device
        return self._cache

    @property
    def labels(self) -> torch.Tensor:
        """All labels, concatenated (on CPU)."""
        if self._labels is None:
            batches = self.batches(self._device or torch.device("cpu"))
            self._labels = torch.cat([y.reshape(-1).cpu() for _, y in batches])
        return self._labels

    def fingerprint(self) -> str:
        """A hash of the labels and inputs (nested tuples, lists and dicts of tensors and
        plain values), so journals never mix different data."""
        return batches_digest(self.batches(self._device or torch.device("cpu")), 64)

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's logits on every example, in order, as float32 on CPU."""
        device = model_device(model)
        batches = self.batches(device)
        mine = (
            range(len(batches)) if self.sharding is None else self.sharding.positions(len(batches))
        )
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                outs = {i: self.batch_outputs(model, *batches[i]) for i in mine}
        finally:
            model.train(was_training)
        if self.sharding is not None:
            return self.sharding.gather(outs, len(batches))
        return torch.cat(list(outs.values()))

    def batch_outputs(
        self, model: torch.nn.Module, inputs: Any, labels: torch.Tensor
    ) -> torch.Tensor:
        """What :meth:`logits` keeps of one batch: the model's logits, float32 on CPU.

        An evaluator that needs less of each batch (a language model's probability of
        each scored token, not its logits over the whole vocabulary) overrides this.
        """
        return forward_logits(model, inputs).float().cpu()

    def per_example(self, logits: torch.Tensor) -> torch.Tensor:
        return self.per_example_of(logits, self.labels)

    def per_example_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example values of given logits against given labels."""
        raise NotImplementedError

    def race(self, model: torch.nn.Module, to_beat: float, *, strict: bool = False) -> Race:
        """Evaluate batch by batch; stop as soon as the candidate provably cannot meet
        ``to_beat`` (``>=``, or ``>`` with ``strict``; the direction is
        ``higher_is_better``). Exact: the decision is the full evaluation's.

        After each batch the best reachable mean is the running sum plus the best
        per-example value (``bounds``) for every example not yet seen.

        Example:
            >>> import torch
            >>> x = torch.eye(4).repeat(25, 1)
            >>> y = torch.tensor([1, 2, 3, 0]).repeat(25)  # every prediction wrong
            >>> r = Accuracy((x, y), batch_size=10).race(torch.nn.Identity(), 0.9)
            >>> r.rejected, r.seen, r.total
            (True, 20, 100)
        """
        if self.bounds is None or not self.scored_as_mean():
            score = self.evaluate(model)  # scored some other way: evaluated in full
            return Race(score, score, -1, -1)
        low, high = self.bounds
        best_value = high if self.higher_is_better else low
        batches = self.batches(model_device(model))
        total = sum(len(y.reshape(-1)) for _, y in batches)
        running, seen = 0.0, 0

        def stop(done: list[tuple[int, torch.Tensor]]) -> Race | None:
            nonlocal running, seen
            for _, v in done:
                self._check_bounds(v)
            part = [sum(float(v.double().sum()) for _, v in done), sum(v.numel() for _, v in done)]
            if self.sharding is not None:
                part = self.sharding.sum_all(part, "racing")
            running += part[0]
            seen += int(part[1])
            if seen >= total:
                return None
            bound = (running + best_value * (total - seen)) / total
            return (
                Race(None, bound, seen, total)
                if self._cannot_meet(bound, to_beat, strict)
                else None
            )

        race, logits = self._rounds(model, batches, stop)
        if race is not None:
            return race
        # exactly as a full evaluation scores
        score = self.score_logits(logits)
        return Race(score, score, total, total, self.per_example(logits))

    def scored_as_mean(self) -> bool:
        """Is the score the mean of :meth:`per_example_of` over the batches' logits, as
        racing assumes? Not when a subclass computes its own ``logits``, batch outputs,
        ``per_example``, ``score_logits`` (a weighted mean) or ``evaluate``: racing would
        then stop on a number that is not the score, so such evaluators are evaluated in
        full.

        Example:
            >>> import torch
            >>> class Weighted(Accuracy):
            ...     def score_logits(self, logits):
            ...         return float(self.per_example(logits)[:2].mean())
            >>> data = (torch.eye(2), torch.arange(2))
            >>> Accuracy(data).scored_as_mean(), Weighted(data).scored_as_mean()
            (True, False)
        """
        own = type(self)
        return all(
            getattr(own, name) is getattr(ClassifierEvaluator, name)
            for name in ("logits", "batch_outputs", "per_example", "score_logits", "evaluate")
        )

    def _check_bounds(self, values: torch.Tensor) -> None:
        # racing's bound is only a proof if every value lies within the declared bounds
        if self.bounds is None or not values.numel():
            return
        low, high = self.bounds
        least, most = float(values.min()), float(values.max())
        if not (low <= least and most <= high):
            bad = least if not low <= least else most
            raise EvaluationError(
                f"evaluator {self.name}: a per-example value is {bad}, outside its declared "
                f"bounds [{low}, {high}]; correct its bounds, or set bounds = None to have "
                "it evaluated in full"
            )

    def _rounds(
        self,
        model: torch.nn.Module,
        batches: list[tuple[Any, torch.Tensor]],
        stop: Callable[[list[tuple[int, torch.Tensor]]], Race | None],
    ) -> tuple[Race | None, torch.Tensor | None]:
        """Run the batches in rounds (one batch per rank under torchrun); after each
        round ``stop`` gets this rank's ``(batch position, per-example values)`` and may
        end the race. Returns its :class:`Race`, or ``None`` and the logits of all."""
        # Under torchrun each rank takes its share of every round of batches; ``stop`` adds
        # what it needs over ranks after each round, so every rank stops at the same one.
        ranks = self.sharding
        width = 1 if ranks is None else ranks.world_size
        mine = set(range(len(batches)) if ranks is None else ranks.positions(len(batches)))
        outs: dict[int, torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(batches), width):
                    done = []
                    for i in range(start, min(start + width, len(batches))):
                        if i not in mine:
                            continue
                        inputs, labels = batches[i]
                        outs[i] = forward_logits(model, inputs).float().cpu()
                        done.append((i, self.per_example_of(outs[i], labels.reshape(-1).cpu())))
                    race = stop(done)
                    if race is not None:
                        return race, None
        finally:
            model.train(was_training)
        if ranks is not None:
            return None, ranks.gather(outs, len(batches))
        return None, torch.cat([outs[i] for i in sorted(outs)])

    def racing_bounds(self, racing: StatisticalRacing) -> tuple[float, float] | None:
        """The range of per-example values statistical racing may assume: ``bounds``;
        for a loss (lower is better, scores from 0 up) with ``clip``, ``[0, clip]``;
        otherwise ``None`` (no statistical racing).

        Clipping a loss only lowers it, so a candidate whose clipped loss is surely
        above the bar has a true loss above it too: clipping costs stopping power, never
        a wrong rejection.

        Example:
            >>> import torch
            >>> data = (torch.eye(2), torch.tensor([0, 1]))
            >>> MeanLoss(data).racing_bounds(StatisticalRacing(0.999, clip=20.0))
            (0.0, 20.0)
        """
        if self.bounds is not None:
            return self.bounds
        low = (self.score_range or (None, None))[0]
        if racing.clip is None or self.higher_is_better or low != 0.0:
            return None
        return (0.0, float(racing.clip))

    def race_order(self, seed: int) -> torch.Tensor:
        """The one fixed random order statistical racing reads the examples in: a seeded
        permutation of their positions (the same on every rank).

        Example:
            >>> import torch
            >>> ev = Accuracy((torch.eye(4), torch.arange(4)))
            >>> sorted(ev.race_order(0).tolist())
            [0, 1, 2, 3]
        """
        n = len(self.labels)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def shuffled_batches(
        self, device: torch.device, seed: int
    ) -> tuple[list[tuple[Any, torch.Tensor]], torch.Tensor] | None:
        """The data re-batched in :meth:`race_order` (batches of the first batch's size),
        with that order; ``None`` when its examples cannot be put in one order (batches
        whose inputs differ in shape, or labels that are not one per input row: see
        :meth:`reorder_problem`)."""
        shuffled = self._shuffled_or_problem(device, seed)
        return None if isinstance(shuffled, str) else shuffled

    def reorder_problem(self, device: torch.device, seed: int) -> str | None:
        """Why the held-out examples cannot be put in :meth:`race_order` for statistical
        racing, or ``None`` when they can.

        Example:
            >>> import torch
            >>> ev = Accuracy([(torch.ones(2, 3, 4), torch.zeros(2)),
            ...                (torch.ones(2, 5, 4), torch.zeros(2))])
            >>> ev.reorder_problem(torch.device("cpu"), 0)
            'its batches of inputs differ in shape and cannot be joined into one order'
        """
        shuffled = self._shuffled_or_problem(device, seed)
        return shuffled if isinstance(shuffled, str) else None

    def _shuffled_or_problem(
        self, device: torch.device, seed: int
    ) -> tuple[list[tuple[Any, torch.Tensor]], torch.Tensor] | str:
        cached = getattr(self, "_shuffled", None)
        if cached is not None and cached[0] == (seed, device):
            return cached[1], cached[2]
        batches = self.batches(device)
        order = self.race_order(seed)
        xs = [x for x, _ in batches]
        try:
            if all(isinstance(x, torch.Tensor) for x in xs):
                inputs: Any = torch.cat(xs)
                rows = {len(inputs)}
            elif all(isinstance(x, dict) and x.keys() == xs[0].keys() for x in xs):
                inputs = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
                rows = {len(v) for v in inputs.values()}
            else:
                return "its inputs are neither tensors nor dicts of tensors with the same keys"
        except (RuntimeError, TypeError):  # shapes that differ from batch to batch
            return "its batches of inputs differ in shape and cannot be joined into one order"
        if rows != {len(order)} or any(y.dim() != 1 for _, y in batches):
            return "its labels are not one per input row"
        labels = torch.cat([y for _, y in batches])
        where = order.to(labels.device)
        size = len(batches[0][1])
        out = []
        for s in range(0, len(order), size):
            part = where[s : s + size]
            chunk = _take(inputs, part)
            out.append((chunk, labels[part]))
        self._shuffled = ((seed, device), out, order)
        return out, order

    def race_paired(
        self,
        model: torch.nn.Module,
        reference: torch.Tensor,
        to_beat: float,
        *,
        racing: StatisticalRacing,
        strict: bool = False,
    ) -> Race:
        """Statistical racing: evaluate in :meth:`race_order`, example by example against
        the incumbent's values ``reference`` (every example's, in the data's own order),
        and stop once a confidence sequence on the paired differences says, at
        ``racing.confidence``, that the candidate's full score cannot meet ``to_beat``.

        At the k-th look (after each round of batches), with n examples seen, the full
        mean difference lies within :func:`confidence_radius` of the seen one at error
        (1 - confidence) / (k (k+1)); a union bound over the looks makes it hold at every
        look at once, so stopping at any of them is valid. Evaluated to the end, the score
        is the full evaluation's. Falls back to :meth:`race` when the data cannot be
        shuffled or there are no bounds; that race's ``test`` is then ``"exact"`` and its
        ``fallback`` says why.

        Example:
            >>> import torch
            >>> x, y = torch.eye(4).repeat(250, 1), torch.arange(4).repeat(250)
            >>> ev = Accuracy((x, y), batch_size=50)
            >>> wrong = torch.nn.Linear(4, 4, bias=False)
            >>> _ = wrong.weight.data.copy_(torch.eye(4).roll(1, 0))
            >>> r = ev.race_paired(wrong, torch.ones(1000), 1.0, racing=StatisticalRacing(0.999))
            >>> r.rejected, r.seen
            (True, 50)
        """
        bounds = self.racing_bounds(racing)
        if bounds is None:
            problem = "its per-example values have no bounds (a loss needs racing clip)"
        elif not self.scored_as_mean():
            problem = "its score is not the plain mean of its per-example values"
        else:
            problem = self._shuffled_or_problem(model_device(model), racing.seed)
        if not isinstance(problem, str) and len(reference) != len(problem[1]):
            problem = f"the incumbent has {len(reference)} values for {len(problem[1])} examples"
        if isinstance(problem, str):
            return replace(self.race(model, to_beat, strict=strict), fallback=problem)
        batches, order = problem
        low, high = bounds
        total = len(order)
        ref_all = reference.detach().double().cpu().clamp(low, high)
        ref = ref_all[order]
        ref_score = float(ref_all.mean())  # the incumbent's (clipped) full score
        starts = [0]
        for _, y in batches:
            starts.append(starts[-1] + len(y))
        sums = [0.0, 0.0, 0.0, 0.0]  # of differences, of their squares, examples, values
        best_value = high if self.higher_is_better else low  # for a loss: 0, never clipped
        looks = 0

        def stop(done: list[tuple[int, torch.Tensor]]) -> Race | None:
            nonlocal looks
            part = [0.0, 0.0, 0.0, 0.0]
            for i, values in done:
                self._check_bounds(values)
                v = values.double()
                d = v.clamp(low, high) - ref[starts[i] : starts[i + 1]]
                part = [
                    part[0] + float(d.sum()),
                    part[1] + float((d * d).sum()),
                    part[2] + len(d),
                    part[3] + float(v.sum()),
                ]
            if self.sharding is not None:
                part = self.sharding.sum_all(part, "racing")
            for j in range(4):
                sums[j] += part[j]
            n = int(sums[2])
            if n >= total:
                return None
            # the exact bound holds in any order, and may stop a candidate the paired test
            # cannot yet (an incumbent whose own values vary widely): its proof decides then
            exact = (sums[3] + best_value * (total - n)) / total
            if self._cannot_meet(exact, to_beat, strict):
                return Race(None, exact, n, total)
            looks += 1
            mean = sums[0] / n
            std = math.sqrt(max(sums[1] / n - mean * mean, 0.0))
            radius = confidence_radius(n, total, 2 * (high - low), std, racing.delta(looks))
            best = mean + radius if self.higher_is_better else mean - radius
            bound = ref_score + best  # how good its full score may still be
            if not self._cannot_meet(bound, to_beat, strict):
                return None
            return Race(None, bound, n, total, test="statistical")

        race, logits = self._rounds(model, batches, stop)
        if race is not None:
            return race
        own = torch.empty_like(logits)
        own[order] = logits  # back in the data's own order: scored as a full pass scores
        score = self.score_logits(own)
        return Race(score, score, total, total, self.per_example(own), test="statistical")

    def _cannot_meet(self, bound: float, to_beat: float, strict: bool) -> bool:
        # the bound is exact arithmetic; the margin covers the float32 mean of a full pass
        return falls_short(bound, to_beat, self.higher_is_better)

    def score_logits(self, logits: torch.Tensor) -> float:
        """The score of given logits (the ensemble baselines score averaged logits)."""
        return float(self.per_example(logits).float().mean())

    def evaluate(self, model: torch.nn.Module) -> float:
        return self.score_logits(self.logits(model))


def check_class_logits(logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """Refuse logits and labels a classifier score would misread: logits must be
    ``(examples, classes)`` with at least two classes and one row per label, and labels
    whole numbers in ``[0, classes)``. A one-logit binary head, token-level logits, or
    ``-100`` labels (ignored tokens) would otherwise give a plausible, wrong number.

    Example:
        >>> import torch
        >>> check_class_logits(torch.zeros(2, 3), torch.tensor([0, 2]), "accuracy")
        >>> try:
        ...     check_class_logits(torch.zeros(2, 1), torch.tensor([0, 1]), "accuracy")
        ... except ConfigError as err:
        ...     print(str(err)[:61])
        accuracy: the model gives logits of shape (2, 1) for 2 labels
    """
    shape = tuple(logits.shape)
    if logits.dim() != 2 or shape[0] != labels.numel() or shape[1] < 2:
        raise ConfigError(
            f"{what}: the model gives logits of shape {shape} for {labels.numel()} labels; a "
            "classifier evaluator needs one row of at least two class logits per label "
            "(batches of (inputs, labels); for a one-logit binary head, token labels or a "
            "regression, give your own evaluator)"
        )
    if labels.numel() == 0:
        return
    if labels.is_floating_point() or labels.is_complex():
        raise ConfigError(
            f"{what}: labels are {str(labels.dtype).replace('torch.', '')}, not class "
            "numbers; a classifier evaluator needs integer labels"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= shape[1]:
        bad = low if low < 0 else high
        raise ConfigError(
            f"{what}: label {bad} is not one of the model's {shape[1]} classes (0 to "
            f"{shape[1] - 1}); -100 marks ignored tokens, which needs your own evaluator"
        )


class Accuracy(ClassifierEvaluator):
    """Top-k accuracy of a classifier.

    Example:
        >>> import torch
        >>> x, y = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([1, 2])
        >>> Accuracy((x, y)).evaluate(torch.nn.Identity()), Accuracy((x, y), top_k=2).evaluate(
        ...     torch.nn.Identity())
        (0.5, 1.0)
    """

    kind = "accuracy"
    bounds = (0.0, 1.0)
    score_range = (0.0, 1.0)

    def __init__(
        self, data: Any, *, top_k: int = 1, batch_size: int = 256, name: str | None = None
    ):
        super().__init__(data, batch_size=batch_size, name=name)
        if top_k < 1:
            raise ConfigError(f"top_k={top_k} must be >= 1")
        self.top_k = top_k
        if top_k > 1:
            self.kind = f"top{top_k}-accuracy"

    def per_example_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_class_logits(logits, labels, self.kind)
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        return (top == labels[:, None]).any(dim=-1).float()


class MeanLoss(ClassifierEvaluator):
    """Mean cross-entropy of a classifier (lower is better).

    Example:
        >>> import torch
        >>> x, y = torch.zeros(2, 2), torch.tensor([0, 1])
        >>> round(MeanLoss((x, y)).evaluate(torch.nn.Identity()), 4)
        0.6931
    """

    kind = "loss"
    higher_is_better = False
    score_range = (0.0, math.inf)

    def per_example_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_class_logits(logits, labels, self.kind)
        return F.cross_entropy(logits, labels.long(), reduction="none")


class MetricEvaluator(ClassifierEvaluator):
    """A user metric over all logits and labels, e.g. macro-F1.

    Example:
        >>> import torch
        >>> x, y = torch.eye(2), torch.tensor([0, 1])
        >>> exact = lambda logits, labels: float((logits.argmax(-1) == labels).all())
        >>> MetricEvaluator((x, y), exact, name="exact").evaluate(torch.nn.Identity())
        1.0
    """

    kind = "metric"

    def __init__(
        self,
        data: Any,
        metric: Callable[[torch.Tensor, torch.Tensor], float],
        *,
        higher_is_better: bool = True,
        batch_size: int = 256,
        name: str | None = None,
    ):
        super().__init__(data, batch_size=batch_size, name=name)
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.kind = getattr(metric, "__name__", "metric")

    def per_example(self, logits: torch.Tensor) -> None:
        # A metric over the whole set has no per-example results: the report then
        # shows no bootstrap interval rather than one for a different metric.
        return None

    def score_logits(self, logits: torch.Tensor) -> float:
        return float(self.metric(logits, self.labels))
