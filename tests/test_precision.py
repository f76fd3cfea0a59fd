"""``--precision bf16``: trains like fp32, is deterministic, and the profiler measures the memory it really uses;
``auto`` picks bf16 only where it is native and measured faster, records the choice, and one grid never mixes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedbench import precision
from fedbench.cli import app
from fedbench.seeding import generator
from tests.conftest import small_run, timing_free

RESNET = dict(model="resnet20", clients=20, clients_per_round=4, rounds=2)


def one_client_loss(precision: str) -> float:
    run = small_run(precision=precision, **RESNET)
    plan = run.method.full_plan()
    return run.method.local_train(run.submodel(plan), run.client_data(0), plan, 0.05,
                                  generator(0, "client", 0, 0)).loss


def test_bf16_local_training_follows_fp32():
    """One client's 16 steps: the mean loss within 0.1 of fp32's (autocast's weight cache, kept across the
    steps of one context, froze the bf16 weights and gave 2.54 against 2.02)."""
    assert abs(one_client_loss("bf16") - one_client_loss("fp32")) < 0.1


def test_bf16_halves_measured_activations_and_learns_deterministically():
    fp32, bf16 = small_run(**RESNET), small_run(precision="bf16", **RESNET)
    assert 0.4 < bf16.ctx.full_memory / fp32.ctx.full_memory < 0.7   # activations dominate resnet20's memory
    again = small_run(precision="bf16", **RESNET)
    summary = bf16.execute()
    again.execute()
    assert timing_free(bf16.rows) == timing_free(again.rows)
    assert summary["precision"] == "bf16" and summary["final_accuracy"] > 0.4
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights and updates stay fp32


def test_precision_is_recorded_and_checked(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--model", "fedavg-cnn", "--rounds", "1", "--clients", "4",
                                      "--clients-per-round", "2", "--precision", "bf16", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert 'precision = "bf16"' in (out / "config.toml").read_text()
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"
    bad = CliRunner().invoke(app, ["run", "--precision", "fp8", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--precision" in bad.output and "bf16" in bad.output


def fake_steps(monkeypatch, flags: set[str], ms: dict[str, float]) -> list[str]:
    """A CPU with ``flags`` whose training step takes ``ms[precision]``; returns the precisions measured."""
    measured = []

    def step_seconds(build, shape, classes, batch, device, p, steps):
        measured.append(p)
        return ms[p] / 1e3

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "step_seconds", step_seconds)
    return measured


CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, ms, chosen", [
    ({"avx2"}, {"fp32": 129, "bf16": 1542}, "fp32"),               # AVX2 only: emulated, not even measured
    ({"avx512_bf16"}, {"fp32": 57, "bf16": 42}, "bf16"),           # native and measured faster
    ({"amx_bf16"}, {"fp32": 17.5, "bf16": 16.9}, "fp32"),          # native but not 10% faster
])
def test_auto_takes_bf16_only_where_native_and_measured_faster(monkeypatch, flags, ms, chosen):
    measured = fake_steps(monkeypatch, flags, ms)
    assert precision.choose("auto", None, (3, 32, 32), 10, 32, CPU) == chosen
    assert measured == ([] if flags == {"avx2"} else ["fp32", "bf16"])
    assert precision.choose("fp32", None, (3, 32, 32), 10, 32, CPU) == "fp32"


def test_bf16_on_a_cpu_that_emulates_it_warns_with_the_measured_slowdown(monkeypatch, caplog):
    fake_steps(monkeypatch, {"avx2"}, {"fp32": 129, "bf16": 1542})
    with caplog.at_level(logging.WARNING, logger="fedbench.precision"):
        assert precision.choose("bf16", None, (3, 32, 32), 10, 32, CPU) == "bf16"
    assert len(caplog.records) == 1
    assert "emulates it: a training step measured 12.0x slower than in fp32 (1542 vs 129 ms)" in caplog.text
    fake_steps(monkeypatch, {"amx_bf16"}, {"fp32": 57, "bf16": 42})
    caplog.clear()
    precision.choose("bf16", None, (3, 32, 32), 10, 32, CPU)
    assert not caplog.records


def test_step_seconds_times_a_real_step():
    build = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))  # noqa: E731
    assert 0 < precision.step_seconds(build, (3, 8, 8), 10, 4, CPU, "fp32", 2) < 1


def test_auto_is_recorded_as_chosen_and_one_grid_never_mixes(monkeypatch, tmp_path):
    fake_steps(monkeypatch, {"avx512_bf16"}, {"fp32": 57, "bf16": 42})
    out = tmp_path / "run"
    flags = ["--model", "fedavg-cnn", "--rounds", "1", "--clients", "20", "--clients-per-round", "2"]
    result = CliRunner().invoke(app, ["run", *flags, "--quiet", "--precision", "auto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert 'precision = "bf16"' in (out / "config.toml").read_text()
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"
    sweep = tmp_path / "sweep"
    grid = ["compare", "--methods", "fedavg,small", *flags, "--precision", "auto", "--out", str(sweep)]
    assert CliRunner().invoke(app, grid).exit_code == 0
    assert {Path(p).read_text().count('precision = "bf16"') for p in sweep.rglob("config.toml")} == {1}
    fake_steps(monkeypatch, {"avx512_bf16"}, {"fp32": 42, "bf16": 57})  # the measurement would now pick fp32:
    again = CliRunner().invoke(app, [*grid, "--seeds", "0,1"])         # the grid goes on in bf16
    assert again.exit_code == 0, again.output
    assert len(list(sweep.rglob("summary.json"))) == 4
    assert {Path(p).read_text().count('precision = "bf16"') for p in sweep.rglob("config.toml")} == {1}
    fake_steps(monkeypatch, {"avx512_bf16"}, {"fp32": 57, "bf16": 42})
    (tmp_path / "mixed.toml").write_text('[overrides.small]\nprecision = "fp32"\n')
    mixed = CliRunner().invoke(app, [*grid[:-2], "--out", str(tmp_path / "mixed"), "--config", str(tmp_path / "mixed.toml")])
    assert mixed.exit_code == 2 and "error: --precision: the cells of one comparison must run in one precision, " \
                                   "but they use bf16 and fp32" in mixed.output, mixed.output
    assert not (tmp_path / "mixed").exists()
