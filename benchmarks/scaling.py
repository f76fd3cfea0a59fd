"""Wall time per round of one simulation over 1 vs N torchrun processes (issue 9).

FedAvg, fedavg-cnn, 100 clients, 20 per round, batch 32, 1 local epoch, on the embedded fmnist-mini
(or ``--dataset fashion-mnist --data-dir DIR``). Each process gets cores / N intra-op threads; on a
GPU machine the processes share the GPU (``--device cuda``). Prints the median wall time of a
round (the first round, warm-up, and evaluation rounds excluded) and the speed-up.

    python benchmarks/scaling.py [--nproc 2] [--device cpu] [--rounds 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def round_seconds(nproc: int, args, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), "PYTHONPATH": str(ROOT)}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                                 if nproc > 1 else [])
    settings = ["--method", "fedavg", "--model", args.model, "--dataset", args.dataset, "--clients", "100",
                "--clients-per-round", "20",
                "--rounds", str(args.rounds), "--eval-every", str(args.rounds), "--device", args.device, "--quiet",
                "--out", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    subprocess.run([*launch, "-m", "fedbench", "run", *settings], cwd=ROOT, env=env, check=True)
    rows = pd.read_csv(out / "rounds.csv")
    return statistics.median(rows["wall_s"].iloc[1:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dataset", default="fmnist-mini")
    p.add_argument("--model", default="fedavg-cnn")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = round_seconds(1, args, Path(tmp) / "one")
        many = round_seconds(args.nproc, args, Path(tmp) / "many")
    print(f"device {args.device}, {os.cpu_count()} cores, FedAvg {args.model} on {args.dataset}, 20 clients per round")
    print(f"1 process:   {one:.3f} s per round")
    print(f"{args.nproc} processes: {many:.3f} s per round")
    print(f"speed-up: {one / many:.2f}x")


if __name__ == "__main__":
    main()
