import pytest
import torch

from training.data.sequences import DataInfo
from training.losses import LossConfig, negative_distribution, recommendation_loss
from training.models.gru4rec import GRU4RecConfig
from training.models.pop import PopConfig
from training.models.sasrec import SASRecConfig

INFO = DataInfo(num_items=30, num_users=5, max_len=8, item_counts=torch.arange(31))


def _batch(seed=0, b=4, n=8):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 31, (b, n), generator=g)
    items[0, :3] = 0  # left padding
    times = torch.cumsum(torch.randint(1, 100, (b, n), generator=g), 1)
    return items, times, torch.arange(b)


@pytest.mark.parametrize("cfg", [SASRecConfig(hidden=16, heads=2, inner=32), SASRecConfig(hidden=16, heads=2, inner=32, norm="post"),
                                 SASRecConfig(hidden=16, heads=2, inner=32, positions="absolute"),
                                 GRU4RecConfig(embedding=16, hidden=24)])
def test_shapes_and_causality(cfg):
    torch.manual_seed(0)
    model = cfg.build(INFO).eval()
    items, times, users = _batch()
    states = model(items, times, users)
    assert states.shape[:2] == items.shape
    assert model.score(states[:, -1]).shape == (4, 31)
    changed = items.clone()
    changed[:, -1] = (changed[:, -1] % 30) + 1
    states2 = model(changed, times, users)
    assert torch.allclose(states[:, :-1], states2[:, :-1], atol=1e-5)  # the future never leaks back


@pytest.mark.parametrize("cfg", [SASRecConfig(hidden=16, heads=2, inner=32), SASRecConfig(hidden=16, heads=2, inner=32, norm="post"),
                                 GRU4RecConfig(embedding=16, hidden=24)])
def test_padding_amount_does_not_change_last_state(cfg):
    torch.manual_seed(0)
    model = cfg.build(INFO).eval()
    items = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])
    short = items[:, 3:]
    times = torch.zeros_like(items)
    if isinstance(cfg, GRU4RecConfig):
        a = model(items, times, torch.zeros(1))[:, -1]
        b = model(short, times[:, 3:], torch.zeros(1))[:, -1]
        assert torch.allclose(a, b, atol=1e-5)
    else:  # positions count back from the newest event, so the same tail gives the same state
        a = model(items, times, torch.zeros(1))[:, -1]
        b = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), times, torch.zeros(1))[:, -1]
        assert torch.allclose(a, b)


def test_gru_full_sequence_equals_stepwise():
    torch.manual_seed(0)
    model = GRU4RecConfig(embedding=8, hidden=8).build(INFO).eval()
    items = torch.tensor([[0, 0, 3, 4, 5]])
    full = model(items, torch.zeros_like(items), torch.zeros(1))
    for t in range(2, 5):
        prefix = items[:, : t + 1]
        assert torch.allclose(model(prefix, torch.zeros_like(prefix), torch.zeros(1))[:, -1], full[:, t], atol=1e-6)


def test_pop_scores_by_popularity():
    model = PopConfig().build(INFO)
    items, times, users = _batch()
    scores = model.score(model(items, times, users)[:, -1])
    assert torch.equal(scores[0], torch.arange(31).float())
    assert not model.trainable


