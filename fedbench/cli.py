"""``fedbench``: thin Typer commands over plain functions, one error boundary (exit code 2)."""
from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedbench.errors import ConfigError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Benchmark memory-constrained federated-learning methods on one simulation engine.")
# Piped output (logs, CI) gets wide tables instead of rich's 80 columns, which would truncate their cells.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def show_version(value: bool) -> None:
    if value:
        from fedbench.provenance import version
        typer.echo(version())
        raise typer.Exit()


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (rich's spinner and test runners swap it)."""

    stream = property(lambda self: sys.stderr, lambda self, _: None)


LOG_HANDLER = StderrHandler()
LOG_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def configure_logging(verbose: int) -> None:
    """fedbench's loggers (``fedbench.*``, ``methods.*``) on stderr: -v INFO, -vv DEBUG; else Python's default
    (warnings and errors only)."""
    for name in ("fedbench", "methods"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.NOTSET)
        (logger.addHandler if verbose else logger.removeHandler)(LOG_HANDLER)


@app.callback()
def options(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                  help="Print fedbench's version and exit.")] = False,
            verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                                 help="Log what fedbench does: -v INFO, -vv DEBUG (on stderr).")] = 0) -> None:
    configure_logging(verbose)


def measuring(show: bool):
    """A spinner on stderr while ``prepare`` loads the data and measures each configuration (up to a minute)."""
    return err.status("loading the data, measuring each configuration's memory and FLOPs") if show else nullcontext()


