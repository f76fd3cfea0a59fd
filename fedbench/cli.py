"""``fedbench``: thin Typer commands over plain functions, one error boundary (exit code 2).

The options of ``run``, ``compare`` and ``profile`` are derived from the settings' declarations
(``fedbench.config``, each method's ``Options``, each model's keywords: ``fedbench.registry``), never restated here.
``run`` is a thin command over ``fedbench.launch``, which also runs each cell of ``compare``.
Exit codes: 0 done, 1 a sweep with failed cells (``compare``) or a dead worker process (``run``), 2 bad
input (one line, nothing written), 3 training diverged (``run``), 130 interrupted (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import difflib
import inspect
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from fedbench.config import RUN
from fedbench.errors import ConfigError
from fedbench.settings import flag, parse

if TYPE_CHECKING:  # the heavy modules load on first use (fedbench --help stays fast)
    from fedbench.compare import Grid
    from fedbench.distributed import Group

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Benchmark memory-constrained federated-learning methods on one simulation engine.")
# Piped output (logs, CI) gets wide tables instead of rich's 80 columns, which would truncate their cells.
# No rich markup: what is printed holds user text (paths, names, values), which must show as given.
out = Console(width=None if sys.stdout.isatty() else 200, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, markup=False)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}  # unknown options: refused in one line
OPTIONS_PANEL = "Method and model options"
COMPARE_SETTINGS = tuple(k for k in RUN if k not in ("method", "memory_budget", "seed", "out", "quiet", "processes"))
PROFILE_SETTINGS = ("method", "dataset", "data_dir", "model", "memory_budget", "batch_size", "rounds", "device", "seed")


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


def boundary(fn):
    """Turn a ConfigError into one line on stderr and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            err.print(Text.assemble(("error:", "red"), f" {e.flag}: {e.message}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


# --- options derived from the declarations -----------------------------------------------------
def settings_of(*names: str):
    """Give the decorated command an option for each named run setting and for every method and model option;
    it receives them as ``**settings`` (text as given; None, or False for a switch, when not given)."""
    from fedbench.registry import option_specs

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        derived = [option(RUN[n]) for n in names] + [option(o[0][1], o) for o in option_specs().values()]
        fn.__signature__ = sig.replace(parameters=own + derived)
        return fn
    return decorate


def option(spec, owners: list[tuple[str, object]] = ()) -> inspect.Parameter:
    """The Typer option of a declared setting: its type or choices as the metavar, default and bounds in the help;
    a method or model option names its owners (and each one's default where they differ)."""
    def shown(default) -> str:
        if isinstance(default, bool):
            return str(default).lower()
        return ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else str(default)

    if spec.base is bool and not owners:  # a switch of the run: --quiet
        info = typer.Option(flag(spec.name), help=spec.help)
        return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, info])
    defaults: dict[str, list[str]] = {}
    for owner, s in owners or [("", spec)]:
        defaults.setdefault(shown(s.default), []).append(owner)
    default = next(iter(defaults)) if len(defaults) == 1 else "; ".join(f"{d} ({', '.join(o)})" for d, o in defaults.items())
    bounds = f" ({spec.range})" if spec.base in (int, float) and str(spec.range) else ""
    whose = ", ".join(o for o, _ in owners)
    text = (f"{whose}: {spec.help}" if whose and spec.help else whose or spec.help) + bounds
    kind = {bool: "BOOLEAN", int: "INTEGER", float: "FLOAT", tuple: "FLOAT[,FLOAT...]"}.get(spec.base, "TEXT")
    words = (*spec.choices, kind) if spec.choices and spec.base is not str else spec.choices  # [auto|INTEGER]
    metavar = "[" + "|".join(words) + "]" if words else kind
    info = typer.Option(flag(spec.name), help=text, metavar=metavar,
                        show_default=default if spec.default is not None else False,
                        rich_help_panel=OPTIONS_PANEL if owners else None)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[str], info])


