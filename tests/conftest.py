"""Shared fixtures: every test writes its caches under a temporary LSTI_CACHE_DIR."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LSTI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lsti-cache"))


def make_interactions(num_users: int = 30, num_items: int = 40, seed: int = 0, min_len: int = 3,
                      max_len: int = 25) -> pd.DataFrame:
    """Small random log with string ids and integer timestamps (some ties)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, num_users)
    users = np.repeat(np.arange(num_users), lengths)
    items = rng.integers(0, num_items, lengths.sum())
    times = rng.integers(0, 10_000, lengths.sum())
    return pd.DataFrame({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items],
                         "time": times.astype(np.int64)})


@pytest.fixture
def interactions() -> pd.DataFrame:
    return make_interactions()