def boundary(fn):
    """Turn a ConfigError into one line on stderr and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            err.print(f"[red]error:[/red] {e.flag}: {e.message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def parse_extra(args: list[str]) -> dict[str, object]:
    """Method/model options given as ``--key value``, ``--key=value`` or a bare ``--flag`` (true)."""
    options: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(arg, "unexpected argument; method and model options are given as --key value")
        key, _, value = arg[2:].partition("=")
        if not value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        options[key.replace("-", "_")] = value
        i += 1
    return options


Method = Annotated[Optional[str], typer.Option(help="FL method (see `fedbench methods`).")]
Dataset = Annotated[Optional[str], typer.Option(help="fmnist-mini (embedded), fashion-mnist, mnist, cifar10, cifar100, synthetic, imagefolder:PATH.")]
DataDir = Annotated[Optional[str], typer.Option(help="Folder with the dataset files (downloaded there when online).")]
Model = Annotated[Optional[str], typer.Option(help="cnn, resnet20, ... (default: cnn for 1-channel data, else resnet20).")]
Budget = Annotated[Optional[str], typer.Option(help="Fraction(s) of the full model's measured training memory; a comma list splits clients into equal groups.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Local mini-batch size.")]
Config = Annotated[Optional[Path], typer.Option("--config", help="TOML file with the same keys as the flags; flags win.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")]
Seed = Annotated[Optional[int], typer.Option(help="Fixes partition, sampling, init and training order.")]


@app.command(context_settings=EXTRA)
@boundary
def run(ctx: typer.Context,
        method: Method = None, dataset: Dataset = None, data_dir: DataDir = None, model: Model = None,
        clients: Annotated[Optional[int], typer.Option(help="Number of clients.")] = None,
        clients_per_round: Annotated[Optional[int], typer.Option(help="Clients sampled each round.")] = None,
        rounds: Annotated[Optional[int], typer.Option(help="Communication rounds.")] = None,
        local_epochs: Annotated[Optional[int], typer.Option(help="Local epochs per round (per step).")] = None,
        batch_size: BatchSize = None,
        lr: Annotated[Optional[float], typer.Option(help="Client learning rate.")] = None,
        momentum: Annotated[Optional[float], typer.Option(help="SGD momentum.")] = None,
        weight_decay: Annotated[Optional[float], typer.Option(help="SGD weight decay.")] = None,
        lr_schedule: Annotated[Optional[str], typer.Option(help="const or cosine (over rounds).")] = None,
        partition: Annotated[Optional[str], typer.Option(help="iid, dirichlet:ALPHA or shards:K.")] = None,
        augment: Annotated[Optional[str], typer.Option(help="Training augmentation: auto (pad-4 crop + flip for colour images up to 64 px, none for grey ones), none or crop-flip.")] = None,
        memory_budget: Budget = None,
        budget_assignment: Annotated[Optional[str], typer.Option(help="fixed (equal client groups) or per-round (each client's budget drawn from the list every round).")] = None,
        eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N rounds (and after the last).")] = None,
        weighting: Annotated[Optional[str], typer.Option(help="Masked-mean weights: samples or uniform.")] = None,
        client_state: Annotated[Optional[str], typer.Option(help="stateless (everything sent each round) or stateful (only changes) for bytes down.")] = None,
        device: Device = None, seed: Seed = None,
        client_batching: Annotated[Optional[str], typer.Option(help="on: clients that share a plan shape train together (vmap; same results within float tolerance); off: one at a time; auto: on on a GPU, off on a CPU.")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Run folder (default results/runs/<method>-<timestamp>).")] = None,
        checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N rounds (0: only at the end and on Ctrl-C).")] = None,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this folder exactly as its config.toml says (only --quiet may be added).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run that --out already holds (its files are removed first).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no summary table.")] = False,
        config: Config = None) -> None:
    """Run one method at one budget (list) and write rounds.csv, clients.csv, summary.json."""

    from fedbench.checkpoint import Checkpointer, clear, held_files, restore, stop_on_interrupt
    from fedbench.config import resolve
    from fedbench.distributed import from_env
    from fedbench.engine import prepare
    from fedbench.observers import Live, RunFiles

    flags = dict(method=method, dataset=dataset, data_dir=data_dir, model=model, clients=clients,
                 clients_per_round=clients_per_round, rounds=rounds, local_epochs=local_epochs,
                 batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                 lr_schedule=lr_schedule, partition=partition, augment=augment, memory_budget=memory_budget,
                 budget_assignment=budget_assignment,
                 eval_every=eval_every, weighting=weighting, client_state=client_state, device=device,
                 client_batching=client_batching, seed=seed, out=str(out) if out else None, quiet=quiet or None,
                 checkpoint_every=checkpoint_every, **parse_extra(ctx.args))
    if resume is not None:
        if overwrite or config is not None:
            raise ConfigError("--overwrite" if overwrite else "--config",
                              "not with --resume, which continues the run in its folder as its config.toml says")
        config, flags = resume_config(resume, flags)
    cfg = resolve(flags, config)
    folder = Path(cfg.out or f"results/runs/{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}")
    group = from_env()  # under torchrun: the processes share each round's clients; the first one writes
    main = group is None or group.main
    held = held_files(folder) if resume is None and not overwrite and main else []
    if held:
        raise ConfigError("--out", f"{folder} already holds a run ({', '.join(held)}); continue it with --resume "
                                   f"{folder}, replace it with --overwrite, or choose another --out")
    with measuring(not cfg.quiet and main):  # not on the other torchrun processes
        runner = prepare(cfg, group=group)
    if resume is not None:
        restore(runner, folder)
    elif overwrite and main:
        clear(folder)
    checkpoints = Checkpointer(folder, cfg.checkpoint_every)
    observers = ([RunFiles(folder), checkpoints] if main else []) + ([] if cfg.quiet or not main else [Live(err)])
    stopping = stop_on_interrupt(checkpoints, lambda: err.print("Ctrl-C: stopping after this round, with a checkpoint "
                                                                "(Ctrl-C again: stop at once)"))
    try:  # under torchrun every process gets the Ctrl-C and stops at once
        with stopping if group is None else nullcontext():
            runner.execute(observers)
    except KeyboardInterrupt:
        resumable = (f"continue from its checkpoint (round {checkpoints.saved}) with: fedbench run --resume {folder}"
                     if checkpoints.saved else "no round was checkpointed, nothing to resume")
        err.print(f"interrupted after round {runner.completed}; {resumable}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if not cfg.quiet and main:
        err.print(f"results: {folder}")


def resume_config(folder: Path, flags: dict) -> tuple[Path, dict]:
    """A resumed run takes every setting from its folder's config.toml; only --quiet may be added. Not even
    --rounds: the lr schedule, the methods' stage schedules and the last evaluation depend on the total."""
    path = folder / "config.toml"
    if not path.exists():
        raise ConfigError("--resume", f"{folder} is not a fedbench run folder (no config.toml)")
    given = {k for k, v in flags.items() if v is not None} - {"quiet"}
    if given:
        raise ConfigError("--resume", f"continues the run exactly as {path} says; drop "
                                      f"{', '.join('--' + k.replace('_', '-') for k in sorted(given))}"
                                      + (" (to train longer, start a new run)" if "rounds" in given else ""))
    return path, {"quiet": flags["quiet"], "out": str(folder)}


@app.command()
def methods() -> None:
    """List every registered method with a one-line description and its paper."""
    from fedbench.registry import list_methods

    table = Table("method", "description", "paper")
    for m in list_methods():
        table.add_row(m.name, m.description, m.paper)
    out.print(table)


@app.command(context_settings=EXTRA)
@boundary
def profile(ctx: typer.Context,
            method: Method = None, dataset: Dataset = None, data_dir: DataDir = None, model: Model = None,
            memory_budget: Budget = None, batch_size: BatchSize = None,
            rounds: Annotated[Optional[int], typer.Option(help="Rounds (for methods whose schedule depends on them).")] = None,
            device: Device = None, seed: Seed = None, config: Config = None,
            csv: Annotated[Optional[Path], typer.Option(help="Also write the table as CSV.")] = None) -> None:
    """Measure training memory, FLOPs and bytes of each configuration; no training."""
    from fedbench.config import resolve
    from fedbench.engine import prepare
    from fedbench.report import profile_rows, render_profile

    flags = dict(method=method, dataset=dataset, data_dir=data_dir, model=model, memory_budget=memory_budget,
                 batch_size=batch_size, rounds=rounds, device=device, seed=seed, **parse_extra(ctx.args))
    with measuring(True):
        runner = prepare(resolve(flags, config), shapes_only=True)
        rows = profile_rows(runner)
    out.print(render_profile(runner, rows))
    if csv:
        rows.to_csv(csv, index=False)


