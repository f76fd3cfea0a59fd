"""RunConfig: every run setting declared once (type, default, allowed values, help: ``fedbench.settings``),
resolved as CLI flags > ``--config`` TOML > defaults and validated once.

The CLI options of ``run``/``compare``/``profile`` (``fedbench.cli``), the checks of TOML and flag values,
config.toml and the help text are all derived from these declarations; a method's options likewise from
its ``Options`` dataclass, a model's from the keyword defaults of its factory (both: ``fedbench.registry``).
Here each setting of the run is checked on its own and against the others; the method, the model, their
options, the device profile and the partition are checked by the modules that own them (``fedbench.launch``
composes the checks).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from fedbench.budget import DEVICES
from fedbench.devices import size
from fedbench.errors import ConfigError
from fedbench.settings import Range, check, env_default, specs

if TYPE_CHECKING:
    from fedbench.data import Dataset


@dataclass(frozen=True)
class RunConfig:
    method: Annotated[str, "FL method (see `fedbench methods`)."] = "fedavg"
    dataset: Annotated[str, "fmnist-mini (embedded), fashion-mnist, mnist, cifar10, cifar100, synthetic[:CxS:N], "
                            "imagefolder:PATH."] = "fmnist-mini"
    data_dir: Annotated[str | None, "Folder with the dataset files (downloaded there when online)."] = None
    model: Annotated[str | None, "resnet20, preresnet20, fedavg-cnn, vit-tiny, ... (default: resnet20; the "
                                 "self-supervised methods: vit-tiny)."] = None
    clients: Annotated[int, Range(ge=1, le=10_000_000), "Number of clients."] = 100
    clients_per_round: Annotated[int, Range(ge=1, le=10_000_000), "Clients sampled each round."] = 10
    rounds: Annotated[int, Range(ge=1, le=1_000_000), "Communication rounds."] = 40
    local_epochs: Annotated[int, Range(ge=1, le=10_000), "Local epochs per round (per step)."] = 1
    batch_size: Annotated[int, Range(ge=1, le=10_000_000), "Local mini-batch size (a client with fewer samples "
                                                           "uses them all)."] = 32
    lr: Annotated[float, Range(gt=0, le=100), "Client learning rate."] = 0.05
    momentum: Annotated[float, Range(ge=0, lt=1), "SGD momentum."] = 0.9
    weight_decay: Annotated[float, Range(ge=0, le=1), "SGD weight decay."] = 5e-4
    lr_schedule: Annotated[Literal["const", "cosine"], "Learning rate over the rounds."] = "const"
    lr_floor: Annotated[float, Range(ge=0, lt=1), "With --lr-schedule cosine: the rate it decays to by the last "
                        "round, as a fraction of --lr (0: to zero; SLT's code: 0.1)."] = 0.0
    partition: Annotated[str, "iid, dirichlet:ALPHA or shards:K."] = "iid"
    augment: Annotated[Literal["auto", "none", "crop-flip"], "Training augmentation: auto (pad-4 crop + flip for "
                       "colour images up to 64 px, none for grey ones), none or crop-flip."] = "auto"
    memory_budget: Annotated[tuple[float, ...], "Fraction(s) of the full model's measured training memory, or absolute "
                                                "sizes (8MB, 512KiB; MB = 1e6 B), or devices (each client's device "
                                                "memory, from --devices); a comma list splits clients into equal "
                                                "groups."] = (1.0,)
    budget_assignment: Annotated[Literal["fixed", "per-round"], "fixed (equal client groups) or per-round (each "
                                 "client's budget drawn from the list every round)."] = "fixed"
    over_budget: Annotated[Literal["record", "drop"], "A client whose configuration measures above its budget: "
                           "record (it trains; the violation is counted and marked) or drop (it runs out of "
                           "memory: trains and sends nothing that round; counted as dropped)."] = "record"
    devices: Annotated[str | None, "Device profile, giving each client-round a simulated time: a preset (edge), a "
                       "CSV file (one row per device class with a share, or one per client) or a spec "
                       "flops=LOW..HIGH,memory=...,up=...,down=... (see fedbench.devices)."] = None
    deadline: Annotated[float | None, Range(gt=0, le=1e12), "Seconds of simulated time: a client that would finish "
                        "its round later is dropped from it (trains, but its update is not used); needs "
                        "--devices."] = None
    eval_every: Annotated[int | None, Range(ge=1, le=1_000_000), "Evaluate every N rounds (and after the last); "
                          "default: 10 for runs of 100 rounds or more, else 5 (config.toml records it)."] = None
    eval_initial: Annotated[bool, "Also evaluate the initial global model, before round 1: the untrained baseline "
                            "(a random encoder under a linear probe); summary.json initial_accuracy, shown in the "
                            "tables as (untrained X)."] = False
    device: Annotated[Literal["auto", "cpu", "cuda"], "auto: cuda when available."] = "auto"
    precision: Annotated[Literal["auto", "fp32", "bf16"], "Arithmetic of training and evaluation: fp32, or bf16 "
                         "autocast (activations in bfloat16, weights and updates in float32; measured as run); auto: "
                         "bf16 where the device runs it natively and a start-up measurement finds it faster, else "
                         "fp32 (config.toml records the choice; FEDBENCH_PRECISION sets the default)."] = \
        env_default("FEDBENCH_PRECISION", "auto")
    seed: Annotated[int, Range(ge=0, le=2**32 - 1), "Fixes partition, sampling, init and training order."] = 0
    weighting: Annotated[Literal["method", "samples", "uniform"], "Masked-mean weights of the clients: method (as "
                         "the method's code does: uniform for heterofl, fedrolex, fd, slt, small; samples for the "
                         "others), samples (client size) or uniform."] = "method"
    client_state: Annotated[Literal["stateless", "stateful"], "Bytes down: stateless (everything sent each round) "
                            "or stateful (only what changed)."] = "stateless"
    checkpoint_every: Annotated[int, Range(ge=0, le=1_000_000), "Checkpoint every N rounds (0: only at the end and "
                                                                "on Ctrl-C)."] = 0
    client_batching: Annotated[Literal["auto", "on", "off"], "on: clients that share a plan shape train together "
                               "(vmap; same results within float tolerance); off: one at a time; auto: on on a "
                               "GPU, off on a CPU."] = "auto"
    processes: Annotated[Literal["auto"] | int, Range(ge=1), "Processes that share each round's clients, each with "
                         "cores/N threads; results equal one process's at the same threads per process. auto: 2 on a "
                         "CPU with 2+ cores, 1 on a GPU (FEDBENCH_PROCESSES sets the default); ignored under torchrun "
                         "and in compare's cells (one process each)."] = env_default("FEDBENCH_PROCESSES", "auto")
    out: Annotated[str | None, "Run folder (default results/runs/<method>-<timestamp>)."] = None
    quiet: Annotated[bool, "No progress bar and no summary table."] = False
    log: Annotated[str | None, "Also log every round to a tracker: tensorboard (pip install 'fedbench[tensorboard]'; "
                               "event files in the run folder's tensorboard/) or MODULE:CLASS, a "
                               "fedbench.tracking.Tracker (Weights & Biases, MLflow: see the README)."] = None
    options: dict[str, Any] = field(default_factory=dict)  # method- and model-specific keys

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_budget"] = list(self.memory_budget)
        return {k: v for k, v in d.items() if v is not None}

    def settings(self) -> dict[str, Any]:
        """The run settings and the method's and model's options in one flat dict, as config.toml lists them."""
        d = self.to_dict()
        return d | d.pop("options")


RUN = {k: s for k, s in specs(RunConfig).items() if k != "options"}  # the run settings
DEFAULT_MODEL = "resnet20"  # of every supervised method, on every dataset: one model for a comparison
FIELDS = set(RUN)
# How a run executes, not what it computes (results equal within float tolerance): may differ between the
# runs of one table and when a run is continued.
EXECUTION = {"out", "quiet", "checkpoint_every", "device", "client_batching", "processes", "log"}


def parse_budget(value: Any) -> tuple[float | str, ...]:
    """'0.125,0.25' or [0.125, 0.25] or 0.5 -> positive finite fractions; '8MB,16MB' -> absolute sizes, kept as
    their text without spaces ('8MB'); 'devices' (alone) -> each client's device memory."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    budgets = []
    for v in items:
        text = v.replace(" ", "") if isinstance(v, str) else v
        if isinstance(text, str) and (text == DEVICES or (size(text) or 0) > 0):
            budgets.append(text)
            continue
        try:
            budgets.append(float(text) if not isinstance(text, bool) else math.nan)
        except (TypeError, ValueError):
            budgets.append(math.nan)
    numbers = [b for b in budgets if not isinstance(b, str)]
    if not budgets or not all(math.isfinite(b) and b > 0 for b in numbers) or (DEVICES in budgets and len(budgets) > 1):
        raise ConfigError("--memory-budget", f"{value!r} is not a positive number, size or a comma list of them "
                          "(fractions of the full model's measured training memory, e.g. 0.25 or 0.125,0.25,0.5,1; "
                          "sizes, e.g. 8MB,16MB; or devices alone)")
    return tuple(budgets)


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError("--config", f"cannot read {path} ({e.strerror or e}); allowed: a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not UTF-8 text; allowed: a TOML file (UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"malformed TOML in {path}: {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(flags: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """Merge defaults < TOML < flags (typed values; flags that are None do not count) and validate."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    values |= {k: v for k, v in flags.items() if v is not None}
    options = values.pop("options", {})
    if not isinstance(options, dict):
        raise ConfigError("--config", f"options = {options!r}: must be a table of method and model options")
    options = {**options, **{k: values.pop(k) for k in list(values) if k not in FIELDS}}
    return validate(RunConfig(**values, options=options))


def validate(cfg: RunConfig) -> RunConfig:
    """Each setting as declared (type, choices, range; the budget parsed), then the rules among them."""
    checked = {k: check(spec, getattr(cfg, k)) for k, spec in RUN.items()}
    cfg = replace(cfg, **checked | {"memory_budget": parse_budget(cfg.memory_budget)})
    if cfg.out == "":
        raise ConfigError("--out", "an empty path; allowed: a folder path")
    if cfg.eval_every is None:  # a long run spends less of its time evaluating; the last round is always evaluated
        cfg = replace(cfg, eval_every=10 if cfg.rounds >= 100 else 5)
    if cfg.lr_floor and cfg.lr_schedule != "cosine":
        raise ConfigError("--lr-floor", f"{cfg.lr_floor} is where --lr-schedule cosine ends; allowed with "
                                        f"--lr-schedule {cfg.lr_schedule}: 0")
    if cfg.clients_per_round > cfg.clients:
        raise ConfigError("--clients-per-round", f"{cfg.clients_per_round} exceeds --clients {cfg.clients}; "
                          f"allowed: 1..{cfg.clients}")
    from_devices = cfg.memory_budget == (DEVICES,)
    if cfg.devices is None and (from_devices or cfg.deadline is not None):
        raise ConfigError("--memory-budget" if from_devices else "--deadline",
                          "needs --devices (a device profile: a preset, a CSV file or a spec)")
    if from_devices and cfg.budget_assignment == "per-round":
        raise ConfigError("--budget-assignment", "per-round draws from a list of budgets; --memory-budget devices "
                                                 "gives each client its device's memory; allowed here: fixed")
    return cfg


def for_dataset(cfg: RunConfig, dataset: "Dataset") -> RunConfig:
    """``--augment auto`` made the dataset's default once the data is known, so that config.toml records what was
    done."""
    if cfg.augment != "auto":
        return cfg
    return replace(cfg, augment="crop-flip" if dataset.augment else "none")
