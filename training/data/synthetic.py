"""Seeded synthetic interaction logs with a planted long-/short-term interest structure.

Why: a recommender that models both long-term preferences and short-term (session) interest should
measurably beat one that models only one of them, and a text encoder should help because item titles
reveal item groups. Real data cannot tell us the right answer; this generator plants it, and returns
it in `truth`, so tests and ablations can check the models against it. Everything is vectorised numpy
(no per-user or per-event Python loops): 10M events over 1M items take a few seconds.

Ground truth (raw ids are the decimal indices: user "17" is row 17 of every per-user truth array,
item "5" is row 5 of every per-item array):

* Items. Each of `num_items` items belongs to one of `num_groups` groups (balanced, random assignment;
  `truth["item_group"]`). Within its group an item has a popularity rank r (random order) and is
  drawn with probability proportional to about (r + 1) ** -popularity (a discretised power law:
  rank = floor(x) - 1 for x drawn from the density x ** -popularity on [1, n_group + 1));
  `truth["item_popularity"]` is the exact within-group probability. The item title is
  "<group word> <adjective> item <id>": the group word comes from a fixed vocabulary (groups beyond
  its size append a number, "jazz 2"), the adjective is random noise, so titles reveal groups.
* Users. Each user has `long_term_groups` distinct favourite groups (`truth["long_groups"]`, [U, k],
  sorted) and a sequence length min_length + Geometric (mean `mean_length`).
* Sessions. A user's events are cut into sessions of uniform length in `session_length` (a renewal
  process laid over all users' events, so a user's first and last session can be shorter). Each
  session follows one group; all its events are items of that group:
    - with probability `p_long` (independently per session) a long-term session: a uniformly chosen
      favourite group of the user;
    - otherwise a short-term (drift) session: with probability `drift` it continues the group of the
      user's previous drift session (the short-term interest persists, even across long-term sessions
      in between); else (and always for the user's first drift session) a fresh group drawn uniformly
      from the groups that are not the user's favourites (it can coincide with the previous one, so
      P(same group as the previous drift session) = drift + (1 - drift) / (num_groups - k)).
  Per event: `truth["session_id"]` (global session index), `truth["session_group"]`,
  `truth["session_long"]` (True for long-term sessions), `truth["drift_continued"]` (True for drift
  sessions that kept the previous drift group).
* Time. Users start at `start_time` + U[0, 180 days); gaps within a session are 30 s + Exp(mean 150 s),
  between sessions 1 h + Exp(mean 1.5 days). Timestamps are int64 seconds, strictly increasing per user.

So the next item is predictable from the long-term preferences (rate p_long) and from the current
session (within a session every event shares the group), and popular items within a group dominate.
Rows of `interactions` are sorted by user, then time; per-event truth arrays align with these rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from training.data.errors import DataError

__all__ = ["ADJECTIVES", "GROUP_WORDS", "SyntheticData", "generate", "write_atomic"]

# fmt: off
GROUP_WORDS = (
    "jazz", "hiking", "cooking", "chess", "gardening", "astronomy", "poetry", "surfing", "baking", "cycling",
    "photography", "knitting", "robotics", "painting", "fishing", "yoga", "opera", "camping", "pottery",
    "sailing", "skiing", "tennis", "origami", "dinosaur", "volcano", "pirate", "detective", "wizard", "samurai",
    "cowboy", "vampire", "zombie", "spaceship", "castle", "jungle", "desert", "ocean", "arctic", "circus",
    "ballet", "football", "basketball", "coffee", "tea", "wine", "chocolate", "guitar", "piano", "drum", "horse",
)
ADJECTIVES = (
    "classic", "modern", "deluxe", "compact", "vintage", "premium", "simple", "bold", "quiet", "bright",
    "rustic", "sleek", "tiny", "grand", "wild", "gentle",
)
# fmt: on
DAY = 86_400


@dataclass
class SyntheticData:
    """Generated log (`interactions`: user, item, time), item table (item, group, title), user table (user,
    likes: the names of the user's long-term groups, a profile that tells the truth) and the truth."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    truth: dict[str, np.ndarray]
    params: dict = field(default_factory=dict)
    users: pd.DataFrame | None = None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(f"synthetic data: {message}")


def _strings(indices: np.ndarray, dictionary: pa.Array) -> pd.Series:
    """Map integer codes to strings through arrow (much faster than numpy unicode arrays)."""
    decoded = pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), dictionary).cast(pa.string())
    return pd.Series(decoded.to_pandas(), copy=False)


def _group_names(num_groups: int) -> list[str]:
    vocab = len(GROUP_WORDS)
    return [GROUP_WORDS[g % vocab] + ("" if g < vocab else f" {g // vocab + 1}") for g in range(num_groups)]


