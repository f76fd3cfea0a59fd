"""Device profiles and the simulated time of a client-round (``--devices``, ``--deadline``).

A device has a sustained training throughput (FLOP/s), memory available for training (bytes), up- and
downlink bandwidth (bytes/s), an optional fixed overhead per mini-batch (s) and an availability (the
probability that it is online when sampled). A profile (``--devices PROFILE``) is

- a preset shipped in ``fedbench/presets/devices/<name>.csv`` (sources in its comments),
- a CSV file of the same columns: one row per device class with a ``share`` (classes are assigned to clients
  in those proportions, at random, seeded), or one row per client with a ``client`` column, or
- a distribution spec ``flops=LOW..HIGH,memory=...,up=...,down=...[,step_overhead=...][,availability=...]``: each
  client draws each value log-uniformly (availability and overhead uniformly) between LOW and HIGH, or takes a fixed value.

Numbers take an SI suffix (``19.2G`` FLOP/s), sizes a byte unit (``3GB``, ``512MiB``; bandwidths per second).

The time model (FedScale's and FLASH's, with compute taken from what the client actually trains): compute =
measured training FLOPs / FLOP/s + mini-batches x overhead; communication = bytes down / downlink + bytes up /
uplink; a synchronous round lasts as long as its slowest client, or until ``--deadline`` when a client would
finish later (that client's update is not used). No contention between clients, no energy, no stragglers
beyond what the profile assigns.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fedbench.errors import ConfigError
from fedbench.partition import largest_remainder
from fedbench.seeding import generator

PRESETS = Path(__file__).with_name("presets") / "devices"
FLAG = "--devices"
SI = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(k|K|M|G|T|Ki|Mi|Gi|Ti)?(B?)\s*$")


def quantity(text: str | float, what: str, zero: bool = False) -> float:
    """'19.2G' -> 1.92e10, '3GB' -> 3e9, '512MiB' -> 2**29, '1e6' -> 1e6; positive (or 0 if ``zero``) and finite,
    else a ConfigError naming --devices."""
    match = QUANTITY.match(str(text))
    value = float(match.group(1)) * SI[match.group(2) or ""] if match else math.nan
    if not (math.isfinite(value) and (value > 0 or (zero and value == 0))):
        raise ConfigError(FLAG, f"{what} {text!r} is not a {'non-negative' if zero else 'positive'} number; allowed: "
                                "e.g. 19.2G, 3GB, 512MiB, 1.4MB")
    return value


def size(text: str) -> float | None:
    """Bytes of an absolute size with a byte unit ('8MB', '512KiB', '100B'); None if ``text`` has none."""
    match = QUANTITY.match(text)
    return float(match.group(1)) * SI[match.group(2) or ""] if match and match.group(3) else None


@dataclass(frozen=True)
class Device:
    name: str
    flops: float              # sustained training throughput, FLOP/s
    memory: float             # bytes available for training
    up: float                 # uplink, bytes/s
    down: float               # downlink, bytes/s
    step_overhead: float = 0.0  # seconds per mini-batch
    availability: float = 1.0   # probability of being online when sampled

    def seconds(self, flops: float, batches: int, bytes_down: int, bytes_up: int) -> tuple[float, float]:
        """(compute, communication) seconds of one client-round."""
        return flops / self.flops + batches * self.step_overhead, bytes_down / self.down + bytes_up / self.up


COLUMNS = {"flops": "FLOP/s", "memory": "memory", "up": "uplink", "down": "downlink",
           "step_overhead": "step overhead", "availability": "availability"}
REQUIRED = ("flops", "memory", "up", "down")


def device(name: str, values: dict[str, str | float], where: str) -> Device:
    """A Device from text values (units allowed), checked: required columns, availability in (0, 1]."""
    missing = [c for c in REQUIRED if values.get(c) in (None, "")]
    if missing:
        raise ConfigError(FLAG, f"{where}: no {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    out = {c: quantity(values[c], f"{where}: {COLUMNS[c]}") for c in REQUIRED}
    if values.get("step_overhead") not in (None, ""):
        out["step_overhead"] = quantity(values["step_overhead"], f"{where}: step overhead", zero=True)
    available = values.get("availability")
    if available not in (None, ""):
        out["availability"] = quantity(available, f"{where}: availability")
        if out["availability"] > 1:
            raise ConfigError(FLAG, f"{where}: availability {available!r} is not a probability; allowed: (0, 1]")
    return Device(name, **out)


def read_csv(text: str, where: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO("\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))))
    if not rows:
        raise ConfigError(FLAG, f"{where} holds no device rows")
    unknown = sorted(set(rows[0]) - {"name", "share", "client", *COLUMNS})
    if unknown:
        raise ConfigError(FLAG, f"{where}: unknown column {unknown[0]!r}; allowed: name, share or client, "
                                f"{', '.join(COLUMNS)}")
    return rows


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.csv"))


def assign(profile: str, clients: int, seed: int) -> list[Device]:
    """Each client's device under ``profile`` (a preset, a CSV file or a distribution spec), seeded."""
    if "=" in profile:
        return drawn(profile, clients, seed)
    path = PRESETS / f"{profile}.csv" if profile in presets() else Path(profile)
    if not path.is_file():
        raise ConfigError(FLAG, f"{profile!r} is neither a preset, a CSV file nor a spec KEY=LOW..HIGH,...; allowed "
                                f"presets: {', '.join(presets())}")
    try:
        rows = read_csv(path.read_text(), path.name)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(FLAG, f"cannot read {path}: {e}") from None
    if "client" in rows[0]:
        return per_client(rows, clients, path.name)
    if "share" not in rows[0]:
        raise ConfigError(FLAG, f"{path.name}: needs a share column (one row per class) or a client column (one per client)")
    classes = [device(r.get("name") or f"class{i}", r, f"{path.name} row {i + 1}") for i, r in enumerate(rows)]
    shares = [quantity(r["share"], f"{path.name} row {i + 1}: share") for i, r in enumerate(rows)]
    counts = largest_remainder(np.array(shares), clients)
    slots = [d for d, n in zip(classes, counts) for _ in range(n)]
    order = torch.randperm(clients, generator=generator(seed, "devices")).tolist()
    return [slots[i] for i in order]


