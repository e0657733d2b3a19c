"""Run a set of training configurations over several seeds and write mean ± std tables + a bar chart.

    python scripts/experiments.py ablations --seeds 1 2 3          # full model vs ablations vs SASRec
    python scripts/experiments.py prefix --seeds 1 2 3 --jobs 3 # the same, all on the per-prefix recipe
    python scripts/experiments.py crop --seeds 1 2 3 --jobs 2      # training on cropped (short) histories too
    python scripts/experiments.py coldstart --seeds 1 2 3          # 10% items held out, per fusion mode
    python scripts/experiments.py coldusers --seeds 1 2 3 --jobs 2 # 20% users held out, evaluated as new users
    python scripts/experiments.py ablations --only sasrec lsti --extra trainer.max_epochs=50
    python scripts/experiments.py ablations --report-only   # tabulate what has finished, start nothing

Each run is `python -m training.train <overrides> seed=<s>` in its own directory under `--out`
(default outputs/experiments/<suite>); a finished run (metrics.json present) is reused, so an
interrupted suite continues where it stopped. Results go to docs/results.md between markers
`<!-- <suite>:begin -->` / `<!-- <suite>:end -->` and to docs/<suite>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.provenance import environment_key

ROOT = Path(__file__).resolve().parents[1]

SUITES: dict[str, dict[str, list[str]]] = {
    "ablations": {
        "sasrec": ["model=sasrec"],
        "sasrec_ff_inner": ["model=sasrec", "model.ff_dropout=inner"],
        "lsti": ["model=lsti"],
        "lsti_no_text": ["model=lsti_no_text"],
        "lsti_text_only": ["model=lsti_text_only"],
        "lsti_long_only": ["model=lsti_long_only"],
        "lsti_short_only": ["model=lsti_short_only"],
        "lsti_concat": ["model=lsti_concat"],
    },
    # The strongest recipe for both (experiment=sasrec_prefix / lsti_prefix: every prefix a sample, RecBole's
    # block and optimiser); the ablations keep the LSTI recipe and swap only the model.
    "prefix": {
        "sasrec": ["experiment=sasrec_prefix"],
        "lsti": ["experiment=lsti_prefix"],
        "lsti_no_text": ["experiment=lsti_prefix", "model=lsti_no_text"],
        "lsti_text_only": ["experiment=lsti_prefix", "model=lsti_text_only"],
        "lsti_long_only": ["experiment=lsti_prefix", "model=lsti_long_only"],
        "lsti_short_only": ["experiment=lsti_prefix", "model=lsti_short_only"],
        # ID dropout (a random 20% of ID vectors zeroed per step); capped at 25 epochs for the CPU budget, which can
        # only cost LSTI (it peaks by epoch 17 on every seed without it)
        "lsti_id_dropout": ["experiment=lsti_prefix", "model.id_dropout=0.2", "trainer.max_epochs=25"],
        # short histories at training too (see the crop suite); with positions counted from the oldest event
        # this is what a capped evaluation shows the model
        "sasrec_crop": ["experiment=sasrec_prefix", "data.train_history_crop=0.3"],
        "lsti_crop": ["experiment=lsti_prefix", "data.train_history_crop=0.3"],
    },
    # Training on short histories too (data.train_history_crop: a share of the training windows cut to a random
    # number of their latest events), for both models, and LSTI's gate told how many events are known.
    # sasrec / lsti are the default-recipe baselines (the same runs as in `ablations`).
    "crop": {
        "sasrec": ["model=sasrec"],
        "lsti": ["model=lsti"],
        "sasrec_crop": ["experiment=sasrec_crop"],
        "lsti_crop": ["model=lsti", "data.train_history_crop=0.3"],
        "lsti_crop_len": ["experiment=lsti_crop"],  # the crops and the gate's length input
        # the gate told the history length without the crops: is it the crops or the length input that helps?
        "lsti_len": ["model=lsti", "model.gate_length=true"],
        # twice the share of cut windows, for both models: session 13 found the crops (not the length input) lift
        # LSTI on short histories, so do more crops lift its short-history gain above its overall gain?
        "sasrec_crop60": ["experiment=sasrec_crop", "data.train_history_crop=0.6"],
        "lsti_crop60_len": ["experiment=lsti_crop", "data.train_history_crop=0.6"],
        # + the user's profile text (age, gender, occupation) through the language model: what is known of a user
        # besides the events, so it should matter most where there are few events
        "lsti_crop_len_profile": ["model=lsti", "data.train_history_crop=0.3", "model.gate_length=true",
                                  "model.user_profile=true"],
        # the same with a coarse profile (gender and occupation: 42 distinct texts), which cannot name a user
        "lsti_crop_len_profile_coarse": ["model=lsti", "data.train_history_crop=0.3", "model.gate_length=true",
                                         "model.user_profile=true", "model.text.user_template='A {gender} {occupation}.'"],
        # the profile added to the fused user state, so the gate cannot turn it down when few events are known
        "lsti_crop_len_profile_user": ["model=lsti", "data.train_history_crop=0.3", "model.gate_length=true",
                                       "model.user_profile=true", "model.profile_into=user"],
        # + neighbour distillation (after LLM-ESR): each window's newest next-item distribution pulled toward the mean
        # distribution of the user's 10 most similar users (by training items), so similar users inform a short
        # history; two weights set before any run: the neighbours about half (0.02) or most (0.1) of the newest
        # position's training signal (~40 scored positions a window share the recommendation loss)
        "lsti_crop_len_nbr002": ["experiment=lsti_crop", "loss.neighbour_distill=0.02"],
        "lsti_crop_len_nbr01": ["experiment=lsti_crop", "loss.neighbour_distill=0.1"],
    },
    # 20% of the users held out of training and validation, then evaluated as new users after each of their first
    # 1..20 events (cold_users/ metrics): a short-history slice that MovieLens-100k's own users cannot give (each
    # has >= 20 events). Each seed holds out a different fifth of the users.
    "coldusers": {
        "pop": ["model=pop"],
        "sasrec": ["model=sasrec"],
        "lsti": ["model=lsti"],
        "sasrec_crop": ["experiment=sasrec_crop"],
        "lsti_crop_len": ["experiment=lsti_crop"],
        # + the profile a new user gives at sign-up (age, gender, occupation through the language model); held-out
        # users keep it (held_out_user_codes), so this asks whether it helps where few events are known
        "lsti_profile": ["model=lsti", "model.user_profile=true"],
    },
    # The default long-term window (L = 200 events) against the RecBole protocol's 50, for both models.
    "longlen": {
        "sasrec": ["model=sasrec"],
        "lsti": ["model=lsti"],
        "sasrec_len200": ["model=sasrec", "data.max_len=200"],
        "lsti_len200": ["model=lsti", "data.max_len=200"],
    },
    "coldstart": {
        "pop": ["model=pop"],
        "sasrec (id)": ["model=sasrec"],
        "lsti id": ["model=lsti_no_text"],
        "lsti text": ["model=lsti_text_only"],
        "lsti id+text": ["model=lsti"],
        # ID dropout: the fusion also learns to rank from text alone, as it must for a cold item
        "lsti id+text (id dropout 0.2)": ["model=lsti", "model.id_dropout=0.2"],
    },
}
SUITE_EXTRA = {"coldstart": ["data.preprocess.cold_item_fraction=0.1"],
               "coldusers": ["data.preprocess.cold_user_fraction=0.2"]}
# Overrides that follow the seed: each cold-start seed holds out a different 10% of the items (seed 1 -> item
# set 0, ...), so the number of cold test targets grows with the seeds instead of re-measuring one set.
SEED_EXTRA = {"coldstart": lambda seed: [f"data.preprocess.cold_item_seed={seed - 1}"],
              "coldusers": lambda seed: [f"data.preprocess.cold_user_seed={seed - 1}"]}
# overall + slices, without users_len<=5 (empty on MovieLens-100k: every user has >= 20 events)
ML100K_SLICES = ["test/hr@10", "test/ndcg@10", "test/mrr@10", "test/users_len6-20/ndcg@10",
                 "test/users_len>20/ndcg@10", "test/items_head/ndcg@10", "test/items_tail/ndcg@10"]
COLUMNS = {
    "ablations": ["test/hr@10", "test/ndcg@10", "test/mrr@10", "test/users_len<=5/ndcg@10",
                  "test/users_len6-20/ndcg@10", "test/users_len>20/ndcg@10", "test/items_head/ndcg@10",
                  "test/items_tail/ndcg@10"],
    "prefix": ML100K_SLICES,
    "crop": ML100K_SLICES,
    "longlen": ["val/ndcg@10", *ML100K_SLICES],
    "coldusers": ["test/ndcg@10", "cold_users/hr@10", "cold_users/ndcg@10", "cold_users/users_len<=5/ndcg@10",
                  "cold_users/users_len6-20/ndcg@10", "cold_users/items_tail/ndcg@10"],
    "coldstart": ["test/items_unseen/hr@10", "test/items_unseen/ndcg@10", "test/items_unseen/count",
                  "test/hr@10", "test/ndcg@10"],
}

PLOT_METRIC = {"coldstart": "test/items_unseen/hr@10", "coldusers": "cold_users/users_len<=5/ndcg@10"}  # bar charts


def config_dir(out: Path, name: str) -> Path:
    """Where a configuration's runs live (one seed<s> directory each); names may hold spaces and parentheses."""
    return out / name.replace(" ", "_").replace("(", "").replace(")", "")


