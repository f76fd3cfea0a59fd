"""Masked averaging and extraction: hand-computed two-client checks (Prepare / Execute / Assert)."""
from __future__ import annotations

import torch

from fedbench.aggregate import MaskedMean
from fedbench.models import create_model
from fedbench.plan import Plan
from fedbench.submodel import build_submodel, load_slices, uploaded
from fedbench.methods._width import first_k


def cnn():
    torch.manual_seed(0)
    return create_model("fedavg-cnn", num_classes=10, in_chans=1, img_size=28)


def test_full_plans_equal_plain_fedavg():
    model = cnn()
    updates = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    agg = MaskedMean(model)
    for u, w in zip(updates, weights):
        agg.add(Plan(), u, w)
    result = agg.result()
    for name in result:
        expected = sum(w * u[name] for u, w in zip(updates, weights)) / sum(weights)
        torch.testing.assert_close(result[name], expected)


def test_update_lands_only_on_held_indices_and_unheld_keep_value():
    model = cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = Plan.of({"conv1": [0, 2], "conv2": [1, 3, 5], "fc1": [7]})
    sub = build_submodel(lambda **kw: create_model("fedavg-cnn", num_classes=10, in_chans=1, img_size=28, **kw), model, plan)
    load_slices(sub, model, plan)
    assert sub.blocks[0][0].weight.shape == (2, 1, 5, 5)
    assert sub.blocks[1][0].weight.shape == (3, 2, 5, 5)
    assert sub.blocks[2][1].weight.shape == (1, 3 * 49)
    torch.testing.assert_close(sub.blocks[1][0].weight, before["blocks.1.0.weight"][[1, 3, 5]][:, [0, 2]])
    # the flattened fc input: channel c owns features c*49 .. c*49+48
    cols = torch.cat([torch.arange(c * 49, (c + 1) * 49) for c in (1, 3, 5)])
    torch.testing.assert_close(sub.blocks[2][1].weight, before["blocks.2.1.weight"][[7]][:, cols])

    agg = MaskedMean(model)
    agg.add(plan, {n: torch.full_like(p, 5.0) for n, p in uploaded(sub, plan).items()}, 1.0)
    agg.apply()
    w = model.blocks[1][0].weight.detach()
    held = torch.zeros_like(w, dtype=torch.bool)
    held[torch.tensor([1, 3, 5])[:, None], torch.tensor([0, 2])[None, :]] = True
    assert torch.all(w[held] == 5.0)
    torch.testing.assert_close(w[~held], before["blocks.1.0.weight"][~held])
    torch.testing.assert_close(model.head.weight[:, 7], torch.full((10,), 5.0))
    torch.testing.assert_close(model.head.weight[:, :7], before["head.weight"][:, :7])


def test_overlapping_clients_average_per_element():
    model = cnn()
    small, full = Plan.of(first_k(model.full_widths, 0.5)), Plan()
    agg = MaskedMean(model)
    agg.add(small, {"blocks.0.0.bias": torch.full((16,), 1.0)}, 1.0)
    agg.add(full, {"blocks.0.0.bias": torch.full((32,), 4.0)}, 3.0)
    bias = agg.result()["blocks.0.0.bias"]
    torch.testing.assert_close(bias[:16], torch.full((16,), (1.0 + 12.0) / 4))
    torch.testing.assert_close(bias[16:], torch.full((16,), 4.0))


def test_masks_weight_elements():
    model = cnn()
    before = model.head.bias.detach().clone()
    agg = MaskedMean(model)
    mask = torch.zeros(10)
    mask[[2, 5]] = 1
    agg.add(Plan(), {"head.bias": torch.full((10,), 9.0)}, 2.0, masks={"head.bias": mask})
    bias = agg.result()["head.bias"]
    assert bias[2] == bias[5] == 9.0
    torch.testing.assert_close(bias[[0, 1, 3, 4, 6, 7, 8, 9]], before[[0, 1, 3, 4, 6, 7, 8, 9]])


def test_resnet_residual_streams_are_tied_and_slices_round_trip():
    torch.manual_seed(0)
    build = lambda **kw: create_model("resnet20", num_classes=10, in_chans=3, **kw)  # noqa: E731
    model = build()
    assert ["stem", "b0.out", "b1.out", "b2.out"] in model.tied_groups()
    plan = Plan.of(first_k(model.full_widths, 0.5))
    sub = build_submodel(build, model, plan)
    load_slices(sub, model, plan)
    assert sum(p.numel() for p in sub.parameters()) == 68786  # reference/profiling.md §3.2
    assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    agg = MaskedMean(model)
    agg.add(plan, uploaded(sub, plan), 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    agg.apply()  # writing back an unchanged slice changes nothing
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n])
