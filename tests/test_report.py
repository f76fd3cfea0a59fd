"""``fedbench report`` on a grid of several seeds, from the small files a results folder keeps (config.toml,
rounds.csv, summary.json; no clients.csv): mean ± std, the best cell and the cells below it in every paired seed,
the pairwise table, the gain over the last 50 rounds and the band over seeds in the round plot.

The run folders are written by hand, so every expected number is known: three methods x seeds 0-2 at budget 0.25,
60 rounds, evaluated every 10 rounds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.axes import Axes
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.config import RunConfig
from fedbench.observers import to_toml
from fedbench.records import Round, Summary

ROUNDS = 60
FINAL = {"fedavg": [0.60, 0.62, 0.61],    # the best mean
         "heterofl": [0.50, 0.52, 0.51],  # below fedavg in every seed
         "small": [0.55, 0.63, 0.50]}     # below it on average, above it in seed 1
GAIN = {"fedavg": 0.10, "heterofl": 0.0, "small": 0.02}  # final minus round 10's accuracy


def write_run(folder: Path, method: str, seed: int, final: float, gain: float, rollups: bool = True,
              budget: float = 0.25, initial: float | None = None) -> None:
    """A finished run's config.toml, rounds.csv and summary.json: accuracy rising linearly to ``final`` (by ``gain``
    over the last 50 rounds), one client of 10 left out each round."""
    folder.mkdir(parents=True)
    cfg = RunConfig(method=method, dataset="cifar10", model="resnet20", memory_budget=(budget,), rounds=ROUNDS,
                    eval_every=10, seed=seed, out=str(folder))
    (folder / "config.toml").write_text(to_toml(cfg.settings()))
    rows = [Round(round=r, accuracy=final - gain * (ROUNDS - r) / 50 if r % 10 == 0 else None, loss=None,
                  train_loss=1.0, lr=0.05, bytes_down=1000, bytes_up=1000, train_flops=10**9, peak_max=2 * 10**6,
                  peak_mean=2e6, of_budget_max=0.9, violations=0, clients=10, trained=9, dropped=0,
                  wall_s=1.0).row() for r in range(1, ROUNDS + 1)]
    pd.DataFrame(rows).to_csv(folder / "rounds.csv", index=False)
    summary = Summary(method=method, model="resnet20", dataset="cifar10", seed=seed, memory_budget=[budget],
                      budget_fractions=[budget], rounds=ROUNDS, status="ok", diverged_round=None, unbudgeted=False,
                      final_accuracy=final, best_accuracy=final, evaluation="top-1", notes=[], warnings=[],
                      full_model_memory_bytes=8 * 10**6, peak_max_bytes=2 * 10**6, of_budget_max=0.9, violations=0,
                      client_rounds=10 * ROUNDS, excluded_client_rounds=ROUNDS, dropped_client_rounds=0,
                      over_budget="record", train_flops_per_client_round=1e9, bytes_down_per_client_round=1000.0,
                      bytes_up_per_client_round=1000.0, forward_macs_per_sample=10**7, device="cpu", precision="fp32",
                      processes=1, wall_s=60.0, provenance={}).row()
    if initial is not None:  # --eval-initial
        summary["initial_accuracy"] = initial
    if not rollups:  # as an older fedbench wrote it
        del summary["of_budget_max"], summary["budget_fractions"]
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, int]:
    """The fake grid and its report; returns the root and how many bands the plots drew."""
    root = tmp_path_factory.mktemp("grid")
    for method, finals in FINAL.items():
        for seed, final in enumerate(finals):
            write_run(root / method / "b0.25" / f"s{seed}", method, seed, final, GAIN[method])
    for seed in range(3):  # a column of one cell: nothing to rank
        write_run(root / "fedavg" / "b1" / f"s{seed}", "fedavg", seed, 0.7, 0.0, budget=1.0)
    bands = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Axes, "fill_between", lambda self, *a, original=Axes.fill_between, **k:
                   bands.append(self.get_xlabel()) or original(self, *a, **k))
        result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    return root, len(bands)


def test_mean_std_and_paired_marks(grid):
    root, _ = grid
    accuracy = pd.read_csv(root / "report/accuracy.csv", index_col="method", dtype=str)["0.25"]
    std = {m: pd.Series(v).std() for m, v in FINAL.items()}
    assert accuracy["fedavg"] == f"0.6100 ± {std['fedavg']:.4f} ▲"
    assert accuracy["heterofl"] == f"0.5100 ± {std['heterofl']:.4f} ▼"  # below the best in 3 of 3 seeds
    assert accuracy["small"] == f"0.5600 ± {std['small']:.4f}"          # above it in seed 1: no mark
    alone = pd.read_csv(root / "report/accuracy.csv", index_col="method", dtype=str)["1"]
    assert alone["fedavg"] == "0.7000 ± 0.0000" and "budget 1," not in (root / "report/report.md").read_text()
    md = (root / "report/report.md").read_text()  # every table title states the protocol
    assert "; resnet20 on cifar10; 60 rounds, 3 seeds, evaluated every 10 rounds and after the last, fp32, cpu\n" in md
    runs = pd.read_csv(root / "report/runs.csv")
    assert len(runs) == 12 and (runs["status"] == "ok").all() and runs["peak_of_budget"].eq(0.9).all()
    assert runs["left_out"].eq(0.1).all()  # one sampled client-round in 10, from summary.json


def test_pairwise_table_counts_seeds_and_mean_difference(grid):
    root, _ = grid
    pairs = pd.read_csv(root / "report/pairwise.csv").set_index(["a", "b"])
    assert len(pairs) == 6 and pairs["seeds"].eq(3).all()
    assert pairs.loc[("fedavg", "small"), "wins"] == 2
    assert pairs.loc[("small", "fedavg"), "wins"] == 1
    assert pairs.loc[("fedavg", "heterofl"), "wins"] == 3
    assert pairs.loc[("fedavg", "small"), "mean_diff"] == pytest.approx(0.05)
    assert pairs.loc[("heterofl", "small"), "mean_diff"] == pytest.approx(-0.05)
    md = (root / "report/report.md").read_text()
    assert "## Ranking at resnet20, budget 0.25, 3 seeds" in md
    assert "| heterofl | 0.5100 ± 0.0100 ▼ | 3 | below in 3/3 seeds, -0.1000 | +0.0000 |" in md
    assert "| small | " in md and "below in 2/3 seeds, -0.0500 | +0.0200 |" in md
    assert "| fedavg | 2/3, +0.0500 | 3/3, +0.1000 | - |" not in md  # rows and columns in ranking order:
    assert "| fedavg | - | 2/3, +0.0500 | 3/3, +0.1000 |" in md


def test_gain_over_the_last_50_rounds_and_the_band(grid):
    root, bands = grid
    gain = pd.read_csv(root / "report/gain.csv", index_col="method", dtype=str)["0.25"]
    assert gain.to_dict() == {m: f"{g:+.4f}" for m, g in GAIN.items()}
    assert bands == 2 * (len(FINAL) + 1)  # one band per row and budget in the round and in the MB plot
    assert (root / "report/accuracy_vs_round.png").read_bytes().startswith(b"\x89PNG")


def test_untrained_evaluation_is_compared_seed_by_seed(tmp_path):
    """With --eval-initial the cell names the untrained mean and in how many seeds training beat its own seed's."""
    for seed, (final, initial) in enumerate(zip(FINAL["fedavg"], [0.55, 0.65, 0.50])):
        write_run(tmp_path / "fedavg" / "b0.25" / f"s{seed}", "fedavg", seed, final, 0.1, initial=initial)
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 0
    accuracy = pd.read_csv(tmp_path / "report/accuracy.csv", index_col="method", dtype=str)["0.25"]
    assert accuracy["fedavg"] == "0.6100 ± 0.0100 (untrained 0.5667, above it in 2/3)"


def test_a_folder_without_clients_csv_or_rollups_is_named_corrupt(tmp_path):
    write_run(tmp_path / "fedavg/b0.25/s0", "fedavg", 0, 0.6, 0.1, rollups=False)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "report/runs.csv")
    assert runs["status"].tolist() == ["corrupt"]
    assert runs["problem"][0].startswith("summary.json lacks of_budget_max and budget_fractions")
