"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence, learned positions.

Trained with full-softmax cross-entropy over all items at every position (the LightningModule's loss),
which the RecSys'23 comparisons show beats the paper's one-negative BCE by a wide margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training.data.sequences import DataInfo
from training.models.base import SequenceRecommender
from training.models.layers import CausalEncoder, Dropout, init_weights


@dataclass
class SASRecConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    max_len: int | None = None  # defaults to data.max_len
    # "pre": pre-LN blocks, sqrt(d)-scaled item embeddings (original SASRec code);
    # "post": post-LN blocks, LayerNorm on item + position embeddings (RecBole's SASRec).
    norm: str = "pre"
    # "recent": positions count back from the newest event (the latest item always has the same slot);
    # "absolute": positions count from the oldest event in the window (RecBole's convention).
    positions: str = "recent"
    # "inner": dropout on the feed-forward's inner activation too (original SASRec code);
    # "output": only on its output, before the residual sum (RecBole's SASRec).
    ff_dropout: str = "inner"

    def __post_init__(self) -> None:
        if self.positions not in ("recent", "absolute"):
            raise ValueError(f"model.positions={self.positions!r}: use 'recent' or 'absolute'.")
        if self.ff_dropout not in ("inner", "output"):
            raise ValueError(f"model.ff_dropout={self.ff_dropout!r}: use 'inner' or 'output'.")

    def build(self, info: DataInfo) -> SASRec:
        return SASRec(self, info.num_items, self.max_len or info.max_len)


class SASRec(SequenceRecommender):
    supports_query_mask = True  # forward(..., query_mask=...) skips the last block's unscored positions

    def __init__(self, cfg: SASRecConfig, num_items: int, max_len: int):
        super().__init__()
        self.cfg, self.num_items, self.max_len = cfg, num_items, max_len
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, cfg.hidden)
        self.drop = Dropout(cfg.dropout)
        self.emb_norm = nn.LayerNorm(cfg.hidden) if cfg.norm == "post" else None
        self.encoder = CausalEncoder(cfg.hidden, cfg.layers, cfg.heads, cfg.inner, cfg.dropout, cfg.attn_dropout,
                                     cfg.norm, cfg.ff_dropout)
        init_weights(self)

    def forward(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                query_times: torch.Tensor | None = None, item_table: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> torch.Tensor:
        items = items[:, -self.max_len:]
        if query_mask is not None:
            query_mask = query_mask[:, -self.max_len:]
        n = items.shape[1]
        # Positions count back from the newest event (inputs are left padded), so slot L-1 = latest.
        if self.cfg.positions == "absolute":  # count from the oldest non-padding event (inputs are left padded)
            pos = ((items > 0).cumsum(1) - 1).clamp_min(0)
        else:
            pos = torch.arange(self.max_len - n, self.max_len, device=items.device)
        if self.emb_norm is None:
            x = self.item_emb(items) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)
        else:
            x = self.emb_norm(self.item_emb(items) + self.pos_emb(pos))
        x = self.drop(x) * (items > 0).unsqueeze(-1)
        return self.encoder(x, items, query_mask)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight
