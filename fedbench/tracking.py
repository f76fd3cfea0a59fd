"""Watching a run in the tools FL researchers already use (``--log``): an observer that hands the run's settings,
every round's numbers and the summary to a :class:`Tracker`.

``--log tensorboard`` (extra ``fedbench[tensorboard]``) writes TensorBoard event files into the run folder's
``tensorboard/``: each round's numeric columns of rounds.csv as scalars ``round/NAME`` (step = round), the run's
settings as hparams with the summary's final numbers as their metrics. ``--log MODULE:CLASS`` names any other
:class:`Tracker` (Weights & Biases, MLflow: a few lines, see the README).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from fedbench.engine import Observer, Run
from fedbench.errors import ConfigError

# summary.json numbers that TensorBoard shows beside the hparams (those the run has)
HPARAM_METRICS = ("final_accuracy", "best_accuracy", "peak_max_bytes", "violations", "train_flops_per_client_round",
                  "bytes_up_per_client_round", "wall_s")


class Tracker:
    """What ``--log`` drives. ``start`` gets the run folder, the first round to come (> 1 when resumed) and the
    settings (config.toml's values); ``log`` one round's numbers; ``finish`` summary.json's content."""

    def start(self, folder: Path, first_round: int, config: dict[str, Any]) -> None: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class TensorBoard(Tracker):
    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log", "tensorboard is not installed; install it with: pip install "
                                       "'fedbench[tensorboard]' (or pip install tensorboard)") from None
        self.writer_class, self.writer, self.config = SummaryWriter, None, {}

    def start(self, folder: Path, first_round: int, config: dict[str, Any]) -> None:
        # a resumed run drops the events of the rounds after its checkpoint (they are trained again)
        self.writer = self.writer_class(str(folder / "tensorboard"), purge_step=first_round)
        self.config = config

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"round/{name}", value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.config.items()}
        metrics = {f"summary/{k}": float(summary[k]) for k in HPARAM_METRICS if summary.get(k) is not None}
        self.writer.add_hparams(hparams, metrics, run_name=".")  # beside the scalars, not in a subfolder
        self.writer.close()


TRACKERS = {"tensorboard": TensorBoard}


def tracker(spec: str) -> Tracker:
    """``--log``'s value: a tracker's name (``tensorboard``) or ``MODULE:CLASS``, a Tracker importable from here."""
    if spec in TRACKERS:
        return TRACKERS[spec]()
    module, _, name = spec.partition(":")
    allowed = f"allowed: {', '.join(TRACKERS)}, or MODULE:CLASS naming a fedbench.tracking.Tracker"
    try:
        cls = getattr(importlib.import_module(module), name) if module and name else None
    except (ImportError, AttributeError) as e:
        raise ConfigError("--log", f"cannot load {spec!r} ({e}); {allowed}") from None
    if not (isinstance(cls, type) and issubclass(cls, Tracker)):
        raise ConfigError("--log", f"{spec!r} is not a tracker; {allowed}")
    return cls()


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """A round's numeric values, without the round number and the values a round does not have (no evaluation)."""
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float))
            and not isinstance(v, bool) and not math.isnan(v)}


class Tracking(Observer):
    """Hands the run to a :class:`Tracker`; on the main process only (like the run files)."""

    def __init__(self, tracker: Tracker, folder: Path):
        self.tracker, self.folder = tracker, Path(folder)

    def on_start(self, run: Run) -> None:
        self.tracker.start(self.folder, run.start_round + 1, run.config.settings() | {"out": str(self.folder)})

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        self.tracker.log(row["round"], numbers(row))

    def on_end(self, run: Run, summary: dict) -> None:
        self.tracker.finish(summary)
