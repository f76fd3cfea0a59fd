"""``fedbench --version``, summary.json's provenance and ``-v`` logging."""
from __future__ import annotations

import json
import platform
import re
import shlex
import shutil
import sys
from importlib.metadata import version

import pytest
import torch
from typer.testing import CliRunner

from fedbench import provenance
from fedbench.cli import app, configure_logging
from fedbench.config import tomllib  # tomli on Python 3.10

runner = CliRunner()
# 100 clients over fmnist-mini at dirichlet:0.05: no draw gives each 10 samples, so the partition logs a top-up (INFO)
TINY = ["--clients", "100", "--clients-per-round", "2", "--rounds", "1", "--partition", "dirichlet:0.05", "--quiet"]
TOP_UP = "INFO fedbench.partition: dirichlet: no draw gave every client 10 samples"


@pytest.fixture
def default_logging():
    yield
    configure_logging(0)


def test_version_is_the_package_metadata_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == version("fedbench") + "\n"


def test_summary_records_provenance(tmp_path, monkeypatch):
    argv = ["fedbench", "run", *TINY, "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    result = runner.invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert TOP_UP not in result.output  # INFO is off without -v
    found = json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"]
    expected = {"fedbench_version": version("fedbench"), "torch_version": torch.__version__,
                "python_version": platform.python_version(), "command": shlex.join(argv)}
    assert {k: found[k] for k in expected} == expected
    assert found["device_name"]
    in_checkout = shutil.which("git") and (provenance.SOURCE / ".git").exists()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", found["git_commit"]) if in_checkout else found["git_commit"] is None


def test_git_commit_is_none_outside_a_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() is None
    finally:
        provenance.git_commit.cache_clear()


def test_verbose_shows_fedbench_logs(tmp_path, default_logging):
    result = runner.invoke(app, ["-v", "run", *TINY, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert TOP_UP in result.output


def test_license_and_citation_match_pyproject():
    root = provenance.SOURCE
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (root / "LICENSE").read_text().startswith("MIT License\n")
    citation = (root / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", citation, re.M) and re.search(r"^title: fedbench$", citation, re.M)
    assert re.search(r"^version: (\S+)$", citation, re.M).group(1) == project["version"] == version("fedbench")
