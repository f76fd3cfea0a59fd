"""Shared test helpers: small real runs on the embedded data, paths to the optional shared data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


# CI clones the repo with ../shared beside it; tests that need the original files skip without it.
FMNIST_SRC = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion-mnist"
needs_fmnist = pytest.mark.skipif(not FMNIST_SRC.is_dir(), reason="original Fashion-MNIST files not available")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# `fedbench run` shares rounds over 2 processes on a multi-core CPU by default; the tests (and the fedbench
# processes they start) run one unless they ask for more, as the tests of --processes do.
os.environ["FEDBENCH_PROCESSES"] = "1"
# --precision auto picks bf16 on CPUs that run it natively; the tests' figures are fp32's on every CPU (the tests
# of auto ask for it).
os.environ["FEDBENCH_PRECISION"] = "fp32"

from fedbench.config import resolve  # noqa: E402  (after the defaults above)
from fedbench.engine import Observer, Run, prepare  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: small CPU kernels gain nothing from two, and two oversubscribe a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(clients=20, clients_per_round=4, rounds=3, eval_every=1, device="cpu", quiet=True, model="fedavg-cnn")


def small_run(**overrides) -> Run:
    """A prepared run on fmnist-mini with small defaults (override any RunConfig key or option): the fast
    norm-free cnn unless a model is given (fedbench's default model is resnet20)."""
    return prepare(resolve({**SMALL, **overrides}))


class Records(Observer):
    """Collects every client record of a run (``run.execute([records])``)."""

    def __init__(self):
        self.clients: list[dict] = []

    def after_round(self, run, row, clients):
        self.clients += clients


def timing_free(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
