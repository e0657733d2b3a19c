"""Where the project writes caches: $LSTI_CACHE_DIR (default ~/.cache/lsti), one subfolder per kind."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = Path(os.environ.get("LSTI_CACHE_DIR") or Path.home() / ".cache" / "lsti").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
