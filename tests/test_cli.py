"""CLI contract: bad input gets one line naming the flag, exit code 2, and nothing written."""
from __future__ import annotations

from urllib.error import URLError

import pytest
import torchvision
from typer.testing import CliRunner

from fedbench.cli import app

runner = CliRunner()


def invoke(args, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--out", str(out), "--quiet"])
    return result, out


@pytest.mark.parametrize("args, flag, allowed", [
    (["run", "--method", "nope"], "--method", "fedavg"),
    (["run", "--memory-budget", "-1"], "--memory-budget", "positive number"),
    (["run", "--memory-budget", "abc"], "--memory-budget", "positive number"),
    (["run", "--memory-budget", "0"], "--memory-budget", "positive number"),
    (["run", "--model", "vgg99"], "--model", "resnet20"),
    (["run", "--dataset", "imagenet"], "--dataset", "cifar10"),
    (["run", "--clients", "5", "--clients-per-round", "6"], "--clients-per-round", "1..5"),
    (["run", "--partition", "dirichlet:-1"], "--partition", "dirichlet:ALPHA"),
    (["run", "--partition", "shards:x"], "--partition", "shards:K"),
    (["run", "--clients", "5000"], "--partition", "5000"),
    (["run", "--lr-schedule", "step"], "--lr-schedule", "cosine"),
    (["run", "--lr-schedule", "cosine", "--lr-floor", "1"], "--lr-floor", ">= 0 and < 1"),
    (["run", "--lr-floor", "0.1"], "--lr-floor", "allowed with --lr-schedule const: 0"),
    (["run", "--device", "tpu"], "--device", "auto, cpu, cuda"),
    (["run", "--client-batching", "yes"], "--client-batching", "auto, on, off"),
    (["run", "--bogus-option", "3"], "--bogus-option", "allowed"),
    (["run", "--method", "small", "--memory-budget", "0.0001"], "--memory-budget", "allowed: budgets >="),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, flag, allowed, tmp_path):
    result, out = invoke(args, tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and allowed in lines[0], result.output
    assert not out.exists()


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    result, out = invoke(["run", "--config", str(bad)], tmp_path)
    assert result.exit_code == 2 and "--config" in result.output and "malformed TOML" in result.output
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3\n")
    result, out = invoke(["run", "--config", str(unknown)], tmp_path)
    assert result.exit_code == 2 and "--roundz" in result.output and not out.exists()


def test_missing_dataset_offline_names_the_data_dir(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torchvision.datasets.utils, "urlretrieve", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: offline())
    result, out = invoke(["run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")], tmp_path)
    assert result.exit_code == 2 and "--data-dir" in result.output, result.output
    assert not out.exists()


def test_methods_lists_every_method_with_its_paper():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "fedavg" in result.output and "McMahan" in result.output and "small" in result.output


def test_profile_works_offline_for_a_dataset_it_does_not_have(tmp_path):
    result = runner.invoke(app, ["profile", "--model", "resnet20", "--dataset", "cifar10",
                                 "--data-dir", str(tmp_path / "none"), "--batch-size", "32", "--csv",
                                 str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    import pandas as pd
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert row["of_full"] == 1.0 and abs(row["peak_MB"] - 53.4) < 1.0  # 50.97 MiB (profiling.md §2.3)


def test_profile_shows_budgets_below_the_floor_as_infeasible_rows_beside_those_that_fit(tmp_path):
    """Issue 30: profile prints every budget, one below fedepth's measured floor as a row 'infeasible (floor X)'
    (in the CSV with the floor); only when every budget is below it, one line and exit 2 as ``run``."""
    import pandas as pd
    args = ["profile", "--method", "fedepth", "--dataset", "synthetic", "--model", "fedavg-cnn", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--memory-budget", "0.5,0.9,1", "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "p.csv")
    below = rows[rows["floor"].notna()]
    floor = below["floor"].iloc[0]
    assert list(below["budget"]) == [0.5] and 0.5 < floor < 0.9 and below["peak_MB"].isna().all()
    assert list(below["config"]) == [f"infeasible (floor {floor:.3f})"] and below["config"].iloc[0] in result.output
    fit = rows.iloc[len(below) + 1:]
    assert list(fit["budget"]) == [0.9, 1.0] and fit["fits"].all() and (fit["peak_MB"] > 0).all()
    result = runner.invoke(app, [*args, "--memory-budget", "0.3,0.5", "--csv", str(tmp_path / "q.csv")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--memory-budget" in lines[0] and f"budgets >= {floor:.3f}" in lines[0] and not (tmp_path / "q.csv").exists()
