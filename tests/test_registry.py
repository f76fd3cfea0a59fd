"""Every registered method, tiny settings (timm-style: the whole registry), so a new method is tested by adding it."""
from __future__ import annotations

import math

import pytest

from fedbench.observers import RunFiles
from fedbench.registry import get_method, list_methods
from fedbench.report import read_run
from fedbench.seeding import generator
from tests.conftest import small_run

# Budget 2 (twice FedAvg's full model): every method's smallest configuration fits it, FIARSE's masked copies too
# (1.7 on the cnn); budget-specific behaviour is each method's own tests.
BUDGET = 2.0
TINY = dict(dataset="synthetic", clients=20, clients_per_round=2, rounds=2, eval_every=2, batch_size=16,
            memory_budget=BUDGET)
SUPERVISED = dict(model="fedavg-cnn")
# Self-supervised methods need an encoder with pre-logit features (as in the smoke preset), and a short probe.
SELF_SUPERVISED = dict(model="vit-tiny", depth=2, probe_epochs=1, eval_samples=100)


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_trains_and_writes_a_run_the_report_reads(method, tmp_path):
    run = small_run(method=method, **TINY, **(SUPERVISED if get_method(method).supervised else SELF_SUPERVISED))
    summary = run.execute([RunFiles(tmp_path)])
    assert len(run.rows) == 2 and all(math.isfinite(r["train_loss"]) for r in run.rows)
    row, curve = read_run(tmp_path)  # summary.json has the report's keys and agrees with rounds.csv, clients.csv
    assert row["status"] == "ok", row["problem"]
    assert 0 <= summary["final_accuracy"] <= 1 and summary["violations"] == 0
    for key in ("peak_max_bytes", "train_flops_per_client_round", "bytes_down_per_client_round",
                "bytes_up_per_client_round"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_plans_do_not_depend_on_the_order_they_are_asked_for(method):
    """A plan is a function of (round, client, budget, generator) and of what ``setup`` resolved, so asked for
    back to front every method gives the plans it gives front to back (no hook keeps what another reads)."""
    run = small_run(method=method, **TINY, **(SUPERVISED if get_method(method).supervised else SELF_SUPERVISED))
    asked = [(r, c) for r in range(run.config.rounds) for c in range(4)]

    def plans(order):
        return {(r, c): run.method.plan(r, c, BUDGET, generator(0, "client", r, c)) for r, c in order}

    assert plans(asked) == plans(reversed(asked))