def per_client(rows: list[dict[str, str]], clients: int, where: str) -> list[Device]:
    try:
        ids = [int(r["client"]) for r in rows]
    except (TypeError, ValueError):  # a missing (None) or non-integer id
        raise ConfigError(FLAG, f"{where}: client ids must be integers") from None
    if sorted(ids) != list(range(clients)):
        raise ConfigError(FLAG, f"{where} lists {len(ids)} clients; allowed: each of clients 0..{clients - 1} once "
                                f"(--clients {clients})")
    out: list[Device | None] = [None] * clients
    for r, c in zip(rows, ids):
        out[c] = device(r.get("name") or f"client{c}", r, f"{where} client {c}")
    return out


def drawn(spec: str, clients: int, seed: int) -> list[Device]:
    """``KEY=VALUE`` or ``KEY=LOW..HIGH`` per column: a fixed value, or a per-client log-uniform draw
    (availability: uniform), each client from its own generator (seed, "device", client)."""
    ranges = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in COLUMNS:
            raise ConfigError(FLAG, f"{key!r} in {spec!r} is not a device column; allowed: {', '.join(COLUMNS)}")
        low, _, high = value.partition("..")
        ranges[key] = (low, high or low)
    out = []
    for c in range(clients):
        u = torch.rand(len(ranges), generator=generator(seed, "device", c), dtype=torch.float64).tolist()
        values = {}
        for (key, (low, high)), r in zip(ranges.items(), u):
            uniform = key in ("availability", "step_overhead")
            lo, hi = (quantity(v, f"{spec!r}: {COLUMNS[key]}", zero=key == "step_overhead") for v in (low, high))
            if lo > hi:
                raise ConfigError(FLAG, f"{spec!r}: {key} range {low}..{high} is empty; allowed: LOW..HIGH, LOW <= HIGH")
            values[key] = lo if lo == hi else lo + (hi - lo) * r if uniform else math.exp(math.log(lo) + math.log(hi / lo) * r)
        out.append(device(f"drawn{c}", values, f"spec {spec!r}"))
    return out


def describe(devices: list[Device]) -> dict[str, list]:
    """partition.csv's device columns."""
    return {"device": [d.name for d in devices], **{f"device_{f.name}": [getattr(d, f.name) for d in devices]
                                                      for f in fields(Device) if f.name != "name"}}
