"""Simulation throughput vs centralized training of the same model (issue 2; issue 8's targets).

FedAvg, ResNet-20 on 32x32x3 data, 100 clients x 500 samples, 10 clients per round, batch 32,
1 local epoch. Prints images/s of the simulation (first and last round excluded: warm-up, evaluation)
and, in the same process and on the same device, of a plain centralized loop at batch 32 and
512, with the ratios.

    python benchmarks/throughput.py [--device cpu|cuda] [--rounds 4] [--model resnet20]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fedbench.config import resolve
from fedbench.data import augment, normalize
from fedbench.engine import prepare


def centralized(run, batch: int, steps: int) -> float:
    """Images/s of plain SGD on the full model over the same data (augmentation included)."""
    ds = run.dataset
    model = run.ctx.build().to(run.ctx.device).train()
    cfg = run.config
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=run.ctx.device).manual_seed(0)

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch, device=ds.train_y.device) % len(ds.train_y)
        x = normalize(augment(ds.train_x[idx], gen), ds)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), ds.train_y[idx]).backward()
        opt.step()

    step(0)
    sync(run)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    sync(run)
    return steps * batch / (time.perf_counter() - t0)


def sync(run) -> None:
    if run.ctx.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args()
    cfg = resolve({"method": "fedavg", "dataset": "synthetic:3x32:50000", "model": args.model, "clients": 100,
                   "clients_per_round": 10, "rounds": args.rounds, "batch_size": 32, "local_epochs": 1,
                   "eval_every": 10**6, "device": args.device, "quiet": True})
    t0 = time.perf_counter()
    run = prepare(cfg)
    setup = time.perf_counter() - t0
    run.execute()
    timed = run.rows[1:-1] or run.rows  # the first round warms up, the last one also evaluates
    samples = sum(r["clients"] for r in timed) * 500
    sim = samples / sum(r["wall_s"] for r in timed)
    steps = max(20, samples // 32 // 4)
    c32, c512 = centralized(run, 32, steps), centralized(run, 512, max(4, steps // 16))
    print(f"device {run.ctx.device}, model {args.model}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"setup (data, partition, profiler measurements): {setup:.1f} s")
    print(f"simulation (FedAvg, 10 clients x 500 samples per round, batch 32): {sim:9.1f} images/s")
    print(f"centralized, batch 32:                                         {c32:9.1f} images/s")
    print(f"centralized, batch 512:                                        {c512:9.1f} images/s")
    print(f"ratio simulation / centralized batch 32:  {sim / c32:.3f}")
    print(f"ratio simulation / centralized batch 512: {sim / c512:.3f}")


if __name__ == "__main__":
    main()
