"""DepthFL: depths fitted by measured memory, exits and self-distillation, per-level averaging, refusal, learning."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.submodel import uploaded
from tests.conftest import small_run

# ResNet-20 (3 stages = 3 levels) on fmnist-shaped synthetic images: cheap to measure and train.
TINY = dict(method="depthfl", model="resnet20", dataset="synthetic:1x28:600", clients=4, clients_per_round=4, rounds=1)
# Measured (batch 32, 1x28x28), of FedAvg's full model (budget 1): depth 1 needs 0.864, depth 2 1.22, the full
# depth 1.38 (the exits' activations), so only budgets above 1 reach the deeper levels.
SHALLOW, MIDDLE, FULL = 0.95, 1.3, 1.5


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def level_of(name: str) -> int:
    """1-based level of a global parameter of ResNet-20 (blocks 0-2, 3-5, 6-8; stem 1, head 3)."""
    if name.startswith("stem."):
        return 1
    if name.startswith("head."):
        return 3
    return int(name.split(".")[1]) // 3 + 1


@pytest.fixture(scope="module")
def shallow_run():
    """Two depth-1 and two depth-2 clients: nobody trains level 3."""
    return small_run(memory_budget=f"{SHALLOW},{MIDDLE}", **TINY)


def test_each_budget_gets_the_deepest_depth_whose_measured_memory_fits(shallow_run):
    m, full = shallow_run.method, shallow_run.ctx.full_memory
    assert m.levels == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert m.depths == {SHALLOW: 1, MIDDLE: 2}
    memory = [m.memory(d) for d in (1, 2, 3)]
    assert memory[0] < memory[1] < memory[2] and memory[2] > 1.3 * full  # budget 1 is FedAvg's: the exits cost more
    for budget, depth in m.depths.items():
        assert memory[depth - 1] <= budget * full < memory[depth]
    plan = m.plan(0, 0, SHALLOW, None)
    assert plan.label == "depth 1/3" and plan.blocks() == (0, 1, 2)
    model = shallow_run.submodel(plan)  # a real depth-1 model: deeper blocks, their exits and nothing else are gone
    assert all(isinstance(model.blocks[i], torch.nn.Identity) for i in range(3, 9))
    assert {n.split(".exit.")[0] for n, _ in model.named_parameters() if ".exit." in n} == {"blocks.2"}


def test_loss_is_every_exits_cross_entropy_plus_mutual_distillation(shallow_run):
    m = shallow_run.method
    plan = m.plan(0, 2, MIDDLE, None)
    model = shallow_run.submodel(plan)
    data = shallow_run.client_data(2)
    x = torch.randn(8, 1, 28, 28)
    y = data.y[:8]
    z1, z2 = model.exit_logits(x, 2)
    ce = F.cross_entropy(z1, y) + F.cross_entropy(z2, y)

    def kl(p, q):  # KL(softmax(p) || softmax(q)), the teacher p detached
        return (F.softmax(p, 1) * (F.log_softmax(p, 1) - F.log_softmax(q, 1))).sum(1).mean()

    step = plan.steps[0]
    torch.testing.assert_close(m.loss(model, x, y, plan, step), ce + kl(z2, z1) + kl(z1, z2))  # w / (d - 1) = 1
    plain = replace(m.options, exit_distill=False)
    m.options = plain
    try:
        torch.testing.assert_close(m.loss(model, x, y, plan, step), ce)
    finally:
        m.options = replace(plain, exit_distill=True)
    depth1 = m.plan(0, 0, SHALLOW, None)
    shallow = shallow_run.submodel(depth1)
    (z,) = shallow.exit_logits(x, 1)
    torch.testing.assert_close(m.loss(shallow, x, y, depth1, depth1.steps[0]), F.cross_entropy(z, y))


def test_shallow_clients_leave_deeper_levels_untouched_and_each_level_is_averaged_over_its_holders(
        shallow_run, monkeypatch):
    run, m = shallow_run, shallow_run.method
    sent = []
    add = m.add_update
    monkeypatch.setattr(m, "add_update", lambda agg, plan, model, data: (
        sent.append((data.client, {n: t.clone() for n, t in uploaded(model, plan).items()})),
        add(agg, plan, model, data)))
    before = snapshot(run.model)
    summary = run.execute()
    after = dict(run.model.named_parameters())
    assert summary["violations"] == 0 and len(sent) == 4
    for client, update in sent:  # depth 1: stem, blocks 0-2, exit 1; depth 2 also blocks 3-5, exit 2; never the head
        assert {level_of(n) for n in update} == ({1} if client < 2 else {1, 2})
    for name, value in after.items():
        holders = [u[name] for c, u in sent if name in u]
        if level_of(name) == 3:
            assert not holders and torch.equal(value, before[name]), name  # no update from anyone
        else:
            assert len(holders) == (4 if level_of(name) == 1 else 2), name
            torch.testing.assert_close(value.detach(), torch.stack(holders).mean(0))  # uniform, over holders only
    assert summary["notes"]["untrained_levels"] == [3] and summary["warnings"]
    assert "exits 1-2" in m.describe_eval()


def test_a_budget_below_the_measured_depth_1_memory_is_refused_with_that_floor(shallow_run):
    floor = shallow_run.method.memory(1) / shallow_run.ctx.full_memory
    with pytest.raises(Infeasible, match="--memory-budget") as refused:
        small_run(memory_budget="0.2", **TINY)
    assert refused.value.floor == pytest.approx(floor)
    assert f"{floor:.3f}" in str(refused.value) and "depth 1" in str(refused.value)


def test_methods_command_shows_paper_options_and_deviations():
    result = CliRunner().invoke(app, ["methods", "depthfl"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].startswith("paper: Kim, Yu, Kim, Moon 2023")
    assert "--exit-distill-weight" in result.output and "Deviations" in result.output


def test_depthfl_learns_fmnist_mini_at_mixed_budgets_within_budget():
    # a third of the clients at each depth; 8 rounds of about 1,000 images (about 20 s on one CPU thread)
    run = small_run(method="depthfl", model="resnet20", memory_budget=f"{SHALLOW},{MIDDLE},{FULL}", clients=60,
                    clients_per_round=6, rounds=8, eval_every=8)
    assert run.method.depths == {SHALLOW: 1, MIDDLE: 2, FULL: 3}
    summary = run.execute()
    assert summary["violations"] == 0
    assert summary["final_accuracy"] >= 0.5  # measured 0.597 (fedavg, every client at full depth: 0.672); chance 0.1