def _power_cdf(x: np.ndarray, n: np.ndarray, a: float) -> np.ndarray:
    """CDF on [1, n + 1) of the density proportional to x ** -a."""
    if abs(a - 1.0) < 1e-9:
        return np.log(x) / np.log(n + 1.0)
    return (x ** (1.0 - a) - 1.0) / ((n + 1.0) ** (1.0 - a) - 1.0)


def _power_rank(u: np.ndarray, n: np.ndarray, a: float) -> np.ndarray:
    """Inverse-CDF draw of a 0-based rank in [0, n) with P(r) ~ (r + 1) ** -a."""
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        x = (1.0 + u * ((n + 1.0) ** (1.0 - a) - 1.0)) ** (1.0 / (1.0 - a))
    return np.minimum(x.astype(np.int64) - 1, n.astype(np.int64) - 1)


def _distinct_groups(rng: np.random.Generator, num_users: int, num_groups: int, k: int) -> np.ndarray:
    """k distinct groups per user (Floyd's sampling, vectorised over users), sorted per row."""
    chosen = np.empty((num_users, k), dtype=np.int64)
    for c in range(k):
        j = num_groups - k + c
        t = rng.integers(0, j + 1, num_users)
        taken = (chosen[:, :c] == t[:, None]).any(axis=1)
        chosen[:, c] = np.where(taken, j, t)
    chosen.sort(axis=1)
    return chosen


