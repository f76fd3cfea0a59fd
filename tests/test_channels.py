"""Channel index policies: first-k nesting, rolling windows, random subsets, tied residual streams,
and the extraction + masked-aggregation round trip for every policy."""
from __future__ import annotations

import pytest
import torch

from fedbench.aggregate import MaskedMean
from fedbench.models import create_model
from fedbench.plan import Plan
from fedbench.seeding import generator
from fedbench.submodel import build_submodel, load_slices, uploaded
from fedbench.methods._width import first_k, random, rolling


def test_first_k_is_nested_across_widths():
    full = {"a": 10, "b": 64}
    narrow, wide = first_k(full, 0.25), first_k(full, 0.5)
    for g in full:
        assert set(narrow[g]) < set(wide[g]) and list(narrow[g]) == list(range(len(narrow[g])))
    assert len(first_k(full, 0.25)["a"]) == 3 and len(first_k(full, 0.25, "floor")["a"]) == 2


def test_rolling_window_wraps_and_covers_every_channel_equally():
    full = {"a": 10, "b": 7}
    assert rolling(full, 0.3, 0)["a"] == [0, 1, 2]
    assert rolling(full, 0.3, 8)["a"] == [0, 8, 9]           # wraps around
    assert rolling(full, 0.3, 13)["a"] == rolling(full, 0.3, 3)["a"]
    for g, c in full.items():
        k = len(rolling(full, 0.3, 0)[g])
        counts = torch.zeros(c, dtype=torch.long)
        for rnd in range(c):
            counts[rolling(full, 0.3, rnd)[g]] += 1
        assert counts.tolist() == [k] * c                     # every channel k times over C rounds


def test_rolling_is_shared_within_a_round_and_nested():
    full = {"a": 64}
    narrow, wide = rolling(full, 0.25, 50)["a"], rolling(full, 0.5, 50)["a"]
    assert set(narrow) < set(wide) and 50 in narrow


def test_random_subsets_respect_ties_differ_per_client_and_are_seeded():
    model = create_model("resnet20", in_chans=1, img_size=28)
    full, ties = model.full_widths, model.tied_groups()
    assert ties, "resnet20 must declare its residual streams"
    draw = [random(full, 0.5, generator(0, "client", 3, c), ties) for c in range(4)]
    for d in draw:
        for tie in ties:
            assert all(d[g] == d[tie[0]] for g in tie)        # one index set per residual stream
        assert all(len(d[g]) == full[g] // 2 and d[g] == sorted(set(d[g])) for g in full)
    assert draw[0] == random(full, 0.5, generator(0, "client", 3, 0), ties)   # reproducible by seed
    assert all(draw[0]["b4.mid"] != d["b4.mid"] for d in draw[1:])              # differs across clients
    assert draw[0]["b4.mid"] != draw[0]["b5.mid"]                               # and across layers


@pytest.mark.parametrize("model_name", ["fedavg-cnn", "resnet20"])
def test_round_trip_leaves_the_global_model_unchanged_for_every_policy(model_name):
    torch.manual_seed(0)
    build = lambda **kw: create_model(model_name, in_chans=1, img_size=28, **kw)  # noqa: E731
    global_model = build()
    before = {n: p.detach().clone() for n, p in global_model.named_parameters()}
    full, ties = global_model.full_widths, global_model.tied_groups()
    plans = [Plan.of(first_k(full, 0.25)), Plan.of(rolling(full, 0.5, 5, ties)),
             Plan.of(random(full, 0.375, generator(1, "c"), ties)),
             Plan.of(random(full, 0.25, generator(2, "c"), ties))]
    agg = MaskedMean(global_model)
    x = torch.randn(2, 1, 28, 28)
    for plan in plans:
        sub = build_submodel(build, global_model, plan)
        load_slices(sub, global_model, plan)
        assert sub(x).shape == (2, 10)
        agg.add(plan, uploaded(sub, plan), weight=1.0)
    agg.apply()
    for n, p in global_model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-6, atol=1e-7, msg=n)  # sum/count rounding only
