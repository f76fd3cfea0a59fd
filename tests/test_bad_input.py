"""Bad input: exit code 2, one line naming the flag, nothing written, everywhere (issue 14, section 3); and what
is not bad input but used to look like it: a budget given to a method that ignores budgets (recorded as
unbudgeted) and training that diverges (exit code 3, summary.json and the report say diverged).

Tiny runs on the synthetic data: 4 clients, 2 per round, a CNN.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedbench import compare, engine, launch, profiler
from fedbench.cli import app
from tests.conftest import Records, small_run

TINY = ["--dataset", "synthetic", "--model", "fedavg-cnn", "--clients", "4", "--clients-per-round", "2", "--rounds", "1",
        "--device", "cpu", "--quiet"]


def fedbench(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *words: str) -> str:
    """Exit code 2 and one line on the terminal that holds ``words`` (the flag first)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {words[0]}") and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("args, flag, allowed", [
    (["--seed", "-1"], "--seed", ">= 0"),
    (["--seed", "1e20"], "--seed", "an integer"),
    (["--seed", str(2**64)], "--seed", "<= 4294967295"),
    (["--lr", "1e308"], "--lr", "<= 100"),
    (["--lr", "inf"], "--lr", "finite"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--lr", "abc"], "--lr", "a number"),
    (["--weight-decay", "inf"], "--weight-decay", "finite"),
    (["--momentum", "1"], "--momentum", "< 1"),
    (["--rounds", "1e23"], "--rounds", "an integer"),
    (["--rounds", str(10**23)], "--rounds", "<= 1000000"),
    (["--clients", str(10**8)], "--clients", "<= 10000000"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--processes", "0"], "--processes", "auto or an integer >= 1"),
    (["--processes", "two"], "--processes", "auto or an integer >= 1"),
    (["--local-epochs", str(10**9)], "--local-epochs", "<= 10000"),
    (["--augment", "flip"], "--augment", "auto, none, crop-flip"),
    (["--method", "fedepth", "--distill-temperature", "0"], "--distill-temperature", "> 0"),
    (["--method", "mfedepth", "--distill-temperature", "inf"], "--distill-temperature", "finite"),
    (["--method", "fedepth", "--distill-weight", "-1"], "--distill-weight", ">= 0"),
    (["--method", "fedepth", "--distill", "maybe"], "--distill", "true or false"),
    (["--method", "fedssl", "--tau", "nan"], "--tau", "finite"),
    (["--method", "fedssl", "--ema", "1"], "--ema", "< 1"),
    (["--method", "fedssl", "--optimizer", "adam"], "--optimizer", "adamw, sgd"),
    (["--method", "lw-fedssl", "--probe-epochs", str(10**12)], "--probe-epochs", "<= 10000"),
    (["--method", "heterofl", "--variant", "bogus"], "--variant", "paper, fedrolex-code, slt"),
    (["--method", "slt", "--slt-memory-model", "guess"], "--slt-memory-model", "measured, paper"),
    (["--method", "fedavg", "--variant", "slt"], "--variant", "not an option of method 'fedavg'"),
    (["--method", "fll-dd", "--depth-budget", "-2"], "--depth-budget", ">= 0"),
    (["--model", "vit-tiny", "--depth", "x"], "--depth", "an integer"),
])
def test_out_of_range_and_mistyped_flags(args, flag, allowed, tmp_path):
    refused(fedbench("run", *TINY, *args, "--out", tmp_path / "out"), flag, allowed)
    assert nothing_under(tmp_path)


@pytest.mark.parametrize("toml, flag, allowed", [
    ('lr = "abc"', "--lr", "'abc' is not a number"),
    ('momentum = "0.5"', "--momentum", "'0.5' is not a number"),
    ("partition = 5", "--partition", "5 is not a string"),
    ('dataset = ["fmnist-mini", "synthetic"]', "--dataset", "is not a string"),
    ("rounds = 2.5", "--rounds", "is not an integer"),
    (f"rounds = {10**23}", "--rounds", "<= 1000000"),
    ("quiet = 1", "--quiet", "true or false"),
    ('method = "fedepth"\ndistill-temperature = 0', "--distill-temperature", "> 0"),
    ('method = "fedepth"\ndistill = "yes"', "--distill", "true or false"),
    ("options = 3", "--config", "must be a table"),
])
def test_wrong_toml_types_name_the_key(toml, flag, allowed, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(toml + "\n")
    refused(fedbench("run", "--config", config, "--out", tmp_path / "out"), flag, allowed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["run", "--out", "OUT"], ["profile"], ["compare", "--methods", "fedavg", "--out", "OUT"]])
