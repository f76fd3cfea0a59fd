"""Simulation speed against plain PyTorch, measured side by side in one process (issue 8's targets).

Workload ``resnet`` (the GPU targets): ResNet-20 on synthetic 3x32x32 data, 100 clients x 500
samples, 10 clients per round, batch 32, 1 local epoch. Images/s of
  - fedbench with clients batched (``--client-batching on``) and one at a time (``off``),
    for FedAvg, HeteroFL with mixed budgets 0.25/0.5/1 (clients grouped by configuration) and SLT
    at budget 0.25;
  - a plain one-client-at-a-time PyTorch loop (copy the global model, an SGD optimizer, shuffled
    mini-batches, weighted average), FedAvg only;
  - centralized training of the same model at batch 32 and 512.
Simulation rounds exclude the first (warm-up) and the last (evaluation).

Workload ``fedavg-cnn`` (the CPU target): FedAvg on Fashion-MNIST (``--data-dir``; the embedded
fmnist-mini without it) with the small CNN, 100 clients, 10 per round, batch 32, 1 epoch: total
wall time of ``--rounds`` rounds of fedbench and of the plain loop, both evaluating every 5 rounds,
with their final accuracies, fedbench in each ``--precisions`` value (the plain loop in fp32) in one
process, and as ``fedbench run --processes N`` for each other ``--processes`` value (a new process
each, start-up included); and the profiler's share of fedbench's one-process wall time (memory,
FLOPs and bytes accounting, set-up included).

    python benchmarks/throughput.py --workload resnet --device cuda --rounds 5
    python benchmarks/throughput.py --workload fedavg-cnn --device cpu --rounds 30 --data-dir ../shared/datasets/fashion-mnist
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedbench.config import resolve
from fedbench.data import normalize, train_batch
from fedbench.engine import prepare
from fedbench.models import create_model
from fedbench.profiler import Profiler
from fedbench.seeding import sample_clients


ROOT = str(Path(__file__).resolve().parents[1])
PER_CLIENT = 500  # resnet workload: 50,000 synthetic images over 100 IID clients


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- plain PyTorch ---------------------------------------------------------------------------
def plain_round(global_model, run, rnd: int) -> int:
    """One FedAvg round as a plain loop: copy, optimizer, shuffled batches, weighted average."""
    cfg, ds = run.config, run.dataset
    states, weights = [], []
    for client in sample_clients(cfg.seed, rnd, cfg.clients, cfg.clients_per_round):
        local = copy.deepcopy(global_model).train()
        opt = torch.optim.SGD(local.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        idx = run.parts[client].to(ds.train_y.device)
        gen = torch.Generator(device=ds.train_y.device).manual_seed(rnd * 100_003 + client)
        for batch in idx[torch.randperm(len(idx), generator=gen, device=idx.device)].split(cfg.batch_size):
            opt.zero_grad()
            F.cross_entropy(local(train_batch(ds.train_x[batch], ds, gen)), ds.train_y[batch]).backward()
            opt.step()
        states.append(local.state_dict())
        weights.append(len(idx))
    total = sum(weights)
    global_model.load_state_dict({k: sum(s[k].float() * w for s, w in zip(states, weights)).div(total).to(v.dtype)
                                  for k, v in global_model.state_dict().items()})
    return total


@torch.no_grad()
def accuracy(model, ds) -> float:
    model.eval()
    correct = sum(int((model(normalize(ds.test_x[i:i + 500], ds)).argmax(1) == ds.test_y[i:i + 500]).sum())
                  for i in range(0, len(ds.test_y), 500))
    model.train()
    return correct / len(ds.test_y)


def plain_model(run):
    ds = run.dataset
    torch.manual_seed(run.config.seed)
    return create_model(run.config.model, num_classes=ds.num_classes, in_chans=ds.in_chans,
                        img_size=ds.img_size).to(run.ctx.device)


def centralized(run, batch: int, steps: int) -> float:
    """Images/s of plain SGD on the full model over the same data (augmentation included)."""
    ds, cfg, device = run.dataset, run.config, run.ctx.device
    model = plain_model(run).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch, device=device) % len(ds.train_y)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(train_batch(ds.train_x[idx], ds, gen)), ds.train_y[idx]).backward()
        opt.step()

    step(0)
    sync(device)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


# --- fedbench ----------------------------------------------------------------------------------
def simulated(settings: dict, batching: str) -> tuple[float, object]:
    """Images/s of fedbench over the rounds between the first and the last."""
    run = prepare(resolve({**settings, "client_batching": batching}))
    run.execute()
    timed = run.rows[1:-1] or run.rows
    return sum(r["clients"] for r in timed) * PER_CLIENT / sum(r["wall_s"] for r in timed), run


def resnet(args) -> None:
    base = {"dataset": "synthetic:3x32:50000", "model": "resnet20", "clients": 100, "clients_per_round": 10,
            "rounds": args.rounds, "batch_size": 32, "local_epochs": 1, "eval_every": 10**6, "device": args.device,
            "quiet": True}
    cases = {"fedavg": {"method": "fedavg"},
             "heterofl": {"method": "heterofl", "memory_budget": (0.25, 0.5, 1.0)},
             "slt": {"method": "slt", "memory_budget": (0.25,)}}
    on, run = simulated({**base, **cases["fedavg"]}, "on")
    device = run.ctx.device
    model = plain_model(run)
    plain_round(model, run, 0)  # warm-up
    sync(device)
    t0, samples = time.perf_counter(), 0
    for rnd in range(1, args.rounds - 1):
        samples += plain_round(model, run, rnd)
    sync(device)
    plain = samples / (time.perf_counter() - t0)
    steps = max(50, args.rounds * 5000 // 32 // 4)
    c32, c512 = centralized(run, 32, steps), centralized(run, 512, max(8, steps // 16))
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), ResNet-20, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"plain one-client-at-a-time loop, FedAvg: {plain:9.0f} images/s")
    print(f"centralized batch 32:                    {c32:9.0f} images/s")
    print(f"centralized batch 512:                   {c512:9.0f} images/s")
    print(f"FedAvg batched / centralized batch 512:  {on / c512:.3f}  (target >= 0.5)")
    print(f"FedAvg batched / plain loop:             {on / plain:.2f}  (target >= 5)")
    print(f"{'images/s':<10}{'batched':>10}{'one at a time':>15}{'ratio':>8}{'/ central 512':>15}{'/ plain':>9}")
    for name in args.cases.split(","):
        b = on if name == "fedavg" else simulated({**base, **cases[name]}, "on")[0]
        o = simulated({**base, **cases[name]}, "off")[0]
        print(f"{name:<10}{b:>10.0f}{o:>15.0f}{b / o:>8.2f}{b / c512:>15.3f}{b / plain:>9.2f}", flush=True)


def cnn(args) -> None:
    settings = {"method": "fedavg", "dataset": "fashion-mnist" if args.data_dir else "fmnist-mini",
                "data_dir": args.data_dir, "model": "fedavg-cnn", "clients": 100, "clients_per_round": 10,
                "rounds": args.rounds, "batch_size": 32, "local_epochs": 1, "eval_every": 5, "device": args.device,
                "quiet": True}
    spent = [0.0, 0]  # seconds inside the profiler (outermost calls), nesting depth

    def timed(fn):
        def wrapper(*a, **kw):
            spent[1] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[1] -= 1
                if not spent[1]:
                    spent[0] += time.perf_counter() - t0
        return wrapper
    for name in ("memory_of", "measure", "train_flops", "bytes_of"):  # forward_macs (fvcore) is in the summary
        setattr(Profiler, name, timed(getattr(Profiler, name)))
    ours = {}
    for precision in args.precisions.split(","):
        spent[0] = 0.0
        t0 = time.perf_counter()
        run = prepare(resolve({**settings, "precision": precision}))
        run.execute()
        ours[precision] = (time.perf_counter() - t0, run.rows[-1]["accuracy"], spent[0])
    spawned = {(precision, n): whole_process(settings, precision, n)
               for n in map(int, args.processes.split(",")) if n > 1 for precision in args.precisions.split(",")}
    ds = run.dataset
    model = plain_model(run)
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        plain_round(model, run, rnd)
        if (rnd + 1) % 5 == 0 or rnd + 1 == args.rounds:
            plain_acc = accuracy(model, ds)
    plain = time.perf_counter() - t0
    print(f"device {run.ctx.device}, fedavg-cnn on {settings['dataset']}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds, client batching "
          f"{'on' if run.config.client_batching == 'on' or run.ctx.device.type == 'cuda' else 'off'} (auto)")
    print(f"plain loop (fp32): {plain:7.1f} s, final accuracy {plain_acc:.4f}")
    for precision, (wall, acc, profiler) in ours.items():
        print(f"fedbench {precision}: {wall:7.1f} s (set-up included), final accuracy {acc:.4f}; "
              f"/ plain loop wall time {wall / plain:.3f} (target <= 0.66 in fp32); "
              f"profiler share {profiler / wall:.2%} (target <= 5%)")
    for (precision, n), (wall, acc) in spawned.items():
        print(f"fedbench {precision} --processes {n}: {wall:7.1f} s (whole process, start-up included), final "
              f"accuracy {acc:.4f}; / plain loop wall time {wall / plain:.3f}")


def whole_process(settings: dict, precision: str, processes: int) -> tuple[float, float]:
    """Wall time and final accuracy of ``fedbench run --processes N`` as a user starts it (a new process)."""
    flags = [a for k, v in settings.items() if v is not None and v is not True
             for a in (f"--{k.replace('_', '-')}", str(v))] + ["--quiet"]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedbench", "run", *flags, "--precision", precision,
                        "--processes", str(processes), "--out", out], check=True, env={**os.environ, "PYTHONPATH": ROOT})
        wall = time.perf_counter() - t0
        return wall, json.loads((Path(out) / "summary.json").read_text())["final_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("resnet", "fedavg-cnn"), default="resnet")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", default="fedavg,heterofl,slt",
                   help="resnet: fedavg, heterofl (budgets 0.25/0.5/1, clients grouped by width), slt (budget 0.25)")
    p.add_argument("--data-dir", default=None, help="fedavg-cnn: the Fashion-MNIST files (default: embedded fmnist-mini)")
    p.add_argument("--precisions", default="fp32,bf16", help="fedavg-cnn: fedbench's --precision values to time")
    p.add_argument("--processes", default="1,2", help="fedavg-cnn: fedbench's --processes values to time (1 in this "
                                                      "process; more as `fedbench run --processes N`)")
    args = p.parse_args()
    (resnet if args.workload == "resnet" else cnn)(args)


if __name__ == "__main__":
    main()
