"""Randomness as a function of (seed, purpose, round, client): each use derives its own generator.

No global RNG is touched inside the round loop, so a resumed run, or a run whose clients
are spread over processes, draws exactly the same numbers (FedJAX's approach).
"""
from __future__ import annotations

import hashlib

import torch


def derive(seed: int, *keys: object) -> int:
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(seed: int, *keys: object, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive(seed, *keys))


def sample_clients(seed: int, rnd: int, clients: int, per_round: int) -> list[int]:
    """The clients of a round: a seeded draw without replacement, in ascending order."""
    order = torch.randperm(clients, generator=generator(seed, "sample", rnd))
    return sorted(order[:per_round].tolist())
