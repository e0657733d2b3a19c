"""GRU4Rec (Hidasi et al., 2016) with full-softmax cross-entropy, as RecBole configures it.

Left-padded inputs are rolled to the right-padded layout and packed, so padding never enters the GRU
state: encoding a history in one call equals feeding it event by event (which serving relies on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.data.sequences import DataInfo
from training.models.base import SequenceRecommender
from training.models.layers import Dropout, init_weights


@dataclass
class GRU4RecConfig:
    embedding: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.3

    def build(self, info: DataInfo) -> GRU4Rec:
        return GRU4Rec(self, info.num_items)


def left_to_right_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Roll each row so its last `length` entries come first; works for [B, L] and [B, L, D]."""
    n = x.shape[1]
    idx = (torch.arange(n, device=x.device).unsqueeze(0) + (n - lengths).unsqueeze(1)) % n
    if x.dim() == 3:
        idx = idx.unsqueeze(-1).expand(-1, -1, x.shape[2])
    return x.gather(1, idx)


def right_to_left_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    n = x.shape[1]
    idx = (torch.arange(n, device=x.device).unsqueeze(0) - (n - lengths).unsqueeze(1)) % n
    if x.dim() == 3:
        idx = idx.unsqueeze(-1).expand(-1, -1, x.shape[2])
    return x.gather(1, idx)


class GRU4Rec(SequenceRecommender):
    def __init__(self, cfg: GRU4RecConfig, num_items: int):
        super().__init__()
        self.cfg, self.num_items = cfg, num_items
        self.item_emb = nn.Embedding(num_items + 1, cfg.embedding, padding_idx=0)
        self.drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embedding, cfg.hidden, cfg.layers, batch_first=True, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.embedding)
        init_weights(self)
        for name, w in self.gru.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(w)

    def forward(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                query_times: torch.Tensor | None = None, item_table: torch.Tensor | None = None) -> torch.Tensor:
        lengths = (items > 0).sum(1)
        x = self.drop(self.item_emb(left_to_right_padding(items, lengths)))
        packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=items.shape[1])
        return right_to_left_padding(self.proj(out), lengths)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight
