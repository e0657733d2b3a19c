"""Collect the trials of a Hydra multirun (Optuna or grid) into a table and plots; record failed trials.

    python -m training.sweep_report multirun/train/2026-11-24_12-00-00
    python -m training.sweep_report <sweep dir> [<more sweep dirs> ...] [--out DIR] [--metric val/ndcg@10]

A trial is a directory holding `.hydra/overrides.yaml` (Hydra writes it before the job starts). Its
status is `complete` (`metrics.json`), `failed` (`failed.json`, written by `training.train.main`) or
`incomplete` (neither: still running, or killed with the sweep). Several sweep directories (an
interrupted sweep and its continuation) are reported together. Writes into --out (default: the first
sweep directory) `sweep_report.csv`, `sweep_report.md`, `sweep_metric_per_trial.png` and
`sweep_metric_vs_params.png`, and prints the Markdown report, which ends with the best trial as a
ready-to-paste `python -m training.train ...` command. docs/sweeps.md has the whole workflow.

The failure-recording half (`record_failure`, `swallow_failures`) is imported by `training.train` and
stays free of heavy imports (matplotlib is loaded only when plotting).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import re
import shlex
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["FAILED_FILE", "METRICS_FILE", "NonFiniteMetric", "Trial", "collect", "free_memory", "main",
           "record_failure", "replay_command", "report", "rerun_command", "swallow_failures"]

FAILED_FILE = "failed.json"
METRICS_FILE = "metrics.json"
DEFAULT_METRIC = "val/ndcg@10"
EXTRA_METRICS = ("test/ndcg@10", "test/hr@10", "epochs")
# Overrides that must not go into the re-run command: they would turn a single run back into a sweep.
_NOT_FOR_RERUN = re.compile(r"^(~|\+\+|\+)?(hparams_search|hydra[./])")
_SWEEP_SYNTAX = re.compile(r"^(choice|range|interval|tag|glob|shuffle|sort)\(")


# ----------------------------------------------------------------------------------------------------------
# Failure records (used by training.train.main)


class NonFiniteMetric(RuntimeError):
    """The optimised validation metric came out NaN/inf (diverged training, no validation queries)."""


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _world_size() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _hydra_job() -> tuple[bool, list[str], int | None]:
    """(running under multirun, this job's task overrides, job number) or (False, [], None) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return False, [], None
        hc = HydraConfig.get()
        num = hc.job.get("num")
        return hc.mode == RunMode.MULTIRUN, list(hc.overrides.task), (int(num) if num is not None else None)
    except Exception:  # pragma: no cover - never let bookkeeping hide the real error
        return False, [], None


def swallow_failures() -> bool:
    """True in a single-process multirun job: a failure is recorded and the sweep goes on. A single run
    re-raises (non-zero exit); so does a multi-process trial, whose peers would otherwise wait forever."""
    return _hydra_job()[0] and _world_size() == 1


def record_failure(run_dir, err: BaseException) -> Path:
    """Write `failed.json` (type, message, traceback, overrides, host, time) into the run directory.
    Rank r > 0 of a distributed run writes `failed.rank<r>.json` instead."""
    from training.report import write_json_atomic

    multirun, overrides, num = _hydra_job()
    rank = _rank()
    path = Path(run_dir) / (FAILED_FILE if rank == 0 else f"failed.rank{rank}.json")
    record = {
        "status": "failed",
        "type": type(err).__name__,
        "message": str(err),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        "overrides": overrides,
        "job_num": num,
        "multirun": multirun,
        "rank": rank,
        "host": socket.gethostname(),
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    write_json_atomic(path, record)
    return path


def free_memory() -> None:
    """After a failed trial (e.g. CUDA out of memory) give the memory back before the next one starts."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------------------
# Collecting trials


@dataclass
class Trial:
    name: str                 # "<job num>" or "<sweep dir name>/<job num>" when several sweeps are reported
    path: Path
    order: int                # position in launch order (sweep dirs in the given order, then job number)
    status: str               # complete | failed | incomplete
    overrides: list[str]
    params: dict[str, str] = field(default_factory=dict)   # override key -> value (as given to Hydra)
    metrics: dict[str, float] = field(default_factory=dict)
    value: float | None = None
    reason: str = ""


def _read_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key, value


def _job_num(trial_dir: Path) -> int | None:
    try:
        num = (_read_yaml(trial_dir / ".hydra" / "hydra.yaml") or {}).get("hydra", {}).get("job", {}).get("num")
        return int(num) if num is not None else None
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError):
        return int(trial_dir.name) if trial_dir.name.isdigit() else None


def _sweep_info(sweep_dir: Path) -> dict:
    """Swept keys and direction from multirun.yaml, plus Optuna's optimization_results.yaml if present."""
    info: dict = {"swept": [], "declared": {}, "direction": None, "optuna": None, "sweeper": None}
    # The basic sweeper writes multirun.yaml; the Optuna sweeper does not, but every trial's
    # .hydra/hydra.yaml carries the same hydra.sweeper section.
    sources = [sweep_dir / "multirun.yaml", *(d / ".hydra" / "hydra.yaml" for d in _trial_dirs(sweep_dir)[:1])]
    for source in sources:
        try:
            cfg = _read_yaml(source) or {}
        except (OSError, yaml.YAMLError):
            continue
        hydra = cfg.get("hydra", {}) or {}
        sweeper = hydra.get("sweeper", {}) or {}
        info["sweeper"] = sweeper.get("_target_")
        direction = sweeper.get("direction")
        if isinstance(direction, str):
            info["direction"] = direction
        for key, value in (sweeper.get("params") or {}).items():
            if _is_sweep_value(str(value)):
                info["swept"].append(str(key))
                info["declared"][str(key)] = str(value).strip()
        for text in (hydra.get("overrides", {}) or {}).get("task", []) or []:
            key, value = _split_override(str(text))
            if _is_sweep_value(value):
                info["swept"].append(key)
                info["declared"][key] = value.strip()
        break
    res = sweep_dir / "optimization_results.yaml"
    if res.exists():
        try:
            info["optuna"] = _read_yaml(res)
        except yaml.YAMLError:
            pass
    return info


def _is_sweep_value(value: str) -> bool:
    value = value.strip()
    if _SWEEP_SYNTAX.match(value):
        return True
    depth, quote = 0, None
    for ch in value:  # a top-level comma makes a choice sweep: a,b,c (not [a,b] or "a,b")
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")
                   if p.parent.parent != sweep_dir and ".submitit" not in p.parts})


