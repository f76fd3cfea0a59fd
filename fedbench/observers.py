"""Observers of a run: files on disk and what the terminal shows. The engine knows neither."""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedbench.budget import label
from fedbench.config import RUN
from fedbench.devices import describe as devices_of
from fedbench.engine import Observer, Run
from fedbench.errors import ConfigError
from fedbench.partition import describe
from fedbench.records import ClientRound, Round

FILES = ("config.toml", "partition.csv", "rounds.csv", "clients.csv", "summary.json")  # what RunFiles writes


def to_toml(values: dict) -> str:
    """A flat TOML document (strings, numbers, booleans, lists of those) of ``RunConfig.settings()``, each run
    setting under its help as a comment; re-usable with --config."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)
    return "".join((f"# {RUN[k].help}\n" if k in RUN else "") + f"{k.replace('_', '-')} = {fmt(v)}\n"
                   for k, v in values.items() if v is not None)


@contextmanager
def writing(path: Path, note: str = ""):
    """Turn a failed write (disk full, no permission) into one line naming --out."""
    try:
        yield
    except OSError as e:
        raise ConfigError("--out", f"cannot write {path}: {e.strerror or e}{note}") from None


def write_atomic(path: Path, content: str | Callable[[IO[bytes]], object]) -> None:
    """Write ``content`` (text, or a function writing to a binary file) to PATH.tmp, then rename it over PATH:
    a failed or interrupted write keeps the previous file and leaves no .tmp behind."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "; its previous version is kept" if path.exists() else ""):
        try:
            with open(tmp, "wb") as f:
                content(f) if callable(content) else f.write(content.encode())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Inconsistent(Exception):
    """A run folder whose files are unreadable or disagree with each other."""


def read_logs(folder: Path, clients: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """rounds.csv and clients.csv without a last line cut short (a write that did not finish); raises
    Inconsistent if a file is unreadable, or lacks a required column (``fedbench.records``) or holds anything but
    numbers in one (empty cells only where its field may be empty). ``clients=False``: clients.csv may be absent
    (a results folder keeps config.toml, rounds.csv and summary.json only); then None."""
    frames = []
    for name, record in (("rounds.csv", Round), ("clients.csv", ClientRound)):
        if name == "clients.csv" and not clients and not (folder / name).exists():
            frames.append(None)
            continue
        columns, specs = record.required(), record.specs()
        try:
            frame = whole_lines(folder / name)
        except (OSError, ValueError) as e:  # missing, empty or malformed (UnicodeDecodeError is a ValueError)
            raise Inconsistent(f"{name} unreadable ({e})") from None
        missing = sorted(set(columns) - set(frame.columns))
        if missing:
            raise Inconsistent(f"{name} lacks columns {', '.join(missing)}")
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])
               or (specs[c].empty is None and frame[c].isna().any())]
        if bad:
            raise Inconsistent(f"{name} has missing or non-numeric values in {', '.join(bad)}")
        frames.append(frame)
    return frames[0], frames[1]


def whole_lines(path: Path) -> pd.DataFrame:
    """A CSV file without a last line cut short (a write that did not finish)."""
    text = path.read_text()
    return pd.read_csv(io.StringIO(text[:text.rfind("\n") + 1]))


def check_rounds(rounds: pd.DataFrame, clients: pd.DataFrame | None, n: int, source: str) -> None:
    """Raise Inconsistent unless ``rounds`` holds rounds 1..n and ``clients`` (if any) exactly their client-rounds;
    the message names the rounds a file lacks."""
    if rounds["round"].tolist() != list(range(1, n + 1)):
        raise Inconsistent(f"rounds.csv has {len(rounds)} rounds, {source} says {n}" + lacking(range(1, n + 1), rounds))
    if clients is None:
        return
    client_rounds = int(rounds["clients"].sum())
    if len(clients) != client_rounds or set(clients["round"]) != set(rounds["round"]):
        raise Inconsistent(f"clients.csv has {len(clients)} client-rounds, rounds.csv says {client_rounds}"
                           + lacking(rounds["round"], clients))


