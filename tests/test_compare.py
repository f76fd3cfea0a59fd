"""``fedbench compare`` / ``report``: resumable sweeps, tables that agree with their run folders, plots,
corrupt folders reported, bad grids refused before anything is written, and the smoke ``--check``.

Tiny federation: fmnist-mini, cnn, 2 rounds, 2 of 100 clients (100 images each, batch 16) per round,
one evaluation at the end (20 clients x 4 per round would train 10x more images per cell).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbench import compare, registry
from fedbench.checkpoint import Checkpointer
from fedbench.cli import app
from fedbench.methods.fedavg import FedAvg

TINY = ["--dataset", "fmnist-mini", "--model", "fedavg-cnn", "--rounds", "2", "--clients", "100", "--batch-size", "16",
        "--clients-per-round", "2", "--eval-every", "2", "--checkpoint-every", "1"]
ROOT = Path(__file__).resolve().parents[1]
GRID = ["--methods", "fedavg,small", "--memory-budget", "0.25,0.5", *TINY, "--eval-initial"]  # --check needs it
CELLS = ["fedavg/b0.25/s0", "fedavg/b0.5/s0", "small/b0.25/s0", "small/b0.5/s0"]
MEASURED = ["row", "budget", "seeds", "accuracy_mean", "peak_MB", "peak_of_budget", "train_GFLOPs", "MB_down",
            "MB_up", "violations"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))



@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2 methods x 2 budgets sweep in two spawned processes, one torch thread each, checked."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    result = invoke("compare", *GRID, "--out", str(out), "--jobs", "2", "--check")
    assert result.exit_code == 0, result.output
    assert sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json")) == CELLS
    return out


def test_interrupted_sweep_resumes_without_redoing_cells(reference, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    original = Checkpointer.after_round

    def interrupt(self, run, row, clients):  # Ctrl-C in round 2 of the third cell, after its round-1 checkpoint
        original(self, run, row, clients)
        if row["round"] == 1 and len(list(out.rglob("summary.json"))) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "after_round", interrupt)
    assert invoke("compare", *GRID, "--out", str(out)).exit_code == 130
    monkeypatch.undo()
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    cut = out / "small/b0.25/s0"
    round_one = pd.read_csv(cut / "rounds.csv")
    assert len(finished) == 2 and (cut / "checkpoint.pt").exists() and len(round_one) == 1

    ran = []
    monkeypatch.setattr(compare, "run_cell", lambda cell, run=compare.run_cell: ran.append(cell.name) or run(cell))
    result = invoke("compare", *GRID, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ran == ["small/b0.25/s0", "small/b0.5/s0"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished          # finished cells untouched
    assert pd.read_csv(cut / "rounds.csv")["wall_s"][0] == round_one["wall_s"][0]  # continued from the checkpoint
    for cell in CELLS:  # every cell, resumed or not, matches the uninterrupted sweep row for row
        mine, ref = (pd.read_csv(d / cell / "rounds.csv").drop(columns="wall_s") for d in (out, reference))
        pd.testing.assert_frame_equal(mine, ref)
    mine, ref = (pd.read_csv(d / "report/cells.csv")[MEASURED] for d in (out, reference))
    pd.testing.assert_frame_equal(mine, ref)
    assert (out / "report/accuracy.csv").read_text() == (reference / "report/accuracy.csv").read_text()


def test_tables_agree_with_run_folders(reference):
    report = reference / "report"
    runs = pd.read_csv(report / "runs.csv").set_index("folder")
    accuracy, memory, comm = (pd.read_csv(report / f"{name}.csv", index_col="method", dtype=str)
                              for name in ("accuracy", "memory", "communication"))
    markdown = (report / "report.md").read_text()
    for cell in CELLS:
        method, budget = cell.split("/")[0], cell.split("/")[1][1:]
        summary = json.loads((reference / cell / "summary.json").read_text())
        clients = pd.read_csv(reference / cell / "clients.csv")
        run = runs.loc[cell]
        assert run["status"] == "ok" and run["final_accuracy"] == summary["final_accuracy"]
        assert run["peak_MB"] == pytest.approx(clients["peak_bytes"].max() / 1e6)
        assert run["MB_down"] == pytest.approx(clients["bytes_down"].mean() / 1e6)
        assert run["violations"] == (~clients["within_budget"]).sum() == summary["violations"]
        over = " !" if summary["violations"] else ""
        untrained = f" (untrained {summary['initial_accuracy']:.4f})"
        assert accuracy.loc[method, budget] == f"{summary['final_accuracy']:.4f}{untrained}{over}"
        ratio = (clients["peak_bytes"] / clients["budget_bytes"]).max()
        assert memory.loc[method, budget] == f"{clients['peak_bytes'].max() / 1e6:.3g} ({ratio:.2f}){over}"
        assert comm.loc[method, budget] == f"{run['MB_down']:.3g} / {run['MB_up']:.3g}"
        for table in (accuracy, memory, comm):
            assert f"| {method} | {' | '.join(table.loc[method])} |" in markdown
    # FedAvg trains the full model under every budget: its peak is 1/budget of each budget, flagged
    assert memory.loc["fedavg"].tolist() == [memory.loc["fedavg", "0.25"].split()[0] + " (4.00) !",
                                             memory.loc["fedavg", "0.5"].split()[0] + " (2.00) !"]
    assert not any("!" in v for v in accuracy.loc["small"])
    for name in ("accuracy_vs_budget", "accuracy_vs_round", "accuracy_vs_mb"):
        png = (report / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_corrupt_and_half_written_runs_are_reported(reference, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(reference, out)
    rounds = out / "fedavg/b0.25/s0/rounds.csv"
    rounds.write_text("".join(rounds.read_text().splitlines(keepends=True)[:-1]))  # last round lost
    (out / "small/b0.25/s0/summary.json").unlink()                                  # interrupted
    (out / "small/b0.5/s0/summary.json").write_text('{"method": "sm')               # half-written
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "report/runs.csv").set_index("folder")
    assert runs["status"].to_dict() == {"fedavg/b0.25/s0": "corrupt", "fedavg/b0.5/s0": "ok",
                                        "small/b0.25/s0": "incomplete", "small/b0.5/s0": "corrupt"}
    assert runs.loc["fedavg/b0.25/s0", "problem"] == "rounds.csv has 1 rounds, summary.json says 2 (rounds missing: 2)"
    assert runs.loc["small/b0.5/s0", "problem"].startswith("summary.json unreadable")
    accuracy = pd.read_csv(out / "report/accuracy.csv", index_col="method", dtype=str)
    assert accuracy.index.tolist() == ["fedavg"] and accuracy.columns.tolist() == ["0.5"]  # the listed runs: no cells
    before = pd.read_csv(reference / "report/accuracy.csv", index_col="method", dtype=str)
    assert accuracy.loc["fedavg", "0.5"] == before.loc["fedavg", "0.5"]
    assert "Runs not in the tables" in result.output and "small/b0.25/s0" in result.output
    assert "| small/b0.5/s0 | corrupt | summary.json unreadable" in (out / "report/report.md").read_text()


def test_runs_not_in_the_tables_get_no_row_there_and_a_cut_row_is_no_round(reference, tmp_path):
    """An unfinished method once got a `fedavg | -` row beside its listing under "Runs not in the tables", and an
    incomplete run's half-written last row counted as a round."""
    out = tmp_path / "sweep"
    shutil.copytree(reference, out)
    for cell in ("fedavg/b0.25/s0", "fedavg/b0.5/s0"):
        (out / cell / "summary.json").unlink()                                      # interrupted
    rounds = out / "fedavg/b0.25/s0/rounds.csv"
    rounds.write_text(rounds.read_text()[:-20])                                     # round 2's row cut short
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "report/runs.csv").set_index("folder")
    assert runs.loc["fedavg/b0.25/s0", "problem"] == "no summary.json; 1 of 2 rounds in rounds.csv"
    assert runs.loc["fedavg/b0.5/s0", "problem"] == "no summary.json; 2 of 2 rounds in rounds.csv"
    markdown = (out / "report/report.md").read_text()
    for name in ("accuracy", "memory", "flops", "communication"):
        table = pd.read_csv(out / f"report/{name}.csv", index_col="method", dtype=str)
        assert table.index.tolist() == ["small"] and table.columns.tolist() == ["0.25", "0.5"]
    assert "| fedavg |" not in markdown and "| fedavg/b0.25/s0 | incomplete |" in markdown
    assert "fedavg/b0.5/s0" in result.output and not any(line.lstrip("│ ").startswith("fedavg ")
                                                         for line in result.output.splitlines())
    for cell in ("small/b0.25/s0", "small/b0.5/s0"):                                # no finished run: no tables
        (out / cell / "summary.json").unlink()
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.output
    assert not list((out / "report").glob("accuracy*.csv")) and "Runs not in the tables" in result.output


