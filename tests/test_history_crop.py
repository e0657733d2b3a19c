"""Training on short histories (`data.train_history_crop`): a share of the training windows is cut to a random
number of its latest events, so models also train on short histories at the positions evaluation uses."""

import numpy as np
import pytest
import torch

from tests.helpers import tiny_config
from training.data.datamodule import SeqDataModule, ShardedBatchSampler, TrainWindows
from training.data.errors import DataError
from training.data.sequences import PreprocessConfig, build_sequences
from training.train import train

MAX_LEN = 8


@pytest.fixture()
def data(interactions):
    return build_sequences(interactions, PreprocessConfig())


def _all(ds: TrainWindows, epoch: int = 0) -> dict:
    return ds[(epoch, torch.arange(len(ds)))]


def test_no_crop_is_unchanged(data):
    plain = TrainWindows(data, MAX_LEN)
    off = TrainWindows(data, MAX_LEN, history_crop=0.0, crop_seed=5)
    ids = torch.arange(len(plain))
    for key, value in plain[ids].items():
        assert torch.equal(value, off[(3, ids)][key]), key


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_cropped_windows_keep_a_suffix_of_their_events(data, share):
    full = _all(TrainWindows(data, MAX_LEN))
    crop = _all(TrainWindows(data, MAX_LEN, history_crop=share, crop_seed=1))
    n_full, n_crop = (full["items"] > 0).sum(1), (crop["items"] > 0).sum(1)
    assert bool((n_crop >= 1).all()) and bool((n_crop <= n_full).all())
    kept = torch.arange(MAX_LEN) >= MAX_LEN - n_crop.unsqueeze(1)  # the latest n_crop columns (left padding)
    for key in ("items", "times", "targets", "target_times"):
        assert torch.equal(crop[key], torch.where(kept, full[key], 0)), key
    assert torch.equal(crop["users"], full["users"])
    cut = n_crop < n_full
    windows_that_can_be_cut = n_full > 1
    if share == 1.0:  # every window draws a length; only a draw of all its events leaves it whole
        assert float(cut.float().mean()) > 0.6
    else:
        rate = float(cut.float().mean()) / float(windows_that_can_be_cut.float().mean())
        assert 0.15 < rate < 0.35, rate
    # cropped windows still score their newest targets, with contexts of every length
    assert set(n_crop[cut].tolist()) >= {1, 2, 3}


def test_crops_are_deterministic_and_change_with_the_epoch(data):
    ds = TrainWindows(data, MAX_LEN, history_crop=0.5, crop_seed=7)
    again = TrainWindows(data, MAX_LEN, history_crop=0.5, crop_seed=7)
    ids = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:40]
    assert torch.equal(ds[(2, ids)]["items"], again[(2, ids)]["items"])
    assert not torch.equal(ds[(2, ids)]["items"], ds[(3, ids)]["items"])
    other_seed = TrainWindows(data, MAX_LEN, history_crop=0.5, crop_seed=8)
    assert not torch.equal(ds[(2, ids)]["items"], other_seed[(2, ids)]["items"])


def test_training_sampler_passes_the_epoch():
    plain = ShardedBatchSampler(50, 8, shuffle=True, seed=3)
    tagged = ShardedBatchSampler(50, 8, shuffle=True, seed=3, with_epoch=True)
    for s in (plain, tagged):
        s.set_epoch(4)
    for ids, (epoch, tagged_ids) in zip(plain, tagged, strict=True):
        assert epoch == 4 and torch.equal(ids, tagged_ids)


def test_bad_crop_shares_are_named(data):
    with pytest.raises(DataError, match="data.train_history_crop=1.5"):
        SeqDataModule(source={"kind": "synthetic"}, train_history_crop=1.5)
    with pytest.raises(DataError, match="data.train_history_crop=-0.1"):
        TrainWindows(data, MAX_LEN, history_crop=-0.1)


def test_datamodule_crops_training_batches_only(tmp_path):
    dm = SeqDataModule(source={"kind": "synthetic", "synthetic": {"num_users": 60, "num_items": 40, "seed": 0}},
                       max_len=10, batch_size=16, train_history_crop=1.0, cache=False, seed=0)
    dm.setup()
    full = TrainWindows(dm.prepare(), 10)
    lengths = []
    for batch in dm.train_dataloader():
        lengths.append((batch["items"] > 0).sum(1))
    lengths = torch.cat(lengths)
    assert lengths.shape[0] == len(full) and float(lengths.float().mean()) < 0.75 * float(
        (full[torch.arange(len(full))]["items"] > 0).sum(1).float().mean())
    val = next(iter(dm.val_dataloader()))  # evaluation sees whole histories
    assert int((val["items"] > 0).sum(1).max()) == 10


def test_lsti_trains_with_crops_and_gate_length(tmp_path):
    cfg = tiny_config(tmp_path, "lsti", ["data.train_history_crop=0.5", "model.gate_length=true"])
    results, _ = train(cfg)
    assert np.isfinite(results["test/ndcg@10"])
    state = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    hidden = state["model.out_norm.weight"].shape[0]
    assert state["model.gate.0.weight"].shape[1] == 2 * hidden + 2  # long, short, elapsed time, events known


def test_gate_length_feature_reaches_the_gate():
    from training.data.sequences import DataInfo
    from training.models.lsti import LSTIConfig

    torch.manual_seed(0)
    info = DataInfo(num_items=30, num_users=5, max_len=6, item_counts=torch.arange(31),
                    item_text=torch.randn(31, 8), text_dim=8)
    model = LSTIConfig(hidden=16, inner=32, short_len=3, gate_length=True).build(info).eval()
    long, short = torch.randn(2, 16), torch.randn(2, 16)
    few, many = model.fuse(long, short, torch.zeros(2), torch.tensor([1, 1])), model.fuse(
        long, short, torch.zeros(2), torch.tensor([6, 6]))
    assert not torch.allclose(few, many)
    with pytest.raises(ValueError, match="gate_length"):
        model.fuse(long, short, torch.zeros(2))
    # the count is of real events up to each position: left padding is not counted
    seen = []
    feature = model.length_feature
    model.length_feature = lambda known, dtype: seen.append(known.clone()) or feature(known, dtype)
    items = torch.tensor([[0, 0, 0, 0, 5, 7], [0, 3, 4, 5, 6, 7]])
    model(items, torch.arange(6).repeat(2, 1) * 100, torch.zeros(2, dtype=torch.long))
    assert seen[0].tolist() == [[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]]


def test_federated_clients_crop_their_training_windows(tmp_path):
    from federated import task
    from federated.server_app import compose_config
    from tests.test_federated import SMALL

    spec = task.make_spec(compose_config([*SMALL, f"paths.output_dir={tmp_path}", "data.train_history_crop=1.0"]),
                          3, str(tmp_path / "client_state"))
    client = task.client_data(spec, 0)
    assert client.train.history_crop == 1.0
    whole = TrainWindows(client.data, client.train.max_len)
    ids = torch.arange(len(whole))
    cropped, full = ((w[(1, ids)]["items"] > 0).sum(1) for w in (client.train, whole))
    assert bool((cropped <= full).all()) and bool((cropped < full).any())
