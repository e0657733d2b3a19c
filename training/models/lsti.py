"""LSTI: LLM-augmented long/short-term interest model.

Item representation: an ID embedding fused with a language-model embedding of the item's text
(`fusion`: id | text | id+text, combined by `sum` or a learned per-dimension `gate`). Text goes through
UniSRec-style parametric whitening and an MLP or mixture-of-experts adapter. In `text` mode the item
table is a function of text alone, so items never seen in training can still be recommended. In `id+text`
mode an item with no training interaction has an untrained (random) ID vector, so it is represented by its
text alone (its ID vector is zeroed: `id_trained` buffer); `id_dropout` zeroes a random share of the trained
items' ID vectors at each training step, so the fusion learns to rank from text alone too (cold start).

User representation at every position t (causal):
- long-term: causal self-attention over up to `long_len` events (default 200, bounded by the data window
  `data.max_len`) with learned positions and bucketed log time-interval embeddings (with `long_query_time`, also
  the time until each prediction is requested, which otherwise only the gate sees), plus an optional
  user-id embedding and, with `user_profile`, the user's profile text (e.g. "A 24 year old M technician.")
  through the language model and an adapter (or, with `profile_into=user`, that profile vector is added to
  the fused user state instead);
- short-term: a GRU over the last `short_len` events (or only the current session: events after the
  last gap longer than `session_gap` seconds), pooled by attention toward the latest state;
- fusion: alpha = sigmoid(MLP([long, short, log1p(time since last event)])), user = alpha * long +
  (1 - alpha) * short (as SLi-Rec), or a linear map of the concatenation. `gate_length` adds the number of
  events known (log scale) to the gate's input, so it can weigh the encoders by how much history there is.
Scores are dot products with every item representation (full softmax).

Language model (`text_mode`):
- `frozen` (default): the item texts are encoded once, outside the model, into the `item_text` buffer
  (cached on disk by `training.text.item_text_embeddings`); only the adapter learns.
- `lora`: the model owns the language model (`text_encoder`, a `training.text.TextEncoder` whose HF model
  is wrapped by `peft.get_peft_model`: only the LoRA matrices train, the base weights stay frozen) and the
  tokenized item texts (`item_input_ids` / `item_attention_mask` buffers [N+1, text_max_length], built from
  `DataInfo.item_texts`). Training encodes only the step's candidate items (`candidate_table`, with
  gradients; `LitRecommender` runs a sampled softmax over them); `item_table()` encodes the whole catalogue
  in chunks (evaluation refreshes it once per epoch). Checkpoints hold the LoRA weights but not the frozen
  base weights, which are re-read from `text_path` when the model is rebuilt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.data.sequences import DataInfo, user_side_rows
from training.models.base import SequenceRecommender
from training.models.gru4rec import left_to_right_padding, right_to_left_padding
from training.models.layers import CausalEncoder, Dropout, TimeIntervalEmbedding, init_weights


@dataclass
class LSTIConfig:
    hidden: int = 64
    # item side
    fusion: str = "id+text"  # id | text | id+text
    combine: str = "gate"  # sum | gate   (for id+text)
    adapter: str = "moe"  # mlp | moe
    experts: int = 4
    adapter_dropout: float = 0.2
    id_dropout: float = 0.0  # id+text: share of items whose ID vector is zeroed at each training step
    # long-term encoder
    use_long: bool = True
    long_len: int | None = 200  # the latest L events, bounded by the data window (data.max_len); None: that window
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    norm: str = "pre"              # pre | post (as SASRecConfig.norm: post-LN + embedding LayerNorm)
    positions: str = "recent"      # recent | absolute (as SASRecConfig.positions; absolute: per-prefix training)
    ff_dropout: str = "inner"      # inner | output (as SASRecConfig.ff_dropout)
    time_buckets: int = 32
    use_time: bool = True
    # each position's input also gets the (bucketed log) time until the prediction after it is requested, so the
    # long-term attention can look for other events when a session opens (docs/results.md, "What each encoder
    # learned"); off: only the gate sees that time
    long_query_time: bool = False
    user_embedding: bool = False
    # the users' profile texts (e.g. age, gender, occupation) through the language model and an adapter: what a
    # model can know about a user with few events (DataInfo.user_text)
    user_profile: bool = False
    profile_into: str = "long"  # long: added to the long-term state | user: added to the fused user state
    # short-term encoder
    use_short: bool = True
    short_len: int = 10
    short_rnn: str = "gru"  # gru | lstm
    session_gap: float | None = None  # seconds; None: the last short_len events regardless of gaps
    # fusion of long and short
    user_fusion: str = "gate"  # gate | concat
    gate_hidden: int = 64
    gate_length: bool = False  # the gate also sees how many events are known (log scale): short histories
    # language model: frozen (cached embeddings) | lora (PEFT LoRA on the encoder, trained end to end)
    text_mode: str = "frozen"
    text_path: str | None = None  # lora: the LM folder (conf/model/lsti_lora.yaml: ${.text.path}); None: MiniLM
    text_pooling: str = "mean"  # lora: mean | cls | last
    text_max_length: int = 64  # lora: tokens kept per item text
    text_chunk: int = 256  # lora: items per LM forward when encoding the whole catalogue
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list | None = None  # module names; None: peft's default for the architecture (BERT: query, value)
    lora_negatives: int = 256  # uniform random items added to the in-batch candidates of each training step

    def __post_init__(self) -> None:
        checks = {
            "fusion": (self.fusion, ("id", "text", "id+text")),
            "combine": (self.combine, ("sum", "gate")),
            "adapter": (self.adapter, ("mlp", "moe")),
            "short_rnn": (self.short_rnn, ("gru", "lstm")),
            "user_fusion": (self.user_fusion, ("gate", "concat")),
            "text_mode": (self.text_mode, ("frozen", "lora")),
            "norm": (self.norm, ("pre", "post")),
            "positions": (self.positions, ("recent", "absolute")),
            "ff_dropout": (self.ff_dropout, ("inner", "output")),
            "profile_into": (self.profile_into, ("long", "user")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r}: use one of {', '.join(allowed)}.")
        if self.user_profile and self.profile_into == "long" and not self.use_long:
            raise ValueError("model.user_profile=true with model.profile_into=long adds the profile to the long-term "
                             "state, but model.use_long=false: set profile_into=user or enable the long-term encoder.")
        if self.long_query_time and not self.use_long:
            raise ValueError("model.long_query_time=true feeds the long-term encoder, but model.use_long=false: "
                             "enable the long-term encoder or drop long_query_time.")
        if not (self.use_long or self.use_short):
            raise ValueError("model.use_long and model.use_short are both false: enable at least one encoder.")
        if self.short_len < 1:
            raise ValueError(f"model.short_len={self.short_len} must be >= 1.")
        if self.long_len is not None and self.long_len < 1:
            raise ValueError(f"model.long_len={self.long_len} must be >= 1 (or null: the data window, data.max_len).")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"model.id_dropout={self.id_dropout} must be in [0, 1).")
        if self.id_dropout > 0 and self.fusion != "id+text":
            raise ValueError(f"model.id_dropout={self.id_dropout} drops ID vectors in favour of text, which only "
                             f"fusion=id+text has (model.fusion={self.fusion!r}): set id_dropout=0.")
        if self.text_mode == "lora":
            if not self.uses_text:
                raise ValueError("model.text_mode=lora fine-tunes the language model, but model.fusion=id uses no "
                                 "text: use fusion=text or id+text, or text_mode=frozen.")
            for name in ("lora_r", "text_max_length", "text_chunk"):
                if getattr(self, name) < 1:
                    raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1.")
            if self.lora_negatives < 0:
                raise ValueError(f"model.lora_negatives={self.lora_negatives} must be >= 0.")

    @property
    def uses_text(self) -> bool:
        return self.fusion in ("text", "id+text")

    @property
    def needs_text(self) -> bool:
        """Whether the model needs the cached (frozen) text-embedding table `DataInfo.item_text`."""
        return self.uses_text and self.text_mode == "frozen"

    @property
    def needs_item_texts(self) -> bool:
        """Whether the model needs the rendered item texts `DataInfo.item_texts` (LoRA mode)."""
        return self.uses_text and self.text_mode == "lora"

    def build(self, info: DataInfo) -> LSTI:
        if self.needs_text and info.item_text is None:
            raise ValueError(f"model.fusion={self.fusion!r} needs item-text embeddings: set text.enabled=true "
                             "(conf/model/lsti.yaml does) or use model.fusion=id.")
        return LSTI(self, info)


class Whitening(nn.Module):
    """Parametric whitening (UniSRec): (x - b) W, learned, to make frozen LM embeddings isotropic."""

    def __init__(self, dim_in: int, dim_out: int, dropout: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim_in))
        self.lin = nn.Linear(dim_in, dim_out, bias=False)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x - self.bias))


class TextAdapter(nn.Module):
    """Maps frozen text embeddings to the model space: whitening + MLP, or a mixture of whitening experts."""

    def __init__(self, dim_in: int, dim_out: int, kind: str, experts: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "moe":
            self.experts = nn.ModuleList(Whitening(dim_in, dim_out, dropout) for _ in range(experts))
            self.router = nn.Linear(dim_in, experts)
        else:
            self.whiten = Whitening(dim_in, dim_out, dropout)
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim_out, dim_out))
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if self.kind == "moe":
            weights = torch.softmax(self.router(text), dim=-1).unsqueeze(-1)  # [N, E, 1]
            out = (torch.stack([e(text) for e in self.experts], dim=-2) * weights).sum(-2)
        else:
            h = self.whiten(text)
            out = h + self.mlp(h)
        return self.norm(out)


class AttentionPool(nn.Module):
    """Pools a window of states toward its latest one (query = latest, keys/values = window)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, hidden)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        latest = states[:, -1]
        logits = (states @ self.query(latest).unsqueeze(-1)).squeeze(-1) / math.sqrt(states.shape[-1])
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        pooled = (weights.unsqueeze(-1) * states).sum(1)
        return self.out(torch.cat([pooled, latest], dim=-1))


