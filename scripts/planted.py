"""Planted long/short-term structure: does the fused LSTI beat each encoder alone, and where?

    python scripts/planted.py --seeds 42 1 2 3                      # sessions of 2-4 events (the test's data)
    python scripts/planted.py --seeds 42 1 2 --session-length 3 8   # the generator's default sessions
    python scripts/planted.py --seeds 42 --no-elapsed               # negative control: the gate gets no time input

Trains lsti, lsti_long_only and lsti_short_only on synthetic data whose ground truth is known
(training/data/synthetic.py) and prints test NDCG@10 overall, on targets that open a new session and on those
within one, and the fused model's gate (weight of the long-term state) at both. Between sessions an hour or
more passes, within one minutes, so the time since the last event, which only the fused model's gate sees,
tells it that a new session begins. tests/test_lsti.py runs seed 42 of the first command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("lsti", "lsti_long_only", "lsti_short_only")


def planted_overrides(session_length: tuple[int, int] = (2, 4), num_users: int = 2000) -> list[str]:
    """Data and training settings of the planted comparison (small model, 12 epochs, no early stopping)."""
    lo, hi = session_length
    return [
        "data=synthetic", "logger=none", f"data.source.synthetic.num_users={num_users}",
        "data.source.synthetic.num_items=300",
        "data.source.synthetic.num_groups=10", "data.source.synthetic.mean_length=40",
        f"data.source.synthetic.session_length=[{lo},{hi}]", "data.max_len=30", "data.batch_size=64",
        "trainer.max_epochs=12", "callbacks.early_stopping.patience=0", "optim.lr=0.003",
        "model.dropout=0.1", "model.attn_dropout=0.1", "model.hidden=32", "model.inner=32", "model.short_len=5",
        "model.text.template='{title}'",
    ]


def compose_config(output_dir: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    common = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*common, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def session_starts(cfg: DictConfig) -> dict[str, bool]:
    """Ground truth per user: does the test target (the user's last event) open a new session?"""
    from training.data import synthetic

    gen = synthetic.generate(**OmegaConf.to_container(cfg.data.source.synthetic, resolve=True))
    log = gen.interactions.reset_index(drop=True)
    last = log.groupby("user").tail(1).index.to_numpy()
    opens = gen.truth["session_id"][last] != gen.truth["session_id"][last - 1]
    return dict(zip(log.loc[last, "user"].astype(str), opens.tolist(), strict=True))


def query_ranks(run_dir: Path) -> pd.DataFrame:
    """Per-query test ranks of a trained run (training.evaluate save_ranks=true) and each query's NDCG@10."""
    from training.evaluate import evaluate
    from training.metrics import rank_metrics

    evaluate(compose_config(run_dir / "eval", [f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", "save_ranks=true"],
                            "evaluate"))
    ranks = pd.read_csv(run_dir / "eval" / "ranks.csv", dtype={"user": str})
    ranks["ndcg"] = rank_metrics(torch.from_numpy(ranks["rank"].to_numpy()), ks=(10,))["ndcg@10"].numpy()
    return ranks


def gate_at_test_queries(run_dir: Path, cfg: DictConfig) -> pd.Series:
    """The fused model's gate (weight of the long-term state) at each user's test query, by user id."""
    from training.checkpoints import load_module
    from training.train import build_datamodule

    model = load_module(str(run_dir / "checkpoints" / "best.ckpt")).model.eval()
    dm = build_datamodule(cfg)
    queries = dm.make_eval_queries("test")
    b = queries[torch.arange(len(queries))]
    query_times = torch.cat([b["times"][:, 1:], b["target_time"].unsqueeze(1)], dim=1)
    with torch.no_grad():
        model.latest_states(b["items"], b["times"], b["users"], query_times=query_times)
    users = dm.prepare().user_ids[b["users"].numpy()].astype(str)
    return pd.Series(model.last_gate.squeeze(-1).numpy(), index=users)


def compare(out: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Train the three models; NDCG@10 overall / at a session start / within a session (+ the fused gate)."""
    from training.train import train

    rows, opens = {}, None
    for name in MODELS:
        cfg = compose_config(out / name, [f"model={name}", *overrides])
        results, _ = train(cfg)
        opens = session_starts(cfg) if opens is None else opens
        ranks = query_ranks(out / name)
        at_start = ranks["user"].map(opens).astype(bool)
        rows[name] = {"all": results["test/ndcg@10"], "session start": ranks["ndcg"][at_start].mean(),
                      "within session": ranks["ndcg"][~at_start].mean(), "share at start": at_start.mean()}
        if name == "lsti":
            gate = gate_at_test_queries(out / name, cfg)
            starts = gate.index.map(opens).astype(bool)
            rows[name].update({"gate at start": gate[starts].mean(), "gate within": gate[~starts].mean()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--session-length", type=int, nargs=2, default=[2, 4], metavar=("MIN", "MAX"))
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--no-elapsed", action="store_true", help="zero the gate's time-since-last-event input")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.no_elapsed:
        from training.models.lsti import LSTI

        LSTI.elapsed_feature = staticmethod(lambda gap, dtype: torch.zeros_like(gap, dtype=dtype))
    print("| seed | model | NDCG@10 all | at a session start | within a session | gate at start / within |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        # the runs' own result tables go to stderr, this table to stdout
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            rows = compare(Path(tmp), [*planted_overrides(tuple(args.session_length), args.users), f"seed={seed}"])
        for name, r in rows.items():
            gate = f"{r['gate at start']:.3f} / {r['gate within']:.3f}" if "gate at start" in r else "-"
            print(f"| {seed} | {name} | {r['all']:.4f} | {r['session start']:.4f} | {r['within session']:.4f} | "
                  f"{gate} |", flush=True)
        print(f"(seed {seed}: {rows['lsti']['share at start']:.0%} of the test targets open a session)", flush=True)


if __name__ == "__main__":
    main()
