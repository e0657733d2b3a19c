"""Serving: incremental state == full re-encoding, seen-item exclusion, the recommend CLI, int8, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from training import metrics as M
from training.data.datamodule import SeqDataModule
from training.data.sequences import DataInfo
from training.models.gru4rec import GRU4RecConfig
from training.models.lsti import LSTIConfig
from training.models.pop import PopConfig
from training.models.sasrec import SASRecConfig
from training.module import LitRecommender
from training.serving import Recommender, ServingError

ROOT = Path(__file__).resolve().parents[1]
N, W, TEXT = 40, 8, 12
INFO = DataInfo(num_items=N, num_users=6, max_len=W, item_counts=torch.arange(N + 1),
                item_text=torch.randn(N + 1, TEXT, generator=torch.Generator().manual_seed(0)), text_dim=TEXT)
IDS = ["<pad>"] + [f"i{i}" for i in range(1, N + 1)]
MODELS = {
    "gru4rec": GRU4RecConfig(embedding=16, hidden=24, layers=2),
    "sasrec": SASRecConfig(hidden=16, inner=32),
    "lsti": LSTIConfig(hidden=16, inner=32, short_len=3),  # id+text items, GRU short-term, gate
    "lsti_lstm_sessions": LSTIConfig(hidden=16, inner=32, short_len=4, short_rnn="lstm", session_gap=40.0),
    "lsti_concat_long_short": LSTIConfig(hidden=16, inner=32, short_len=12, fusion="id", user_fusion="concat"),
    "lsti_short_only": LSTIConfig(hidden=16, short_len=5, fusion="text", use_long=False),
    "lsti_gate_length": LSTIConfig(hidden=16, inner=32, short_len=3, gate_length=True),  # gate sees events known
    # the long-term encoder sees the request time too (encoded per request, not per event)
    "lsti_long_query_time": LSTIConfig(hidden=16, inner=32, short_len=3, long_query_time=True),
    # experiment=lsti_prefix's model: post-LN, positions counted from the oldest event in the window
    "lsti_prefix": LSTIConfig(hidden=16, inner=32, short_len=3, norm="post", positions="absolute",
                              ff_dropout="output"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a shared, busy CPU thread spin-waits cost 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _history(n: int = 20, seed: int = 1) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (n,), generator=g).tolist()
    times = torch.cumsum(torch.randint(1, 80, (n,), generator=g), 0).tolist()
    return items, times


def _recommender(name: str, **kwargs) -> Recommender:
    torch.manual_seed(0)
    return Recommender(MODELS[name].build(INFO), IDS, W, item_counts=INFO.item_counts, **kwargs)


def _full_topk(rec: Recommender, items: list[int], times: list[int], k: int, exclude_seen: bool,
               now: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Reference: the model's forward over the left-padded window, scored and ranked like the batch CLI."""
    win = torch.tensor([([0] * W + items)[-W:]])
    wt = torch.tensor([([0] * W + times)[-W:]])
    query = None if now is None else torch.cat([wt[:, 1:], torch.tensor([[now]])], dim=1)
    vector = rec.encode_batch(win, wt, query_times=query)
    scores = rec.score(vector)
    exclude = M.seen_mask(torch.tensor([items]), N + 1) if exclude_seen else None
    _, ids = M.topk_items(scores, k, exclude)
    return vector[0], [IDS[i] for i in ids[0].tolist() if i > 0]


@pytest.mark.parametrize("name", list(MODELS))
def test_incremental_update_equals_full_reencoding(name):
    rec = _recommender(name)
    items, times = _history(16)  # longer than the window W=8: the sliding window is exercised
    state = rec.start([IDS[i] for i in items[:2]], times=times[:2])
    for t in range(2, len(items)):
        rec.update(state, (IDS[items[t]], times[t]))
        for exclude_seen in (False, True):
            ref_vector, ref = _full_topk(rec, items[:t + 1], times[:t + 1], 5, exclude_seen)
            got = [item for item, _ in rec.recommend_from_state(state, 5, exclude_seen=exclude_seen)]
            assert got == ref, (name, t, exclude_seen)
        with torch.inference_mode():
            assert torch.allclose(rec.encoder.vector(state, None), ref_vector, atol=1e-5)
        # building the state from the whole history at once agrees too
        again = rec.recommend([IDS[i] for i in items[:t + 1]], 5, times=times[:t + 1], exclude_seen=False)
        assert [item for item, _ in again] == _full_topk(rec, items[:t + 1], times[:t + 1], 5, False)[1]
    assert state.num_events == len(items) and len(state.items) == W


@pytest.mark.parametrize("name", ["lsti", "lsti_long_query_time"])
def test_request_time_feeds_the_lsti_gate(name):
    rec = _recommender(name)
    items, times = _history(12)
    state = rec.start([IDS[i] for i in items], times=times)
    now = times[-1] + 3 * 86400
    _, ref = _full_topk(rec, items, times, 6, False, now=now)
    assert [i for i, _ in rec.recommend_from_state(state, 6, exclude_seen=False, now=now)] == ref
    scores_now = [s for _, s in rec.recommend_from_state(state, 6, exclude_seen=False, now=now)]
    scores_0 = [s for _, s in rec.recommend_from_state(state, 6, exclude_seen=False)]
    assert scores_now != scores_0  # the elapsed time changes the long/short mix


