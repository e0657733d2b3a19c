"""Held-out (cold) users, `data.preprocess.cold_user_fraction`: users kept out of training and validation entirely
and evaluated as new users after each of their first events (the `cold_users` split and metrics)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import tiny_config
from training.data.datamodule import EvalQueries, SeqDataModule
from training.data.errors import DataError
from training.data.sequences import (
    PreprocessConfig,
    SequenceData,
    build_sequences,
    held_out_user_codes,
    user_side_rows,
)
from training.train import train


def test_held_out_users_leave_training_and_validation(interactions):
    base = build_sequences(interactions, PreprocessConfig())
    d = build_sequences(interactions, PreprocessConfig(cold_user_fraction=0.25, cold_user_max_history=4))
    cold = np.unique(d.cold_users.user)
    assert cold.shape[0] == round(0.25 * d.num_users) == d.stats["cold_users"]
    assert (d.train_end[cold] == 0).all()
    assert not np.isin(d.valid.user, cold).any() and not np.isin(d.test.user, cold).any()
    warm = np.setdiff1d(np.arange(d.num_users), cold)
    # everyone else keeps exactly the split they had without held-out users
    assert np.array_equal(d.train_end[warm], base.train_end[warm])
    assert np.array_equal(d.test.user, base.test.user[np.isin(base.test.user, warm)])
    # each held-out user: one query per event at positions 1..min(len - 1, 4)
    for u in cold:
        pos = d.cold_users.pos[d.cold_users.user == u]
        assert np.array_equal(pos, np.arange(1, min(d.lengths[u] - 1, 4) + 1))
    # their events count nowhere in training popularity
    counts = np.zeros(d.num_items + 1, dtype=np.int64)
    for u in warm:
        np.add.at(counts, d.items[d.offsets[u]:d.offsets[u] + d.train_end[u]], 1)
    assert np.array_equal(d.train_item_counts(), counts)


def test_held_out_users_are_drawn_by_seed(interactions):
    def cold(seed):
        return np.unique(build_sequences(interactions, PreprocessConfig(cold_user_fraction=0.3,
                                                                        cold_user_seed=seed)).cold_users.user)

    assert np.array_equal(cold(0), cold(0))
    assert not np.array_equal(cold(0), cold(1))
    assert len(build_sequences(interactions, PreprocessConfig()).cold_users) == 0


def test_split_survives_cache_and_federated_subsets(interactions, tmp_path):
    d = build_sequences(interactions, PreprocessConfig(cold_user_fraction=0.3))
    d.save(tmp_path / "seq.npz")
    loaded = SequenceData.load(tmp_path / "seq.npz")
    assert np.array_equal(loaded.cold_users.user, d.cold_users.user)
    assert np.array_equal(loaded.cold_users.pos, d.cold_users.pos)
    users = np.arange(0, d.num_users, 2)  # a client's users
    sub = d.subset_users(users)
    raw = d.user_ids[d.cold_users.user]
    expected = raw[np.isin(d.cold_users.user, users)]
    assert np.array_equal(sub.user_ids[sub.cold_users.user], expected)


def test_cold_batches_are_new_user_queries(interactions):
    d = build_sequences(interactions, PreprocessConfig(cold_user_fraction=0.3, cold_user_max_history=6))
    b = EvalQueries(d, d.cold_users, 5, new_users=True)[torch.arange(len(d.cold_users))]
    # never trained on, but their own profile row stays reachable
    assert torch.equal(user_side_rows(b["users"]), torch.from_numpy(d.cold_users.user))
    assert (b["users"] <= -2).all()
    for q in range(len(d.cold_users)):
        u, p = d.cold_users.user[q], d.cold_users.pos[q]
        known = d.items[d.offsets[u]:d.offsets[u] + p]
        assert np.array_equal(b["items"][q][b["items"][q] > 0].numpy(), known[-5:])
        assert int(b["train_len"][q]) == p  # length slices count the events known so far
        assert int(b["target"][q]) == int(d.items[d.offsets[u] + p])


def test_bad_settings_are_named(interactions):
    with pytest.raises(DataError, match="cold_user_fraction=1.0"):
        PreprocessConfig(cold_user_fraction=1.0)
    with pytest.raises(DataError, match="cold_user_fraction needs split=loo"):
        PreprocessConfig(cold_user_fraction=0.1, split="temporal")
    with pytest.raises(DataError, match="cold_user_max_history=0"):
        PreprocessConfig(cold_user_max_history=0)
    with pytest.raises(DataError, match="lower the fraction"):
        few = pd.DataFrame({"user": list("aaabbb"), "item": list("xyzxyz"), "time": range(6)})
        build_sequences(few, PreprocessConfig(cold_user_fraction=0.9))
    dm = SeqDataModule(source={"kind": "synthetic", "synthetic": {"num_users": 30, "num_items": 20}}, cache=False)
    with pytest.raises(DataError, match="cold_users split is empty"):
        dm.make_eval_queries("cold_users")
    with pytest.raises(DataError, match="evaluation split 'tset'"):
        dm.make_eval_queries("tset")


def test_lsti_ignores_the_user_embedding_of_unknown_users():
    from training.data.sequences import DataInfo
    from training.models.lsti import LSTI, LSTIConfig

    torch.manual_seed(0)
    model = LSTI(LSTIConfig(hidden=16, inner=32, short_len=3, fusion="id", user_embedding=True),
                 DataInfo(num_items=20, num_users=5, max_len=6)).eval()
    items = torch.randint(1, 21, (3, 6))
    times = torch.arange(18).reshape(3, 6) * 100
    unknown, held_out = torch.full((3,), -1), held_out_user_codes(torch.tensor([0, 1, 2]))
    before, before_held_out = model(items, times, unknown), model(items, times, held_out)
    with torch.no_grad():
        model.user_emb.weight.normal_()
    assert torch.allclose(model(items, times, unknown), before)
    assert torch.allclose(model(items, times, held_out), before_held_out)
    assert not torch.allclose(model(items, times, torch.tensor([0, 1, 2])), before)


@pytest.mark.parametrize("model", ["sasrec", "lsti"])
def test_train_and_evaluate_report_held_out_users(tmp_path, model):
    from training.evaluate import evaluate

    extra = ["data.preprocess.cold_user_fraction=0.2", "data.preprocess.cold_user_max_history=5"]
    if model == "lsti":
        extra.append("model.user_embedding=true")
    results, _ = train(tiny_config(tmp_path / "run", model, extra))
    dm = SeqDataModule(source={"kind": "synthetic", "synthetic": {"num_users": 60, "num_items": 50, "num_groups": 5,
                                                                   "mean_length": 12, "seed": 42}},
                       preprocess={"cold_user_fraction": 0.2, "cold_user_max_history": 5}, cache=False)
    n_cold = len(dm.prepare().cold_users)
    assert results["cold_users/num_queries"] == n_cold == 12 * 5
    assert results["cold_users/users_len<=5/count"] == n_cold  # every query has 1..5 known events
    assert 0 <= results["cold_users/ndcg@10"] <= 1
    assert results["test/num_queries"] == 48  # the 48 remaining users

    cfg = tiny_config(tmp_path / "eval", config_name="evaluate",
                      overrides=["split=cold_users", "save_ranks=true"])
    cfg.ckpt = str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    again = evaluate(cfg)
    assert again["cold_users/ndcg@10"] == pytest.approx(results["cold_users/ndcg@10"], abs=1e-6)
    ranks = pd.read_csv(tmp_path / "eval" / "ranks.csv")
    assert len(ranks) == n_cold
    assert sorted(ranks["history"].unique()) == [1, 2, 3, 4, 5]
    ndcg = np.where(ranks["rank"] < 10, 1 / np.log2(ranks["rank"] + 2), 0).mean()
    assert ndcg == pytest.approx(results["cold_users/ndcg@10"], abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["cold_users/num_queries"] == n_cold
    cfg.split = "cold"
    with pytest.raises(DataError, match="split='cold': use one of valid, test, cold_users"):
        evaluate(cfg)


def test_serving_treats_held_out_users_as_in_evaluation(tmp_path):
    """A held-out user is in the data but was never trained on: serving drops their (untrained) id embedding and
    keeps their profile, exactly as the cold_users evaluation does; trained users keep both."""
    from training.serving import Recommender

    extra = ["data.preprocess.cold_user_fraction=0.2", "model.user_embedding=true", "model.user_profile=true",
             "model.text.user_template='{likes}'"]
    train(tiny_config(tmp_path / "run", "lsti", extra))
    rec = Recommender.from_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    data = rec.data
    held_out = int(data.cold_users.user[0])
    trained = int(np.flatnonzero(data.train_end > 0)[0])
    assert rec._user_to_index(data.user_ids[held_out]) == int(held_out_user_codes(torch.tensor(held_out)))
    assert rec._user_to_index(data.user_ids[trained]) == trained
    history = list(data.item_ids[data.items[data.offsets[held_out]:data.offsets[held_out] + 3]])
    before = rec.recommend(history, k=5, user=data.user_ids[held_out])
    with torch.no_grad():
        rec.model.user_emb.weight[held_out].add_(10.0)  # their row was never trained: it must not matter
    assert rec.recommend(history, k=5, user=data.user_ids[held_out]) == before
