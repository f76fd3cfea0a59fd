"""Client partitions: coverage, skew, minimum sizes, determinism, scale, bad specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbench.data import load_dataset
from fedbench.errors import ConfigError
from fedbench.partition import describe, parse_partition, partition


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return load_dataset("fmnist-mini").train_y


def _check_disjoint_sorted(parts: list[torch.Tensor], n: int, cover: bool) -> None:
    every = torch.cat(parts)
    assert every.dtype == torch.int64 and len(every.unique()) == len(every)
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert (every.numel() == n) if cover else (every.numel() <= n)


def _mean_label_entropy(parts: list[torch.Tensor], labels: torch.Tensor) -> float:
    table = describe(parts, labels, 10).filter(like="label_").to_numpy(dtype=float)
    p = table / table.sum(1, keepdims=True)
    return float(-(p * np.log(np.where(p > 0, p, 1))).sum(1).mean())


def test_parse_partition():
    assert parse_partition("iid") == ("iid", None)
    assert parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
    assert parse_partition("shards:2") == ("shards", 2)


@pytest.mark.parametrize("spec", ["dirichlet:0", "dirichlet:-1", "dirichlet:x", "dirichlet:nan", "dirichlet",
                                  "shards:0", "shards:1.5", "shards:", "iid:3", "foo", ""])
def test_bad_specs_name_the_flag_and_the_allowed_values(spec, labels):
    with pytest.raises(ConfigError) as err:
        partition(labels, 10, spec, seed=0)
    assert err.value.flag == "--partition" and "dirichlet:ALPHA" in err.value.message


def test_iid_covers_all_in_near_equal_parts(labels):
    parts = partition(labels, 7, "iid", seed=0)
    _check_disjoint_sorted(parts, len(labels), cover=True)
    assert {len(p) for p in parts} <= {len(labels) // 7, len(labels) // 7 + 1}
    assert _mean_label_entropy(parts, labels) > 0.99 * np.log(10)


def test_dirichlet_is_skewed_covering_and_seeded(labels):
    parts = partition(labels, 20, "dirichlet:0.1", seed=0, min_samples=10)
    _check_disjoint_sorted(parts, len(labels), cover=True)
    assert min(len(p) for p in parts) >= 10
    iid = partition(labels, 20, "iid", seed=0)
    assert _mean_label_entropy(parts, labels) < 0.6 * _mean_label_entropy(iid, labels)
    again = partition(labels, 20, "dirichlet:0.1", seed=0, min_samples=10)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 20, "dirichlet:0.1", seed=1, min_samples=10)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    entropy = [_mean_label_entropy(partition(labels, 20, f"dirichlet:{a}", seed=0), labels) for a in (100, 1, 0.1)]
    assert entropy[0] > entropy[1] > entropy[2]


def test_dirichlet_tops_up_when_no_draw_reaches_min_samples(labels):
    # 100 clients over 10k samples at alpha=0.05: a plain draw leaves many clients nearly empty
    parts = partition(labels, 100, "dirichlet:0.05", seed=0, min_samples=50)
    _check_disjoint_sorted(parts, len(labels), cover=True)
    assert min(len(p) for p in parts) >= 50
    iid = partition(labels, 100, "iid", seed=0)
    assert _mean_label_entropy(parts, labels) < 0.6 * _mean_label_entropy(iid, labels)


def test_thousand_clients_over_sixty_thousand_labels():
    """At scale, without a clock (a time limit fails on a loaded machine, not on slow code)."""
    labels = torch.arange(60000) % 10
    for spec in ("dirichlet:0.3", "iid", "shards:2"):
        parts = partition(labels, 1000, spec, seed=0)
        _check_disjoint_sorted(parts, len(labels), cover=True)
        assert len(parts) == 1000 and min(len(p) for p in parts) >= 10, spec
    assert max(len(labels[p].unique()) for p in parts) <= 2  # shards:2


def test_shards_give_at_most_k_classes(labels):
    parts = partition(labels, 50, "shards:2", seed=0)
    _check_disjoint_sorted(parts, len(labels), cover=True)
    classes = [len(labels[p].unique()) for p in parts]
    assert max(classes) <= 2 and sum(c == 2 for c in classes) > 25
    assert {len(p) for p in parts} == {200}


def test_impossible_minimum_sizes(labels):
    with pytest.raises(ConfigError) as err:
        partition(labels[:500], 1000, "dirichlet:0.5", seed=0, min_samples=10)
    assert err.value.flag == "--partition" and "1000 clients" in err.value.message
    with pytest.raises(ConfigError):
        partition(labels[:500], 100, "iid", seed=0, min_samples=10)
    with pytest.raises(ConfigError):
        partition(labels, 10, "shards:1001", seed=0)


def test_describe_counts(labels):
    parts = partition(labels, 4, "shards:1", seed=0)
    table = describe(parts, labels, 10)
    assert list(table.columns) == ["client", "samples"] + [f"label_{c}" for c in range(10)]
    assert table["samples"].tolist() == [len(p) for p in parts]
    assert (table.filter(like="label_").sum(axis=1) == table["samples"]).all()
