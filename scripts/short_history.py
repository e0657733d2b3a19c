"""Short-history study: re-evaluate finished runs as if each user had only their latest N events.

    python scripts/short_history.py prefix                         # sasrec vs lsti, per-prefix recipe
    python scripts/short_history.py ablations --configs sasrec lsti lsti_no_text --caps 3 5 10
    python scripts/short_history.py prefix --report-only           # tabulate cached evaluations only
    python scripts/short_history.py crop --configs sasrec_crop lsti_crop_len lsti_crop_len_profile \
        --seeds 1 2 --section short_history_profile                # paired seeds, own doc section

Every MovieLens-100k user rated at least 20 movies, so the normal evaluation's short-history slice
(users_len<=5) is empty. Capping the history at evaluation time (`training.evaluate history_cap=N`) is
how this study gets short histories from it: the model sees only the latest N events before the target
(the window, the seen items and the length slices alike), the same N for every model, nothing retrained.
Both recipes train on every prefix of every sequence, so short inputs are not new to the models.

Runs are the ones `scripts/experiments.py <suite>` finished (outputs/experiments/<suite>/<config>/seed<s>,
best checkpoint). Each (run, cap) is evaluated once and cached as <run>/short_history/cap<N>.json. The
table (test NDCG@10 and HR@10, mean ± std over seeds per cap, and each configuration's change against the
first one) goes to docs/results.md between `<!-- short_history_<suite>:begin/end -->`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CAPS = [1, 2, 3, 5, 10, 20]
DEFAULT_CONFIGS = {"prefix": ["sasrec", "lsti"], "crop": ["sasrec_crop", "lsti_crop", "lsti_crop_len", "sasrec", "lsti"],
                   "ablations": ["sasrec", "lsti", "lsti_no_text", "lsti_text_only"]}
METRICS = ("test/ndcg@10", "test/hr@10")


def _load_experiments():
    """scripts/experiments.py (run directories, mean/std, doc sections), loaded by path: scripts is no package."""
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


experiments = _load_experiments()


def run_dirs(out: Path, config: str, seeds: list[int] | None = None) -> list[Path]:
    """Finished seeds of one configuration (a best checkpoint and the run's own metrics.json), all or `seeds`."""
    runs = [d for d in experiments.config_dir(out, config).glob("seed*") if d.name[4:].isdigit()
            and (seeds is None or int(d.name[4:]) in seeds)
            and (d / "checkpoints" / "best.ckpt").exists() and (d / "metrics.json").exists()]
    return sorted(runs, key=lambda d: int(d.name[4:]))


def evaluate_capped(run: Path, cap: int | None, report_only: bool = False) -> dict | None:
    """Test metrics of the run's best checkpoint with the history capped at `cap` events (None: the run's own)."""
    if cap is None:
        return json.loads((run / "metrics.json").read_text())
    cached = run / "short_history" / f"cap{cap}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    if report_only:
        return None
    out_dir = run / "short_history" / f"cap{cap}"
    cmd = [sys.executable, "-m", "training.evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}",
           f"history_cap={cap}", f"hydra.run.dir={out_dir}", "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"  {run} cap {cap}: FAILED ({proc.returncode}); see {out_dir / 'stdout.log'}", flush=True)
        return None
    result = json.loads((out_dir / "metrics.json").read_text())
    cached.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def table(suite: str, results: dict[str, dict], caps: list[int | None], configs: list[str],
          seeds: list[int] | None = None) -> str:
    """results[config][cap] = list of per-seed metric dicts. One row per cap; the first config is the reference."""
    ref = configs[0]
    head = ["known events"]
    for c in configs:
        head += [f"{c} ndcg@10", f"{c} hr@10"]
    head += [f"{c} vs {ref} (ndcg@10)" for c in configs[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cap in caps:
        cells = ["all (no cap)" if cap is None else str(cap)]
        means = {}
        for c in configs:
            runs = results.get(c, {}).get(cap, [])
            for metric in METRICS:
                m, sd = experiments.mean_std([r.get(metric) for r in runs])
                means[(c, metric)] = m
                cells.append("-" if math.isnan(m) else (f"{m:.4f} ± {sd:.4f}" if len(runs) > 1 else f"{m:.4f}"))
        for c in configs[1:]:
            a, b = means[(c, METRICS[0])], means[(ref, METRICS[0])]
            cells.append("-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{100 * (a / b - 1):+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    runs = ", ".join(f"{c} {len(results.get(c, {}).get(None, []))}" for c in configs)
    cmd = (f"python scripts/short_history.py {suite} --configs {' '.join(configs)} "
           f"--caps {' '.join(str(c) for c in caps if c is not None)}")
    if seeds:
        cmd += f" --seeds {' '.join(map(str, seeds))}"
    return "\n".join([f"Command: `{cmd}` (test split, mean ± sample std over seeds; seeds per configuration: {runs}; "
                      f"runs from `python scripts/experiments.py {suite}`).", "", *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(DEFAULT_CONFIGS))
    ap.add_argument("--configs", nargs="+", default=None, help="configurations; the first is the reference")
    ap.add_argument("--caps", type=int, nargs="+", default=DEFAULT_CAPS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--report-only", action="store_true", help="evaluate nothing: tabulate cached results")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: every finished)")
    ap.add_argument("--section", default=None, help="doc section name (default: short_history_<suite>)")
    args = ap.parse_args()
    if any(c < 1 for c in args.caps):
        ap.error(f"--caps {args.caps}: every cap must be >= 1")
    out = args.out or ROOT / "outputs" / "experiments" / args.suite
    configs = args.configs or DEFAULT_CONFIGS[args.suite]
    caps: list[int | None] = sorted(set(args.caps)) + [None]
    results: dict[str, dict] = {}
    for config in configs:
        runs = run_dirs(out, config, args.seeds)
        if not runs:
            print(f"{config}: no finished run under {out} (run `python scripts/experiments.py {args.suite} "
                  f"--only {config}` first)", flush=True)
        for cap in caps:
            got = [r for run in runs if (r := evaluate_capped(run, cap, args.report_only)) is not None]
            results.setdefault(config, {})[cap] = got
            if cap is not None and got:
                m, _ = experiments.mean_std([r.get(METRICS[0]) for r in got])
                print(f"{config} cap {cap}: ndcg@10 {m:.4f} over {len(got)} runs", flush=True)
    text = table(args.suite, results, caps, configs, args.seeds)
    print(text)
    experiments.write_section(args.section or f"short_history_{args.suite}", text, args.doc)


if __name__ == "__main__":
    main()
