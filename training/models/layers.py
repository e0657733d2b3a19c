"""Blocks shared by the models: causal self-attention, time-interval buckets, attention pooling, gate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, but on CPU drawn as `rand < keep` (3-4x faster there than the Bernoulli kernel).

    Same distribution (each element kept with probability 1 - p, scaled by 1 / (1 - p)); CUDA and other
    devices keep PyTorch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with the fast CPU path of `dropout` (same state dict, same semantics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float,
              training: bool) -> torch.Tensor:
    """Scaled dot-product attention with a boolean mask (True = attend). SDPA's kernels, except when
    training with attention dropout on CPU: SDPA then takes its math path with the slow Bernoulli
    kernel, so the same math is written out here with `dropout`."""
    if not training or p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return dropout(weights, p, True) @ v


class FeedForward(nn.Module):
    """Position-wise MLP. `inner_dropout` also drops the inner activation (Kang & McAuley's SASRec);
    RecBole's block drops only the output (the caller's residual dropout)."""

    def __init__(self, hidden: int, inner: int, dropout: float, inner_dropout: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(),
                                 Dropout(dropout if inner_dropout else 0.0), nn.Linear(inner, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CausalBlock(nn.Module):
    """Transformer block with causal, padding-aware attention (SDPA kernel).

    `norm="pre"` normalises each sub-layer's input (stable at high learning rates); `norm="post"`
    normalises after each residual sum, as the original Transformer, SASRec paper and RecBole do.
    """

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float,
                 norm: str = "pre", ff_dropout: str = "inner"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model hidden={hidden} must be divisible by heads={heads}.")
        if norm not in ("pre", "post"):
            raise ValueError(f"model norm={norm!r}: use 'pre' or 'post'.")
        if ff_dropout not in ("inner", "output"):
            raise ValueError(f"model ff_dropout={ff_dropout!r}: use 'inner' or 'output'.")
        self.heads, self.attn_dropout, self.post_norm = heads, attn_dropout, norm == "post"
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ff = FeedForward(hidden, inner, dropout, inner_dropout=ff_dropout == "inner")
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self._residuals(x, self._attend(self._attention_input(x), attn_mask))

    def forward_queries(self, x: torch.Tensor, key_mask: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor) -> torch.Tensor:
        """The block's output at positions (rows, cols) only, [Q, D]: equal to `forward(x)[rows, cols]`.

        Keys and values are still computed for every position, but queries, the output projection and the
        feed-forward only for the Q requested positions: when a batch scores few positions (per-prefix
        training scores one per window), the last block costs a fraction of a full one.
        `key_mask` [B, L]: non-padding positions.
        """
        a = self._attend_queries(self._attention_input(x), key_mask, rows, cols)
        return self._residuals(x[rows, cols], a)

    def _attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.post_norm else self.norm1(x)

    def _residuals(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Attention output `a` added to the residual stream `x`, then the feed-forward sub-layer."""
        if self.post_norm:
            x = self.norm1(x + self.drop(a))
            return self.norm2(x + self.drop(self.ff(x)))
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.norm2(x)))

    def _attend_queries(self, h: torch.Tensor, key_mask: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        heads, dh = self.heads, d // self.heads
        # One projection of every position (through the module, so ZeRO-3 gathers its weight as usual);
        # each query then takes its own sequence's keys and values.
        qkv = self.qkv(h).view(b, n, 3, heads, dh)
        q = qkv[rows, cols, 0].unsqueeze(2)  # [Q, heads, 1, dh]
        kv = qkv[rows, :, 1:].permute(2, 0, 3, 1, 4)  # [2, Q, heads, L, dh]
        positions = torch.arange(n, device=h.device)
        allowed = (key_mask[rows] & (positions <= cols.unsqueeze(1))) | (positions == cols.unsqueeze(1))
        a = attention(q, kv[0], kv[1], allowed[:, None, None, :], self.attn_dropout, self.training)
        return self.out(a.reshape(-1, d))

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, attn_mask, self.attn_dropout, self.training)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def causal_padding_mask(items: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask: attend to earlier non-padding positions and always to oneself.

    Allowing the diagonal keeps fully padded rows finite (their outputs are discarded anyway).
    """
    n = items.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=items.device).tril()
    keys = (items > 0).unsqueeze(1).unsqueeze(2)
    eye = torch.eye(n, dtype=torch.bool, device=items.device)
    return (causal & keys) | eye


class CausalEncoder(nn.Module):
    """Stack of causal blocks; zeroes padding positions between blocks.

    Pre-LN stacks end with a LayerNorm; post-LN blocks already emit normalised states.
    """

    def __init__(self, hidden: int, layers: int, heads: int, inner: int, dropout: float, attn_dropout: float,
                 norm: str = "pre", ff_dropout: str = "inner"):
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(hidden, heads, inner, dropout, attn_dropout, norm, ff_dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden) if norm == "pre" else nn.Identity()

    def forward(self, x: torch.Tensor, items: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] states; with `query_mask` [B, L] only those positions' states, [Q, D] in row-major order
        (`states[query_mask]`), computed without running the last block's queries elsewhere."""
        mask = causal_padding_mask(items)
        keep = (items > 0).unsqueeze(-1).to(x.dtype)
        blocks = list(self.blocks)
        if query_mask is None or not blocks:
            for block in blocks:
                x = block(x, mask) * keep
            return self.norm(x) if query_mask is None else self.norm(x)[query_mask]
        for block in blocks[:-1]:
            x = block(x, mask) * keep
        rows, cols = query_mask.nonzero(as_tuple=True)
        if rows.numel() > query_path_limit(items.shape[0], items.shape[1]):
            return self.norm(blocks[-1](x, mask) * keep)[query_mask]
        x_q = blocks[-1].forward_queries(x, items > 0, rows, cols) * keep[rows, cols]
        return self.norm(x_q)


def query_path_limit(batch: int, length: int) -> int:
    """The most scored positions for which `CausalBlock.forward_queries` beats a full block.

    Each query gathers its own sequence's keys and values ([Q, L, 2D]), so the per-query path pays off only with
    a few queries per sequence: on one CPU thread it wins up to about L/16 per sequence (L=50: up to 3-6;
    L=200: up to 12-16), and loses 3x (L=50, half the positions) to 8x (L=200) beyond. Per-prefix training and
    evaluation score one position per sequence; padding-heavy windows score many.
    """
    return batch * max(1, length // 16)


class TimeIntervalEmbedding(nn.Module):
    """Embeds log-bucketed gaps between consecutive events (seconds), 0 for padding/first events."""

    def __init__(self, hidden: int, buckets: int = 32, base: float = 2.0):
        super().__init__()
        self.buckets, self.log_base = buckets, math.log(base)
        self.emb = nn.Embedding(buckets + 1, hidden, padding_idx=0)

    def bucketize(self, gaps: torch.Tensor) -> torch.Tensor:
        g = gaps.clamp_min(0).to(torch.float32)
        b = (torch.log1p(g) / self.log_base).floor().to(torch.int64) + 1
        return b.clamp(1, self.buckets)

    def of_gaps(self, gaps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Embeddings of `gaps` (seconds); the zero vector where `valid` is False."""
        return self.emb(torch.where(valid, self.bucketize(gaps), 0))

    def forward(self, times: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([times[:, :1], times[:, :-1]], dim=1)
        has_prev = torch.cat([torch.zeros_like(items[:, :1], dtype=torch.bool), items[:, :-1] > 0], dim=1)
        return self.of_gaps(times - prev, has_prev & (items > 0))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal init for linear/embedding weights, as in BERT/SASRec implementations."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