def run_one(name: str, overrides: list[str], seed: int, out: Path, extra: list[str],
            threads: int | None = None, report_only: bool = False, suite: str | None = None) -> dict | None:
    run_dir = config_dir(out, name) / f"seed{seed}"
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        return {**json.loads(metrics.read_text()), "environment": run_environment_key(run_dir)}
    if report_only:
        return None
    extra = [*extra, *(SEED_EXTRA[suite](seed) if suite in SEED_EXTRA else [])]
    cmd = [sys.executable, "-m", "training.train", *overrides, *extra, f"seed={seed}", f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    env = dict(os.environ)
    if threads:  # parallel runs split the cores; PASSIVE stops idle OpenMP threads spinning on them
        env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=env.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"  FAILED ({proc.returncode}); see {run_dir / 'stdout.log'}", flush=True)
        return None
    result = json.loads(metrics.read_text())
    result["wall_s"] = time.time() - t0
    metrics.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"  test/ndcg@10={result.get('test/ndcg@10', float('nan')):.4f} in {result['wall_s']:.0f}s", flush=True)
    return {**result, "environment": run_environment_key(run_dir)}


def run_environment_key(run_dir: Path) -> str:
    """What the run was made with (`training.provenance.environment_key`): the same seed and config reproduce
    bit for bit only on the same code, torch and kernels."""
    path = run_dir / "environment.json"
    return environment_key(json.loads(path.read_text())) if path.exists() else "not recorded"


