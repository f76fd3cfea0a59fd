"""``fedbench compare``: a grid of ordinary runs, resumable, optionally in parallel processes.

A sweep is a dict of run settings (preset < sweep TOML < flags). ``method``, ``memory_budget``
and ``seed`` are always sweep axes; any other key whose value is a list is one too. Each
``memory_budget`` item is ONE cell's budget for all its clients (a nested list is a mixed-budget
cell). ``[overrides.METHOD]`` tables (or ``[overrides.self-supervised]``, for every method with
``supervised = False``) hold settings for one method (a list there is an axis of that method only,
e.g. ``variant = ["paper", "structured"]``); a method option applies only to the methods that have it.

Each cell is one run folder, ``OUT/<method>/b<budget>[-<key>=<value>...]/s<seed>``. A cell that
``fedbench report`` lists as ok is skipped, a corrupt one runs again from scratch, an incomplete
or failed one with a checkpoint resumes from it, so rerunning the same command continues an
interrupted sweep. Everything that can be checked without training
(settings, dataset, model, folders holding a run with other settings) is checked for every cell
before anything runs; a cell that still fails (a budget too small for a method, a crash) is
recorded in its folder (failed.json) and the sweep goes on; so is a cell whose worker process
died (killed, out of memory), and then the command exits 1.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing, suppress
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields, replace
from functools import partial
from itertools import product
from multiprocessing import active_children, get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbench.budget import label
from fedbench.checkpoint import CHECKPOINT, STOPS, heard, identity
from fedbench.config import FIELDS, RunConfig, for_dataset, load_toml, resolve
from fedbench.engine import resolve_device
from fedbench.errors import Busy, ConfigError
from fedbench.launch import configure, launch
from fedbench.models import create_model
from fedbench.precision import choose
from fedbench.registry import get_method, list_methods, model_kwargs
from fedbench.settings import flag

if TYPE_CHECKING:
    import pandas as pd

    from fedbench.distributed import Group

FAILED = "failed.json"
SELF_SUPERVISED = "self-supervised"
AXES = ("method", "memory_budget", "seed")
ALIASES = {"methods": "method", "seeds": "seed"}

PRESETS = Path(__file__).with_name("presets")  # <name>.toml: sweep files shipped with fedbench


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its resolved config (``config.out`` is its folder)."""

    name: str                 # folder relative to the sweep's root, e.g. fedavg/b0.25/s0
    config: RunConfig
    num_classes: int

    @property
    def folder(self) -> Path:
        return Path(self.config.out)

    def complete(self) -> bool:
        """Finished and consistent: what ``fedbench report`` lists as ok."""
        from fedbench.report import run_status
        return run_status(self.folder) == "ok"


@dataclass(frozen=True)
class Grid:
    root: Path                # the sweep folder
    cells: list[Cell]
    jobs: int = 1             # cells run at once (separate processes when > 1)


@dataclass(frozen=True)
class Outcome:
    cell: str
    ok: bool
    message: str              # final accuracy, or the error
    seconds: float            # wall time
    cpu_seconds: float        # CPU time of the process (all its threads) while the cell ran
    died: bool = False        # its worker process died (killed, out of memory) before it could report
    floor: float | None = None  # the budget is below the method's measured floor (infeasible, not failed)


# --- the grid --------------------------------------------------------------------------------
def load_sweep(flags: dict[str, Any], config: str | Path | None = None, preset: str | None = None) -> dict[str, Any]:
    """Preset < sweep TOML < flags (None flags do not count); ``methods``/``seeds`` read as ``method``/``seed``."""
    spec: dict[str, Any] = {}
    if preset is not None and not (PRESETS / f"{preset}.toml").is_file():
        allowed = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ConfigError("--preset", f"unknown preset {preset!r}; allowed: {allowed}")
    for source in (load_toml(PRESETS / f"{preset}.toml") if preset else {}, load_toml(config) if config else {},
                   {k: v for k, v in flags.items() if v is not None}):
        spec |= {ALIASES.get(k, k): v for k, v in source.items()}
    return spec


