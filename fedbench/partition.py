"""Split a dataset's samples over clients: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet:ALPHA``: label skew. For each class, proportions over the clients are drawn
  from Dirichlet(ALPHA, ..., ALPHA) and the class's (shuffled) samples are cut accordingly.
  The draw is repeated (up to ``DIRICHLET_DRAWS`` times, each with its own generator derived
  from ``(seed, draw)``) until every client holds at least ``min_samples``. If no draw
  qualifies, the draw with the largest smallest client is kept and topped up: the missing
  samples are taken at random from the clients' samples beyond ``min_samples`` (logged).
- ``shards:K``: the FedAvg sort-and-shard scheme (McMahan et al., 2017) with shard cuts
  aligned to class boundaries. Samples are sorted by label (random order within a class),
  each class is cut into near-equal shards, ``num_clients * K`` shards in all, allocated to
  classes in proportion to their size; each client receives K random shards, so it holds
  at most K classes. Classes that receive no shard (more classes than shards) are left out.

Randomness comes only from ``numpy.random.default_rng`` generators seeded by ``seed``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch

from fedbench.errors import ConfigError

log = logging.getLogger(__name__)

ALLOWED = "allowed: iid, dirichlet:ALPHA (ALPHA>0), shards:K (K>=1 integer)"
DIRICHLET_DRAWS = 100


def parse_partition(spec: str) -> tuple[str, float | int | None]:
    """Validate a partition spec: ``("iid", None)``, ``("dirichlet", alpha)`` or ``("shards", k)``."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return "dirichlet", alpha
    if kind == "shards" and arg.strip().isdigit() and int(arg) >= 1:
        return "shards", int(arg)
    raise ConfigError("--partition", f"invalid partition {spec!r}; {ALLOWED}")


def partition(labels: torch.Tensor, num_clients: int, spec: str, seed: int,
              min_samples: int = 10) -> list[torch.Tensor]:
    """One sorted int64 index tensor per client, disjoint; iid and dirichlet cover all samples."""
    kind, arg = parse_partition(spec)
    if num_clients < 1:
        raise ConfigError("--clients", f"need at least 1 client, got {num_clients}")
    y = labels.detach().cpu().numpy().astype(np.int64)
    if num_clients * min_samples > len(y):
        raise ConfigError(
            "--partition",
            f"cannot give each of {num_clients} clients at least {min_samples} samples "
            f"from {len(y)} samples; use fewer --clients",
        )
    if kind == "iid":
        owner = _iid(len(y), num_clients, np.random.default_rng(seed))
    elif kind == "dirichlet":
        owner = _dirichlet(y, num_clients, float(arg), seed, min_samples)
    else:
        owner = _shards(y, num_clients, int(arg), np.random.default_rng(seed), min_samples)
    return _owner_to_parts(owner, num_clients)


def describe(parts: list[torch.Tensor], labels: torch.Tensor, num_classes: int) -> pd.DataFrame:
    """Per-client table: ``client, samples, label_0 .. label_{C-1}`` (sample counts)."""
    labels = labels.cpu()
    counts = torch.stack([torch.bincount(labels[p.cpu()], minlength=num_classes) for p in parts])
    table = pd.DataFrame(counts.numpy(), columns=[f"label_{c}" for c in range(num_classes)])
    table.insert(0, "samples", [len(p) for p in parts])
    table.insert(0, "client", range(len(parts)))
    return table


def _owner_to_parts(owner: np.ndarray, num_clients: int) -> list[torch.Tensor]:
    """Owner array (client id per sample, -1 = nobody) -> sorted index tensor per client."""
    held = np.flatnonzero(owner >= 0)
    order = held[np.argsort(owner[held], kind="stable")]  # ascending within each client
    sizes = np.bincount(owner[held], minlength=num_clients)
    return [torch.from_numpy(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.arange(n) * num_clients // n  # near-equal consecutive runs
    return owner


def _by_class(y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Sample indices of each class 0..max(y), in random order within the class."""
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    return np.split(order, np.cumsum(np.bincount(y))[:-1])


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``[classes, clients]`` sample counts from per-class Dirichlet proportions."""
    props = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
    cuts = np.floor(np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes  # guard against cumulative rounding below 1.0
    return np.diff(cuts, axis=1, prepend=0)


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int) -> np.ndarray:
    class_sizes = np.bincount(y)
    best, best_min = -1, -1
    for draw in range(DIRICHLET_DRAWS):
        smallest = _dirichlet_counts(class_sizes, num_clients, alpha, np.random.default_rng([seed, draw])).sum(0).min()
        if smallest > best_min:
            best, best_min = draw, smallest
        if smallest >= min_samples:
            break
    rng = np.random.default_rng([seed, best])
    counts = _dirichlet_counts(class_sizes, num_clients, alpha, rng)
    owner = np.empty(len(y), dtype=np.int64)
    for idx, row in zip(_by_class(y, rng), counts):
        owner[idx] = np.repeat(np.arange(num_clients), row)
    if best_min < min_samples:
        _top_up(owner, num_clients, min_samples, rng)
    return owner


def _top_up(owner: np.ndarray, num_clients: int, min_samples: int, rng: np.random.Generator) -> None:
    """Move random samples from clients above ``min_samples`` to the clients below it (in place)."""
    sizes = np.bincount(owner, minlength=num_clients)
    deficit = np.clip(min_samples - sizes, 0, None)
    spare = np.clip(sizes - min_samples, 0, None)
    order = rng.permutation(len(owner))
    by_owner = order[np.argsort(owner[order], kind="stable")]  # random order within each client
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    movable = by_owner[rank < spare[owner[by_owner]]]
    moved = rng.choice(movable, size=int(deficit.sum()), replace=False)
    owner[moved] = np.repeat(np.arange(num_clients), deficit)
    log.info("dirichlet: no draw gave every client %d samples; topped up %d clients with %d samples",
             min_samples, int((deficit > 0).sum()), int(deficit.sum()))


def _shards(y: np.ndarray, num_clients: int, k: int, rng: np.random.Generator, min_samples: int) -> np.ndarray:
    total = num_clients * k
    class_sizes = np.bincount(y)
    per_class = largest_remainder(class_sizes, total)
    if np.any(per_class > class_sizes):
        c = int(np.argmax(per_class > class_sizes))
        raise ConfigError(
            "--partition",
            f"shards:{k} with {num_clients} clients needs {total} shards, but class {c} "
            f"({class_sizes[c]} samples) cannot be cut into {per_class[c]}; use a smaller K or fewer clients",
        )
    shards = [s for idx, n in zip(_by_class(y, rng), per_class) if n > 0 for s in np.array_split(idx, n)]
    owner = np.full(len(y), -1, dtype=np.int64)
    for client, shard_ids in enumerate(rng.permutation(total).reshape(num_clients, k)):
        for s in shard_ids:
            owner[shards[s]] = client
    sizes = np.bincount(owner[owner >= 0], minlength=num_clients)
    if sizes.min() < min_samples:
        raise ConfigError(
            "--partition",
            f"shards:{k} leaves client {int(sizes.argmin())} with {int(sizes.min())} samples "
            f"(< {min_samples}); use fewer clients",
        )
    if (dropped := int((owner < 0).sum())):
        log.warning("shards:%d: %d samples of classes with no shard are unused", k, dropped)
    return owner


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest-remainder rounding)."""
    quota = weights * total / weights.sum()
    out = np.floor(quota).astype(np.int64)
    out[np.argsort(out - quota, kind="stable")[: total - out.sum()]] += 1
    return out
