"""What a run was made with: code version, packages, hardware and the float kernels torch picked.

A seeded run repeats bit for bit on the same code, packages and machine; elsewhere it may not: torch picks its
CPU kernels by instruction set (AVX vs AVX2 vs AVX-512) and thread count and its GPU kernels by device, and a
kernel that sums in another order rounds differently, which can send the same seed along another trajectory
that ends a seed's noise away (docs/results.md, "Reproducibility"). `training.train` writes this record as
`environment.json` next to `metrics.json`, so two runs that disagree can be told apart by what they ran on.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ("torch", "lightning", "numpy", "transformers", "peft", "deepspeed", "flwr", "hydra-core", "optuna")
REPO = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(repo: Path = REPO) -> dict[str, str | bool | None]:
    """The checkout's commit and whether tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def hardware() -> dict:
    """Processor, the CPU instruction set torch's kernels use, threads, and the CUDA devices if any."""
    info: dict = {
        "machine": platform.machine(),
        "processor": cpu_model_name() or platform.processor() or None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def cpu_model_name() -> str | None:
    """The processor's model name from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_environment() -> dict:
    """The record `training.train` writes as environment.json."""
    return {
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "packages": package_versions(),
        "hardware": hardware(),
    }


def environment_key(env: dict) -> str:
    """A short label for grouping runs by what moves a seeded run besides its config: the code commit (and
    uncommitted changes), the torch version, the CPU kernel set and thread count, the GPU kind."""
    git = env.get("git") or {}
    commit = (git.get("commit") or "no-git")[:7] + ("+dirty" if git.get("dirty") else "")
    hw = env.get("hardware") or {}
    gpus = ",".join(sorted(set(hw.get("cuda_devices") or []))) or "cpu"
    return (f"{commit}, torch {(env.get('packages') or {}).get('torch')}, "
            f"{hw.get('torch_cpu_capability')} x{hw.get('torch_threads')}, {gpus}")
