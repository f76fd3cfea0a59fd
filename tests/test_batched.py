"""Clients trained together (``--client-batching on``) equal clients trained one at a time (issue 8)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from fedbench import batched
from fedbench.method import Method
from fedbench.registry import list_methods
from tests.conftest import small_run

RESNET = dict(model="resnet20", dataset="synthetic:3x32:600", clients=12, clients_per_round=4)
CNN = dict(clients=40)  # 250 samples a client (8 local steps): quick in float64
CASES = {
    # non-IID: clients hold different numbers of samples, so steps run ragged (lock-step, grouped by batch size)
    "fedavg": dict(method="fedavg", partition="dirichlet:0.3", **CNN),
    # mixed budgets -> two plan shapes; HeteroFL's per-client label mask and gradient clipping
    "heterofl-mixed": dict(method="heterofl", memory_budget=(0.25, 1.0), partition="dirichlet:0.3", **CNN),
    # Federated Dropout: one shape, different channels per client
    "fd": dict(method="fd", memory_budget=(0.5,), **CNN),
    # SLT on a BatchNorm ResNet: frozen layers, running statistics under vmap
    "slt": dict(method="slt", memory_budget=(0.5,), **RESNET),
}


def state(run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.fixture
def float64(monkeypatch):
    """``float64(run)``: train the prepared run on in float64 (global model, new working modules, inputs).

    Why not float32 (measured on this AMD EPYC): a vmapped client runs other kernels than a client alone
    (each conv is one grouped conv over the stacked clients, each linear a batched matmul), which round
    differently: ~3e-7 relative in logits, up to 2e-6 in weight gradients. Both models here amplify that.
    In the CNN now and then a ReLU or max-pool near-tie goes the other way and SGD with momentum carries the
    changed gradient on: after one round (20 clients, 16 local steps) batched vs alone differ as much as
    one-at-a-time training from a start perturbed by 1e-7 differs from itself (fd, seed 0: 2.0e-3 in
    blocks.2.1.weight, both: the same flip), after two rounds like two seeds. Over seeds 0-5 the worst
    tensor's ||batched - alone|| / ||update|| was 1e-6 (no flip) to 1.1e-2 (fd), 7.6e-2 (fedavg), while
    two clients trained on each other's data give 7e-2 to 1.2: no float32 tolerance tells them apart. In the
    BatchNorm ResNet one SGD step from a start perturbed by 1e-7 moves the weights by 2e-5 to 8e-5, two by up
    to 5e-4. Which runs flip depends on the CPU's kernels and the data (an Intel Xeon failed fd; here fd,
    fedavg and the client-by-client test passed until the data order changed). In float64 the same runs
    agree within 2.2e-16, a million times inside ``differing``'s tolerance.
    Memory and FLOPs stay as ``prepare`` measured them in float32; evaluation, slow in float64 and a
    function of the weights compared, is skipped.
    """
    default = torch.get_default_dtype()

    def switch(run) -> None:
        torch.set_default_dtype(torch.float64)  # new modules and normalised inputs
        run.model.double()
        monkeypatch.setattr(run.method, "evaluate", lambda model, rnd: {})
    yield switch
    torch.set_default_dtype(default)


def one_round(run, start: dict, batching: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The prepared run's first round again from ``start``, clients batched or not."""
    run.load_state_dict(copy.deepcopy(start), [])
    run.config = replace(run.config, client_batching=batching)
    run.execute()
    return state(run), run.rows


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors not equal within float64 rounding (measured: 2.2e-16 at most; see ``float64``)."""
    return [n for n in a if not torch.allclose(a[n], b[n], rtol=1e-9, atol=1e-12)]


@pytest.mark.parametrize("case", CASES)
def test_batched_equals_one_at_a_time(case, float64, monkeypatch):
    """One round in float64: the same arithmetic, without float32 rounding tipping near-ties (see ``float64``)."""
    run = small_run(client_batching="off", rounds=1, **CASES[case])
    float64(run)
    start = copy.deepcopy(run.state_dict())
    off, rows = one_round(run, start, "off")
    groups = []
    train_group = batched.train_group
    monkeypatch.setattr(batched, "train_group", lambda *a: groups.append(len(a[4])) or train_group(*a))
    on, batched_rows = one_round(run, start, "on")
    assert groups and sum(groups) > len(groups)  # clients did train together
    assert not differing(off, on)
    for a, b in zip(rows, batched_rows):
        # the profiler measures one client's footprint, not the group's: figures are unchanged
        for key in ("peak_max", "train_flops", "bytes_down", "bytes_up", "violations"):
            assert a[key] == b[key], key


def test_the_comparison_catches_clients_trained_on_each_others_data(float64, monkeypatch):
    """The tolerance above is no blind spot: batched training that gave two clients each other's data
    (as a wrong row offset would) is far outside it (measured: 9.9e-3 in head.bias, float32 and float64 alike)."""
    run = small_run(client_batching="off", rounds=1, **CASES["fd"])
    float64(run)
    start = copy.deepcopy(run.state_dict())
    off, _ = one_round(run, start, "off")
    train_group = batched.train_group
    monkeypatch.setattr(batched, "train_group", lambda m, model, plan, states, datas, *a:
                        train_group(m, model, plan, states, [datas[1], datas[0], *datas[2:]], *a))
    swapped, _ = one_round(run, start, "on")
    assert differing(off, swapped)
    assert max(float((off[n] - swapped[n]).abs().max()) for n in off) > 1e-3


def test_train_group_matches_local_train_client_by_client(float64):
    """Weights, BatchNorm running statistics and losses of each client, ragged sizes included (float64)."""
    run = small_run(method="fedavg", partition="dirichlet:0.3", **{**RESNET, "clients_per_round": 3})
    float64(run)
    method, plan, lr = run.method, run.method.plan(0, 0, 1.0, None), 0.05
    datas = [run.client_data(c) for c in (0, 1, 2)]
    assert len({len(d) for d in datas}) == 3
    gens = lambda: [torch.Generator().manual_seed(c) for c in (0, 1, 2)]  # noqa: E731
    model = run.submodel(plan)
    start = batched.state_of(model)
    together = batched.train_group(method, model, plan, [start] * 3, datas, lr, gens())
    for data, gen, (trained, result) in zip(datas, gens(), together):
        batched.load_state(model, start)
        alone = method.local_train(model, data, plan, lr, gen)
        assert not differing(batched.state_of(model), trained)
        assert result.loss == pytest.approx(alone.loss, rel=1e-12)
        assert result.samples == alone.samples


def test_only_methods_that_declare_it_and_keep_the_default_local_training_are_batched():
    assert {m.name for m in list_methods() if m.trains_batched} == {"fedavg", "small", "heterofl", "fedrolex",
                                                                     "fd", "slt", "fedavg-exclusive"}
    for m in list_methods():  # a declaration its hooks contradicted would batch another objective
        assert not m.trains_batched or (m.local_train is Method.local_train and m.trainer is Method.trainer), m.name


def test_the_engine_batches_by_the_declaration_not_by_the_hooks(monkeypatch):
    """FedAvg's hooks with ``trains_batched = False`` (as a loss drawing its own randomness would declare):
    its clients train one at a time even with ``--client-batching on``."""
    run = small_run(client_batching="on", rounds=1)
    monkeypatch.setattr(type(run.method), "trains_batched", False)
    monkeypatch.setattr(batched, "train_group", lambda *a: pytest.fail("trained batched"))
    run.execute()
    assert run.rows[0]["clients"] == 4