class LSTI(SequenceRecommender):
    # forward(..., query_mask=...) computes states only at scored positions: the long-term encoder's last block,
    # the short-term windows and the gate run there only (per-prefix training scores one position per window).
    supports_query_mask = True

    def __init__(self, cfg: LSTIConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.num_items = cfg, info.num_items
        # the data window (data.max_len) bounds what the encoder can see: 50 events on ml100k (RecBole's protocol)
        self.long_len = min(cfg.long_len, info.max_len) if cfg.long_len else info.max_len
        d = cfg.hidden
        if cfg.fusion in ("id", "id+text"):
            self.item_emb = nn.Embedding(info.num_items + 1, d, padding_idx=0)
        if cfg.needs_text:
            self.register_buffer("item_text", info.item_text.to(torch.float32).clone(), persistent=True)
            self.adapter = TextAdapter(info.item_text.shape[1], d, cfg.adapter, cfg.experts, cfg.adapter_dropout)
        elif cfg.needs_item_texts:
            text_encoder = lora_text_encoder(cfg)  # attached after init_weights, which must not touch the LM
            self._register_item_tokens(text_encoder, info)
            self.adapter = TextAdapter(text_encoder.dim, d, cfg.adapter, cfg.experts, cfg.adapter_dropout)
        if cfg.uses_text:
            if cfg.fusion == "id+text" and cfg.combine == "gate":
                self.item_gate = nn.Linear(2 * d, d)
        if cfg.fusion == "id+text":
            # Items without a training interaction keep their random initial ID vector: they are represented by
            # text alone. Saved with the model (a rebuilt model does not know the training data); checkpoints
            # from before it load as "every item trained".
            known = info.train_items if info.train_items is not None else torch.ones(info.num_items + 1)
            if known.shape[0] != info.num_items + 1:
                raise ValueError(f"DataInfo.train_items has {known.shape[0]} entries for {info.num_items + 1} "
                                 "item indices (row 0 is the padding).")
            self.register_buffer("id_trained", known.to(torch.bool).clone(), persistent=True)
            self.register_load_state_dict_post_hook(_allow_missing_id_trained)
        self.drop = Dropout(cfg.dropout)
        if cfg.use_long:
            self.pos_emb = nn.Embedding(self.long_len, d)
            self.time_emb = TimeIntervalEmbedding(d, cfg.time_buckets) if cfg.use_time else None
            self.query_time_emb = TimeIntervalEmbedding(d, cfg.time_buckets) if cfg.long_query_time else None
            self.emb_norm = nn.LayerNorm(d) if cfg.norm == "post" else None
            self.long_encoder = CausalEncoder(d, cfg.layers, cfg.heads, cfg.inner, cfg.dropout, cfg.attn_dropout,
                                              cfg.norm, cfg.ff_dropout)
            self.user_emb = nn.Embedding(info.num_users, d) if cfg.user_embedding else None
        if cfg.user_profile:
            self._register_user_profiles(info)
            self.profile_adapter = TextAdapter(self.user_text.shape[1], d, "mlp", 1, cfg.adapter_dropout)
        if cfg.use_short:
            rnn = nn.GRU if cfg.short_rnn == "gru" else nn.LSTM
            self.short_rnn = rnn(d, d, batch_first=True)
            self.short_pool = AttentionPool(d)
        if cfg.use_long and cfg.use_short:
            if cfg.user_fusion == "gate":
                extra = 1 + int(cfg.gate_length)  # elapsed time [, events known]
                self.gate = nn.Sequential(nn.Linear(2 * d + extra, cfg.gate_hidden), nn.GELU(),
                                          nn.Linear(cfg.gate_hidden, 1))
            else:
                self.concat = nn.Linear(2 * d, d)
        self.out_norm = nn.LayerNorm(d)
        init_weights(self)
        if cfg.needs_item_texts:
            self.text_encoder = text_encoder
            # Checkpoints skip the frozen base LM (re-read from text_path at build) and keep the LoRA weights.
            self.register_state_dict_post_hook(_drop_frozen_lm_weights)
            self.register_load_state_dict_post_hook(_allow_missing_frozen_lm_weights)
        self.last_gate: torch.Tensor | None = None  # alpha of the last forward, for analysis

    # ------------------------------------------------------------------ items
    @property
    def trains_on_candidates(self) -> bool:
        """LoRA mode: a training step encodes only its candidate items (`candidate_table`), never all of them."""
        return self.cfg.needs_item_texts

    def _register_item_tokens(self, encoder, info: DataInfo) -> None:
        """Tokenize the item texts once into fixed-shape buffers [N+1, text_max_length]. Without texts (a
        model rebuilt to load a checkpoint) they are empty placeholders that the state dict fills."""
        n, width = info.num_items + 1, self.cfg.text_max_length
        if info.item_texts is None:
            ids = torch.full((n, width), int(encoder.tokenizer.pad_token_id), dtype=torch.int32)
            mask = torch.zeros((n, width), dtype=torch.bool)
        else:
            if len(info.item_texts) != n:
                raise ValueError(f"DataInfo.item_texts has {len(info.item_texts)} texts for {n} item indices "
                                 "(row 0 is the padding).")
            tokens = encoder.token_table(info.item_texts)
            ids, mask = tokens["input_ids"].to(torch.int32), tokens["attention_mask"].bool()
        self.register_buffer("item_input_ids", ids, persistent=True)
        self.register_buffer("item_attention_mask", mask, persistent=True)

    def encode_items(self, ids: torch.Tensor) -> torch.Tensor:
        """LoRA mode: LM embeddings [len(ids), H] float32 of the items `ids`, with autograd when enabled."""
        out = []
        for start in range(0, ids.shape[0], self.cfg.text_chunk):
            idx = ids[start:start + self.cfg.text_chunk]
            mask = self.item_attention_mask[idx]
            if not bool(mask.any(1).all()):
                raise RuntimeError("item token buffers are empty: build the model with DataInfo.item_texts "
                                   "(training.train does for text_mode=lora) or load a checkpoint into it.")
            keep = mask.any(0)  # drop columns that are padding in every row of this chunk
            out.append(self.text_encoder(self.item_input_ids[idx][:, keep].long(), mask[:, keep].long()))
        return torch.cat(out) if out else self.adapter.norm.weight.new_zeros(0, self.text_encoder.dim)

    def _id_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """ID vectors of all items [N+1, D] (or of `ids`), zeroed for items never trained and, in training,
        for a random `id_dropout` share of the others (id+text: those items are ranked from text alone)."""
        vectors = self.item_emb.weight if ids is None else self.item_emb(ids)
        if self.cfg.fusion != "id+text":
            return vectors
        keep = self.id_trained if ids is None else self.id_trained[ids]
        if self.training and self.cfg.id_dropout > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.cfg.id_dropout)
        return vectors * keep.unsqueeze(-1).to(vectors.dtype)

    def _combine(self, ids: torch.Tensor | None, txt: torch.Tensor | None) -> torch.Tensor:
        """Item representations from ID vectors and adapted text vectors (either None when unused)."""
        if txt is None:
            return ids
        if ids is None:
            return txt
        if self.cfg.combine == "sum":
            return ids + txt
        g = torch.sigmoid(self.item_gate(torch.cat([ids, txt], dim=-1)))
        return g * ids + (1 - g) * txt

    def text_table(self, text: torch.Tensor | None = None) -> torch.Tensor:
        if text is None:
            if self.cfg.needs_item_texts:
                rows = self.encode_items(torch.arange(1, self.num_items + 1, device=self.item_input_ids.device))
                text = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])  # row 0 (padding) is never encoded
            else:
                text = self.item_text
        return self.adapter(text)

    def item_table(self, text: torch.Tensor | None = None) -> torch.Tensor:
        """Representations of all items [N+1, D]; `text` replaces the LM embeddings (in LoRA mode, without
        it the whole catalogue goes through the language model)."""
        cfg = self.cfg
        table = self._combine(self._id_vectors() if cfg.fusion != "text" else None,
                              self.text_table(text) if cfg.uses_text else None)
        pad = torch.zeros_like(table[:1])
        return torch.cat([pad, table[1:]], dim=0)

    def candidate_table(self, ids: torch.Tensor) -> torch.Tensor:
        """Representations [len(ids), D] of the items `ids` only (row for id 0 is zeros); in LoRA mode only
        these items go through the language model, with gradients."""
        cfg = self.cfg
        txt = None
        if cfg.uses_text:
            txt = self.adapter(self.encode_items(ids) if cfg.needs_item_texts else self.item_text[ids])
        table = self._combine(self._id_vectors(ids) if cfg.fusion != "text" else None, txt)
        return table * (ids > 0).unsqueeze(-1).to(table.dtype)

    # ------------------------------------------------------------------ users
    def _register_user_profiles(self, info: DataInfo) -> None:
        """The users' profile-text embeddings [U, H] as a saved buffer (zeros rows: no profile). Without them
        (a model rebuilt to load a checkpoint) a zero placeholder of `info.user_text_dim` columns is filled by
        the state dict."""
        table = info.user_text
        if table is None:
            if not info.user_text_dim:
                raise ValueError("model.user_profile=true needs the users' profile embeddings (DataInfo.user_text, "
                                 "built by training.train from the data's user table).")
            table = torch.zeros(info.num_users, info.user_text_dim)
        if table.shape[0] != info.num_users:
            raise ValueError(f"DataInfo.user_text has {table.shape[0]} rows for {info.num_users} users.")
        self.register_buffer("user_text", table.to(torch.float32).clone(), persistent=True)

    def user_profiles(self, users: torch.Tensor) -> torch.Tensor:
        """Adapted profile vectors [..., D] of `users` (held-out users, `held_out_user_codes`, included); zeros for
        users outside the table (e.g. -1, a user unknown at serving) and for users without a profile row."""
        rows = user_side_rows(users)
        inside = (rows >= 0) & (rows < self.user_text.shape[0])
        text = self.user_text[rows.clamp(0, self.user_text.shape[0] - 1)]
        keep = inside & (text != 0).any(-1)
        return self.profile_adapter(text) * keep.unsqueeze(-1).to(text.dtype)

    def _long(self, x: torch.Tensor, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
              query_mask: torch.Tensor | None = None, query_rows: torch.Tensor | None = None,
              query_times: torch.Tensor | None = None) -> torch.Tensor:
        """Long-term states [B, L, D], or [Q, D] at the `query_mask` positions (row-major; `query_rows` are
        their batch rows, `query_mask.nonzero()[0]`). With `long_query_time`, `query_times` [B, L] (as in
        `forward`) feed each position's input; None: each prediction is requested at the next event, the
        newest one right after it."""
        n = items.shape[1]
        if self.cfg.positions == "absolute":  # count from the oldest event (inputs are left padded)
            pos = ((items > 0).cumsum(1) - 1).clamp_min(0)
        else:  # count back from the newest event
            pos = torch.arange(self.long_len - n, self.long_len, device=items.device)
        h = (x if self.emb_norm is not None else x * math.sqrt(self.cfg.hidden)) + self.pos_emb(pos)
        if self.time_emb is not None:
            h = h + self.time_emb(times, items)
        if self.query_time_emb is not None:
            if query_times is None:
                query_times = torch.cat([times[:, 1:], times[:, -1:]], dim=1)
            h = h + self.query_time_emb.of_gaps(query_times - times, items > 0)
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        h = self.drop(h) * (items > 0).unsqueeze(-1)
        out = self.long_encoder(h, items, query_mask)
        per_user = []  # vectors of the user, added at every position
        if self.user_emb is not None:
            known = (users >= 0).unsqueeze(-1)  # < 0: a user the model never trained on (new, held out)
            per_user.append(self.user_emb(users.clamp(0, self.user_emb.num_embeddings - 1)) * known)
        if self.cfg.user_profile and self.cfg.profile_into == "long":
            per_user.append(self.user_profiles(users).to(out.dtype))
        if per_user:
            user = sum(per_user)
            out = out + (user.unsqueeze(1) if query_mask is None else user[query_rows])
        return out

    def _short_windows(self, items: torch.Tensor, times: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query position (rows[q], cols[q]), the window indices [Q, k] of the last k events up to it
        and their validity mask [Q, k]."""
        k = self.cfg.short_len
        idx = cols.unsqueeze(1) - (k - 1) + torch.arange(k, device=items.device)
        inside = idx >= 0  # [Q, k]
        idx = idx.clamp_min(0)
        win_items = items[rows.unsqueeze(1), idx] * inside
        valid = win_items > 0
        if self.cfg.session_gap is not None:
            win_times = times[rows.unsqueeze(1), idx]
            gap = win_times[..., 1:] - win_times[..., :-1]
            breaks = torch.cat([torch.zeros_like(gap[..., :1], dtype=torch.bool),
                                (gap > self.cfg.session_gap) & valid[..., 1:] & valid[..., :-1]], dim=-1)
            # keep events after the latest break (reverse cumulative "any break later or here")
            later_break = torch.flip(torch.cumsum(torch.flip(breaks.long(), [-1]), -1), [-1]) - breaks.long()
            valid = valid & (later_break == 0)
        return idx, valid

    def _short(self, x: torch.Tensor, items: torch.Tensor, times: torch.Tensor,
               queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Short-term states [B, L, D], or [Q, D] at the positions `queries` = (rows, cols)."""
        b, n, d = x.shape
        k = self.cfg.short_len
        if queries is None:
            rows = torch.arange(b, device=x.device).repeat_interleave(n)
            cols = torch.arange(n, device=x.device).repeat(b)
        else:
            rows, cols = queries
        idx, valid = self._short_windows(items, times, rows, cols)
        windows = x[rows.unsqueeze(1), idx]  # [Q, k, D]
        lengths = valid.sum(1)
        # Session masking can leave holes at the front of a window only, so windows stay left padded.
        windows = windows * valid.unsqueeze(-1)
        rolled = left_to_right_padding(windows, lengths)
        packed = nn.utils.rnn.pack_padded_sequence(rolled, lengths.clamp_min(1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.short_rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=k)
        out = right_to_left_padding(out, lengths)
        pooled = self.short_pool(out, valid)
        return pooled if queries is not None else pooled.reshape(b, n, d)

    def forward(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                query_times: torch.Tensor | None = None, item_table: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position user states [B, L, D], or with `query_mask` [B, L] only those positions' states [Q, D]
        (row-major, `states[query_mask]`). `query_times[b, t]` is when the prediction after event t is
        requested (the next event's time in training; "now" when serving); it feeds the gate."""
        items, times = items[:, -self.long_len:], times[:, -self.long_len:]
        queries = None
        if query_mask is not None:
            query_mask = query_mask[:, -self.long_len:]
            queries = query_mask.nonzero(as_tuple=True)  # (rows, cols) of the scored positions, row-major
        table = self.item_table() if item_table is None else item_table
        x = F.embedding(items, table)
        cfg = self.cfg
        rows = None if queries is None else queries[0]
        if query_times is not None:
            query_times = query_times[:, -items.shape[1]:]
        long = self._long(x, items, times, users, query_mask, rows, query_times) if cfg.use_long else None
        short = self._short(x, items, times, queries) if cfg.use_short else None
        elapsed = known = None
        if long is not None and short is not None and cfg.user_fusion == "gate":
            if query_times is None:
                elapsed = torch.zeros_like(times, dtype=x.dtype)
            else:
                elapsed = self.elapsed_feature(query_times - times, x.dtype)
            known = (items > 0).cumsum(1) if cfg.gate_length else None  # events up to each position
            if queries is not None:
                elapsed = elapsed[queries]
                known = None if known is None else known[queries]
        profile = None
        if cfg.user_profile and cfg.profile_into == "user":
            profile = self.user_profiles(users).to(x.dtype)
            profile = profile[rows] if queries is not None else profile.unsqueeze(1)
        return self.fuse(long, short, elapsed, known, profile)

    @staticmethod
    def elapsed_feature(gap: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gate's time input: log1p(seconds between the event and the request) / 10."""
        return torch.log1p(gap.clamp_min(0).to(dtype)) / 10

    def length_feature(self, known: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The gate's history-length input (`gate_length`): log1p(events known) / log1p(long_len), in [0, 1]."""
        return torch.log1p(known.clamp_min(0).to(dtype)) / math.log1p(self.long_len)

    def fuse(self, long: torch.Tensor | None, short: torch.Tensor | None,
             elapsed: torch.Tensor | None = None, known: torch.Tensor | None = None,
             profile: torch.Tensor | None = None) -> torch.Tensor:
        """User state from the long/short encoder outputs [..., D] (either may be None when disabled), the
        gate's `elapsed_feature` [...], with `gate_length` the number of events known [...] and, with
        `profile_into=user`, the user's profile vector (`user_profiles`, broadcastable to [..., D]). Shared by
        `forward` and the incremental serving path."""
        if long is None:
            user = short
        elif short is None:
            user = long
        elif self.cfg.user_fusion == "concat":
            user = self.concat(torch.cat([long, short], dim=-1))
        else:
            if elapsed is None:
                elapsed = torch.zeros(long.shape[:-1], dtype=long.dtype, device=long.device)
            inputs = [long, short, elapsed.unsqueeze(-1)]
            if self.cfg.gate_length:
                if known is None:
                    raise ValueError("LSTI.fuse: model.gate_length=true needs the number of events known.")
                inputs.append(self.length_feature(known, long.dtype).unsqueeze(-1))
            alpha = torch.sigmoid(self.gate(torch.cat(inputs, dim=-1)))
            self.last_gate = alpha.detach()
            user = alpha * long + (1 - alpha) * short
        if profile is not None:
            user = user + profile
        return self.out_norm(user)


# ----------------------------------------------------------------------------- LoRA text encoder
def lora_text_encoder(cfg: LSTIConfig):
    """A float32 `TextEncoder` whose HF model is wrapped by `peft.get_peft_model` (only LoRA trainable)."""
    import peft

    from training.text import TextEncoder

    encoder = TextEncoder(cfg.text_path, pooling=cfg.text_pooling, max_length=cfg.text_max_length,
                          device="cpu", dtype=torch.float32)
    targets = list(cfg.lora_targets) if cfg.lora_targets else None
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=targets, task_type="FEATURE_EXTRACTION")
    try:
        # train(): the LM follows the recommender's mode (dropout while training; Lightning keeps modes as found)
        encoder.model = peft.get_peft_model(encoder.model, lora).train()
    except ValueError as e:
        raise ValueError(f"LoRA could not be applied to text model {encoder.model_path!r}: {e}. Set "
                         "model.lora_targets to the names of its attention projections (e.g. [query, value] for "
                         "BERT, [q_proj, v_proj] for Llama/Qwen).") from e
    return encoder


_LM_PREFIX = "text_encoder.model."


def _is_frozen_lm_key(key: str) -> bool:
    """A base (non-LoRA) weight of the LoRA-wrapped language model."""
    _, found, rest = key.partition(_LM_PREFIX)
    return bool(found) and "lora_" not in rest


def _drop_frozen_lm_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _LM_PREFIX) and _is_frozen_lm_key(k[len(prefix):])]:
        del state_dict[key]


def _allow_missing_frozen_lm_weights(module: nn.Module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_frozen_lm_key(k)]


def _allow_missing_id_trained(module: nn.Module, incompatible_keys) -> None:
    """Checkpoints saved before `id_trained` existed load with every item counted as trained (their behaviour)."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.endswith("id_trained")]
