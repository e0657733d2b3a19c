"""Online recommendation from a trained checkpoint: load once, precompute the item table once, answer fast.

    rec = Recommender.from_checkpoint("outputs/train/<run>/checkpoints/best.ckpt")
    rec.recommend(["50", "172", "133"], k=10)                   # [(raw item id, score), ...]
    state = rec.start(["50", "172"], times=[881250949, 881251011])
    rec.update(state, ("133", 881251100))                       # advance the user state by one event
    rec.recommend_from_state(state, k=10, exclude_seen=True)

What is incremental (docs/serving.md has the details and the measured latencies):

* GRU4Rec: exact. The model encodes the last `window` events (data.max_len) from a zero state, so one
  carried hidden state would drift from that once a history is longer than the window. The state keeps one
  hidden state per start position inside the window (a "staggered" set); a new event is one batched GRU
  step over all of them, the oldest is dropped, and the oldest remaining one is exactly the window encoding.
* LSTI short-term encoder: exact, the same idea in two dimensions. For each start position inside the last
  `short_len` events the state keeps the GRU/LSTM outputs at every later position (a short_len x short_len
  triangle), so the attention pooling over the window needs one batched RNN step per event.
* LSTI long-term encoder and SASRec: re-encoded. Positions are counted back from the newest event, so every
  key/value changes when an event arrives and a KV cache would be wrong; the window (one sequence, a few
  layers) is re-encoded per event.
* Any other model (Pop, future models): its own `forward` over the window, per event.

Incremental results equal full re-encoding (`encode_batch`, the model's own forward, as evaluation runs it)
up to float rounding; tests/test_serving.py checks identical top-K lists for every model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.data.sequences import held_out_user_codes
from training.models.gru4rec import GRU4Rec, right_to_left_padding
from training.models.lsti import LSTI

QUANTIZE_MODES = (None, "int8", "int8-encoder")
DTYPES = {None: None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ServingError(ValueError):
    """Bad input to the serving API or CLI; the message names the problem and the fix."""


def _preview(values: Sequence, n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


# ---------------------------------------------------------------------------------------------- state
@dataclass
class UserState:
    """One user's serving state. `update` mutates it in place (and returns it); do not share one state
    between threads. `items`/`times` hold only the last `window` events (internal ids), `seen` every item
    of the whole history (for exclude_seen)."""

    items: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    num_events: int = 0
    user: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    _seen_tensor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def last_time(self) -> int | None:
        return self.times[-1] if self.times else None

    def seen_tensor(self, device: torch.device) -> torch.Tensor:
        if self._seen_tensor is None or self._seen_tensor.numel() != len(self.seen):
            self._seen_tensor = torch.tensor(sorted(self.seen), dtype=torch.int64, device=device)
        return self._seen_tensor


# ---------------------------------------------------------------------------------------------- encoders
class _WindowEncoder:
    """Re-encodes the window with the model's own forward on every event (SASRec, Pop, anything else)."""

    description = "re-encodes the last `window` events with the model's forward on every event"

    def __init__(self, rec: Recommender):
        self.rec, self.model = rec, rec.model

    def reset(self, state: UserState) -> None:
        state.cache.clear()
        self._refresh(state)

    def step(self, state: UserState, item: int, time: int) -> None:
        self._refresh(state)

    def _refresh(self, state: UserState) -> None:
        if not state.items:
            state.cache["vector"] = None
            return
        items, times, users = self.rec._window_tensors(state)
        state.cache["vector"] = self.model.latest_states(items, times, users, item_table=self.rec.table)[0]

    def vector(self, state: UserState, now: int | None) -> torch.Tensor | None:
        return state.cache.get("vector")