def as_list(value: Any) -> list:
    """A sweep axis: a list as is, a comma string split, anything else one value."""
    if isinstance(value, list):
        return value
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]


def grid(spec: dict[str, Any]) -> Grid:
    """Every cell of the sweep, resolved and validated; raises ConfigError, writes nothing."""
    spec = dict(spec)
    root = sweep_folder(spec.pop("out", None))
    jobs = spec.pop("jobs", None)
    jobs = 1 if jobs is None else jobs
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError("--jobs", f"{jobs!r} not allowed; must be a positive integer")
    tables = spec.pop("overrides", {})
    empty = next((k for k, v in spec.items() if isinstance(v, list) and not v), None)
    if empty is not None:
        raise ConfigError(flag({v: k for k, v in ALIASES.items()}.get(empty, empty)),
                          "an empty list ([]) sweeps nothing; allowed: a non-empty list")
    methods = method_list(spec.pop("method", None))
    budgets = [b.split("+") if isinstance(b, str) and "+" in b else b  # 0.25+0.5+1: one mixed cell (as its folder)
               for b in as_list(spec.pop("memory_budget", 1.0))]
    seeds = [seed_value(s) for s in as_list(spec.pop("seed", 0))]
    overrides = override_tables(tables, methods)
    owners = {f.name for m in methods for f in fields(get_method(m).Options)}  # method options of the grid
    cells, datasets = [], {}
    for method in methods:
        own = {f.name for f in fields(get_method(method).Options)}
        settings = {k: v for k, v in spec.items() if k in FIELDS or k in own or k not in owners}
        settings |= overrides.get(method, {})
        axes = {k: v for k, v in settings.items() if isinstance(v, list)}  # an override's list: its method's axis
        for values, budget, seed in product(product(*axes.values()), budgets, seeds):
            chosen = dict(zip(axes, values))
            cfg = configure(settings | chosen | {"method": method, "memory_budget": budget, "seed": seed,
                                                 "quiet": True, "processes": 1})
            name = cell_name(method, cfg.memory_budget, seed, chosen)
            cfg = replace(cfg, out=str(root / name))
            key = dataset_key(cfg)
            if key not in datasets:
                datasets[key] = dataset_of(cfg)
            cells.append(Cell(name, for_dataset(cfg, datasets[key]), datasets[key].num_classes))
    cells.sort(key=lambda c: seeds.index(c.config.seed))  # a whole table at the first seed comes first
    one_model(cells)
    cells = one_precision(cells, lambda cfg: datasets[dataset_key(cfg)])
    check_folders(cells)
    return Grid(root, cells, jobs)


def dataset_key(cfg: RunConfig) -> tuple:
    """Cells with the same key load the same data (synthetic data depends on the seed)."""
    return cfg.dataset, cfg.data_dir, cfg.seed if cfg.dataset == "synthetic" else 0


def sweep_folder(value: Any) -> Path:
    """The sweep's ``out``: a folder path, required."""
    if value is None:
        raise ConfigError("--out", "required: the sweep folder (rerun the same command to continue a sweep)")
    if not isinstance(value, str) or not value:
        raise ConfigError("--out", f"{value!r} is not a folder path; allowed: a folder path (a non-empty string)")
    return Path(value)


def one_model(cells: list[Cell]) -> None:
    """Every supervised method of a grid trains the same model (budgets are fractions of its full memory), and
    so does every self-supervised one: a model is never a per-method switch of a comparison."""
    for supervised in (True, False):
        models: dict[str, list[str]] = {}
        for cell in cells:
            if get_method(cell.config.method).supervised == supervised:
                models.setdefault(cell.config.model, [])
                if cell.config.method not in models[cell.config.model]:
                    models[cell.config.model].append(cell.config.method)
        if len(models) > 1:
            kind = "supervised" if supervised else "self-supervised"
            used = "; ".join(f"{m} ({', '.join(names)})" for m, names in models.items())
            raise ConfigError("--model", f"the {kind} methods of one comparison must train one model, but the cells "
                                         f"use {used}; set one --model (or one model in [overrides.{SELF_SUPERVISED}])")


