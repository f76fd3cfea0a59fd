"""Observers of a run: files on disk and what the terminal shows. The engine knows neither."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedbench.engine import Observer, Run
from fedbench.partition import describe


def to_toml(values: dict) -> str:
    """A flat TOML document (strings, numbers, booleans, lists of those); re-usable with --config."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)
    flat = {k: v for k, v in values.items() if k != "options"} | values.get("options", {})
    return "".join(f"{k.replace('_', '-')} = {fmt(v)}\n" for k, v in flat.items() if v is not None)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFiles(Observer):
    """config.toml, partition.csv, rounds.csv and clients.csv (flushed every round), summary.json."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def on_start(self, run: Run) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        cfg = run.config.to_dict() | {"out": str(self.out)}
        write_atomic(self.out / "config.toml", to_toml(cfg))
        if run.start_round == 0:
            describe(run.parts, run.dataset.train_y.cpu(), run.dataset.num_classes).to_csv(
                self.out / "partition.csv", index=False)
        for name in ("rounds.csv", "clients.csv"):  # keep only rounds up to the checkpoint
            path = self.out / name
            if run.start_round == 0 or not path.exists():
                path.unlink(missing_ok=True)
            else:
                rows = pd.read_csv(path)
                rows[rows["round"] <= run.start_round].to_csv(path, index=False)

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        for name, rows in (("rounds.csv", [row]), ("clients.csv", clients)):
            path = self.out / name
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
        ("evaluation", s["evaluation"]),
        ("memory budget", ", ".join(f"{b:g}" for b in s["memory_budget"])),
        ("full-model training memory", f"{s['full_model_memory_bytes'] / mb:.2f} MB"),
        ("peak client memory (max)", f"{s['peak_max_bytes'] / mb:.2f} MB"),
        ("client-rounds over budget", str(s["violations"])),
        ("train GFLOPs / client-round", f"{s['train_flops_per_client_round'] / 1e9:.3f}"),
        ("MB down / up per client-round", f"{s['bytes_down_per_client_round'] / mb:.3f} / {s['bytes_up_per_client_round'] / mb:.3f}"),
        ("forward MMACs / sample (fvcore)", f"{s['forward_macs_per_sample'] / 1e6:.2f}"),
        ("device, wall time", f"{s['device']}, {s['wall_s']:.1f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
