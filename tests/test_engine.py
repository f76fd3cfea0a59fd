"""The round loop on real data: learning, determinism, exact resume, budgets recorded per client-round."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedbench.budget import client_budgets, draw_budgets
from fedbench.checkpoint import Checkpointer, restore
from fedbench.cli import app
from fedbench.config import resolve
from fedbench.engine import Observer, prepare
from fedbench.observers import RunFiles
from tests.conftest import small_run, timing_free


def test_fedavg_learns_fmnist_mini_within_a_cpu_minute():
    # the default job (100 clients, 10 per round, resnet20) for half its 40 rounds: 0.7695 at round 20 on a 2-core
    # Intel Xeon (AMX, bf16 by --precision auto), 0.634 at round 5; chance 0.1
    run = prepare(resolve({"device": "cpu", "quiet": True, "rounds": 20}))
    summary = run.execute()
    assert summary["final_accuracy"] >= 0.7
    assert summary["violations"] == 0


def test_same_seed_same_rounds_and_different_seed_differs():
    first, second = small_run(seed=3), small_run(seed=3)
    first.execute(), second.execute()
    assert timing_free(first.rows) == timing_free(second.rows)
    other = small_run(seed=4)
    other.execute()
    assert timing_free(other.rows) != timing_free(first.rows)


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_decays_from_lr_to_lr_floor_at_the_last_round(floor):
    run = small_run(rounds=8, lr=0.2, lr_schedule="cosine", lr_floor=floor)
    assert run.lr_at(0) == pytest.approx(0.2) and run.lr_at(4) == pytest.approx(0.1 + floor * 0.1)
    assert run.lr_at(8) == pytest.approx(0.2 * floor)


@pytest.mark.parametrize("settings", [{}, {"devices": "edge", "deadline": 2.0}, {"eval_initial": True}])
def test_resume_matches_uninterrupted_run_row_for_row(tmp_path, settings):  # the simulated clock and the
    whole = small_run(rounds=4, **settings)                                 # initial evaluation carry on too
    expected = whole.execute([RunFiles(tmp_path / "whole")])
    part = small_run(rounds=4, **settings)
    folder = tmp_path / "part"

    class Stop(Observer):  # interrupted after round 2, checkpointed every round
        def after_round(self, run, row, clients):
            if row["round"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.execute([RunFiles(folder), Checkpointer(folder, every=1), Stop()])
    resumed = small_run(rounds=4, **settings)
    restore(resumed, folder)
    assert resumed.start_round == 2
    summary = resumed.execute([RunFiles(folder), Checkpointer(folder, every=1)])
    a = pd.read_csv(tmp_path / "whole" / "rounds.csv").drop(columns="wall_s")
    b = pd.read_csv(folder / "rounds.csv").drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b)
    assert summary.get("initial_accuracy") == expected.get("initial_accuracy")


def test_eval_initial_evaluates_the_untrained_model_and_changes_nothing_else(tmp_path):
    plain, probed = small_run(rounds=2), small_run(rounds=2, eval_initial=True)
    untrained = probed.method.evaluate(probed.model, 0)["accuracy"]
    assert "initial_accuracy" not in plain.execute()
    assert probed.execute()["initial_accuracy"] == untrained < 0.3  # 10 classes: near chance before training
    assert timing_free(plain.rows) == timing_free(probed.rows)
    out = tmp_path / "run"
    ran = CliRunner().invoke(app, ["run", "--model", "fedavg-cnn", "--rounds", "1", "--clients", "10",
                                   "--clients-per-round", "2", "--eval-initial", "--out", str(out), "--quiet"])
    assert ran.exit_code == 0, ran.output
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    cell = pd.read_csv(out / "report" / "accuracy.csv")["1"].iloc[0]
    assert f"(untrained {pd.read_json(out / 'summary.json', typ='series')['initial_accuracy']:.4f})" in cell


def test_report_rows_read_a_setting_an_older_config_lacks_as_its_default(tmp_path):
    ran = CliRunner().invoke(app, ["run", "--model", "fedavg-cnn", "--rounds", "1", "--clients", "10",
                                   "--clients-per-round", "2", "--out", str(tmp_path / "new"), "--quiet"])
    assert ran.exit_code == 0, ran.output
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    lines = (old / "config.toml").read_text().splitlines()
    (old / "config.toml").write_text("\n".join(l for l in lines if not l.startswith("over-budget")) + "\n")
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 0
    rows = pd.read_csv(tmp_path / "report" / "runs.csv")["row"]
    assert list(rows) == ["fedavg", "fedavg"]  # not "fedavg over-budget=record" beside the older run


def test_fedavg_records_budget_violations_of_constrained_clients():
    run = small_run(memory_budget="0.5,1", rounds=1)
    run.execute()
    clients = run.rows[0]
    assert clients["violations"] >= 1  # FedAvg trains the full model whatever the budget
    assert client_budgets((0.5, 1.0), 4) == [0.5, 0.5, 1.0, 1.0]


def test_small_fits_the_smallest_budget_and_is_evaluated_at_its_width():
    run = small_run(method="small", memory_budget="0.25,1", rounds=2)
    summary = run.execute()
    assert summary["violations"] == 0
    assert summary["peak_max_bytes"] <= 0.25 * summary["full_model_memory_bytes"]
    assert "small model (w=" in summary["evaluation"]
    assert summary["final_accuracy"] > 0.3


def test_cli_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", "fedavg-cnn", "--rounds", "2", "--clients", "10",
                                      "--clients-per-round", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("config.toml", "rounds.csv", "clients.csv", "summary.json", "partition.csv", "checkpoint.pt"):
        assert (out / name).exists(), name
    clients = pd.read_csv(out / "clients.csv")
    assert list(clients.columns[:8]) == ["round", "client", "budget", "budget_bytes", "config", "peak_bytes",
                                         "of_budget", "within_budget"]
    assert len(clients) == 4
    # the written config reproduces the run
    again = CliRunner().invoke(app, ["run", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "rounds.csv").drop(columns="wall_s"),
                                  pd.read_csv(tmp_path / "again" / "rounds.csv").drop(columns="wall_s"))


@pytest.mark.parametrize("partition", ["dirichlet:0.3", "shards:2"])
def test_non_iid_partitions_run(partition):
    run = small_run(partition=partition, rounds=1)
    run.execute()
    assert run.rows[0]["accuracy"] is not None


def test_per_round_budget_assignment_redraws_budgets_and_stays_within_them():
    run = small_run(method="heterofl", memory_budget="0.25,1", budget_assignment="per-round", rounds=3)
    seen = []

    class Watch:
        def on_start(self, run): ...
        def after_round(self, run, row, clients):
            seen.append({c["client"]: c["budget"] for c in clients})
        def on_end(self, run, summary): ...

    summary = run.execute([Watch()])
    assert summary["violations"] == 0
    by_client: dict[int, set] = {}
    for r in seen:
        for c, b in r.items():
            by_client.setdefault(c, set()).add(b)
    assert {b for bs in by_client.values() for b in bs} == {0.25, 1.0}
    assert draw_budgets((0.25, 1.0), 20, 0, 1) != draw_budgets((0.25, 1.0), 20, 0, 2)  # redrawn each round


def test_per_round_budgets_that_no_fixed_group_holds_get_the_width_resolved_for_them():
    """2 clients, budgets 0.25,0.5,1 drawn per round: the fixed groups hold 0.25 and 0.5 only, round 2 draws 1.
    Every budget of the list is resolved at setup, and each client-round trains its drawn budget's width."""
    run = small_run(method="heterofl", clients=2, clients_per_round=2, rounds=2, memory_budget="0.25,0.5,1",
                    budget_assignment="per-round")
    assert run.method.widths.keys() == {0.25, 0.5, 1.0}
    records = []

    class Watch(Observer):
        def after_round(self, run, row, clients):
            records.extend(clients)

    summary = run.execute([Watch()])
    assert summary["violations"] == 0 and len(records) == 4 and 1.0 in {r["budget"] for r in records}
    for r in records:
        assert r["budget"] == draw_budgets((0.25, 0.5, 1.0), 2, 0, r["round"] - 1)[r["client"]]
        assert r["config"] == run.method.width_plan(run.method.widths[r["budget"]]).label
