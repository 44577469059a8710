"""Validation of method and objective options: plain dataclasses checked field by field.

Options are ``@dataclass`` classes whose fields carry type annotations and
defaults. :func:`build_options` turns a dict of user values into an instance and
reports *every* problem at once: unknown keys (with a did-you-mean), values of
the wrong type, values outside a ``Literal``, values no field can use
(:func:`value_problem`: NaN/inf, integers past 64 bits, NUL characters), and
whatever the class's optional ``validate(self) -> list[str]`` method returns.
Options must stay JSON-friendly (numbers, strings, booleans, lists, dicts,
``None``) because they are saved in ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

from peftkit.errors import OptionsError

__all__ = ["build_options", "options_to_dict", "check_value", "value_problem", "did_you_mean", "MAX_INT"]

T = TypeVar("T")

#: The largest integer magnitude any option or recipe field accepts: what fits the int64 that torch and
#: numpy take (and converts to a float exactly enough), far past any count, size or seed that means something.
MAX_INT = 2**63 - 1


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (a small, JSON-oriented subset of typing)."""
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return any(check_value(value, a) for a in get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = get_args(tp)
        inner = args[0] if args else Any
        return all(check_value(v, inner) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        args = get_args(tp)
        if not args:
            return True
        return all(check_value(k, args[0]) and check_value(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def value_problem(value: Any) -> str | None:
    """Why ``value`` (or anything inside a list or dict of it) is unusable whatever the field's type, or ``None``.

    Checked after :func:`check_value`: NaN and infinities (they make every
    loss and weight they touch NaN), integers beyond :data:`MAX_INT` (they
    overflow the moment they become a float or a tensor) and strings holding a
    NUL character (no path, name or text can contain one).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number; give a finite value"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"is too large; integers must be within +-{MAX_INT} (2**63 - 1)"
    if isinstance(value, str) and "\0" in value:
        return "contains a NUL character (\\0); remove it"
    parts = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for part in parts:
        problem = value_problem(part)
        if problem is not None:
            return f"holds {_short_repr(part)}, which {problem}"
    return None


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit conversion limit
        return f"<an integer of about {math.ceil(value.bit_length() * math.log10(2))} digits>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def build_options(cls: type[T], values: Mapping[str, Any] | None = None, *, owner: str | None = None) -> T:
    """Validate ``values`` against the dataclass ``cls`` and return an instance.

    :param cls: an options dataclass.
    :param values: user-supplied values; missing fields take their defaults.
    :param owner: how to name the owner in errors (e.g. ``"method 'lora'"``).
    :raises OptionsError: listing every unknown key, wrong type, missing required
        field and failed ``validate()`` check at once.
    """
    values = dict(values or {})
    owner = owner or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    for key in values:
        if key not in fields:
            problems.append(
                f"unknown option {key!r}{did_you_mean(key, fields)}; valid options: {', '.join(sorted(fields))}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"option {name!r} is required ({_type_name(hints[name])})")
            continue
        value = values[name]
        if isinstance(value, tuple):
            value = list(value)
        if not check_value(value, hints[name]):
            problems.append(f"option {name!r} = {_short_repr(value)} is not valid; expected {_type_name(hints[name])}")
            continue
        problem = value_problem(value)
        if problem is not None:
            problems.append(f"option {name!r} = {_short_repr(value)} {problem}")
            continue
        if hints[name] is float and isinstance(value, int):
            value = float(value)
        kwargs[name] = value
    try:  # range checks run on the valid values too, so every problem is reported at once
        instance = cls(**kwargs)
    except TypeError:  # a required field is missing: already reported
        instance = None
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problems.extend(validate())
    if problems:
        raise OptionsError(owner, problems)
    return instance


def options_to_dict(options: Any) -> dict[str, Any]:
    """The JSON-friendly dict form of an options dataclass instance."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.init}