def one_precision(cells: list[Cell], dataset: Callable[[RunConfig], Any]) -> list[Cell]:
    """A grid never mixes precisions: ``auto`` becomes the precision its existing cells were run in, else the one
    ``--precision auto`` picks for its first cell's model (measured once); cells that still differ are refused."""
    auto = [c.config for c in cells if c.config.precision == "auto"]
    if auto:
        cfg, ds = auto[0], dataset(auto[0])
        build = partial(create_model, cfg.model, num_classes=ds.num_classes, in_chans=ds.in_chans,
                        img_size=ds.img_size, **model_kwargs(cfg))
        chosen = next((p for c in cells if (p := stored_precision(c.folder))), None) or choose(
            "auto", build, tuple(ds.train_x.shape[1:]), ds.num_classes, cfg.batch_size, resolve_device(cfg.device))
        cells = [replace(c, config=replace(c.config, precision=chosen)) if c.config.precision == "auto" else c
                 for c in cells]
    used = sorted({c.config.precision for c in cells})
    if len(used) > 1:
        raise ConfigError("--precision", f"the cells of one comparison must run in one precision, but they use "
                                         f"{' and '.join(used)}; set one --precision for the whole grid")
    return cells


def stored_precision(folder: Path) -> str | None:
    """The precision a cell folder's config.toml records (None: no readable one)."""
    try:
        return load_toml(folder / "config.toml").get("precision")
    except ConfigError:
        return None


def method_list(value: Any) -> list[str]:
    if value is None:
        raise ConfigError("--methods", "required: a comma list of methods, or all (see `fedbench methods`)")
    names = as_list(value)
    if names == ["all"]:
        return [m.name for m in list_methods()]
    for name in names:
        known(name, "--methods")
    if len(set(names)) != len(names):
        raise ConfigError("--methods", f"{','.join(names)} names a method twice")
    return names


def known(method: str, flag: str) -> None:
    try:
        get_method(method)
    except ConfigError as e:
        raise ConfigError(flag, e.message) from None


def seed_value(value: Any) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError("--seeds", f"{value!r} is not an integer; give a comma list such as 0,1,2") from None


def override_tables(tables: Any, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per-method settings: ``overrides.<method>``, or ``overrides.self-supervised`` for every SSL method."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError("--config", "overrides must be tables: [overrides.METHOD] with plain run settings")
    tables = {name: {k.replace("-", "_"): v for k, v in t.items()} for name, t in tables.items()}
    for name, table in tables.items():
        if name != SELF_SUPERVISED:
            known(name, "--config")
        fixed = set(table) & {*AXES, "out"}
        if fixed:
            raise ConfigError("--config", f"overrides.{name} cannot set {', '.join(sorted(fixed))} (sweep axes and "
                                          f"the sweep folder are the same for every method)")
    out = {}
    for m in methods:
        ssl = {} if get_method(m).supervised else tables.get(SELF_SUPERVISED, {})
        out[m] = ssl | tables.get(m, {})
    return out


def cell_name(method: str, budget: tuple[float | str, ...], seed: int, axes: dict[str, Any]) -> str:
    parts = ["b" + "+".join(map(label, budget))]
    parts += [f"{k.replace('_', '-')}={v}" for k, v in sorted(axes.items())]
    return f"{method}/{re.sub(r'[^A-Za-z0-9._=+-]', '_', '-'.join(parts))}/s{seed}"


def dataset_of(cfg: RunConfig):
    from fedbench.data import load_dataset
    return load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)


def check_folders(cells: list[Cell]) -> None:
    """Two cells never share a folder, and a folder never holds a run with other settings."""
    seen: dict[Path, str] = {}
    for cell in cells:
        if cell.folder in seen:
            raise ConfigError("--config", f"cells {seen[cell.folder]} and {cell.name} map to the same folder; "
                                          "make the swept values distinct")
        seen[cell.folder] = cell.name
        stored = cell.folder / "config.toml"
        if stored.exists():
            differs = settings_differ(cell.config, stored)
            if differs:
                raise ConfigError("--out", f"{cell.folder} holds a run with other settings ({', '.join(differs)}); "
                                           "use another --out, or delete that folder")


