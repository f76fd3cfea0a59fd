"""FjORD on fmnist-mini: p_max chosen by measured memory, learning within budget at mixed budgets, nested
Ordered-Dropout sub-models, per-batch width sampling from P ∩ (0, p_max], refusal below the measured floor."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.data import normalize
from fedbench.errors import ConfigError
from fedbench.plan import Plan, Step
from fedbench.report import plan_row
from fedbench.submodel import extract, set_trainable
from fedbench.methods._width import first_k
from fedbench.methods.fjord import ODTrainer
from tests.conftest import Records, small_run

P = (0.2, 0.4, 0.6, 0.8, 1.0)
MIXED = "0.25,0.5,1"


@pytest.fixture(scope="module")
def mixed():
    return small_run(method="fjord", memory_budget=MIXED, rounds=5, eval_every=5)


def test_p_max_is_the_widest_p_that_fits_and_the_run_learns_within_budget(mixed):
    run, seen = mixed, Records()
    m, full, memory = run.method, run.ctx.full_memory, run.profiler.memory_of
    assert m.P == P and m.widths[1.0] == 1.0
    for budget, p_max in m.widths.items():
        assert p_max in P
        if budget < 1:
            assert memory(m.width_plan(p_max)) <= budget * full
            if p_max < 1:
                assert memory(m.width_plan(P[P.index(p_max) + 1])) > budget * full
    assert m.widths[0.25] < m.widths[0.5] < 1.0      # the mixed budgets give three different p_max
    summary = run.execute([seen])
    assert summary["violations"] == 0 and summary["final_accuracy"] > 0.4, summary   # chance 0.1; 5 rounds
    assert summary["notes"]["p_max"] == {f"{b:g}": p for b, p in sorted(m.widths.items())}
    assert "full-width" in summary["evaluation"]   # a budget-1 client trains p = 1
    for r in seen.clients:
        p_max = m.widths[r["budget"]]
        assert r["config"] == f"p_max={p_max:g}" and r["peak_bytes"] <= r["budget_bytes"]
        # FLOPs count every batch at its drawn width: at most all at p_max, at least all at the narrowest
        plan = m.width_plan(p_max)
        per_width = [run.profiler.train_flops(plan, i) for i in range(len(plan.steps))]
        assert min(per_width) * r["samples"] <= r["train_flops"] <= max(per_width) * r["samples"]
    # fedbench profile's FLOPs per sample: the mean over the widths a client draws from (uniform draws)
    plan = m.width_plan(m.widths[1.0])
    row = plan_row(run, plan)
    assert row["train_GFLOPs_per_sample"] == pytest.approx(
        sum(run.profiler.train_flops(plan, i) for i in range(len(P))) / len(P) / 1e9)


def test_sub_models_nest_and_the_od_forward_is_the_extracted_width_p_model(mixed):
    run = mixed
    m, model = run.method, run.model
    subs = {p: extract(run.ctx.build, model, Plan.of(first_k(model.full_widths, p))) for p in P}
    for i, p in enumerate(P):
        small = dict(subs[p].named_parameters())
        for q in P[i:]:  # a width-p sub-model's tensors are a prefix of every wider one's
            for name, t in subs[q].named_parameters():
                assert torch.equal(t[tuple(slice(0, n) for n in small[name].shape)], small[name]), (p, q, name)
    # the trainer's width-p forward on the p_max=0.8 sub-model equals the real width-p module's
    plan = m.width_plan(0.8)
    sub = run.submodel(plan)
    trainer = ODTrainer(m, sub, plan, plan.steps[0], 0.05)
    x = normalize(run.dataset.test_x[:32], run.dataset)
    with torch.no_grad():
        for p in (0.2, 0.4, 0.8):
            torch.testing.assert_close(trainer.forward(x, p), subs[p](x))


def test_each_batch_draws_p_from_P_up_to_p_max_and_trains_only_its_prefix():
    run = small_run(method="fjord", memory_budget="0.5", momentum=0.0, weight_decay=0.0, local_epochs=2)
    m, data = run.method, run.client_data(3)
    p_max = m.widths[0.5]
    plan = m.plan(0, 3, 0.5, torch.Generator())
    allowed = tuple(p for p in P if p <= p_max)
    assert [s.name for s in plan.steps] == [f"p={p!r}" for p in allowed] and len(allowed) >= 2

    def train(seed):
        result = m.local_train(run.submodel(plan), data, plan, 0.05, torch.Generator().manual_seed(seed))
        return result, list(m.sampled[3])

    (result, drawn), (_, again), (_, other) = train(0), train(0), train(1)
    batches = 2 * -(-len(data) // run.config.batch_size)
    assert len(drawn) == batches and set(drawn) <= set(allowed) and len(set(drawn)) >= 2
    assert drawn == again and drawn != other                     # seeded by the client's generator
    assert sum(result.samples) == 2 * len(data)
    assert [s > 0 for s in result.samples] == [p in drawn for p in allowed]

    # one step at p = 0.2 changes the first-k 0.2 prefix of the p_max model and nothing else (no momentum / decay)
    sub = run.submodel(plan)
    set_trainable(sub, Step())
    before = {n: t.detach().clone() for n, t in sub.named_parameters()}
    trainer = ODTrainer(m, sub, plan, plan.steps[0], 0.05)
    assert trainer.p == 0.2
    trainer.step(data.x[:16], data.y[:16], None)
    narrow = dict(m.shell(0.2).named_parameters())
    for name, t in sub.named_parameters():
        inside = tuple(slice(0, n) for n in narrow[name].shape)
        changed = t.detach() != before[name]
        assert changed[inside].any(), name
        changed[inside] = False
        assert not changed.any(), name


def test_every_client_below_the_full_width_evaluates_the_widest_p_max():
    """No client trains p = 1 at one budget below it: the evaluated model is the p_max sub-model (nested prefix)."""
    run = small_run(method="fjord", memory_budget="0.5")
    m, model = run.method, run.model
    p_max = m.widths[0.5]
    assert p_max < 1 and f"w={p_max:g}" in m.describe_eval()
    evaluated = m.eval_model(model, 1)
    prefix = first_k(model.full_widths, p_max, "ceil")
    assert evaluated.widths == {g: len(r) for g, r in prefix.items()} != model.full_widths
    expected = extract(run.ctx.build, model, Plan.of(prefix))
    x = normalize(run.dataset.test_x[:32], run.dataset)
    with torch.no_grad():
        torch.testing.assert_close(evaluated(x), expected(x))


def test_budget_below_the_smallest_width_is_refused_with_the_measured_floor():
    with pytest.raises(Infeasible) as e:
        small_run(method="fjord", memory_budget="0.01")
    assert 0.01 < e.value.floor < 0.25 and "p_max 0.2" in e.value.message
    with pytest.raises(ConfigError, match="--od-widths"):
        small_run(method="fjord", od_widths="0.5,0.75")          # P must include 1


def test_self_distillation_trains_and_costs_the_p_max_pass():
    run = small_run(method="fjord", memory_budget="1,1.5", self_distill=True, rounds=1, od_widths="0.5,1")
    plain = small_run(method="fjord", memory_budget="1", rounds=1, od_widths="0.5,1")
    # its extra pass costs memory too: budget 1 (FedAvg's full model) no longer holds p_max = 1
    assert run.method.widths == {1.0: 0.5, 1.5: 1.0} and plain.method.widths == {1.0: 1.0}
    plan = run.method.width_plan(1.0)
    kd, ce = (r.profiler.train_flops(plan, 0) for r in (run, plain))   # step p = 0.5: the p_max pass is added
    assert kd > 1.5 * ce
    summary = run.execute()
    assert summary["violations"] == 0 and summary["notes"]["self_distill"] is True
    assert all(r["train_loss"] == r["train_loss"] for r in run.rows)


def test_cli_describes_fjord():
    result = CliRunner().invoke(app, ["methods", "fjord"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("Horvath", "--od-widths", "--self-distill", "Deviations"):
        assert text in result.output