def lacking(rounds, frame: pd.DataFrame) -> str:
    """`` (rounds missing: 2, 5-9)``: the ``rounds`` that ``frame`` has no row of; empty if none."""
    spans: list[list[int]] = []
    for r in sorted(set(rounds) - set(frame["round"])):
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return f" (rounds missing: {', '.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)})" if spans else ""


class RunFiles(Observer):
    """config.toml, partition.csv, rounds.csv and clients.csv (flushed every round), summary.json."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def on_start(self, run: Run) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg = run.config.settings() | {"out": str(self.out)}
        write_atomic(self.out / "config.toml", to_toml(cfg))
        if run.start_round == 0:
            table = describe(run.parts, run.dataset.train_y.cpu(), run.dataset.num_classes)
            if run.devices is not None:  # which device each client has (seeded)
                table = table.assign(**devices_of(run.devices))
            table.to_csv(self.out / "partition.csv", index=False)
        logs = read_logs(self.out) if run.start_round else (None, None)  # checked by checkpoint.restore
        for name, rows in zip(("rounds.csv", "clients.csv"), logs):  # keep only rounds up to the checkpoint
            path = self.out / name
            if rows is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, rows[rows["round"] <= run.start_round].to_csv(index=False))

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        for name, rows in (("rounds.csv", [row]), ("clients.csv", clients)):
            path = self.out / name
            with writing(path):
                pd.DataFrame(rows).to_csv(path, mode="a", header=not path.exists(), index=False)

    def on_end(self, run: Run, summary: dict) -> None:
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")


class Live(Observer):
    """A rich progress bar with round, accuracy and ETA, then a summary table."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.last_acc = "-"

    def on_start(self, run: Run) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("round {task.completed}/{task.total}"), TextColumn("acc {task.fields[acc]}"),
                                 TimeRemainingColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(run.config.method, total=run.config.rounds,
                                           completed=run.start_round, acc="-")

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        if row["accuracy"] is not None:
            self.last_acc = f"{row['accuracy']:.4f}"
        self.progress.update(self.task, completed=row["round"], acc=self.last_acc)

    def on_end(self, run: Run, summary: dict) -> None:
        self.progress.stop()
        self.console.print(summary_table(summary))


def summary_table(s: dict) -> Table:
    mb = 1e6
    table = Table(title=f"{s['method']} on {s['dataset']} ({s['model']}), {s['rounds']} rounds", show_header=False)
    rows = [
        ("final accuracy", "-" if s["final_accuracy"] is None else f"{s['final_accuracy']:.4f}"),
        *([("initial model (untrained), same evaluation", f"{s['initial_accuracy']:.4f}")]
          if "initial_accuracy" in s else []),
        ("evaluation", s["evaluation"]),
        ("memory budget", ", ".join(label(b) for b in s["memory_budget"])),
        ("full-model training memory", f"{s['full_model_memory_bytes'] / mb:.2f} MB"),
        ("peak client memory (max)", f"{s['peak_max_bytes'] / mb:.2f} MB"),
        ("client-rounds over budget", "unbudgeted" if s.get("unbudgeted") else str(s["violations"])),
        *([("client-rounds dropped (out of memory)", str(s["dropped_client_rounds"]))]
          if s.get("over_budget") == "drop" else []),
        ("train GFLOPs / client-round", f"{s['train_flops_per_client_round'] / 1e9:.3f}"),
        ("MB down / up per client-round", f"{s['bytes_down_per_client_round'] / mb:.3f} / {s['bytes_up_per_client_round'] / mb:.3f}"),
        ("forward MMACs / sample (fvcore)", f"{s['forward_macs_per_sample'] / 1e6:.2f}"),
        *([("simulated time (--devices " + s["devices"] + ")",
            f"{s['simulated_time_s'] / 3600:.3f} h" + (f"; {s['late_client_rounds']} client-rounds late (deadline "
                                                       f"{s['deadline']:g} s)" if s.get("deadline") else ""))]
          if s.get("devices") else []),
        ("device, wall time", f"{s['device']}, {s['wall_s']:.1f} s"),
    ]
    if s.get("status") == "diverged":
        rows.insert(0, ("status", f"diverged in round {s['diverged_round']} (train loss not finite)"))
    for k, v in rows:
        table.add_row(k, v)
    return table
