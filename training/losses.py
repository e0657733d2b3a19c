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
    # Items with no training interaction (held-out cold items, items seen only as valid/test targets) are not
    # in the training catalogue: out of the softmax and never drawn as negatives. A live system could not
    # have trained against items that did not exist yet, and as ever-negative items the model would learn
    # to bury them, which defeats text-based cold-start.
    exclude_unseen: bool = True
    # Neighbour distillation (after LLM-ESR's retrieval-augmented self-distillation; training/neighbours.py): adds
    # this weight times KL(teacher || model) at each training window's newest position, where the teacher is the
    # mean next-item distribution of the user's `neighbours` most similar users (retrieved once from the training
    # events by `neighbour_key`: items | text), so what similar users do informs a short history. 0: off.
    neighbour_distill: float = 0.0
    neighbours: int = 10
    neighbour_key: str = "items"

    def __post_init__(self) -> None:
        if self.name not in ("ce", "sampled", "bce"):
            raise ValueError(f"loss.name={self.name!r}: use ce, sampled or bce.")
        if self.sampler not in ("uniform", "popularity"):
            raise ValueError(f"loss.sampler={self.sampler!r}: use uniform or popularity.")
        if self.num_negatives < 1:
            raise ValueError(f"loss.num_negatives={self.num_negatives} must be >= 1.")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature={self.temperature} must be > 0.")
        if self.neighbour_distill < 0:
            raise ValueError(f"loss.neighbour_distill={self.neighbour_distill} must be >= 0 (0 turns it off).")
        if self.neighbours < 1:
            raise ValueError(f"loss.neighbours={self.neighbours} must be >= 1.")
        if self.neighbour_key not in ("items", "text"):
            raise ValueError(f"loss.neighbour_key={self.neighbour_key!r}: use items or text.")


def negative_distribution(cfg: LossConfig, item_counts: torch.Tensor | None, num_items: int,
                          item_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling probabilities over items 0..N (padding, and items outside `item_mask`, have probability 0)."""
    p = _negative_weights(cfg, item_counts, num_items)
    if item_mask is not None and bool(item_mask[1:].any()):
        p = p * item_mask.to(p.dtype)
    return p / p.sum()


def _negative_weights(cfg: LossConfig, item_counts: torch.Tensor | None, num_items: int) -> torch.Tensor:
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
    item_mask: torch.Tensor | None = None,
    sparse_rows: bool = False,
) -> torch.Tensor:
    """Mean loss over positions with a target; states [M, D], targets [M] (all > 0), table [N+1, D].

    `item_mask` [N+1] bool: the items full softmax may score (the training catalogue); sampled losses take
    the same restriction through `neg_probs` (zero outside it). `sparse_rows`: sampled losses look rows up
    with row-sparse gradients (optim.sparse_item_grad)."""

    def rows(ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, item_table, sparse=sparse_rows)

    if cfg.name == "ce":
        logits = (states @ item_table.T).float() / cfg.temperature
        if item_mask is not None:
            logits = logits.masked_fill(~item_mask.to(logits.device), float("-inf"))
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)
    if neg_probs is None:
        raise ValueError("sampled/bce losses need the negative sampling distribution.")
    probs = neg_probs.to(states.device)
    pos = (states * rows(targets)).sum(-1).float()
    if cfg.name == "bce":
        neg_ids = torch.multinomial(probs, targets.shape[0], replacement=True, generator=generator)
        neg = (states * rows(neg_ids)).sum(-1).float()
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg))
    neg_ids = torch.multinomial(probs, cfg.num_negatives, replacement=True, generator=generator)
    neg = (states @ rows(neg_ids).T).float()
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


def neighbour_distill_loss(student: torch.Tensor, teachers: torch.Tensor, usable: torch.Tensor,
                           table: torch.Tensor, item_mask: torch.Tensor | None = None,
                           temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) over the rows that have a teacher; 0 (with a graph) when none has.

    student [B, D]: the users' states; teachers [B, k, D]: their neighbours' (banked, no gradient); usable [B, k]
    bool: which neighbours count. The teacher of a row is the mean of its usable neighbours' softmax
    distributions over `table` [C, D] (the catalogue, or a candidate set; `item_mask` [C] bool: the items that may
    be scored, e.g. the training catalogue; the padding row is masked when `table` is the catalogue). The loss
    is in score space on purpose: a squared distance between states can be shrunk by scaling every state down
    (the item table scaling up), which leaves the ranking as it was while the term vanishes; a distribution
    cannot be moved that way without moving the recommendation loss too."""
    taught = usable.any(1)
    if not bool(taught.any()):
        return student.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) alike on every step
    student, teachers, usable = student[taught], teachers[taught], usable[taught]

    def log_probs(states: torch.Tensor) -> torch.Tensor:
        logits = (states @ table.T).float() / temperature
        if item_mask is not None:
            logits = logits.masked_fill(~item_mask.to(logits.device), float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    with torch.no_grad():  # one neighbour at a time: [B, C] memory, as the loss itself
        weights = usable.to(torch.float32) / usable.sum(1, keepdim=True)
        teacher = sum(log_probs(teachers[:, j]).exp() * weights[:, j:j + 1] for j in range(teachers.shape[1]))
        entropy = -(teacher * teacher.clamp_min(1e-30).log()).sum(-1)
    cross = -(teacher * log_probs(student).clamp_min(-1e30)).sum(-1)  # clamp: 0 * -inf on masked items
    return (cross - entropy).mean()
