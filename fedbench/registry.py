"""The registered methods (timm's layout): importing ``fedbench.methods`` (the repository's methods/) imports every
method module, and each registers itself with ``fedbench.method.register_method``; here they are listed and looked up."""
from __future__ import annotations

import fedbench.methods  # noqa: F401  (each module registers itself on import)
from fedbench.errors import ConfigError
from fedbench.method import METHODS, Method


def list_methods() -> list[type[Method]]:
    return [METHODS[k] for k in sorted(METHODS)]


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError("--method", f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]