def generate(
    num_users: int,
    num_items: int,
    num_groups: int = 20,
    mean_length: float = 50,
    long_term_groups: int = 2,
    session_length: tuple[int, int] = (3, 8),
    drift: float = 0.7,
    p_long: float = 0.5,
    popularity: float = 1.0,
    min_length: int = 5,
    start_time: int = 1_600_000_000,
    seed: int = 0,
) -> SyntheticData:
    """Generate a log with planted long-term preferences and short-term session drift (see module doc).

    drift: probability that a short-term session keeps the user's previous short-term group.
    p_long: probability that a session follows one of the user's long-term groups.
    popularity: power-law exponent of item popularity within a group (0 = uniform).
    """
    s_min, s_max = (int(v) for v in session_length)
    _check(
        num_users >= 1 and num_items >= 1, f"num_users={num_users} and num_items={num_items} must be >= 1."
    )
    _check(
        1 <= long_term_groups < num_groups,
        f"need 1 <= long_term_groups ({long_term_groups}) < num_groups "
        f"({num_groups}): drift sessions need groups outside the favourites.",
    )
    _check(
        num_items >= num_groups,
        f"num_items={num_items} must be >= num_groups={num_groups} (no empty groups).",
    )
    _check(1 <= s_min <= s_max, f"session_length={session_length} must be (min, max) with 1 <= min <= max.")
    _check(
        min_length >= 1 and mean_length >= min_length,
        f"need 1 <= min_length ({min_length}) <= mean_length ({mean_length}).",
    )
    _check(
        0.0 <= drift <= 1.0 and 0.0 <= p_long <= 1.0, f"drift={drift} and p_long={p_long} must be in [0, 1]."
    )
    _check(popularity >= 0.0, f"popularity={popularity} must be >= 0.")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    U, N, G, K = int(num_users), int(num_items), int(num_groups), int(long_term_groups)

    # Items: balanced random groups; a random popularity order inside each group.
    item_group = rng.permutation(np.arange(N, dtype=np.int64) % G)
    by_group = np.lexsort((rng.random(N), item_group))  # items sorted by (group, popularity rank)
    group_size = np.bincount(item_group, minlength=G).astype(np.int64)
    group_start = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(group_size, out=group_start[1:])
    rank = np.empty(N, dtype=np.int64)
    rank[by_group] = np.arange(N) - group_start[item_group[by_group]]
    n_of = group_size[item_group].astype(np.float64)
    item_popularity = _power_cdf(rank + 2.0, n_of, popularity) - _power_cdf(rank + 1.0, n_of, popularity)

    # Users: favourite groups and sequence lengths.
    long_groups = _distinct_groups(rng, U, G, K)
    lengths = min_length + rng.geometric(1.0 / (mean_length - min_length + 1.0), U).astype(np.int64) - 1
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    E = int(offsets[-1])
    event_user = np.repeat(np.arange(U, dtype=np.int64), lengths)

    # Sessions: a renewal process of uniform lengths over the concatenated events, cut at user starts.
    cuts = np.cumsum(rng.integers(s_min, s_max + 1, E // s_min + 2))
    start = np.zeros(E, dtype=bool)
    start[cuts[cuts < E]] = True
    start[offsets[:-1]] = True
    session_of_event = np.cumsum(start, dtype=np.int64) - 1
    session_first = np.flatnonzero(start)
    session_user = event_user[session_first]
    S = session_first.shape[0]

    # Session groups: long-term sessions pick a favourite; drift sessions continue or draw a new group.
    session_long = rng.random(S) < p_long
    session_group = np.empty(S, dtype=np.int64)
    long_idx = np.flatnonzero(session_long)
    session_group[long_idx] = long_groups[session_user[long_idx], rng.integers(0, K, long_idx.shape[0])]
    drift_idx = np.flatnonzero(~session_long)
    drift_user = session_user[drift_idx]
    first_drift = np.ones(drift_idx.shape[0], dtype=bool)
    first_drift[1:] = drift_user[1:] != drift_user[:-1]
    continued = ~first_drift & (rng.random(drift_idx.shape[0]) < drift)
    fresh = rng.integers(0, G - K, drift_idx.shape[0])
    for j in range(K):  # the r-th group outside the user's (sorted) favourites
        fresh += fresh >= long_groups[drift_user, j]
    source = np.maximum.accumulate(np.where(continued, 0, np.arange(drift_idx.shape[0])))
    session_group[drift_idx] = fresh[source]
    session_continued = np.zeros(S, dtype=bool)
    session_continued[drift_idx] = continued

    # Items: a power-law rank inside the session's group.
    event_group = session_group[session_of_event]
    sizes = group_size[event_group]
    event_item = by_group[
        group_start[event_group] + _power_rank(rng.random(E), sizes.astype(np.float64), popularity)
    ]

    # Time: per-event gaps (small within, large between sessions), cumulated per user.
    scale = np.where(start, 1.5 * DAY, 150.0)
    gaps = (np.where(start, 3600.0, 30.0) + rng.exponential(1.0, E) * scale).astype(np.int64)
    gaps[offsets[:-1]] = start_time + rng.integers(0, 180 * DAY, U)
    cumulative = np.cumsum(gaps)
    times = cumulative - np.repeat(cumulative[offsets[:-1]] - gaps[offsets[:-1]], lengths)

    user_names = pa.array(np.arange(U).astype(str))
    item_names = pa.array(np.arange(N).astype(str))
    interactions = pd.DataFrame(
        {"user": _strings(event_user, user_names), "item": _strings(event_item, item_names), "time": times}
    )
    words = pa.DictionaryArray.from_arrays(pa.array(item_group, pa.int32()), pa.array(_group_names(G))).cast(
        pa.string()
    )
    adjectives = pa.DictionaryArray.from_arrays(
        pa.array(rng.integers(0, len(ADJECTIVES), N), pa.int32()), pa.array(ADJECTIVES)
    ).cast(pa.string())
    titles = pc.binary_join_element_wise(words, adjectives, pa.scalar("item"), item_names, " ")
    items = pd.DataFrame({"item": item_names.to_pandas(), "group": item_group, "title": titles.to_pandas()})
    group_names = np.asarray(_group_names(G), dtype=object)
    likes = group_names[long_groups[:, 0]]
    for j in range(1, K):
        likes = likes + " " + group_names[long_groups[:, j]]
    users = pd.DataFrame({"user": user_names.to_pandas(), "likes": likes.astype(str)})
    truth = {
        "item_group": item_group,
        "item_popularity": item_popularity,
        "long_groups": long_groups,
        "lengths": lengths,
        "session_id": session_of_event,
        "session_group": event_group,
        "session_long": session_long[session_of_event],
        "drift_continued": session_continued[session_of_event],
    }
    params = {
        "num_users": U,
        "num_items": N,
        "num_groups": G,
        "mean_length": mean_length,
        "long_term_groups": K,
        "session_length": (s_min, s_max),
        "drift": drift,
        "p_long": p_long,
        "popularity": popularity,
        "min_length": min_length,
        "start_time": start_time,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
    }
    return SyntheticData(interactions, items, truth, params, users)


def write_atomic(data: SyntheticData, directory: str | Path, name: str) -> Path:
    """Write `<directory>/<name>.inter`, `.item` and `.user` in RecBole atomic format (round-trips via
    read_atomic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    inter = data.interactions
    columns = [
        ("user_id", "token", inter["user"]),
        ("item_id", "token", inter["item"]),
        ("timestamp", "float", inter["time"]),
    ]
    if "rating" in inter.columns:
        columns.append(("rating", "float", inter["rating"]))
    items = data.items
    item_columns = [
        ("item_id", "token", items["item"]),
        ("group", "token", items["group"].astype(str)),
        ("title", "token_seq", items["title"]),
    ]
    files = [("inter", columns), ("item", item_columns)]
    if data.users is not None:
        files.append(("user", [("user_id", "token", data.users["user"]), ("likes", "token_seq", data.users["likes"])]))
    for suffix, cols in files:
        path = directory / f"{name}.{suffix}"
        with open(path, "wb") as handle:
            handle.write(("\t".join(f"{n}:{t}" for n, t, _ in cols) + "\n").encode())
            table = pa.table({n: pa.array(values) for n, _, values in cols})
            pacsv.write_csv(table, handle, write_options=options)
    return directory / f"{name}.inter"