def _suffix_batch(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, D] event embeddings -> every suffix as a right-padded batch [m, m, D] and lengths m, m-1, ..., 1."""
    m = emb.shape[0]
    idx = torch.arange(m, device=emb.device)
    gather = (idx.unsqueeze(1) + idx.unsqueeze(0)).clamp_max(m - 1)  # row r = events r, r+1, ...
    lengths = m - idx
    batch = emb[gather] * (idx.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(emb.dtype)
    return batch, lengths


class _GRU4RecEncoder:
    """Exact sliding-window GRU: one hidden state per start position inside the window (row 0 = oldest)."""

    description = ("incremental, exact: one batched GRU step per event over one hidden state per start "
                   "position in the window (the oldest is the window's encoding)")

    def __init__(self, rec: Recommender):
        self.rec, self.model = rec, rec.model
        self.window = rec.window

    def reset(self, state: UserState) -> None:
        m = len(state.items)
        gru = self.model.gru
        if m == 0:
            state.cache["h"] = None
            return
        emb = self.model.item_emb(torch.tensor(state.items, device=self.rec.device))
        batch, lengths = _suffix_batch(emb)
        packed = pack_padded_sequence(batch, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = gru(packed)  # [layers, m, H], in the batch's (row) order
        state.cache["h"] = h

    def step(self, state: UserState, item: int, time: int) -> None:
        h = state.cache.get("h")
        gru = self.model.gru
        layers, hidden = gru.num_layers, gru.hidden_size
        x = self.model.item_emb.weight[item]
        if h is None:
            h_prev = torch.zeros(layers, 1, hidden, dtype=x.dtype, device=x.device)
        else:
            if h.shape[1] >= self.window:  # the oldest start would cover window + 1 events: drop it
                h = h[:, 1:]
            h_prev = torch.cat([h, torch.zeros(layers, 1, hidden, dtype=h.dtype, device=h.device)], dim=1)
        _, h_new = gru(x.view(1, 1, -1).expand(h_prev.shape[1], 1, -1), h_prev.contiguous())
        state.cache["h"] = h_new

    def vector(self, state: UserState, now: int | None) -> torch.Tensor | None:
        h = state.cache.get("h")
        return None if h is None else self.model.proj(h[-1, :1])[0]  # quantised Linear layers need 2-D input


class _LSTIEncoder:
    """Long-term encoder re-encoded per event; short-term RNN advanced incrementally (exact triangle)."""

    description = ("short-term RNN incremental and exact (one batched step per event over a short_len x short_len "
                   "triangle of states); long-term attention re-encodes the window per event")

    def __init__(self, rec: Recommender):
        self.rec, self.model = rec, rec.model
        self.cfg = self.model.cfg
        self.k = min(self.cfg.short_len, rec.window)  # the forward only ever sees `window` events
        self.lstm = self.cfg.short_rnn == "lstm"

    # -------------------------------------------------------------- long
    def _long(self, state: UserState, now: int | None = None) -> torch.Tensor | None:
        if not self.cfg.use_long or not state.items:
            return None
        items, times, users = self.rec._window_tensors(state)
        x = F.embedding(items, self.rec.table)
        # with long_query_time the request time feeds the newest position (None: right after the newest event)
        query_times = None if now is None else torch.cat([times[:, 1:], times.new_tensor([[now]])], 1)
        return self.model._long(x, items, times, users, query_times=query_times)[0, -1]

    # -------------------------------------------------------------- short
    def _short_reset(self, state: UserState) -> None:
        k, d = self.k, self.cfg.hidden
        tail = state.items[-k:]
        m = len(tail)
        table = self.rec.table
        out = torch.zeros(k, k, d, dtype=table.dtype, device=table.device)
        cell = torch.zeros(k, d, dtype=table.dtype, device=table.device) if self.lstm else None
        if m:
            emb = table[torch.tensor(tail, device=table.device)]
            batch, lengths = _suffix_batch(emb)
            packed = pack_padded_sequence(batch, lengths.cpu(), batch_first=True, enforce_sorted=False)
            seq, last = self.model.short_rnn(packed)
            seq, _ = pad_packed_sequence(seq, batch_first=True, total_length=m)
            out[k - m:, k - m:] = right_to_left_padding(seq, lengths)  # column k-1 = the newest event
            if self.lstm:
                cell[k - m:] = last[1][0]
        state.cache["short"], state.cache["cell"] = out, cell

    def _short_step(self, state: UserState, item: int) -> None:
        out, cell = state.cache["short"], state.cache["cell"]
        k, d = out.shape[0], out.shape[2]
        x = self.rec.table[item].view(1, 1, d).expand(k, 1, d)
        zero = out.new_zeros(1, d)
        h_prev = torch.cat([out[1:, -1], zero]).unsqueeze(0).contiguous()  # row r <- old row r + 1
        if self.lstm:
            c_prev = torch.cat([cell[1:], zero]).unsqueeze(0).contiguous()
            _, (h_new, c_new) = self.model.short_rnn(x, (h_prev, c_prev))
            state.cache["cell"] = c_new[0]
        else:
            _, h_new = self.model.short_rnn(x, h_prev)
        shifted = torch.cat([out[1:, 1:], out.new_zeros(1, k - 1, d)])
        state.cache["short"] = torch.cat([shifted, h_new[0].unsqueeze(1)], dim=1)

    def _short_vector(self, state: UserState) -> torch.Tensor | None:
        if not self.cfg.use_short or not state.items:
            return None
        k = self.k
        m = min(len(state.items), k)
        first = k - m  # first valid row/column of the triangle
        gap = self.cfg.session_gap
        if gap is not None and m > 1:  # keep the events after the latest session break in the window
            t = state.times[-m:]
            for j in range(m - 1, 0, -1):
                if t[j] - t[j - 1] > gap:
                    first = k - m + j
                    break
        out = state.cache["short"]
        valid = torch.arange(k, device=out.device) >= first
        states = out[first] * valid.unsqueeze(-1).to(out.dtype)
        return self.model.short_pool(states.unsqueeze(0), valid.unsqueeze(0))[0]

    # -------------------------------------------------------------- interface
    def reset(self, state: UserState) -> None:
        if self.cfg.use_short:
            self._short_reset(state)
        state.cache["long"] = None if self.cfg.long_query_time else self._long(state)

    def step(self, state: UserState, item: int, time: int) -> None:
        if self.cfg.use_short:
            self._short_step(state, item)
        state.cache["long"] = None if self.cfg.long_query_time else self._long(state)

    def vector(self, state: UserState, now: int | None) -> torch.Tensor | None:
        if not state.items:
            return None
        long = self._long(state, now) if self.cfg.long_query_time else state.cache.get("long")
        short = self._short_vector(state)
        elapsed = known = None
        if long is not None and short is not None and self.cfg.user_fusion == "gate":
            gap = 0 if now is None else now - state.times[-1]
            elapsed = self.model.elapsed_feature(torch.tensor([float(gap)], device=long.device), long.dtype)
            # the events the forward would see: the latest `window`, of which the model keeps `long_len`
            known = torch.tensor([min(len(state.items), self.rec.window, self.model.long_len)], device=long.device)
        batch = [None if v is None else v.unsqueeze(0) for v in (long, short)]  # 2-D for quantised Linear layers
        profile = None
        if self.cfg.user_profile and self.cfg.profile_into == "user":
            profile = self.model.user_profiles(torch.tensor([state.user], device=self.rec.table.device))
        return self.model.fuse(*batch, elapsed, known, profile)[0]


# ---------------------------------------------------------------------------------------------- recommender
def _quantize_dynamic(module: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of every nn.Linear (weights per output channel, activations per call)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (still works)
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False)


class Recommender:
    """A trained sequence model behind a small online API (see the module docstring).

    model: a `SequenceRecommender` (eval mode is set here); item_ids: raw ids, index 0 = padding (as in
    `SequenceData.item_ids`); window: how many recent events the model sees (data.max_len at training);
    item_counts: training popularity [N+1] for `popular`; user_ids: raw user ids (for user-embedding models);
    quantize: None | "int8" (Linear layers of the user encoder + the item table scored in int8) |
    "int8-encoder" (Linear layers only); dtype: None (float32) | "bf16" (meant for GPU);
    unknown_items: "error" (raise on raw ids outside the catalogue) | "skip" (ignore those events).
    The Recommender owns `model` from then on (it is put in eval mode, moved, and cast for bf16 in place).
    """

    def __init__(self, model: nn.Module, item_ids: Sequence[str], window: int, *,
                 item_counts: torch.Tensor | None = None, user_ids: Sequence[str] | None = None,
                 quantize: str | None = None, dtype: str | None = None, device: str | torch.device = "cpu",
                 unknown_items: str = "error", source: str = "the training data"):
        if quantize not in QUANTIZE_MODES:
            raise ServingError(f"quantize={quantize!r}: use one of None, 'int8', 'int8-encoder'.")
        if dtype not in DTYPES:
            raise ServingError(f"dtype={dtype!r}: use None (float32) or 'bf16'.")
        if unknown_items not in ("error", "skip"):
            raise ServingError(f"unknown_items={unknown_items!r}: use 'error' or 'skip'.")
        self.device = torch.device(device)
        if quantize and self.device.type != "cpu":
            raise ServingError(f"quantize={quantize!r} runs on CPU only (torch dynamic quantisation); on "
                               f"{self.device.type} use dtype='bf16' instead.")
        if quantize and DTYPES[dtype] is not None:
            raise ServingError("quantize and dtype='bf16' exclude each other: pick one.")
        num_items = int(model.num_items)
        if len(item_ids) != num_items + 1:
            raise ServingError(
                f"the model was trained on {num_items} items but the catalogue given has {len(item_ids) - 1} "
                f"(item_ids includes '<pad>' at index 0): a checkpoint of another dataset? Serve it with the "
                "data it was trained on (from_checkpoint uses the data config stored in the checkpoint).")
        if window < 1:
            raise ServingError(f"window={window} must be >= 1 (the data.max_len the model was trained with).")
        self.source, self.quantize, self.dtype = source, quantize, DTYPES[dtype]
        self.unknown_items = unknown_items
        self.item_ids = np.asarray(item_ids, dtype=str)
        self.item_index = {raw: i for i, raw in enumerate(self.item_ids.tolist()) if i > 0}
        self.user_ids = None if user_ids is None else np.asarray(user_ids, dtype=str)
        self.user_index = None if user_ids is None else {raw: i for i, raw in enumerate(self.user_ids.tolist())}
        self.num_items = num_items
        counts = item_counts if item_counts is not None else torch.zeros(num_items + 1)
        self.item_counts = counts.detach().to(torch.float32).cpu()

        model = model.eval().to(self.device)
        with torch.inference_mode():
            table = model.item_table().detach().clone()  # once, from the float model
        # Scores are always computed in float32: bf16 scores keep ~3 significant digits, which reorders
        # close items (measured on ML-100k: most top-10 lists change). The score table is small (N x D).
        self.score_table = table.float()
        if self.dtype is not None:
            model, table = model.to(self.dtype), table.to(self.dtype)
        if quantize:
            model = _quantize_dynamic(model)
        self.model, self.table = model, table
        self._scorer = None
        if quantize == "int8":  # the item table as an int8 Linear layer: scores = q(user) . q(item) * scales
            lin = nn.Linear(table.shape[1], table.shape[0], bias=False)
            lin.weight.data = self.score_table.clone()
            self._scorer = _quantize_dynamic(nn.Sequential(lin)).eval()
        limits = [getattr(model, "max_len", None), getattr(model, "long_len", None)]  # SASRec / LSTI truncate
        self.window = min([window, *[int(n) for n in limits if n is not None]])
        self.uses_users = isinstance(model, LSTI) and getattr(model, "user_emb", None) is not None
        # profile models (model.user_profile) use a known user's profile and serve anyone else without one
        self.uses_profiles = isinstance(model, LSTI) and model.cfg.user_profile
        if isinstance(model, GRU4Rec):
            self.encoder: Any = _GRU4RecEncoder(self)
        elif isinstance(model, LSTI):
            self.encoder = _LSTIEncoder(self)
        else:
            self.encoder = _WindowEncoder(self)
        self.data = None  # SequenceData, when loaded from a checkpoint's data config

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, quantize: str | None = None, dtype: str | None = None,
                        device: str | torch.device = "cpu", data: Any = None,
                        item_ids: Sequence[str] | None = None, unknown_items: str = "error") -> Recommender:
        """Load any checkpoint form (`training.checkpoints.load_module`) and its catalogue.

        The raw item ids come from `item_ids` if given, else from the data config stored in the checkpoint
        (or `data`, a data config that overrides it); the preprocessed sequences are cached on disk, so this
        reads the raw data only once per machine.
        """
        from training.checkpoints import load_module

        module = load_module(path)
        info = module.hparams["info"]
        data_cfg = data if data is not None else module.hparams.get("data")
        seq, source = None, f"checkpoint {path}"
        if item_ids is None:
            if not data_cfg:
                raise ServingError(f"checkpoint {path} stores no data config, so its raw item ids are unknown: pass "
                                   "item_ids=[...] (index 0 = '<pad>') or data=<the data config it was trained on>.")
            seq, source = _load_sequences(data_cfg)
            item_ids = seq.item_ids
            if seq.num_items != info["num_items"]:
                raise ServingError(
                    f"checkpoint {path} was trained on {info['num_items']} items but the data ({source}) has "
                    f"{seq.num_items}: a checkpoint of another dataset? Use the data it was trained on (drop the "
                    "data override to use the config stored in the checkpoint).")
        rec = cls(module.model, item_ids, info["max_len"], item_counts=module.item_counts,
                  user_ids=None if seq is None else seq.user_ids, quantize=quantize, dtype=dtype, device=device,
                  unknown_items=unknown_items, source=source)
        rec.data = seq
        return rec

    # ------------------------------------------------------------------ id mapping + checks
    def _items_to_index(self, raw: Iterable) -> list[int]:
        raw = list(raw)
        index = [self.item_index.get(str(r), 0) for r in raw]
        unknown = [r for r, i in zip(raw, index, strict=True) if i == 0]
        if unknown and self.unknown_items == "error":
            raise ServingError(
                f"unknown item ids {_preview(unknown)}: not in the catalogue of {self.num_items} items the model was "
                f"trained on ({self.source}). Drop them, map them to catalogue ids, or build the Recommender with "
                "unknown_items='skip' to ignore such events (a new catalogue needs a retrained model).")
        return index

    def _user_to_index(self, user: Any) -> int:
        if not (self.uses_users or self.uses_profiles):
            return 0
        known = user is not None and self.user_index is not None and str(user) in self.user_index
        if not known:
            if self.uses_users:
                raise ServingError(f"this model has user embeddings (model.user_embedding=true), so it needs a known "
                                   f"user id; got {user!r}. Pass user=<raw id of a training user>, or serve a model "
                                   "trained with model.user_embedding=false for new users.")
            return -1  # no profile (a new user)
        index = self.user_index[str(user)]
        if self.data is not None and int(self.data.train_end[index]) == 0:
            # in the data but never trained on (held out, data.preprocess.cold_user_fraction): as in evaluation,
            # its profile without its untrained id embedding
            return int(held_out_user_codes(torch.tensor(index)))
        return index

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise ServingError(f"k={k!r} must be an integer in [1, {self.num_items}] (the catalogue size).")
        return int(k)

    def _check_time(self, state: UserState, time: int) -> None:
        last = state.last_time
        if last is not None and time < last:
            raise ServingError(f"event time {time} is earlier than the user's latest event time {last}: events must "
                               "arrive in time order (pass history sorted by time, or times=None).")

    # ------------------------------------------------------------------ tensors
    def _window_tensors(self, state: UserState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = torch.tensor([state.items], dtype=torch.int64, device=self.device)
        times = torch.tensor([state.times], dtype=torch.int64, device=self.device)
        return items, times, torch.tensor([state.user], device=self.device)

    # ------------------------------------------------------------------ online API
    @property
    def incremental(self) -> str:
        """What `update` does for this model, in words."""
        return f"{type(self.model).__name__}: {self.encoder.description}"

    def start(self, history: Sequence = (), times: Sequence[int] | None = None, user: Any = None) -> UserState:
        """A user state from raw item ids (oldest first) and optional timestamps (int seconds, non-decreasing;
        None: all 0). An empty history is allowed: `update` it as events arrive (use `popular` meanwhile)."""
        history = list(history)
        if times is not None and len(times) != len(history):
            raise ServingError(f"times has {len(times)} entries for {len(history)} history items: give one "
                               "timestamp per item, or times=None.")
        index = self._items_to_index(history)
        stamps = [int(t) for t in times] if times is not None else [0] * len(history)
        if any(b < a for a, b in zip(stamps, stamps[1:], strict=False)):
            raise ServingError("times must be non-decreasing (history oldest first): sort the history by time.")
        keep = [j for j, i in enumerate(index) if i > 0]
        state = UserState(user=self._user_to_index(user))
        state.items = [index[j] for j in keep][-self.window:]
        state.times = [stamps[j] for j in keep][-self.window:]
        state.seen = {index[j] for j in keep}
        state.num_events = len(keep)
        with torch.inference_mode():
            self.encoder.reset(state)
        return state

    def update(self, state: UserState, new_event: Any) -> UserState:
        """Advance `state` by one event: a raw item id, or (raw item id, timestamp). Mutates and returns it."""
        if isinstance(new_event, (tuple, list)):
            if len(new_event) != 2:
                raise ServingError(f"event {new_event!r}: pass a raw item id or (raw item id, timestamp).")
            raw, time = new_event[0], int(new_event[1])
        else:
            raw, time = new_event, (state.last_time if state.last_time is not None else 0)
        item = self._items_to_index([raw])[0]
        if item == 0:  # unknown_items="skip"
            return state
        self._check_time(state, time)
        state.items.append(item)
        state.times.append(time)
        if len(state.items) > self.window:
            del state.items[0], state.times[0]
        state.seen.add(item)
        state.num_events += 1
        with torch.inference_mode():
            self.encoder.step(state, item, time)
        return state

    def recommend_from_state(self, state: UserState, k: int = 10, exclude_seen: bool = True,
                             now: int | None = None) -> list[tuple[str, float]]:
        """Top-k (raw item id, score), best first. `now`: request time (LSTI's gate uses the time since the
        latest event; None = right after it). Fewer than k come back only if exclusion leaves fewer items."""
        k = self.check_k(k)
        if not state.items:
            raise ServingError("empty history: the model needs at least one known event to recommend from. Update "
                               "the state with the user's first event, and show Recommender.popular(k) until then.")
        with torch.inference_mode():
            vector = self.encoder.vector(state, now)
            scores = self.score(vector.unsqueeze(0))[0]
            values, ids = self._topk(scores, k, state.seen_tensor(scores.device) if exclude_seen else None)
        return list(zip(self.item_ids[ids.cpu().numpy()].tolist(), values.cpu().tolist(), strict=True))

    def recommend(self, user_history: Sequence, k: int = 10, exclude_seen: bool = True,
                  times: Sequence[int] | None = None, now: int | None = None, user: Any = None) -> list[tuple[str, float]]:
        """Top-k (raw item id, score) for a history of raw item ids (oldest first)."""
        self.check_k(k)
        if len(user_history) == 0:
            raise ServingError("empty history: the model needs at least one event to recommend from; for a new "
                               "user show Recommender.popular(k) until the first event arrives.")
        state = self.start(user_history, times=times, user=user)
        if not state.items:
            raise ServingError("none of the history's items is in the catalogue (all were skipped as unknown): "
                               "nothing to recommend from; use Recommender.popular(k).")
        return self.recommend_from_state(state, k, exclude_seen=exclude_seen, now=now)

    def popular(self, k: int = 10, exclude: Iterable = ()) -> list[tuple[str, float]]:
        """The k most popular training items (cold-start fallback), excluding raw ids in `exclude`."""
        k = self.check_k(k)
        counts = self.item_counts.clone()
        skip = [self.item_index[str(r)] for r in exclude if str(r) in self.item_index]
        values, ids = self._topk(counts, k, torch.tensor(skip, dtype=torch.int64) if skip else None)
        return list(zip(self.item_ids[ids.numpy()].tolist(), values.tolist(), strict=True))

    # ------------------------------------------------------------------ batch API (full re-encoding)
    def encode_batch(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor | None = None,
                     query_times: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors [B, D] after the last event of left-padded windows [B, W] of internal ids: the model's
        own forward, exactly as evaluation runs it (the reference the incremental path is tested against)."""
        if users is None:  # no users given: row 0 for user-embedding models, no profile for profile models
            users = torch.full((items.shape[0],), -1 if self.uses_profiles else 0, dtype=torch.int64)
        with torch.inference_mode():
            return self.model.latest_states(items.to(self.device), times.to(self.device), users.to(self.device),
                                            query_times=None if query_times is None else query_times.to(self.device),
                                            item_table=self.table)

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        """Scores of every item [B, N+1] (float32; column 0 is padding)."""
        with torch.inference_mode():
            if self._scorer is not None:
                return self._scorer(vectors.float())
            return vectors.float() @ self.score_table.T

    @staticmethod
    def _topk(scores: torch.Tensor, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of a 1-D score vector over items 1..N, skipping `exclude` ids; ties -> lower id (as
        `training.metrics.topk_items`, which the batch CLI uses), one pass for the threshold plus a nonzero.
        Writes -inf into `scores` (callers pass a fresh tensor)."""
        scores[0] = -math.inf
        if exclude is not None and exclude.numel():
            scores[exclude] = -math.inf
        kk = min(k, scores.shape[0] - 1)
        top = scores.topk(kk).values  # NaN sorts above everything, so any NaN shows up here
        if bool(torch.isnan(top).any()):
            raise ServingError("the model produced NaN scores (diverged weights?); retrain or use another checkpoint.")
        kth = top[-1]
        if kth == -math.inf:
            cand = torch.nonzero(scores > -math.inf).flatten()
        else:
            cand = torch.nonzero(scores >= kth).flatten()  # ascending ids
        order = torch.sort(scores[cand], descending=True, stable=True).indices[:kk]
        ids = cand[order]
        return scores[ids], ids


def _load_sequences(data_cfg: Any):
    """SequenceData of a data config (a dict/DictConfig for `SeqDataModule`), and a name for messages."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(data_cfg) if not OmegaConf.is_config(data_cfg) else data_cfg
    dm = instantiate(cfg, _convert_="all")
    seq = dm.prepare()
    src = dm.source
    return seq, f"data.source.kind={src.kind}" + (f" path={src.path}" if src.path else "")


def resolve_users(spec: Any, user_ids: np.ndarray, unknown: str = "error") -> np.ndarray:
    """User indices for `users=`: "all", a list of raw ids, a comma-separated string, or a file path
    (one raw id per line; blank lines and lines starting with # are ignored)."""
    if unknown not in ("error", "skip"):
        raise ServingError(f"unknown_users={unknown!r}: use 'error' or 'skip'.")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return np.arange(len(user_ids), dtype=np.int64)
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.is_file():
            raw = [line.strip() for line in path.read_text().splitlines()]
            raw = [r for r in raw if r and not r.startswith("#")]
        elif "," in spec or not any(c in spec for c in "/\\"):
            raw = [r.strip() for r in spec.split(",") if r.strip()]
        else:
            raise ServingError(f"users={spec!r}: no such file. Pass users=all, a list users=[id1,id2], a quoted "
                               "comma list users='\"id1,id2\"', or the path of a file with one raw user id per line.")
    elif isinstance(spec, (int, np.integer)):
        raw = [str(spec)]
    else:
        raw = [str(r) for r in spec]
    if not raw:
        raise ServingError(f"users={spec!r} names no user: pass users=all, a list of raw ids or a file of ids.")
    index = {u: i for i, u in enumerate(np.asarray(user_ids, dtype=str).tolist())}
    found = [index.get(r, -1) for r in raw]
    unknown_ids = [r for r, i in zip(raw, found, strict=True) if i < 0]
    if unknown_ids and unknown == "error":
        raise ServingError(f"unknown user ids {_preview(unknown_ids)}: not among the {len(user_ids)} users of the "
                           "checkpoint's data. Use raw user ids as they appear in the interaction file, or pass "
                           "unknown_users=skip to leave them out.")
    users = np.asarray([i for i in found if i >= 0], dtype=np.int64)
    if users.size == 0:
        raise ServingError(f"users={spec!r}: none of these user ids is in the data; nothing to recommend.")
    return users
