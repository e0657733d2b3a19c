"""Ranking metrics for next-item recommendation (pure torch, no Lightning).

Contract (see docs/architecture.md, "Metrics"): per query, the 0-based *pessimistic* rank of the target
among all real items 1..N is

    rank = #{i : s_i > s_t} + #{i != t : s_i == s_t}

Column 0 (padding) never counts, nor do items an exclusion mask marks (``filter_seen``); the target itself is
always ranked even if the mask marks it (repeat consumption). Pessimistic ties mean a model that scores
everything equally gets rank N-1, i.e. all metrics zero, instead of being rewarded for ties.

From the rank: HR@k = [rank < k], NDCG@k = 1/log2(rank+2), MRR@k = 1/(rank+1) (both 0 when rank >= k),
Recall@k = HR@k (one target per query).

Two evaluation modes exist and must never be mixed up in reports:

* **full ranking** (`target_ranks`, `full_ranking_ranks`): the target against the whole catalogue. This is
  the number the project reports.
* **sampled** (`sampled_ranks`, `sampled_ranks_from_scores`): the target against `num_negatives` sampled
  items only. It is much more optimistic and not comparable with full ranking; it exists only to compare with
  papers that use it, and results carry a ``sampled_<sampler><n>/`` prefix.

Per-query values are reduced with an exactly rounded sum (`math.fsum`) after sorting by query index, so an
N-process evaluation (gathered) equals a 1-process one to the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
METRIC_NAMES: tuple[str, ...] = ("hr", "ndcg", "mrr", "recall")

# exclude_fn(query_idx [q], item_start, item_stop) -> bool [q, item_stop - item_start] (or None): which items
# must not count for these queries, restricted to the item range being scored. Taking a range (not the full
# catalogue) keeps memory bounded when items are scored in chunks.
ExcludeFn = Callable[[Tensor, int, int], "Tensor | None"]

_NAN_MESSAGE = ("the model produced NaN scores; ranks would be meaningless. Check for a diverged loss, a NaN "
                "learning rate or NaN/inf embeddings (e.g. item_table()) before evaluating.")


# ---------------------------------------------------------------------------------------------- checks
def _check_targets(targets: Tensor, num_items: int) -> None:
    """A target of 0 (padding) or > N would silently rank garbage, so refuse it."""
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [Q], got shape {tuple(targets.shape)}.")
    if targets.numel() and (bool((targets < 1).any()) or bool((targets > num_items).any())):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(f"targets must be item ids in 1..{num_items} (0 is padding); got values in [{lo}, {hi}].")


def _check_no_nan(scores: Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise ValueError(_NAN_MESSAGE)


# ---------------------------------------------------------------------------------------------- ranks
def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based pessimistic rank of each target among items 1..N; int64 [B].

    One comparison against the target score (no sort), so it is O(B*N). The target is removed from the
    count by its id, not by score equality, so the result does not depend on the target comparing equal to
    itself. NaN scores raise ValueError: silently ranking NaN would report a broken model as a working one.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N+1], got shape {tuple(scores.shape)}.")
    _check_targets(targets, scores.shape[1] - 1)
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {scores.shape[0]} score rows.")
    _check_no_nan(scores[:, 1:])
    idx = targets.to(device=scores.device, dtype=torch.int64).unsqueeze(1)
    counted = scores >= scores.gather(1, idx)
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude mask shape {tuple(exclude.shape)} != scores shape {tuple(scores.shape)}.")
        counted &= ~exclude.to(device=scores.device, dtype=torch.bool)
    counted[:, 0] = False  # padding never counts
    counted.scatter_(1, idx, False)  # the target is not ranked against itself
    return counted.sum(dim=1, dtype=torch.int64)


def seen_mask(histories_items: Tensor, num_items_plus_one: int) -> Tensor:
    """bool [B, N+1]: True where the item is in the user's (0-padded) history; for ``filter_seen``."""
    b = histories_items.shape[0]
    mask = torch.zeros(b, num_items_plus_one, dtype=torch.bool, device=histories_items.device)
    mask.scatter_(1, histories_items.to(torch.int64), True)
    mask[:, 0] = False  # padding is not an item someone saw
    return mask


def seen_mask_from_csr(offsets: Tensor, values: Tensor, num_cols: int) -> Tensor:
    """bool [B, num_cols] from CSR histories (row b = values[offsets[b]:offsets[b+1]]), fully vectorised."""
    offsets = offsets.to(torch.int64)
    b = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    vals = values[int(offsets[0]): int(offsets[-1])].to(device=values.device, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(b, device=values.device), lengths.to(values.device))
    mask = torch.zeros(b, num_cols, dtype=torch.bool, device=values.device)
    mask[rows, vals] = True
    mask[:, 0] = False
    return mask


