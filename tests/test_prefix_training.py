"""Per-prefix training made cheap: shared prefix windows and last-block queries only where scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.datamodule import TrainWindows
from training.data.errors import DataError
from training.data.sequences import PreprocessConfig, build_sequences
from training.data.synthetic import generate
from training.models.sasrec import SASRecConfig


@pytest.fixture(scope="module")
def data():
    synthetic = generate(num_users=40, num_items=60, mean_length=30, seed=3)
    return build_sequences(synthetic.interactions, PreprocessConfig())


def _scored(ds: TrainWindows) -> tuple[torch.Tensor, dict]:
    """(user, target position) of every scored target, sorted, and the batch of all samples."""
    b = ds[torch.arange(len(ds))]
    idx = b["users"].unsqueeze(1).expand_as(b["targets"])
    ends = ds.ends.unsqueeze(1)
    pos = ends - ds.max_len + 1 + torch.arange(ds.max_len)  # event position each column predicts
    keys = (idx * 10_000 + pos)[b["targets"] > 0]
    return keys.sort().values, b


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_shared_prefix_windows_cover_every_target_once(data, stride):
    plain, _ = _scored(TrainWindows(data, max_len=8, stride=stride))
    shared_ds = TrainWindows(data, max_len=8, stride=stride, share_prefix=True)
    shared, b = _scored(shared_ds)
    assert torch.equal(plain, shared)
    assert int((b["targets"] > 0).sum()) == int(np.maximum(data.train_end - 1, 0).sum())
    # One prefix window per user, and no window needed for a target inside it.
    assert len(shared_ds) < len(TrainWindows(data, max_len=8, stride=stride)) or stride == 8
    x, y = b["items"], b["targets"]
    assert torch.equal(torch.where(y[:, :-1] > 0, x[:, 1:], 0), y[:, :-1])


def test_stride_is_validated(data):
    with pytest.raises(DataError, match="train_stride"):
        TrainWindows(data, max_len=8, stride=9, share_prefix=True)


def _model(norm: str, positions: str = "absolute"):
    torch.manual_seed(0)
    cfg = SASRecConfig(hidden=16, layers=2, heads=2, inner=32, dropout=0.0, attn_dropout=0.0, norm=norm,
                       positions=positions, ff_dropout="output")
    return cfg.build(type("Info", (), {"num_items": 60, "max_len": 8})()).eval()


def _one_per_row(mask: torch.Tensor) -> torch.Tensor:
    """Only each row's newest scored position (as per-prefix windows and evaluation score)."""
    newest = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
    return torch.zeros_like(mask).scatter_(1, newest.unsqueeze(1), True) & mask.any(1, keepdim=True)


@pytest.mark.parametrize("few", [False, True], ids=["many_per_row", "one_per_row"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_query_mask_states_equal_full_forward(data, norm, few):
    """Both ways the last block serves a query mask: per query (few per row) or a full block then indexed."""
    model = _model(norm)
    b = TrainWindows(data, max_len=8, stride=2)[torch.arange(30)]
    mask = b["targets"] > 0
    mask = _one_per_row(mask) if few else mask
    full = model(b["items"], b["times"], b["users"])[mask]
    part = model(b["items"], b["times"], b["users"], query_mask=mask)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    # Gradients agree too (the cheap path is a training path). In float64: the two paths sum in different orders,
    # so in float32 they differ by ~1e-5 relative, and by how much depends on the CPU's kernels (AVX vs AVX2).
    model = model.double()
    full = model(b["items"], b["times"], b["users"])[mask]
    g_full = torch.autograd.grad(full.square().sum(), list(model.parameters()), allow_unused=True)
    g_part = torch.autograd.grad(model(b["items"], b["times"], b["users"], query_mask=mask).square().sum(),
                                 list(model.parameters()), allow_unused=True)
    for a, c in zip(g_full, g_part):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-12)


def test_shared_prefix_window_equals_per_prefix_samples_with_absolute_positions(data):
    """The point of share_prefix: each prefix target gets exactly the state its own window would give."""
    model = _model("post", positions="absolute")
    per_prefix = TrainWindows(data, max_len=8, stride=1)
    shared = TrainWindows(data, max_len=8, stride=1, share_prefix=True)

    def states_by_target(ds):
        b = ds[torch.arange(len(ds))]
        mask = b["targets"] > 0
        states = model(b["items"], b["times"], b["users"], query_mask=mask)
        pos = ds.ends.unsqueeze(1) - ds.max_len + 1 + torch.arange(ds.max_len)
        keys = (b["users"].unsqueeze(1) * 10_000 + pos)[mask]
        order = keys.argsort()
        return keys[order], states[order]

    k1, s1 = states_by_target(per_prefix)
    k2, s2 = states_by_target(shared)
    assert torch.equal(k1, k2)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)
    last = data.train_end[data.train_end >= 2] - 1
    assert len(per_prefix) == last.sum()
    assert len(shared) == np.maximum(last - 8, 0).sum() + last.shape[0]  # one window per target beyond 8


def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p():
    from training.models.layers import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.3, training=True)
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(dropout(x, 0.3, training=False), x)


def test_cpu_attention_with_dropout_path_matches_sdpa_when_nothing_is_dropped():
    from training.models.layers import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 1, 5, 5)
    manual = attention(q, k, v, mask, p=1e-12, training=True)  # the written-out path, keeps everything
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(manual, ref, rtol=1e-5, atol=1e-6)


