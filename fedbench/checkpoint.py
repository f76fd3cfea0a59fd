"""Checkpoints every ``--checkpoint-every`` rounds, after the last round and after a Ctrl-C or SIGTERM
(atomic), and ``--resume`` from one.

Randomness is a function of (seed, round, client), so a run resumed from round r draws
exactly what the uninterrupted run drew: the resumed ``rounds.csv`` matches row for row.
A checkpoint records the settings that decide the results (``identity``); resuming it under
other settings, or with rounds.csv / clients.csv lacking a round it covers, is refused before
anything is written.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from fedbench.config import EXECUTION, RunConfig
from fedbench.engine import Observer, Run
from fedbench.errors import ConfigError
from fedbench.observers import FILES, Inconsistent, check_rounds, read_logs, write_atomic
from fedbench.records import Round
from fedbench.registry import get_method, method_options, model_kwargs

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (*FILES, CHECKPOINT, "failed.json")  # failed.json: a sweep's failed cell (fedbench.compare)


def identity(cfg: RunConfig) -> dict:
    """The settings that decide a run's results, options typed; the EXECUTION ones may differ when it continues."""
    plain = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION | {"options"}}
    return plain | {"method options": asdict(method_options(get_method(cfg.method), cfg)),
                    "model options": model_kwargs(cfg) if cfg.model else {}}


def held_files(folder: Path) -> list[str]:
    """The files of a run (finished or not) that ``folder`` holds."""
    return [name for name in RUN_FILES if (Path(folder) / name).exists()]


def clear(folder: Path) -> None:
    """Remove a run's files from ``folder``, so that a new run starts there from scratch."""
    for name in RUN_FILES:
        (Path(folder) / name).unlink(missing_ok=True)


class Checkpointer(Observer):
    """checkpoint.pt every ``every`` rounds, after the last round, and after the round during which ``stop``
    was set (Ctrl-C or SIGTERM, see ``stop_on_interrupt``): then it ends the run with KeyboardInterrupt."""

    def __init__(self, out: Path, every: int):
        self.path = Path(out) / CHECKPOINT
        self.every = every
        self.stop = False
        self.saved = 0  # the round of the checkpoint on disk

    def on_start(self, run: Run) -> None:
        self.saved = run.start_round

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        last = row["round"] == run.config.rounds
        if self.stop or last or (self.every and row["round"] % self.every == 0):
            state = run.state_dict() | {"config": identity(run.config)}
            write_atomic(self.path, lambda f: torch.save(state, f))
            self.saved = row["round"]
        if self.stop and not last:
            raise KeyboardInterrupt


STOPS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill's default, as batch schedulers stop a job
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def heard() -> list[signal.Signals]:
    """The stop signals this process listens to: one it was started ignoring stays ignored (a non-interactive
    shell starts ``cmd &`` with SIGINT ignored)."""
    return [s for s in STOPS if signal.getsignal(s) is not signal.SIG_IGN]


@contextmanager
def sigterm_interrupts():
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that ``run`` and ``compare`` end in their one
    line (and a run within ``stop_on_interrupt`` after its round, checkpointed)."""
    if threading.current_thread() is not threading.main_thread() or signal.SIGTERM not in heard():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_on_interrupt(checkpointer: Checkpointer, say: Callable[[str], None]):
    """While a run executes (in the main thread): a first Ctrl-C or SIGTERM lets the round end, checkpointed,
    then stops the run (``say`` gets the signal's name); a Ctrl-C after that stops it at once (the checkpoint on
    disk stays as it was), another SIGTERM changes nothing (a sweep's worker may get one from its process group
    and one from compare)."""
    listened = heard() if threading.current_thread() is threading.main_thread() else []
    previous = {s: signal.getsignal(s) for s in listened}

    def first(signum, frame):
        checkpointer.stop = True
        for s in listened:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else lambda *_: None)
        say(NAMES[signum])

    for s in listened:
        signal.signal(s, first)
    try:
        yield
    finally:
        for s in listened:
            signal.signal(s, signal.SIG_DFL if previous[s] is None else previous[s])


def restore(run: Run, folder: Path) -> None:
    """Load the folder's checkpoint into a prepared run, and rounds.csv up to the checkpoint's round (rows
    written after it are dropped). Raises ConfigError, before anything is written, when there is no
    checkpoint, when it was written under other settings, or when the CSVs lack a round it covers."""
    folder = Path(folder)
    path = folder / CHECKPOINT
    if not path.exists():
        raise ConfigError("--resume", f"no {CHECKPOINT} in {folder}; only runs with a checkpoint can be resumed")
    try:
        state = torch.load(path, weights_only=True, map_location=run.ctx.device)
    except Exception as e:  # torch raises several types for a damaged file
        raise ConfigError("--resume", f"{path} unreadable ({type(e).__name__}); {again(folder)}") from None
    mine, stored = identity(run.config), state.get("config")
    if stored is not None:  # a setting added to fedbench since the checkpoint was written had its default then
        stored = {k: v for k, v in RunConfig().to_dict().items() if k in mine.keys() - stored.keys()} | stored
    if stored != mine:
        what = ("records no settings (an older fedbench wrote it)" if stored is None else
                f"was written under other settings than {folder / 'config.toml'} ("
                + ", ".join(k for k in mine if stored.get(k) != mine[k]) + "): the folder mixes two runs")
        raise ConfigError("--resume", f"{path} {what}; {again(folder)}")
    try:
        rounds, clients = read_logs(folder)
        rounds, clients = (f[f["round"] <= state["round"]] for f in (rounds, clients))
        check_rounds(rounds, clients, state["round"], CHECKPOINT)
    except Inconsistent as e:
        raise ConfigError("--resume", f"{folder}: {e}, so the run cannot continue exactly; {again(folder)}") from None
    run.load_state_dict(state, Round.read(rounds))


def again(folder: Path) -> str:
    return f"start it again with: fedbench run --config {folder / 'config.toml'} --overwrite"