def given(ctx: typer.Context, settings: dict) -> dict:
    """The derived options as typed values (None: not given); an argument that is no option is refused."""
    if ctx.args:
        near = difflib.get_close_matches(ctx.args[0], [o for p in ctx.command.params for o in p.opts], 1)
        raise ConfigError(ctx.args[0], f"not an option of fedbench {ctx.info_name}"
                          + (f" (did you mean {near[0]}?)" if near else "")
                          + f"; allowed: the options `fedbench {ctx.info_name} -h` lists")
    return from_text({k: (v or None) if isinstance(v, bool) else v for k, v in settings.items()})


def from_text(flags: dict) -> dict:
    """Command-line flags (text, or None when not given) -> typed values, by each setting's declaration."""
    from fedbench.registry import option_specs

    known = RUN | {name: owners[0][1] for name, owners in option_specs().items()}
    return {k: parse(known[k], v) if isinstance(v, str) and k in known else v for k, v in flags.items()}


Config = Annotated[Optional[Path], typer.Option("--config", help="TOML file with the same keys as the flags; flags win.")]
Target = Annotated[Optional[float], typer.Option(help="Accuracy whose simulated time to reach the time-to-accuracy table shows (runs with --devices).")]


# --- commands ----------------------------------------------------------------------------------
@app.command(context_settings=EXTRA)
@boundary
@settings_of(*RUN)
def run(ctx: typer.Context,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this folder exactly as its config.toml says (only --quiet and --processes may be added); a finished run is refused (exit code 2).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run that --out already holds (its files are removed first).")] = False,
        config: Config = None, **settings) -> None:
    """Run one method at one budget (list) and write rounds.csv, clients.csv, summary.json.

    Exit code 3: training diverged (a NaN/inf train loss); the run stops after that round. Exit code 1: a
    worker process of --processes died (killed, out of memory); rounds up to the last checkpoint are kept.
    """
    from fedbench.checkpoint import sigterm_interrupts
    from fedbench.distributed import WorkerDied, from_env
    from fedbench.launch import configure, launch

    flags = given(ctx, settings)
    if resume is not None:
        if overwrite or config is not None:
            raise ConfigError("--overwrite" if overwrite else "--config",
                              "not with --resume, which continues the run in its folder as its config.toml says")
        config, flags = resume_config(resume, flags)
    cfg = configure(flags, config)
    group = from_env()  # under torchrun: the processes share each round's clients; the first one writes
    try:
        with sigterm_interrupts():
            summary = launch(cfg, resume=resume is not None, overwrite=overwrite, group=group, console=err)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except WorkerDied:
        raise typer.Exit(1) from None
    if summary["status"] == "diverged":
        raise typer.Exit(3)


def resume_config(folder: Path, flags: dict) -> tuple[Path, dict]:
    """A resumed run takes every setting from its folder's config.toml; only --quiet and --processes (how it
    executes) may be added. Not even --rounds: the lr schedule, the methods' stage schedules and the last
    evaluation depend on the total."""
    from fedbench.checkpoint import again
    from fedbench.report import read_run

    path = folder / "config.toml"
    if not path.exists():
        raise ConfigError("--resume", f"{folder} is not a fedbench run folder (no config.toml)")
    done = read_run(folder)[0]
    if done["status"] == "ok":
        raise ConfigError("--resume", f"the run in {folder} is complete ({done['rounds']} rounds done, summary.json "
                                      f"written): nothing to resume, nothing changed; {again(folder)}")
    given = {k for k, v in flags.items() if v is not None} - {"quiet", "processes"}
    if given:
        raise ConfigError("--resume", f"continues the run exactly as {path} says; drop "
                                      f"{', '.join(flag(k) for k in sorted(given))}"
                                      + (" (to train longer, start a new run)" if "rounds" in given else ""))
    return path, {"quiet": flags["quiet"], "processes": flags["processes"], "out": str(folder)}


@app.command()
@boundary
def methods(name: Annotated[Optional[str], typer.Argument(help="A method: its options, paper and deviations.")] = None) -> None:
    """List every registered method with a one-line description and its paper; with NAME, that method's
    options (type, default, allowed values), paper and documented deviations."""
    from fedbench.registry import get_method, list_methods

    if name is not None:
        return describe_method(get_method(name))
    table = Table("method", "description", "paper")
    for m in list_methods():
        table.add_row(m.name, m.description, m.paper)
    out.print(table)


