"""Where a result came from (summary.json's ``provenance``): fedbench and its source commit, torch,
Python, the device and the command line."""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version as distribution_version
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[1]  # the folder holding the fedbench package


def version() -> str:
    """fedbench's version from the installed distribution's metadata."""
    try:
        return distribution_version("fedbench")
    except PackageNotFoundError:
        return "unknown"


@cache
def git_commit() -> str | None:
    """The commit of the git checkout fedbench runs from, with ``-dirty`` when tracked files changed;
    None when fedbench is not run from a git checkout of its own (installed, unpacked) or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != SOURCE:  # e.g. site-packages inside another repo
            return None
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (``/proc/cpuinfo``, else what ``platform`` knows)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device) -> dict[str, str | None]:
    return {"fedbench_version": version(), "git_commit": git_commit(), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "device_name": device_name(device),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
