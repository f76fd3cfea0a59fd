"""One simulation, or one sweep, over the processes of ``torchrun`` (torch.distributed; issue 9).

Within a run every process holds the same global model. Each round, the sampled clients are
shared out (balanced by sample counts, deterministically), each process trains its share and
folds it into its masked sums, the sums and weights are all-reduced, and every process applies
the same update. Client randomness is a function of (seed, round, client) and never of the
process, and the masked sums are float64 (exact in any order), so the result equals the one-process run.
Across a sweep, ``compare`` gives each process every size-th unfinished cell.

Backends: NCCL when CUDA is available (process i on GPU ``LOCAL_RANK``), gloo on CPUs.

Without torchrun, ``fedbench run --processes N`` starts the same group itself (issue 16): this
process is rank 0 and writes everything; N-1 spawned workers train their share of each round
and are stopped when rank 0 leaves. ``auto`` is 2 processes of cores/2 threads each on a CPU with
two or more cores (measured on a 2-core CPU: 1.34x per round on ResNet-20, 1.37x on the CNN,
benchmarks/scaling.py; small convolutions scale poorly across threads), 1 on a GPU.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def processes(setting: str, device: torch.device, clients_per_round: int, shared: bool) -> int:
    """How many processes ``--processes`` means for a run: ``auto`` (see the module docstring) or a number;
    1 when the round's clients cannot be shared (``shared`` False: per-client state) or there is one client."""
    if not shared or clients_per_round < 2:
        return 1
    if setting == "auto":
        return 2 if device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1
    return min(int(setting), clients_per_round)


def join(store: str, rank: int, size: int) -> Group:
    """Join the gloo group of ``size`` local processes that meet at the file ``store``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timedelta(hours=1))
    return Group(rank, size)


class WorkerDied(RuntimeError):
    """A spawned worker process ended while the run needed it (killed, out of memory, crashed)."""

    def __init__(self, rank: int, exitcode: int):
        how = (f"was killed by {signal.Signals(-exitcode).name}" + (" (as the out-of-memory killer does)"
                                                                     if exitcode == -signal.SIGKILL else "")
               if exitcode < 0 else f"exited with code {exitcode}")
        super().__init__(f"worker process {rank} of the run {how}")


def follow(store: str, rank: int, size: int, threads: int, job: Callable[[Group], None]) -> None:
    """A spawned worker: its share of the threads, Ctrl-C, SIGTERM and logging left to rank 0 (which stops the
    workers), then ``job``. If rank 0 dies the worker stops with one line on stderr and exit code 1, not a
    traceback."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    logging.getLogger().addHandler(logging.NullHandler())  # rank 0 logs the run's warnings, once
    torch.set_num_threads(threads)
    try:
        job(join(store, rank, size))
    except Exception:
        parent = mp.parent_process()
        if parent is None or parent.is_alive():
            raise
        print(f"fedbench: worker process {rank} stops: the run's main process (rank 0, pid {parent.pid}) died; "
              "its folder keeps every checkpointed round (fedbench run --resume FOLDER continues it)",
              file=sys.stderr, flush=True)
        sys.exit(1)
    dist.destroy_process_group()


def dead(workers: list) -> WorkerDied | None:
    """The first worker that ended with a failure (each given a moment to be reaped), or None."""
    for rank, w in enumerate(workers, start=1):
        w.join(timeout=5)
        if w.exitcode not in (None, 0):
            return WorkerDied(rank, w.exitcode)
    return None


@contextmanager
def local_group(size: int, job: Callable[[Group], None]) -> Iterator[Callable[[], Group]]:
    """Spawn ``size - 1`` workers that each run ``job(group)`` (a picklable callable) and yield how this process
    joins them as rank 0 (call it once its own set-up is done: the workers start meanwhile), all with
    cores/size intra-op threads. A failure of the body caused by a worker that died is raised as WorkerDied.
    On leaving, normally or not, workers still running are stopped and this process's threads and group are
    restored."""
    threads, before = max(1, (os.cpu_count() or 1) // size), torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.get_context("spawn")
        workers = [context.Process(target=follow, args=(store, rank, size, threads, job), daemon=True)
                   for rank in range(1, size)]
        for w in workers:
            w.start()
        torch.set_num_threads(threads)
        try:
            yield lambda: join(store, 0, size)
            for w in workers:
                w.join()
        except Exception as e:  # a collective fails when a worker died: say which and how, not gloo's error
            died = dead(workers)
            if died is None:
                raise
            raise died from e
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()  # SIGKILL: a worker leaves SIGTERM to rank 0
                w.join()
            if dist.is_initialized():
                dist.destroy_process_group()
            torch.set_num_threads(before)
