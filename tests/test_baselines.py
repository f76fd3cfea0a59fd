"""The memory baselines of issue 15 §3: FedAvg with gradient accumulation (``fedavg-accum``), with
activation checkpointing (``fedavg-ckpt``), and among the clients that fit the full model only
(``fedavg-exclusive``). Each is fitted to its budgets by measurement, stays within them and learns;
accumulation and checkpointing compute FedAvg's gradient (exactly, or within float rounding)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.data import normalize
from fedbench.errors import ConfigError
from fedbench.plan import EXCLUDED, Step
from fedbench.methods.checkpointed import segments
from fedbench.methods.grad_accum import AccumTrainer
from tests.conftest import Records, small_run

FAST = dict(clients=20, clients_per_round=4, eval_every=99)  # evaluated once, after the last round


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch_of(run, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    data = run.client_data(0)
    return data.x[:n], data.y[:n]


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def learns_within_budget(run) -> list[dict]:
    seen = Records()
    summary = run.execute([seen])
    assert summary["violations"] == 0 and summary["final_accuracy"] > 0.3, summary   # chance is 0.1
    for r in seen.clients:
        assert r["within_budget"] and r["peak_bytes"] <= r["budget_bytes"], r
    return seen.clients


# --- fedavg-accum ----------------------------------------------------------------------------

def test_accumulation_fits_the_largest_micro_batch_and_learns_within_budget():
    run = small_run(method="fedavg-accum", model="resnet20", memory_budget="0.25,0.5,1", rounds=2, **FAST)
    m, memory, full = run.method, run.profiler.memory_of, run.ctx.full_memory
    assert m.micro[1.0] == 32 and m.plan(0, 0, 1.0, None) == m.full_plan()
    assert 1 < m.micro[0.25] < m.micro[0.5] < 32                     # resnet20: activations dominate
    for budget in (0.25, 0.5):
        micro = m.micro[budget]
        assert memory(m.micro_plan(micro)) <= budget * full < memory(m.micro_plan(micro + 1))
        assert m.plan(0, 0, budget, None).label == f"micro={micro}"
    records = learns_within_budget(run)
    assert {r["config"] for r in records} <= {"full", f"micro={m.micro[0.25]}", f"micro={m.micro[0.5]}"}
    flops = {r["train_flops"] / r["samples"] for r in records}
    assert len(flops) == 1                                           # FedAvg's FLOPs per sample, any micro-batch


def test_accumulation_below_the_smallest_micro_batch_is_refused():
    with pytest.raises(Infeasible, match="micro-batch 1") as err:
        small_run(method="fedavg-accum", model="resnet20", memory_budget="0.01")
    assert 0.01 < err.value.floor < 0.25


def test_accumulation_at_the_full_batch_is_fedavg_exactly():
    runs = {m: small_run(method=m, model="fedavg-cnn", rounds=2, eval_every=1, clients_per_round=3)
            for m in ("fedavg", "fedavg-accum")}
    for run in runs.values():
        run.execute()
    a, b = runs["fedavg"], runs["fedavg-accum"]
    assert [r["accuracy"] for r in a.rows] == [r["accuracy"] for r in b.rows]
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    sa, sb = state(a.model), state(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # new working modules and normalised inputs
    yield
    torch.set_default_dtype(default)


def test_accumulation_equals_the_full_batch_for_a_norm_free_model(float64):
    """cnn (no norm layer), float64: one client's local training with micro-batches of 5 (7 chunks per batch of
    32, the last of 2) and of 1 ends at FedAvg's weights within float64 rounding."""
    run = small_run(method="fedavg-accum", model="fedavg-cnn", clients=40, memory_budget=(1.0,))
    run.model.double()
    m, data = run.method, run.client_data(0)
    assert len(data) == 250                                          # 8 batches, the last of 26

    def trained(plan) -> dict[str, torch.Tensor]:
        model = run.submodel(plan)
        m.local_train(model, data, plan, 0.05, torch.Generator().manual_seed(7))
        return state(model)

    full = trained(m.full_plan())
    start = state(run.model)
    for micro in (5, 1):
        accumulated = trained(m.micro_plan(micro))
        for k in full:
            assert not torch.equal(full[k], start[k])
            torch.testing.assert_close(accumulated[k], full[k], rtol=1e-9, atol=1e-12)


def test_accumulation_with_batchnorm_is_not_the_full_batch():
    """resnet20's BatchNorm normalises each micro-batch with its own statistics: a different gradient (documented)."""
    run = small_run(method="fedavg-accum", model="resnet20", memory_budget=(1.0,))
    m = run.method
    x, y = batch_of(run)
    plain = run.submodel(m.full_plan())
    g_full = grads_of(plain, m.trainer(plain, m.full_plan(), Step(), 0.05).loss(x, y, None))
    plan = m.micro_plan(8)
    model = run.submodel(plan)
    trainer = m.trainer(model, plan, Step(), 0.05)
    assert isinstance(trainer, AccumTrainer) and len(trainer.chunks(x, y)) == 4
    g_micro = grads_of(model, trainer.loss(x, y, None))
    rel = max(float((g_micro[k] - g_full[k]).norm() / g_full[k].norm()) for k in g_full)
    assert rel > 1e-2


