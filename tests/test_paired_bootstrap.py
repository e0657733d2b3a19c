"""Per-query ranks (`training.evaluate save_ranks=true`) and the paired user bootstrap built on them."""

import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers import load_script, tiny_config
from training.train import train


def _script():
    return load_script("paired_bootstrap")


def test_evaluate_saves_ranks_that_reproduce_its_metrics(tmp_path):
    from training.evaluate import evaluate

    train(tiny_config(tmp_path / "run", "sasrec"))
    cfg = tiny_config(tmp_path / "eval", config_name="evaluate")
    cfg.ckpt = str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    cfg.save_ranks = True
    results = evaluate(cfg)
    ranks = pd.read_csv(tmp_path / "eval" / "ranks.csv", dtype={"user": str, "item": str})
    assert len(ranks) == results["test/num_queries"] and ranks["user"].is_unique
    ndcg = np.where(ranks["rank"] < 10, 1 / np.log2(ranks["rank"] + 2.0), 0.0)
    assert ndcg.mean() == pytest.approx(results["test/ndcg@10"], abs=1e-6)
    short = ranks["history"] <= 5
    assert ndcg[short].mean() == pytest.approx(results["test/users_len<=5/ndcg@10"], abs=1e-6)
    head = ranks["head_item"].astype(bool)
    assert head.sum() == results["test/items_head/count"]
    assert ndcg[~head].mean() == pytest.approx(results["test/items_tail/ndcg@10"], abs=1e-6)


def test_bootstrap_separates_a_slice_gain_from_an_overall_gain():
    pb = _script()
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, 400)
    in_slice = np.arange(400) < 100
    same = pb.bootstrap(a, 1.2 * a, in_slice, 500, seed=1)
    assert np.allclose(same["overall"], 0.2) and np.allclose(same["difference"], 0.0)
    more = pb.bootstrap(a, np.where(in_slice, 1.6, 1.1) * a, in_slice, 500, seed=1)
    assert (more["difference"] > 0).all() and np.allclose(more["slice"], 0.6)
    again = pb.bootstrap(a, np.where(in_slice, 1.6, 1.1) * a, in_slice, 500, seed=1)
    assert np.array_equal(more["overall"], again["overall"])  # fixed seed: the same resamples


def test_shortest_bound_takes_the_length_at_the_share_and_keeps_ties():
    pb = _script()
    assert pb.shortest_bound(np.array([30, 5, 8, 8, 8, 40, 9, 12, 50, 60]), 0.2) == 8  # 2nd shortest; 3 users tied
    assert pb.shortest_bound(np.array([7]), 0.01) == 7
    assert pb.shortest_bound(np.arange(1, 101), 0.25) == 25


def test_target_mix_splits_the_gain_by_the_targets_kind_and_reweights_the_slice():
    pb = _script()
    #            slice head  slice tail  other head        other tail
    a = np.array([0.2, 0.2, 0.1, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    b = np.array([0.2, 0.2, 0.3, 0.22, 0.22, 0.22, 0.12, 0.12, 0.12, 0.12])
    head = np.array([True, True, False, True, True, True, False, False, False, False])
    in_slice = np.arange(10) < 3
    rows = pb.target_mix_rows(a, b, head, in_slice, "the slice", samples=300, seed=0)
    assert rows[0].startswith("| the slice, head targets (2 users) | +0.0% |")
    assert rows[1].startswith("| the other users, head targets (3) | +10.0% |")
    assert rows[3].startswith("| the slice, tail targets (1 users) | +200.0% |")
    assert rows[4].startswith("| the other users, tail targets (4) | +20.0% |")
    # all users: 5 head and 5 tail targets; the slice's means (.2 -> .2 on head, .1 -> .3 on tail) at that mix:
    # (.5 * .2 + .5 * .3) / (.5 * .2 + .5 * .1) - 1 = +66.7%, against an overall gain of 1.84 / 1.5 - 1 = +22.7%
    assert "(50% tail, not the slice's 33%; the other users' 57%) | +66.7% |" in rows[6]
    assert rows[7].startswith(f"| that gain - overall gain | {100 * (0.25 / 0.15 - 1.84 / 1.5):+.1f}% |")


def test_script_pairs_users_over_seeds_and_writes_its_section(tmp_path, monkeypatch, capsys):
    pb = _script()
    users = [f"u{i}" for i in range(40)]
    history = [5 + i for i in range(40)]  # users u0..u15 have <= 20 events
    head = [i % 2 == 1 for i in range(40)]  # even users' targets are tail items
    for config, ranks in (("base", [3] * 40), ("model", [1] * 16 + [3] * 24)):
        for seed in (1, 2):
            run = tmp_path / config / f"seed{seed}"
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "best.ckpt").touch()
            (run / "metrics.json").write_text("{}")
            for folder, r in (("ranks", ranks), ("ranks_cap1", [3] * 40)):  # capped: no gain left
                (run / folder).mkdir()
                pd.DataFrame({"user": users, "item": "x", "history": history, "head_item": head, "rank": r}).to_csv(
                    run / folder / "ranks.csv", index=False)
    doc = tmp_path / "results.md"
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--samples", "200", "--section", "paired_test", "--doc", str(doc),
                                      "--history-cap", "1"])
    pb.main()
    out = capsys.readouterr().out
    gain = (1 / np.log2(3)) / (1 / np.log2(5)) - 1  # rank 1 vs rank 3
    overall = (16 / np.log2(3) + 24 / np.log2(5)) / (40 / np.log2(5)) - 1
    assert f"| 16 users with <= 20 events | {100 * gain:+.1f}% |" in out
    assert "| all 40 users, latest 1 event(s) only | +0.0% |" in out
    assert f"| gain with 1 event(s) - gain with whole histories | {-100 * overall:+.1f}% |" in out
    assert "<!-- paired_test:begin -->" in doc.read_text() and "seeds [1, 2] and [1, 2]" in doc.read_text()
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--samples", "200", "--slice", "tail"])
    pb.main()
    assert f"| 20 users whose target is a tail item | {100 * overall:+.1f}% |" in capsys.readouterr().out
    # the shortest 40% of the 40 users: the 16th shortest history has 20 events, so the slice is u0..u15 again
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--samples", "200", "--shortest-share", "0.4"])
    pb.main()
    out = capsys.readouterr().out
    assert f"| 16 users with <= 20 events (the shortest 40% of histories) | {100 * gain:+.1f}% |" in out
    assert "--shortest-share 0.4`" in out
    for bad in (["--shortest-share", "1.5"], ["--shortest-share", "0.2", "--max-history", "20"]):
        monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"), *bad])
        with pytest.raises(SystemExit, match="shortest-share"):
            pb.main()
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--samples", "200", "--by-target"])
    pb.main()
    out = capsys.readouterr().out  # the slice u0..u15: 8 head and 8 tail targets, all gaining; no other user gains
    assert f"| the slice, tail targets (8 users) | {100 * gain:+.1f}% |" in out
    assert "| the other users, head targets (12) | +0.0% |" in out and "--by-target`" in out
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--slice", "tail", "--by-target"])
    with pytest.raises(SystemExit, match="by-target"):
        pb.main()
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no finished run"):
        pb.main()


