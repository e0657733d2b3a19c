import json

import pytest

from tests.helpers import tiny_config
from training.train import train


@pytest.mark.parametrize("model", ["pop", "sasrec", "gru4rec", "lsti"])
def test_training_smoke_writes_metrics(tmp_path, model):
    results, value = train(tiny_config(tmp_path, model))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/mrr@10", "test/users_len>20/ndcg@10",
                "test/items_tail/ndcg@10", "test/items_head/count"):
        assert key in saved, key
    assert saved["test/num_queries"] == 60
    assert 0.0 <= saved["test/ndcg@10"] <= saved["test/hr@10"] <= 1.0
    assert value == saved["val/ndcg@10"]
    assert "| all |" in (tmp_path / "results.md").read_text()
    env = json.loads((tmp_path / "environment.json").read_text())  # what a rerun must match to reproduce it
    assert env["packages"]["torch"] and env["hardware"]["torch_cpu_capability"] and env["seed"] == 42
    if model != "pop":
        assert (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_same_seed_same_metrics(tmp_path):
    a, _ = train(tiny_config(tmp_path / "a", "sasrec"))
    b, _ = train(tiny_config(tmp_path / "b", "sasrec"))
    assert a == b
    c, _ = train(tiny_config(tmp_path / "c", "sasrec", ["seed=7"]))
    assert c != a


@pytest.mark.slow
def test_trained_model_beats_popularity_on_planted_structure(tmp_path):
    """Synthetic users follow long-term groups and drifting sessions: a sequence model must learn them."""
    over = ["trainer.max_epochs=15", "data.source.synthetic.num_users=300", "data.source.synthetic.num_items=200",
            "data.source.synthetic.mean_length=30", "optim.lr=0.005", "model.dropout=0.1", "model.attn_dropout=0.1"]
    seq, _ = train(tiny_config(tmp_path / "s", "sasrec", over))
    pop, _ = train(tiny_config(tmp_path / "p", "pop", over[1:4]))
    assert seq["test/ndcg@10"] > 1.5 * pop["test/ndcg@10"]


def test_evaluate_reproduces_test_metrics(tmp_path):
    from training.evaluate import evaluate

    results, _ = train(tiny_config(tmp_path / "run", "gru4rec"))
    cfg = tiny_config(tmp_path / "eval", config_name="evaluate", model="gru4rec")
    cfg.ckpt = str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    again = evaluate(cfg)
    assert again["test/ndcg@10"] == results["test/ndcg@10"]
    cfg.evaluation = {"filter_seen": True}
    filtered = evaluate(cfg)
    assert filtered["test/ndcg@10"] != results["test/ndcg@10"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from training.checkpoints import CheckpointError, load_module

    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(tmp_path / "nope.ckpt")