def describe_method(method) -> None:
    from fedbench.settings import specs

    out.print(f"{method.name}: {method.description}\npaper: {method.paper}", highlight=False)
    options = specs(method.Options).values()
    if options:
        table = Table("option", "type", "default", "allowed", "meaning", title=f"options of {method.name}")
        for s in options:
            table.add_row(flag(s.name), "choice" if s.choices else s.base.__name__, str(s.default), s.allowed, s.help)
        out.print(table)
    else:
        out.print(f"{method.name} has no options of its own", highlight=False)
    doc = method.__dict__.get("__doc__") or sys.modules[method.__module__].__doc__  # the paper and each deviation
    if doc:
        out.print(inspect.cleandoc(doc), highlight=False)


@app.command(context_settings=EXTRA)
@boundary
@settings_of(*PROFILE_SETTINGS)
def profile(ctx: typer.Context, config: Config = None,
            csv: Annotated[Optional[Path], typer.Option(help="Also write the table as CSV.")] = None, **settings) -> None:
    """Measure training memory, FLOPs and bytes of each configuration; no training."""
    from fedbench.engine import prepare
    from fedbench.launch import configure, measuring, writable
    from fedbench.report import profile_rows, render_profile

    cfg = configure(given(ctx, settings), config)
    if csv is not None:
        if csv.is_dir():
            raise ConfigError("--csv", f"{csv} is a folder; allowed: a file name")
        writable(csv.parent, "--csv")
    with measuring(err) as counted:
        runner = prepare(cfg, shapes_only=True, on_measure=counted)
        rows = profile_rows(runner)
    out.print(render_profile(runner, rows))
    if csv:
        csv.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(csv, index=False)


@app.command()
@boundary
def audit(folder: Annotated[Path, typer.Option("--out", help="Folder for claims.csv and claims.md.")] = Path("results/claims"),
          device: Annotated[str, typer.Option(help="Where to measure: cpu (the committed table), cuda or auto.",
                                              metavar="[auto|cpu|cuda]")] = "cpu") -> None:
    """Each paper's claimed resource figures beside what fedbench measures for the same configuration
    (SLT, FEDEPTH, LW-FedSSL, Federated Dropout, HeteroFL, FedRolex, FjORD, DepthFL, FIARSE, CoCoFL); no
    training, a few minutes on a CPU."""
    from fedbench.audit import audit as claims_audit, render, title, write
    from fedbench.launch import writable

    writable(folder, "--out")
    with err.status("measuring each paper's configurations"):
        rows = claims_audit(device)
    heading = title(device)
    out.print(render(rows, heading))
    csv, md = write(rows, folder, heading)
    err.print(f"claims: {csv}, {md}", highlight=False)


@app.command(context_settings=EXTRA)
@boundary
@settings_of(*COMPARE_SETTINGS)
def compare(ctx: typer.Context,
            methods: Annotated[Optional[str], typer.Option(help="Comma list of methods, or all (every registered one).")] = None,
            memory_budget: Annotated[Optional[str], typer.Option(help="Budgets to sweep, comma list (fractions of the full model's measured training memory, or sizes such as 8MB, or devices): each cell gives ONE of them to all its clients; 0.25+0.5+1 is one mixed cell (equal client groups).")] = None,
            seeds: Annotated[Optional[str], typer.Option(help="Comma list of seeds (default 0).")] = None,
            out: Annotated[Optional[str], typer.Option(metavar="PATH", help="Sweep folder, one run folder per cell; rerun the same command to continue.")] = None,
            jobs: Annotated[Optional[int], typer.Option(help="Cells run at once in separate processes (default 1: in turn, also on a GPU).")] = None,
            preset: Annotated[Optional[str], typer.Option(help="smoke: every registered method at the mixed budget 0.9,1 on fmnist-mini, a few rounds (fedbench/presets/).")] = None,
            check: Annotated[bool, typer.Option("--check", help="Exit 1 if a cell failed, a budgeted method exceeded a client's budget or a method did not learn (its final evaluation does not clear its untrained one, --eval-initial, by 5% of the way to 1).")] = False,
            target_accuracy: Target = None,
            config: Annotated[Optional[Path], typer.Option("--config", help="Sweep TOML: run keys, a list value is a sweep axis, overrides.METHOD tables.")] = None,
            **settings) -> None:
    """Run methods x budgets x seeds (x any swept key), one run folder per cell; finished cells are skipped."""
    from fedbench.compare import grid, load_sweep, sweep_folder
    from fedbench.distributed import from_env
    from fedbench.launch import exclusive, writable

    flags = given(ctx, settings) | dict(method=methods, memory_budget=memory_budget, seed=seeds, out=out, jobs=jobs)
    if target_accuracy is not None and not 0 < target_accuracy <= 1:  # before the sweep, not after it
        raise ConfigError("--target-accuracy", f"{target_accuracy!r} not allowed; allowed: a number in (0, 1]")
    spec = load_sweep(flags, config, preset)
    writable(sweep_folder(spec.get("out")), "--out")
    todo = grid(spec)
    group = from_env()  # under torchrun: the processes share the cells; the first one reports
    with exclusive(todo.root, "--out") if group is None or group.main else nullcontext():  # one sweep per folder
        compare_cells(todo, group, target_accuracy, check)


