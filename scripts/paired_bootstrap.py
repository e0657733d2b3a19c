"""Is model B's gain over model A larger on a slice than overall? A paired bootstrap over users.

    python scripts/paired_bootstrap.py outputs/experiments/crop/sasrec_crop outputs/experiments/crop/lsti_crop_len
    python scripts/paired_bootstrap.py A_dir B_dir --max-history 20 --seeds 1 2 3 --section paired_crop
    python scripts/paired_bootstrap.py A_dir B_dir --history-cap 1 3 10   # capped histories vs whole ones
    python scripts/paired_bootstrap.py A_dir B_dir --slice tail           # users whose target is a tail item
    python scripts/paired_bootstrap.py A_dir B_dir --shortest-share 0.2   # the fifth of users with the shortest histories
    python scripts/paired_bootstrap.py A_dir B_dir --slice cold_users     # held-out users with <= 5 known events
    python scripts/paired_bootstrap.py A_dir B_dir --shortest-share 0.2 --by-target  # ... split by head/tail targets

A_dir / B_dir hold one run per seed (`seed<s>/checkpoints/best.ckpt`, as `scripts/experiments.py` writes). Each
run's test split is evaluated once with `training.evaluate save_ranks=true` (cached as
`<run>/ranks/ranks.csv`); a user's NDCG@10 is averaged over the seeds of each model, so seed noise and user
noise are both in the interval. Users are resampled with replacement (`--samples` times, fixed seed); for
each resample the script computes B's relative NDCG@10 gain over A on all users, on a slice (`--slice
short`: users whose history is at most `--max-history` events, or with `--shortest-share` that share of the
users with the shortest histories; `--slice tail`: users whose target is a
tail item, the evaluator's items_tail), and the difference of the two. It prints (and, with
`--section`, writes into docs/results.md) the estimates with 95% percentile intervals. An interval for the
difference that contains 0 means this data cannot tell "more gain on the slice" from "the same gain".

`--slice cold_users` compares runs trained with `data.preprocess.cold_user_fraction` (users held out of training,
`scripts/experiments.py coldusers`): B's gain on the held-out users' queries with at most `--max-history` known
events (default 5) against its gain on the other users' test queries, from `training.evaluate split=cold_users`
(cached as `<run>/ranks_cold_users/ranks.csv`) and the test ranks. A held-out user has up to 20 queries per seed;
users are the resampled unit, so their queries stay together.

`--history-cap N ...` also evaluates every run with each user's history capped at the latest N events
(`training.evaluate history_cap=N`, cached as `<run>/ranks_cap<N>/ranks.csv`) and compares B's gain on the
capped histories with its gain on the whole ones, for the same users in the same resamples.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def ranks_of(run: Path, cap: int | None = None, split: str = "test") -> pd.DataFrame:
    """The run's per-query ranks on `split`, whole histories or capped at `cap` events (evaluated once, then read
    from <run>/ranks[_cap<N>]/ranks.csv, or <run>/ranks_cold_users/ranks.csv)."""
    name = "ranks" if cap is None else f"ranks_cap{cap}"
    path = run / (name if split == "test" else f"{name}_{split}") / "ranks.csv"
    if not path.exists():
        cmd = [sys.executable, "-m", "training.evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}",
               "save_ranks=true", f"hydra.run.dir={path.parent}", "trainer.enable_progress_bar=false",
               f"split={split}"]
        if cap is not None:
            cmd.append(f"history_cap={cap}")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise SystemExit(f"evaluating {run} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return pd.read_csv(path, dtype={"user": str, "item": str})


def finished_runs(config_dir: Path, seeds: list[int] | None) -> list[Path]:
    """The runs that have finished: a best checkpoint and the metrics.json that training writes last (a run still
    training has a best.ckpt that will change, and its ranks would be cached from it)."""
    runs = sorted((d for d in config_dir.glob("seed*") if d.name[4:].isdigit()
                   and (seeds is None or int(d.name[4:]) in seeds)
                   and (d / "checkpoints" / "best.ckpt").exists() and (d / "metrics.json").exists()),
                  key=lambda d: int(d.name[4:]))
    if not runs:
        raise SystemExit(f"{config_dir}: no finished run (seed<s>/checkpoints/best.ckpt and seed<s>/metrics.json)"
                         f"{' for seeds ' + str(seeds) if seeds else ''}.")
    return runs


def ndcg_at(rank: pd.Series, k: int = 10) -> np.ndarray:
    return np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)


def user_ndcg(config_dir: Path, seeds: list[int] | None, cap: int | None = None,
              k: int = 10) -> tuple[pd.DataFrame, list[int]]:
    """Per user: NDCG@k averaged over the configuration's seeds, and the user's history length."""
    runs = finished_runs(config_dir, seeds)
    frames = []
    for run in runs:
        r = ranks_of(run, cap)
        r["ndcg"] = ndcg_at(r["rank"], k)
        if "head_item" not in r.columns:
            raise SystemExit(f"{run}: ranks.csv predates the head_item column; delete {run}/ranks* to re-evaluate.")
        frames.append(r.set_index("user")[["ndcg", "history", "head_item"]])
    ndcg = pd.concat([f["ndcg"] for f in frames], axis=1).mean(axis=1)
    first = frames[0]
    return (pd.DataFrame({"ndcg": ndcg, "history": first["history"], "head_item": first["head_item"]}),
            [int(d.name[4:]) for d in runs])


HISTORY_BANDS = ((1, 1), (2, 3), (4, 5), (6, 10), (11, 20))  # known events of a held-out user's query


def cold_user_totals(base: Path, model: Path, seeds: list[int] | None, max_history: int) -> tuple[dict, list[int]]:
    """Per user, summed over the seeds: NDCG@10 of A and B on the test split (where the user was not held out), on
    the cold_users split with at most `max_history` known events, and on the whole cold_users split. Each seed holds
    out its own users, the same ones for A and B (same data settings), so queries pair exactly within a seed."""
    runs_a, runs_b = finished_runs(base, seeds), finished_runs(model, seeds)
    if [r.name for r in runs_a] != [r.name for r in runs_b]:
        raise SystemExit(f"{base} and {model} have different finished seeds ({[r.name for r in runs_a]} vs "
                         f"{[r.name for r in runs_b]}): pass --seeds with the ones both have.")
    parts = []
    for run_a, run_b in zip(runs_a, runs_b):
        for split in ("test", "cold_users"):
            ra, rb = ranks_of(run_a, split=split), ranks_of(run_b, split=split)
            if not (ra["user"].equals(rb["user"]) and ra["item"].equals(rb["item"])):
                raise SystemExit(f"{run_a} and {run_b} hold different {split} queries: were they trained with the same "
                                 "data.preprocess.cold_user_fraction and cold_user_seed?")
            na, nb = ndcg_at(ra["rank"]), ndcg_at(rb["rank"])
            if split == "test":
                parts.append(pd.DataFrame({"user": ra["user"], "warm_a": na, "warm_b": nb}))
            else:
                history = ra["history"].to_numpy()
                columns = {"user": ra["user"], "short_a": na * (history <= max_history),
                           "short_b": nb * (history <= max_history), "cold_a": na, "cold_b": nb}
                for lo, hi in HISTORY_BANDS:
                    band = (history >= lo) & (history <= hi)
                    columns[f"band{lo}_a"], columns[f"band{lo}_b"] = na * band, nb * band
                parts.append(pd.DataFrame(columns))
    totals = pd.concat(parts).fillna(0.0).groupby("user").sum()
    if not totals["cold_a"].any() and not totals["cold_b"].any():
        raise SystemExit(f"{base}: no held-out user was ranked: train with data.preprocess.cold_user_fraction > 0.")
    return {c: totals[c].to_numpy() for c in totals.columns}, [int(r.name[4:]) for r in runs_a]


def resampled_sums(columns: dict[str, np.ndarray], samples: int, seed: int) -> dict[str, np.ndarray]:
    """Each per-user column summed over every resample of users [samples] (the same resamples for a given seed)."""
    n = next(iter(columns.values())).shape[0]
    idx = np.random.default_rng(seed).integers(0, n, (samples, n))
    return {name: values[idx].sum(1) for name, values in columns.items()}


def bootstrap_totals(totals: dict, gains: dict[str, tuple[str, str]], samples: int, seed: int) -> dict[str, np.ndarray]:
    """Relative gains sum(B)/sum(A) - 1 per resample of users, for each named pair of columns of `totals`."""
    sums = resampled_sums(totals, samples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {name: sums[b] / sums[a] - 1.0 for name, (a, b) in gains.items()}


def cold_user_rows(args: argparse.Namespace) -> tuple[list[str], str]:
    """Table rows for --slice cold_users: B's gain over A on the remaining users' test queries (whole histories), on
    the held-out users' queries with at most --max-history known events and on all of theirs, and the differences."""
    totals, seeds = cold_user_totals(args.base, args.model, args.seeds, args.max_history)
    gains = {"warm": ("warm_a", "warm_b"), "short": ("short_a", "short_b"), "cold": ("cold_a", "cold_b"),
             **{f"band{lo}": (f"band{lo}_a", f"band{lo}_b") for lo, _ in HISTORY_BANDS}}
    gains = {name: pair for name, pair in gains.items() if totals[pair[0]].any()}  # bands past the data's histories
    est = {name: totals[b].sum() / totals[a].sum() - 1.0 for name, (a, b) in gains.items()}
    draws = bootstrap_totals(totals, gains, args.samples, args.seed)
    rows = [_row("test split: users kept in training, whole histories", est["warm"], draws["warm"]),
            _row(f"held-out users, <= {args.max_history} known events", est["short"], draws["short"]),
            _row("held-out users, every evaluated history length", est["cold"], draws["cold"]),
            _row(f"held-out <= {args.max_history} gain - test gain", est["short"] - est["warm"],
                 draws["short"] - draws["warm"]),
            _row("held-out gain - test gain", est["cold"] - est["warm"], draws["cold"] - draws["warm"])]
    rows += [_row(f"held-out users, {lo}{'' if lo == hi else f'-{hi}'} known event{'s' if hi > 1 else ''}",
                  est[f"band{lo}"], draws[f"band{lo}"]) for lo, hi in HISTORY_BANDS if f"band{lo}" in est]
    what = (f"test and cold_users NDCG@10 of `{args.model.name}` over `{args.base.name}`; NDCG@10 summed per user over "
            f"seeds {seeds} (each seed holds out its own users); {args.samples} paired resamples of "
            f"{totals['warm_a'].shape[0]} users")
    return rows, what


