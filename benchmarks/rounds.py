"""Seconds per CIFAR-10 round of each cell type of the results grid, and the grid's projected hours (issue 31).

Each cell as ``compare --jobs 2`` runs it: one process, one intra-op thread, ResNet-20 on CIFAR-10 shapes,
100 clients, 10 a round, Dirichlet 0.3, batch 32, the grid's lr, evaluation every 10 rounds on the whole test
split. ``--rounds`` rounds are timed (evaluation in the last one only): a round's cost at evaluation every 10
is the mean of the training rounds after the first (warm-up) plus a tenth of the evaluation's time (the last
round's wall time minus that mean); set-up (data, plan measurement) is shown apart. For each precision asked
for, a table, the CPU's name and flags, and the projected wall hours of the results grid's tiers (issue 32:
3 seeds of ``--grid-rounds``, two cells at a time). ``--fmnist`` also prints the Fashion-MNIST CNN ratios to a
plain PyTorch loop (``benchmarks/throughput.py --workload fedavg-cnn``), so one command gives every target.

    mkdir -p /tmp/cifar && tar xzf ../shared/datasets/cifar10-jpeg/cifar10-jpeg.tar.gz -C /tmp/cifar
    python benchmarks/rounds.py --dataset imagefolder:/tmp/cifar --precisions fp32,bf16 --fmnist
"""
from __future__ import annotations

import argparse
import platform
import time
from argparse import Namespace

import torch

from fedbench.config import resolve
from fedbench.engine import prepare

# METHOD[:VARIANT]@BUDGET of the results grid's first tier (every method at 0.25, fedavg at 1) and the cells that
# only fit at 0.5 (tier 2; depthfl and fiarse paper are infeasible at 0.25); a mixed cell is BUDGET+BUDGET+...
CELLS = ("small@0.25,heterofl@0.25,fedrolex@0.25,fd@0.25,slt@0.25,fedavg-accum@0.25,fjord@0.25,cocofl@0.25,"
         "fiarse:structured@0.25,fedepth@0.5,mfedepth@0.5,fedavg@1")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
EVAL_EVERY = 10


def cpu() -> str:
    """The CPU's model name and the flags that decide its kernels (bf16 native or emulated)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{name}; flags: {' '.join(f for f in FLAGS if f in flags) or 'none of ' + ', '.join(FLAGS)}"


def time_cell(method: str, budget: tuple[float, ...], precision: str, args: Namespace) -> dict:
    method, _, variant = method.partition(":")
    settings = {"method": method, **({"variant": variant} if variant else {}), "memory_budget": budget,
                "dataset": args.dataset, "model": "resnet20",
                "clients": 100, "clients_per_round": 10, "partition": "dirichlet:0.3", "batch_size": 32,
                "rounds": args.rounds, "eval_every": args.rounds, "precision": precision, "device": "cpu",
                "quiet": True}
    t0 = time.perf_counter()
    run = prepare(resolve(settings))
    setup = time.perf_counter() - t0
    run.execute()
    walls = [r["wall_s"] for r in run.rows]
    train = sum(walls[1:-1]) / len(walls[1:-1])
    evaluation = walls[-1] - train
    return {"setup": setup, "train": train, "eval": evaluation, "round": train + evaluation / EVAL_EVERY,
            "accuracy": run.rows[-1]["accuracy"]}


def projection(times: dict[tuple[str, tuple[float, ...]], float], args: Namespace) -> str:
    """Wall hours of tier 1 (the 0.25 cells and fedavg at 1) and of tier 2 (the 0.5 and mixed cells timed) at
    3 seeds x ``grid_rounds``, two cells at a time."""
    def hours(cells):
        return sum(times[c] for c in cells) * args.grid_rounds * 3 / 2 / 3600

    tier1 = [c for c in times if c[1] in ((0.25,), (1.0,))]
    tier2 = [c for c in times if c not in tier1]
    return (f"projected wall hours at {args.grid_rounds} rounds x 3 seeds, 2 cells at a time: tier 1 "
            f"({len(tier1)} cells timed) {hours(tier1):.1f} h; tier 2 ({len(tier2)} cells timed) {hours(tier2):.1f} h")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="imagefolder:/tmp/cifar", help="CIFAR-10 (cifar10, or the JPEG copy)")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per cell (>= 3)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--cells", default=CELLS, help="METHOD[:VARIANT]@BUDGET[+BUDGET...],...")
    p.add_argument("--grid-rounds", type=int, default=300)
    p.add_argument("--fmnist", action="store_true", help="also the Fashion-MNIST CNN ratios (throughput.py)")
    p.add_argument("--data-dir", default="../shared/datasets/fashion-mnist", help="--fmnist: the Fashion-MNIST files")
    args = p.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cells = [(c.split("@")[0], tuple(float(b) for b in c.split("@")[1].split("+"))) for c in args.cells.split(",")]
    print(f"CPU: {cpu()}; torch {torch.__version__}, 1 thread; ResNet-20, {args.dataset}, 10 of 100 clients a "
          f"round, batch 32, evaluation every {EVAL_EVERY} (whole test split); {args.rounds} rounds timed per cell")
    for precision in args.precisions.split(","):
        print(f"\n{precision}: {'cell':<28}{'set-up s':>9}{'train s':>9}{'eval s':>8}{'s/round':>9}")
        times = {}
        for method, budget in cells:
            t = time_cell(method, budget, precision, args)
            times[(method, budget)] = t["round"]
            label = f"{method} @ {'+'.join(f'{b:g}' for b in budget)}"
            print(f"{'':6}{label:<28}{t['setup']:>9.1f}{t['train']:>9.2f}{t['eval']:>8.2f}"
                  f"{t['round']:>9.2f}", flush=True)
        if ("fedavg", (1.0,)) in times and ("fedavg-accum", (0.25,)) in times:
            print(f"{'':6}fedavg-accum / fedavg round: "
                  f"{times[('fedavg-accum', (0.25,))] / times[('fedavg', (1.0,))]:.2f}")
        print(f"{'':6}{projection(times, args)}")
    if args.fmnist:
        from throughput import cnn
        print()
        torch.set_num_threads(threads)  # as the earlier FMNIST figures: the process's default threads
        cnn(Namespace(device="cpu", rounds=30, data_dir=args.data_dir, precisions=args.precisions, processes="1"))


if __name__ == "__main__":
    main()
