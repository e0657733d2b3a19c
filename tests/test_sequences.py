import numpy as np
import pandas as pd
import pytest
import torch

from training.data.datamodule import EvalQueries, ShardedBatchSampler, TrainWindows
from training.data.errors import DataError
from training.data.sequences import PreprocessConfig, SequenceData, build_sequences


def test_chronological_with_stable_ties():
    df = pd.DataFrame({"user": ["a"] * 4 + ["b"] * 3, "item": ["x", "y", "z", "w", "x", "y", "z"],
                       "time": [5, 1, 1, 3, 2, 2, 2]})
    d = build_sequences(df, PreprocessConfig())
    seq_a = [d.item_ids[i] for i in d.items[d.offsets[0]:d.offsets[1]]]
    assert seq_a == ["y", "z", "w", "x"]  # time order; y before z as in the file
    seq_b = [d.item_ids[i] for i in d.items[d.offsets[1]:d.offsets[2]]]
    assert seq_b == ["x", "y", "z"]
    assert d.item_ids[0] == "<pad>" and d.items.min() >= 1


def test_leave_one_out_split(interactions):
    d = build_sequences(interactions, PreprocessConfig())
    n = d.lengths
    assert np.all(d.train_end == n - 2)
    assert np.all(d.valid.pos == n[d.valid.user] - 2) and np.all(d.test.pos == n[d.test.user] - 1)
    assert d.stats["interactions"] == len(interactions)


def test_short_users_are_train_only():
    df = pd.DataFrame({"user": ["a", "a", "b", "b", "b"], "item": ["x", "y", "x", "y", "z"], "time": [1, 2, 1, 2, 3]})
    d = build_sequences(df, PreprocessConfig())
    assert list(d.test.user) == [1] and d.train_end[0] == 2


def test_temporal_split_never_leaks(interactions):
    d = build_sequences(interactions, PreprocessConfig(split="temporal", valid_fraction=0.2, test_fraction=0.2))
    cut = d.stats["cutoffs"]
    for split, lo in ((d.valid, cut["valid_from"]), (d.test, cut["test_from"])):
        t = d.times[d.offsets[split.user] + split.pos]
        assert np.all(t >= lo)
    train_times = np.concatenate([d.times[d.offsets[u]:d.offsets[u] + d.train_end[u]] for u in range(d.num_users)])
    assert np.all(train_times < cut["valid_from"])


def test_rating_threshold_and_k_core():
    df = pd.DataFrame({"user": list("aaabbbc"), "item": list("xyzxyzx"), "time": range(7),
                       "rating": [5, 1, 4, 5, 5, 5, 5]})
    d = build_sequences(df, PreprocessConfig(rating_threshold=4))
    assert d.stats["dropped"]["rating_below_threshold"] == 1
    d = build_sequences(df, PreprocessConfig(k_core=2))
    assert d.num_users == 2 and d.stats["dropped"]["k_core"] == 1
    with pytest.raises(DataError, match="k_core"):
        build_sequences(df, PreprocessConfig(k_core=10))
    with pytest.raises(DataError, match="rating"):
        build_sequences(df.drop(columns="rating"), PreprocessConfig(rating_threshold=4))


def test_bad_config_is_named():
    with pytest.raises(DataError, match="split"):
        PreprocessConfig(split="random")


def test_save_load_roundtrip(tmp_path, interactions):
    d = build_sequences(interactions, PreprocessConfig())
    d.save(tmp_path / "x.npz")
    e = SequenceData.load(tmp_path / "x.npz")
    for name in ("offsets", "items", "times", "train_end", "item_ids", "user_ids"):
        assert np.array_equal(getattr(d, name), getattr(e, name))
    assert e.stats == d.stats


@pytest.mark.parametrize("stride", [None, 4])
def test_training_windows_cover_every_target_once(interactions, stride):
    d = build_sequences(interactions, PreprocessConfig())
    ds = TrainWindows(d, max_len=8, stride=stride)
    batch = ds[torch.arange(len(ds))]
    # Count every (user, target item) occurrence scored; compare with the training events 1..train_end-1.
    scored = batch["targets"] > 0
    assert int(scored.sum()) == int(np.maximum(d.train_end - 1, 0).sum())
    # Inputs precede targets: each target equals the next input in the same row.
    x, y = batch["items"], batch["targets"]
    assert torch.equal(torch.where(scored[:, :-1], x[:, 1:], 0), y[:, :-1])


def test_eval_batch_history_is_before_target(interactions):
    d = build_sequences(interactions, PreprocessConfig())
    ds = EvalQueries(d, d.test, max_len=5)
    b = ds[torch.arange(len(ds))]
    for q in range(len(ds)):
        u, p = d.test.user[q], d.test.pos[q]
        events = d.items[d.offsets[u]:d.offsets[u] + p]
        window = b["items"][q][b["items"][q] > 0].numpy()
        assert np.array_equal(window, events[-5:])
        seen = b["seen_items"][b["seen_offsets"][q]:b["seen_offsets"][q + 1]].numpy()
        assert np.array_equal(seen, events)
        assert b["target"][q] == d.items[d.offsets[u] + p]


def test_eval_sharding_is_disjoint_and_complete(monkeypatch):
    import training.data.datamodule as dmod

    seen = []
    for rank in range(3):
        monkeypatch.setattr(dmod, "_dist", lambda r=rank: (r, 3))
        s = ShardedBatchSampler(100, 7, shuffle=False)
        seen.append(torch.cat(list(s)))
    allq = torch.cat(seen)
    assert sorted(allq.tolist()) == list(range(100))


def test_train_sharding_equal_length_and_seeded(monkeypatch):
    import training.data.datamodule as dmod

    lens = []
    for rank in range(2):
        monkeypatch.setattr(dmod, "_dist", lambda r=rank: (r, 2))
        s = ShardedBatchSampler(101, 10, shuffle=True, seed=3)
        lens.append(len(list(s)))
        a = torch.cat(list(s))
        b = torch.cat(list(ShardedBatchSampler(101, 10, shuffle=True, seed=3)))
        assert torch.equal(a, b)
    assert lens[0] == lens[1]


def test_cold_items_never_appear_in_training_or_histories(interactions):
    d = build_sequences(interactions, PreprocessConfig(cold_item_fraction=0.2, cold_item_seed=1))
    counts = d.train_item_counts()
    test_targets = d.items[d.offsets[d.test.user] + d.test.pos]
    cold = np.flatnonzero(counts == 0)[1:]  # item 0 is padding
    assert d.stats["cold_items"] == 8 and len(cold) >= 1
    # every event of a cold item is some user's test target; nothing else
    cold_events = np.isin(d.items, cold)
    last = np.zeros_like(cold_events)
    last[d.offsets[1:] - 1] = True
    assert np.all(~cold_events | last)
    assert np.isin(test_targets, cold).any()
    with pytest.raises(DataError, match="cold_item_fraction"):
        PreprocessConfig(cold_item_fraction=0.1, split="temporal")