@pytest.mark.parametrize("damage, allowed", [
    (lambda path: path.mkdir(), "(Is a directory); allowed: a TOML file"),
    (lambda path: path.write_bytes('lr = 0.1 # "lr" in Latin-1: \xb5\n'.encode("latin-1")), "is not UTF-8 text"),
])
def test_config_that_is_a_folder_or_not_utf8_is_refused(command, damage, allowed, tmp_path):
    config = tmp_path / "run.toml"
    damage(config)
    command = [tmp_path / "out" if a == "OUT" else a for a in command]
    refused(fedbench(*command, *TINY[:4], "--config", config), "--config", str(config), allowed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, toml", [
    (["run", *TINY], ""), (["compare", "--methods", "fedavg", *TINY[:-1]], ""),
    (["compare", "--methods", "fedavg", *TINY[:-1]], "out = 42"),
])
def test_out_that_is_no_folder_path_is_refused(command, toml, tmp_path, monkeypatch):
    """--out '' (once taken as no --out: the run went to ./results/runs/, the sweep to .), or a sweep TOML's out = 42."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.toml").write_text(toml + "\n")
    args = ["--config", "sweep.toml"] if toml else ["--out", ""]
    refused(fedbench(*command, *args), "--out", "allowed: a folder path")
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.toml"]


@pytest.mark.parametrize("toml, flag", [
    ("lr = []", "--lr"), ("memory-budget = []", "--memory-budget"), ("seeds = []", "--seeds"), ("methods = []", "--methods"),
])
def test_empty_sweep_axis_names_its_key(toml, flag, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(toml + "\n")
    args = ["--config", sweep] + ([] if flag == "--methods" else ["--methods", "fedavg"])
    refused(fedbench("compare", *args, *TINY[:-1], "--out", tmp_path / "out"), flag, "an empty list ([]) sweeps nothing",
            "allowed: a non-empty list")
    assert not (tmp_path / "out").exists()


def test_out_that_cannot_be_written_is_refused_before_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "prepare", lambda *a, **k: pytest.fail("set up before --out was checked"))
    afile = tmp_path / "[red]file"  # user text printed as given, not as rich markup
    afile.write_text("x")
    refused(fedbench("run", *TINY, "--out", afile), "--out", f"{afile} is a file")
    refused(fedbench("run", *TINY, "--out", afile / "sub"), "--out", f"{afile} is a file, so {afile / 'sub'}")
    if Path("/proc").is_dir():  # not writable, even as root
        refused(fedbench("run", *TINY, "--out", "/proc/fedbench-run"), "--out", "cannot write")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(fedbench("run", *TINY, "--out", locked / "run"), "--out", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["[red]file"] + (["locked"] if os.geteuid() else []))


def test_profile_csv_that_cannot_be_written_is_refused_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: pytest.fail("measured before --csv was checked"))
    refused(fedbench("profile", "--dataset", "synthetic", "--model", "fedavg-cnn", "--csv", tmp_path), "--csv", "is a folder")
    afile = tmp_path / "file"
    afile.write_text("x")
    refused(fedbench("profile", "--dataset", "synthetic", "--model", "fedavg-cnn", "--csv", afile / "p.csv"), "--csv",
            f"{afile} is a file")
    if Path("/proc").is_dir():
        refused(fedbench("profile", "--dataset", "synthetic", "--model", "fedavg-cnn", "--csv", "/proc/p.csv"), "--csv",
                "cannot write")


def image_folder(root: Path, damage=None, empty: str | None = None) -> Path:
    """root/train|test/{a,b}/*.png (16x16 RGB noise); ``damage(path)`` spoils train/a/1.png; class ``empty`` gets no
    train images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(0 if (split, label) == ("train", empty) else 12):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if damage:
        damage(root / "train" / "a" / "1.png")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])  # the header intact, the pixels cut short


def scramble(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:60] + bytes(range(256)) * 2 + data[572:])  # the header intact, the pixels garbage


@pytest.mark.parametrize("damage, words", [
    (truncate, ["train/a/1.png", "truncated"]),
    (scramble, ["train/a/1.png", "cannot read"]),
    (None, ["class 'b' has no", "train/b"]),
])
def test_broken_image_folder_names_the_file_or_the_class(damage, words, tmp_path):
    root = image_folder(tmp_path / "images", damage, empty=None if damage else "b")
    before = sorted(root.rglob("*"))
    refused(fedbench("run", "--dataset", f"imagefolder:{root}", "--clients", "2", "--clients-per-round", "2",
                     "--rounds", "1", "--out", tmp_path / "out", "--quiet"), "--dataset", *words)
    assert sorted(root.rglob("*")) == before and not (tmp_path / "out").exists()  # no cache, no run folder


def test_user_text_is_printed_as_given_not_as_markup(tmp_path):
    refused(fedbench("run", "--method", "[/x]", "--out", tmp_path / "out"), "--method", "unknown method '[/x]'")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("overrides = 3\n")
    refused(fedbench("compare", "--methods", "fedavg", "--config", sweep, "--out", tmp_path / "out"), "--config",
            "[overrides.METHOD]")
    refused(fedbench("run", "--bogus-[b]", "1", "--out", tmp_path / "out"), "--bogus-[b]", "not an option")
    assert not (tmp_path / "out").exists()


def test_batch_that_cannot_fit_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    """Estimated from two tiny steps, linear in the batch: 10^7 images of the CNN need far more than any host has."""
    csv = tmp_path / "p.csv"
    line = refused(fedbench("profile", "--dataset", "synthetic", "--model", "fedavg-cnn", "--batch-size", "10000000",
                            "--device", "cpu", "--csv", csv), "--batch-size", "GB", "allowed: up to about")
    assert not csv.exists()
    allowed = int(line.rsplit(" ", 1)[1])
    monkeypatch.setattr(profiler, "available_memory", lambda device: 1e6)  # 1 MB free: batch 32 no longer fits
    refused(fedbench("profile", "--dataset", "synthetic", "--model", "fedavg-cnn", "--batch-size", "32", "--csv", csv),
            "--batch-size", "32 needs about")
    assert not csv.exists() and allowed > 32


def test_profiler_measures_the_batch_a_client_really_uses():
    """min(batch size, the client's samples): a batch beyond every client's data costs what its clients use."""
    huge = small_run(batch_size=1_000_000, partition="dirichlet:0.5", rounds=1)
    sizes = [len(p) for p in huge.parts]
    assert huge.profiler.batch_size == max(sizes) < 1_000_000
    assert huge.ctx.full_memory == small_run(batch_size=max(sizes), partition="dirichlet:0.5").ctx.full_memory
    records = Records()
    huge.execute([records])
    plan = huge.method.full_plan()
    for r in records.clients:
        assert r["peak_bytes"] == huge.profiler.measure(plan, 0, sizes[r["client"]]).peak
    assert huge.profiler.measure(plan, 0, min(sizes)).peak < huge.ctx.full_memory


def test_budget_given_to_a_method_that_ignores_budgets_is_recorded_unbudgeted(tmp_path):
    out = tmp_path / "sweep" / "fedssl"
    result = fedbench("run", "--method", "fedssl", "--memory-budget", "0.25", *TINY, "--model", "vit-tiny",
                      "--depth", "2", "--probe-epochs", "1", "--batch-size", "8", "--out", out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "fedssl" in warnings[0] and "unbudgeted" in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    clients = pd.read_csv(out / "clients.csv")
    assert summary["unbudgeted"] is True and summary["violations"] == 0 and clients["within_budget"].all()
    assert (clients["peak_bytes"] > clients["budget_bytes"]).all()  # the end-to-end model: 4x the budget
    assert fedbench("report", tmp_path / "sweep").exit_code == 0
    memory = pd.read_csv(tmp_path / "sweep/report/memory.csv", index_col="method", dtype=str)
    ssl = pd.read_csv(tmp_path / "sweep/report/accuracy_ssl.csv", index_col="method", dtype=str)
    assert memory.loc["fedssl", "0.25"].endswith("(unbudgeted)") and "!" not in ssl.loc["fedssl", "0.25"]


def test_divergence_stops_the_run_with_exit_code_3(tmp_path):
    out = tmp_path / "sweep" / "run"
    result = fedbench("run", *TINY, "--rounds", "3", "--lr", "100", "--out", out)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 3 and len(lines) == 1 and "diverged" in lines[0] and "round 1" in lines[0], result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_round"] == 1 and summary["rounds"] == 1
    assert len(pd.read_csv(out / "rounds.csv")) == 1
    assert fedbench("report", tmp_path / "sweep").exit_code == 0
    accuracy = pd.read_csv(tmp_path / "sweep/report/accuracy.csv", index_col="method", dtype=str)
    assert accuracy.loc["fedavg", "1"] == "diverged"


def test_compare_finishes_a_diverged_cell_and_does_not_rerun_it(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("lr = [100.0, 0.05]\n")
    args = ["compare", "--methods", "fedavg", "--config", sweep, *TINY[:-1], "--out", tmp_path / "out"]
    assert fedbench(*args).exit_code == 0
    accuracy = pd.read_csv(tmp_path / "out/report/accuracy.csv", index_col="method", dtype=str)
    assert accuracy.loc["fedavg lr=100.0", "1"] == "diverged" and accuracy.loc["fedavg lr=0.05", "1"][0].isdigit()
    ran = []
    monkeypatch.setattr(compare, "run_cell", lambda cell: ran.append(cell.name))
    result = fedbench(*args)
    assert result.exit_code == 0 and ran == [] and "2 already finished" in result.output