def collect(sweep_dirs, metric: str = DEFAULT_METRIC) -> tuple[list[Trial], dict]:
    """All trials of the given sweep directories (launch order) and the merged sweep info."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    trials: list[Trial] = []
    merged: dict = {"swept": [], "declared": {}, "direction": None, "optuna": {}, "sweepers": set()}
    for sweep_dir in sweep_dirs:
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
        info = _sweep_info(sweep_dir)
        merged["swept"] += [k for k in info["swept"] if k not in merged["swept"]]
        merged["declared"] = {**info["declared"], **merged["declared"]}
        merged["direction"] = merged["direction"] or info["direction"]
        if info["optuna"]:
            merged["optuna"][str(sweep_dir)] = info["optuna"]
        if info["sweeper"]:
            merged["sweepers"].add(info["sweeper"])
        dirs = _trial_dirs(sweep_dir)
        dirs.sort(key=lambda d: (_job_num(d) if _job_num(d) is not None else 10**9, str(d)))
        for d in dirs:
            rel = d.relative_to(sweep_dir).as_posix()
            name = rel if len(sweep_dirs) == 1 else f"{sweep_dir.name}/{rel}"
            trials.append(_load_trial(d, name, len(trials), metric))
    return trials, merged


def _load_trial(d: Path, name: str, order: int, metric: str) -> Trial:
    try:
        overrides = [str(o) for o in (_read_yaml(d / ".hydra" / "overrides.yaml") or [])]
    except (OSError, yaml.YAMLError):
        overrides = []
    trial = Trial(name=name, path=d, order=order, status="incomplete", overrides=overrides,
                  params=dict(_split_override(o) for o in overrides))
    failed = d / FAILED_FILE
    metrics_path = d / METRICS_FILE
    if metrics_path.exists():
        try:
            trial.metrics = {k: float(v) for k, v in json.loads(metrics_path.read_text()).items()
                             if isinstance(v, (int, float))}
        except (OSError, ValueError):
            trial.reason = "unreadable metrics.json"
    # A failed.json older than metrics.json is left over from an earlier attempt in the same directory.
    if failed.exists() and not (trial.metrics and metrics_path.stat().st_mtime > failed.stat().st_mtime):
        trial.status = "failed"
        try:
            rec = json.loads(failed.read_text())
            message = " ".join(str(rec.get("message", "")).split())
            trial.reason = f"{rec.get('type', 'Error')}: {message}"
        except (OSError, ValueError):
            trial.reason = "failed (unreadable failed.json)"
    elif trial.metrics:
        value = trial.metrics.get(metric)
        if value is None or not math.isfinite(value):
            trial.status = "failed"
            trial.reason = f"{metric} missing or not finite in metrics.json"
        else:
            trial.status = "complete"
            trial.value = value
    elif not trial.reason:
        trial.reason = "no metrics.json or failed.json (running, or killed)"
    return trial


# ----------------------------------------------------------------------------------------------------------
# Report


def swept_keys(trials: list[Trial], info: dict) -> list[str]:
    """Keys declared as swept (multirun.yaml) plus every override key whose value differs between trials."""
    keys = [k for k in info.get("swept", []) if any(k in t.params for t in trials)]
    seen: dict[str, set] = {}
    for t in trials:
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(v)
    for k, values in seen.items():
        missing = any(k not in t.params for t in trials)
        if (len(values) > 1 or missing) and k not in keys:
            keys.append(k)
    return keys


def sort_trials(trials: list[Trial], direction: str = "maximize") -> list[Trial]:
    sign = -1.0 if direction == "maximize" else 1.0
    rank = {"complete": 0, "incomplete": 1, "failed": 2}
    return sorted(trials, key=lambda t: (rank[t.status], sign * t.value if t.value is not None else 0.0, t.order))


def _group_choices(trial_dir: Path) -> dict[str, str]:
    """The trial's config-group choices (hydra.runtime.choices), hydra's own groups left out."""
    try:
        choices = (_read_yaml(trial_dir / ".hydra" / "hydra.yaml") or {})["hydra"]["runtime"]["choices"] or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra/")}


def rerun_command(trial: Trial) -> str:
    """`python -m training.train <overrides>` that reproduces the trial as a single run.

    `hparams_search=...` and `hydra...` overrides are left out (they would start a sweep again); the
    config-group choices a search config made (e.g. `model=lsti`, `logger=none`) are spelled out instead."""
    keep = [o for o in trial.overrides if not _NOT_FOR_RERUN.match(o)]
    if len(keep) < len(trial.overrides):
        given = {_split_override(o)[0].lstrip("+~") for o in keep}
        keep = [f"{g}={c}" for g, c in _group_choices(trial.path).items()
                if g not in given and g != "hparams_search"] + keep
    return " ".join(["python -m training.train", *(shlex.quote(o) for o in keep)])


def replay_command(trial: Trial) -> str:
    """Re-run the trial from its saved, fully resolved `.hydra/config.yaml`."""
    return (f"python -m training.train --config-path {shlex.quote(str((trial.path / '.hydra').resolve()))} "
            "--config-name config")


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4f}"


def _short(value) -> str:
    """4 significant digits for float parameter values in the Markdown table (the CSV keeps them exact)."""
    text = str(value)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", text):
        return f"{float(text):.4g}"
    return text


def _md_cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report(sweep_dirs, out_dir=None, metric: str = DEFAULT_METRIC, direction: str | None = None,
           plots: bool = True) -> dict:
    """Write CSV, Markdown and PNGs; return a summary dict (trials, best, paths, markdown)."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    trials, info = collect(sweep_dirs, metric)
    direction = direction or info.get("direction") or "maximize"
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    out = Path(out_dir) if out_dir else sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    keys = swept_keys(trials, info)
    ordered = sort_trials(trials, direction)
    extra = [m for m in EXTRA_METRICS if m != metric and any(m in t.metrics for t in trials)]
    best = ordered[0] if ordered and ordered[0].status == "complete" else None

    header = ["rank", "trial", "status", metric, *extra, *keys, "reason", "dir"]
    rows = []
    for i, t in enumerate(ordered, 1):
        rows.append([i if t.status == "complete" else "", t.name, t.status, _fmt(t.value),
                     *(_fmt(t.metrics.get(m)) for m in extra), *(t.params.get(k, "") for k in keys), t.reason,
                     str(t.path)])
    csv_path = out / "sweep_report.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    counts = {s: sum(t.status == s for t in trials) for s in ("complete", "failed", "incomplete")}
    lines = [f"# Sweep report: {', '.join(str(d) for d in sweep_dirs)}", "",
             f"{len(trials)} trials: {counts['complete']} complete, {counts['failed']} failed, "
             f"{counts['incomplete']} incomplete. Metric: `{metric}` ({direction}).", ""]
    md_header = header[:-1]  # the run directory is in the CSV; the trial name locates it in the sweep dir
    lines += ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    n_fixed = 4 + len(extra)  # rank, trial, status, metric, extra metrics; then the swept parameters
    lines += ["| " + " | ".join(_md_cell(_short(c) if n_fixed <= i < n_fixed + len(keys) else c)
                                for i, c in enumerate(r[:-1])) + " |" for r in rows]
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {t.name} ({' '.join(o for o in t.overrides if o.split('=')[0] in keys) or 'no swept keys'})"
                  f": {_md_cell(t.reason, 400)} (`{t.path / FAILED_FILE}`)" for t in failed]
    incomplete = [t for t in trials if t.status == "incomplete"]
    if incomplete:
        lines += ["", "## Incomplete trials (running, or killed with the sweep)", ""]
        lines += [f"- trial {t.name}: {t.path}" for t in incomplete]
    for sweep, res in (info.get("optuna") or {}).items():
        lines += ["", f"Optuna (`{sweep}/optimization_results.yaml`): best value {res.get('best_value')}, "
                      f"best params {res.get('best_params')}"]
    lines += [""]
    if best is not None:
        lines += [f"## Best trial: {best.name} ({metric} = {best.value:.4f})", "",
                  "As a single run with today's config defaults plus the trial's overrides:", "", "```",
                  rerun_command(best), "```", "",
                  "Exact replay of the trial's saved config (independent of later changes to conf/):", "",
                  "```", replay_command(best), "```"]
    else:
        lines += ["## Best trial: none (no trial completed)"]

    pngs: list[Path] = []
    if plots and trials:
        pngs = _plots(trials, keys, metric, direction, out, declared=info.get("declared", {}))
        lines += ["", *(f"![{p.stem}]({p.name})" for p in pngs)]
    markdown = "\n".join(lines) + "\n"
    md_path = out / "sweep_report.md"
    md_path.write_text(markdown)
    return {"trials": ordered, "best": best, "keys": keys, "direction": direction, "csv": csv_path,
            "markdown_path": md_path, "markdown": markdown, "pngs": pngs, "counts": counts}


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _plots(trials: list[Trial], keys: list[str], metric: str, direction: str, out: Path,
           declared: dict | None = None) -> list[Path]:
    """declared: key -> sweep expression (`tag(log, interval(...))` gives a log axis, `choice(...)` or a
    comma list one column per value); undeclared keys: numbers on a linear (or, spanning >= 100x, log)
    axis, a few integers or strings as columns."""
    declared = declared or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    done = [t for t in trials if t.status == "complete"]
    bad = [t for t in trials if t.status != "complete"]
    values = [t.value for t in done]
    span = (max(values) - min(values)) if values else 0.0
    floor = (min(values) - 0.08 * (span or abs(min(values)) or 1.0)) if values else 0.0  # where "no value" goes

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t.order for t in done], values, label="complete", zorder=3)
    if done:
        best, running = [], None
        for t in sorted(done, key=lambda t: t.order):
            running = t.value if running is None else (max if direction == "maximize" else min)(running, t.value)
            best.append((t.order, running))
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="C1", label="best so far")
    for status, marker, color in (("failed", "x", "C3"), ("incomplete", "^", "C7")):
        group = [t for t in bad if t.status == status]
        if group:
            ax.scatter([t.order for t in group], [floor] * len(group), marker=marker, color=color,
                       label=f"{status} (no value)", zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (launch order)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    per_trial = out / "sweep_metric_per_trial.png"
    fig.savefig(per_trial, dpi=110)
    plt.close(fig)
    paths = [per_trial]

    if keys:
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            raw = [t.params.get(key, "") for t in done]
            everything = [t.params.get(key, "") for t in trials]
            nums = _numeric(everything)
            spec = declared.get(key, "")
            discrete = spec.startswith("choice(") or (spec and not _SWEEP_SYNTAX.match(spec))
            if nums is not None and (discrete or (all(x.is_integer() for x in nums) and len(set(nums)) <= 6)):
                nums = None  # a set of choices (hidden sizes, layers): one column per value
            if nums is not None:
                nums = _numeric(raw)
                ax.scatter(nums, values)
                positive = [x for x in nums if x > 0]
                wide = positive and len(positive) == len(nums) and max(positive) / min(positive) >= 100
                if re.match(r"tag\(\s*log\b", spec) or (not spec and wide):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                numeric_cats = _numeric(everything) is not None
                cats = sorted(set(everything), key=lambda c: (float(c), c) if numeric_cats else (0.0, c))
                index = {c: i for i, c in enumerate(cats)}
                ax.scatter([index[v] for v in raw], values)
                ax.set_xticks(range(len(cats)))
                ax.set_xticklabels([c or "(unset)" for c in cats], rotation=0 if numeric_cats else 30,
                                   ha="center" if numeric_cats else "right", fontsize=8)
                ax.set_xlim(-0.5, len(cats) - 0.5)
            failed_x = [t.params.get(key, "") for t in bad if t.status == "failed"]
            if failed_x:
                fx = _numeric(failed_x) if nums is not None else [index[v] for v in failed_x]
                if fx is not None:
                    ax.scatter(fx, [floor] * len(fx), marker="x", color="C3")
            ax.set_title(key, fontsize=9)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{metric} vs swept parameters (x: failed trials)", fontsize=10)
        fig.tight_layout()
        vs = out / "sweep_metric_vs_params.png"
        fig.savefig(vs, dpi=110)
        plt.close(fig)
        paths.append(vs)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.sweep_report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", help="Hydra multirun directories (hydra.sweep.dir)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the first sweep dir)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"metrics.json key to rank by ({DEFAULT_METRIC})")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default=None,
                        help="default: the Optuna sweeper's direction, else maximize")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dirs, args.out, args.metric, args.direction, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"written: {result['csv']}, {result['markdown_path']}" +
          "".join(f", {p}" for p in result["pngs"]))
    return 0 if result["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
