"""Resume never mixes runs and never crashes late (issue 14, section 4): reused folders, stale checkpoints,
damaged CSVs, --resume --rounds, Ctrl-C, a full disk, malformed run folders in report / compare, and a
compare worker process that dies.

Tiny runs on the synthetic data: 4 clients, 2 per round, 2-4 rounds of a CNN (about a second each).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from typer.testing import CliRunner

from fedbench import checkpoint, compare
from fedbench.cli import app
from fedbench.compare import run_cell, run_cell_hearing
from fedbench.engine import Run
from fedbench.launch import exclusive
from fedbench.observers import RunFiles

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--model", "fedavg-cnn", "--clients", "4", "--clients-per-round", "2", "--device", "cpu", "--quiet"]


def fedbench(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code: int, *words: str) -> None:
    """The CLI contract for refused input: exit code, one line on the terminal, naming ``words``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rounds(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "rounds.csv").drop(columns="wall_s")


@pytest.fixture(autouse=True)
def terminal_sigint():
    """Python's default SIGINT handler, as in a terminal: a shell starts background jobs (CI's may be one) with
    SIGINT ignored, and fedbench then rightly leaves it ignored, so a Ctrl-C sent here would not reach the run."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c(monkeypatch, during: int, times: int = 1, *then: signal.Signals, first=signal.SIGINT) -> None:
    """A real Ctrl-C (SIGINT to this process; or ``first``), ``times`` over, then the signals ``then``, while
    round ``during`` trains."""
    train_round = Run.train_round

    def interrupted(self, rnd, *args):
        if rnd + 1 == during:
            for stop in [first] * times + list(then):
                os.kill(os.getpid(), stop)
        return train_round(self, rnd, *args)

    monkeypatch.setattr(Run, "train_round", interrupted)


def stop_after(monkeypatch, observer, rnd: int) -> None:
    """A hard stop (kill -9) right after ``observer`` (RunFiles: the CSVs, Checkpointer) handled round ``rnd``."""
    after_round = observer.after_round

    def stop(self, run, row, clients):
        after_round(self, run, row, clients)
        if row["round"] == rnd:
            raise KeyboardInterrupt

    monkeypatch.setattr(observer, "after_round", stop)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted 4-round run that every interrupted and resumed one must match."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert fedbench("run", *TINY, "--rounds", "4", "--out", out).exit_code == 0
    return out


# --- a folder holds one run ------------------------------------------------------------------------
def test_new_run_in_a_folder_holding_a_run_is_refused_unless_overwrite(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    before = files(out)
    one_line(fedbench("run", *TINY, "--seed", "1", "--out", out), 2, "--out", "already holds a run", "--overwrite")
    one_line(fedbench("run", *TINY, "--lr", "-1", "--out", out, "--overwrite"), 2, "--lr")  # bad input deletes nothing
    one_line(fedbench("run", "--resume", out, "--overwrite"), 2, "--overwrite", "--resume")
    one_line(fedbench("run", "--resume", out, "--config", out / "config.toml"), 2, "--config", "--resume")
    assert files(out) == before
    (out / "failed.json").write_text("{}")  # left by a sweep
    result = fedbench("run", *TINY, "--seed", "1", "--rounds", "2", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["seed"] == 1 and len(rounds(out)) == 2
    assert not (out / "failed.json").exists()


def test_resume_refuses_a_checkpoint_written_under_other_settings(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    config = out / "config.toml"  # as another run, stopped before its first checkpoint, would leave the folder
    (out / "summary.json").unlink()  # unfinished (a finished run is refused as complete)
    config.write_text(config.read_text().replace("lr = 0.05", "lr = 0.1").replace("device = \"cpu\"", "device = \"auto\""))
    before = files(out)
    one_line(fedbench("run", "--resume", out), 2, "--resume", "other settings", "(lr)", "--overwrite")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]
    torch.save(state, out / "checkpoint.pt")
    config.write_text(before["config.toml"].decode().replace("lr = 0.1", "lr = 0.05"))
    one_line(fedbench("run", "--resume", out), 2, "--resume", "records no settings")
    assert {k: v for k, v in files(out).items() if k not in ("config.toml", "checkpoint.pt")} == \
        {k: v for k, v in before.items() if k not in ("config.toml", "checkpoint.pt")}


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(whole, tmp_path):
    """It once ran again from its last checkpoint and rewrote every file (summary.json's command line too)."""
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    before = {name: (content, (out / name).stat().st_mtime_ns) for name, content in files(out).items()}
    one_line(fedbench("run", "--resume", out), 2, "--resume", f"the run in {out} is complete (4 rounds done",
             "nothing to resume", "--overwrite")
    assert {name: (content, (out / name).stat().st_mtime_ns) for name, content in files(out).items()} == before


@pytest.mark.parametrize("n", [1, 4, 6])
def test_resume_with_rounds_is_refused(whole, tmp_path, monkeypatch, n):
    out = tmp_path / "run"
    stop_after(monkeypatch, checkpoint.Checkpointer, 2)
    assert fedbench("run", *TINY, "--rounds", "4", "--checkpoint-every", "1", "--out", out).exit_code == 130
    monkeypatch.undo()
    before = files(out)
    one_line(fedbench("run", "--resume", out, "--rounds", n), 2, "--resume", "drop --rounds", "start a new run")
    assert files(out) == before
    assert fedbench("run", "--resume", out).exit_code == 0
    pd.testing.assert_frame_equal(rounds(out), rounds(whole))


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(whole, tmp_path, monkeypatch):
    """A checkpoint's settings lack those added to fedbench since (lr_floor): they had their default then."""
    out = tmp_path / "run"
    stop_after(monkeypatch, checkpoint.Checkpointer, 2)
    assert fedbench("run", *TINY, "--rounds", "4", "--checkpoint-every", "1", "--out", out).exit_code == 130
    monkeypatch.undo()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["lr_floor"]
    torch.save(state, out / "checkpoint.pt")
    assert fedbench("run", "--resume", out).exit_code == 0
    pd.testing.assert_frame_equal(rounds(out), rounds(whole))


# --- Ctrl-C and a full disk --------------------------------------------------------------------------
@pytest.mark.parametrize("stop, times", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)],
                         ids=["ctrl-c", "sigterm", "sigterm-twice"])
