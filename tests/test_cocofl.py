"""CoCoFL on fmnist-mini / ResNet-20: configurations (a contiguous run of trained units) chosen by measured memory
as the code's selection rule (maximal feasible ones), learning within budget at mixed budgets, frozen units not
updated nor sent, int8 storage of frozen units, refusal below the measured floor, the code's aggregation rule."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.methods.cocofl import CoCoFLTrainer, Int8Unit, quantize
from fedbench.submodel import set_trainable, uploaded
from tests.conftest import Records, small_run

# A small federation on real data (40 clients of 250 images, 4 a round) at batch 16.
SMALL = dict(method="cocofl", model="resnet20", clients=40, clients_per_round=4, batch_size=16)
MIXED = "0.3,0.6,1"


@pytest.fixture(scope="module")
def mixed():
    return small_run(memory_budget=MIXED, rounds=4, eval_every=4, lr=0.05, **SMALL)


def test_each_budget_gets_the_maximal_configurations_that_fit(mixed):
    m, full, n = mixed.method, mixed.ctx.full_memory, len(mixed.method.names)
    assert m.labels[0] == "stem" and m.labels[-1] == "head" and n == 11        # ResNet-20: stem, 9 blocks, head
    assert m.configs[1.0] == [(0, n - 1)] and m.config_plan(0, n - 1).label == "full"
    for budget in (0.3, 0.6):
        limit, chosen = budget * full, m.configs[budget]
        assert chosen, budget
        for a, b in chosen:
            assert m.memory(a, b) <= limit                                     # it fits ...
            wider = [(a - 1, b)] * (a > 0) + [(a, b + 1)] * (b < n - 1)
            assert all(m.memory(*w) > limit for w in wider), (budget, a, b)  # ... and no wider run does
        # maximal: none within another (the code's filter_table), ordered by start and end
        assert all(a1 < a2 and b1 < b2 for (a1, b1), (a2, b2) in zip(chosen, chosen[1:]))
    assert sum(b - a for a, b in m.configs[0.3]) < sum(b - a for a, b in m.configs[0.6])
    # each round a client draws one of its budget's configurations with its own generator
    drawn = {m.plan(r, 0, 0.6, torch.Generator().manual_seed(r)).label for r in range(40)}
    assert drawn == {m.config_plan(a, b).label for a, b in m.configs[0.6]}


def test_mixed_budgets_train_within_budget_and_learn(mixed):
    seen = Records()
    summary = mixed.execute([seen])
    assert len(seen.clients) == 16 and {r["budget"] for r in seen.clients} == {0.3, 0.6, 1.0}
    for r in seen.clients:
        assert r["within_budget"] and r["peak_bytes"] <= r["budget_bytes"], r
    assert {r["config"] for r in seen.clients if r["budget"] == 1.0} == {"full"}
    partial = [r for r in seen.clients if r["budget"] < 1]
    assert all(r["config"].startswith("train ") for r in partial)
    # only trained tensors go up; the whole float model comes down (stateless)
    assert all(r["bytes_up"] < r["bytes_down"] for r in partial)
    assert summary["final_accuracy"] > 0.2, summary["final_accuracy"]                 # chance: 0.1


def test_frozen_units_get_no_update_and_are_not_sent(mixed):
    m = mixed.method
    a, b = m.configs[0.3][0]
    plan = m.config_plan(a, b)
    model = mixed.submodel(plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    m.local_train(model, mixed.client_data(0), plan, 0.05, gen)
    trained = set(uploaded(model, plan))
    assert trained and trained == {n for n in before if any(n.startswith(u + ".") for u in m.names[a:b + 1])}
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]) and p.grad is None, n     # frozen: exactly as received


def test_aggregation_is_the_codes_blend_over_all_clients(mixed):
    """new = (r/N) mean(trained) + (1 - r/N) old, r of N clients trained the tensor (uniform weights)."""
    m, g = mixed.method, mixed.model
    plans = [m.config_plan(0, 0), m.config_plan(0, 1)]     # both train the stem, one also block 0
    agg = m.aggregator(g)
    old = {n: p.detach().clone() for n, p in g.named_parameters()}
    values = []
    for k, plan in enumerate(plans):
        model = mixed.submodel(plan)
        set_trainable(model, plan.steps[0])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(k + 1.0)
        values.append({n: p.detach().clone() for n, p in model.named_parameters()})
        m.add_update(agg, plan, model, mixed.client_data(k))
    new = agg.result()
    stem, block0, block5 = "stem.0.weight", "blocks.0.conv1.weight", "blocks.5.conv1.weight"
    torch.testing.assert_close(new[stem], (values[0][stem] + values[1][stem]) / 2)
    torch.testing.assert_close(new[block0], 0.5 * values[1][block0] + 0.5 * old[block0])
    assert torch.equal(new[block5], old[block5])                   # trained by none: unchanged


def test_frozen_units_are_stored_int8_and_cost_less_than_float():
    """The quantised path needs no quantised engine: int8 tensors on any CPU (and on CUDA)."""
    run = small_run(memory_budget="1", rounds=1, **SMALL)
    quantised = run.method
    floats = small_run(memory_budget="1", rounds=1, cocofl_quantize=False, **SMALL).method
    plan = quantised.config_plan(10, 10)                          # train the head; stem and blocks frozen
    model = run.submodel(plan)
    set_trainable(model, plan.steps[0])
    trainer = quantised.trainer(model, plan, plan.steps[0], 0.05)
    assert isinstance(trainer, CoCoFLTrainer)
    frozen = [u for kind, u in trainer.path if kind != "train"]
    assert len(frozen) == 10 and all(isinstance(u, Int8Unit) for u in frozen)
    weights = [t for u in frozen for t in u.buffers() if t.dim() >= 2]
    assert weights and all(t.dtype == torch.int8 for t in weights)
    conv = model.blocks[8].conv2.weight
    q, s = quantize(conv)
    assert q.dtype == torch.int8 and (q.float() * s - conv).abs().max() <= s / 2 + 1e-7
    # what the client stores: int8 weights, a quarter of float32's (1-D tensors stay float32)
    stored = sum(t.numel() * t.element_size() for u in frozen for t in u.buffers())
    as_float = sum(p.numel() * 4 for u in (model.stem, *model.blocks) for p in u.parameters())
    assert stored < 0.3 * as_float
    for a, b in [(10, 10), (3, 5), (0, 0)]:                       # forward-only, both sides, backward-through
        assert quantised.memory(a, b) < floats.memory(a, b), (a, b)
    # a unit after the trained run passes the gradient through: the stem trains when only it is trainable
    plan = quantised.config_plan(0, 0)
    model = run.submodel(plan)
    set_trainable(model, plan.steps[0])
    trainer = quantised.trainer(model, plan, plan.steps[0], 0.05)
    data = run.client_data(0)
    loss = trainer.loss(data.x[:8], data.y[:8], torch.Generator().manual_seed(0))
    loss.backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks.parameters())


def test_budget_below_the_smallest_configuration_is_refused_with_the_measured_floor():
    with pytest.raises(Infeasible) as e:
        small_run(memory_budget="0.02", rounds=1, **SMALL)
    assert 0.02 < e.value.floor < 0.3
    assert "of CoCoFL (training only the" in e.value.message and f"{e.value.floor:.3f}" in e.value.message


def test_cli_lists_cocofl():
    out = CliRunner().invoke(app, ["methods"])
    assert out.exit_code == 0 and "cocofl" in out.output
