"""Short-history evaluation (`data.eval_history_cap` / `training.evaluate history_cap=N`): the model, the seen
items and the length slices see exactly the latest N events, as if the user had no older ones."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import load_script, tiny_config
from training.data.datamodule import EvalQueries, SeqDataModule
from training.data.errors import DataError
from training.data.sequences import PreprocessConfig, build_sequences
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cap", [1, 3, 7, 12, 100])
def test_capped_batch_holds_only_the_latest_events(interactions, cap):
    d = build_sequences(interactions, PreprocessConfig())
    max_len = 8
    b = EvalQueries(d, d.test, max_len, history_cap=cap)[torch.arange(len(d.test))]
    for q in range(len(d.test)):
        u, p = d.test.user[q], d.test.pos[q]
        known = d.items[d.offsets[u]:d.offsets[u] + p][-cap:]
        window = b["items"][q][b["items"][q] > 0].numpy()
        assert np.array_equal(window, known[-max_len:])  # the model sees at most max_len of the known events
        assert int((b["times"][q] > 0).sum()) <= len(window)
        seen = b["seen_items"][b["seen_offsets"][q]:b["seen_offsets"][q + 1]].numpy()
        assert np.array_equal(seen, known)  # filter_seen knows the capped history only
        assert int(b["train_len"][q]) == min(int(d.train_end[u]), cap)
        assert int(b["target"][q]) == int(d.items[d.offsets[u] + p])


def test_cap_equals_a_log_without_the_older_events():
    """Capping at N gives the batch that a log holding only each user's latest N events + target would give."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(12):
        n = int(rng.integers(4, 20))
        rows += [(f"u{u}", f"i{int(i)}", t) for t, i in enumerate(rng.integers(0, 30, n))]
    full = pd.DataFrame(rows, columns=["user", "item", "time"])
    cap = 3
    last = full.groupby("user", sort=False).tail(cap + 1).reset_index(drop=True)  # cap known events + target
    d_full, d_last = build_sequences(full, PreprocessConfig()), build_sequences(last, PreprocessConfig())
    a = EvalQueries(d_full, d_full.test, 10, history_cap=cap)[torch.arange(len(d_full.test))]
    b = EvalQueries(d_last, d_last.test, 10)[torch.arange(len(d_last.test))]
    # item codes differ between the two catalogues: compare the items' own ids
    for key in ("items", "target", "seen_items"):
        assert np.array_equal(d_full.item_ids[a[key].numpy()], d_last.item_ids[b[key].numpy()]), key
    for key in ("times", "target_time", "seen_offsets"):
        assert torch.equal(a[key], b[key]), key


def test_no_cap_is_unchanged(interactions):
    d = build_sequences(interactions, PreprocessConfig())
    a = EvalQueries(d, d.valid, 6)[torch.arange(len(d.valid))]
    b = EvalQueries(d, d.valid, 6, history_cap=10_000)[torch.arange(len(d.valid))]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_caps_are_named():
    with pytest.raises(DataError, match="data.eval_history_cap=0"):
        SeqDataModule(source={"kind": "synthetic"}, eval_history_cap=0)
    with pytest.raises(DataError, match="history cap -2"):
        d = build_sequences(pd.DataFrame({"user": ["a"] * 4, "item": list("wxyz"), "time": range(4)}),
                            PreprocessConfig())
        EvalQueries(d, d.test, 5, history_cap=-2)


def test_evaluate_with_history_cap(tmp_path):
    from training.evaluate import evaluate

    results, _ = train(tiny_config(tmp_path / "run", "sasrec"))
    cfg = tiny_config(tmp_path / "eval", config_name="evaluate")
    cfg.ckpt = str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert evaluate(cfg)["test/ndcg@10"] == results["test/ndcg@10"]
    cfg.history_cap = 2
    capped = evaluate(cfg)
    # every query now has <= 2 known events (the windows themselves are checked above; a tiny model's
    # ranking on this synthetic data hardly depends on more than the last item, so metrics may not move)
    assert results["test/users_len<=5/count"] < results["test/num_queries"]
    assert capped["test/users_len<=5/count"] == capped["test/num_queries"] == results["test/num_queries"]
    cfg.history_cap = 0
    with pytest.raises(Exception, match="data.eval_history_cap=0: must be >= 1"):  # Hydra wraps the DataError
        evaluate(cfg)


def test_short_history_script_caches_and_tabulates(tmp_path, monkeypatch):
    sh = load_script("short_history")
    for config, base in (("sasrec", 0.06), ("lsti", 0.07)):
        for seed in (1, 2):
            run = tmp_path / config / f"seed{seed}"
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "best.ckpt").write_text("")
            (run / "metrics.json").write_text(json.dumps({"test/ndcg@10": base, "test/hr@10": 2 * base}))
            (run / "short_history").mkdir()
            (run / "short_history" / "cap5.json").write_text(
                json.dumps({"test/ndcg@10": base / 2 + seed / 1000, "test/hr@10": base}))
    assert [d.name for d in sh.run_dirs(tmp_path, "sasrec")] == ["seed1", "seed2"]
    results = {c: {cap: [sh.evaluate_capped(r, cap, report_only=True) for r in sh.run_dirs(tmp_path, c)]
                   for cap in (5, None)} for c in ("sasrec", "lsti")}
    text = sh.table("prefix", results, [5, None], ["sasrec", "lsti"])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.0315 ± 0.0007" in rows["5"] and "0.0365 ± 0.0007" in rows["5"]
    assert rows["5"].rstrip(" |").endswith("+15.9%")  # .0365 / .0315
    assert rows["all (no cap)"].rstrip(" |").endswith("+16.7%")
    # nothing cached and report-only: nothing is evaluated
    assert sh.evaluate_capped(tmp_path / "sasrec" / "seed1", 3, report_only=True) is None


def test_federated_evaluation_uses_the_cap(tmp_path):
    from federated import task
    from federated.server_app import compose_config
    from tests.test_federated import SMALL

    spec = task.make_spec(compose_config([*SMALL, f"paths.output_dir={tmp_path}", "data.eval_history_cap=2"]), 3,
                          str(tmp_path / "client_state"))
    client = task.client_data(spec, 0)
    for queries in (client.valid, client.test, task.GlobalModel(spec).queries["test"]):
        batch = queries[torch.arange(len(queries))]
        assert int((batch["items"] > 0).sum(1).max()) <= 2
        assert int(torch.diff(batch["seen_offsets"]).max()) <= 2
