"""Neighbour distillation: similar-user retrieval (training/neighbours.py) and its loss term (LitRecommender)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import tiny_config
from training import neighbours as nb
from training.data.sequences import PreprocessConfig, build_sequences
from training.losses import LossConfig, neighbour_distill_loss
from training.train import train


def _log(rows):
    return pd.DataFrame(rows, columns=["user", "item", "time"])


def _data():
    # leave-one-out: each user's last two events are valid/test targets and must not count for similarity
    rows = []
    for user, items in {"a": "pqrsXY", "b": "pqrsZW", "c": "tuvwXY", "d": "tuvxXY", "e": "pq"}.items():
        rows += [(user, item, t) for t, item in enumerate(items)]
    return build_sequences(_log(rows), PreprocessConfig())


def test_item_neighbours_share_training_items_only():
    d = _data()
    users = {u: i for i, u in enumerate(d.user_ids)}
    out = nb.user_neighbours(d, k=3, key="items")
    assert out.shape == (5, 3) and out.dtype == torch.int64
    assert out[users["a"], 0] == users["b"] and out[users["b"], 0] == users["a"]  # same 4 training items
    assert out[users["c"], 0] == users["d"]
    for u in range(5):
        assert u not in out[u].tolist()  # never one's own neighbour
    # a and c share only X and Y, which are test targets of both: not similar at all (-1, not a random user)
    assert users["c"] not in out[users["a"]].tolist()
    # e (2 events, train only) shares p and q with a and b
    assert sorted(out[users["e"], :2].tolist()) == sorted([users["a"], users["b"]])
    # a user without training events (e.g. held out of training) has no neighbours and is nobody's neighbour
    d.train_end[users["e"]] = 0
    out = nb.user_neighbours(d, k=3, key="items")
    assert (out[users["e"]] == -1).all() and users["e"] not in out.flatten().tolist()


def test_sparse_keys_give_the_same_neighbours(monkeypatch):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(0, 30)}", t) for u in range(40) for t in range(rng.integers(4, 15))]
    d = build_sequences(_log(rows), PreprocessConfig())
    dense = nb.user_neighbours(d, k=5, key="items")
    monkeypatch.setattr(nb, "DENSE_KEY_ENTRIES", 0)
    assert nb.user_keys(d, "items").layout == torch.sparse_csr
    sparse = nb.user_neighbours(d, k=5, key="items", chunk_entries=64)  # several row chunks
    keys = nb.user_keys(d, "items").to_dense()
    sims = keys @ keys.T
    for u in range(d.num_users):  # the same similarity order (ties may swap users of equal similarity)
        assert torch.allclose(sims[u, dense[u]], sims[u, sparse[u]], atol=1e-6)


def test_text_neighbours_follow_item_text():
    d = _data()
    text = torch.zeros(d.num_items + 1, 2)
    for i, name in enumerate(d.item_ids):  # items p..s point one way, t..w the other
        text[i] = torch.tensor([1.0, 0.0]) if name in "pqrs" else torch.tensor([0.0, 1.0])
    users = {u: i for i, u in enumerate(d.user_ids)}
    out = nb.user_neighbours(d, k=1, key="text", item_text=text)
    assert out[users["a"], 0] == users["b"] and out[users["c"], 0] == users["d"]
    with pytest.raises(ValueError, match="neighbour_key=text needs the item-text embeddings"):
        nb.user_neighbours(d, k=1, key="text")


@pytest.mark.parametrize("setting, message", [({"neighbour_distill": -1.0}, "neighbour_distill"),
                                              ({"neighbours": 0}, "loss.neighbours"),
                                              ({"neighbour_key": "graph"}, "neighbour_key")])
def test_bad_settings_are_clear_errors(setting, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**setting)


def _module(neighbours=None, weight=1.0):
    from training.module import LitRecommender

    info = {"num_items": 6, "num_users": 4, "max_len": 3}
    tensors = {} if neighbours is None else {"user_neighbours": neighbours}
    return LitRecommender(model={"_target_": "training.models.sasrec.SASRecConfig", "hidden": 4, "inner": 8},
                          info=info, loss={"neighbour_distill": weight}, item_tensors=tensors)


def test_distillation_pulls_the_newest_state_toward_banked_neighbours():
    lit = _module(torch.tensor([[1, -1], [0, 2], [1, -1], [-1, -1]]))
    has_target = torch.tensor([[False, True, True], [True, True, True]])
    users = torch.tensor([0, 1])
    table = torch.randn(7, 4)
    mask = lit._catalogue_mask()
    states = torch.randn(5, 4, requires_grad=True)  # row-major over has_target: row 0 has 2, row 1 has 3
    first = lit._neighbour_term(states, has_target, users, table, mask)
    # user 0's neighbour (1) and user 1's (0, 2) were not banked yet: nothing to learn from
    assert float(first.detach()) == 0.0
    assert torch.equal(lit._user_bank[0], states[1].detach()) and torch.equal(lit._user_bank[1], states[4].detach())
    again = torch.randn(5, 4, requires_grad=True)
    loss = lit._neighbour_term(again, has_target, users, table, mask)

    def probs(s):
        return torch.softmax((s @ table[1:].T), -1)  # item 0 is the padding, never scored

    # user 0 learns from user 1's banked state; user 1 from user 0's only (user 2 was never banked)
    kl = [(probs(t) * (probs(t).log() - probs(s).log())).sum() for s, t in ((again[1], states[4]), (again[4], states[1]))]
    assert torch.allclose(loss, lit.loss_cfg.neighbour_distill * sum(kl) / 2, atol=1e-6)
    loss.backward()
    assert again.grad[[0, 2, 3]].abs().sum() == 0 and again.grad[[1, 4]].abs().sum() > 0  # newest positions only
    # a state that predicts what its neighbours predict has nothing left to learn
    assert float(neighbour_distill_loss(states[4:5].detach(), states[4:5].detach().unsqueeze(1),
                                        torch.ones(1, 1, dtype=torch.bool), table, mask)) == pytest.approx(0, abs=1e-6)


def test_distillation_cannot_be_escaped_by_shrinking_the_states():
    """Why the loss is a KL between next-item distributions, not a distance between states: a model can scale every
    user state down and the item table up by the same factor, which leaves every score (and the recommendation
    loss) as it was and shrinks a squared distance between states toward 0; the KL does not move."""
    torch.manual_seed(0)
    table, student, teacher = torch.randn(30, 8), torch.randn(1, 8), torch.randn(1, 1, 8)
    usable = torch.ones(1, 1, dtype=torch.bool)
    kl = [float(neighbour_distill_loss(a * student, a * teacher, usable, table / a)) for a in (1.0, 0.1, 0.01)]
    assert kl[0] > 0.1 and kl[1] == pytest.approx(kl[0], rel=1e-4) and kl[2] == pytest.approx(kl[0], rel=1e-4)
    distance = [float(((a * student - a * teacher[:, 0]) ** 2).mean()) for a in (1.0, 0.01)]
    assert distance[1] < 1e-3 * distance[0]


def test_distillation_without_neighbours_is_a_clear_error():
    lit = _module()
    args = (torch.randn(2, 4), torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]), torch.randn(7, 4))
    with pytest.raises(ValueError, match="federated client"):
        lit._neighbour_term(*args)
    assert float(_module(weight=0.0)._neighbour_term(*args)) == 0.0


def test_training_with_neighbour_distillation(tmp_path):
    from training.evaluate import evaluate

    base, _ = train(tiny_config(tmp_path / "base", "lsti"))
    over = ["loss.neighbour_distill=0.5", "loss.neighbours=5", "logger=default", "trainer.log_every_n_steps=1"]
    results, _ = train(tiny_config(tmp_path / "nbr", "lsti", over))
    assert results["test/ndcg@10"] != base["test/ndcg@10"]  # the term changes what is learned
    logged = (tmp_path / "nbr" / "csv").rglob("metrics.csv")
    columns = pd.read_csv(next(logged)).columns
    assert "train/neighbour_distill" in columns
    # the checkpoint re-evaluates without the neighbour table (evaluation never uses it)
    cfg = tiny_config(tmp_path / "eval", config_name="evaluate", model="lsti")
    cfg.ckpt = str(tmp_path / "nbr" / "checkpoints" / "best.ckpt")
    assert evaluate(cfg)["test/ndcg@10"] == results["test/ndcg@10"]
    assert json.loads((tmp_path / "nbr" / "metrics.json").read_text())["test/ndcg@10"] == results["test/ndcg@10"]


def test_text_key_needs_a_model_with_text(tmp_path):
    with pytest.raises(ValueError, match="neighbour_key=text"):
        train(tiny_config(tmp_path, "sasrec", ["loss.neighbour_distill=0.5", "loss.neighbour_key=text"]))
