"""Most-popular baseline: scores every item by its training popularity, for every user."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.data.sequences import DataInfo
from training.models.base import SequenceRecommender


@dataclass
class PopConfig:
    def build(self, info: DataInfo) -> Pop:
        return Pop(info)


class Pop(SequenceRecommender):
    def __init__(self, info: DataInfo):
        super().__init__()
        self.num_items = info.num_items
        counts = info.item_counts if info.item_counts is not None else torch.zeros(info.num_items + 1)
        self.register_buffer("counts", counts.to(torch.float32).clone())

    def forward(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                query_times: torch.Tensor | None = None, item_table: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(*items.shape, 1, device=items.device)

    def item_table(self) -> torch.Tensor:
        return self.counts.unsqueeze(1)
