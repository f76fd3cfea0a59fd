"""Clients trained together (``--client-batching on``) equal clients trained one at a time (issue 8)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from fedbench import batched
from fedbench.registry import get_method
from tests.conftest import small_run

RESNET = dict(model="resnet20", dataset="synthetic:3x32:600", clients=12, clients_per_round=4)
CASES = {
    # non-IID: clients hold different numbers of samples, so steps run ragged (lock-step, grouped by batch size)
    "fedavg": dict(method="fedavg", partition="dirichlet:0.3"),
    # mixed budgets -> two plan shapes; HeteroFL's per-client label mask and gradient clipping
    "heterofl-mixed": dict(method="heterofl", memory_budget=(0.25, 1.0), partition="dirichlet:0.3"),
    # Federated Dropout: one shape, different channels per client
    "fd": dict(method="fd", memory_budget=(0.5,)),
    # SLT on a BatchNorm ResNet: frozen layers, running statistics under vmap
    "slt": dict(method="slt", memory_budget=(0.5,), **RESNET),
}


def state(run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_batched_equals_one_at_a_time(case, monkeypatch):
    """One round: float differences (1e-7) later flip near-ties of max-pool and ReLU, and two runs drift
    apart like two seeds would; one round compares the arithmetic, not that chaos."""
    run = small_run(client_batching="off", rounds=1, **CASES[case])
    start = copy.deepcopy(run.state_dict())
    run.execute()
    off, rows = state(run), run.rows
    run.load_state_dict(copy.deepcopy(start), [])   # the same prepared run again, clients batched
    run.config = replace(run.config, client_batching="on")
    groups = []
    train_group = batched.train_group
    monkeypatch.setattr(batched, "train_group", lambda *a: groups.append(len(a[4])) or train_group(*a))
    run.execute()
    assert groups and sum(groups) > len(groups)  # clients did train together
    for name, value in off.items():
        assert torch.allclose(value.float(), state(run)[name].float(), atol=1e-4, rtol=1e-3), name
    for a, b in zip(rows, run.rows):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)
        # the profiler measures one client's footprint, not the group's: figures are unchanged
        for key in ("peak_max", "train_flops", "bytes_down", "bytes_up", "violations"):
            assert a[key] == b[key], key


def test_train_group_matches_local_train_client_by_client():
    """Weights, BatchNorm running statistics and losses of each client, ragged sizes included."""
    run = small_run(method="fedavg", partition="dirichlet:0.3", **{**RESNET, "clients_per_round": 3})
    method, plan, lr = run.method, run.method.plan(0, 0, None), 0.05
    datas = [run.client_data(c) for c in (0, 1, 2)]
    assert len({len(d) for d in datas}) == 3
    gens = lambda: [torch.Generator().manual_seed(c) for c in (0, 1, 2)]  # noqa: E731
    model = run.submodel(plan)
    start = batched.state_of(model)
    together = batched.train_group(method, model, plan, [start] * 3, datas, lr, gens())
    for data, gen, (trained, result) in zip(datas, gens(), together):
        batched.load_state(model, start)
        alone = method.local_train(model, data, plan, lr, gen)
        for name, value in batched.state_of(model).items():
            assert torch.allclose(value.float(), trained[name].float(), atol=1e-4, rtol=1e-3), name
        assert result.loss == pytest.approx(alone.loss, rel=1e-4)
        assert result.samples == alone.samples


def test_only_methods_with_the_default_local_training_are_batched():
    for name in ("fedavg", "small", "heterofl", "fedrolex", "fd", "slt"):
        assert batched.supports(get_method(name)), name
    for name in ("fedepth", "mfedepth", "lw-fedssl", "prog-fedssl", "fedssl", "fll-dd"):
        assert not batched.supports(get_method(name)), name
