"""What every sequence model offers the LightningModule, the evaluator and the server."""

from __future__ import annotations

import torch
from torch import nn


class SequenceRecommender(nn.Module):
    """forward -> per-position user states [B, L, D]; item_table -> [N+1, D]; score = dot products.

    `query_times` [B, L]: when each prediction is requested (models with time-aware fusion use it);
    `item_table`: a precomputed `item_table()` so a step computes item representations once.
    Models with `supports_query_mask = True` also take `query_mask` [B, L] (bool) and then return only
    those positions' states, [Q, D] = `forward(...)[query_mask]`, skipping work for the other positions.
    """

    num_items: int
    supports_query_mask: bool = False

    def forward(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                query_times: torch.Tensor | None = None, item_table: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def latest_states(self, items: torch.Tensor, times: torch.Tensor, users: torch.Tensor,
                      query_times: torch.Tensor | None = None,
                      item_table: torch.Tensor | None = None) -> torch.Tensor:
        """User states [B, D] after the newest event of left-padded windows: `forward(...)[:, -1]`, which is
        what evaluation and serving score. Models with a query mask compute only that position (LSTI's
        short-term encoder then runs one window per user instead of one per position)."""
        if not self.supports_query_mask:
            return self(items, times, users, query_times=query_times, item_table=item_table)[:, -1]
        latest = torch.zeros_like(items, dtype=torch.bool)
        latest[:, -1] = True
        return self(items, times, users, query_times=query_times, item_table=item_table, query_mask=latest)

    def score(self, states: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.item_table() if item_table is None else item_table
        return states @ table.T

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())