@pytest.mark.parametrize("name", ["ce", "sampled", "bce"])
def test_losses_decrease_when_fitting(name):
    torch.manual_seed(0)
    cfg = LossConfig(name=name, num_negatives=10)
    table = torch.nn.Parameter(torch.randn(31, 8) * 0.1)
    states = torch.nn.Parameter(torch.randn(16, 8) * 0.1)
    targets = torch.randint(1, 31, (16,))
    probs = negative_distribution(cfg, torch.arange(31), 30)
    opt = torch.optim.Adam([table, states], lr=0.05)
    first = None
    for _ in range(50):
        loss = recommendation_loss(states, targets, table, cfg, probs, torch.Generator().manual_seed(1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
    assert probs[0] == 0


def test_bad_loss_config_is_named():
    with pytest.raises(ValueError, match="loss.name"):
        LossConfig(name="hinge")


def _lsti_info():
    g = torch.Generator().manual_seed(0)
    return DataInfo(num_items=30, num_users=5, max_len=8, item_counts=torch.arange(31),
                    item_text=torch.randn(31, 12, generator=g), text_dim=12)


@pytest.mark.parametrize("overrides", [
    {}, {"fusion": "id"}, {"fusion": "text", "adapter": "mlp"}, {"combine": "sum"}, {"use_short": False},
    {"use_long": False}, {"user_fusion": "concat"}, {"session_gap": 50.0, "short_rnn": "lstm"},
    {"user_embedding": True, "use_time": False}, {"norm": "post"}, {"norm": "post", "ff_dropout": "output"},
    {"long_query_time": True},
])
def test_lsti_variants_are_causal(overrides):
    from training.models.lsti import LSTIConfig

    torch.manual_seed(0)
    cfg = LSTIConfig(hidden=16, heads=2, inner=32, short_len=3, **overrides)
    model = cfg.build(_lsti_info()).eval()
    items, times, users = _batch()
    qt = times + 5
    states = model(items, times, users, query_times=qt)
    assert states.shape == (4, 8, 16) and torch.isfinite(states).all()
    changed = items.clone()
    changed[:, -1] = (changed[:, -1] % 30) + 1
    states2 = model(changed, times, users, query_times=qt)
    assert torch.allclose(states[:, :-1], states2[:, :-1], atol=1e-5)
    table = model.item_table()
    assert table.shape == (31, 16) and torch.all(table[0] == 0)


def test_long_query_time_reaches_the_long_term_state_and_only_later_positions():
    """`long_query_time`: the time until the prediction is requested feeds the long-term encoder (not only the
    gate), and a position's query time never reaches earlier positions."""
    from training.models.lsti import LSTIConfig

    torch.manual_seed(0)
    model = LSTIConfig(hidden=16, heads=2, inner=32, use_short=False, long_query_time=True).build(_lsti_info()).eval()
    items, times, users = _batch()
    qt = times + 5
    later = qt.clone()
    later[:, -1] += 86400  # a day passes before the newest prediction is requested
    with torch.no_grad():
        states, states_later = model(items, times, users, query_times=qt), model(items, times, users, query_times=later)
    assert torch.allclose(states[:, :-1], states_later[:, :-1], atol=1e-6)
    assert (states[:, -1] - states_later[:, -1]).abs().amax() > 1e-3
    plain = LSTIConfig(hidden=16, heads=2, inner=32, use_short=False).build(_lsti_info()).eval()
    with torch.no_grad():  # without the option a long-only model ignores the query time
        assert torch.equal(plain(items, times, users, query_times=qt), plain(items, times, users, query_times=later))
    with pytest.raises(ValueError, match="long_query_time"):
        LSTIConfig(use_long=False, long_query_time=True)


def test_lsti_text_mode_has_no_id_table_and_needs_text():
    from training.models.lsti import LSTIConfig

    model = LSTIConfig(hidden=16, fusion="text").build(_lsti_info())
    assert not hasattr(model, "item_emb")
    with pytest.raises(ValueError, match="text"):
        LSTIConfig(fusion="id+text").build(INFO)
    with pytest.raises(ValueError, match="use_long"):
        LSTIConfig(use_long=False, use_short=False)


def test_lsti_long_window_is_200_events_bounded_by_the_data_window():
    """The issue's L: the latest 200 events by default, never more than the data window holds."""
    from dataclasses import replace

    from training.models.lsti import LSTIConfig

    cfg = LSTIConfig(hidden=16, heads=2, inner=32, short_len=3)
    assert cfg.long_len == 200
    assert cfg.build(_lsti_info()).long_len == 8  # data.max_len = 8
    wide = replace(_lsti_info(), max_len=300)
    model = cfg.build(wide)
    assert model.long_len == 200 and model.pos_emb.num_embeddings == 200
    assert LSTIConfig(hidden=16, heads=2, inner=32, long_len=5).build(_lsti_info()).long_len == 5
    assert LSTIConfig(hidden=16, heads=2, inner=32, long_len=None).build(wide).long_len == 300
    items, times, users = _batch(n=300)
    assert model(items, times, users).shape == (4, 200, 16)  # the oldest 100 events are left out
    with pytest.raises(ValueError, match="model.long_len"):
        LSTIConfig(long_len=0)


def test_lsti_session_window_drops_events_before_the_gap():
    from training.models.lsti import LSTIConfig

    model = LSTIConfig(hidden=8, heads=2, short_len=4, session_gap=10.0, fusion="id").build(INFO)
    items = torch.tensor([[1, 2, 3, 4, 5]])
    times = torch.tensor([[0, 1, 100, 101, 102]])
    _, valid = model._short_windows(items, times, torch.zeros(5, dtype=torch.long), torch.arange(5))
    assert valid[-1].tolist() == [False, True, True, True]  # event at t=1 is before the 99 s gap
    assert valid[1].tolist() == [False, False, True, True]


def test_bad_sasrec_options_are_named():
    with pytest.raises(ValueError, match="model.positions"):
        SASRecConfig(positions="middle")
    with pytest.raises(ValueError, match="norm"):
        SASRecConfig(norm="sandwich").build(INFO)
    with pytest.raises(ValueError, match="model.ff_dropout"):
        SASRecConfig(ff_dropout="everywhere")


def test_ff_dropout_output_drops_only_after_the_feed_forward():
    """RecBole's block (`ff_dropout=output`) leaves the inner activation alone; Kang's (`inner`) drops it."""
    from training.models.layers import FeedForward

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    for inner_dropout, expect_zeros in ((True, True), (False, False)):
        ff = FeedForward(16, 32, dropout=0.5, inner_dropout=inner_dropout).train()
        activation = ff.net[1](ff.net[0](x))  # what reaches the inner dropout
        dropped = ff.net[2](activation)
        assert bool((dropped == 0).sum() > (activation == 0).sum() + 100) is expect_zeros
    model = SASRecConfig(hidden=16, heads=2, inner=32, norm="post", ff_dropout="output").build(INFO)
    assert all(block.ff.net[2].p == 0.0 for block in model.encoder.blocks)


def test_unseen_items_stay_out_of_the_training_softmax_and_negatives():
    torch.manual_seed(0)
    states, table = torch.randn(6, 8), torch.randn(31, 8)
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    mask = torch.ones(31, dtype=torch.bool)
    mask[0] = False
    mask[20:] = False  # items 20..30 never occur in training
    cfg = LossConfig(name="ce")
    restricted = recommendation_loss(states, targets, table, cfg, item_mask=mask)
    reference = torch.nn.functional.cross_entropy(states @ table[:20].T, targets)  # softmax over items 0..19 ...
    logits = states @ table[:20].T
    logits[:, 0] = float("-inf")  # ... without the padding row
    assert torch.allclose(restricted, torch.nn.functional.cross_entropy(logits, targets), atol=1e-6)
    assert not torch.allclose(restricted, reference)
    assert recommendation_loss(states, targets, table, cfg) > restricted  # more items compete without the mask
    probs = negative_distribution(LossConfig(name="sampled"), torch.arange(31), 30, mask)
    assert probs[20:].sum() == 0 and probs[0] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
