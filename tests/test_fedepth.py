"""FEDEPTH / m-FEDEPTH: measured partitions, sequential steps, partial training, mutual distillation, learning."""
from __future__ import annotations

import pytest
import torch

from fedbench.errors import ConfigError
from fedbench.seeding import generator
from fedbench.submodel import set_trainable, uploaded
from tests.conftest import small_run

# PreResNet-20 on 1x16x16 synthetic images at batch 16: 9 blocks, activation-dominated, cheap to measure.
PRE = dict(model="preresnet20", dataset="synthetic", batch_size=16, rounds=1)
TINY = "synthetic:1x28:600"  # fmnist-shaped (the cnn's partitions are those of fmnist-mini), few samples


def trained_blocks(step) -> list[int]:
    return sorted(int(p.split(".")[1]) for p in step.trainable if p.startswith("blocks."))


def sent_copy(model, plan) -> dict[str, torch.Tensor]:
    """What a client uploads, copied (the engine reuses one sub-model per plan shape)."""
    return {n: t.clone() for n, t in uploaded(model, plan).items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def pre_run():
    return small_run(method="fedepth", memory_budget="0.32,0.5,1", **PRE)


def test_partitions_fit_their_budgets_are_consecutive_and_deepen_as_budget_shrinks(pre_run):
    method, prof, full = pre_run.method, pre_run.profiler, pre_run.ctx.full_memory
    steps = {}
    for budget, plan in method.plans.items():
        for i in range(len(plan.steps)):
            assert prof.measure(plan, i).peak <= budget * full, (budget, plan.label, i)
        start = plan.steps[0].blocks[0]
        spans = [trained_blocks(s) for s in plan.steps]
        assert [b for s in spans for b in s] == list(range(start, method.depth))  # consecutive, cover all
        for s, blocks in zip(plan.steps, spans):
            assert s.blocks == tuple(range(start, blocks[-1] + 1))  # the prefix up to the step's last block
            assert "head" in s.trainable and ("stem" in s.trainable) == (s is plan.steps[0])
        if start == 0:
            steps[budget] = len(plan.steps)
    assert steps[0.5] >= 3 and steps[1.0] == 1
    assert method.plans[1.0].label == "[0-8]" and method.plans[1.0] == method.full_plan()


def test_a_step_changes_only_its_blocks_and_head_and_runs_no_deeper_block(pre_run):
    method = pre_run.method
    plan = method.plans[0.5]
    model = pre_run.submodel(plan)
    data = pre_run.client_data(0)
    ran: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    gen = generator(0, "test", device="cpu")
    for step in plan.steps:
        set_trainable(model, step)
        trainer = method.trainer(model, plan, step, 0.05)
        before = snapshot(model)
        ran.clear()
        trainer.step(data.x[:16], data.y[:16], gen)
        assert sorted(set(ran)) == list(step.blocks)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert all(step.trains(n) for n in changed)
        assert {".".join(n.split(".")[:2]) for n in changed if n.startswith("blocks.")} == {
            f"blocks.{b}" for b in trained_blocks(step)}
        assert any(n.startswith("head.") for n in changed)
        assert any(n.startswith("stem.") for n in changed) == (step is plan.steps[0])


def test_partial_training_skips_leading_blocks_it_cannot_afford(pre_run):
    method, full = pre_run.method, pre_run.ctx.full_memory
    assert method.step_memory(0, 0, 0) > 0.32 * full  # even block 0 alone does not fit 0.32 ...
    plan = method.plans[0.32]
    assert plan.label.startswith("skip 0-2 | ")  # ... so blocks 0-2 are skipped, like the authors' insufficient group
    assert plan.blocks() == tuple(range(3, 9))
    assert "skipped" in dict((i["budget"], i["note"]) for i, _ in method.schedule())[0.32]
    model = pre_run.submodel(plan)
    assert all(isinstance(model.blocks[i], torch.nn.Identity) for i in range(3))  # neither run nor held
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "blocks.2.")) for n in uploaded(model, plan))
    with pytest.raises(ConfigError, match="--memory-budget"):
        method.resolve(0.1)


