"""One simulation and one sweep over torchrun processes (gloo, CPU) equal the one-process run (issue 9)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from fedbench import registry
from fedbench.aggregate import MaskedMean
from fedbench.config import resolve
from fedbench.distributed import Group
from fedbench.engine import prepare
from fedbench.errors import ConfigError
from fedbench.models import create_model
from fedbench.plan import Plan
from fedbench.registry import list_methods
from fedbench.methods._width import first_k
from fedbench.methods.fedavg import FedAvg

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--clients", "12", "--clients-per-round", "5", "--rounds", "2", "--eval-every", "1", "--device", "cpu",
          "--partition", "dirichlet:0.5", "--quiet"]
CASES = {
    "fedavg": ["--method", "fedavg", "--model", "fedavg-cnn"],
    "heterofl-mixed": ["--method", "heterofl", "--memory-budget", "0.25,1", "--model", "fedavg-cnn"],
    "slt": ["--method", "slt", "--memory-budget", "0.5", "--model", "resnet20", "--dataset", "synthetic:3x32:600"],
}


def fedbench(args: list[str], nproc: int = 1) -> None:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launch, "-m", "fedbench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_share_is_a_balanced_partition_of_the_round():
    clients, samples = [3, 8, 11, 20, 42, 57, 70], [500, 20, 300, 280, 40, 220, 10]
    shares = [Group(r, 3).share(clients, samples) for r in range(3)]
    assert sorted(c for s in shares for c in s) == clients
    loads = [sum(samples[clients.index(c)] for c in s) for s in shares]
    assert max(loads) - min(loads) <= max(samples)
    assert shares == [Group(r, 3).share(clients, samples) for r in range(3)]  # deterministic


def test_all_reduced_masked_sums_equal_one_process():
    torch.manual_seed(0)
    model = create_model("fedavg-cnn", num_classes=10, in_chans=1, img_size=28)
    half = Plan.of(first_k(model.full_widths, 0.5))
    updates = [(Plan(), {n: torch.randn_like(p) for n, p in model.named_parameters()}, 3.0),
               (half, {n: torch.randn_like(p) for n, p in create_model(
                   "fedavg-cnn", num_classes=10, in_chans=1, img_size=28, widths=half.widths(model.full_widths)
               ).named_parameters()}, 1.0)]
    alone = MaskedMean(model)
    for plan, u, w in updates:
        alone.add(plan, u, w)
    parts = [MaskedMean(model), MaskedMean(model), MaskedMean(model)]  # the third process trained nobody
    for part, (plan, u, w) in zip(parts, updates):
        part.add(plan, u, w)
    flats = []
    for part in parts:  # an all-reduce: every process ends with the sum of all
        part.all_reduce(flats.append)
    total = sum(flats)
    for part in parts:
        part.all_reduce(lambda flat: flat.copy_(total))
        result = part.result()
        assert result.keys() == alone.result().keys()
        for name, value in alone.result().items():
            torch.testing.assert_close(result[name], value)


class ServerState(FedAvg):
    """Checkpointed state of the server's (the same in every process), no client's own."""

    name = "server-state"

    def state_dict(self) -> dict:
        return {"rounds": 0}


def test_methods_with_per_client_state_are_refused_across_processes_as_declared(monkeypatch):
    with pytest.raises(ConfigError, match="one process"):
        prepare(resolve({"method": "fedepth", "device": "cpu", "quiet": True}), group=Group(0, 2))
    assert {m.name for m in list_methods() if m.keeps_client_state} == {"fedepth", "mfedepth"}
    monkeypatch.setitem(registry.METHODS, ServerState.name, ServerState)  # state, but not per client: allowed
    prepare(resolve({"method": "server-state", "device": "cpu", "quiet": True}), group=Group(0, 2))


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(case, tmp_path):
    for nproc in (1, 2):
        fedbench(["run", *CASES[case], *COMMON, "--out", str(tmp_path / f"p{nproc}")], nproc)
    one, two = (pd.read_csv(tmp_path / f / "rounds.csv") for f in ("p1", "p2"))
    if case == "fedavg":  # the launcher is the same for every method: checked once
        fedbench(["run", *CASES[case], *COMMON, "--processes", "2", "--out", str(tmp_path / "spawned")])
        # --processes 2 starts the group torchrun starts: the same shares and sums, so the same rounds
        spawned = pd.read_csv(tmp_path / "spawned" / "rounds.csv")
        pd.testing.assert_frame_equal(two.drop(columns="wall_s"), spawned.drop(columns="wall_s"))
        assert [json.loads((tmp_path / f / "summary.json").read_text())["processes"]
                for f in ("p1", "spawned")] == [1, 2]
    # The all-reduce adds the processes' masked sums in another order than one process adds its clients, but
    # the sums are float64 (fedbench.aggregate), where a round's weighted float32 updates add up exactly: the
    # global model, and so every round, is the one-process run's on any CPU, not merely close to it.
    pd.testing.assert_frame_equal(one.drop(columns="wall_s"), two.drop(columns="wall_s"))
    models = [torch.load(tmp_path / f"p{n}" / "checkpoint.pt", weights_only=False)["model"] for n in (1, 2)]
    assert models[0].keys() == models[1].keys()
    for name in models[0]:
        assert torch.equal(models[0][name], models[1][name]), name
    clients = [pd.read_csv(tmp_path / f"p{n}" / "clients.csv") for n in (1, 2)]
    pd.testing.assert_frame_equal(*clients)  # measured on whichever process trained it


def test_sweep_over_two_processes_gives_the_same_table(tmp_path):
    grid = ["compare", "--methods", "fedavg,small", "--memory-budget", "0.5", "--seeds", "0", "--clients", "20",
            "--clients-per-round", "2", "--rounds", "2", "--eval-every", "2", "--device", "cpu"]
    for nproc in (1, 2):
        fedbench([*grid, "--out", str(tmp_path / f"p{nproc}")], nproc)
    one, two = (pd.read_csv(tmp_path / f"p{n}" / "report" / "accuracy.csv") for n in (1, 2))
    pd.testing.assert_frame_equal(one, two)


def started_run(out: Path) -> tuple[subprocess.Popen, psutil.Process, list[psutil.Process]]:
    """``run --processes 2`` in the background, once its first round is checkpointed: the process, its spawned
    worker, and every process it started."""
    args = [sys.executable, "-m", "fedbench", "run", "--method", "fedavg", "--model", "fedavg-cnn", "--rounds", "500",
            "--clients", "20", "--clients-per-round", "4", "--checkpoint-every", "1", "--processes", "2",
            "--device", "cpu", "--quiet", "--out", str(out)]
    run = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.2)
    family = psutil.Process(run.pid).children(recursive=True)
    workers = [p for p in family if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1
    return run, workers[0], family


def ended(run: subprocess.Popen, family: list[psutil.Process]) -> list[str]:
    """stderr's lines, once the run and every process it started have ended (none hangs, none is left)."""
    _, stderr = run.communicate(timeout=120)
    assert not psutil.wait_procs(family, timeout=30)[1]
    return stderr.strip().splitlines()


