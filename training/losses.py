"""Training objectives over the item catalogue.

- `ce`: full-softmax cross-entropy over all items (the default; what RecBole/gSASRec comparisons favour).
- `sampled`: sampled softmax with shared negatives and log-Q correction, for catalogues too large to score
  in full; negatives drawn uniformly or by popularity^alpha; accidental hits of the positive are masked.
- `bce`: one uniformly sampled negative per position (the original SASRec objective), for comparison.
- `candidate_softmax_loss`: softmax over one candidate set shared by the whole batch (in-batch items +
  sampled negatives); what LSTI's LoRA mode trains with, since it can afford to encode only those items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    name: str = "ce"
    num_negatives: int = 256
    sampler: str = "uniform"  # uniform | popularity
    popularity_alpha: float = 0.75
    logq: bool = True
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ("ce", "sampled", "bce"):
            raise ValueError(f"loss.name={self.name!r}: use ce, sampled or bce.")
        if self.sampler not in ("uniform", "popularity"):
            raise ValueError(f"loss.sampler={self.sampler!r}: use uniform or popularity.")
        if self.num_negatives < 1:
            raise ValueError(f"loss.num_negatives={self.num_negatives} must be >= 1.")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature} must be > 0.")


def negative_distribution(cfg: LossConfig, item_counts: torch.Tensor | None, num_items: int) -> torch.Tensor:
    """Sampling probabilities over items 0..N (padding has probability 0)."""
    if cfg.sampler == "popularity" and item_counts is not None:
        p = item_counts.to(torch.float64).clamp_min(0) ** cfg.popularity_alpha
        p[0] = 0
        if p.sum() > 0:
            return (p / p.sum()).to(torch.float32)
    p = torch.ones(num_items + 1)
    p[0] = 0
    return p / p.sum()


def recommendation_loss(
    states: torch.Tensor,
    targets: torch.Tensor,
    item_table: torch.Tensor,
    cfg: LossConfig,
    neg_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean loss over positions with a target; states [M, D], targets [M] (all > 0), table [N+1, D]."""
    if cfg.name == "ce":
        logits = (states @ item_table.T).float() / cfg.temperature
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)
    if neg_probs is None:
        raise ValueError("sampled/bce losses need the negative sampling distribution.")
    probs = neg_probs.to(states.device)
    pos = (states * item_table[targets]).sum(-1).float()
    if cfg.name == "bce":
        neg_ids = torch.multinomial(probs, targets.shape[0], replacement=True, generator=generator)
        neg = (states * item_table[neg_ids]).sum(-1).float()
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg))
    neg_ids = torch.multinomial(probs, cfg.num_negatives, replacement=True, generator=generator)
    neg = (states @ item_table[neg_ids].T).float()
    if cfg.logq:
        # Expected count of each item in the sample: subtracting its log corrects the sampling bias.
        pos = pos - torch.log(probs[targets] * cfg.num_negatives)
        neg = neg - torch.log(probs[neg_ids] * cfg.num_negatives).unsqueeze(0)
    neg = neg.masked_fill(neg_ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / cfg.temperature
    return F.cross_entropy(logits, torch.zeros_like(targets))


def candidate_softmax_loss(states: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor,
                           candidate_table: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of each target against a candidate set shared by all positions.

    states [M, D]; targets [M] (all > 0); candidates [C] sorted unique item ids (no padding) containing
    every target; candidate_table [C, D] their representations. Every other candidate (other positions'
    inputs and targets, the sampled negatives) is a negative. No log-Q correction: the set is the union of
    in-batch items (drawn by popularity) and uniform samples, whose inclusion probability has no simple
    closed form, so popular items are somewhat over-represented as negatives (the usual in-batch bias;
    more uniform negatives dilute it). Evaluation still ranks the full catalogue.
    """
    logits = (states @ candidate_table.T).float() / temperature
    labels = torch.searchsorted(candidates, targets)
    return F.cross_entropy(logits, labels)
