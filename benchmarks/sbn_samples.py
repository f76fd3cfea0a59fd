"""How many training images HeteroFL's sBN statistics need (issue 31): the ablation behind ``--sbn-samples``.

Takes a finished (or checkpointed) heterofl run folder, restores its global model, and evaluates it as
HeteroFL does (the largest client width, BN statistics from an sBN pass, the whole test split) with the
statistics of the whole training split and of disjoint chunks of N images (the first N, the next N, ...):
the spread over the chunks of one N is what the choice of sample changes, beside the pass's time.

    fedbench run --method heterofl --memory-budget 0.25,0.5,1 --dataset imagefolder:/tmp/cifar --rounds 15 \\
        --partition dirichlet:0.3 --eval-every 15 --out /tmp/heterofl-cifar
    python benchmarks/sbn_samples.py /tmp/heterofl-cifar --samples 1000,2000,5000,10000
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedbench.checkpoint import restore
from fedbench.config import resolve
from fedbench.engine import prepare
from fedbench.method import evaluate_on_test
from fedbench.submodel import extract
from fedbench.methods._width import static_bn


def accuracy(run, model, images: slice) -> tuple[float, float]:
    """Test accuracy of ``model`` with sBN statistics of the training images ``images``, and the pass's seconds."""
    ds = run.dataset
    part = replace(ds, train_x=ds.train_x[images], train_y=ds.train_y[images])
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = static_bn(model, part)
    seconds = time.perf_counter() - t0
    return evaluate_on_test(stats, ds)["accuracy"], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a heterofl run folder with checkpoint.pt")
    p.add_argument("--samples", default="1000,2000,5000,10000")
    p.add_argument("--chunks", type=int, default=5, help="disjoint chunks of each size (at most)")
    args = p.parse_args()
    run = prepare(resolve({"quiet": True}, args.run / "config.toml"))
    restore(run, args.run)
    method, width = run.method, run.method.global_width()
    evaluated = run.model if width >= 1 else extract(run.ctx.build, run.model, method.width_plan(width))
    n = len(run.dataset.train_y)
    full, seconds = accuracy(run, evaluated, slice(0, n))
    print(f"{args.run}: {run.config.method} {run.config.dataset}, round {run.config.rounds}, evaluated width {width:g}, "
          f"precision {run.config.precision}")
    print(f"all {n} training images: accuracy {full:.4f} (sBN pass {seconds:.1f} s)")
    for size in map(int, args.samples.split(",")):
        results = [accuracy(run, evaluated, slice(i * size, (i + 1) * size)) for i in range(min(args.chunks, n // size))]
        accs = [a for a, _ in results]
        print(f"{size:>6} images, {len(accs)} disjoint chunks: accuracy {min(accs):.4f}-{max(accs):.4f} "
              f"(mean {sum(accs) / len(accs):.4f}, first chunk {accs[0]:.4f}; vs all: {accs[0] - full:+.4f}), "
              f"sBN pass {results[0][1]:.2f} s")


if __name__ == "__main__":
    main()
