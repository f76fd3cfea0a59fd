"""The built wheel: the method plug-ins install as ``fedbench.methods`` (no top-level ``methods`` package), the
package data travels with it, the licence is an SPDX expression, and setuptools builds it without a warning."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_fedbench_methods_and_data_and_builds_without_warnings(tmp_path):
    source = tmp_path / "source"  # a copy: no stale build/ of the checkout can reach the wheel
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("fedbench", "methods"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path), "--verbose"], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    warnings = [line for line in (build.stdout + build.stderr).splitlines() if "Warning" in line]
    assert not warnings, warnings
    (wheel,) = tmp_path.glob("fedbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"fedbench", wheel.name.split("-py")[0] + ".dist-info"}
    methods = {f"fedbench/methods/{p.name}" for p in (ROOT / "methods").glob("*.py")}
    data = {f"fedbench/{p.relative_to(ROOT / 'fedbench').as_posix()}"
            for folder in ("assets", "presets") for p in (ROOT / "fedbench" / folder).rglob("*") if p.is_file()}
    assert methods and data and methods | data <= names, sorted((methods | data) - names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