def compare_cells(todo: Grid, group: Group | None, target_accuracy: float | None, check: bool) -> None:
    """``compare`` once the sweep folder is this process's."""
    from fedbench.checkpoint import sigterm_interrupts
    from fedbench.compare import check_cells, sweep

    if group is None or group.main:
        err.print(f"sweep {todo.root}: {len(todo.cells)} cells, {sum(c.complete() for c in todo.cells)} already "
                  f"finished" + (f"; {group.size} processes share the rest" if group else ""), highlight=False)
    try:
        bar = cells_bar(sum(not c.complete() for c in todo.cells) if group is None else 0)
        with sigterm_interrupts(), bar as advance:
            outcomes = sweep(todo, lambda o: (print_outcome(o), advance()), group)
    except KeyboardInterrupt:
        err.print("interrupted; finished cells are kept, running ones continue from their last checkpoint: rerun "
                  "the same command to continue")
        raise typer.Exit(130) from None
    if group is not None and not group.main:
        return
    comparison = show_comparison(todo.root, target_accuracy)
    failures = check_cells(todo.cells, comparison.runs) if check else []
    for line in failures:
        err.print(f"check failed: {line}", highlight=False, soft_wrap=True)
    died = [o.cell for o in outcomes if o.died]
    if died:
        err.print(f"the worker process of {len(died)} cell(s) died ({', '.join(died)}): rerun the same command "
                  "to redo them", highlight=False, soft_wrap=True)
    if failures or died:
        raise typer.Exit(1)


@contextmanager
def cells_bar(total: int) -> Iterator:
    """A progress bar over the sweep's cells to run (done/total, elapsed, ETA) below the cells' outcome lines;
    yields its ``advance`` (a no-op without cells to run)."""
    if not total:
        yield lambda: None
        return
    with Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("cells", total=total)
        yield lambda: bar.advance(task)


def print_outcome(o) -> None:
    status = "done" if o.ok else "infeasible" if o.floor is not None else "FAILED"
    err.print(f"{status} {o.cell}: {o.message} ({o.seconds:.0f} s, CPU {o.cpu_seconds:.0f} s)",
              highlight=False, soft_wrap=True)


@app.command()
@boundary
def report(folder: Annotated[Path, typer.Argument(help="A sweep folder (any folder holding run folders).")],
           target_accuracy: Target = None) -> None:
    """Rebuild the tables (printed, CSV, Markdown) and plots from the run folders under FOLDER, into FOLDER/report."""
    show_comparison(folder, target_accuracy)


def show_comparison(root: Path, target: float | None = None):
    from fedbench.report import compare_runs, render_comparison, write_comparison

    comparison = compare_runs(root, target)
    write_comparison(comparison, root / "report")
    for table in render_comparison(comparison):
        out.print(table)
    err.print(f"tables and plots: {root / 'report'}", highlight=False)
    return comparison


def main() -> None:
    app(prog_name="fedbench")


if __name__ == "__main__":
    sys.exit(main())