def shortest_bound(history: np.ndarray, share: float) -> int:
    """The history length that bounds the `share` of users with the shortest histories: the length of the
    ceil(share * n)-th shortest. Users tied at that length are all in the slice, so it can hold a little more."""
    ordered = np.sort(np.asarray(history))
    return int(ordered[max(1, int(np.ceil(share * len(ordered)))) - 1])


def bootstrap(a: np.ndarray, b: np.ndarray, in_slice: np.ndarray, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Relative gains of b over a (overall, slice, slice - overall) per resample of users."""
    w = in_slice.astype(np.float64)
    draws = bootstrap_totals({"a": a, "b": b, "a_slice": a * w, "b_slice": b * w},
                             {"overall": ("a", "b"), "slice": ("a_slice", "b_slice")}, samples, seed)
    return {**draws, "difference": draws["slice"] - draws["overall"]}


def target_mix_estimates(sums: dict[str, np.ndarray | float]) -> dict[str, np.ndarray | float]:
    """From sums over users (`resampled_sums` columns, or plain totals) of A's and B's NDCG and of the user count, in
    the slice (s) and outside it (o), for head (h) and tail (t) targets: B's gain over A per group, the differences
    slice - outside per target kind, and the slice's gain re-weighted to the head/tail mix of all users (each
    kind's mean NDCG in the slice, weighted by that kind's share of all users' targets)."""
    out: dict = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for group in ("sh", "oh", "st", "ot"):
            out[group] = sums[f"b_{group}"] / sums[f"a_{group}"] - 1.0
        out["head_difference"], out["tail_difference"] = out["sh"] - out["oh"], out["st"] - out["ot"]
        n = {kind: sums[f"n_s{kind}"] + sums[f"n_o{kind}"] for kind in "ht"}
        share = {kind: n[kind] / (n["h"] + n["t"]) for kind in "ht"}
        mixed = {m: sum(share[kind] * sums[f"{m}_s{kind}"] / sums[f"n_s{kind}"] for kind in "ht") for m in "ab"}
        overall = {m: sum(sums[f"{m}_{g}"] for g in ("sh", "oh", "st", "ot")) for m in "ab"}
        out["mixed"] = mixed["b"] / mixed["a"] - 1.0
        out["mixed_difference"] = out["mixed"] - (overall["b"] / overall["a"] - 1.0)
    return out


def target_mix_rows(a: np.ndarray, b: np.ndarray, head: np.ndarray, in_slice: np.ndarray, slice_name: str,
                    samples: int, seed: int) -> list[str]:
    """--by-target: is the slice's gain smaller or larger because of what its users' targets are? B's gain over A
    on head and on tail targets, in the slice and outside it, and the slice's gain at all users' head/tail mix."""
    columns = {}
    for group, mask in (("sh", in_slice & head), ("oh", ~in_slice & head), ("st", in_slice & ~head),
                        ("ot", ~in_slice & ~head)):
        w = mask.astype(np.float64)
        columns.update({f"a_{group}": a * w, f"b_{group}": b * w, f"n_{group}": w})
    est = target_mix_estimates({k: float(v.sum()) for k, v in columns.items()})
    draws = target_mix_estimates(resampled_sums(columns, samples, seed))
    count = {g: int(columns[f"n_{g}"].sum()) for g in ("sh", "oh", "st", "ot")}
    tail_share = {"s": count["st"] / max(count["st"] + count["sh"], 1), "o": count["ot"] / max(count["ot"] + count["oh"], 1)}
    every_tail = (count["st"] + count["ot"]) / len(a)
    return [_row(f"{slice_name}, head targets ({count['sh']} users)", est["sh"], draws["sh"]),
            _row(f"the other users, head targets ({count['oh']})", est["oh"], draws["oh"]),
            _row("head targets: slice gain - other users' gain", est["head_difference"], draws["head_difference"]),
            _row(f"{slice_name}, tail targets ({count['st']} users)", est["st"], draws["st"]),
            _row(f"the other users, tail targets ({count['ot']})", est["ot"], draws["ot"]),
            _row("tail targets: slice gain - other users' gain", est["tail_difference"], draws["tail_difference"]),
            _row(f"{slice_name} at all users' target mix ({100 * every_tail:.0f}% tail, not the slice's "
                 f"{100 * tail_share['s']:.0f}%; the other users' {100 * tail_share['o']:.0f}%)", est["mixed"],
                 draws["mixed"]),
            _row("that gain - overall gain", est["mixed_difference"], draws["mixed_difference"])]


def _shown(path: Path) -> str:
    """A path as the command line in the docs shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def bootstrap_capped(a: np.ndarray, b: np.ndarray, a_cap: np.ndarray, b_cap: np.ndarray, samples: int,
                     seed: int) -> dict[str, np.ndarray]:
    """Relative gains of b over a on whole histories, on capped ones, and capped - whole, per resample."""
    draws = bootstrap_totals({"a": a, "b": b, "a_cap": a_cap, "b_cap": b_cap},
                             {"whole": ("a", "b"), "capped": ("a_cap", "b_cap")}, samples, seed)
    return {**draws, "difference": draws["capped"] - draws["whole"]}


def _row(label: str, estimate: float, draws: np.ndarray) -> str:
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return f"| {label} | {100 * estimate:+.1f}% | {100 * lo:+.1f}% to {100 * hi:+.1f}% | {float(np.mean(draws > 0)):.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="configuration directory of model A (the baseline)")
    ap.add_argument("model", type=Path, help="configuration directory of model B")
    ap.add_argument("--slice", choices=("short", "tail", "cold_users"), default="short",
                    help="short: users with few known events; tail: users whose target is a tail item; cold_users: "
                         "users held out of training (data.preprocess.cold_user_fraction) with few known events")
    ap.add_argument("--max-history", type=int, default=None,
                    help="at most this many known events (default 20 for --slice short, 5 for --slice cold_users)")
    ap.add_argument("--shortest-share", type=float, default=None,
                    help="--slice short: instead of --max-history, the share of users with the shortest histories "
                         "(0.2: the shortest fifth, as the tail slice is the 80%% least popular items); users tied "
                         "at the boundary length are all in")
    ap.add_argument("--by-target", action="store_true",
                    help="--slice short: also split the gains by the target's kind (head / tail item), in the slice "
                         "and outside it, and re-weight the slice's gain to all users' head/tail mix")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: every finished)")
    ap.add_argument("--history-cap", type=int, nargs="+", default=None,
                    help="also compare the gain with histories capped at these numbers of events")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--section", default=None, help="also write the result into docs/results.md under this name")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    if args.shortest_share is not None:
        if args.slice != "short" or args.max_history is not None:
            raise SystemExit("--shortest-share picks the short slice's history bound itself: use it with --slice short "
                             "and without --max-history.")
        if not 0.0 < args.shortest_share < 1.0:
            raise SystemExit(f"--shortest-share {args.shortest_share}: give a share of users between 0 and 1 (e.g. 0.2).")
    if args.max_history is None and args.shortest_share is None:
        args.max_history = 5 if args.slice == "cold_users" else 20
    if args.by_target and args.slice != "short":
        raise SystemExit("--by-target splits the short slice by its targets' kind: use it with --slice short.")
    if args.slice == "cold_users":
        if args.history_cap:
            raise SystemExit("--history-cap compares capped test histories; it does not combine with --slice cold_users.")
        rows, what = cold_user_rows(args)
        cmd = f"python scripts/paired_bootstrap.py {_shown(args.base)} {_shown(args.model)} --slice cold_users " \
              f"--max-history {args.max_history}" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
        return report(args, cmd, what, rows)
    a, seeds_a = user_ndcg(args.base, args.seeds)
    b, seeds_b = user_ndcg(args.model, args.seeds)
    users = a.index.intersection(b.index)
    if len(users) != len(a) or len(users) != len(b):
        raise SystemExit(f"{args.base} and {args.model} were evaluated on different users ({len(a)} vs {len(b)}): "
                         "compare runs on the same data.")
    a, b = a.loc[users], b.loc[users]
    if args.shortest_share is not None:
        args.max_history = shortest_bound(a["history"].to_numpy(), args.shortest_share)
    if args.slice == "tail":
        in_slice = ~a["head_item"].astype(bool).to_numpy()
        slice_label = f"{int(in_slice.sum())} users whose target is a tail item"
    else:
        in_slice = (a["history"] <= args.max_history).to_numpy()
        slice_label = f"{int(in_slice.sum())} users with <= {args.max_history} events" + (
            f" (the shortest {100 * args.shortest_share:g}% of histories)" if args.shortest_share is not None else "")
    if not in_slice.any():
        raise SystemExit(f"the slice --slice {args.slice} is empty" + (
            f" (no user has at most {args.max_history} known events: raise --max-history)."
            if args.slice == "short" else "."))
    est = {"overall": b["ndcg"].mean() / a["ndcg"].mean() - 1.0,
           "slice": b["ndcg"][in_slice].mean() / a["ndcg"][in_slice].mean() - 1.0}
    est["difference"] = est["slice"] - est["overall"]
    boot = bootstrap(a["ndcg"].to_numpy(), b["ndcg"].to_numpy(), in_slice, args.samples, args.seed)
    rows = [_row(label, est[name], boot[name]) for name, label in (
        ("overall", f"all {len(users)} users"),
        ("slice", slice_label),
        ("difference", "slice gain - overall gain"))]
    if args.by_target:
        rows += target_mix_rows(a["ndcg"].to_numpy(), b["ndcg"].to_numpy(), a["head_item"].astype(bool).to_numpy(),
                                in_slice, "the slice", args.samples, args.seed)
    for cap in args.history_cap or []:
        a_cap, b_cap = (user_ndcg(d, args.seeds, cap)[0]["ndcg"].reindex(users).to_numpy()
                        for d in (args.base, args.model))
        capped_gain = b_cap.mean() / a_cap.mean() - 1.0
        draws = bootstrap_capped(a["ndcg"].to_numpy(), b["ndcg"].to_numpy(), a_cap, b_cap, args.samples, args.seed)
        rows += [_row(f"all {len(users)} users, latest {cap} event(s) only", capped_gain, draws["capped"]),
                 _row(f"gain with {cap} event(s) - gain with whole histories", capped_gain - est["overall"],
                      draws["difference"])]
    what = ("--slice tail" if args.slice == "tail" else f"--shortest-share {args.shortest_share:g}"
            if args.shortest_share is not None else f"--max-history {args.max_history}")
    cmd = (f"python scripts/paired_bootstrap.py {_shown(args.base)} {_shown(args.model)} {what}" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
           + (f" --history-cap {' '.join(map(str, args.history_cap))}" if args.history_cap else "")
           + (" --by-target" if args.by_target else ""))
    report(args, cmd, f"test NDCG@10 of `{args.model.name}` over `{args.base.name}`; per-user NDCG@10 averaged over "
                      f"seeds {seeds_a} and {seeds_b}; {args.samples} paired resamples of users", rows)


def report(args: argparse.Namespace, cmd: str, what: str, rows: list[str]) -> None:
    text = "\n".join([f"Command: `{cmd}` ({what}).", "",
                      "| users | relative gain | 95% interval | share of resamples > 0 |", "|---|---|---|---|", *rows])
    print(text)
    if args.section:
        spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
        experiments = importlib.util.module_from_spec(spec)  # scripts is no package: loaded by path
        spec.loader.exec_module(experiments)
        experiments.write_section(args.section, text, args.doc)


if __name__ == "__main__":
    main()