def csr_exclude_fn(offsets: Tensor, values: Tensor) -> ExcludeFn:
    """An `ExcludeFn` for `full_ranking_ranks` from per-query CSR seen lists (query q's items are
    values[offsets[q]:offsets[q+1]]); it only materialises the requested item range."""
    offsets = offsets.to(torch.int64)

    def exclude(query_idx: Tensor, start: int, stop: int) -> Tensor:
        qi = query_idx.to(device=offsets.device, dtype=torch.int64)
        begin, end = offsets[qi], offsets[qi + 1]
        lengths = end - begin
        rows = torch.repeat_interleave(torch.arange(qi.shape[0], device=offsets.device), lengths)
        row_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        flat = torch.repeat_interleave(begin, lengths) + torch.arange(rows.shape[0], device=offsets.device) - row_start
        vals = values[flat].to(torch.int64)
        keep = (vals >= start) & (vals < stop)
        mask = torch.zeros(qi.shape[0], stop - start, dtype=torch.bool, device=offsets.device)
        mask[rows[keep], vals[keep] - start] = True
        return mask

    return exclude


def full_ranking_ranks(user_states: Tensor, item_table: Tensor, targets: Tensor, exclude_fn: ExcludeFn | None = None,
                       chunk_size: int = 1024, item_chunk_size: int | None = None) -> Tensor:
    """Full-ranking ranks for Q queries (scores = user_states @ item_table.T, in float32); int64 [Q].

    Queries are scored `chunk_size` at a time. With `item_chunk_size` (< N+1) items are scored in chunks too
    and the >=-counts accumulated per chunk, so peak memory is chunk_size x item_chunk_size whatever the
    catalogue size. That mode takes two passes over the items (the first only reads the target scores) so
    that the target score comes from the very same matmul as the scores it is compared with: a separately
    computed dot product can differ by an ulp and turn a tie (e.g. a collapsed model) into a win.
    Inputs are cast to float32 so bf16/fp16 models are ranked at full precision.

    Chunked and unchunked results are bitwise equal whenever the scores are exact (e.g. integer-valued) or no
    other item lies within float32 rounding of the target score. BLAS (MKL, cuBLAS) does not promise the same
    rounding for equal dot products computed in different calls, shapes, or even columns of one call, so two
    items with *identical* embeddings may score 1 ulp apart; such ties are then broken by rounding noise, in
    any mode (`target_ranks` on `model.score` output included).
    """
    if chunk_size < 1 or (item_chunk_size is not None and item_chunk_size < 1):
        raise ValueError(f"chunk sizes must be >= 1 (chunk_size={chunk_size}, item_chunk_size={item_chunk_size}).")
    num_cols = item_table.shape[0]
    _check_targets(targets, num_cols - 1)
    device = user_states.device
    targets = targets.to(device=device, dtype=torch.int64)
    table = item_table.to(device=device, dtype=torch.float32)
    q_total = user_states.shape[0]
    ranks = torch.empty(q_total, dtype=torch.int64, device=device)

    if item_chunk_size is None or item_chunk_size >= num_cols:
        table_t = table.T
        for s in range(0, q_total, chunk_size):
            e = min(s + chunk_size, q_total)
            scores = user_states[s:e].float() @ table_t
            exclude = exclude_fn(torch.arange(s, e, device=device), 0, num_cols) if exclude_fn else None
            ranks[s:e] = target_ranks(scores, targets[s:e], exclude)
        return ranks

    bounds = [(a, min(a + item_chunk_size, num_cols)) for a in range(1, num_cols, item_chunk_size)]  # skip pad
    for s in range(0, q_total, chunk_size):
        e = min(s + chunk_size, q_total)
        states = user_states[s:e].float()
        t = targets[s:e]
        rows = torch.arange(e - s, device=device)
        target_score = torch.empty(e - s, dtype=torch.float32, device=device)
        for a, b in bounds:  # pass 1: the target scores, each from its own item chunk's matmul
            inside = (t >= a) & (t < b)
            if bool(inside.any()):
                scores = states @ table[a:b].T
                target_score[inside] = scores[rows[inside], t[inside] - a]
        count = torch.zeros(e - s, dtype=torch.int64, device=device)
        for a, b in bounds:  # pass 2: count items scoring >= the target
            scores = states @ table[a:b].T
            _check_no_nan(scores)
            counted = scores >= target_score.unsqueeze(1)
            inside = (t >= a) & (t < b)
            counted[rows[inside], t[inside] - a] = False
            if exclude_fn is not None:
                exclude = exclude_fn(torch.arange(s, e, device=device), a, b)
                if exclude is not None:
                    counted &= ~exclude.to(device=device, dtype=torch.bool)
            count += counted.sum(dim=1, dtype=torch.int64)
        ranks[s:e] = count
    return ranks


