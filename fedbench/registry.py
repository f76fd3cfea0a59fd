"""The registered methods (timm's layout): importing ``fedbench.methods`` (the repository's methods/) imports every
method module, and each registers itself with ``fedbench.method.register_method``; here they are listed and looked up,
and a run's method, model and their options (each method's ``Options``, each model's keywords) are checked."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import fedbench.methods  # noqa: F401  (each module registers itself on import)
from fedbench.config import DEFAULT_MODEL, RunConfig
from fedbench.errors import ConfigError
from fedbench.method import METHODS, Method
from fedbench.models import create_model, list_models, model_options
from fedbench.settings import Spec, check, flag, specs


def list_methods() -> list[type[Method]]:
    return [METHODS[k] for k in sorted(METHODS)]


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError("--method", f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def model_specs(name: str) -> dict[str, Spec]:
    """A model's own options (e.g. vit-tiny's ``depth``), typed like their defaults."""
    return {k: Spec(k, type(v), v) for k, v in model_options(name).items()}


def option_specs() -> dict[str, list[tuple[str, Spec]]]:
    """Every method and model option: name -> [(owner, declaration)], e.g. tau -> [("fedssl", ...), ...]."""
    out: dict[str, list[tuple[str, Spec]]] = {}
    for method in list_methods():
        for name, spec in specs(method.Options).items():
            out.setdefault(name, []).append((method.name, spec))
    for model in list_models():
        for name, spec in model_specs(model).items():
            out.setdefault(name, []).append((f"model {model}", spec))
    return out


def check_options(cfg: RunConfig) -> RunConfig:
    """The method, the model (default: the method's preferred one, else DEFAULT_MODEL) and ``cfg.options``, each
    typed as the method's ``Options`` or the model's keywords declare it; an option that neither has is refused."""
    method = get_method(cfg.method)
    model = cfg.model or method.preferred_model or DEFAULT_MODEL
    if model not in list_models():
        create_model(model)  # raises the ConfigError listing the models
    own = specs(method.Options) | model_specs(model)
    unknown = sorted(set(cfg.options) - set(own))
    if unknown:
        allowed = sorted(flag(k) for k in own) or ["(none)"]
        raise ConfigError(flag(unknown[0]), f"not an option of method {cfg.method!r} or model {model!r}; "
                                            f"allowed: {', '.join(allowed)}")
    return replace(cfg, model=model, options={k: check(own[k], v) for k, v in cfg.options.items()})


def method_options(method: type[Method], cfg: RunConfig):
    """The method's ``Options``, filled from ``cfg.options``."""
    own = specs(method.Options)
    return method.Options(**{k: check(own[k], v) for k, v in cfg.options.items() if k in own})


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The model's own options (e.g. ``--depth`` of vit-tiny) among ``cfg.options``."""
    own = model_specs(cfg.model)
    return {k: check(own[k], v) for k, v in cfg.options.items() if k in own}
