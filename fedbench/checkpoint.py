"""Checkpoints every ``--checkpoint-every`` rounds (atomic), and ``--resume`` from one.

Randomness is a function of (seed, round, client), so a run resumed from round r draws
exactly what the uninterrupted run drew: the resumed ``rounds.csv`` matches row for row.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import torch

from fedbench.engine import Observer, Run
from fedbench.errors import ConfigError

CHECKPOINT = "checkpoint.pt"


class Checkpointer(Observer):
    def __init__(self, out: Path, every: int):
        self.path = Path(out) / CHECKPOINT
        self.every = every

    def after_round(self, run: Run, row: dict, clients: list[dict]) -> None:
        if (self.every and row["round"] % self.every == 0) or row["round"] == run.config.rounds:
            tmp = self.path.with_suffix(".pt.tmp")
            torch.save(run.state_dict(), tmp)
            os.replace(tmp, self.path)


def read_rows(folder: Path) -> list[dict]:
    path = folder / "rounds.csv"
    if not path.exists():
        return []
    rows = pd.read_csv(path).to_dict("records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def restore(run: Run, folder: Path) -> None:
    """Load the folder's checkpoint into a prepared run (same config); raise if there is none."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        raise ConfigError("--resume", f"no {CHECKPOINT} in {folder}; only runs with a checkpoint can be resumed")
    state = torch.load(path, weights_only=True, map_location=run.ctx.device)
    run.load_state_dict(state, read_rows(Path(folder)))