def test_cold_user_mode_pairs_queries_within_seeds(tmp_path, monkeypatch, capsys):
    """Held-out users differ per seed; their queries (one per known-history length) are paired within each seed
    and summed per user, and the warm users' test queries give the gain they are compared with."""
    pb = _script()
    for config, cold_rank, warm_rank in (("base", 3, 3), ("model", 1, 2)):
        for seed in (1, 2):
            run = tmp_path / config / f"seed{seed}"
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "best.ckpt").touch()
            (run / "metrics.json").write_text("{}")
            cold = [f"u{i}" for i in range(seed * 4, seed * 4 + 4)]  # each seed holds out its own 4 users
            warm = [f"u{i}" for i in range(12) if f"u{i}" not in cold]
            history = [1, 2, 3, 6, 7, 8]  # six queries per held-out user: three with <= 5 known events
            ranks = {"ranks": pd.DataFrame({"user": warm, "item": "x", "history": 30, "head_item": True,
                                            "rank": warm_rank}),
                     "ranks_cold_users": pd.DataFrame({
                         "user": np.repeat(cold, 6), "item": "y", "history": history * 4, "head_item": True,
                         # the model's gain is only on the first three events
                         "rank": [cold_rank if h <= 5 else 3 for h in history] * 4})}
            for folder, frame in ranks.items():
                (run / folder).mkdir()
                frame.to_csv(run / folder / "ranks.csv", index=False)
    monkeypatch.setattr(sys, "argv", ["paired_bootstrap.py", str(tmp_path / "base"), str(tmp_path / "model"),
                                      "--samples", "200", "--slice", "cold_users"])
    pb.main()
    out = capsys.readouterr().out
    warm_gain = np.log2(5) / np.log2(4) - 1  # rank 2 vs rank 3
    short_gain = np.log2(5) / np.log2(3) - 1  # rank 1 vs rank 3
    all_gain = (3 / np.log2(3) + 3 / np.log2(5)) / (6 / np.log2(5)) - 1
    assert f"| test split: users kept in training, whole histories | {100 * warm_gain:+.1f}% |" in out
    assert f"| held-out users, <= 5 known events | {100 * short_gain:+.1f}% |" in out
    assert f"| held-out users, every evaluated history length | {100 * all_gain:+.1f}% |" in out
    assert f"| held-out <= 5 gain - test gain | {100 * (short_gain - warm_gain):+.1f}% |" in out
    assert "12 users" in out
    assert f"| held-out users, 1 known event | {100 * short_gain:+.1f}% |" in out  # per band of known events
    assert "| held-out users, 6-10 known events | +0.0% |" in out
    assert "4-5 known events" not in out  # no query has 4-5 known events here
    (tmp_path / "model" / "seed1" / "ranks_cold_users" / "ranks.csv").write_text(
        "user,item,history,head_item,rank\nu0,z,1,True,0\n")
    with pytest.raises(SystemExit, match="different cold_users queries"):
        pb.main()


def test_runs_still_training_are_left_out(tmp_path):
    """A run with a best.ckpt but no metrics.json is still training: its checkpoint will change, so it is not used
    (nor are its ranks cached)."""
    pb = _script()
    for seed, done in ((1, True), (2, False)):
        run = tmp_path / "cfg" / f"seed{seed}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best.ckpt").touch()
        if done:
            (run / "metrics.json").write_text("{}")
    assert [r.name for r in pb.finished_runs(tmp_path / "cfg", None)] == ["seed1"]
    with pytest.raises(SystemExit, match="no finished run"):
        pb.finished_runs(tmp_path / "cfg", [2])