def test_mfedepth_trains_aux_heads_and_averages_each_only_over_its_trainers(monkeypatch):
    # budget 1 is FedAvg's full model; a client holding the auxiliary heads needs a little more for one step
    run = small_run(method="mfedepth", dataset=TINY, memory_budget="0.75,0.8,1.01", batch_size=128, clients=6,
                    clients_per_round=6, rounds=1)
    method = run.method
    routes = {b: [s.name for s in p.steps] for b, p in method.plans.items()}
    assert routes == {0.75: ["aux.0", "head"], 0.8: ["aux.1", "head"], 1.01: ["head"]}
    sent = []
    add = method.add_update
    monkeypatch.setattr(method, "add_update", lambda agg, plan, model, data: (
        sent.append((plan, sent_copy(model, plan), float(len(data)))), add(agg, plan, model, data)))
    before = snapshot(run.model)
    run.execute()
    after = dict(run.model.named_parameters())
    for k in (0, 1):
        trainers = [(u, w) for plan, u, w in sent if f"aux.{k}" in [s.name for s in plan.steps]]
        assert len(trainers) == 2  # the two clients of the one budget group that trains this head
        for name in [n for n in after if n.startswith(f"aux.{k}.")]:
            assert all(name in u for u, _ in trainers) and sum(name in u for _, u, _ in sent) == 2
            expected = sum(w * u[name] for u, w in trainers) / sum(w for _, w in trainers)
            torch.testing.assert_close(after[name].detach(), expected)
            assert not torch.equal(after[name], before[name])
    assert run.rows[0]["violations"] == 0


def test_distillation_local_models_stay_home_differ_and_count_in_memory(monkeypatch):
    run = small_run(method="fedepth", dataset=TINY, memory_budget="1,2", clients=4, clients_per_round=4, rounds=2)
    method = run.method
    distill = method.plans[2.0]
    ratio = run.profiler.memory_of(distill) / run.ctx.full_memory
    assert distill.option("distill") and 1.5 < ratio <= 2.0  # the local model's weights, grads, state, activations
    assert not method.plans[1.0].option("distill")
    sent = []
    add = method.add_update
    monkeypatch.setattr(method, "add_update", lambda agg, plan, model, data: (
        sent.append((data.client, sent_copy(model, plan))), add(agg, plan, model, data)))
    run.execute()
    assert sorted(method.local) == [2, 3]  # the budget-2 clients, one local model each
    a, b = (dict(method.local[c].named_parameters()) for c in (2, 3))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    global_names = set(dict(run.model.named_parameters()))
    assert len(sent) == 8 and all(set(update) == global_names for _, update in sent)  # the same upload for all
    for client, update in sent[-4:]:
        if client in method.local:  # a rich client sends its trained global model, not its local model
            local = dict(method.local[client].named_parameters())
            assert all(not torch.equal(u, local[n]) for n, u in update.items())
    state = method.state_dict()
    method.load_state_dict(state)
    assert all(torch.equal(method.local[3].state_dict()[k], v) for k, v in state["local"][3].items())


def test_fedepth_learns_fmnist_mini_within_a_cpu_minute_with_mixed_budgets():
    # the default job (100 clients, 10 per round) at half its rounds: steps [0,1] [2] / full / full + distillation
    run = small_run(method="fedepth", memory_budget="0.86,1,2", clients=100, clients_per_round=10, rounds=20,
                    eval_every=20)
    assert [p.label for p in run.method.plans.values()] == ["[0,1] [2]", "[0-2]", "[0-2] + local model"]
    summary = run.execute()
    assert summary["violations"] == 0
    assert summary["final_accuracy"] >= 0.65