def settings_differ(cfg: RunConfig, stored: Path) -> list[str]:
    """Settings of ``cfg`` that differ from the run config stored in a cell folder (those a checkpoint records)."""
    try:
        old = identity(resolve({}, stored))
    except ConfigError as e:
        return [f"unreadable {stored.name}: {e.message}"]
    new = identity(cfg)
    return [k for k in new if old.get(k) != new[k]]


# --- running -----------------------------------------------------------------------------------
def run_cell(cell: Cell) -> Outcome:
    """One cell, in one process: the continuation of its checkpoint, or a fresh run (replacing what its folder
    holds: a corrupt or failed run); any failure is recorded, not raised."""
    from fedbench.report import run_status

    folder, t0, cpu0 = cell.folder, time.perf_counter(), time.process_time()
    resume = run_status(folder) != "corrupt" and (folder / CHECKPOINT).exists()
    (folder / FAILED).unlink(missing_ok=True)
    try:
        summary = launch(cell.config, resume=resume, overwrite=not resume)
    except Busy as e:  # another process writes the folder: nothing of this one is recorded there
        return Outcome(cell.name, False, f"{e.flag}: {e.message}", time.perf_counter() - t0, time.process_time() - cpu0)
    except Exception as e:  # the sweep's error boundary: recorded in the cell folder and in the table
        message = f"{e.flag}: {e.message}" if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        floor = getattr(e, "floor", None)
        record_failure(cell, message, traceback.format_exc(), floor)
        return Outcome(cell.name, False, message, time.perf_counter() - t0, time.process_time() - cpu0, floor=floor)
    acc = summary["final_accuracy"]
    message = (f"diverged in round {summary['diverged_round']}" if summary.get("status") == "diverged"
               else "accuracy " + ("-" if acc is None else f"{acc:.4f}"))
    return Outcome(cell.name, True, message,
                   time.perf_counter() - t0, time.process_time() - cpu0)


def record_failure(cell: Cell, message: str, trace: str = "", floor: float | None = None) -> None:
    """failed.json in the cell's folder, beside a config.toml (so that ``report`` lists the cell as failed, or
    as infeasible when the budget is below the method's measured ``floor``)."""
    from fedbench.observers import to_toml, write_atomic

    cell.folder.mkdir(parents=True, exist_ok=True)
    if not (cell.folder / "config.toml").exists():
        write_atomic(cell.folder / "config.toml", to_toml(cell.config.settings()))
    record = {"error": message, "traceback": trace} | ({} if floor is None else {"infeasible_floor": floor})
    write_atomic(cell.folder / FAILED, json.dumps(record, indent=1))


def start_worker(threads: int) -> None:
    """A worker process of ``run_parallel``: ``threads`` torch threads; deaf to Ctrl-C and SIGTERM while it waits
    for a cell."""
    import torch
    torch.set_num_threads(threads)
    for stop in STOPS:
        signal.signal(stop, signal.SIG_IGN)


def run_cell_hearing(cell: Cell, stops: list[int]) -> Outcome:
    """``run_cell`` in a worker process that hears ``stops`` (those its sweep hears) while the cell runs: the first
    one stops the cell after its round, checkpointed (``fedbench.checkpoint.stop_on_interrupt``)."""
    for stop in stops:
        signal.signal(stop, signal.default_int_handler)
    try:
        return run_cell(cell)
    finally:
        for stop in stops:
            signal.signal(stop, signal.SIG_IGN)


