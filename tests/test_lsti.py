"""The long/short-term model on data whose ground truth we know (training/data/synthetic.py)."""

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import tiny_config
from training.train import train

# Users mix stable long-term groups with drifting sessions. Sessions of 2-4 events put a third of the test targets
# at the start of a new session, where the recent events no longer name the group; the time since the last event
# (1 h+ between sessions, minutes within one) tells the fused model's gate that a new session begins.
PLANTED = [
    "data.source.synthetic.num_users=2000", "data.source.synthetic.num_items=300",
    "data.source.synthetic.num_groups=10", "data.source.synthetic.mean_length=40",
    "data.source.synthetic.session_length=[2,4]", "data.max_len=30",
    "data.batch_size=64", "trainer.max_epochs=12", "callbacks.early_stopping.patience=0", "optim.lr=0.003",
    "model.dropout=0.1", "model.attn_dropout=0.1", "model.hidden=32", "model.short_len=5",
]


def _session_starts(cfg) -> dict[str, bool]:
    """Ground truth per user: does the test target (the user's last event) open a new session?"""
    from training.data import synthetic

    gen = synthetic.generate(**OmegaConf.to_container(cfg.data.source.synthetic, resolve=True))
    log = gen.interactions.reset_index(drop=True)
    last = log.groupby("user").tail(1).index.to_numpy()
    opens = gen.truth["session_id"][last] != gen.truth["session_id"][last - 1]
    return dict(zip(log.loc[last, "user"].astype(str), opens, strict=True))


def _ranks(run_dir) -> pd.DataFrame:
    """Test ranks of a trained run (training.evaluate save_ranks=true), with each query's NDCG@10."""
    from training.evaluate import evaluate

    evaluate(tiny_config(run_dir / "eval", overrides=[f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}",
                                                      "save_ranks=true"], config_name="evaluate"))
    ranks = pd.read_csv(run_dir / "eval" / "ranks.csv", dtype={"user": str})
    ranks["ndcg"] = np.where(ranks["rank"] < 10, 1 / np.log2(ranks["rank"] + 2), 0.0)
    return ranks


def _gate_at_test_queries(run_dir, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The fused model's gate (weight of the long-term state) at each test query, and the query's user ids."""
    from training.checkpoints import load_module
    from training.train import build_datamodule

    model = load_module(str(run_dir / "checkpoints" / "best.ckpt")).model.eval()
    dm = build_datamodule(cfg)
    q = dm.make_eval_queries("test")
    b = q[torch.arange(len(q))]
    query_times = torch.cat([b["times"][:, 1:], b["target_time"].unsqueeze(1)], dim=1)
    with torch.no_grad():
        model.latest_states(b["items"], b["times"], b["users"], query_times=query_times)
    return model.last_gate.squeeze(-1).numpy(), dm.prepare().user_ids[b["users"].numpy()].astype(str)


def test_fused_model_beats_long_only_and_short_only_on_planted_data(tmp_path):
    """The fused model beats each encoder alone, and it does so where the planted structure says it should:
    on targets that open a new session, where its gate (which sees the time since the last event) weighs the
    two encoders differently than within a session."""
    scores, ranks, cfgs = {}, {}, {}
    for name in ("lsti", "lsti_long_only", "lsti_short_only"):
        cfgs[name] = tiny_config(tmp_path / name, name, PLANTED)
        results, _ = train(cfgs[name])
        scores[name] = results["test/ndcg@10"]
        ranks[name] = _ranks(tmp_path / name)
    assert scores["lsti"] > scores["lsti_long_only"]
    assert scores["lsti"] > scores["lsti_short_only"]

    opens = _session_starts(cfgs["lsti"])
    assert 0.2 < np.mean(list(opens.values())) < 0.5
    at_start = {name: r.groupby(r["user"].map(opens))["ndcg"].mean() for name, r in ranks.items()}
    for ablation in ("lsti_long_only", "lsti_short_only"):
        gain_at_start = at_start["lsti"][True] - at_start[ablation][True]
        gain_within = at_start["lsti"][False] - at_start[ablation][False]
        assert gain_at_start > 0 and gain_at_start > gain_within, (ablation, at_start)
    gate, users = _gate_at_test_queries(tmp_path / "lsti", cfgs["lsti"])
    starts = np.array([opens[u] for u in users])
    assert abs(gate[starts].mean() - gate[~starts].mean()) > 0.1


def test_text_only_model_ranks_cold_items(tmp_path):
    """Held-out items are never trained on; text-only LSTI can still rank them, popularity cannot."""
    over = ["data.preprocess.cold_item_fraction=0.2", "trainer.max_epochs=3"]
    text, _ = train(tiny_config(tmp_path / "text", "lsti_text_only", over))
    pop, _ = train(tiny_config(tmp_path / "pop", "pop", over))
    assert text["test/items_unseen/count"] > 0
    assert pop["test/items_unseen/hr@10"] == 0.0
    assert text["test/items_unseen/hr@10"] > 0.0
