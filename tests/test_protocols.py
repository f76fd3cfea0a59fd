"""The papers' protocols where a comparison depends on them (issue 15): HeteroFL's global width, Federated
Dropout's clipping, FedRolex's coverage, FEDEPTH's never-trained blocks, per-method client weights, one
model per comparison and infeasible budgets shown with the method's measured floor."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedbench import compare
from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.errors import ConfigError
from fedbench.method import ClientData, evaluate_on_test
from fedbench.models import scaled
from fedbench.submodel import extract
from fedbench.methods._width import static_bn
from tests.conftest import small_run


def test_heterofl_with_one_budget_evaluates_the_width_every_client_trains():
    run = small_run(method="heterofl", memory_budget="0.25", rounds=2, eval_every=2)
    m = run.method
    width = m.widths[0.25]
    assert width < 1 and m.global_width() == width
    plan = m.plan(0, 0, 0.25, None)
    assert plan.rate == 1.0  # Scaler rate = client width / global width
    evaluated = m.eval_model(run.model, 0)
    full = run.model.full_widths
    assert evaluated.widths == {g: scaled(c, width) for g, c in full.items()}  # ceil(w C), by hand
    summary = run.execute()
    assert m.sbn_samples() == 5000 < len(run.dataset.train_y)  # the first 5,000 training images (README)
    expected = evaluate_on_test(static_bn(extract(run.ctx.build, run.model, m.width_plan(width)), run.dataset, 5000),
                                run.dataset)["accuracy"]
    assert summary["final_accuracy"] == expected
    assert f"w={width:.4g}" in summary["evaluation"]


def test_heterofl_scaler_rate_is_relative_to_the_largest_client_width():
    m = small_run(method="heterofl", memory_budget="0.25,0.5", rounds=1).method
    narrow, wide = m.widths[0.25], m.widths[0.5]
    assert m.global_width() == wide < 1
    assert m.plan(0, 0, 0.25, None).rate == pytest.approx(narrow / wide)
    assert m.plan(0, 19, 0.5, None).rate == 1.0
    assert small_run(method="heterofl", memory_budget="0.25,1", rounds=1).method.global_width() == 1.0


def test_federated_dropout_at_0125_stays_finite_on_a_norm_free_model():
    """Unclipped (the SLT authors' FD, ``--variant slt``) this federation diverges to NaN in every seed tried
    (rounds 24, 9 and 15 for seeds 0, 1, 2); seed 1 is run here, past its divergence round."""
    run = small_run(method="fd", model="fedavg-cnn", memory_budget="0.125", rounds=15, eval_every=15, seed=1,
                    partition="dirichlet:0.3", local_epochs=3, clients=20, clients_per_round=4)
    assert run.method.grad_clip == 1.0
    summary = run.execute()
    assert summary["status"] == "ok" and summary["final_accuracy"] > 0.2
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_fedrolex_reports_coverage_and_warns_when_rounds_are_fewer_than_channels(caplog):
    with caplog.at_level("WARNING"):
        run = small_run(method="fedrolex", memory_budget="0.25", rounds=2)
    assert "rolling window trains only part" in caplog.text
    summary = run.execute()
    widest = run.method.widths[0.25]
    for group, channels in run.model.full_widths.items():
        kept = scaled(channels, widest, "floor")
        assert summary["notes"]["coverage"][group] == pytest.approx(min(channels, kept + 1) / channels)
    assert summary["warnings"]
    mixed = small_run(method="fedrolex", memory_budget="0.25,1", rounds=1).method
    assert mixed.warnings(1) == [] and set(mixed.notes(1)["coverage"].values()) == {1.0}


def test_fedepth_flags_blocks_no_client_trains():
    kw = dict(method="fedepth", model="resnet20", rounds=1, clients=4, clients_per_round=2)
    partial = small_run(memory_budget="0.27", **kw).method
    assert partial.notes(1)["untrained_blocks"] == [0, 1, 2] and "blocks 0-2" in partial.warnings(1)[0]
    whole = small_run(memory_budget="0.27,1", **kw).method
    assert whole.notes(1)["untrained_blocks"] == [] and whole.warnings(1) == []


def test_client_weights_follow_each_methods_code_unless_given():
    data = ClientData(0, torch.zeros(7, 1, 28, 28, dtype=torch.uint8), torch.zeros(7, dtype=torch.long))
    assert small_run(method="fedavg", rounds=1).method.client_weight(data) == 7.0      # FedAvg: samples
    assert small_run(method="heterofl", memory_budget="0.5", rounds=1).method.client_weight(data) == 1.0
    assert small_run(method="heterofl", memory_budget="0.5", rounds=1,
                     weighting="samples").method.client_weight(data) == 7.0
    assert small_run(method="fedavg", rounds=1, weighting="uniform").method.client_weight(data) == 1.0


def test_a_budget_below_the_floor_is_infeasible_with_the_floor():
    with pytest.raises(Infeasible) as err:
        small_run(method="fedepth", model="resnet20", memory_budget="0.2", rounds=1)
    assert 0.2 < err.value.floor < 1 and f"{err.value.floor:.3f}" in err.value.message


TINY = ["--dataset", "fmnist-mini", "--rounds", "1", "--clients", "100", "--batch-size", "16",
        "--clients-per-round", "2", "--eval-every", "1"]


def test_compare_runs_every_supervised_method_on_one_model(tmp_path):
    spec = {"method": "fedavg,fedepth", "memory_budget": [0.5], "out": str(tmp_path / "g"), "rounds": 1}
    cells = compare.grid(spec).cells
    assert {c.config.model for c in cells} == {"resnet20"}
    spec["overrides"] = {"fedepth": {"model": "preresnet20"}}
    with pytest.raises(ConfigError) as err:
        compare.grid(spec)
    assert err.value.flag == "--model" and "resnet20 (fedavg)" in err.value.message
    assert not (tmp_path / "g").exists()


def test_infeasible_cells_show_the_floor_and_tables_never_mix_models(tmp_path):
    out = tmp_path / "sweep"
    args = ["compare", "--methods", "fedavg,fedepth", "--memory-budget", "0.2,0.5", "--model", "resnet20", *TINY]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    failed = json.loads((out / "fedepth/b0.2/s0/failed.json").read_text())
    accuracy = pd.read_csv(out / "report/accuracy.csv", index_col=0)
    assert accuracy.loc["fedepth", "0.2"] == f"infeasible (floor {failed['infeasible_floor']:.3f})"
    assert "infeasible" not in accuracy.loc["fedepth", "0.5"]
    assert "Runs not in the tables" not in (out / "report/report.md").read_text()
    # a second model in the same folder: its own tables, never a row beside the first model's
    other = ["compare", "--methods", "fedavg", "--memory-budget", "0.5", "--model", "fedavg-cnn", *TINY]
    assert CliRunner().invoke(app, [*other, "--out", str(out / "fedavg-cnn")]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(out)]).exit_code == 0
    report = out / "report"
    assert not (report / "accuracy.csv").exists()  # the one-model tables of the first report are gone
    resnet = pd.read_csv(report / "accuracy-resnet20.csv", index_col=0)
    cnn = pd.read_csv(report / "accuracy-fedavg-cnn.csv", index_col=0)
    assert list(resnet.index) == ["fedavg", "fedepth"] and list(cnn.index) == ["fedavg"]
    text = (report / "report.md").read_text()
    assert "; resnet20 on fmnist-mini" in text and "; fedavg-cnn on fmnist-mini" in text
