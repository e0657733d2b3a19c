"""One LightningDataModule for every dataset: batches are vectorised gathers from cached arrays.

A batch is built by one fancy-indexing call over the flat event arrays (see `window_indices`), so the
loader costs microseconds per batch and never starves the model. Sharding across processes is done
here rather than by a DistributedSampler: training shards are padded to equal length (needed for
collective ops), evaluation shards are disjoint and unpadded, so no user is counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.data.errors import DataError
from training.data.sequences import (
    DataInfo,
    EvalSplit,
    PreprocessConfig,
    SequenceData,
    build_sequences,
    cache_key,
    held_out_user_codes,
)
from training.paths import cache_dir

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test", "cold_users")  # SequenceData attributes a model can be evaluated on


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def window_indices(offsets: torch.Tensor, users: torch.Tensor, ends: torch.Tensor, length: int) -> tuple:
    """Global event indices of the `length` events before `ends` (exclusive) per row, left padded.

    Returns (index [B, L] clamped to valid range, valid mask [B, L]).
    """
    starts = offsets[users]
    idx = (starts + ends).unsqueeze(1) - length + torch.arange(length, dtype=torch.int64)
    valid = idx >= starts.unsqueeze(1)
    return idx.clamp_min(0), valid


def training_windows(data: SequenceData, max_len: int, stride: int | None, mode: str,
                     share_prefix: bool = False) -> tuple:
    """Training samples as (user, end, first_target_loss): every training target is covered once.

    A sample (u, e) feeds events [e-L, e) and predicts events [e-L+1, e]. Windows step back from the
    last training event by `stride`; each window only scores its newest `stride` targets (older ones
    belong to the previous window, where they have more context), except the oldest window.

    `share_prefix`: the targets whose whole history fits in one window (events 1..L) are scored by one
    window per user (end = L) instead of a window each. Their contexts are the same prefixes, so with
    positions counted from the oldest event (SASRec `positions=absolute`) this equals per-prefix training
    (`stride=1`, RecBole's regime) at a fraction of the forward passes; only targets beyond L need their own.
    """
    stride = max_len if stride is None else stride
    if not 0 < stride <= max_len:
        raise DataError(f"data.train_stride={stride} must be in [1, data.max_len={max_len}].")
    last = data.train_end - 1  # index of the last training target
    users = np.flatnonzero(last >= 1)
    if users.shape[0] == 0:
        raise DataError("No user has two or more training events: nothing to train on.")
    if mode == "last":
        ends = last[users]
        return users, ends, np.maximum(ends - max_len + 1, 1)
    if mode != "all":
        raise DataError(f"data.train_windows={mode!r}: use 'all' or 'last'.")
    floor = max_len if share_prefix else 0  # targets <= floor go to the per-user prefix window
    counts = np.ceil(np.maximum(last[users] - floor, 0) / stride).astype(np.int64)
    if share_prefix:
        counts = counts + 1  # the prefix window, kept last in each user's run of samples
    sample_user = np.repeat(users, counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    ends = last[sample_user] - k * stride
    first_loss = np.maximum(ends - stride + 1, floor + 1)
    is_oldest = k == np.repeat(counts - 1, counts)
    if share_prefix:
        ends = np.where(is_oldest, np.minimum(last[sample_user], max_len), ends)
    first_loss = np.where(is_oldest, 1, first_loss)
    return sample_user, ends, first_loss


def checked_crop(share: float) -> float:
    """`data.train_history_crop` as a float in [0, 1], or a DataError naming the setting."""
    if not 0.0 <= float(share) <= 1.0:
        raise DataError(f"data.train_history_crop={share}: must be a share of the training windows in [0, 1] "
                        "(0 turns cropping off).")
    return float(share)


class TrainWindows(Dataset):
    """Indexed by a list of sample ids, or `(epoch, ids)`; returns a whole batch (no per-sample collation).

    `history_crop` > 0: that share of the windows is cut to a random number (uniform in 1..its events) of its
    latest events, the older ones becoming padding with no loss. Without it, a window's newest columns always
    follow a full window of context, so a model never trains on a short history at the positions that
    evaluation uses for a user who has only a few events (`data.eval_history_cap`, new users). Which windows
    are cut, and where, is a function of (`crop_seed`, epoch, batch): reruns and resumed runs cut alike.
    """

    def __init__(self, data: SequenceData, max_len: int, stride: int | None = None, mode: str = "all",
                 share_prefix: bool = False, history_crop: float = 0.0, crop_seed: int = 0):
        self.max_len = max_len
        self.history_crop, self.crop_seed = checked_crop(history_crop), int(crop_seed)
        self.offsets = torch.from_numpy(data.offsets)
        self.items = torch.from_numpy(data.items)
        self.times = torch.from_numpy(data.times)
        users, ends, first = training_windows(data, max_len, stride, mode, share_prefix)
        self.users, self.ends, self.first = (torch.from_numpy(a) for a in (users, ends, first))

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def _crop(self, valid: torch.Tensor, sample_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """`valid` [B, L] (left padded) with a random `history_crop` share of rows cut to their latest m events."""
        rng = np.random.default_rng((self.crop_seed, int(epoch), int(sample_ids[0]), int(sample_ids.shape[0])))
        n = valid.sum(1).numpy()
        cut = rng.random(n.shape[0]) < self.history_crop
        keep = np.where(cut, rng.integers(1, np.maximum(n, 1) + 1), n)  # events kept per row
        first_kept = torch.from_numpy(self.max_len - keep).unsqueeze(1)
        return valid & (torch.arange(self.max_len) >= first_kept)

    def __getitem__(self, key: list[int] | torch.Tensor | tuple[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        epoch, sample_ids = key if isinstance(key, tuple) else (0, key)
        s = torch.as_tensor(sample_ids, dtype=torch.int64)
        users, ends = self.users[s], self.ends[s]
        idx, valid = window_indices(self.offsets, users, ends, self.max_len)
        if self.history_crop > 0 and s.shape[0] > 0:
            valid = self._crop(valid, s, epoch)
        target_pos = idx + 1 - self.offsets[users].unsqueeze(1)  # event position of each target
        has_loss = valid & (target_pos >= self.first[s].unsqueeze(1))
        next_idx = (idx + 1).clamp_max(self.items.shape[0] - 1)
        return {
            "items": torch.where(valid, self.items[idx], 0),
            "times": torch.where(valid, self.times[idx], 0),
            "targets": torch.where(has_loss, self.items[next_idx], 0),
            "target_times": torch.where(valid, self.times[next_idx], 0),
            "users": users,
        }


class EvalQueries(Dataset):
    """Evaluation batches: the history window before each target plus the full history as CSR.

    `history_cap`: evaluate as if each user had only their latest `history_cap` events before the target (a
    short-history / new-user study on data where every user has a long history): the window, the seen items
    (filter_seen) and the length slices all see only those events. None: the whole history. A model with a
    user-id embedding (e.g. LSTI's `user_embedding=true`) still carries what it learned about the user in training.

    `new_users`: the queries belong to users held out of training (the `cold_users` split): they reach the model as
    `held_out_user_codes` (no user-id embedding, but their profile row, which a new user gives at sign-up), and
    the length slices count the events known before each query instead of the user's (zero) training events.
    """

    def __init__(self, data: SequenceData, split: EvalSplit, max_len: int, history_cap: int | None = None,
                 new_users: bool = False):
        if history_cap is not None and int(history_cap) < 1:
            raise DataError(f"history cap {history_cap}: must be >= 1 (null evaluates the whole history).")
        self.max_len = max_len
        self.history_cap = None if history_cap is None else int(history_cap)
        self.new_users = bool(new_users)
        self.offsets = torch.from_numpy(data.offsets)
        self.items = torch.from_numpy(data.items)
        self.times = torch.from_numpy(data.times)
        self.train_end = torch.from_numpy(data.train_end)
        self.user = torch.from_numpy(split.user)
        self.pos = torch.from_numpy(split.pos)

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def __getitem__(self, query_ids: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        q = torch.as_tensor(query_ids, dtype=torch.int64)  # -1: a padding query (see ShardedBatchSampler)
        q_real = q.clamp_min(0)
        users, pos = self.user[q_real], self.pos[q_real]
        idx, valid = window_indices(self.offsets, users, pos, self.max_len)
        target_idx = self.offsets[users] + pos
        known = pos if self.history_cap is None else pos.clamp_max(self.history_cap)  # events the model may see
        first = self.offsets[users] + pos - known  # global index of the oldest of them
        if self.history_cap is not None:
            valid = valid & (idx >= first.unsqueeze(1))
        # Full (or capped) history, not only the window, as CSR, for filter_seen.
        seen_offsets = torch.zeros(q.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(known, 0, out=seen_offsets[1:])
        row_start = torch.repeat_interleave(seen_offsets[:-1], known)
        flat = torch.repeat_interleave(first, known) + torch.arange(int(seen_offsets[-1])) - row_start
        return {
            "items": torch.where(valid, self.items[idx], 0),
            "times": torch.where(valid, self.times[idx], 0),
            "target": self.items[target_idx],
            "target_time": self.times[target_idx],
            "users": held_out_user_codes(users) if self.new_users else users,
            "query": q,
            "train_len": known if self.new_users else torch.minimum(self.train_end[users], known),
            "seen_offsets": seen_offsets,
            "seen_items": self.items[flat],
        }


class ShardedBatchSampler(Sampler):
    """Yields lists of indices for this process; deterministic in (seed, epoch).

    shuffle + pad (training): every rank gets the same number of batches. No shuffle (evaluation): the
    queries are cut into the very batches one process would use ([0, B), [B, 2B), ...) and rank r takes a
    contiguous block of whole batches, so no query is duplicated or dropped and every query is scored in the
    same batch as in a 1-process run (bit-identical scores). Ranks with one batch fewer get a padding batch
    (index -1: `EvalQueries` marks it with query -1, the module ignores it) so that every rank runs the same
    number of forward passes (DDP buffer syncs and ZeRO-3 parameter gathers are collectives).
    """

    PAD = -1

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 with_epoch: bool = False):
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.with_epoch = with_epoch  # yield (epoch, ids): lets the dataset draw per-epoch randomness (TrainWindows)
        self.epoch = 0
        self.skip_batches = 0  # skip this many batches on the next pass (whatever the epoch)
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """Mid-epoch resume: the next pass over `epoch` starts after its first `batches` batches."""
        self._resume = (int(epoch), int(batches))

    def _indices(self) -> torch.Tensor:
        rank, world = _dist()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
            per_rank = -(-self.size // world)
            if per_rank * world > self.size:  # pad by wrapping so every rank steps together
                order = torch.cat([order, order[: per_rank * world - self.size]])
            return order[rank * per_rank:(rank + 1) * per_rank]
        lo, hi = self._eval_block(rank, world)
        return torch.arange(min(lo * self.batch_size, self.size), min(hi * self.batch_size, self.size))

    def _eval_block(self, rank: int, world: int) -> tuple[int, int]:
        """Global batch indices [lo, hi) that rank `rank` evaluates."""
        n_batches = -(-self.size // self.batch_size)
        bounds = np.linspace(0, n_batches, world + 1).round().astype(np.int64)
        return int(bounds[rank]), int(bounds[rank + 1])

    def _eval_batches_per_rank(self, world: int) -> int:
        return max((b - a for a, b in (self._eval_block(r, world) for r in range(world))), default=0)

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = max(skip, self._resume[1])
        self._resume = None
        idx = self._indices()
        n_real = len(self._real_batches(idx.shape[0]))
        for b in range(skip, len(self)):
            if b < n_real:
                ids = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield (self.epoch, ids) if self.with_epoch else ids
            else:  # evaluation padding: see the class docstring
                yield torch.full((1,), self.PAD, dtype=torch.int64)

    def _real_batches(self, n: int) -> range:
        return range(n // self.batch_size if self.drop_last else -(-n // self.batch_size))

    def __len__(self) -> int:
        rank, world = _dist()
        if self.shuffle:
            return len(self._real_batches(-(-self.size // world)))
        return self._eval_batches_per_rank(world) if world > 1 else len(self._real_batches(self.size))


class TrainLoader(DataLoader):
    """The training DataLoader, stateful for Lightning: a checkpoint stores (epoch, batches trained) and a resumed
    run continues with the next batch of the same epoch order (`ShardedBatchSampler.resume_at`)."""

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> batches of the current epoch already trained (Lightning's counter)

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "batches": done, "seed": int(self.sampler.seed)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            log.warning("resuming with data.seed=%s but the checkpoint was trained with %s: the data order of the "
                        "resumed epoch differs", self.sampler.seed, state["seed"])
        self.sampler.resume_at(state.get("epoch", 0), state.get("batches", 0))


@dataclass
class SourceConfig:
    """Where interactions (and item text) come from.

    kind: ml100k (bundled default), atomic (RecBole atomic files `path/<name>.inter`, item text from
    `.item`, user profiles from `.user`), table (CSV/TSV/Parquet at `path` with a column mapping; item text
    from `items_path`, user profiles from `users_path`), synthetic.
    """

    kind: str = "ml100k"
    path: str | None = None
    name: str | None = None
    columns: dict | None = None
    items_path: str | None = None
    item_column: str | None = None
    users_path: str | None = None
    user_column: str | None = None
    sep: str | None = None
    time_format: str | None = None
    synthetic: dict | None = None


class SeqDataModule(L.LightningDataModule):
    """Reads, preprocesses (cached) and serves any dataset for every model."""

    def __init__(
        self,
        source: dict | SourceConfig | None = None,
        preprocess: dict | PreprocessConfig | None = None,
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        train_stride: int | None = None,
        train_windows: str = "all",
        share_prefix_window: bool = False,
        train_history_crop: float = 0.0,
        eval_history_cap: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 42,
        cache: bool = True,
    ):
        super().__init__()
        self.source = source if isinstance(source, SourceConfig) else SourceConfig(**(source or {}))
        self.preprocess = preprocess if isinstance(preprocess, PreprocessConfig) else PreprocessConfig(**(preprocess or {}))
        if max_len < 1 or batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"data.max_len/batch_size/eval_batch_size must be >= 1, got {max_len}/{batch_size}/{eval_batch_size}.")
        self.max_len, self.batch_size, self.eval_batch_size = max_len, batch_size, eval_batch_size
        self.train_stride, self.train_windows = train_stride, train_windows
        self.share_prefix_window = bool(share_prefix_window)
        self.train_history_crop = checked_crop(train_history_crop)  # fail at construction, not at the first epoch
        if eval_history_cap is not None and int(eval_history_cap) < 1:
            raise DataError(f"data.eval_history_cap={eval_history_cap}: must be >= 1, or null to evaluate on the "
                            "whole history.")
        self.eval_history_cap = None if eval_history_cap is None else int(eval_history_cap)
        self.num_workers, self.pin_memory, self.seed, self.use_cache = num_workers, pin_memory, seed, cache
        self.data: SequenceData | None = None
        self.items_frame = None  # raw item table (text fields), when the source has one
        self.users_frame = None  # raw user table (profile fields), when the source has one
        self._side_tables_read = False
        self._samplers: dict[str, ShardedBatchSampler] = {}
        self._train_resume: dict | None = None  # {"epoch", "batches"} from a checkpoint (mid-epoch resume)
        self.test_split = "test"  # what test_dataloader serves: "test", or "cold_users" (held-out users)

    # ---------------------------------------------------------------- reading
    def _read(self) -> tuple[Any, Any, Any, str]:
        """(interactions, item table or None, user table or None, source name)."""
        from training.data import readers

        s = self.source
        if s.kind == "ml100k":
            from training.data.movielens import ml100k_dir

            atomic = readers.read_atomic(ml100k_dir() if s.path is None else s.path, s.name or "ml-100k", columns=s.columns)
            return atomic.interactions, atomic.items, atomic.users, "ml-100k"
        if s.kind == "atomic":
            if not s.path or not s.name:
                raise DataError("data.source.kind=atomic needs data.source.path (a directory) and data.source.name.")
            atomic = readers.read_atomic(s.path, s.name, columns=s.columns)
            return atomic.interactions, atomic.items, atomic.users, f"{s.path}/{s.name}"
        if s.kind == "table":
            if not s.path or not s.columns:
                raise DataError("data.source.kind=table needs data.source.path and data.source.columns "
                                "({user: ..., item: ..., time: ..., rating: optional}).")
            inter = readers.read_table(s.path, s.columns, sep=s.sep, time_format=s.time_format)
            items = users = None
            if s.items_path:
                items = readers.read_items_table(s.items_path, s.item_column or s.columns.get("item", "item"), sep=s.sep)
            if s.users_path:
                users = readers.read_users_table(s.users_path, s.user_column or s.columns.get("user", "user"), sep=s.sep)
            return inter, items, users, str(s.path)
        if s.kind == "synthetic":
            from training.data import synthetic

            gen = synthetic.generate(**(s.synthetic or {}))
            return gen.interactions, gen.items, gen.users, "synthetic"
        raise DataError(f"data.source.kind={s.kind!r}: use ml100k, atomic, table or synthetic.")

    def _fingerprint(self) -> dict:
        """Identity of the inputs without reading them: file paths with size and mtime."""
        s = self.source
        fp: dict = {"kind": s.kind, "columns": s.columns, "sep": s.sep, "time_format": s.time_format,
                    "synthetic": s.synthetic, "name": s.name}
        paths: list[Path] = []
        if s.kind == "ml100k" and s.path is None:
            fp["bundled"] = "recbole-1.2.1/ml-100k"
        elif s.kind in ("atomic", "ml100k"):
            paths = sorted(Path(s.path).glob(f"{s.name or 'ml-100k'}.*"))
        elif s.kind == "table":
            paths = [Path(s.path)]
        fp["files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.exists()]
        return fp

    def prepare(self) -> SequenceData:
        """Load sequences from the cache, or read + preprocess + cache them."""
        if self.data is not None:
            return self.data
        key = cache_key(self._fingerprint(), self.preprocess)
        path = cache_dir("sequences") / f"{key}.npz"
        if self.use_cache and path.exists():
            self.data = SequenceData.load(path)
            log.info("sequences loaded from cache %s", path)
        else:
            inter, _, _, name = self._read()
            self.data = build_sequences(inter, self.preprocess, source=name)
            if self.use_cache and _dist()[0] == 0:
                self.data.save(path)
        self.cache_path = path
        return self.data

    def _read_side_tables(self) -> None:
        """Item and user tables, read once (lazily: only text and profile models need them); a source without
        one leaves it None without being read again."""
        if not self._side_tables_read:
            _, self.items_frame, self.users_frame, _ = self._read()
            self._side_tables_read = True

    def load_items_frame(self):
        """The raw item table (for text templates), or None when the source has none."""
        self._read_side_tables()
        return self.items_frame

    def load_users_frame(self):
        """The raw user table (profile texts for `model.user_profile`), or None when the source has none."""
        self._read_side_tables()
        return self.users_frame

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    # ---------------------------------------------------------------- info + loaders
    @property
    def info(self) -> DataInfo:
        d = self.prepare()
        return DataInfo(num_items=d.num_items, num_users=d.num_users, max_len=self.max_len,
                        item_counts=torch.from_numpy(d.train_item_counts()))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, name: str) -> DataLoader:
        sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=self.seed,
                                      with_epoch=name == "train")
        self._samplers[name] = sampler
        # An own generator: creating an iterator then never draws from the global RNG (which dropout uses),
        # so a run resumed mid-epoch consumes random numbers exactly like an uninterrupted one.
        kwargs = dict(batch_size=None, sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
                      persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))
        if name == "train":
            if self._train_resume:
                sampler.resume_at(self._train_resume["epoch"], self._train_resume["batches"])
            return TrainLoader(dataset, progress=self._train_progress, **kwargs)
        return DataLoader(dataset, **kwargs)

    def _train_progress(self) -> int:
        """Batches of the current epoch the Trainer has trained on (not merely fetched)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def make_train_windows(self, data: SequenceData | None = None, crop_seed: int | None = None) -> TrainWindows:
        """The training samples of `data` (default: the whole data set) under this module's settings; federated
        clients build theirs from their own users this way."""
        return TrainWindows(self.prepare() if data is None else data, self.max_len, self.train_stride,
                            self.train_windows, self.share_prefix_window, self.train_history_crop,
                            self.seed if crop_seed is None else crop_seed)

    def make_eval_queries(self, split: str, data: SequenceData | None = None) -> EvalQueries:
        """The `split` ("valid" | "test" | "cold_users") queries of `data` (default: the whole data set) under this
        module's settings (window, history cap)."""
        if split not in EVAL_SPLITS:
            raise DataError(f"evaluation split {split!r}: use one of {', '.join(EVAL_SPLITS)}.")
        d = self.prepare() if data is None else data
        if split == "cold_users" and len(d.cold_users) == 0:
            raise DataError("the cold_users split is empty: train with data.preprocess.cold_user_fraction > 0 (e.g. "
                            "0.1) to hold users out of training and evaluate them as new users.")
        return EvalQueries(d, getattr(d, split), self.max_len, self.eval_history_cap, new_users=split == "cold_users")

    @property
    def test_splits(self) -> tuple[str, ...]:
        """The splits a final test covers: "test", plus "cold_users" when users were held out of training."""
        return ("test", "cold_users") if len(self.prepare().cold_users) else ("test",)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.make_train_windows(), self.batch_size, True, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.make_eval_queries("valid"), self.eval_batch_size, False, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.make_eval_queries(self.test_split), self.eval_batch_size, False, "test")

    def describe(self) -> str:
        d = self.prepare()
        s = d.stats
        lines = [f"users {s['users']:,}  items {s['items']:,}  interactions {s['interactions']:,} "
                 f"(raw {s['raw_interactions']:,})",
                 f"train events {s['train_events']:,}  valid queries {s['valid_queries']:,}  "
                 f"test queries {s['test_queries']:,}"]
        if s.get("cold_users"):
            lines.append(f"held-out (cold) users {s['cold_users']:,}: {s['cold_queries']:,} queries with "
                         f"1..{self.preprocess.cold_user_max_history} known events")
        dropped = {k: v for k, v in s.get("dropped", {}).items() if v}
        if dropped:
            lines.append("dropped rows: " + ", ".join(f"{k}={v:,}" for k, v in dropped.items()))
        return "\n".join(lines)

    # Mid-epoch resume: Lightning stores/restores this with the checkpoint. The training position is also in
    # the (stateful) train loader's state, but Lightning only hands that back when it creates the loader after
    # restoring, and `trainer.estimated_stepping_batches` (configure_optimizers) creates it before; the data
    # module is restored in time for every strategy (after setup for DeepSpeed, which then finds the sampler).
    def state_dict(self) -> dict:
        state = {"seed": self.seed}
        train = self._samplers.get("train")
        if train is not None:
            state["train"] = {"epoch": int(train.epoch), "batches": self._train_progress()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)
        self._train_resume = state.get("train")
        if self._train_resume and "train" in self._samplers:
            self._samplers["train"].resume_at(self._train_resume["epoch"], self._train_resume["batches"])