def topk_items(scores: Tensor, k: int, exclude: Tensor | None = None,
               chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-k real items per row: (values [B, k'] float, item ids [B, k'] int64), k' = min(k, N).

    Padding (column 0) and excluded items are never returned. Ties are broken by the lower item id, so lists
    are deterministic across devices and runs (torch.topk alone does not promise a tie order). Rows with fewer
    than k' allowed items are padded with id 0 and value -inf. Rows are processed `chunk_size` at a time to
    bound the memory of the masked copy.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N+1], got shape {tuple(scores.shape)}.")
    if exclude is not None and exclude.shape != scores.shape:
        raise ValueError(f"exclude mask shape {tuple(exclude.shape)} != scores shape {tuple(scores.shape)}.")
    b_total, num_cols = scores.shape
    kk = max(0, min(int(k), num_cols - 1))
    values = torch.full((b_total, kk), float("-inf"), dtype=scores.dtype, device=scores.device)
    indices = torch.zeros(b_total, kk, dtype=torch.int64, device=scores.device)
    if kk == 0 or b_total == 0:
        return values, indices
    _check_no_nan(scores[:, 1:])
    step = chunk_size or b_total
    col_ids = torch.arange(num_cols, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    for s in range(0, b_total, step):
        e = min(s + step, b_total)
        sc = scores[s:e]
        allowed = torch.ones_like(sc, dtype=torch.bool)
        allowed[:, 0] = False
        if exclude is not None:
            allowed &= ~exclude[s:e].to(device=sc.device, dtype=torch.bool)
        masked = torch.where(allowed, sc, neg_inf)
        kth = masked.topk(kk, dim=1).values[:, -1:]  # k-th largest allowed score (-inf if too few allowed)
        above = allowed & (sc > kth)
        ties = allowed & (sc == kth)
        need = kk - above.sum(dim=1, keepdim=True)
        selected = above | (ties & (torch.cumsum(ties, dim=1) <= need))  # lowest ids win ties at the boundary
        slot = torch.where(selected, torch.cumsum(selected, dim=1) - 1, kk)  # slot kk is a discard column
        ids = torch.zeros(e - s, kk + 1, dtype=torch.int64, device=sc.device)
        ids.scatter_(1, slot, col_ids.expand(e - s, -1))
        ids = ids[:, :kk]
        filled = torch.arange(kk, device=sc.device).unsqueeze(0) < selected.sum(dim=1, keepdim=True)
        ids = torch.where(filled, ids, 0)
        vals = torch.where(filled, sc.gather(1, ids), neg_inf)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices  # ids ascending -> ties by id
        values[s:e] = vals.gather(1, order)
        indices[s:e] = ids.gather(1, order)
    return values, indices


# ---------------------------------------------------------------------------------------------- sampled mode
def query_uniforms(query: Tensor, n: int, seed: int = 0) -> Tensor:
    """[Q, n] float64 uniforms in [0, 1) that depend only on (query index, column, seed).

    A counter-based hash (splitmix64 finaliser), so sampled metrics do not depend on how queries are
    batched or split across processes: N processes draw exactly the negatives 1 process draws.
    """
    mask = (1 << 63) - 1
    x = (query.to(torch.int64).unsqueeze(1) * n + torch.arange(n, device=query.device)) & mask
    x = (x + (seed * 0x9E3779B97F4A7C15 & mask) + 1) & mask
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * (mult & mask)) & mask
    x = x ^ (x >> 31)
    return (x >> 11).to(torch.float64) / float(1 << 52)