RUN_SETTINGS = ("dataset", "data_dir", "model", "clients", "clients_per_round", "rounds", "local_epochs", "batch_size",
                "lr", "momentum", "weight_decay", "lr_schedule", "partition", "augment", "budget_assignment", "eval_every", "weighting", "client_state",
                "device", "client_batching", "checkpoint_every")


def options_of(command, names: tuple[str, ...]):
    """Give the decorated command these options of ``command``: declared once, shared (keyword-only)."""
    import inspect

    shared = inspect.signature(command, eval_str=True).parameters

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        extra = [shared[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in names]
        fn.__signature__ = sig.replace(parameters=own + extra)
        return fn
    return decorate


@app.command(context_settings=EXTRA)
@boundary
@options_of(run, RUN_SETTINGS)
def compare(ctx: typer.Context,
            methods: Annotated[Optional[str], typer.Option(help="Comma list of methods, or all (every registered one).")] = None,
            memory_budget: Annotated[Optional[str], typer.Option(help="Budgets to sweep, comma list (fractions of the full model's measured training memory): each cell gives ONE of them to all its clients.")] = None,
            seeds: Annotated[Optional[str], typer.Option(help="Comma list of seeds (default 0).")] = None,
            out: Annotated[Optional[Path], typer.Option(help="Sweep folder, one run folder per cell; rerun the same command to continue.")] = None,
            jobs: Annotated[Optional[int], typer.Option(help="Cells run at once in separate processes (default 1: in turn, also on a GPU).")] = None,
            preset: Annotated[Optional[str], typer.Option(help="smoke: every registered method at budget 0.5 on fmnist-mini, a few rounds (fedbench/presets/).")] = None,
            check: Annotated[bool, typer.Option("--check", help="Exit 1 if a cell failed, a budgeted method exceeded a client's budget or a method ended at chance accuracy.")] = False,
            config: Annotated[Optional[Path], typer.Option("--config", help="Sweep TOML: run keys, a list value is a sweep axis, overrides.METHOD tables.")] = None,
            **settings) -> None:
    """Run methods x budgets x seeds (x any swept key), one run folder per cell; finished cells are skipped."""
    from fedbench.compare import check_cells, grid, load_sweep, sweep
    from fedbench.distributed import from_env

    flags = settings | parse_extra(ctx.args) | dict(method=methods, memory_budget=memory_budget, seed=seeds,
                                                    out=str(out) if out else None, jobs=jobs)
    todo = grid(load_sweep(flags, config, preset))
    group = from_env()  # under torchrun: the processes share the cells; the first one reports
    if group is None or group.main:
        err.print(f"sweep {todo.root}: {len(todo.cells)} cells, {sum(c.complete() for c in todo.cells)} already "
                  f"finished" + (f"; {group.size} processes share the rest" if group else ""))
    try:
        outcomes = sweep(todo, print_outcome, group)
    except KeyboardInterrupt:
        err.print("interrupted; finished cells are kept: rerun the same command to continue")
        raise typer.Exit(130) from None
    if group is not None and not group.main:
        return
    comparison = show_comparison(todo.root)
    failures = check_cells(todo.cells, comparison.runs) if check else []
    for line in failures:
        err.print(f"check failed: {line}", highlight=False, soft_wrap=True)
    died = [o.cell for o in outcomes if o.died]
    if died:
        err.print(f"the worker process of {len(died)} cell(s) died ({', '.join(died)}): rerun the same command "
                  "to redo them", highlight=False, soft_wrap=True)
    if failures or died:
        raise typer.Exit(1)


def print_outcome(o) -> None:
    err.print(f"{'done' if o.ok else 'FAILED'} {o.cell}: {o.message} ({o.seconds:.0f} s, CPU {o.cpu_seconds:.0f} s)",
              highlight=False, soft_wrap=True)


@app.command()
@boundary
def report(folder: Annotated[Path, typer.Argument(help="A sweep folder (any folder holding run folders).")]) -> None:
    """Rebuild the tables (printed, CSV, Markdown) and plots from the run folders under FOLDER, into FOLDER/report."""
    show_comparison(folder)


def show_comparison(root: Path):
    from fedbench.report import compare_runs, render_comparison, write_comparison

    comparison = compare_runs(root)
    write_comparison(comparison, root / "report")
    for table in render_comparison(comparison):
        out.print(table)
    err.print(f"tables and plots: {root / 'report'}")
    return comparison


def main() -> None:
    app(prog_name="fedbench")


if __name__ == "__main__":
    sys.exit(main())
