"""Which users each federated client holds (user -> client assignment).

A client owns whole users: all events of a user live on one client, so raw sequences never need to
leave it. Each client then splits its users' events exactly like the central protocol (leave-one-out:
`SequenceData.subset_users` keeps every user's train/valid/test positions), so federated and
centralized metrics are computed on the same held-out events.

Schemes (`federated.partition.scheme`), all through flwr-datasets partitioners over an in-memory
`datasets.Dataset` with one row per user (`user`, `label`):

* `iid`: users spread uniformly at random (`IidPartitioner`).
* `dirichlet`: label skew with concentration `alpha` (`DirichletPartitioner`; small alpha = each client
  dominated by few labels). The label is `by`:
    - `group`: the user's dominant item group over their training events. Item groups come from the
      item table (`group_column`: `auto` uses MovieLens genres from `class`, each genre of a movie
      counting once, or a synthetic `group` column) or, with no item metadata, popularity deciles.
    - `activity`: the user's sequence-length quantile bin (`activity_bins` bins): heavy vs light users.
* `natural`: one user per client (`NaturalIdPartitioner`): as many clients as users.
* `grouped`: `users_per_client` users per client in user order (`GroupedNaturalIdPartitioner`), e.g.
  thousands of users per client for cross-silo setups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.data.sequences import SequenceData

SCHEMES = ("iid", "dirichlet", "natural", "grouped")
LABELS = ("group", "activity")


class PartitionError(ValueError):
    pass


@dataclass
class PartitionConfig:
    scheme: str = "iid"
    by: str = "group"
    alpha: float = 0.5
    group_column: str | None = "auto"
    num_groups: int = 10  # popularity groups when items have no metadata
    activity_bins: int = 5
    users_per_client: int = 20
    min_partition_size: int = 2
    seed: int = 42

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PartitionError(f"federated.partition.scheme={self.scheme!r}: use one of {', '.join(SCHEMES)}.")
        if self.by not in LABELS:
            raise PartitionError(f"federated.partition.by={self.by!r}: use one of {', '.join(LABELS)}.")
        if self.scheme == "dirichlet" and not self.alpha > 0:
            raise PartitionError(f"federated.partition.alpha={self.alpha} must be > 0.")
        if self.users_per_client < 1:
            raise PartitionError(f"federated.partition.users_per_client={self.users_per_client} must be >= 1.")


def num_partitions(cfg: PartitionConfig, num_clients: int | None, num_users: int) -> int:
    """How many clients the scheme makes (natural/grouped fix it from the data)."""
    if cfg.scheme == "natural":
        return num_users
    if cfg.scheme == "grouped":
        return -(-num_users // cfg.users_per_client)
    if not num_clients or num_clients < 1:
        raise PartitionError(f"federated.num_clients={num_clients} must be >= 1 for scheme {cfg.scheme!r}.")
    if num_clients > num_users:
        raise PartitionError(f"federated.num_clients={num_clients} exceeds the {num_users} users; a client needs at "
                             "least one user (use partition.scheme=natural for one user per client).")
    return num_clients


def item_groups(data: SequenceData, items_frame: pd.DataFrame | None, cfg: PartitionConfig) -> np.ndarray:
    """bool/int incidence [N+1, G] of items in groups (row 0 padding is all zero)."""
    n = data.num_items + 1
    column = cfg.group_column
    if column == "auto":
        column = next((c for c in ("class", "genre", "genres", "group") if items_frame is not None
                       and c in items_frame.columns), None)
    if column and items_frame is not None and column in items_frame.columns:
        index = {raw: i for i, raw in enumerate(data.item_ids)}
        frame = items_frame.drop_duplicates("item")
        rows = frame["item"].astype(str).map(index)
        keep = rows.notna().to_numpy()
        rows = rows[keep].astype(np.int64).to_numpy()
        values = frame[column].astype(str).to_numpy()[keep]
        if column in ("class", "genre", "genres"):  # token sequences: every genre of the item counts
            tokens = [[t for t in re.split(r"[\s|,]+", v) if t] for v in values]
        else:
            tokens = [[v] for v in values]
        vocab = {t: j for j, t in enumerate(sorted({t for ts in tokens for t in ts}))}
        if vocab:
            inc = np.zeros((n, len(vocab)), dtype=np.int64)
            for r, ts in zip(rows, tokens):
                inc[r, [vocab[t] for t in ts]] = 1
            return inc
    # No metadata: popularity groups (deciles of training popularity).
    counts = data.train_item_counts().astype(np.float64)
    ranks = np.argsort(np.argsort(-counts[1:], kind="stable"), kind="stable")
    group = np.minimum(ranks * cfg.num_groups // max(n - 1, 1), cfg.num_groups - 1)
    inc = np.zeros((n, cfg.num_groups), dtype=np.int64)
    inc[np.arange(1, n), group] = 1
    return inc


def user_labels(data: SequenceData, items_frame: pd.DataFrame | None, cfg: PartitionConfig) -> np.ndarray:
    """The Dirichlet label of every user (int64 [U])."""
    if cfg.by == "activity":
        lengths = data.lengths.astype(np.float64)
        edges = np.unique(np.quantile(lengths, np.linspace(0, 1, cfg.activity_bins + 1)[1:-1]))
        return np.searchsorted(edges, lengths, side="right").astype(np.int64)
    inc = item_groups(data, items_frame, cfg)
    users = np.repeat(np.arange(data.num_users), data.lengths)
    pos = np.arange(data.items.shape[0]) - data.offsets[users]
    train = pos < data.train_end[users]
    counts = np.zeros((data.num_users, inc.shape[1]), dtype=np.int64)
    np.add.at(counts, users[train], inc[data.items[train]])
    return counts.argmax(1).astype(np.int64)


def _partitioner(cfg: PartitionConfig, n_parts: int):
    from flwr_datasets import partitioner as P

    if cfg.scheme == "iid":
        return P.IidPartitioner(num_partitions=n_parts)
    if cfg.scheme == "dirichlet":
        return P.DirichletPartitioner(num_partitions=n_parts, partition_by="label", alpha=cfg.alpha,
                                      min_partition_size=cfg.min_partition_size, self_balancing=False,
                                      shuffle=True, seed=cfg.seed)
    if cfg.scheme == "natural":
        return P.NaturalIdPartitioner(partition_by="user")
    return P.GroupedNaturalIdPartitioner(partition_by="user", group_size=cfg.users_per_client,
                                         mode="allow-smaller", sort_unique_ids=True)


def partition_users(data: SequenceData, num_clients: int | None, cfg: PartitionConfig | dict,
                    items_frame: pd.DataFrame | None = None) -> list[np.ndarray]:
    """Sorted user indices (into `data`) of every client; deterministic in the config and seed."""
    from datasets import Dataset

    if isinstance(cfg, dict):
        cfg = PartitionConfig(**cfg)
    n_parts = num_partitions(cfg, num_clients, data.num_users)
    labels = user_labels(data, items_frame, cfg) if cfg.scheme == "dirichlet" else np.zeros(data.num_users, np.int64)
    users = np.arange(data.num_users, dtype=np.int64)
    if cfg.scheme == "iid":  # IidPartitioner splits in row order: shuffle the rows first, seeded
        users = np.random.default_rng(cfg.seed).permutation(users)
    ds = Dataset.from_dict({"user": users, "label": labels[users]})
    part = _partitioner(cfg, n_parts)
    part.dataset = ds
    try:
        out = [np.sort(np.asarray(part.load_partition(i)["user"], dtype=np.int64)) for i in range(part.num_partitions)]
    except ValueError as exc:
        raise PartitionError(f"federated.partition ({cfg}) failed for {n_parts} clients: {exc} Lower "
                             "partition.min_partition_size, raise partition.alpha or use fewer clients.") from exc
    empty = [i for i, u in enumerate(out) if u.shape[0] == 0]
    if empty:
        raise PartitionError(f"federated.partition left clients {empty[:10]} without users; use fewer clients or a "
                             "larger partition.alpha.")
    return out


def describe(parts: list[np.ndarray], data: SequenceData) -> str:
    sizes = np.array([p.shape[0] for p in parts])
    events = np.array([int(data.lengths[p].sum()) for p in parts])
    return (f"{len(parts)} clients; users per client min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}; "
            f"events per client min {events.min()} median {int(np.median(events))} max {events.max()}")