def environment_note(results: dict[str, list[dict]]) -> str:
    """One line naming the environments the tabulated runs were made on, with how many runs each."""
    counts = Counter(r.get("environment", "not recorded") for runs in results.values() for r in runs)
    return "Runs made with: " + "; ".join(f"{key} ({n} runs)" for key, n in counts.items()) + "."


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def table(suite: str, results: dict[str, list[dict]], seeds: list[int], extra: list[str]) -> str:
    cols = COLUMNS[suite]
    pooled = suite == "coldstart"  # hits over all seeds' cold targets: one count, no seed spread
    head = ("| config | runs | " + " | ".join(c.removeprefix("test/") for c in cols)
            + (" | unseen top-10 hits (all seeds) |" if pooled else " |") + " epochs | s/run |")
    lines = [head, "|" + "---|" * (len(cols) + 4 + pooled)]
    for name, runs in results.items():
        cells = []
        for c in cols:
            m, sd = mean_std([r.get(c) for r in runs])
            if math.isnan(m):
                cells.append("-")  # e.g. an empty slice
            elif c.endswith("count"):
                cells.append(f"{m:.0f}")
            else:  # one run has no spread to show
                cells.append(f"{m:.4f} ± {sd:.4f}" if len(runs) > 1 else f"{m:.4f}")
        if pooled:
            counted = [r for r in runs if r.get("test/items_unseen/count")]
            hits = sum(round(r["test/items_unseen/hr@10"] * r["test/items_unseen/count"]) for r in counted)
            cells.append(f"{hits}/{sum(int(r['test/items_unseen/count']) for r in counted)}")
        ep, _ = mean_std([r.get("epochs") for r in runs])
        wall, _ = mean_std([r.get("wall_s") for r in runs])
        ep_cell, wall_cell = ("-" if math.isnan(v) else f"{v:.0f}" for v in (ep, wall))  # e.g. resumed runs
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {ep_cell} | {wall_cell} |")
    cmd = f"python scripts/experiments.py {suite} --seeds {' '.join(map(str, seeds))}"
    if extra:
        cmd += " --extra " + " ".join(extra)
    return "\n".join([f"Command: `{cmd}` (mean ± sample std over seeds).", environment_note(results), "", *lines])


