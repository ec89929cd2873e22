"""The base of every block of options a config or a caller gives: unknown keys are errors,
and a number, a flag or a list of numbers is taken only as written.

pydantic's lax mode reads ``'3'`` as 3, ``yes`` as 1 and ``'no'`` as False. In a YAML
config those are mistakes (a quoted number, a flag where a count belongs), and taking
them silently runs a cook that is not the one the user wrote, so they are refused here,
once, for every options model that derives from :class:`OptionsModel`.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_SCALARS = (bool, int, float, str)


class WrittenNumber(str):
    """A YAML plain scalar such as ``1e-3``: YAML 1.1 reads it as text (its floats need a
    dot), YAML 1.2 and Python as a number. It stays the text written where text goes (a
    label, a path: ``runs/1e-3``) and is the number where a number goes (``lr: 1e-3``).

    Example:
        >>> value = WrittenNumber("1e-3")
        >>> value == "1e-3", value.number()
        (True, 0.001)
    """

    def number(self) -> float | int:
        """The number it reads as: an int when it is a whole number (``8e9``)."""
        value = float(self)
        return int(value) if value.is_integer() and abs(value) < 2**63 else value


def _read_as(value: Any, kinds: set[type]) -> Any:
    # a WrittenNumber becomes the number where a number goes and no text does
    if isinstance(value, WrittenNumber):
        return str(value) if str in kinds or object in kinds else value.number()
    return value


def _kinds(annotation: Any) -> set[type]:
    """The plain scalar types an annotation admits (``object``: something else)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(arg) for arg in typing.get_args(annotation)))
    if annotation is type(None):
        return set()
    if origin is Literal:
        return set()  # pydantic takes only the literal values themselves
    return {annotation} if annotation in _SCALARS else {object}


def _literals(annotation: Any) -> tuple:
    """The values of the ``Literal[...]`` parts of an annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin in (Annotated, Union, types.UnionType):
        args = typing.get_args(annotation)
        return sum((_literals(a) for a in (args[:1] if origin is Annotated else args)), ())
    return ()


def _elements(annotation: Any) -> set[type] | None:
    """The scalar types of a ``list[...]`` or ``tuple[...]`` of scalars' elements."""
    for arg in [annotation, *typing.get_args(annotation)]:
        if typing.get_origin(arg) in (list, tuple):
            kinds = set().union(*(_kinds(a) for a in typing.get_args(arg) if a is not ...))
            return kinds if object not in kinds else None
    return None


def _problem(value: Any, kinds: set[type], literals: tuple = ()) -> str | None:
    """Why ``value`` is not what a field of these scalar ``kinds`` (and ``literals``)
    takes, or ``None``."""
    if object in kinds or not kinds or value is None or value in literals:
        return None
    numbers = kinds & {int, float}
    if isinstance(value, bool):
        if bool in kinds or not numbers:
            return None
        return f"write a number, not {value!r} (YAML reads yes/no/on/off as true/false)"
    if str in kinds:
        return None  # taken as written, e.g. '8GB' where bytes or a size may go
    if isinstance(value, str) and numbers:
        return f"write a number without quotes, not {value!r}"
    if bool in kinds and not numbers:
        named = "".join(f", {v}" for v in literals)
        return f"write true{' or false' if not named else ', false'}{named}, not {value!r}"
    return None


class OptionsModel(BaseModel):
    """Options with no unknown keys and no silent conversions of numbers and flags.

    Example:
        >>> class Steps(OptionsModel):
        ...     count: int = 1
        >>> Steps(count=3).count
        3
        >>> try:
        ...     Steps(count="3")
        ... except ValueError as err:
        ...     print(err.errors()[0]["msg"])
        Value error, write a number without quotes, not '3'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        value = _read_as(value, _kinds(annotation))
        elements = _elements(annotation)
        if elements is not None and isinstance(value, list | tuple):
            value = type(value)(_read_as(v, elements) for v in value)
        problem = _problem(value, _kinds(annotation), _literals(annotation))
        if problem is None and elements is not None and isinstance(value, list | tuple):
            problem = next((p for v in value if (p := _problem(v, elements))), None)
        if problem is not None:
            raise ValueError(problem)
        return value
