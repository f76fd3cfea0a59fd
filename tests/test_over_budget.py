"""``--over-budget record|drop`` (issue 18, section 3): a dropped client is one that runs out of memory."""
from __future__ import annotations

import pandas as pd

from fedbench.observers import RunFiles
from fedbench.report import compare_runs, pivots
from tests.conftest import small_run, timing_free


def test_drop_excludes_exactly_the_clients_whose_measured_peak_exceeds_their_budget(tmp_path):
    settings = dict(method="fedavg", memory_budget=(0.5, 1.0), clients_per_round=6)
    recorded = small_run(**settings)
    recorded.execute([RunFiles(tmp_path / "record")])
    dropped = small_run(**settings, over_budget="drop")
    summary = dropped.execute([RunFiles(tmp_path / "drop")])
    rec, drop = (pd.read_csv(tmp_path / f / "clients.csv") for f in ("record", "drop"))
    over = ~rec["within_budget"]
    assert over.any() and (~over).any()
    assert drop["dropped"].tolist() == over.tolist()  # the same sampled clients, the same measurements
    gone = drop[drop["dropped"]]
    assert (gone[["peak_bytes", "train_flops", "bytes_down", "bytes_up", "samples"]] == 0).all().all()
    assert gone["config"].str.startswith("out of memory (").all() and drop["within_budget"].all()
    assert summary["dropped_client_rounds"] == int(over.sum()) == summary["excluded_client_rounds"]
    assert summary["violations"] == 0 and summary["over_budget"] == "drop"
    rounds = pd.read_csv(tmp_path / "drop" / "rounds.csv")
    assert rounds["dropped"].tolist() == over.groupby(rec["round"]).sum().tolist()
    table = pivots(compare_runs(tmp_path))["accuracy"][1]["0.5+1"]
    share = f"(dropped {over.mean():.0%})"
    assert table["fedavg over-budget=drop"].endswith(share) and table["fedavg over-budget=record"].endswith(" !")


def test_drop_changes_nothing_for_clients_that_fit(tmp_path):
    settings = dict(method="heterofl", memory_budget=(0.25, 1.0))
    record = small_run(**settings)
    record.execute()
    drop = small_run(**settings, over_budget="drop")
    drop.execute()
    assert timing_free(drop.rows) == timing_free(record.rows) and sum(r["dropped"] for r in drop.rows) == 0
