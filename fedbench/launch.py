"""One run of one configuration, from its settings to its files: ``fedbench run`` and each cell of ``fedbench
compare`` (``fedbench profile`` shares the checks and the preparation).

``configure`` checks the settings, each part by the module that owns it, before anything is loaded or written;
``launch`` checks the run folder, starts the processes of ``--processes``, prepares the run (continued from its
checkpoint if asked) and trains it with its files, checkpoints and Ctrl-C handling.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedbench.budget import label
from fedbench.checkpoint import Checkpointer, clear, held_files, restore, stop_on_interrupt
from fedbench.config import RunConfig, resolve
from fedbench.devices import assign
from fedbench.distributed import Group, WorkerDied, local_group, processes
from fedbench.engine import Run, prepare, resolve_device, unbudgeted
from fedbench.errors import Busy, ConfigError
from fedbench.observers import Live, RunFiles
from fedbench.partition import parse_partition
from fedbench.registry import check_options, get_method
from fedbench.tracking import Tracking, tracker


def configure(flags: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """Defaults < ``config_file`` < ``flags`` (typed; None: not given), checked before anything is loaded: the run's
    own settings (``fedbench.config``), the device profile, the partition, the method, the model and their options
    (``fedbench.registry``), and the device."""
    cfg = resolve(flags, config_file)
    if cfg.devices is not None:
        assign(cfg.devices, cfg.clients, cfg.seed)  # raises the ConfigError naming --devices
    parse_partition(cfg.partition)
    cfg = check_options(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but no CUDA device is available; allowed here: auto, cpu")
    if cfg.log is not None:
        tracker(cfg.log)  # raises the ConfigError naming --log (unknown, or tensorboard not installed)
    return cfg


def launch(cfg: RunConfig, resume: bool = False, overwrite: bool = False, group: Group | None = None,
           console: Console | None = None) -> dict:
    """Run ``cfg`` (as ``configure`` returns it) into its folder; returns the summary.

    A folder that holds a run is refused unless ``resume`` (continue from its checkpoint) or ``overwrite`` (its
    files removed once the run is prepared). Each round's clients are shared with ``group`` (torchrun; its first
    process writes) or with the processes of ``cfg.processes``. ``console`` shows the progress and the run's
    one-line notices (None: nothing shown, as for compare's cells). Raises ConfigError before anything is
    written; KeyboardInterrupt (Ctrl-C or SIGTERM: after the round, checkpointed) and WorkerDied once the console
    has said where the run stopped and how to continue it.
    """
    folder = Path(cfg.out or f"results/runs/{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}")
    main = group is None or group.main
    if main:
        writable(folder, "--out")
    with exclusive(folder, "--out") if main else nullcontext():  # one process writes a folder
        return run_into(folder, cfg, resume, overwrite, group, console)


def run_into(folder: Path, cfg: RunConfig, resume: bool, overwrite: bool, group: Group | None,
             console: Console | None) -> dict:
    """``launch`` once the folder is this process's."""
    method = get_method(cfg.method)
    main = group is None or group.main
    show = console is not None and main and not cfg.quiet
    say = partial(console.print, highlight=False, soft_wrap=True) if console else lambda line: None
    held = held_files(folder) if main and not (resume or overwrite) else []
    if held:
        raise ConfigError("--out", f"{folder} already holds a run ({', '.join(held)}); continue it with --resume "
                                   f"{folder}, replace it with --overwrite, or choose another --out")
    if unbudgeted(method) and cfg.memory_budget != (1.0,):
        say(f"warning: {cfg.method} fits nothing to a memory budget (self-supervised, not budgeted): --memory-budget "
            f"{','.join(map(label, cfg.memory_budget))} is recorded as unbudgeted, no client-round counts as over "
            "budget")
    n = 1 if group is not None else processes(cfg.processes, resolve_device(cfg.device), cfg.clients_per_round,
                                              not method.keeps_client_state)
    sharing = local_group(n, partial(share, cfg, resume)) if n > 1 else nullcontext(lambda: None)
    checkpoints, runner = Checkpointer(folder, cfg.checkpoint_every), None
    try:
        with sharing as connect:
            with measuring(console if show else None) as counted:
                runner = ready(cfg, resume, group or connect(), counted)
            if overwrite and main:
                clear(folder)
            observers = (([RunFiles(folder), checkpoints] if main else [])
                         + ([Tracking(tracker(cfg.log), folder)] if main and cfg.log else [])
                         + ([Live(console)] if show else []))
            stopping = stop_on_interrupt(checkpoints, lambda name: say(
                f"{name}: stopping after this round, with a checkpoint (Ctrl-C{' again' * (name == 'Ctrl-C')}: stop "
                "at once)"))
            # under torchrun every process gets the Ctrl-C or SIGTERM and stops at once; spawned workers leave it to
            # this one
            with stopping if group is None else nullcontext():
                summary = runner.execute(observers)
    except KeyboardInterrupt:
        say(f"interrupted after round {runner.completed if runner else 0}; {resumable(checkpoints, folder)}")
        raise
    except WorkerDied as e:
        say(f"{e} during round {runner.completed + 1 if runner else 1}; {resumable(checkpoints, folder)}")
        raise
    if summary["status"] == "diverged":
        say(f"diverged: the train loss of round {summary['diverged_round']} is {runner.rows[-1]['train_loss']} "
            f"(not finite); the run stopped there and {folder / 'summary.json'} says status diverged (a smaller "
            "--lr may help)")
    elif show:
        say(f"results: {folder}")
    return summary


def ready(cfg: RunConfig, resume: bool, group: Group | None, on_measure: Callable[[int], None] | None = None) -> Run:
    """The prepared run (continued from the checkpoint in its folder if ``resume``), sharing its rounds with
    ``group``."""
    runner = prepare(cfg, group=group, on_measure=on_measure)
    if resume:
        restore(runner, Path(cfg.out))
    return runner


def share(cfg: RunConfig, resume: bool, group: Group) -> None:
    """A spawned worker of ``--processes``: its share of every round; rank 0 writes and reports. A bad setting stops
    rank 0 with its message (the worker is then stopped), so the worker stays silent on it."""
    try:
        ready(cfg, resume, group).execute([])
    except ConfigError:
        pass


@contextmanager
def measuring(console: Console | None) -> Iterator[Callable[[int], None] | None]:
    """A spinner on ``console`` while the data loads and each configuration is measured (up to a minute), with
    the count of step shapes measured so far: yields the profiler's ``on_measure`` (None without a console)."""
    if console is None:
        yield None
        return
    text = "loading the data, measuring each configuration's memory and FLOPs"
    with console.status(text) as status:
        yield lambda n: status.update(f"{text}: {n} step shape{'s' * (n > 1)} measured")


def resumable(checkpoints: Checkpointer, folder: Path) -> str:
    """The way forward after a run stopped early: its last checkpoint and the command that continues from it."""
    if checkpoints.saved:
        return f"continue from its checkpoint (round {checkpoints.saved}) with: fedbench run --resume {folder}"
    return ("no round was checkpointed, nothing to resume (--checkpoint-every N keeps every N-th round); start "
            f"again with: fedbench run --config {folder / 'config.toml'} --overwrite")


@contextmanager
def exclusive(folder: Path, flag: str) -> Iterator[None]:
    """Hold ``folder`` for this process, or raise Busy if another fedbench process holds it (a second run or
    compare on the same folder would interleave its files). An advisory lock on a file in the system's temporary
    folder named by the folder's absolute path: nothing is written in the folder, and the lock goes with the
    process however it ends."""
    locks = Path(tempfile.gettempdir()) / "fedbench-locks"
    locks.mkdir(exist_ok=True)
    name = hashlib.sha1(str(Path(folder).absolute()).encode()).hexdigest()[:16]
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(flag, f"{folder} is being written by another fedbench process (a run or compare of the same "
                             "folder); wait for it to finish or stop it (Ctrl-C), then rerun") from None
        yield
    finally:
        os.close(fd)


def writable(folder: Path, flag: str) -> None:
    """Refuse, before any set-up, a folder that cannot be written: one that is, or would lie under, a file, or
    whose nearest existing folder refuses a new entry (tried with a temporary folder, removed at once)."""
    folder = Path(folder).absolute()
    try:
        there = next(p for p in (folder, *folder.parents) if p.exists())
        if there.is_dir():
            tempfile.TemporaryDirectory(dir=there).cleanup()
    except OSError as e:
        raise ConfigError(flag, f"cannot write in {folder} ({e.strerror or e}); allowed: a writable folder") from None
    if not there.is_dir():
        raise ConfigError(flag, f"{there} is a file" + ("" if there == folder else f", so {folder} cannot be created")
                          + "; allowed: a folder")