# --- fedavg-ckpt -----------------------------------------------------------------------------

def test_segments_are_consecutive_near_equal_groups():
    assert segments(tuple(range(9)), 1) == [tuple(range(9))]
    assert segments(tuple(range(9)), 4) == [(0, 1), (2, 3), (4, 5), (6, 7, 8)]
    assert segments(tuple(range(9)), 9) == [(i,) for i in range(9)]
    assert segments((2, 3, 4), 2) == [(2,), (3, 4)]


@pytest.mark.parametrize("model", ["fedavg-cnn", "resnet20"])
def test_checkpointing_gives_fedavgs_gradients(model):
    run = small_run(method="fedavg-ckpt", model=model, memory_budget=(1.0,))
    m = run.method
    x, y = batch_of(run)
    x = normalize(x, run.dataset)
    net = run.submodel(m.full_plan())
    reference = grads_of(net, m.loss(net, x, y, m.full_plan(), Step()))
    for n in range(1, len(net.blocks) + 1):
        plan = m.segment_plan(n)
        got = grads_of(net, m.loss(net, x, y, plan, Step()))
        for k in reference:
            assert torch.equal(got[k], reference[k]), (n, k)   # the same kernels on the same inputs


def test_checkpointing_lowers_the_measured_peak_costs_recompute_flops_and_learns_within_budget():
    run = small_run(method="fedavg-ckpt", model="resnet20", memory_budget="0.6,1", rounds=2, **FAST)
    m, prof, full = run.method, run.profiler, run.ctx.full_memory
    n = m.segments[0.6]
    assert m.segments[1.0] == 0 and 1 < n < len(run.model.blocks)
    plan = m.segment_plan(n)
    assert prof.memory_of(plan) <= 0.6 * full
    assert all(prof.memory_of(m.segment_plan(k)) > 0.6 * full for k in range(1, n))  # the fewest that fit
    ratio = prof.train_flops(plan) / prof.train_flops(m.full_plan())
    assert 1.2 < ratio < 1.5              # the blocks' forward (about a third of training) runs twice
    records = learns_within_budget(run)
    assert {r["config"] for r in records} == {"full", plan.label}
    for r in records:
        per_sample = r["train_flops"] / r["samples"]
        assert per_sample == prof.train_flops(plan if r["budget"] < 1 else m.full_plan())


def test_checkpointing_below_its_floor_is_refused():
    with pytest.raises(Infeasible, match="checkpointing in") as err:
        small_run(method="fedavg-ckpt", model="resnet20", memory_budget="0.125")
    assert 0.3 < err.value.floor < 0.8


def test_cli_profile_of_accumulation_and_checkpointing(tmp_path):
    for method, budgets in (("fedavg-accum", "0.25,0.5"), ("fedavg-ckpt", "0.6,0.9")):
        out = tmp_path / f"{method}.csv"
        result = CliRunner().invoke(app, ["profile", "--method", method, "--model", "resnet20",
                                          "--memory-budget", budgets, "--csv", str(out)])
        assert result.exit_code == 0, result.output
        rows = pd.read_csv(out)
        full, fitted = rows.iloc[0], rows.iloc[1:]
        assert fitted["budget"].tolist() == [float(b) for b in budgets.split(",")]
        assert fitted["fits"].all() and (fitted["of_full"] < 1).all()
        flops = fitted["train_GFLOPs_per_sample"] / full["train_GFLOPs_per_sample"]
        assert ((flops - 1).abs() < 1e-9).all() if method == "fedavg-accum" else (flops > 1.2).all()


# --- fedavg-exclusive ------------------------------------------------------------------------

def test_exclusive_trains_only_the_clients_that_fit_the_full_model():
    run = small_run(method="fedavg-exclusive", model="fedavg-cnn", memory_budget="0.5,1", rounds=3, **FAST)
    m = run.method
    assert m.plan(0, 0, 0.5, None) is EXCLUDED and m.plan(0, 0, 1.0, None) == m.full_plan()
    seen = Records()
    summary = run.execute([seen])
    assert summary["violations"] == 0 and summary["final_accuracy"] > 0.3, summary
    out = [r for r in seen.clients if r["budget"] == 0.5]
    trained = [r for r in seen.clients if r["budget"] == 1.0]
    assert out and trained
    for r in out:
        assert r["excluded"] and r["config"] == "excluded"
        assert r["bytes_down"] == r["bytes_up"] == r["samples"] == r["train_flops"] == r["peak_bytes"] == 0
    for r in trained:
        assert not r["excluded"] and r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["samples"] > 0
        assert r["peak_bytes"] == run.ctx.full_memory
    assert summary["excluded_client_rounds"] == len(out)


def test_exclusive_without_a_full_budget_is_refused():
    with pytest.raises(Infeasible, match="the full model") as err:
        small_run(method="fedavg-exclusive", model="fedavg-cnn", memory_budget="0.25,0.5")
    assert err.value.floor == 1.0 and isinstance(err.value, ConfigError)