def sample_negatives(targets: Tensor, num_negatives: int, sampler: str = "uniform", item_counts: Tensor | None = None,
                     generator: torch.Generator | None = None, num_items: int | None = None,
                     uniforms: Tensor | None = None) -> Tensor:
    """[Q, num_negatives] negative item ids for the *sampled* metrics; never padding, never the target.

    `uniforms` ([Q, n] in [0, 1), e.g. from `query_uniforms`) replaces the generator's draws.
    Sampled with replacement (a negative may repeat within a row; each copy counts), which keeps sampling
    O(Q * n) and exactly distributed: uniform over the other N-1 items, or for ``popularity`` proportional to
    `item_counts` restricted to the other items (inverse CDF with the target's mass cut out, no rejection
    loop). Runs on the generator's device, so a seeded generator gives the same negatives everywhere.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives={num_negatives} must be >= 1.")
    if item_counts is not None:
        num_items = item_counts.shape[0] - 1
    if num_items is None:
        raise ValueError("sample_negatives needs num_items or item_counts.")
    _check_targets(targets, num_items)
    dev = generator.device if generator is not None else targets.device
    t = targets.to(device=dev, dtype=torch.int64).unsqueeze(1)
    q = t.shape[0]
    if sampler == "uniform":
        if num_items < 2:
            raise ValueError("uniform negative sampling needs at least 2 items.")
        if uniforms is not None:
            draw = (uniforms.to(dev) * (num_items - 1)).to(torch.int64).clamp_(0, num_items - 2) + 1
        else:
            draw = torch.randint(1, num_items, (q, num_negatives), generator=generator, device=dev)  # 1..N-1
        return draw + (draw >= t).to(torch.int64)  # skip over the target: uniform on {1..N} \ {t}
    if sampler == "popularity":
        if item_counts is None:
            raise ValueError("popularity negative sampling needs item_counts (training counts, [N+1]).")
        counts = item_counts.to(device=dev, dtype=torch.float64).clone()
        if bool((counts < 0).any()):
            raise ValueError("item_counts must be >= 0.")
        counts[0] = 0.0
        cdf = torch.cumsum(counts, 0)
        c_t = counts[t]  # [Q, 1]
        mass = cdf[-1] - c_t
        if bool((mass <= 0).any()):
            raise ValueError("popularity sampling: some target is the only item with a nonzero count.")
        if uniforms is None:
            uniforms = torch.rand(q, num_negatives, generator=generator, device=dev, dtype=torch.float64)
        u = uniforms.to(device=dev, dtype=torch.float64) * mass
        u = torch.minimum(u, torch.nextafter(mass, torch.zeros_like(mass)))  # rand*mass may round up to mass
        before = cdf[t - 1]  # mass of items < t
        u = torch.where(u >= before, u + c_t, u)  # jump over the target's interval
        draw = torch.searchsorted(cdf, u, right=True).clamp_(1, num_items)
        return draw
    raise ValueError(f"unknown sampler {sampler!r}: use 'uniform' or 'popularity'.")


def _sampled_rank(target_score: Tensor, negative_scores: Tensor) -> Tensor:
    _check_no_nan(target_score)
    _check_no_nan(negative_scores)
    return (negative_scores >= target_score.unsqueeze(1)).sum(dim=1, dtype=torch.int64)  # pessimistic ties


def sampled_ranks_from_scores(scores: Tensor, targets: Tensor, num_negatives: int, sampler: str = "uniform",
                              item_counts: Tensor | None = None, generator: torch.Generator | None = None,
                              negatives: Tensor | None = None) -> Tensor:
    """SAMPLED mode: rank of the target among itself + `num_negatives` sampled items, from full scores.

    Pessimistic ties (a negative scoring equal to the target counts as above it). Pass `negatives`
    ([Q, n]) to rank against given items instead of sampling.
    """
    if negatives is None:
        negatives = sample_negatives(targets, num_negatives, sampler, item_counts, generator,
                                     num_items=scores.shape[1] - 1)
    _check_targets(targets, scores.shape[1] - 1)
    t = targets.to(device=scores.device, dtype=torch.int64).unsqueeze(1)
    neg = negatives.to(device=scores.device, dtype=torch.int64)
    return _sampled_rank(scores.gather(1, t).squeeze(1), scores.gather(1, neg))


def sampled_ranks(user_states: Tensor, item_table: Tensor, targets: Tensor, num_negatives: int,
                  sampler: str = "uniform", item_counts: Tensor | None = None,
                  generator: torch.Generator | None = None, negatives: Tensor | None = None) -> Tensor:
    """SAMPLED mode from embeddings: scores only the target and its negatives (float32), O(Q * n * D).

    Target and negatives are scored by the same batched product, so ties are genuine ties.
    """
    num_items = item_table.shape[0] - 1
    if negatives is None:
        negatives = sample_negatives(targets, num_negatives, sampler, item_counts, generator, num_items=num_items)
    _check_targets(targets, num_items)
    dev = user_states.device
    cand = torch.cat([targets.to(device=dev, dtype=torch.int64).unsqueeze(1),
                      negatives.to(device=dev, dtype=torch.int64)], dim=1)  # [Q, 1+n]
    emb = item_table.to(dev)[cand].float()  # [Q, 1+n, D]
    scores = torch.bmm(emb, user_states.float().unsqueeze(2)).squeeze(2)  # [Q, 1+n]
    return _sampled_rank(scores[:, 0], scores[:, 1:])


# ---------------------------------------------------------------------------------------------- metrics
def rank_metrics(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Per-query float64 values `hr@k`, `ndcg@k`, `mrr@k`, `recall@k` for each k; reduce with `summarise`."""
    r = ranks.to(torch.float64)
    gain_ndcg = 1.0 / torch.log2(r + 2.0)
    gain_mrr = 1.0 / (r + 1.0)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = ranks < int(k)
        zero = torch.zeros_like(r)
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, gain_ndcg, zero)
        out[f"mrr@{k}"] = torch.where(hit, gain_mrr, zero)
        out[f"recall@{k}"] = hit.to(torch.float64)  # one target per query: recall == hit rate
    return out


