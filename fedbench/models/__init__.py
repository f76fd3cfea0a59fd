"""Model registry in the spirit of timm's ``register_model`` / ``create_model``."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedbench.errors import ConfigError
from fedbench.models.base import FedModel, Scaler, scaled

_MODELS: dict[str, Callable[..., FedModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., FedModel]], Callable[..., FedModel]]:
    def add(fn: Callable[..., FedModel]) -> Callable[..., FedModel]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn
    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_options(name: str) -> dict[str, Any]:
    """A model's own keyword options (beyond the standard ones) and their defaults."""
    standard = {"self", "num_classes", "in_chans", "img_size", "widths", "rate"}
    params = inspect.signature(_MODELS[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in standard and p.default is not p.empty}


def create_model(name: str, **kwargs) -> FedModel:
    """Build a registered model; kwargs: num_classes, in_chans, img_size, widths, rate, depth..."""
    if name not in _MODELS:
        raise ConfigError("--model", f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    return _MODELS[name](**{k: v for k, v in kwargs.items() if v is not None})


from fedbench.models import cnn, preresnet, resnet, resnet_slt, vit  # noqa: E402,F401  (registration by import)

__all__ = ["FedModel", "Scaler", "scaled", "register_model", "create_model", "list_models", "model_options"]
