"""model.user_profile: the users' profile texts through the language model, into LSTI's long-term state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_config

from training import text as T
from training.data.sequences import DataInfo, held_out_user_codes
from training.models.lsti import LSTIConfig
from training.serving import Recommender
from training.train import train

N, U, H, W = 30, 5, 8, 6
PROFILE = ["model.user_profile=true", "model.text.user_template='{likes}'"]


def _info(user_text: torch.Tensor | None = None) -> DataInfo:
    g = torch.Generator().manual_seed(0)
    if user_text is None:
        user_text = torch.randn(U, H, generator=g)
        user_text[3] = 0  # a user without a profile row
    return DataInfo(num_items=N, num_users=U, max_len=W, item_counts=torch.arange(N + 1),
                    item_text=torch.randn(N + 1, H, generator=g), text_dim=H, user_text=user_text, user_text_dim=H)


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return LSTIConfig(hidden=16, inner=32, short_len=3, user_profile=True, **kwargs).build(_info()).eval()


def test_render_user_texts_aligns_and_names_missing_tables():
    users = pd.DataFrame({"user": ["b", "a"], "age": [30, 24], "job": ["nurse", "artist"]})
    with pytest.warns(UserWarning, match="1 of 3 users have no row"):
        texts = T.render_user_texts(users, "{age} year old {job}", ["a", "b", "c"])
    assert texts == ["24 year old artist", "30 year old nurse", None]
    with pytest.raises(T.TextModelError, match="model.user_profile"):
        T.render_user_texts(None, "{age}", ["a", "b"])
    with pytest.raises(T.TextModelError, match="'gender'.*user table lacks"):
        T.render_user_texts(users, "{gender}", ["a"])


def test_user_text_embeddings_are_cached_and_zero_without_a_profile(tmp_path):
    users = pd.DataFrame({"user": ["1", "2"], "likes": ["jazz", "chess and jazz"]})
    with pytest.warns(UserWarning, match="no row"):
        table = T.user_text_embeddings(users, ["1", "2", "3"], "likes {likes}", cache_dir=tmp_path, progress=False)
    assert table.shape[0] == 3 and bool((table[2] == 0).all()) and bool((table[:2].abs().sum(1) > 0).all())
    assert len(list(tmp_path.glob("*.pt"))) == 1
    with pytest.warns(UserWarning, match="no row"):
        again = T.user_text_embeddings(users, ["1", "2", "3"], "likes {likes}", cache_dir=tmp_path, progress=False)
    assert torch.equal(table, again)


@pytest.mark.parametrize("into", ["long", "user"])
def test_profile_changes_the_state_only_of_users_with_one(into):
    model = _model(profile_into=into)
    items = torch.randint(1, N + 1, (1, W), generator=torch.Generator().manual_seed(1)).repeat(U + 1, 1)
    times = torch.arange(W).repeat(U + 1, 1) * 100
    users = torch.tensor([0, 1, 2, 3, 4, -1])
    with torch.no_grad():
        states = model(items, times, users)[:, -1]
        no_profile = model.user_profiles(users)
    assert not torch.allclose(states[0], states[1])
    assert bool((no_profile[3] == 0).all()) and bool((no_profile[5] == 0).all())
    assert torch.allclose(states[3], states[5])  # no profile row == unknown user
    # the per-prefix fast path adds the same profile
    mask = torch.zeros_like(items, dtype=torch.bool)
    mask[:, -1] = True
    mask[0, 2] = True
    with torch.no_grad():
        full = model(items, times, users)
        fast = model(items, times, users, query_mask=mask)
    assert torch.allclose(fast, full[mask], atol=1e-5)


def test_held_out_users_keep_their_profile_but_not_their_id_embedding():
    """A user held out of training (the cold_users split) gives the profile row a new user gives at sign-up; the
    user-id embedding, never trained for them, is left out."""
    model = _model(user_embedding=True)
    items = torch.randint(1, N + 1, (1, W), generator=torch.Generator().manual_seed(1)).repeat(3, 1)
    times = torch.arange(W).repeat(3, 1) * 100
    with torch.no_grad():
        held_out = held_out_user_codes(torch.tensor([0, 1, 2]))
        assert torch.equal(model.user_profiles(held_out), model.user_profiles(torch.tensor([0, 1, 2])))
        before = model(items, times, held_out)
        model.user_emb.weight.normal_()
        assert torch.allclose(model(items, times, held_out), before)  # no id embedding
        assert not torch.allclose(before[0], before[1])  # but their own profiles


def test_bad_profile_configs_are_named():
    with pytest.raises(ValueError, match="user_profile.*use_long"):
        LSTIConfig(user_profile=True, use_long=False)
    LSTIConfig(user_profile=True, use_long=False, profile_into="user")  # the fused state needs no long-term encoder
    with pytest.raises(ValueError, match="profile_into"):
        LSTIConfig(user_profile=True, profile_into="gate")
    info = _info()
    info.user_text, info.user_text_dim = None, 0
    with pytest.raises(ValueError, match="DataInfo.user_text"):
        LSTIConfig(hidden=16, user_profile=True).build(info)


@pytest.mark.parametrize("into", ["long", "user"])
def test_serving_uses_known_users_profiles_and_serves_new_users_without(into):
    model = _model(profile_into=into)
    ids = ["<pad>"] + [f"i{i}" for i in range(1, N + 1)]
    rec = Recommender(model, ids, W, item_counts=torch.arange(N + 1), user_ids=[f"u{u}" for u in range(U)])
    g = torch.Generator().manual_seed(2)
    history = torch.randint(1, N + 1, (9,), generator=g).tolist()
    times = torch.cumsum(torch.randint(1, 80, (9,), generator=g), 0).tolist()
    for user, index in (("u1", 1), ("u2", 2), ("stranger", -1), (None, -1)):
        state = rec.start([ids[i] for i in history[:2]], times=times[:2], user=user)
        for t in range(2, len(history)):
            rec.update(state, (ids[history[t]], times[t]))
        window = torch.tensor([history[-W:]]), torch.tensor([times[-W:]])
        reference = rec.encode_batch(*window, users=torch.tensor([index]))
        with torch.inference_mode():
            assert torch.allclose(rec.encoder.vector(state, None), reference[0], atol=1e-5), user
    assert not torch.allclose(rec.encode_batch(*window, users=torch.tensor([1])),
                              rec.encode_batch(*window))  # users=None: nobody's profile


def test_lsti_trains_with_profiles_and_its_checkpoint_reloads(tmp_path):
    from training.checkpoints import load_module

    cfg = tiny_config(tmp_path, "lsti", PROFILE)
    results, _ = train(cfg)
    assert np.isfinite(results["test/ndcg@10"])
    module = load_module(tmp_path / "checkpoints" / "best.ckpt")
    table = module.model.user_text
    assert table.shape[0] == 60 and bool((table.abs().sum(1) > 0).all())  # every synthetic user has a profile
    saved = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(saved["state_dict"]["model.user_text"], table)


def test_federated_parties_hold_only_their_own_profiles(tmp_path):
    from federated import task
    from federated.server_app import compose_config
    from tests.test_federated import SMALL

    spec = task.make_spec(compose_config([*SMALL, f"paths.output_dir={tmp_path}", *PROFILE]), 3,
                          str(tmp_path / "client_state"))
    everyone = task._item_side(task.spec_to_str(spec))[0]["user_text"]
    client = task.client_data(spec, 1)
    local = task.client_module(spec, client)
    assert torch.equal(local.model.user_text, everyone[torch.as_tensor(client.users)])
    server = task.build_module(spec)
    assert bool((server.model.user_text == 0).all())  # the server knows no profile
    shared = task.shared_names(local, spec)
    assert shared and not any("user_text" in n for n in shared)  # a buffer: never exchanged


def test_table_sources_read_a_user_table(tmp_path):
    from training.data.datamodule import SeqDataModule
    from training.data.errors import DataError

    inter = pd.DataFrame({"uid": ["a", "a", "b", "b", "b"], "sku": ["x", "y", "x", "z", "y"], "ts": [1, 2, 1, 2, 3]})
    inter.to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"member": ["b", "a"], "age": [41, 19]}).to_csv(tmp_path / "people.csv", index=False)
    columns = {"user": "uid", "item": "sku", "time": "ts"}
    dm = SeqDataModule(source={"kind": "table", "path": str(tmp_path / "log.csv"), "columns": columns,
                               "users_path": str(tmp_path / "people.csv"), "user_column": "member"}, cache=False)
    users = dm.load_users_frame()
    assert users.set_index("user")["age"].to_dict() == {"b": "41", "a": "19"}  # read as text
    assert T.render_user_texts(users, "{age}", list(dm.prepare().user_ids)) == ["19", "41"]
    wrong = SeqDataModule(source={"kind": "table", "path": str(tmp_path / "log.csv"), "columns": columns,
                                  "users_path": str(tmp_path / "people.csv"), "user_column": "uid"}, cache=False)
    with pytest.raises(DataError, match="people.csv.*'uid'.*data.source.user_column"):
        wrong.load_users_frame()