def _exact_mean(values: Tensor) -> float:
    """Correctly rounded mean: `math.fsum` is exact, so the result does not depend on summation order,
    chunking or thread count (torch.sum's parallel reduction does)."""
    n = values.numel()
    if n == 0:
        return float("nan")
    return math.fsum(values.detach().to(device="cpu", dtype=torch.float64).tolist()) / n


def summarise(per_query: dict[str, Tensor], query_index: Tensor | None = None) -> dict[str, float]:
    """Mean over queries of each per-query metric (NaN when there are no queries).

    With `query_index` the values are first put in query order, the canonical order for gathered
    multi-process results; the float64 sum is exactly rounded on top, so N processes == 1 process bitwise.
    """
    order = None
    if query_index is not None:
        order = torch.argsort(query_index.detach().cpu(), stable=True)
    out: dict[str, float] = {}
    for name, values in per_query.items():
        v = values.detach().cpu()
        out[name] = _exact_mean(v[order] if order is not None else v)
    return out


# ---------------------------------------------------------------------------------------------- slices
def user_length_slices(train_lengths: Tensor, bins: Sequence[int] = (5, 20)) -> dict[str, Tensor]:
    """Partition queries by the user's number of training events: `users_len<=b0`, `users_len{b0+1}-{b1}`,
    ..., `users_len>{b_last}` (short-history users are where sequential models differ most)."""
    edges = [int(b) for b in bins]
    if any(b >= c for b, c in zip(edges, edges[1:])):
        raise ValueError(f"length bins must be strictly increasing, got {list(bins)}.")
    if not edges:
        return {}
    n = train_lengths
    out = {f"users_len<={edges[0]}": n <= edges[0]}
    for lo, hi in zip(edges, edges[1:]):
        name = f"users_len{lo + 1}" if lo + 1 == hi else f"users_len{lo + 1}-{hi}"
        out[name] = (n > lo) & (n <= hi)
    out[f"users_len>{edges[-1]}"] = n > edges[-1]
    return out


def head_items(item_counts: Tensor, head_fraction: float = 0.2) -> Tensor:
    """bool [N+1]: the floor(head_fraction * N) most popular items by training count, ties by lower id."""
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction={head_fraction} must be in [0, 1].")
    num_items = item_counts.shape[0] - 1
    n_head = min(num_items, int(math.floor(head_fraction * num_items + 1e-9)))
    order = torch.argsort(item_counts[1:].detach().cpu(), descending=True, stable=True) + 1
    is_head = torch.zeros(num_items + 1, dtype=torch.bool)
    is_head[order[:n_head]] = True
    return is_head


def item_popularity_slices(targets: Tensor, item_counts: Tensor, head_fraction: float = 0.2) -> dict[str, Tensor]:
    """`items_head` / `items_tail`: is the target among the most popular items (by training count)?"""
    is_head = head_items(item_counts, head_fraction).to(targets.device)
    head = is_head[targets.to(torch.int64)]
    return {"items_head": head, "items_tail": ~head}


def sliced_summary(per_query: dict[str, Tensor], slices: dict[str, Tensor],
                   query_index: Tensor | None = None) -> dict[str, float]:
    """`<slice>/<metric>` means plus `<slice>/count`; empty slices report only their count (no NaNs)."""
    out: dict[str, float] = {}
    order = torch.argsort(query_index.detach().cpu(), stable=True) if query_index is not None else None
    for sname, mask in slices.items():
        m = mask.detach().cpu().to(torch.bool)
        if order is not None:
            m = m[order]
        count = int(m.sum())
        out[f"{sname}/count"] = float(count)
        if count == 0:
            continue
        for name, values in per_query.items():
            v = values.detach().cpu()
            if order is not None:
                v = v[order]
            out[f"{sname}/{name}"] = _exact_mean(v[m])
    return out