def test_ctrl_c_checkpoints_the_round_and_resume_matches_the_whole_run(whole, tmp_path, monkeypatch, stop, times):
    """SIGTERM (``kill``, a batch scheduler's stop) as a first Ctrl-C; a second SIGTERM changes nothing."""
    out = tmp_path / "run"
    ctrl_c(monkeypatch, 2, times, first=stop)  # the default --checkpoint-every 0
    result = fedbench("run", *TINY, "--rounds", "4", "--out", out)
    assert result.exit_code == 130 and f"fedbench run --resume {out}" in result.output, result.output
    assert f"{'Ctrl-C' if stop == signal.SIGINT else 'SIGTERM'}: stopping after this round" in result.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 2 and len(rounds(out)) == 2
    monkeypatch.undo()
    assert fedbench("run", "--resume", out).exit_code == 0
    pd.testing.assert_frame_equal(rounds(out), rounds(whole))


def test_ctrl_c_with_spawned_workers_checkpoints_and_resume_matches_the_whole_run(tmp_path, monkeypatch):
    """Rank 0 takes the Ctrl-C for the processes of --processes 2: the round ends, is checkpointed, the workers
    stop; the resumed run equals the uninterrupted one of the same two processes."""
    two = [*TINY, "--rounds", "4", "--processes", "2"]
    assert fedbench("run", *two, "--out", tmp_path / "whole").exit_code == 0
    ctrl_c(monkeypatch, during=2)
    result = fedbench("run", *two, "--out", tmp_path / "run")
    assert result.exit_code == 130 and "after round 2" in result.output, result.output
    monkeypatch.undo()
    assert fedbench("run", "--resume", tmp_path / "run", "--processes", "2").exit_code == 0
    pd.testing.assert_frame_equal(rounds(tmp_path / "run"), rounds(tmp_path / "whole"))


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_second_ctrl_c_stops_at_once(tmp_path, monkeypatch, first):
    out = tmp_path / "run"
    ctrl_c(monkeypatch, 2, 1, signal.SIGINT, first=first)
    result = fedbench("run", *TINY, "--rounds", "4", "--out", out)
    assert result.exit_code == 130 and "nothing to resume" in result.output, result.output
    assert not (out / "checkpoint.pt").exists() and len(rounds(out)) == 1