def test_a_killed_worker_ends_the_run_in_one_line_with_the_way_forward(tmp_path):
    """It once ended in gloo's 114-line traceback ("Connection closed by peer")."""
    run, worker, family = started_run(tmp_path / "run")
    worker.send_signal(signal.SIGKILL)  # as the out-of-memory killer does
    lines = ended(run, family)
    assert run.returncode == 1
    assert len(lines) == 1, lines
    assert "worker process 1 of the run was killed by SIGKILL (as the out-of-memory killer does)" in lines[0]
    assert f"continue from its checkpoint (round " in lines[0]
    assert f"fedbench run --resume {tmp_path / 'run'}" in lines[0]


@pytest.mark.parametrize("group", [False, True], ids=["kill-run", "sigterm-to-group"])
def test_sigterm_ends_the_round_checkpointed_and_stops_the_workers(tmp_path, group):
    """``kill PID`` of the run, or a batch scheduler's SIGTERM to every process of the job: the workers leave it to
    rank 0, which ends the round with them, checkpoints it and stops them."""
    run, _, family = started_run(tmp_path / "run")
    (os.killpg if group else os.kill)(run.pid, signal.SIGTERM)
    lines = ended(run, family)
    assert run.returncode == 130 and len(lines) == 2, lines
    assert lines[0].startswith("SIGTERM: stopping after this round, with a checkpoint")
    done = len(pd.read_csv(tmp_path / "run" / "rounds.csv"))
    assert lines[1].startswith(f"interrupted after round {done}; ") and "fedbench run --resume" in lines[1]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["round"] == done


def test_workers_stop_in_one_line_when_the_main_process_dies(tmp_path):
    run, _, family = started_run(tmp_path / "run")
    run.send_signal(signal.SIGKILL)
    lines = ended(run, family)
    assert len(lines) == 1, lines
    assert "worker process 1 stops: the run's main process (rank 0, pid" in lines[0]
    assert "fedbench run --resume" in lines[0]
