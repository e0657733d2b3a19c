"""Ranking metrics against slow per-user Python references, plus the invariances evaluation relies on."""

from __future__ import annotations

import math

import pytest
import torch

from training import metrics as M

KS = M.DEFAULT_KS


# ---------------------------------------------------------------------------------------------- references
def naive_rank(row: list[float], target: int, excluded: set[int] = frozenset()) -> int:
    """Sort items 1..N by score; among equal scores the target goes last (pessimistic)."""
    items = [i for i in range(1, len(row)) if i == target or i not in excluded]
    ordered = sorted(items, key=lambda i: (-row[i], i == target))
    return ordered.index(target)


def naive_metrics(rank: int, k: int) -> dict[str, float]:
    hit = rank < k
    return {"hr": float(hit), "ndcg": 1.0 / math.log2(rank + 2) if hit else 0.0,
            "mrr": 1.0 / (rank + 1) if hit else 0.0, "recall": float(hit)}


def random_case(seed: int, b: int = 40, n: int = 50, levels: int = 5):
    """Integer-valued scores (many ties), a padding column that would win if it counted, random targets."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (b, n + 1), generator=g).float()
    scores[:, 0] = 1e9
    targets = torch.randint(1, n + 1, (b,), generator=g)
    exclude = torch.rand(b, n + 1, generator=g) < 0.3
    exclude[torch.arange(b)[: b // 2], targets[: b // 2]] = True  # half the targets are marked as excluded
    return scores, targets, exclude


def excluded_sets(exclude: torch.Tensor | None, b: int) -> list[set[int]]:
    if exclude is None:
        return [set() for _ in range(b)]
    return [set(torch.nonzero(exclude[i]).flatten().tolist()) for i in range(b)]


def random_csr(seed: int, q: int, n: int, max_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (q,), generator=g)
    offsets = torch.zeros(q + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.randint(1, n + 1, (int(offsets[-1]),), generator=g)
    return offsets, values


# ---------------------------------------------------------------------------------------------- full ranking
@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_ranks_and_metrics_match_naive(seed, with_exclude):
    scores, targets, exclude = random_case(seed)
    exclude = exclude if with_exclude else None
    ranks = M.target_ranks(scores, targets, exclude)
    assert ranks.dtype == torch.int64
    sets = excluded_sets(exclude, scores.shape[0])
    expected = [naive_rank(scores[i].tolist(), int(targets[i]), sets[i]) for i in range(scores.shape[0])]
    assert ranks.tolist() == expected

    per_query = M.rank_metrics(ranks, KS)
    assert set(per_query) == {f"{m}@{k}" for m in M.METRIC_NAMES for k in KS}
    for k in KS:
        for name in M.METRIC_NAMES:
            got = per_query[f"{name}@{k}"]
            assert got.dtype == torch.float64
            want = torch.tensor([naive_metrics(r, k)[name] for r in expected], dtype=torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


def test_metric_values_at_known_ranks():
    pq = M.rank_metrics(torch.tensor([0, 1, 4, 5, 9, 10, 19, 20]), (5, 10, 20))
    assert pq["hr@5"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert pq["hr@20"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert pq["ndcg@10"][0].item() == 1.0 and pq["ndcg@10"][1].item() == pytest.approx(1 / math.log2(3))
    assert pq["mrr@10"][4].item() == pytest.approx(0.1) and pq["mrr@10"][5].item() == 0.0
    assert torch.equal(pq["recall@10"], pq["hr@10"])


def test_constant_model_scores_zero():
    n = 30
    ranks = M.target_ranks(torch.full((6, n + 1), 0.37), torch.arange(1, 7))
    assert ranks.tolist() == [n - 1] * 6
    assert all(v == 0.0 for v in M.summarise(M.rank_metrics(ranks, KS)).values())
    # A collapsed model (all item rows equal) ties everywhere in every chunking mode. Integer-valued so the
    # scores are exact: with arbitrary floats BLAS may round equal rows differently (see full_ranking_ranks).
    g = torch.Generator().manual_seed(0)
    table = torch.randint(-3, 4, (1, 16), generator=g).float().repeat(n + 1, 1)
    states = torch.randint(-3, 4, (9, 16), generator=g).float()
    targets = torch.randint(1, n + 1, (9,), generator=g)
    for item_chunk in (None, 1, 7, 64):
        got = M.full_ranking_ranks(states, table, targets, chunk_size=4, item_chunk_size=item_chunk)
        assert got.tolist() == [n - 1] * 9


def test_target_excluded_by_mask_is_still_ranked():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    exclude = torch.tensor([[False, True, True, False, False]])  # marks the target (item 2) too
    assert M.target_ranks(scores, torch.tensor([2]), exclude).tolist() == [0]  # item 1 excluded, 2 kept
    assert M.target_ranks(scores, torch.tensor([4]), exclude).tolist() == [1]  # only item 3 above
    offsets, values = torch.tensor([0, 2]), torch.tensor([1, 2])
    table = torch.tensor([[0.0], [5.0], [4.0], [3.0], [2.0]])
    for item_chunk in (None, 1, 2):
        got = M.full_ranking_ranks(torch.ones(1, 1), table, torch.tensor([2]),
                                   exclude_fn=M.csr_exclude_fn(offsets, values), item_chunk_size=item_chunk)
        assert got.tolist() == [0]


def test_padding_never_counts_and_is_not_a_target():
    scores = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    assert M.target_ranks(scores, torch.tensor([3])).tolist() == [0]
    assert M.target_ranks(scores, torch.tensor([1])).tolist() == [2]
    with pytest.raises(ValueError, match="padding"):
        M.target_ranks(scores, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"1\.\.3"):
        M.target_ranks(scores, torch.tensor([4]))
    # A NaN in the padding column is irrelevant (it is never ranked).
    assert M.target_ranks(torch.tensor([[float("nan"), 1.0, 2.0]]), torch.tensor([1])).tolist() == [1]


def test_nan_scores_raise():
    scores = torch.rand(3, 10)
    scores[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN scores"):
        M.target_ranks(scores, torch.tensor([1, 2, 3]))
    table = torch.randn(10, 4)
    table[6] = float("nan")
    for item_chunk in (None, 3):
        with pytest.raises(ValueError, match="NaN scores"):
            M.full_ranking_ranks(torch.randn(3, 4), table, torch.tensor([1, 2, 3]), item_chunk_size=item_chunk)
    with pytest.raises(ValueError, match="NaN scores"):
        M.sampled_ranks_from_scores(scores, torch.tensor([1, 4, 3]), 3, negatives=torch.tensor([[2, 3, 5]] * 3))
    with pytest.raises(ValueError, match="NaN scores"):
        M.topk_items(scores, 3)


@pytest.mark.parametrize("integer_valued", [True, False])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_full_ranking_chunked_equals_unchunked(integer_valued, with_exclude):
    q, n, d = 37, 53, 8
    g = torch.Generator().manual_seed(3)
    if integer_valued:  # exact scores with lots of ties
        states = torch.randint(-2, 3, (q, d), generator=g).float()
        table = torch.randint(-2, 3, (n + 1, d), generator=g).float()
    else:
        states, table = torch.randn(q, d, generator=g), torch.randn(n + 1, d, generator=g)
    targets = torch.randint(1, n + 1, (q,), generator=g)
    offsets, values = random_csr(4, q, n)
    exclude_fn = M.csr_exclude_fn(offsets, values) if with_exclude else None

    reference = M.full_ranking_ranks(states, table, targets, exclude_fn, chunk_size=10_000)
    exclude = M.seen_mask_from_csr(offsets, values, n + 1) if with_exclude else None
    assert torch.equal(reference, M.target_ranks(states @ table.T, targets, exclude))
    if integer_valued:  # exact scores: also the naive per-user sort
        scores = states @ table.T
        sets = excluded_sets(exclude, q)
        assert reference.tolist() == [naive_rank(scores[i].tolist(), int(targets[i]), sets[i]) for i in range(q)]
    for chunk, item_chunk in [(1, None), (5, None), (5, 1), (5, 7), (16, 52), (64, 53), (3, 1000)]:
        got = M.full_ranking_ranks(states, table, targets, exclude_fn, chunk_size=chunk, item_chunk_size=item_chunk)
        assert torch.equal(got, reference), (chunk, item_chunk)


def test_full_ranking_bf16_inputs_are_scored_in_float32():
    g = torch.Generator().manual_seed(5)
    states, table = torch.randn(20, 16, generator=g).bfloat16(), torch.randn(41, 16, generator=g).bfloat16()
    targets = torch.randint(1, 41, (20,), generator=g)
    want = M.target_ranks(states.float() @ table.float().T, targets)
    assert torch.equal(M.full_ranking_ranks(states, table, targets), want)
    assert torch.equal(M.full_ranking_ranks(states, table, targets, item_chunk_size=6), want)


def test_seen_masks():
    hist = torch.tensor([[0, 0, 3, 1], [2, 2, 2, 5], [0, 0, 0, 0]])
    mask = M.seen_mask(hist, 6)
    assert mask.tolist() == [[False, True, False, True, False, False], [False, False, True, False, False, True],
                             [False] * 6]
    offsets, values = torch.tensor([0, 2, 6, 6]), torch.tensor([3, 1, 2, 2, 2, 5])
    assert torch.equal(M.seen_mask_from_csr(offsets, values, 6), mask)
    assert torch.equal(M.csr_exclude_fn(offsets, values)(torch.tensor([1, 0]), 2, 5), mask[[1, 0], 2:5])
    offsets, values = random_csr(0, 30, 40)
    full = M.seen_mask_from_csr(offsets, values, 41)
    for i in range(30):
        assert set(torch.nonzero(full[i]).flatten().tolist()) == set(values[offsets[i]:offsets[i + 1]].tolist())


@pytest.mark.parametrize("with_exclude", [False, True])
def test_topk_items_match_naive(with_exclude):
    scores, _, exclude = random_case(7, b=25, n=30, levels=4)
    exclude = exclude if with_exclude else None
    sets = excluded_sets(exclude, 25)
    for k, chunk in [(1, None), (5, 4), (12, None), (100, 7)]:
        values, ids = M.topk_items(scores, k, exclude, chunk_size=chunk)
        assert ids.shape == (25, min(k, 30))
        for i in range(25):
            allowed = [j for j in range(1, 31) if j not in sets[i]]
            want = sorted(allowed, key=lambda j: (-scores[i, j].item(), j))[:k]
            want += [0] * (ids.shape[1] - len(want))
            assert ids[i].tolist() == want
            assert values[i].tolist() == [scores[i, j].item() if j else float("-inf") for j in want]


# ---------------------------------------------------------------------------------------------- sampled mode
@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampled_ranks_match_naive_and_are_deterministic(sampler):
    q, n, d, neg = 50, 40, 6, 15
    g = torch.Generator().manual_seed(11)
    states = torch.randint(-2, 3, (q, d), generator=g).float()
    table = torch.randint(-2, 3, (n + 1, d), generator=g).float()
    targets = torch.randint(1, n + 1, (q,), generator=g)
    counts = torch.randint(0, 20, (n + 1,), generator=g)
    counts[1] = 0
    negs = M.sample_negatives(targets, neg, sampler, counts, torch.Generator().manual_seed(1))
    assert negs.shape == (q, neg)
    assert bool((negs >= 1).all()) and bool((negs <= n).all()) and not bool((negs == targets[:, None]).any())
    if sampler == "popularity":
        assert not bool((counts[negs] == 0).any())
    again = M.sample_negatives(targets, neg, sampler, counts, torch.Generator().manual_seed(1))
    assert torch.equal(negs, again)

    scores = states @ table.T
    expected = [sum(scores[i, j].item() >= scores[i, targets[i]].item() for j in negs[i].tolist()) for i in range(q)]
    from_scores = M.sampled_ranks_from_scores(scores, targets, neg, sampler, counts, torch.Generator().manual_seed(1))
    from_emb = M.sampled_ranks(states, table, targets, neg, sampler, counts, torch.Generator().manual_seed(1))
    given = M.sampled_ranks(states, table, targets, neg, negatives=negs)
    assert from_scores.tolist() == expected and from_emb.tolist() == expected and given.tolist() == expected
    assert bool((from_scores <= M.full_ranking_ranks(states, table, targets)).all())  # sampled is optimistic


def test_sampled_ranks_pessimistic_ties():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])
    negs = torch.tensor([[2, 3, 4, 2]])
    assert M.sampled_ranks_from_scores(scores, torch.tensor([1]), 4, negatives=negs).tolist() == [4]
    assert M.sampled_ranks_from_scores(scores, torch.tensor([4]), 4, negatives=torch.tensor([[1, 2, 3, 3]])).tolist() == [0]


def test_popularity_sampler_follows_counts():
    counts = torch.tensor([50, 1, 2, 3, 0, 10, 4])  # padding count must be ignored
    target = 3
    negs = M.sample_negatives(torch.full((400,), target), 500, "popularity", counts, torch.Generator().manual_seed(0))
    freq = torch.bincount(negs.flatten(), minlength=7).double() / negs.numel()
    want = counts.double()
    want[0] = want[target] = 0
    want /= want.sum()
    assert freq[0] == 0 and freq[target] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, want, atol=0.005, rtol=0)


def test_uniform_sampler_is_uniform_over_other_items():
    negs = M.sample_negatives(torch.full((400,), 2), 500, "uniform", generator=torch.Generator().manual_seed(0),
                              num_items=5)
    freq = torch.bincount(negs.flatten(), minlength=6).double() / negs.numel()
    torch.testing.assert_close(freq, torch.tensor([0, 0.25, 0, 0.25, 0.25, 0.25], dtype=torch.float64),
                               atol=0.005, rtol=0)
    with pytest.raises(ValueError, match="sampler"):
        M.sample_negatives(torch.tensor([1]), 3, "zipf", num_items=5)


# ---------------------------------------------------------------------------------------------- reduction, slices
def test_summarise_is_bitwise_order_invariant():
    g = torch.Generator().manual_seed(0)
    q = 5000
    ranks = torch.randint(0, 40, (q,), generator=g)
    per_query = M.rank_metrics(ranks, KS)
    per_query["noise"] = torch.rand(q, generator=g, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (q,),
                                                                                                generator=g)
    query = torch.arange(q)
    lengths = torch.randint(1, 40, (q,), generator=g)
    slices = M.user_length_slices(lengths)
    base = M.summarise(per_query, query)
    base_sliced = M.sliced_summary(per_query, slices, query)
    for seed in range(3):
        perm = torch.randperm(q, generator=torch.Generator().manual_seed(seed))
        shuffled = {k: v[perm] for k, v in per_query.items()}
        assert M.summarise(shuffled, query[perm]) == base
        assert M.sliced_summary(shuffled, {k: v[perm] for k, v in slices.items()}, query[perm]) == base_sliced
        # exact summation: even without the query index the means do not depend on order
        assert M.summarise(shuffled) == base
    assert base["hr@10"] == pytest.approx(float((ranks < 10).double().mean()))
    assert math.isnan(M.summarise({"hr@10": torch.zeros(0, dtype=torch.float64)})["hr@10"])


def test_user_length_slices_partition_and_names():
    lengths = torch.tensor([1, 5, 6, 20, 21, 100, 0])
    slices = M.user_length_slices(lengths, (5, 20))
    assert list(slices) == ["users_len<=5", "users_len6-20", "users_len>20"]
    assert slices["users_len<=5"].tolist() == [True, True, False, False, False, False, True]
    assert slices["users_len6-20"].tolist() == [False, False, True, True, False, False, False]
    assert list(M.user_length_slices(lengths, (2, 3, 10))) == ["users_len<=2", "users_len3", "users_len4-10",
                                                              "users_len>10"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 60, (500,), generator=g)
    for bins in [(5, 20), (1,), (3, 7, 30, 31)]:
        stacked = torch.stack(list(M.user_length_slices(lengths, bins).values()))
        assert bool((stacked.sum(0) == 1).all())
    with pytest.raises(ValueError, match="increasing"):
        M.user_length_slices(lengths, (20, 5))


def test_item_popularity_slices_partition_and_tie_break():
    counts = torch.tensor([99, 5, 9, 5, 1, 5, 0, 2, 5, 3, 7])  # N = 10 -> head = top 2 (items 2 and 10)
    targets = torch.arange(1, 11)
    s = M.item_popularity_slices(targets, counts, 0.2)
    assert targets[s["items_head"]].tolist() == [2, 10]
    assert bool((s["items_head"] ^ s["items_tail"]).all())
    s = M.item_popularity_slices(targets, counts, 0.4)  # 4: items 2, 10, then ties at 5 -> lowest ids 1, 3
    assert targets[s["items_head"]].tolist() == [1, 2, 3, 10]
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (201,), generator=g)
    assert int(M.head_items(counts, 0.2).sum()) == 40 and not bool(M.head_items(counts, 0.2)[0])


def test_sliced_summary_keys_and_values():
    ranks = torch.tensor([0, 3, 12, 30])
    per_query = M.rank_metrics(ranks, (10,))
    slices = {"a": torch.tensor([True, False, True, False]), "empty": torch.zeros(4, dtype=torch.bool)}
    out = M.sliced_summary(per_query, slices)
    assert out["a/count"] == 2.0 and out["a/hr@10"] == 0.5 and out["a/mrr@10"] == 0.5
    assert out["empty/count"] == 0.0 and "empty/hr@10" not in out
    assert set(out) == {"a/count", "empty/count"} | {f"a/{m}@10" for m in M.METRIC_NAMES}


def test_query_uniforms_do_not_depend_on_batching():
    from training.metrics import query_uniforms, sample_negatives

    q = torch.arange(50)
    whole = query_uniforms(q, 7, seed=3)
    parts = torch.cat([query_uniforms(q[:17], 7, seed=3), query_uniforms(q[17:], 7, seed=3)])
    assert torch.equal(whole, parts) and whole.min() >= 0 and whole.max() < 1
    assert abs(whole.mean().item() - 0.5) < 0.05
    targets = torch.randint(1, 11, (50,), generator=torch.Generator().manual_seed(0))
    for sampler in ("uniform", "popularity"):
        neg = sample_negatives(targets, 7, sampler, torch.arange(11), uniforms=whole)
        assert (neg != targets.unsqueeze(1)).all() and neg.min() >= 1 and neg.max() <= 10
