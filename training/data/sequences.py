"""Interaction frame -> chronological per-user sequences stored as flat arrays (offsets + values).

Everything downstream (batches, evaluation, federated partitions, serving) slices these arrays; no
per-sample Python objects exist. The result is cached on disk under a key of the inputs and settings,
so a second run skips preprocessing entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from training.data.errors import DataError

CACHE_FORMAT = 1


@dataclass
class PreprocessConfig:
    """How raw interactions become sequences and splits.

    rating_threshold: keep rows with rating >= threshold (None: all interactions, implicit feedback).
    k_core: iteratively drop users and items with fewer than k interactions (0: off).
    split: "loo" (leave-one-out by time: last event test, second-last valid) or "temporal" (global
    time cut-offs at the quantiles given by valid_fraction/test_fraction of all events).
    cold_user_fraction: hold this share of users out of training and validation entirely (new-user study,
    "strong generalisation"). Each held-out user becomes queries in the `cold_users` split: every event at
    positions 1..cold_user_max_history, predicted from the events before it, as a new user who has just
    started. With loo, the remaining users keep their usual validation and test events.
    """

    rating_threshold: float | None = None
    k_core: int = 0
    split: str = "loo"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    cold_item_fraction: float = 0.0  # hold this share of items out of training entirely (cold-start study)
    cold_item_seed: int = 0
    cold_user_fraction: float = 0.0
    cold_user_seed: int = 0
    cold_user_max_history: int = 20

    def __post_init__(self) -> None:
        if self.split not in ("loo", "temporal"):
            raise DataError(f"data.preprocess.split={self.split!r}: use 'loo' or 'temporal'.")
        if self.k_core < 0:
            raise DataError(f"data.preprocess.k_core={self.k_core}: must be >= 0 (0 disables the filter).")
        if not 0 <= self.cold_item_fraction < 1:
            raise DataError(f"data.preprocess.cold_item_fraction={self.cold_item_fraction} must be in [0, 1).")
        if self.cold_item_fraction and self.split != "loo":
            raise DataError("data.preprocess.cold_item_fraction needs split=loo (cold items are kept as test targets).")
        if not 0 <= self.cold_user_fraction < 1:
            raise DataError(f"data.preprocess.cold_user_fraction={self.cold_user_fraction} must be in [0, 1).")
        if self.cold_user_fraction and self.split != "loo":
            raise DataError("data.preprocess.cold_user_fraction needs split=loo (the temporal split already has "
                            "its own new users: those whose events all come after the validation cut-off).")
        if self.cold_user_max_history < 1:
            raise DataError(f"data.preprocess.cold_user_max_history={self.cold_user_max_history}: must be >= 1 "
                            "(the longest history a held-out user is evaluated with).")
        if self.split == "temporal" and not (
            0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1
            and self.valid_fraction + self.test_fraction < 1
        ):
            raise DataError(
                "data.preprocess.valid_fraction/test_fraction must be in (0, 1) and sum to < 1, got "
                f"{self.valid_fraction}/{self.test_fraction}."
            )


@dataclass
class EvalSplit:
    """Evaluation queries: the target is event `pos[q]` of user `user[q]`; history is what came before."""

    user: np.ndarray
    pos: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])


def _empty_split() -> EvalSplit:
    return EvalSplit(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


@dataclass
class SequenceData:
    """Chronological sequences of all users as flat arrays (see docs/architecture.md)."""

    offsets: np.ndarray  # int64 [U+1]
    items: np.ndarray  # int64 [E], 1..N
    times: np.ndarray  # int64 [E]
    train_end: np.ndarray  # int64 [U]
    valid: EvalSplit
    test: EvalSplit
    user_ids: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [N+1], item_ids[0] = "<pad>"
    stats: dict = field(default_factory=dict)
    # held-out users' queries (PreprocessConfig.cold_user_fraction); empty without them
    cold_users: EvalSplit = field(default_factory=_empty_split)

    @property
    def num_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0] - 1)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def train_item_counts(self) -> np.ndarray:
        """Popularity of each item over training events only (no leakage from valid/test)."""
        starts = self.offsets[:-1]
        event_user = np.repeat(np.arange(self.num_users), self.lengths)
        in_train = (np.arange(self.items.shape[0]) - starts[event_user]) < self.train_end[event_user]
        return np.bincount(self.items[in_train], minlength=self.num_items + 1).astype(np.int64)

    def save(self, path: Path) -> None:
        """Write atomically: a run killed mid-write never leaves a truncated cache behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        np.savez(
            tmp, offsets=self.offsets, items=self.items, times=self.times, train_end=self.train_end,
            valid_user=self.valid.user, valid_pos=self.valid.pos, test_user=self.test.user,
            test_pos=self.test.pos, cold_user=self.cold_users.user, cold_pos=self.cold_users.pos, user_ids=self.user_ids,
            item_ids=self.item_ids, stats=np.array(json.dumps(self.stats)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SequenceData:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                offsets=z["offsets"], items=z["items"], times=z["times"], train_end=z["train_end"],
                valid=EvalSplit(z["valid_user"], z["valid_pos"]), test=EvalSplit(z["test_user"], z["test_pos"]),
                user_ids=z["user_ids"], item_ids=z["item_ids"], stats=json.loads(str(z["stats"])),
                cold_users=EvalSplit(z["cold_user"], z["cold_pos"]) if "cold_user" in z.files else _empty_split(),
            )

    def subset_users(self, users: np.ndarray) -> SequenceData:
        """The same catalogue restricted to some users (a federated client's local data)."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.lengths[users]
        offsets = np.zeros(users.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = _ranges(self.offsets[users], lengths)
        remap = np.full(self.num_users, -1, dtype=np.int64)
        remap[users] = np.arange(users.shape[0])

        def split(s: EvalSplit) -> EvalSplit:
            keep = remap[s.user] >= 0
            return EvalSplit(remap[s.user[keep]], s.pos[keep])

        return SequenceData(
            offsets=offsets, items=self.items[gather], times=self.times[gather],
            train_end=self.train_end[users], valid=split(self.valid), test=split(self.test),
            user_ids=self.user_ids[users], item_ids=self.item_ids, stats=dict(self.stats), cold_users=split(self.cold_users),
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - row_start)


def _k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask of the k-core: repeat dropping rare users/items until nothing changes."""
    keep = np.ones(users.shape[0], dtype=bool)
    while True:
        u_count = np.bincount(users[keep], minlength=users.max() + 1)
        i_count = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def build_sequences(interactions: pd.DataFrame, config: PreprocessConfig, source: str = "interactions") -> SequenceData:
    """Filter, order, remap and split. `source` names the data in error messages."""
    for column in ("user", "item", "time"):
        if column not in interactions.columns:
            raise DataError(f"{source}: normalised interactions lack column {column!r} (reader bug or bad mapping).")
    n_raw = len(interactions)
    if n_raw == 0:
        raise DataError(f"{source}: no interactions to train on (the file has no rows).")
    stats: dict = {"raw_interactions": n_raw, "dropped": {}}
    frame = interactions
    if config.rating_threshold is not None:
        if "rating" not in frame.columns:
            raise DataError(
                f"{source}: data.preprocess.rating_threshold={config.rating_threshold} needs a rating column; "
                "map one in data.source.columns.rating or set rating_threshold=null."
            )
        keep = frame["rating"].to_numpy() >= config.rating_threshold
        stats["dropped"]["rating_below_threshold"] = int((~keep).sum())
        frame = frame.loc[keep]

    user_codes, user_ids = pd.factorize(frame["user"], sort=True)
    item_codes, item_ids = pd.factorize(frame["item"], sort=True)
    times = frame["time"].to_numpy(dtype=np.int64)
    if config.k_core > 1 and len(frame):
        keep = _k_core(user_codes, item_codes, config.k_core)
        stats["dropped"]["k_core"] = int((~keep).sum())
        user_codes, item_codes, times = user_codes[keep], item_codes[keep], times[keep]
        user_codes, user_index = pd.factorize(user_codes, sort=True)
        item_codes, item_index = pd.factorize(item_codes, sort=True)
        user_ids, item_ids = user_ids[user_index], item_ids[item_index]
    if user_codes.shape[0] == 0:
        raise DataError(
            f"{source}: no interactions left after filtering ({stats['dropped']}); lower "
            "data.preprocess.k_core or data.preprocess.rating_threshold."
        )

    # Chronological per user; equal timestamps keep their original row order (stable tie-break).
    order = np.lexsort((np.arange(user_codes.shape[0]), times, user_codes))
    users_sorted = user_codes[order].astype(np.int64)
    items_sorted = item_codes[order].astype(np.int64) + 1
    times_sorted = times[order]
    num_users = len(user_ids)
    if config.cold_item_fraction > 0:
        # Cold items: every interaction removed except when it is a user's last event (the test target),
        # so the model never sees them in training or in any history.
        rng = np.random.default_rng(config.cold_item_seed)
        n_cold = int(round(config.cold_item_fraction * len(item_ids)))
        is_cold = np.zeros(len(item_ids) + 1, dtype=bool)
        is_cold[rng.choice(np.arange(1, len(item_ids) + 1), n_cold, replace=False)] = True
        is_last = np.ones(users_sorted.shape[0], dtype=bool)
        is_last[:-1] = users_sorted[1:] != users_sorted[:-1]
        keep = ~is_cold[items_sorted] | is_last
        stats["dropped"]["cold_item_history"] = int((~keep).sum())
        stats["cold_items"] = n_cold
        users_sorted, items_sorted, times_sorted = users_sorted[keep], items_sorted[keep], times_sorted[keep]
    lengths = np.bincount(users_sorted, minlength=num_users).astype(np.int64)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    if config.split == "loo":
        evaluable = lengths >= 3
        train_end = np.where(evaluable, lengths - 2, lengths)
        eval_users = np.flatnonzero(evaluable)
        valid = EvalSplit(eval_users, lengths[eval_users] - 2)
        test = EvalSplit(eval_users.copy(), lengths[eval_users] - 1)
        stats["train_only_users(<3 events)"] = int((~evaluable).sum())
        cold = _cold_users(lengths, config)
        if cold.shape[0]:
            # Held out: no training event, no validation or test query; their own queries go to the cold_users split.
            train_end[cold] = 0
            keep_valid, keep_test = ~np.isin(valid.user, cold), ~np.isin(test.user, cold)
            valid = EvalSplit(valid.user[keep_valid], valid.pos[keep_valid])
            test = EvalSplit(test.user[keep_test], test.pos[keep_test])
    else:
        t_valid, t_test = np.quantile(
            times_sorted, [1 - config.valid_fraction - config.test_fraction, 1 - config.test_fraction]
        )
        pos = np.arange(times_sorted.shape[0]) - offsets[users_sorted]
        train_end = np.bincount(users_sorted[times_sorted < t_valid], minlength=num_users).astype(np.int64)
        # A query needs at least one earlier event to encode.
        is_valid = (times_sorted >= t_valid) & (times_sorted < t_test) & (pos > 0)
        is_test = (times_sorted >= t_test) & (pos > 0)
        valid = EvalSplit(users_sorted[is_valid], pos[is_valid])
        test = EvalSplit(users_sorted[is_test], pos[is_test])
        stats["cutoffs"] = {"valid_from": int(t_valid), "test_from": int(t_test)}
        cold = np.zeros(0, dtype=np.int64)
    per_user = np.minimum(lengths[cold] - 1, config.cold_user_max_history)  # queries at positions 1..per_user
    cold_split = EvalSplit(np.repeat(cold, per_user), _ranges(np.ones_like(per_user), per_user))

    item_id_array = np.concatenate([np.array(["<pad>"]), np.asarray(item_ids, dtype=str)])
    stats.update(
        users=num_users, items=len(item_ids), interactions=int(offsets[-1]),
        train_events=int(train_end.sum()), valid_queries=len(valid), test_queries=len(test),
    )
    if len(cold_split):
        stats.update(cold_users=int(cold.shape[0]), cold_queries=len(cold_split))
    if len(valid) == 0 or len(test) == 0:
        raise DataError(
            f"{source}: the {config.split!r} split left no validation or test queries ({stats}); "
            "users need at least 3 events for leave-one-out, or widen the temporal fractions."
        )
    return SequenceData(
        offsets=offsets, items=items_sorted, times=times_sorted, train_end=train_end, valid=valid,
        test=test, user_ids=np.asarray(user_ids, dtype=str), item_ids=item_id_array, stats=stats, cold_users=cold_split,
    )


def _cold_users(lengths: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The held-out users (sorted indices): a `cold_user_fraction` share of all users, drawn among those with at
    least 3 events, so that at least one of the remaining users still has validation and test queries."""
    if config.cold_user_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.flatnonzero(lengths >= 3)
    n_cold = int(round(config.cold_user_fraction * lengths.shape[0]))
    if n_cold >= candidates.shape[0]:
        raise DataError(f"data.preprocess.cold_user_fraction={config.cold_user_fraction} holds out {n_cold} users but "
                        f"only {candidates.shape[0]} have 3+ events and some must stay to train and validate on; "
                        "lower the fraction.")
    rng = np.random.default_rng(config.cold_user_seed)
    return np.sort(rng.choice(candidates, n_cold, replace=False)).astype(np.int64)


def cache_key(source_fingerprint: dict, config: PreprocessConfig) -> str:
    """Stable hash of everything that determines the arrays."""
    blob = json.dumps({"format": CACHE_FORMAT, "source": source_fingerprint, "preprocess": asdict(config)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def held_out_user_codes(users: torch.Tensor) -> torch.Tensor:
    """How a model sees users it never trained on whose side data is known (a held-out user's profile row): as
    -2 - index. Models drop what they learned per user (the user-id embedding) for any negative code, and
    read side tables at `user_side_rows`; -1 stays a user with nothing known (a new user at serving)."""
    return -2 - users


def user_side_rows(users: torch.Tensor) -> torch.Tensor:
    """Row of each user in per-user side tables (profiles): the index itself, the index of a held-out user
    (`held_out_user_codes`), or -1 for a user with no row."""
    return torch.where(users <= -2, -2 - users, users)


@dataclass
class DataInfo:
    """What a model needs to know about the data to be built (scalars + optional item-side tensors)."""

    num_items: int
    num_users: int
    max_len: int
    item_counts: torch.Tensor | None = None
    item_text: torch.Tensor | None = None
    text_dim: int = 0
    item_texts: list[str] | None = None  # rendered item texts [N+1] (LoRA mode tokenizes them at build)
    # [N+1] bool: items with a training interaction anywhere in the data set (the global catalogue, also for a
    # federated client); None: unknown (a model rebuilt to load a checkpoint), treat every item as trained.
    train_items: torch.Tensor | None = None
    user_text: torch.Tensor | None = None  # [U, H] profile-text embeddings (model.user_profile)
    user_text_dim: int = 0

    def scalars(self) -> dict:
        out = {"num_items": self.num_items, "num_users": self.num_users, "max_len": self.max_len,
               "text_dim": self.text_dim}
        if self.user_text_dim:
            out["user_text_dim"] = self.user_text_dim
        return out