def sweep(grid: Grid, report: Callable[[Outcome], None] = lambda o: None, group: "Group | None" = None) -> list[Outcome]:
    """Run the incomplete cells, ``grid.jobs`` at a time in spawned processes (1: in turn, in this process).

    With one GPU, cells take turns on it unless ``jobs`` > 1 is asked for; then they share it.
    Under torchrun (``group``) each process takes every size-th incomplete cell, then all wait for all.
    """
    todo = [c for c in grid.cells if not c.complete()]
    if group is not None:
        todo = todo[group.rank::group.size]
    outcomes = []
    with closing(run_in_turn(todo) if grid.jobs == 1 else run_parallel(todo, grid.jobs)) as results:
        for outcome in results:  # closed on a Ctrl-C even between cells: the running ones have stopped on return
            report(outcome)
            outcomes.append(outcome)
    if group is not None:
        group.barrier()
    return outcomes


def run_in_turn(cells: list[Cell]) -> Iterator[Outcome]:
    for cell in cells:
        yield run_cell(cell)


def run_parallel(cells: list[Cell], jobs: int) -> Iterator[Outcome]:
    """``jobs`` worker processes, one cell at a time each (a pool of one per worker, so that a worker that dies
    (killed, out of memory) breaks only its own pool: that cell is recorded as failed, the worker replaced).
    A Ctrl-C or SIGTERM to this process alone (``kill PID``) or to its whole group (a terminal, a batch scheduler)
    stops every running cell after its round, checkpointed, and returns once they have stopped."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo, running, pools, stops = list(reversed(cells)), {}, [], heard()

    def start(pool: ProcessPoolExecutor) -> None:
        cell = todo.pop()
        running[pool.submit(run_cell_hearing, cell, stops)] = (pool, cell, time.perf_counter())

    def worker() -> ProcessPoolExecutor:
        pools.append(ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=start_worker,
                                         initargs=(threads,)))
        return pools[-1]

    try:
        for _ in range(min(jobs, len(cells))):
            start(worker())
        while running:
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                pool, cell, t0 = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    message = "worker process died (killed, or out of memory)"
                    record_failure(cell, message)
                    outcome = Outcome(cell.name, False, message, time.perf_counter() - t0, 0.0, died=True)
                    pool = worker()
                if todo:
                    start(pool)
                yield outcome
    finally:  # stopped (Ctrl-C, SIGTERM, a cell's worker stopped): the running cells stop after their round too
        for child in active_children():  # the waiting workers do not hear it
            with suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


# --- the smoke check ---------------------------------------------------------------------------
LEARNED = 0.05  # the share of the distance from a method's untrained evaluation to 1 that --check asks it to cover


def check_cells(cells: list[Cell], runs: "pd.DataFrame") -> list[str]:
    """Why the grid fails ``--check``: a cell that did not finish (or whose folder is inconsistent), a
    budgeted method over a client's budget, or a method that did not learn: its final evaluation does not
    clear the same evaluation of its untrained model (``--eval-initial``) by LEARNED of the way to 1. A fixed
    chance level would not do: a random encoder's linear probe is far above chance."""
    by_folder = {Path(f).resolve(): r for f, r in zip(runs["path"], runs.to_dict("records"))}
    problems = []
    for cell in cells:
        run = by_folder.get(cell.folder.resolve())
        if run is None or run["status"] != "ok":
            problems.append(f"{cell.name}: {'no run' if run is None else run['status'] + ': ' + run['problem']}")
        elif get_method(cell.config.method).budgeted and run["violations"] > 0:
            problems.append(f"{cell.name}: {int(run['violations'])} client-rounds over budget "
                            f"(peak / budget up to {run['peak_of_budget']:.2f})")
        elif not run["initial_accuracy"] >= 0:  # NaN: not evaluated
            problems.append(f"{cell.name}: no evaluation of the untrained model to judge learning by "
                            "(run the sweep with --eval-initial)")
        else:
            final, untrained = run["final_accuracy"], run["initial_accuracy"]
            need = untrained + LEARNED * (1 - untrained)
            if not final >= need:
                problems.append(f"{cell.name}: did not learn: final accuracy {final:.4f} against {untrained:.4f} "
                                f"untrained (at least {need:.4f} needed, {LEARNED:.0%} of the way to 1)")
    return problems