def write_section(suite: str, text: str, doc: Path) -> None:
    begin, end = f"<!-- {suite}:begin -->", f"<!-- {suite}:end -->"
    body = doc.read_text() if doc.exists() else "# Results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = body[: body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + f"\n\n{block}\n"
    doc.write_text(body)


def plot(suite: str, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PLOT_METRIC.get(suite, "test/ndcg@10")
    names = list(results)
    stats = [mean_std([r.get(metric) for r in results[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.5))
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{suite}: {metric} (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finished(suite: str, out: Path, seeds: list[int]) -> tuple[list[int], dict[str, list[dict]]]:
    """Seeds (the requested ones and any found on disk) and, per configuration in suite order, its finished runs."""
    found = {int(d.name[4:]) for d in out.glob("*/seed*") if d.name[4:].isdigit() and (d / "metrics.json").exists()}
    seeds = sorted(set(seeds) | found)
    results = {}
    for name, overrides in SUITES[suite].items():
        runs = [r for s in seeds if (r := run_one(name, overrides, s, out, [], report_only=True)) is not None]
        if runs:
            results[name] = runs
    return seeds, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", nargs="*", help="subset of configurations")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--report-only", action="store_true",
                    help="start nothing: tabulate the finished runs (the runs column says how many seeds each has)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once; each gets cores/jobs threads (small models use threads poorly)")
    args = ap.parse_args()
    out = args.out or ROOT / "outputs" / "experiments" / args.suite
    configs = {k: v for k, v in SUITES[args.suite].items() if not args.only or k in args.only}
    extra = SUITE_EXTRA.get(args.suite, []) + args.extra
    # seed-major, so a partial suite already covers every configuration
    todo = [(name, overrides, seed) for seed in args.seeds for name, overrides in configs.items()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda t: run_one(t[0], t[1], t[2], out, extra, threads, args.report_only, args.suite), todo))
    # The doc's table covers every finished run of the suite, not only this invocation's --only/--seeds subset,
    # so running one more configuration or seed never drops the rows measured before.
    seeds, results = finished(args.suite, out, args.seeds)
    text = table(args.suite, results, seeds, args.extra)
    print(text)
    write_section(args.suite, text, args.doc)
    plot(args.suite, results, args.doc.parent / f"{args.suite}.png")


if __name__ == "__main__":
    main()