def test_disk_full_keeps_the_previous_checkpoint_and_leaves_no_tmp(whole, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = torch.save

    def full(obj, f, *args, **kwargs):  # round 1 saved; round 2 runs out of space half-way
        if obj["round"] == 1:
            return save(obj, f, *args, **kwargs)
        (open(f, "wb") if isinstance(f, (str, Path)) else f).write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    result = fedbench("run", *TINY, "--rounds", "4", "--checkpoint-every", "1", "--out", out)
    one_line(result, 2, "--out", "checkpoint.pt", "No space left on device", "previous version is kept")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert fedbench("run", "--resume", out).exit_code == 0  # rounds.csv holds round 2 too: cut back to round 1
    pd.testing.assert_frame_equal(rounds(out), rounds(whole))


# --- damaged CSVs: repaired to the checkpoint or refused, before any training ---------------------
def test_partial_last_lines_after_the_checkpoint_are_repaired(tmp_path, monkeypatch):
    """A write cut short in round 11 (checkpoint at 10): "1" left of its line must not read as round 1."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert fedbench("run", *TINY, "--rounds", "12", "--eval-every", "4", "--out", whole).exit_code == 0
    stop_after(monkeypatch, RunFiles, 11)
    assert fedbench("run", *TINY, "--rounds", "12", "--eval-every", "4", "--checkpoint-every", "10",
                    "--out", out).exit_code == 130
    monkeypatch.undo()
    for name in ("rounds.csv", "clients.csv"):
        text = (out / name).read_text()
        (out / name).write_text(text[:text.rstrip("\n").rfind("\n") + 2])  # the last line cut after "1"
    result = fedbench("run", "--resume", out)
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(rounds(out), rounds(whole))
    pd.testing.assert_frame_equal(pd.read_csv(out / "clients.csv"), pd.read_csv(whole / "clients.csv"))


@pytest.mark.parametrize("name, damage, problem", [
    ("rounds.csv", lambda lines: lines[:-1] + [lines[-1][:12]],
     "rounds.csv has 2 rounds, checkpoint.pt says 3 (rounds missing: 3)"),                        # round 3 cut
    ("rounds.csv", lambda lines: lines[:2] + lines[3:],
     "rounds.csv has 2 rounds, checkpoint.pt says 3 (rounds missing: 2)"),                        # round 2 lost
    ("rounds.csv", lambda lines: lines[:2],
     "rounds.csv has 1 rounds, checkpoint.pt says 3 (rounds missing: 2-3)"),                      # rounds 2, 3 lost
    ("rounds.csv", lambda lines: lines[:2] + [lines[2].replace(lines[2].split(",")[5], "abc", 1)] + lines[3:],
     "rounds.csv has missing or non-numeric values in bytes_down"),                               # round 2 damaged
    ("clients.csv", lambda lines: lines[:3] + lines[5:],
     "clients.csv has 4 client-rounds, rounds.csv says 6 (rounds missing: 2)"),                   # round 2 lost
])
def test_csv_lacking_a_checkpointed_round_is_refused_before_training(tmp_path, monkeypatch, name, damage, problem):
    out = tmp_path / "run"
    stop_after(monkeypatch, checkpoint.Checkpointer, 3)
    assert fedbench("run", *TINY, "--rounds", "4", "--checkpoint-every", "1", "--out", out).exit_code == 130
    monkeypatch.undo()
    path = out / name
    path.write_text("".join(damage(path.read_text().splitlines(keepends=True))))
    before = files(out)
    one_line(fedbench("run", "--resume", out), 2, "--resume", problem, "--overwrite")
    assert files(out) == before


# --- report and compare agree on what is corrupt ----------------------------------------------------
GRID = ["--methods", "fedavg", "--memory-budget", "0.5,1", "--rounds", "2", *TINY[:-1]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    result = fedbench("compare", *GRID, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def edit_json(key, value):
    def edit(folder):
        summary = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps(summary | {key: value}))
    return edit


def edit_csv(name, column, value):
    def edit(folder):
        frame = pd.read_csv(folder / name)
        frame[column] = frame[column].astype(object)
        frame.loc[0, column] = value
        frame.to_csv(folder / name, index=False)
    return edit


@pytest.mark.parametrize("edit, problem", [
    (edit_json("final_accuracy", "abc"), "summary.json final_accuracy 'abc' is not a number"),
    (edit_json("rounds", "2"), "summary.json rounds '2' is not a number"),
    (edit_json("violations", None), "summary.json violations None is not a number"),
    (edit_csv("rounds.csv", "bytes_down", "abc"), "rounds.csv has missing or non-numeric values in bytes_down"),
    (edit_csv("rounds.csv", "violations", ""), "rounds.csv has missing or non-numeric values in violations"),
    (edit_csv("clients.csv", "peak_bytes", "12x"), "clients.csv has missing or non-numeric values in peak_bytes"),
])
def test_report_lists_a_malformed_run_as_corrupt_and_compare_reruns_it(sweep, tmp_path, monkeypatch, edit, problem):
    out = tmp_path / "sweep"
    shutil.copytree(sweep, out)
    edit(out / "fedavg/b0.5/s0")
    result = fedbench("report", out)
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "report/runs.csv").set_index("folder")
    assert runs["status"].to_dict() == {"fedavg/b0.5/s0": "corrupt", "fedavg/b1/s0": "ok"}
    assert runs.loc["fedavg/b0.5/s0", "problem"] == problem
    ran = []
    monkeypatch.setattr(compare, "run_cell", lambda cell: ran.append(cell.name) or run_cell(cell))
    result = fedbench("compare", *GRID, "--out", out)
    assert result.exit_code == 0, result.output
    assert ran == ["fedavg/b0.5/s0"]
    assert (pd.read_csv(out / "report/runs.csv")["status"] == "ok").all()
    pd.testing.assert_frame_equal(rounds(out / "fedavg/b0.5/s0"), rounds(sweep / "fedavg/b0.5/s0"))


def test_ctrl_c_in_a_sweep_checkpoints_the_cell_in_progress(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = [*GRID[:4], "--rounds", "3", *GRID[6:], "--out", out]
    ctrl_c(monkeypatch, during=2)  # in the first cell; the default --checkpoint-every 0
    result = fedbench("compare", *grid)
    assert result.exit_code == 130 and "rerun the same command to continue" in result.output, result.output
    cell = out / "fedavg/b0.5/s0"
    assert torch.load(cell / "checkpoint.pt", weights_only=True)["round"] == 2 and not (out / "fedavg/b1/s0").exists()
    monkeypatch.undo()
    done = pd.read_csv(cell / "rounds.csv")
    assert fedbench("compare", *grid).exit_code == 0
    assert pd.read_csv(cell / "rounds.csv")["wall_s"][:2].tolist() == done["wall_s"].tolist()  # continued


# --- one process per folder: a second run or compare of a folder in use is refused ---------------------
def test_a_folder_in_use_by_another_fedbench_process_is_refused_and_left_alone(whole, sweep, tmp_path):
    """The lock is per open file (flock): held here as another process would hold it."""
    folder, out = tmp_path / "run", tmp_path / "sweep"
    shutil.copytree(whole, folder)
    shutil.copytree(sweep, out)
    before = {p: p.stat().st_mtime_ns for p in (*folder.iterdir(), *out.glob("fedavg/*/*/*"))}  # run files
    with exclusive(folder, "--out"):
        one_line(fedbench("run", *TINY, "--rounds", "4", "--out", folder, "--overwrite"), 2, "--out",
                 "another fedbench process", str(folder))
    with exclusive(out, "--out"):
        one_line(fedbench("compare", *GRID, "--out", out), 2, "--out", "another fedbench process")
    cell = out / "fedavg/b1/s0"
    (cell / "summary.json").unlink()  # an unfinished cell that another process is running
    with exclusive(cell, "--out"):
        result = fedbench("compare", *GRID, "--out", out)
    assert "FAILED fedavg/b1/s0: --out:" in result.output and "another fedbench process" in result.output
    assert not (cell / "failed.json").exists()  # nothing written into the folder in use
    assert {p: p.stat().st_mtime_ns for p in before if p.exists()} == {p: t for p, t in before.items() if p.exists()}
    assert fedbench("compare", *GRID, "--out", out).exit_code == 0  # once free: the cell runs again


# --- compare --jobs: a worker that dies fails only its cell; Ctrl-C and SIGTERM stop every cell ----------
def die_in_the_first_cell(cell, stops):
    """Runs in a compare worker process (imported there by name): killed as if out of memory."""
    if cell.name == "fedavg/b0.25/s0":
        os.kill(os.getpid(), signal.SIGKILL)
    return run_cell_hearing(cell, stops)


def test_a_dead_worker_fails_only_its_cell_and_a_rerun_redoes_it(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = [*GRID[:2], "--memory-budget", "0.25,0.5,1", *GRID[4:], "--out", out]
    monkeypatch.setattr(compare, "run_cell_hearing", die_in_the_first_cell)
    result = fedbench("compare", *grid, "--jobs", "2")
    assert result.exit_code == 1, result.output
    assert "FAILED fedavg/b0.25/s0: worker process died" in result.output
    assert "the worker process of 1 cell(s) died (fedavg/b0.25/s0): rerun the same command" in result.output
    assert sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json")) == \
        ["fedavg/b0.5/s0", "fedavg/b1/s0"]
    runs = pd.read_csv(out / "report/runs.csv").set_index("folder")
    assert runs.loc["fedavg/b0.25/s0", "status"] == "failed"
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    ran = []
    monkeypatch.setattr(compare, "run_cell", lambda cell: ran.append(cell.name) or run_cell(cell))
    result = fedbench("compare", *grid)
    assert result.exit_code == 0, result.output
    assert ran == ["fedavg/b0.25/s0"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert (pd.read_csv(out / "report/runs.csv")["status"] == "ok").all()


@pytest.mark.parametrize("to, stop", [("compare", signal.SIGTERM), ("group", signal.SIGTERM), ("group", signal.SIGINT)],
                         ids=["kill-compare", "sigterm-to-group", "ctrl-c-to-group"])
def test_a_stopped_sweep_checkpoints_its_running_cells_and_ends_in_one_line(tmp_path, to, stop):
    """``kill PID`` of compare alone, a batch scheduler's SIGTERM to the job, a terminal's Ctrl-C: the long cell
    stops after its round, checkpointed, and no worker prints a traceback, not even the one waiting without a cell
    (once fedavg-cnn's short cell ended); every process ends."""
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.toml"
    config.write_text('method = ["fedavg", "small"]\nrounds = 1000\n[overrides.small]\nrounds = 1\n')
    start = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as in a terminal
             "from fedbench.cli import main; sys.argv[0] = 'fedbench'; main()")
    sweep = subprocess.Popen([sys.executable, "-c", start, "compare", "--config", str(config), "--memory-budget",
                              "0.5", *TINY[:-1], "--jobs", "2", "--out", str(out)], cwd=ROOT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    long, deadline = out / "fedavg/b0.5/s0", time.monotonic() + 300
    while not ((out / "small/b0.5/s0/summary.json").exists() and (long / "rounds.csv").exists()
               and len(rounds(long)) >= 2):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.2)
    family = psutil.Process(sweep.pid).children(recursive=True)
    (os.kill if to == "compare" else os.killpg)(sweep.pid, stop)
    _, stderr = sweep.communicate(timeout=120)
    assert not psutil.wait_procs(family, timeout=30)[1]
    assert sweep.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted; finished cells are kept"), stderr
    done = len(rounds(long))
    assert 2 <= done < 1000 and torch.load(long / "checkpoint.pt", weights_only=True)["round"] == done