def test_seen_items_are_excluded():
    torch.manual_seed(0)
    rec = Recommender(PopConfig().build(INFO), IDS, W, item_counts=INFO.item_counts)  # score = popularity = id
    history = [IDS[i] for i in (40, 39, 1, 2, 3, 4, 5, 6, 7, 8, 9)]  # 40, 39 fall out of the window (W=8)
    assert [i for i, _ in rec.recommend(history, 3, exclude_seen=False)] == ["i40", "i39", "i38"]
    assert [i for i, _ in rec.recommend(history, 3, exclude_seen=True)] == ["i38", "i37", "i36"]
    state = rec.start(history)
    rec.update(state, "i38")
    assert [i for i, _ in rec.recommend_from_state(state, 2)] == ["i37", "i36"]
    # when exclusion leaves fewer than k items, fewer come back (never padding, never a seen item)
    everything = rec.start(IDS[1:])
    assert rec.recommend_from_state(everything, 5) == []
    assert [i for i, _ in rec.recommend_from_state(rec.start(IDS[2:]), 5)] == ["i1"]
    assert [i for i, _ in rec.popular(2, exclude=["i40"])] == ["i39", "i38"]


def test_int8_and_bf16_scores_stay_close_to_float():
    items, times = _history(15)
    history = [IDS[i] for i in items]
    float_rec = _recommender("lsti")
    state = float_rec.start(history, times=times)
    with torch.inference_mode():
        ref = float_rec.score(float_rec.encoder.vector(state, None).unsqueeze(0))[0, 1:]
    top = set(ref.topk(10).indices.tolist())
    for kwargs in ({"quantize": "int8"}, {"quantize": "int8-encoder"}, {"dtype": "bf16"}):
        rec = _recommender("lsti", **kwargs)
        st = rec.start(history, times=times)
        with torch.inference_mode():
            got = rec.score(rec.encoder.vector(st, None).unsqueeze(0))[0, 1:]
        assert got.dtype == torch.float32
        assert (got - ref).abs().max() < 0.1 * ref.std() + 0.05, kwargs
        assert len(top & set(got.topk(10).indices.tolist())) >= 7, kwargs
        # the incremental path stays consistent under quantisation too
        st2 = rec.start(history[:5], times=times[:5])
        for item, t in zip(history[5:], times[5:], strict=True):
            rec.update(st2, (item, t))
        a = [i for i, _ in rec.recommend_from_state(st, 10)]
        b = [i for i, _ in rec.recommend_from_state(st2, 10)]
        assert len(set(a) & set(b)) >= 9, kwargs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_gpu_matches_float():
    items, times = _history(15)
    history = [IDS[i] for i in items]
    ref = _recommender("lsti").recommend(history, 10, times=times)
    rec = _recommender("lsti", dtype="bf16", device="cuda")
    state = rec.start(history[:5], times=times[:5])
    for item, t in zip(history[5:], times[5:], strict=True):
        rec.update(state, (item, t))
    got = rec.recommend_from_state(state, 10)
    assert len({i for i, _ in ref} & {i for i, _ in got}) >= 7
    assert max(abs(a - b) for (_, a), (_, b) in zip(ref, got, strict=True)) < 0.1 * max(abs(s) for _, s in ref) + 0.05


def test_bad_input_errors_name_the_problem():
    rec = _recommender("sasrec")
    with pytest.raises(ServingError, match=r"unknown item ids 'nope'.*unknown_items='skip'"):
        rec.recommend(["i1", "nope"], 5)
    skipping = _recommender("sasrec", unknown_items="skip")
    assert len(skipping.recommend(["i1", "nope"], 5)) == 5
    with pytest.raises(ServingError, match="none of the history's items"):
        skipping.recommend(["nope"], 5)
    with pytest.raises(ServingError, match="empty history.*popular"):
        rec.recommend([], 5)
    with pytest.raises(ServingError, match="empty history"):
        rec.recommend_from_state(rec.start(), 5)
    for k in (0, -1, N + 1, 2.5):
        with pytest.raises(ServingError, match=rf"k={k!r} must be an integer in \[1, {N}\]"):
            rec.recommend(["i1"], k)
    with pytest.raises(ServingError, match="earlier than the user's latest event"):
        rec.update(rec.start(["i1"], times=[100]), ("i2", 50))
    with pytest.raises(ServingError, match="one timestamp per item"):
        rec.start(["i1", "i2"], times=[1])
    with pytest.raises(ServingError, match="trained on 40 items but the catalogue given has 30.*another dataset"):
        Recommender(SASRecConfig(hidden=16, inner=32).build(INFO), IDS[:31], W)
    with pytest.raises(ServingError, match="quantize='int4'"):
        _recommender("sasrec", quantize="int4")
    with pytest.raises(ServingError, match="user embeddings.*user="):
        Recommender(LSTIConfig(hidden=16, inner=32, fusion="id", user_embedding=True).build(INFO), IDS, W).start(["i1"])


