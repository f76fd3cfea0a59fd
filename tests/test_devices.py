"""Device profiles, simulated time, ``--deadline`` and absolute budgets (issue 18)."""
from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.devices import assign
from fedbench.engine import Observer
from fedbench.observers import RunFiles
from fedbench.report import compare_runs, duration, pivots, write_comparison
from fedbench.seeding import sample_clients
from tests.conftest import small_run, timing_free

FAST = dict(flops="2e10", up="1MB", down="4MB", step_overhead="0")
SLOW = dict(flops="1e9", up="1e5", down="2e5", step_overhead="0.01")


def per_client(tmp_path, devices: dict[int, dict], clients: int = 20) -> str:
    """A one-row-per-client devices.csv: ``devices[c]`` for the listed clients, FAST for the others."""
    rows = [{"client": c, "name": "slow" if c in devices else "fast", "memory": "1GB",
             **devices.get(c, FAST)} for c in range(clients)]
    path = tmp_path / "devices.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


class Clients(Observer):
    """Keeps every client record of a run."""

    def __init__(self):
        self.records: list[dict] = []

    def after_round(self, run, row, clients):
        self.records += clients


def execute(run, *observers) -> tuple[dict, pd.DataFrame]:
    keep = Clients()
    summary = run.execute([*observers, keep])
    return summary, pd.DataFrame(keep.records)


def test_time_of_a_two_client_round_is_its_slowest_clients_computed_by_hand(tmp_path):
    first, second = sample_clients(0, 0, 20, 2)  # round 1's clients: one slow, one fast device
    run = small_run(clients_per_round=2, rounds=2, devices=per_client(tmp_path, {first: SLOW}))
    _, records = execute(run)
    full = run.method.full_plan()
    for rnd in (1, 2):
        expected = []
        for r in records[records["round"] == rnd].to_dict("records"):
            n = len(run.parts[r["client"]])
            assert r["train_flops"] == run.profiler.train_flops(full, 0) * n  # measured FLOPs per sample x samples
            if r["device"] == "slow":  # 1 GFLOP/s, 0.01 s a mini-batch of 32, 2e5 B/s down, 1e5 B/s up
                compute = r["train_flops"] / 1e9 + math.ceil(n / 32) * 0.01
                comm = r["bytes_down"] / 2e5 + r["bytes_up"] / 1e5
            else:                      # 20 GFLOP/s, no overhead, 4 MB/s down, 1 MB/s up
                compute, comm = r["train_flops"] / 2e10, r["bytes_down"] / 4e6 + r["bytes_up"] / 1e6
            assert r["compute_s"] == pytest.approx(compute, rel=1e-12) and r["comm_s"] == pytest.approx(comm, rel=1e-12)
            assert r["time_s"] == pytest.approx(compute + comm, rel=1e-12)
            expected.append(compute + comm)
        assert len(expected) == 2
        assert run.rows[rnd - 1]["round_s"] == pytest.approx(max(expected), rel=1e-12)
    assert records.loc[records["round"] == 1, "device"].tolist() == ["slow", "fast"]  # clients in ascending order
    assert run.rows[1]["sim_time_s"] == pytest.approx(run.rows[0]["round_s"] + run.rows[1]["round_s"], rel=1e-12)


