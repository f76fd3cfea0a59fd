"""One simulation, or one sweep, over the processes of ``torchrun`` (torch.distributed; issue 9).

Within a run every process holds the same global model. Each round, the sampled clients are
shared out (balanced by sample counts, deterministically), each process trains its share and
folds it into its masked sums, the sums and weights are all-reduced, and every process applies
the same update. Client randomness is a function of (seed, round, client) and never of the
process, so the result equals the one-process run within float tolerance (summation order).
Across a sweep, ``compare`` gives each process every size-th unfinished cell.

Backends: NCCL when CUDA is available (process i on GPU ``LOCAL_RANK``), gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

LAUNCHED = "WORLD_SIZE"  # set by torchrun


@dataclass(frozen=True)
class Group:
    rank: int
    size: int

    @property
    def main(self) -> bool:
        """The process that writes outputs and shows progress."""
        return self.rank == 0

    def share(self, clients: list[int], samples: list[int]) -> list[int]:
        """This process's clients of the round: largest first to the least-loaded process (ties: lowest rank)."""
        load, mine = [0] * self.size, []
        for n, client in sorted(zip(samples, clients), key=lambda p: (-p[0], p[1])):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            load[rank] += n
            if rank == self.rank:
                mine.append(client)
        return sorted(mine)

    def all_reduce(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def from_env() -> Group | None:
    """The torchrun process group (initialised once), or None in a plain one-process run."""
    if int(os.environ.get(LAUNCHED, "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a sweep's processes wait at the final barrier for the slowest one's cells
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=24))
    return Group(dist.get_rank(), dist.get_world_size())
