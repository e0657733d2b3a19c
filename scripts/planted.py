"""Planted long/short-term structure: does the fused LSTI beat each encoder alone, and where?

    python scripts/planted.py --seeds 42 1 2 3                      # sessions of 2-4 events (the test's data)
    python scripts/planted.py --seeds 42 1 2 --session-length 3 8   # the generator's default sessions
    python scripts/planted.py --seeds 42 --no-elapsed               # negative control: the gate gets no time input
    python scripts/planted.py --seeds 42 1 --decompose              # what each of the fused model's encoders ranks
    python scripts/planted.py --seeds 42 1 --extra model.long_query_time=true   # overrides for the fused model

Trains lsti, lsti_long_only and lsti_short_only on synthetic data whose ground truth is known
(training/data/synthetic.py) and prints test NDCG@10 overall, on targets that open a new session and on those
within one, and the fused model's gate (weight of the long-term state) at both. Between sessions an hour or
more passes, within one minutes, so the time since the last event, which only the fused model's gate sees,
tells it that a new session begins. tests/test_lsti.py runs seed 42 of the first command.

`--decompose` trains the fused model only and asks why its gate turns to the short-term state when a session
opens. Per kind of test target (within a session; opening a session of a favourite group; opening a drift
session that keeps the user's previous drift group; opening a fresh drift group) it prints NDCG@10 of the fused
state and of the long- and short-term states alone (each through the same output norm), and the share of each
state's softmax on the group of the user's last event, on the user's favourite groups and on the user's latest
drift group (the ground truth of training/data/synthetic.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
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
    return target_truth(cfg)["opens"].to_dict()


def query_ranks(run_dir: Path) -> pd.DataFrame:
    """Per-query test ranks of a trained run (training.evaluate save_ranks=true) and each query's NDCG@10."""
    from training.evaluate import evaluate
    from training.metrics import rank_metrics

    evaluate(compose_config(run_dir / "eval", [f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", "save_ranks=true"],
                            "evaluate"))
    ranks = pd.read_csv(run_dir / "eval" / "ranks.csv", dtype={"user": str})
    ranks["ndcg"] = rank_metrics(torch.tensor(ranks["rank"].to_numpy()), ks=(10,))["ndcg@10"].numpy()
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


def target_truth(cfg: DictConfig) -> pd.DataFrame:
    """Ground truth per user (index: user id) about the test target, the user's last event: does it open a
    session, of which kind (`within`, `favourite`, `drift kept`, `drift fresh`), and the groups a model could
    point to (the last event's group, the user's favourite groups, the group of the user's latest drift session
    before the target's own, -1 if none)."""
    from training.data import synthetic

    gen = synthetic.generate(**OmegaConf.to_container(cfg.data.source.synthetic, resolve=True))
    log, truth = gen.interactions.reset_index(drop=True), gen.truth
    last = log.groupby("user").tail(1).index.to_numpy()
    opens = truth["session_id"][last] != truth["session_id"][last - 1]
    kind = pd.Series("within", index=range(len(last)), dtype=object)
    kind[opens & truth["session_long"][last]] = "favourite"
    kind[opens & ~truth["session_long"][last] & truth["drift_continued"][last]] = "drift kept"
    kind[opens & ~truth["session_long"][last] & ~truth["drift_continued"][last]] = "drift fresh"
    # the latest drift group before the target's session: the last drift event of an earlier session of the user
    drift_event = ~truth["session_long"] & (truth["session_id"] < truth["session_id"][np.repeat(last, np.diff(
        np.r_[0, last + 1]))])
    latest_drift = pd.Series(np.where(drift_event, truth["session_group"], -1)).groupby(log["user"].to_numpy()).agg(
        lambda g: g[g >= 0].iloc[-1] if (g >= 0).any() else -1)
    users = log.loc[last, "user"].astype(str).to_numpy()
    user_rows = log.loc[last, "user"].astype(int).to_numpy()
    return pd.DataFrame({"opens": opens, "kind": kind.to_numpy(), "last_group": truth["session_group"][last - 1],
                         "favourites": list(truth["long_groups"][user_rows]),
                         "drift_group": latest_drift.reindex(log.loc[last, "user"].to_numpy()).to_numpy()},
                        index=users)


def encoder_readout(run_dir: Path, cfg: DictConfig, truth: pd.DataFrame, item_group: np.ndarray) -> pd.DataFrame:
    """Per test query of the fused model: the target's rank under the fused, long-term and short-term states, and
    each state's softmax mass on the last event's group, the favourite groups and the latest drift group."""
    import torch.nn.functional as F

    from training.checkpoints import load_module
    from training.train import build_datamodule

    model = load_module(str(run_dir / "checkpoints" / "best.ckpt")).model.eval()
    dm = build_datamodule(cfg)
    data = dm.prepare()
    queries = dm.make_eval_queries("test")
    b = queries[torch.arange(len(queries))]
    items, times = b["items"][:, -model.long_len:], b["times"][:, -model.long_len:]
    latest = torch.zeros_like(items, dtype=torch.bool)
    latest[:, -1] = True
    rows, cols = latest.nonzero(as_tuple=True)
    with torch.no_grad():
        table = model.item_table()
        x = F.embedding(items, table)
        query_times = torch.cat([times[:, 1:], b["target_time"].unsqueeze(1)], dim=1)
        long = model._long(x, items, times, b["users"], latest, rows, query_times)
        short = model._short(x, items, times, (rows, cols))
        elapsed = model.elapsed_feature(b["target_time"] - times[:, -1], x.dtype)
        known = (items > 0).sum(1) if model.cfg.gate_length else None
        states = {"fused": model.fuse(long, short, elapsed, known), "long": model.out_norm(long),
                  "short": model.out_norm(short)}
        gate = model.last_gate.squeeze(-1)
    users = data.user_ids[b["users"].numpy()].astype(str)
    t = truth.loc[users]
    # item codes -> synthetic groups (raw item ids are the generator's indices); code 0 is padding
    groups = np.full(table.shape[0], -1)
    groups[1:] = item_group[data.item_ids[1:].astype(int)]
    onehot = torch.zeros(table.shape[0], int(item_group.max()) + 1)
    onehot[torch.arange(1, table.shape[0]), torch.from_numpy(groups[1:])] = 1.0
    fav = torch.zeros(len(users), onehot.shape[1])
    for i, g in enumerate(t["favourites"]):
        fav[i, torch.as_tensor(g)] = 1.0
    q = torch.arange(len(users))
    out = {"user": users, "kind": t["kind"].to_numpy(), "gate": gate.numpy()}
    for name, st in states.items():
        scores = st @ table.T
        scores[:, 0] = -torch.inf
        target = scores[q, b["target"]]
        out[f"rank_{name}"] = (scores > target.unsqueeze(1)).sum(1).numpy()
        mass = torch.softmax(scores, dim=1) @ onehot  # [Q, groups]
        out[f"last_{name}"] = mass[q, torch.tensor(t["last_group"].to_numpy())].numpy()
        out[f"fav_{name}"] = (mass * fav).sum(1).numpy()
        drift = torch.tensor(t["drift_group"].to_numpy())
        out[f"drift_{name}"] = torch.where(drift >= 0, mass[q, drift.clamp_min(0)], torch.nan).numpy()
    return pd.DataFrame(out)


def decompose(out: Path, overrides: list[str]) -> pd.DataFrame:
    """Train the fused model and read out its encoders per kind of test target (see the module docstring)."""
    from training.data import synthetic
    from training.metrics import rank_metrics
    from training.train import train

    cfg = compose_config(out / "lsti", ["model=lsti", *overrides])
    results, _ = train(cfg)
    gen = synthetic.generate(**OmegaConf.to_container(cfg.data.source.synthetic, resolve=True))
    r = encoder_readout(out / "lsti", cfg, target_truth(cfg), gen.truth["item_group"])
    for name in ("fused", "long", "short"):
        r[f"ndcg_{name}"] = rank_metrics(torch.tensor(r[f"rank_{name}"].to_numpy()), ks=(10,))["ndcg@10"].numpy()
    fused = r["ndcg_fused"].mean()
    if abs(fused - results["test/ndcg@10"]) > 1e-4:  # the readout must rank as the evaluation did
        raise SystemExit(f"readout NDCG@10 {fused:.4f} differs from the evaluation's {results['test/ndcg@10']:.4f}")
    return r


def compare(out: Path, overrides: list[str], fused_extra: list[str] = ()) -> dict[str, dict[str, float]]:
    """Train the three models; NDCG@10 overall / at a session start / within a session (+ the fused gate).
    `fused_extra`: overrides for the fused model only."""
    from training.train import train

    rows, opens = {}, None
    for name in MODELS:
        cfg = compose_config(out / name, [f"model={name}", *overrides, *(fused_extra if name == "lsti" else [])])
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
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides for the fused model (lsti) only; the single-encoder models stay as they are")
    ap.add_argument("--decompose", action="store_true",
                    help="train the fused model only and read out its long- and short-term states per kind of target")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.no_elapsed:
        from training.models.lsti import LSTI

        LSTI.elapsed_feature = staticmethod(lambda gap, dtype: torch.zeros_like(gap, dtype=dtype))
    if args.decompose:
        print("| seed | test target | share | gate | NDCG@10 fused / long / short state | mass on last event's group "
              "(fused / long / short) | on favourites | on latest drift group |")
        print("|---|---|---|---|---|---|---|---|")
        kinds = ("within", "favourite", "drift kept", "drift fresh")
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
                r = decompose(Path(tmp), [*planted_overrides(tuple(args.session_length), args.users), f"seed={seed}",
                                          *args.extra])
            for kind in kinds:
                k = r[r["kind"] == kind]
                cells = [" / ".join(f"{k[f'{m}_{s}'].mean():.3f}" for s in ("fused", "long", "short"))
                         for m in ("ndcg", "last", "fav", "drift")]
                print(f"| {seed} | {kind} | {len(k) / len(r):.0%} | {k['gate'].mean():.3f} | " + " | ".join(cells) + " |",
                      flush=True)
        return
    print("| seed | model | NDCG@10 all | at a session start | within a session | gate at start / within |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        # the runs' own result tables go to stderr, this table to stdout
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            rows = compare(Path(tmp), [*planted_overrides(tuple(args.session_length), args.users), f"seed={seed}"],
                           fused_extra=args.extra)
        for name, r in rows.items():
            gate = f"{r['gate at start']:.3f} / {r['gate within']:.3f}" if "gate at start" in r else "-"
            print(f"| {seed} | {name} | {r['all']:.4f} | {r['session start']:.4f} | {r['within session']:.4f} | "
                  f"{gate} |", flush=True)
        print(f"(seed {seed}: {rows['lsti']['share at start']:.0%} of the test targets open a session)", flush=True)


if __name__ == "__main__":
    main()
