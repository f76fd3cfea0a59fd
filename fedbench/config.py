"""RunConfig: CLI flags > ``--config`` TOML > defaults, resolved and validated once."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from fedbench.errors import ConfigError

if TYPE_CHECKING:
    from fedbench.data import Dataset


@dataclass(frozen=True)
class RunConfig:
    method: str = "fedavg"
    dataset: str = "fmnist-mini"
    data_dir: str | None = None
    model: str | None = None              # None: the method's preferred model, else cnn for 1-channel data, else resnet20
    clients: int = 100
    clients_per_round: int = 10
    rounds: int = 40
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "const"
    partition: str = "iid"
    augment: str = "auto"                 # auto: crop-flip for colour images up to 64 px, else none (data.auto_augment)
    memory_budget: tuple[float, ...] = (1.0,)
    budget_assignment: str = "fixed"      # fixed: equal client groups; per-round: drawn from the list each round
    eval_every: int = 5
    device: str = "auto"
    seed: int = 0
    weighting: str = "samples"            # masked-mean weights: client samples or uniform
    client_state: str = "stateless"       # stateless: everything re-sent each round; stateful: only what changed
    checkpoint_every: int = 0             # 0: a checkpoint only at the end
    client_batching: str = "auto"         # on: clients sharing a plan shape train together (vmap); off; auto: on on GPUs
    out: str | None = None
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # method- and model-specific keys

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_budget"] = list(self.memory_budget)
        return {k: v for k, v in d.items() if v is not None}


CHOICES = {"lr_schedule": ("const", "cosine"), "budget_assignment": ("fixed", "per-round"), "device": ("auto", "cpu", "cuda"),
           "weighting": ("samples", "uniform"), "client_state": ("stateless", "stateful"),
           "client_batching": ("auto", "on", "off"), "augment": ("auto", "none", "crop-flip")}
POSITIVE_INT = ("clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "eval_every")
FIELDS = {f.name for f in fields(RunConfig)} - {"options"}
# How a run executes, not what it computes (results equal within float tolerance): may differ between the
# runs of one table and when a run is continued.
EXECUTION = {"out", "quiet", "checkpoint_every", "device", "client_batching"}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_budget(value: Any) -> tuple[float, ...]:
    """'0.125,0.25' or [0.125, 0.25] or 0.5 -> positive finite floats."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        budgets = tuple(float(v) for v in items)
    except ValueError:
        budgets = ()
    if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
        raise ConfigError("--memory-budget", f"{value!r} is not a positive number or a comma list of them "
                          "(fractions of the full model's measured training memory, e.g. 0.25 or 0.125,0.25,0.5,1)")
    return budgets


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"malformed TOML in {path}: {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(flags: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """Merge defaults < TOML < flags (flags that are None do not count) and validate."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    values |= {k: v for k, v in flags.items() if v is not None}
    options = {**values.pop("options", {}), **{k: values.pop(k) for k in list(values) if k not in FIELDS}}
    if "memory_budget" in values:
        values["memory_budget"] = parse_budget(values["memory_budget"])
    try:
        cfg = RunConfig(**values, options=options)
    except TypeError as e:
        raise ConfigError("--config", str(e)) from None
    return validate(cfg)


def validate(cfg: RunConfig) -> RunConfig:
    from fedbench.models import create_model, list_models, model_options
    from fedbench.partition import parse_partition
    from fedbench.registry import get_method

    for key in fields(RunConfig):
        value = getattr(cfg, key.name)
        if key.name in POSITIVE_INT and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(flag(key.name), f"must be a positive integer, got {value!r}")
        if key.name in CHOICES and value not in CHOICES[key.name]:
            raise ConfigError(flag(key.name), f"{value!r} not allowed; allowed: {', '.join(CHOICES[key.name])}")
    if cfg.clients_per_round > cfg.clients:
        raise ConfigError("--clients-per-round", f"{cfg.clients_per_round} exceeds --clients {cfg.clients}; "
                          f"allowed: 1..{cfg.clients}")
    for key, ok, allowed in (("lr", cfg.lr > 0, "> 0"), ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"),
                             ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                             ("checkpoint_every", cfg.checkpoint_every >= 0, ">= 0")):
        if not ok:
            raise ConfigError(flag(key), f"{getattr(cfg, key)!r} not allowed; must be {allowed}")
    parse_budget(cfg.memory_budget)
    parse_partition(cfg.partition)
    method = get_method(cfg.method)
    if cfg.model is not None and cfg.model not in list_models():
        create_model(cfg.model)  # raises the ConfigError listing the models
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda requested but no CUDA device is available; allowed here: auto, cpu")
    method_keys = {f.name for f in fields(method.Options)}
    model_keys = set(model_options(cfg.model)) if cfg.model else set()
    unknown = set(cfg.options) - method_keys - model_keys
    if unknown and cfg.model is not None:  # model options are known once the model is
        allowed = sorted(flag(k) for k in method_keys | model_keys) or ["(none)"]
        raise ConfigError(flag(sorted(unknown)[0]), f"not an option of method {cfg.method!r}"
                          f"{' or model ' + repr(cfg.model) if cfg.model else ''}; allowed: {', '.join(allowed)}")
    method_options(method, cfg)  # type-checks the values
    if cfg.model is not None:
        model_kwargs(cfg)
    return cfg


def method_options(method, cfg: RunConfig):
    """The method's typed options dataclass, built from ``cfg.options``."""
    kw = {}
    for f in fields(method.Options):
        if f.name not in cfg.options:
            continue
        value = cfg.options[f.name]
        kw[f.name] = coerce(f.name, value, type(getattr(method.Options(), f.name)))
    return method.Options(**kw)


def coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a string flag value to the option's type; bools accept true/false/1/0."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip().lower()
    try:
        if kind is bool:
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(flag(key), f"{value!r} is not a valid {kind.__name__}") from None


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Model-specific options (e.g. ``--depth`` of vit-tiny), typed like the model's defaults."""
    from fedbench.models import model_options
    defaults = model_options(cfg.model)
    return {k: coerce(k, v, type(defaults[k])) for k, v in cfg.options.items() if k in defaults}


def for_dataset(cfg: RunConfig, dataset: "Dataset") -> RunConfig:
    """Fill what depends on the data once it is known: the default model (then check model-specific
    options) and ``--augment auto`` (the dataset's default, so config.toml records what was done)."""
    from fedbench.registry import get_method

    if cfg.augment == "auto":
        cfg = replace(cfg, augment="crop-flip" if dataset.augment else "none")
    if cfg.model is not None:
        return cfg
    default = get_method(cfg.method).preferred_model or ("cnn" if dataset.in_chans == 1 else "resnet20")
    return validate(replace(cfg, model=default))

