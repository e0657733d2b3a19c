"""Similar users for neighbour distillation (`loss.neighbour_distill`, training/module.py).

A user with few events gives the sequence encoder little to go on. LLM-ESR (Liu et al., NeurIPS'24) answers this
with retrieval-augmented self-distillation: retrieve each user's most similar users and pull the user's state
toward theirs during training, so what similar users did informs a short history. This module does the
retrieval, once, from the training events only (never a valid/test target):

- `items`: cosine similarity of the users' training item sets, each item weighted by its inverse user frequency
  (two users sharing a rare item are more alike than two sharing a blockbuster);
- `text`: cosine similarity of the mean language-model embedding of each user's training items (LLM-ESR's
  choice: it also places users whose items nobody else has, as long as their texts are alike).

Similarities are computed in row chunks (a dense [chunk, U] block at a time), so memory stays bounded in the
number of users; the cost is O(U^2) similarity entries, minutes on a GPU for a million users.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from training.data.sequences import SequenceData

NEIGHBOUR_KEYS = ("items", "text")
DENSE_KEY_ENTRIES = 2**27  # item keys of up to this many user x item entries are built dense, larger ones sparse


def training_events(data: SequenceData) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every training event (the first `train_end[u]` events of each user)."""
    lengths = np.diff(data.offsets)
    event_user = np.repeat(np.arange(data.num_users), lengths)
    in_train = (np.arange(data.items.shape[0]) - data.offsets[:-1][event_user]) < data.train_end[event_user]
    return event_user[in_train], data.items[in_train]


def user_keys(data: SequenceData, key: str, item_text: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised retrieval keys [U, K] (zero rows: users without training events)."""
    if key not in NEIGHBOUR_KEYS:
        raise ValueError(f"loss.neighbour_key={key!r}: use one of {', '.join(NEIGHBOUR_KEYS)}.")
    users, items = training_events(data)
    u, n = data.num_users, data.num_items + 1
    if key == "items":
        pairs = np.unique(users * n + items)  # each (user, item) once
        users, items = pairs // n, pairs % n
        df = np.bincount(items, minlength=n).astype(np.float64)
        idf = np.log((u + 1) / (df + 1))
        dense = torch.zeros(u, n, dtype=torch.float32) if u * n <= DENSE_KEY_ENTRIES else None
        values = torch.from_numpy(idf[items].astype(np.float32))
        index = torch.from_numpy(np.stack([users, items]))
        keys = (torch.sparse_coo_tensor(index, values, (u, n), check_invariants=False).coalesce() if dense is None
                else dense.index_put_((index[0], index[1]), values))
    else:
        if item_text is None:
            raise ValueError("loss.neighbour_key=text needs the item-text embeddings (a model with model.text, "
                             "e.g. model=lsti); use loss.neighbour_key=items otherwise.")
        text = torch.nn.functional.normalize(item_text.to(torch.float32), dim=-1)
        keys = torch.zeros(u, text.shape[1]).index_add_(0, torch.from_numpy(users), text[torch.from_numpy(items)])
    if keys.is_sparse:
        norms = torch.sparse.sum(keys * keys, dim=1).to_dense().sqrt()
        scale = torch.where(norms > 0, 1 / norms.clamp_min(1e-12), torch.zeros_like(norms))
        idx = keys.indices()
        normalised = torch.sparse_coo_tensor(idx, keys.values() * scale[idx[0]], keys.shape, check_invariants=False)
        with warnings.catch_warnings():  # torch flags every CSR tensor as beta; the ops used here are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return normalised.coalesce().to_sparse_csr()
    return torch.nn.functional.normalize(keys, dim=-1)


def _dense_rows(keys: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a key matrix as a dense block (keys: dense, or sparse CSR)."""
    if keys.layout == torch.strided:
        return keys[start:end]
    crow = keys.crow_indices()
    a, b = int(crow[start]), int(crow[end])
    rows = torch.repeat_interleave(torch.arange(end - start), torch.diff(crow[start:end + 1]))
    block = torch.zeros(end - start, keys.shape[1], dtype=keys.dtype)
    return block.index_put_((rows, keys.col_indices()[a:b]), keys.values()[a:b])


def user_neighbours(data: SequenceData, k: int, key: str = "items", item_text: torch.Tensor | None = None,
                    chunk_entries: int = 2**25) -> torch.Tensor:
    """The `k` most similar other users of every user [U, k] (int64, most similar first); -1 where a user has
    fewer than `k` other users with training events and a similarity above zero."""
    if k < 1:
        raise ValueError(f"loss.neighbours={k} must be >= 1.")
    keys = user_keys(data, key, item_text)
    u = data.num_users
    has_events = torch.from_numpy(data.train_end > 0)
    k_eff = min(k, max(u - 1, 1))
    out = torch.full((u, k), -1, dtype=torch.int64)
    step = max(1, chunk_entries // max(u, keys.shape[1], 1))
    for start in range(0, u, step):
        end = min(start + step, u)
        rows = _dense_rows(keys, start, end)  # [c, K]
        block = (keys @ rows.T).T if keys.layout != torch.strided else rows @ keys.T  # [c, U] cosine similarities
        block[:, ~has_events] = float("-inf")
        block[torch.arange(end - start), torch.arange(start, end)] = float("-inf")  # never one's own neighbour
        sims, idx = block.topk(k_eff, dim=1)
        out[start:end, :k_eff] = torch.where(sims > 0, idx, torch.full_like(idx, -1))
    out[~has_events] = -1
    return out
