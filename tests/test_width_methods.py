"""HeteroFL, FedRolex and Federated Dropout on fmnist-mini: widths chosen by measured memory,
learning within budget, HeteroFL's masked loss, label-wise classifier rows and sBN pass, and
the ``fedbench profile`` table."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.data import load_dataset, normalize
from fedbench.engine import Run
from fedbench.models import create_model, scaled
from fedbench.plan import Plan
from fedbench.seeding import sample_clients
from fedbench.submodel import build_submodel, load_slices
from fedbench.methods._width import WIDTHS, classifier, first_k, static_bn
from tests.conftest import Records, small_run

METHODS = ("heterofl", "fedrolex", "fd")
MIXED = "0.125,0.25,0.5,1"



@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """One prepared (not yet executed) mixed-budget run per method, shared by the tests below."""
    return {m: small_run(method=m, memory_budget=MIXED, rounds=3, eval_every=3) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_widths_are_the_largest_that_fit_each_budget(runs, method):
    run = runs[method]
    m, full = run.method, run.ctx.full_memory
    assert sorted(m.widths) == [0.125, 0.25, 0.5, 1.0] and m.widths[1.0] == 1.0
    for budget, width in m.widths.items():
        if budget < 1:
            assert run.profiler.memory_of(m.width_plan(width)) <= budget * full
            wider = WIDTHS[WIDTHS.index(width) + 1]
            assert run.profiler.memory_of(m.width_plan(wider)) > budget * full
    widths = [w for _, w in sorted(m.widths.items())]
    assert widths == sorted(widths) and 0.1 < widths[0] < 0.3   # memory is ~linear in width for the cnn
    assert [(info["budget"], plan.label) for info, plan in m.schedule()] == [
        (b, f"w={w:.4g}") for b, w in m.widths.items()]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_within_budget_with_mixed_widths(runs, method):
    run, seen = runs[method], Records()
    summary = run.execute([seen])
    assert summary["final_accuracy"] > 0.3, summary          # chance is 0.1
    assert summary["violations"] == 0
    full_up = {r["bytes_up"] for r in seen.clients if r["budget"] == 1.0}
    for r in seen.clients:
        width = run.method.widths[r["budget"]]
        assert r["config"] == f"w={width:.4g}" and r["peak_bytes"] <= r["budget_bytes"]
        if r["budget"] < 1 and full_up:   # traffic falls roughly as width squared
            assert 0.5 < r["bytes_up"] / next(iter(full_up)) / width ** 2 < 2
        if method == "fd" and width < 1:  # int32 index lists of the three cnn groups go down too
            kept = sum(scaled(c, width, "floor") for c in run.model.full_widths.values())
            assert r["bytes_down"] - r["bytes_up"] == 4 * kept


def _head_rows(model) -> torch.Tensor:
    weight, bias = classifier(model)
    params = dict(model.named_parameters())
    return torch.cat([params[weight], params[bias][:, None]], 1).detach().clone()


@pytest.mark.parametrize("variant,masked", [("paper", True), ("slt", False)])
def test_masked_loss_gives_absent_classes_no_gradient(variant, masked):
    run = small_run(method="heterofl", partition="shards:2", variant=variant, weight_decay=0.0)
    data, labels = run.client_data(0), run.ctx.client_labels[0]
    assert len(labels) <= 2
    plan = run.method.plan(0, 0, 1.0, torch.Generator())
    model = run.submodel(plan)
    before = _head_rows(model)
    run.method.local_train(model, data, plan, 0.05, torch.Generator().manual_seed(0))
    changed = (_head_rows(model) != before).any(1)
    absent = torch.ones(10, dtype=torch.bool)
    absent[labels] = False
    assert changed[~absent].all()
    assert (not changed[absent].any()) if masked else changed[absent].all()


@pytest.mark.parametrize("variant,label_rows", [("paper", True), ("slt", False)])
def test_classifier_rows_of_labels_no_client_held_stay_unchanged(variant, label_rows):
    run = small_run(method="heterofl", partition="shards:1", clients_per_round=2, rounds=1, variant=variant)
    held = torch.cat([run.ctx.client_labels[c] for c in sample_clients(0, 0, 20, 2)]).unique()
    before = _head_rows(run.model)
    run.execute([])
    changed = (_head_rows(run.model) != before).any(1)
    unheld = torch.ones(10, dtype=torch.bool)
    unheld[held] = False
    assert unheld.sum() >= 8 and changed[held].all()
    assert (not changed[unheld].any()) if label_rows else changed[unheld].all()


def test_slt_variant_evaluates_at_the_largest_width_and_fd_can_send_a_seed():
    run = small_run(method="heterofl", variant="slt", memory_budget="0.25")
    width = run.method.widths[0.25]
    assert run.method.eval_model(run.model, 0).widths == run.method.width_plan(width).widths(run.model.full_widths)
    assert run.method.width_plan(width).widths(run.model.full_widths)["conv1"] == scaled(32, width, "floor")
    fd = small_run(method="fd", memory_budget="0.25", index_encoding="seed")
    assert fd.method.plan(0, 0, 0.25, torch.Generator()).index_bytes == 8


def test_static_bn_accumulates_training_set_statistics_and_changes_evaluation():
    whole = load_dataset("fmnist-mini")
    ds = replace(whole, train_x=whole.train_x[:1000], train_y=whole.train_y[:1000])
    build = lambda **kw: create_model("resnet20", in_chans=1, img_size=28, **kw)  # noqa: E731
    torch.manual_seed(0)
    full = build()
    plan = Plan.of(first_k(full.full_widths, 0.25))
    model = build_submodel(build, full, plan)
    load_slices(model, full, plan)
    stats = static_bn(model, ds)
    assert model.stem[2].running_mean is None                       # the global model is untouched
    with torch.no_grad():
        stem = model.stem[0](normalize(ds.train_x, ds))               # what the first BN normalises
        torch.testing.assert_close(stats.stem[2].running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        x = normalize(ds.test_x[:200], ds)
        batch_stats, running = model.eval()(x), stats.eval()(x)
    assert not torch.allclose(batch_stats, running, atol=1e-3)
    first = static_bn(model, whole, samples=1000)  # --sbn-samples 1000: the first 1,000 images, in batches of 500
    for name, value in stats.state_dict().items():
        torch.testing.assert_close(first.state_dict()[name], value, rtol=0, atol=0)


def test_cli_profile_shows_one_fitting_width_per_budget(tmp_path):
    out = tmp_path / "profile.csv"
    result = CliRunner().invoke(app, ["profile", "--method", "heterofl", "--memory-budget", MIXED,
                                      "--batch-size", "16", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out).iloc[1:]     # row 0 is the full model (budget 1 by definition)
    assert rows["budget"].tolist() == [0.125, 0.25, 0.5, 1.0]
    assert rows["fits"].all() and (rows["of_full"] <= rows["budget"]).all()
    assert rows["config"].str.startswith("w=").all() and rows["MB_up"].is_monotonic_increasing


def test_preresnet18_is_heterofls_model_and_trains_sliced():
    """HeteroFL's PreResNet-18 (reference §2.3/§2.5): 11.2M parameters, sBN (no running statistics),
    nested widths that slice and train; a width-0.25 client measures about 1/4 of the full memory."""
    model = create_model("preresnet18", num_classes=10, in_chans=3, img_size=32)
    assert sum(p.numel() for p in model.parameters()) == 11_172_170
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats for m in model.modules())
    run = small_run(method="heterofl", model="preresnet18", dataset="synthetic:3x32:200", clients=10,
                    clients_per_round=2, rounds=1, memory_budget="0.25")
    assert run.method.widths[0.25] < 0.5
    assert run.profiler.memory_of(run.method.width_plan(run.method.widths[0.25])) <= 0.25 * run.ctx.full_memory
    run.execute()
    assert run.rows[-1]["violations"] == 0 and run.rows[-1]["accuracy"] is not None
