"""Method registry: methods register themselves with a decorator (timm's ``register_model`` style)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fedbench.errors import ConfigError

if TYPE_CHECKING:
    from fedbench.method import Method

_METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator; the class declares ``name``, ``description`` and ``paper``."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load() -> None:
    import methods  # noqa: F401  (each module registers itself on import)


def list_methods() -> list[type["Method"]]:
    _load()
    return [_METHODS[k] for k in sorted(_METHODS)]


def get_method(name: str) -> type["Method"]:
    _load()
    if name not in _METHODS:
        raise ConfigError("--method", f"unknown method {name!r}; allowed: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
