"""The long/short-term model on data whose ground truth we know (training/data/synthetic.py)."""

import pytest

from tests.helpers import tiny_config
from training.train import train

PLANTED = [
    "data.source.synthetic.num_users=400", "data.source.synthetic.num_items=300",
    "data.source.synthetic.num_groups=10", "data.source.synthetic.mean_length=40", "data.max_len=30",
    "data.batch_size=64", "trainer.max_epochs=12", "callbacks.early_stopping.patience=0", "optim.lr=0.003",
    "model.dropout=0.1", "model.attn_dropout=0.1", "model.hidden=32", "model.short_len=5",
]


@pytest.mark.slow
def test_fused_model_beats_long_only_and_short_only_on_planted_data(tmp_path):
    """Users mix stable long-term groups with drifting sessions: each encoder alone sees half the signal."""
    scores = {}
    for name in ("lsti", "lsti_long_only", "lsti_short_only"):
        results, _ = train(tiny_config(tmp_path / name, name, PLANTED))
        scores[name] = results["test/ndcg@10"]
    assert scores["lsti"] > scores["lsti_long_only"]
    assert scores["lsti"] > scores["lsti_short_only"]


def test_text_only_model_ranks_cold_items(tmp_path):
    """Held-out items are never trained on; text-only LSTI can still rank them, popularity cannot."""
    over = ["data.preprocess.cold_item_fraction=0.2", "trainer.max_epochs=3"]
    text, _ = train(tiny_config(tmp_path / "text", "lsti_text_only", over))
    pop, _ = train(tiny_config(tmp_path / "pop", "pop", over))
    assert text["test/items_unseen/count"] > 0
    assert pop["test/items_unseen/hr@10"] == 0.0
    assert text["test/items_unseen/hr@10"] > 0.0
