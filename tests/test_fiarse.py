"""FIARSE on fmnist-mini: the element-wise mask follows magnitudes (one global threshold, ties kept), masked-out
elements get no update and are not sent, the element-wise form is refused below its measured floor; the structured
variant keeps the highest-importance channels and trains at mixed budgets within budget."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedbench.budget import Infeasible
from fedbench.cli import app
from fedbench.data import normalize
from fedbench.seeding import generator
from fedbench.submodel import extract, tensor_bytes, uploaded
from fedbench.methods.fiarse import (_Importance, channel_importance, importance_mask, masked_names, sparse_bytes,
                                     threshold)
from tests.conftest import Records, small_run


def test_mask_keeps_the_top_p_by_magnitude_over_all_layers_with_ties_kept():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0], [0.5, -4.0]]))
        model[0].bias.copy_(torch.tensor([0.1, -2.0]))
        model[1].weight.fill_(100.0)                       # a norm layer: never masked, never scored
        model[2].weight.copy_(torch.tensor([[2.0, 0.2]]))
    names = masked_names(model)
    assert names == ["0.weight", "0.bias", "2.weight"]
    params = dict(model.named_parameters())
    named = {n: params[n] for n in names}                  # |w|: 3 1 .5 4 | .1 2 | 2 .2  (N = 8)
    assert float(threshold(list(named.values()), 0.5)) == 2.0          # k = 4: 4, 3, 2, 2
    mask = importance_mask(named, 0.5)
    assert mask["0.weight"].tolist() == [[True, False], [False, True]]
    assert mask["0.bias"].tolist() == [False, True] and mask["2.weight"].tolist() == [[True, False]]
    # k = 3 also stops at |w| = 2, where two elements tie: both are kept (>= t), deterministically
    tied = importance_mask(named, 3 / 8)
    assert sum(int(m.sum()) for m in tied.values()) == 4 and all((tied[n] == mask[n]).all() for n in names)
    # one global threshold: p = 1/8 keeps only the largest element of all layers
    top = importance_mask(named, 1 / 8)
    assert top["0.weight"].tolist() == [[False, False], [False, True]] and not top["2.weight"].any()
    assert sum(int(m.sum()) for m in importance_mask(named, 1.0).values()) == 8
    assert sum(int(m.sum()) for m in importance_mask(named, 0.01).values()) == 1   # k >= 1


def test_importance_aware_gradient_is_zero_outside_the_mask():
    w = torch.tensor([3.0, -1.0, 0.5, -2.0], requires_grad=True)
    t = torch.tensor(1.0)
    out = _Importance.apply(w, t)
    assert out.tolist() == [3.0, -1.0, 0.0, -2.0]
    out.sum().backward()
    a = w.detach().abs()
    expected = (a >= t) * (1 + 2 * t * a / (a + t) ** 2)
    assert torch.allclose(w.grad, expected) and w.grad[2] == 0


def test_element_wise_form_is_refused_below_its_measured_floor():
    with pytest.raises(Infeasible) as e:
        small_run(method="fiarse", memory_budget="0.5,1")
    # budget 1 is FedAvg's full model; the mask's weight copies make every p measure more than that
    assert e.value.floor > 1 and "element-wise mask keeps the dense tensors" in e.value.message


def test_paper_variant_trains_masked_clients_without_updating_or_sending_masked_out_elements():
    run = small_run(method="fiarse", memory_budget="2", rounds=2, eval_every=2, clients_per_round=3)
    m = run.method
    assert m.keep == {2.0: 1.0}
    full = run.profiler.memory_of(m.density_plan(1.0))
    assert run.profiler.memory_of(m.density_plan(1 / 64)) == full > run.ctx.full_memory  # the mask saves no memory
    # one size-1/4 client by hand: masked-out elements unchanged, the held ones trained
    plan = m.density_plan(0.25)
    held = m.held(0.25)
    kept = sum(int(h.sum()) for h in held.values()) / sum(h.numel() for h in held.values())
    assert kept == pytest.approx(0.25, abs=1e-3)
    before = {n: t.detach().clone() for n, t in run.model.named_parameters()}
    model = run.submodel(plan)
    m.local_train(model, run.client_data(0), plan, 0.05, generator(0, "client", 0, 0))
    after = dict(model.named_parameters())
    for name, h in held.items():
        moved = after[name].detach() != before[name]
        assert not moved[~h].any(), name
        assert moved[h].float().mean() > 0.5, name
    sent = uploaded(model, plan)
    up = m.sent_bytes(sent, plan)
    expected = sum(sparse_bytes(t.numel(), int(held[n].sum()), 4) if n in held else t.numel() * 4
                   for n, t in sent.items())
    assert up == expected and up < 0.5 * tensor_bytes(sent.values())
    assert run.profiler.bytes_of(plan)[1] == up                           # fedbench profile counts the same
    # through the engine: every client at p = 1/4 (its memory is p = 1's: within budget 2)
    m.keep = {2.0: 0.25}
    seen = Records()
    summary = run.execute([seen])
    assert summary["violations"] == 0 and summary["final_accuracy"] > 0.15, summary
    dense = tensor_bytes(dict(run.model.named_parameters()).values())
    assert all(r["config"] == "p=0.25" and r["bytes_up"] < 0.5 * dense for r in seen.clients)
    assert all(r["bytes_down"] < 0.5 * dense for r in seen.clients)
    assert summary["notes"]["keep"]["2"]["kept_fraction"] == pytest.approx(0.25, abs=1e-3)


def test_masked_mean_keeps_elements_no_client_held():
    run = small_run(method="fiarse", memory_budget="2", rounds=1, clients_per_round=1)
    m = run.method
    m.keep = {2.0: 1 / 16}
    held = {n: h.clone() for n, h in m.held(1 / 16).items()}
    before = {n: t.detach().clone() for n, t in run.model.named_parameters()}
    run.execute()
    for name, h in held.items():
        now = dict(run.model.named_parameters())[name].detach()
        assert torch.equal(now[~h], before[name][~h]), name
        assert (now[h] != before[name][h]).any(), name


def test_structured_variant_keeps_the_most_important_channels_and_trains_within_budget():
    run = small_run(method="fiarse", variant="structured", model="resnet20", memory_budget="0.25,0.5,1",
                    rounds=3, eval_every=3)
    m, model = run.method, run.model
    assert m.widths[0.25] < m.widths[0.5] < m.widths[1.0] == 1.0
    plan = m.plan(0, 0, 0.25, generator(0, "client", 0, 0))
    held, sq = plan.index_map, channel_importance(model)
    # an untied group: its held channels are those of largest L2 norm of the producing conv
    w = dict(model.named_parameters())["blocks.3.conv1.weight"].detach()
    norms = w.flatten(1).norm(dim=1)
    k = len(held["b3.mid"])
    assert set(held["b3.mid"]) == set(norms.topk(k).indices.tolist())
    assert torch.allclose(sq["b3.mid"].sqrt().float(), norms)
    # tied groups share one set, the channels of largest summed importance
    tie = next(t for t in model.tied_groups() if "stem" in t)
    total = sum(sq[g] for g in tie)
    assert all(held[g] == held[tie[0]] for g in tie)
    assert set(held["stem"]) == set(total.topk(len(held["stem"])).indices.tolist())
    seen = Records()
    summary = run.execute([seen])
    assert summary["violations"] == 0 and summary["final_accuracy"] > 0.2, summary   # chance 0.1
    assert all(r["peak_bytes"] <= r["budget_bytes"] for r in seen.clients)
    assert summary["notes"]["variant"] == "structured"


def test_structured_variant_at_one_budget_evaluates_the_important_channels_of_its_width():
    """No client trains the other channels: the evaluated model is the width-w sub-model a client receives."""
    run = small_run(method="fiarse", variant="structured", memory_budget="0.5")
    m, model = run.method, run.model
    width = m.widths[0.5]
    assert width < 1 and f"w={width:.4g}" in m.describe_eval()
    plan = m.plan(1, 0, 0.5, generator(0, "client", 1, 0))
    assert plan.index_map != {g: list(range(len(c))) for g, c in plan.index_map.items()}  # not the first-k prefix
    evaluated, expected = m.eval_model(model, 1), extract(run.ctx.build, model, plan)
    x = normalize(run.dataset.test_x[:32], run.dataset)
    with torch.no_grad():
        torch.testing.assert_close(evaluated(x), expected(x))


def test_cli_describes_fiarse():
    result = CliRunner().invoke(app, ["methods", "fiarse"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("Wu", "--variant", "structured", "Deviations"):
        assert text in result.output


def test_audit_shows_the_nominal_size_beside_measured_memory_and_bytes():
    from fedbench.audit import FIARSE, NOT_STATED, PAPERS, audit_fiarse

    assert PAPERS[FIARSE] is audit_fiarse
    rows = audit_fiarse("cpu", quick=True)
    memory = [r for r in rows if r.quantity == "peak training memory / full model's"]
    assert [r.paper_convention for r in memory] == [1 / 64, 1 / 16, 1 / 4, 1.0]
    assert all(r.measured == 1.0 and r.claimed is None and r.claim_source == NOT_STATED for r in memory)
    kept = [r for r in rows if r.quantity.startswith("conv/linear parameters kept")]
    assert all(abs(r.measured - r.claimed) < 1e-3 for r in kept)
    up = [r.measured for r in rows if r.quantity == "bytes up / full model's"]
    assert up == sorted(up) and up[0] < 0.1 and up[-1] == 1.0
    assert next(r for r in rows if "FedAvg" in r.quantity).measured > 1.0   # the masked weight copies