@pytest.mark.parametrize("args, line", [
    (["--methods", "fedavg,nosuch"], "error: --methods: unknown method 'nosuch'; allowed:"),
    (["--methods", "fedavg", "--memory-budget", "0.5,-1"], "error: --memory-budget: '-1' is not a positive number"),
    (["--methods", "fedavg", "--seeds", "0,x"], "error: --seeds: 'x' is not an integer"),
    (["--methods", "fedavg", "--clients-per-round", "200"], "error: --clients-per-round: 200 exceeds --clients 100"),
    (["--methods", "fedavg", "--jobs", "0"], "error: --jobs: 0 not allowed"),
    (["--methods", "fedavg", "--preset", "nosuch"], "error: --preset: unknown preset 'nosuch'; allowed: smoke"),
    (["--methods", "fedavg", "--config", "SWEEP"], "error: --lr: -1 not allowed"),  # its second cell is bad
])
def test_bad_grid_exits_2_and_writes_nothing(tmp_path, args, line):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("lr = [0.1, -1]\n")
    args = [str(sweep) if a == "SWEEP" else a for a in args]
    result = invoke("compare", *TINY, *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0].startswith(line) and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_folder_with_other_settings_is_refused(reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    result = invoke("compare", *GRID, "--rounds", "3", "--out", str(reference))
    assert result.exit_code == 2
    assert "holds a run with other settings (rounds)" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


@dataclass(frozen=True)
class Extra:
    extra: int = 1


class OverBudget(FedAvg):
    """Claims to fit its budget but trains the full model: the crafted violation."""

    name = "over-budget"
    budgeted = True
    Options = Extra


def test_grid_axes_overrides_and_method_options(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, OverBudget.name, OverBudget)
    spec = {"method": ["fedavg", "over-budget"], "memory_budget": [0.25, [0.125, 0.5]], "seed": [0, 1],
            "lr": [0.1, 0.05], "extra": [1, 2], "overrides": {"over-budget": {"lr": 0.2}}, "out": str(tmp_path)}
    cells = {c.name: c.config for c in compare.grid(spec).cells}
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 2  # fedavg: lr x budget x seed; over-budget: extra x budget x seed
    assert cells["fedavg/b0.125+0.5-lr=0.05/s1"].memory_budget == (0.125, 0.5)
    assert cells["fedavg/b0.25-lr=0.1/s0"].options == {}                       # extra is not fedavg's option
    assert cells["over-budget/b0.25-extra=2/s0"].options == {"extra": 2}
    assert cells["over-budget/b0.25-extra=2/s0"].lr == 0.2                      # its override replaces the lr axis
    assert not any(tmp_path.iterdir())
    # a list in an override is an axis of that method only
    spec = {"method": ["fedavg", "over-budget"], "memory_budget": [1], "out": str(tmp_path),
            "overrides": {"over-budget": {"extra": [1, 2]}}}
    assert sorted(c.name for c in compare.grid(spec).cells) == [
        "fedavg/b1/s0", "over-budget/b1-extra=1/s0", "over-budget/b1-extra=2/s0"]
    # the flag's 0.25+0.5+1 is one mixed cell, named as its folder
    spec = {"method": "fedavg", "memory_budget": "0.5,0.25+0.5+1", "out": str(tmp_path)}
    cells = {c.name: c.config.memory_budget for c in compare.grid(spec).cells}
    assert cells == {"fedavg/b0.5/s0": (0.5,), "fedavg/b0.25+0.5+1/s0": (0.25, 0.5, 1.0)}


def test_check_fails_on_a_violation_and_records_a_failed_cell(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, OverBudget.name, OverBudget)
    out = tmp_path / "sweep"
    result = invoke("compare", "--methods", "over-budget,small", "--memory-budget", "0.001", *TINY,
                    "--rounds", "1", "--eval-every", "1", "--out", str(out), "--check")
    assert result.exit_code == 1, result.output
    failures = [line for line in result.stderr.splitlines() if line.startswith("check failed")]
    assert len(failures) == 2
    assert failures[0].startswith("check failed: over-budget/b0.001/s0: 2 client-rounds over budget (peak / budget up to 10")
    assert failures[1].startswith("check failed: small/b0.001/s0: infeasible: --memory-budget: 0.001 (0.0264 MB) is below the "
                                  "smallest")
    assert "small" in json.loads((out / "small/b0.001/s0/failed.json").read_text())["error"]
    accuracy = pd.read_csv(out / "report/accuracy.csv", index_col="method", dtype=str)
    assert accuracy.loc["small", "0.001"].startswith("infeasible (floor 0.0")
    assert accuracy.loc["over-budget", "0.001"].endswith(" !")


def smoke(threads: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedbench", "compare", "--preset", "smoke", "--check", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_smoke_check_passes_under_1_and_2_threads(threads, tmp_path):
    """The check once flipped with the thread count: slt ended at 0.163 with one thread and at 0.092 (below chance)
    with two, in 3 rounds of 2 clients. Each method must now clear its own untrained evaluation by a margin."""
    learned = smoke(threads, "--methods", "slt", "--out", str(tmp_path / "learned"))  # every method: CI's smoke step
    assert learned.returncode == 0, learned.stderr[-3000:]


def test_smoke_check_fails_a_model_that_cannot_learn(tmp_path):
    still = smoke("1", "--methods", "slt", "--lr", "1e-9", "--out", str(tmp_path / "still"))
    assert still.returncode == 1
    failed = [line for line in still.stderr.splitlines() if line.startswith("check failed")]
    assert len(failed) == 1 and failed[0].startswith("check failed: slt/b0.9+1/s0: did not learn: final accuracy "), \
        still.stderr[-3000:]
