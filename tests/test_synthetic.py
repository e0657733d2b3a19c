"""Synthetic generator: shapes, determinism and the documented ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data.errors import DataError
from training.data.synthetic import GROUP_WORDS, generate

P_LONG, DRIFT, GROUPS, K = 0.5, 0.7, 12, 2


@pytest.fixture(scope="module")
def data():
    return generate(
        3000,
        600,
        num_groups=GROUPS,
        mean_length=40,
        long_term_groups=K,
        session_length=(3, 8),
        drift=DRIFT,
        p_long=P_LONG,
        seed=11,
    )


def session_table(d) -> pd.DataFrame:
    """One row per session: user, group, long flag, continued flag, length."""
    inter, truth = d.interactions, d.truth
    sid = truth["session_id"]
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    return pd.DataFrame(
        {
            "user": inter["user"].to_numpy()[first].astype(int),
            "group": truth["session_group"][first],
            "long": truth["session_long"][first],
            "continued": truth["drift_continued"][first],
            "length": np.diff(np.r_[first, len(sid)]),
            "first_event": first,
        }
    )


def test_shapes_and_columns(data):
    inter, items, truth = data.interactions, data.items, data.truth
    assert list(inter.columns) == ["user", "item", "time"] and inter["time"].dtype == np.int64
    assert list(items.columns) == ["item", "group", "title"] and len(items) == 600
    assert len(inter) == truth["lengths"].sum() and truth["lengths"].shape == (3000,)
    assert truth["long_groups"].shape == (3000, K) and truth["item_group"].shape == (600,)
    for key in ("session_id", "session_group", "session_long", "drift_continued"):
        assert truth[key].shape == (len(inter),)
    assert inter["user"].nunique() == 3000 and truth["lengths"].min() >= 5
    assert abs(truth["lengths"].mean() - 40) < 2
    assert np.bincount(truth["item_group"], minlength=GROUPS).min() == 600 // GROUPS  # balanced groups


def test_deterministic_for_a_seed():
    a, b = generate(200, 100, seed=5), generate(200, 100, seed=5)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    for key in a.truth:
        np.testing.assert_array_equal(a.truth[key], b.truth[key])
    c = generate(200, 100, seed=6)
    assert not a.interactions["item"].equals(c.interactions["item"])


def test_items_follow_their_session_group(data):
    items = data.interactions["item"].to_numpy().astype(int)
    np.testing.assert_array_equal(data.truth["item_group"][items], data.truth["session_group"])
    words = data.items["title"].str.split().str[0]
    assert (words == np.array(GROUP_WORDS)[data.items["group"].to_numpy()]).all()
    assert data.items["title"].iloc[7].endswith(" item 7")


def test_long_groups_are_distinct_and_sorted(data):
    long = data.truth["long_groups"]
    assert (np.diff(long, axis=1) > 0).all() and long.min() >= 0 and long.max() < GROUPS


def test_session_groups_match_the_documented_process(data):
    s = session_table(data)
    long = data.truth["long_groups"]
    in_long = (long[s["user"].to_numpy()] == s["group"].to_numpy()[:, None]).any(axis=1)
    assert (in_long == s["long"].to_numpy()).all()  # long sessions use favourites, drift sessions never do
    assert abs(s["long"].mean() - P_LONG) < 0.02
    drift = s.loc[~s["long"]].copy()
    drift["previous"] = drift.groupby("user")["group"].shift()
    later = drift.loc[drift["previous"].notna()]
    assert abs(later["continued"].mean() - DRIFT) < 0.02
    assert (later.loc[later["continued"], "group"] == later.loc[later["continued"], "previous"]).all()
    same = (later["group"] == later["previous"]).mean()
    assert abs(same - (DRIFT + (1 - DRIFT) / (GROUPS - K))) < 0.02
    assert not drift.groupby("user").head(1)["continued"].any()


def test_session_lengths(data):
    s = session_table(data)
    user_start = np.r_[0, np.cumsum(data.truth["lengths"])[:-1]]
    interior = ~np.isin(s["first_event"], user_start) & (
        s["user"].to_numpy() == s["user"].shift(-1).to_numpy()
    )
    assert s.loc[interior, "length"].between(3, 8).all() and s["length"].max() <= 8
    assert abs(s.loc[interior, "length"].mean() - 5.5) < 0.1


def test_timestamps(data):
    inter = data.interactions
    same_user = inter["user"].to_numpy()[1:] == inter["user"].to_numpy()[:-1]
    gaps = np.diff(inter["time"].to_numpy())[same_user]
    assert (gaps > 0).all()  # strictly increasing per user
    new_session = (np.diff(data.truth["session_id"]) > 0)[same_user]
    assert gaps[~new_session].max() < 3600 <= gaps[new_session].min()
    assert 60 < np.median(gaps[~new_session]) < 600 and np.median(gaps[new_session]) > 12 * 3600


def test_popularity_within_group(data):
    truth = data.truth
    items = data.interactions["item"].to_numpy().astype(int)
    counts = np.bincount(items, minlength=600)
    group = 3
    members = np.flatnonzero(truth["item_group"] == group)
    np.testing.assert_allclose(truth["item_popularity"][members].sum(), 1.0)
    observed = counts[members] / counts[members].sum()
    np.testing.assert_allclose(observed, truth["item_popularity"][members], atol=0.01)
    top = members[np.argmax(truth["item_popularity"][members])]
    assert counts[top] > 3 * np.median(counts[members])


def test_uniform_popularity():
    d = generate(500, 100, num_groups=4, popularity=0.0, seed=1)
    np.testing.assert_allclose(d.truth["item_popularity"], 1 / 25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"long_term_groups": 20}, "long_term_groups"),
        ({"num_groups": 200}, "num_items"),
        ({"session_length": (5, 2)}, "session_length"),
        ({"mean_length": 2}, "min_length"),
        ({"drift": 1.5}, "drift"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(DataError, match=match):
        generate(10, 100, **kwargs)


def test_scales_without_python_loops():
    """Half a million events must come out in well under a second on any machine (no timing assert)."""
    d = generate(10_000, 50_000, mean_length=50, seed=2)
    assert len(d.interactions) > 400_000 and d.interactions["item"].nunique() > 10_000