def _lsti(**overrides):
    from training.data.sequences import DataInfo
    from training.models.lsti import LSTIConfig

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    info = DataInfo(num_items=60, num_users=40, max_len=8, item_counts=torch.arange(61),
                    item_text=torch.randn(61, 12, generator=g), text_dim=12)
    cfg = dict(hidden=16, layers=2, heads=2, inner=32, dropout=0.0, attn_dropout=0.0, adapter_dropout=0.0,
               norm="post", positions="absolute", ff_dropout="output", short_len=4)
    return LSTIConfig(**{**cfg, **overrides}).build(info).eval()


@pytest.mark.parametrize("overrides", [
    {}, {"use_long": False}, {"use_short": False}, {"user_fusion": "concat"}, {"norm": "pre", "positions": "recent"},
    {"session_gap": 5e4, "short_rnn": "lstm", "user_embedding": True}, {"gate_length": True},
])
@pytest.mark.parametrize("few", [False, True], ids=["many_per_row", "one_per_row"])
def test_lsti_query_mask_states_and_gradients_equal_full_forward(data, overrides, few):
    """LSTI's cheap per-prefix path: long-term last block, short-term windows and gate only where scored."""
    model = _lsti(**overrides).double()  # float64: some gradients are ~1e-6, below float32 summation noise
    b = TrainWindows(data, max_len=8, stride=2)[torch.arange(30)]
    mask = b["targets"] > 0
    mask = _one_per_row(mask) if few else mask
    args = (b["items"], b["times"], b["users"])

    def run(query_mask=None):
        out = model(*args, query_times=b["target_times"], query_mask=query_mask)
        return out if query_mask is not None else out[mask]

    full, part = run(), run(mask)
    assert part.shape == (int(mask.sum()), 16)
    torch.testing.assert_close(part, full)
    params = list(model.parameters())
    g_full = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
    g_part = torch.autograd.grad(run(mask).square().sum(), params, allow_unused=True)
    for a, c in zip(g_full, g_part):
        if a is not None:
            torch.testing.assert_close(c, a)


def test_lsti_shared_prefix_window_equals_per_prefix_samples(data):
    model = _lsti(session_gap=5e4)

    def states_by_target(ds):
        b = ds[torch.arange(len(ds))]
        mask = b["targets"] > 0
        states = model(b["items"], b["times"], b["users"], query_times=b["target_times"], query_mask=mask)
        pos = ds.ends.unsqueeze(1) - ds.max_len + 1 + torch.arange(ds.max_len)
        keys = (b["users"].unsqueeze(1) * 10_000 + pos)[mask]
        order = keys.argsort()
        return keys[order], states[order]

    k1, s1 = states_by_target(TrainWindows(data, max_len=8, stride=1))
    k2, s2 = states_by_target(TrainWindows(data, max_len=8, stride=1, share_prefix=True))
    assert torch.equal(k1, k2)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_row, expect_query_path", [(1, True), (3, True), (4, False), (16, False)])
def test_causal_encoder_serves_few_queries_per_row_by_query_and_many_by_a_full_block(monkeypatch, per_row,
                                                                                  expect_query_path):
    """Each query gathers its sequence's keys and values, so the per-query path is taken only up to
    `query_path_limit` (L/16 per row; L=48 here: 4 rows x 3); both give the same states."""
    from training.models.layers import CausalBlock, CausalEncoder, query_path_limit

    assert query_path_limit(4, 48) == 12
    torch.manual_seed(0)
    enc = CausalEncoder(16, 2, 2, 32, 0.0, 0.0).eval()
    items = torch.randint(1, 50, (4, 48))
    x = torch.randn(4, 48, 16)
    mask = torch.zeros(4, 48, dtype=torch.bool)
    mask[:, -per_row:] = True
    calls = []
    original = CausalBlock.forward_queries
    monkeypatch.setattr(CausalBlock, "forward_queries", lambda self, *a: calls.append(1) or original(self, *a))
    torch.testing.assert_close(enc(x, items, mask), enc(x, items)[mask], rtol=1e-5, atol=1e-5)
    assert bool(calls) == expect_query_path


@pytest.mark.parametrize("name", ["sasrec", "lsti", "lsti_long_query_time", "gru4rec"])
def test_latest_states_equal_the_forward_at_the_newest_position(data, name):
    """What evaluation and serving score: only the newest position, computed alone where the model can."""
    from training.data.datamodule import EvalQueries
    from training.models.gru4rec import GRU4RecConfig

    if name.startswith("lsti"):
        model = _lsti(user_embedding=True, gate_length=True, norm="pre", positions="recent",
                      long_query_time=name == "lsti_long_query_time")
    elif name == "sasrec":
        model = _model("post", positions="recent")
    else:
        torch.manual_seed(0)
        model = GRU4RecConfig(embedding=16, hidden=16).build(type("Info", (), {"num_items": 60, "max_len": 8})()).eval()
    q = EvalQueries(data, data.test, max_len=8, history_cap=2)  # short histories: left padding in every window
    b = q[torch.arange(len(q))]
    query_times = torch.cat([b["times"][:, 1:], b["target_time"].unsqueeze(1)], dim=1)
    args = (b["items"], b["times"], b["users"])
    with torch.no_grad():
        full = model(*args, query_times=query_times)[:, -1]
        latest = model.latest_states(*args, query_times=query_times)
    assert latest.shape == (len(q), 16)
    torch.testing.assert_close(latest, full, rtol=1e-5, atol=1e-5)