# ---------------------------------------------------------------------------------------------- CLI
DATA = {"_target_": "training.data.datamodule.SeqDataModule", "max_len": 8, "batch_size": 32, "eval_batch_size": 64,
        "seed": 0, "source": {"kind": "synthetic", "synthetic": {"num_users": 30, "num_items": 25, "num_groups": 5,
                                                                 "mean_length": 10, "seed": 0}}}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A SASRec trained for 2 steps on a tiny synthetic log, saved as a Lightning checkpoint."""
    with pytest.MonkeyPatch.context() as mp:  # the cache dir conftest gives every test
        mp.setenv("LSTI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lsti-cache"))
        L.seed_everything(0)
        dm = SeqDataModule(**{k: v for k, v in DATA.items() if k != "_target_"})
        info = dm.info
        lit = LitRecommender(model={"_target_": "training.models.sasrec.SASRecConfig", "hidden": 16, "heads": 2,
                                    "inner": 32}, info=info.scalars(), item_tensors={"item_counts": info.item_counts},
                             data=DATA)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, use_distributed_sampler=False)
        trainer.fit(lit, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _run_cli(overrides: list[str]) -> Path:
    from training.recommend import recommend

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="recommend", overrides=overrides)
    return recommend(cfg)


def test_cli_writes_topk_for_all_users(tiny_checkpoint, tmp_path):
    out = _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'recs.parquet'}", "k=5"])
    recs = pd.read_parquet(out)
    assert list(recs.columns) == ["user", "rank", "item", "score"]
    data = SeqDataModule(**{k: v for k, v in DATA.items() if k != "_target_"}).prepare()
    assert recs["user"].nunique() == data.num_users and len(recs) == 5 * data.num_users
    for user, rows in recs.groupby("user"):
        u = list(data.user_ids).index(user)
        seen = set(data.item_ids[data.items[data.offsets[u]:data.offsets[u + 1]]])
        assert rows["rank"].tolist() == [1, 2, 3, 4, 5]
        assert not seen & set(rows["item"]), "exclude_seen=true must drop every item of the history"
        assert np.all(np.diff(rows["score"].to_numpy()) <= 0)
    # the online API gives the same list for a user from their raw history
    rec = Recommender.from_checkpoint(tiny_checkpoint)
    u = 3
    span = slice(data.offsets[u], data.offsets[u + 1])
    online = rec.recommend(list(data.item_ids[data.items[span]]), 5, times=list(data.times[span]))
    assert [i for i, _ in online] == recs[recs["user"] == data.user_ids[u]]["item"].tolist()


def test_cli_users_from_list_and_file_to_jsonl(tiny_checkpoint, tmp_path):
    out = _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'a.jsonl'}", "users=[3,0]", "k=2",
                    "exclude_seen=false"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["user"], r["rank"]) for r in rows] == [("3", 1), ("3", 2), ("0", 1), ("0", 2)]
    ids = tmp_path / "users.txt"
    ids.write_text("# users\n7\n\n2\n")
    out = _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'b.jsonl'}", f"users={ids}", "k=1"])
    assert [json.loads(line)["user"] for line in out.read_text().splitlines()] == ["7", "2"]


def test_cli_bad_input(tiny_checkpoint, tmp_path):
    with pytest.raises(ServingError, match=r"unknown user ids 'u9', 'u8'.*unknown_users=skip"):
        _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'x.jsonl'}", "users='u9,u8,3'"])
    out = _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'x.jsonl'}", "users='u9,3'", "unknown_users=skip",
                    "k=1"])
    assert len(out.read_text().splitlines()) == 1
    with pytest.raises(ServingError, match=r"\.parquet or \.jsonl"):
        _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'x.csv'}"])
    with pytest.raises(ServingError, match=r"k=26 must be an integer in \[1, 25\]"):
        _run_cli([f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'x.jsonl'}", "k=26"])
    other = {**DATA, "source": {"kind": "synthetic", "synthetic": {**DATA["source"]["synthetic"], "num_items": 30}}}
    with pytest.raises(ServingError, match="trained on 25 items but the data .* has 30.*another dataset"):
        Recommender.from_checkpoint(tiny_checkpoint, data=other)
    with pytest.raises(ValueError, match="does not exist"):
        _run_cli([f"ckpt={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'x.jsonl'}"])
    assert not list(tmp_path.glob(".x.*")), "no temporary output may be left behind"


@pytest.mark.slow  # a fresh interpreter importing Lightning: ~10 s, more on a busy machine
def test_cli_entry_point(tiny_checkpoint, tmp_path):
    out = tmp_path / "recs.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.recommend", f"ckpt={tiny_checkpoint}", f"out={out}",
                           "users='1,2'", "k=3", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 6
