"""How a setting is declared and checked, for RunConfig (``fedbench.config``) and each method's ``Options``.

A setting is a dataclass field ``name: Annotated[type, Range(...), "help"] = default``; the type is bool,
int, float, str, ``str | None``, a ``Literal`` of the allowed strings, or such a Literal or a number
(``Literal["auto"] | int``). ``specs`` reads the declarations, ``parse`` turns a flag's text into the declared
type, ``check`` validates a typed value (from TOML, or a parsed flag) and raises the ConfigError that names the
flag and what is allowed.
"""
from __future__ import annotations

import math
import operator
import os
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
    def kinds(self) -> tuple:
        """The members of a union kind, else the kind alone."""
        return get_args(self.kind) if get_origin(self.kind) in (Union, types.UnionType) else (self.kind,)

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed strings of a Literal (alone, or beside a number)."""
        return tuple(c for k in self.kinds if get_origin(k) is Literal for c in get_args(k))

    @property
    def base(self) -> type:
        """The Python type of a value: str for a Literal or ``str | None``, int for ``Literal["auto"] | int``."""
        kind = next((k for k in self.kinds if k is not type(None) and get_origin(k) is not Literal), str)
        return get_origin(kind) or kind

    @property
    def allowed(self) -> str:
        if self.base in (int, float):
            number = " ".join(filter(None, ("an integer" if self.base is int else "a finite number", str(self.range))))
            return " or ".join((*self.choices, number))
        return ", ".join(self.choices) or KINDS.get(self.base, "")


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


def env_default(variable: str, default: str) -> str | int:
    """A setting's default taken from the environment when set there (digits read as an integer)."""
    value = os.environ.get(variable, default)
    return int(value) if value.isdigit() else value


def parse(spec: Spec, text: str) -> Any:
    """A flag's text -> a value of the declared type (``check`` then checks it like a TOML value)."""
    if text in spec.choices:
        return text
    try:
        if spec.base is bool:
            return {**dict.fromkeys(TRUE, True), **dict.fromkeys(FALSE, False)}[text.strip().lower()]
        return spec.base(text) if spec.base in (int, float) else text
    except (KeyError, ValueError):
        raise ConfigError(flag(spec.name), f"{text!r} is not {KINDS[spec.base]}; allowed: {spec.allowed}") from None


def check(spec: Spec, value: Any) -> Any:
    """A typed value (TOML, or a parsed flag) as declared, or a ConfigError naming the flag and what is allowed."""
    base, name = spec.base, flag(spec.name)
    if (value is None and spec.default is None) or base is tuple or value in spec.choices:  # tuple: parse_budget
        return value
    given = value
    if base is float and type(value) is int:
        value = float(value) if abs(value) <= sys.float_info.max else math.inf
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(name, f"{given!r} is not {KINDS[base]}; allowed: {spec.allowed}")
    if (base is str and spec.choices) or (base in (int, float) and value not in spec.range):
        raise ConfigError(name, f"{given!r} not allowed; allowed: {spec.allowed}")
    return value
