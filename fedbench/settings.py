"""How a setting is declared and checked, for RunConfig (``fedbench.config``) and each method's ``Options``.

A setting is a dataclass field ``name: Annotated[type, Range(...), "help"] = default``; the type is bool,
int, float, str, ``str | None`` or a ``Literal`` of the allowed strings. ``specs`` reads the declarations,
``parse`` turns a flag's text into the declared type, ``check`` validates a typed value (from TOML, or a
parsed flag) and raises the ConfigError that names the flag and what is allowed.
"""
from __future__ import annotations

import math
import operator
import sys
import types
from dataclasses import MISSING, astuple, dataclass, fields
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from fedbench.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows (bounds, each None or a number); a float must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        ops = (operator.ge, operator.gt, operator.le, operator.lt)
        return ((isinstance(value, int) or math.isfinite(value))
                and all(b is None or op(value, b) for b, op in zip(astuple(self), ops)))

    def __str__(self) -> str:
        return " and ".join(f"{op} {b}" for b, op in zip(astuple(self), (">=", ">", "<=", "<")) if b is not None)


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Spec:
    """One declared setting: a field of RunConfig or of an ``Options`` dataclass, or a model's keyword."""

    name: str
    kind: Any             # bool, int, float, str, str | None, a Literal of strings, tuple[float, ...]
    default: Any
    help: str = ""
    range: Range = Range()

    @property
    def choices(self) -> tuple[str, ...]:
        return get_args(self.kind) if get_origin(self.kind) is Literal else ()

    @property
    def base(self) -> type:
        """The Python type of a value: str for a Literal or ``str | None``."""
        if self.choices:
            return str
        if get_origin(self.kind) in (Union, types.UnionType):
            return next(a for a in get_args(self.kind) if a is not type(None))
        return get_origin(self.kind) or self.kind

    @property
    def allowed(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.base in (int, float):
            return " ".join(filter(None, ("an integer" if self.base is int else "a finite number", str(self.range))))
        return KINDS.get(self.base, "")


@cache
def specs(cls: type) -> dict[str, Spec]:
    """The settings a dataclass declares: ``name: Annotated[type, Range(...), "help"] = default``."""
    hints = get_type_hints(cls, include_extras=True)
    out = {}
    for f in fields(cls):
        kind, *meta = get_args(hints[f.name]) if get_origin(hints[f.name]) is Annotated else (hints[f.name],)
        out[f.name] = Spec(f.name, kind, f.default_factory() if f.default is MISSING else f.default,
                           next((m for m in meta if isinstance(m, str)), ""),
                           next((m for m in meta if isinstance(m, Range)), Range()))
    return out


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse(spec: Spec, text: str) -> Any:
    """A flag's text -> a value of the declared type (``check`` then checks it like a TOML value)."""
    try:
        if spec.base is bool:
            return {**dict.fromkeys(TRUE, True), **dict.fromkeys(FALSE, False)}[text.strip().lower()]
        return spec.base(text) if spec.base in (int, float) else text
    except (KeyError, ValueError):
        raise ConfigError(flag(spec.name), f"{text!r} is not {KINDS[spec.base]}; allowed: {spec.allowed}") from None


def check(spec: Spec, value: Any) -> Any:
    """A typed value (TOML, or a parsed flag) as declared, or a ConfigError naming the flag and what is allowed."""
    base, name = spec.base, flag(spec.name)
    if (value is None and spec.default is None) or base is tuple:  # memory_budget: parse_budget
        return value
    given = value
    if base is float and type(value) is int:
        value = float(value) if abs(value) <= sys.float_info.max else math.inf
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(name, f"{given!r} is not {KINDS[base]}; allowed: {spec.allowed}")
    if (spec.choices and value not in spec.choices) or (base in (int, float) and value not in spec.range):
        raise ConfigError(name, f"{given!r} not allowed; allowed: {spec.allowed}")
    return value