def test_deadline_drops_exactly_the_slow_client_and_its_update(tmp_path):
    slow = {c: SLOW for c in range(0, 20, 2)}  # even clients: ~1000x slower than the deadline allows
    late = small_run(clients_per_round=4, rounds=2, devices=per_client(tmp_path, slow), deadline=30.0)
    summary, records = execute(late)
    offline = {c: {**SLOW, "availability": "1e-12"} for c in slow}  # the same clients, never online
    (tmp_path / "off").mkdir()
    absent = small_run(clients_per_round=4, rounds=2, devices=per_client(tmp_path / "off", offline))
    _, gone = execute(absent)
    assert records["late"].tolist() == (records["client"] % 2 == 0).tolist() and records["late"].any()
    assert (records.loc[records["late"], "time_s"] > 30).all() and (records.loc[~records["late"], "time_s"] < 30).all()
    assert (records.loc[records["late"], "bytes_up"] == 0).all() and (records.loc[records["late"], "train_flops"] > 0).all()
    assert [r["round_s"] for r in late.rows] == [30.0, 30.0]
    assert summary["late_client_rounds"] == int(records["late"].sum())
    # a late client contributes nothing: the global model is the one of the run in which it never took part
    for (k, v), w in zip(late.model.state_dict().items(), absent.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert [r["accuracy"] for r in late.rows] == [r["accuracy"] for r in absent.rows]
    assert (gone.loc[gone["client"] % 2 == 0, "config"] == "offline").all()


def test_absolute_and_fractional_budgets_that_are_equal_give_identical_runs():
    fractional = small_run(method="heterofl", memory_budget=(0.25, 1.0), rounds=2)
    full = fractional.ctx.full_memory
    absolute = small_run(method="heterofl", memory_budget=(f"{0.25 * full:.17g}B", f"{full}B"), rounds=2)
    assert absolute.ctx.fractions == fractional.ctx.fractions == [0.25, 1.0]
    _, a = execute(fractional)
    _, b = execute(absolute)
    assert timing_free(absolute.rows) == timing_free(fractional.rows)
    assert a.equals(b)
    mb = small_run(method="heterofl", memory_budget=("1MB",), rounds=1)
    assert mb.ctx.fractions == [1e6 / mb.ctx.full_memory]


def test_memory_budget_devices_gives_each_client_its_devices_memory(tmp_path):
    run = small_run(method="heterofl", memory_budget=("devices",), rounds=1, devices=per_client(tmp_path, {}))
    assert run.ctx.fractions == [1e9 / run.ctx.full_memory] * 20 and run.budgets(0) == run.ctx.fractions


def test_assignment_is_seeded_and_follows_the_shares():
    edge = assign("edge", 100, seed=0)
    assert Counter(d.name for d in edge) == {"raspberry-pi-4": 40, "jetson-nano": 30, "m1-laptop": 30}
    assert assign("edge", 100, seed=0) == edge and assign("edge", 100, seed=1) != edge
    drawn = assign("flops=1G..10G,memory=8MB,up=1MB..2MB,down=5MB,availability=0.5..1", 50, seed=3)
    assert all(1e9 <= d.flops <= 1e10 and d.memory == 8e6 and 1e6 <= d.up <= 2e6 and d.down == 5e6
               and 0.5 <= d.availability <= 1 for d in drawn)
    assert drawn == assign("flops=1G..10G,memory=8MB,up=1MB..2MB,down=5MB,availability=0.5..1", 50, seed=3)


def test_partition_csv_records_each_clients_device(tmp_path):
    run = small_run(rounds=1, devices="edge")
    RunFiles(tmp_path).on_start(run)
    table = pd.read_csv(tmp_path / "partition.csv")
    assert table["device"].tolist() == [d.name for d in assign("edge", 20, seed=0)]
    assert table["device_flops"].tolist() == [d.flops for d in run.devices]


def test_time_to_accuracy_table_and_plot(tmp_path):
    for method in ("fedavg", "heterofl"):
        run = small_run(method=method, memory_budget=(0.5,), rounds=3, devices="edge")
        run.execute([RunFiles(tmp_path / method)])
    rounds = pd.read_csv(tmp_path / "fedavg" / "rounds.csv")
    target = float(rounds["accuracy"].iloc[1])
    first = rounds.loc[rounds["accuracy"] >= target, "sim_time_s"].iloc[0]
    comp = compare_runs(tmp_path, target=target)
    tables = pivots(comp)
    assert tables["time_to_accuracy"][1].loc["fedavg", "0.5"].startswith(duration(first))
    assert tables["simulated_time"][1].loc["fedavg", "0.5"] == duration(rounds["sim_time_s"].iloc[-1])
    unreachable = pivots(compare_runs(tmp_path, target=1.0))["time_to_accuracy"][1]
    assert unreachable.loc["fedavg", "0.5"] == f"not reached (best {rounds['accuracy'].max():.4f})"
    paths = write_comparison(comp, tmp_path / "report")
    assert tmp_path / "report" / "accuracy_vs_time.png" in paths and (tmp_path / "report" / "time_to_accuracy.csv").exists()


@pytest.mark.parametrize("args, flag", [
    (["--deadline", "10"], "--deadline"),
    (["--memory-budget", "devices"], "--memory-budget"),
    (["--memory-budget", "8XB"], "--memory-budget"),
    (["--devices", "no-such-preset"], "--devices"),
    (["--devices", "flops=1G,memory=8MB,up=1MB"], "--devices"),
    (["--devices", "flops=-1,memory=8MB,up=1MB,down=1MB"], "--devices"),
    (["--devices", "edge", "--deadline", "0"], "--deadline"),
])
def test_bad_device_settings_exit_2_naming_the_flag(tmp_path, args, flag):
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), "--rounds", "1", *args])
    assert result.exit_code == 2, result.output
    assert f"error: {flag}:" in result.output
    assert not (tmp_path / "run").exists()


def test_a_per_client_csv_must_list_every_client(tmp_path):
    path = per_client(tmp_path, {}, clients=19)
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), "--devices", path, "--clients", "20"])
    assert result.exit_code == 2 and "each of clients 0..19 once" in result.output
