"""Side by side with RecBole 1.2.1: same atomic files, same protocol, same model size, one run, one machine.

    .venv/bin/python scripts/peer/compare.py                       # full: early stopping (about 1.5 h on 2 cores)
    .venv/bin/python scripts/peer/compare.py --epochs 2            # timing only: both capped at 2 epochs
    .venv/bin/python scripts/peer/compare.py --models sasrec --epochs 1 --nice 19 --no-doc

Runs in our venv. For each model it (1) runs RecBole's implementation through the peer venv
(scripts/peer/setup.sh, scripts/peer/run_recbole.py), then (2) this framework's
(`scripts/peer/run_ours.py` = `python -m training.train` plus a per-epoch timer) with the protocol and
sizes matched by Hydra overrides, one after the other (never concurrently). Wall time, CPU time and peak
RSS of each run are measured from outside, identically for both (`os.wait4` on the child). Writes
`<out dir>/compare.json` and replaces the `<!-- peer:begin -->`...`<!-- peer:end -->` section of
docs/benchmarks.md.

What is matched: the ml-100k atomic files (our cache, training/data/movielens.py), all interactions,
time-ordered leave-one-out, full ranking without filtering seen items, window 50, full-softmax CE, batch
256, early stopping on valid NDCG@10 (RecBole's stopping_step 10 stops after 11 epochs without
improvement; Lightning's patience counts differently, so ours gets patience 11), seed 2020, model size
(the parameter counts are reported). What is not: each framework keeps its own training recipe
(RecBole: every prefix of every sequence is a sample, lr 0.001; ours: windows of 50 scored at every
position, our default optimiser settings). Use `--ours OVERRIDE` to change ours (e.g. optim.lr=0.001).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- peer:begin -->", "<!-- peer:end -->"
PROTOCOL_SEED = 2020
RECBOLE_STOPPING_STEP = 10

MODELS = {
    "sasrec": {"recbole": "SASRec", "label": "SASRec",
               "ours": ["model=sasrec", "model.hidden=64", "model.layers=2", "model.heads=2", "model.inner=256"]},
    "gru4rec": {"recbole": "GRU4Rec", "label": "GRU4Rec",
                "ours": ["model=gru4rec", "model.embedding=64", "model.hidden=128", "model.layers=1"]},
}

PROTOCOL_OVERRIDES = [
    "data=ml100k", "data.preprocess.rating_threshold=null", "data.preprocess.k_core=0", "data.preprocess.split=loo",
    "data.max_len=50", "data.batch_size=256", "loss.name=ce", "evaluation.filter_seen=false",
    "callbacks.checkpoint.monitor=val/ndcg@10", f"seed={PROTOCOL_SEED}", "trainer.enable_progress_bar=false",
]


# ------------------------------------------------------------------ paths and commands
def cache_root() -> Path:
    return Path(os.environ.get("LSTI_CACHE_DIR") or Path.home() / ".cache" / "lsti").expanduser()


def peer_venv() -> Path:
    return Path(os.environ.get("LSTI_PEER_VENV") or cache_root() / "peer-venv").expanduser()


def nice_prefix(nice: int) -> list[str]:
    return ["nice", "-n", str(nice)] if nice else []


def recbole_command(model: str, python: Path, data_dir: Path, work_dir: Path, out: Path, epochs: int | None,
                    cpu: bool = False, nice: int = 0) -> list[str]:
    cmd = [*nice_prefix(nice), str(python), str(HERE / "run_recbole.py"), "--model", MODELS[model]["recbole"],
           "--data-dir", str(data_dir), "--work-dir", str(work_dir), "--out", str(out)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if cpu:
        cmd.append("--cpu")
    return cmd


def ours_overrides(model: str, data_dir: Path, run_dir: Path, epochs: int | None, cpu: bool = False,
                   extra: list[str] | None = None) -> list[str]:
    """Hydra overrides of `python -m training.train` matching the peer protocol (see module docstring)."""
    out = list(MODELS[model]["ours"]) + PROTOCOL_OVERRIDES
    out.append(f"data.source.path={data_dir}")
    if epochs is not None:  # timing only: no early stop within the cap
        out += [f"trainer.max_epochs={epochs}", "callbacks.early_stopping.patience=0"]
    else:
        out += ["trainer.max_epochs=300", f"callbacks.early_stopping.patience={RECBOLE_STOPPING_STEP + 1}"]
    if cpu:
        out.append("trainer=cpu")
    out += list(extra or [])
    out.append(f"hydra.run.dir={run_dir}")
    return out


def ours_command(overrides: list[str], python: str = sys.executable, nice: int = 0) -> list[str]:
    return [*nice_prefix(nice), python, str(HERE / "run_ours.py"), *overrides]


def command_line(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", "scripts/peer/compare.py", *argv])


def display_command(cmd: list[str]) -> str:
    """A command as one would type it: paths under the repository and the venvs shortened."""
    text = shlex.join(cmd)
    for path, short in ((str(HERE), "scripts/peer"), (str(peer_venv()), "$PEER_VENV"), (str(ROOT) + "/", "")):
        text = text.replace(path, short)
    return text


# ------------------------------------------------------------------ running
def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` with output to `log`; wall, CPU (user+sys) and peak RSS of that child from os.wait4."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        # ru_maxrss of the direct child; with `nice` in front that is nice exec'ing into python (same pid)
        "peak_rss_gb": usage.ru_maxrss / 1024**2,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "log": str(log),
    }


def read_ours(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timing = json.loads((run_dir / "peer_timing.json").read_text())
    return {
        "params": timing["params"],
        "epochs": timing["epochs"],
        "best_epoch": timing["best_epoch"],
        "best_valid_ndcg@10": metrics.get("val/ndcg@10", timing["best_valid_ndcg@10"]),
        "s_per_epoch": timing["s_per_epoch"],
        "cpu_s_per_epoch": timing["cpu_s_per_epoch"],
        "epoch_train_s": timing["epoch_train_s"],
        "test": {k: metrics.get(f"test/{k}") for k in ("hr@10", "ndcg@10", "mrr@10")},
        "timing": timing,
    }


def read_recbole(path: Path) -> dict:
    r = json.loads(path.read_text())
    t = r["test"]
    return {
        "params": r["params"],
        "epochs": r["epochs"],
        "best_epoch": r["best_epoch"],
        "best_valid_ndcg@10": r["best_valid_ndcg@10"],
        "s_per_epoch": r["s_per_epoch"],
        "cpu_s_per_epoch": r["cpu_s_per_epoch"],
        "epoch_train_s": r["epoch_train_s"],
        "test": {"hr@10": t.get("hit@10"), "ndcg@10": t.get("ndcg@10"), "mrr@10": t.get("mrr@10")},
        "raw": r,
    }


def ratio(num, den) -> float | None:
    if num is None or den is None or not den:
        return None
    return float(num) / float(den)


def ratios(ours: dict, peer: dict) -> dict:
    return {
        "ndcg_ours_over_recbole": ratio(ours["test"]["ndcg@10"], peer["test"]["ndcg@10"]),
        "hr_ours_over_recbole": ratio(ours["test"]["hr@10"], peer["test"]["hr@10"]),
        "speedup_s_per_epoch": ratio(peer["s_per_epoch"], ours["s_per_epoch"]),
        "speedup_cpu_s_per_epoch": ratio(peer["cpu_s_per_epoch"], ours["cpu_s_per_epoch"]),
        "speedup_wall": ratio(peer["wall_s"], ours["wall_s"]),
    }


# ------------------------------------------------------------------ machine
def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gb = kb / 1024**2
    except (OSError, AttributeError):
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "mem_gb": mem_gb, "os": platform.platform(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # description only
        info["gpu"] = None
    return info


def machine_line(m: dict) -> str:
    mem = f", {m['mem_gb']:.0f} GiB RAM" if m.get("mem_gb") else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    env = ", ".join(f"{k.upper()}={m[k]}" for k in ("omp_num_threads", "omp_wait_policy") if m.get(k))
    return (f"{m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs{mem}{gpu}; "
            f"torch {m.get('torch', '?')}, Python {m['python']}" + (f"; {env}" if env else ""))


# ------------------------------------------------------------------ rendering
def fmt_metric(v, converged: bool = True) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.4f}".lstrip("0") if 0 <= v < 1 else f"{v:.4f}"
    return s if converged else s + "†"


def fmt_seconds(v) -> str:
    if v is None:
        return "n/a"
    if v >= 120:
        return f"{v / 60:.1f} min"
    return f"{v:.1f} s" if v >= 10 else f"{v:.2f} s"


def fmt_ratio(v, converged: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}x" + ("" if converged else "†")


def fmt_load(a: tuple | list) -> str:
    return "/".join(f"{x:.1f}" for x in a)


TABLE_HEADER = ("| framework | model | params | test HR@10 | test NDCG@10 | test MRR@10 | best valid NDCG@10 (epoch) "
                "| epochs | s/epoch | CPU s/epoch | wall | peak RSS | load avg 1/5/15 before -> after |\n"
                "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
RATIO_HEADER = ("| model | NDCG@10 ours/RecBole | HR@10 ours/RecBole | speed-up s/epoch (RecBole/ours) "
                "| speed-up CPU s/epoch | speed-up wall |\n|---|---:|---:|---:|---:|---:|")


def result_row(framework: str, model: str, r: dict, converged: bool) -> str:
    best = fmt_metric(r["best_valid_ndcg@10"], converged)
    if r.get("best_epoch") is not None:
        best += f" ({r['best_epoch']})"
    cells = [framework, model, f"{r['params']:,}", fmt_metric(r["test"]["hr@10"], converged),
             fmt_metric(r["test"]["ndcg@10"], converged), fmt_metric(r["test"]["mrr@10"], converged), best,
             str(r["epochs"]), fmt_seconds(r["s_per_epoch"]), fmt_seconds(r["cpu_s_per_epoch"]),
             fmt_seconds(r["wall_s"]), f"{r['peak_rss_gb']:.2f} GB",
             f"{fmt_load(r['load_before'])} -> {fmt_load(r['load_after'])}"]
    return "| " + " | ".join(cells) + " |"


def ours_recipe(report: dict) -> str:
    """What our side trained with: the defaults, or the defaults plus the run's --ours overrides."""
    extra = report.get("ours_extra")
    if extra is None:  # reports written before the key existed: recover it from the command line
        tokens = shlex.split(report.get("command", ""))
        extra = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--ours"]
    if not extra:
        return "windows of 50 scored at every position, our defaults"
    return "our defaults with `" + " ".join(extra) + "`"


def render_section(report: dict) -> str:
    epochs = report["epoch_cap"]
    converged = epochs is None
    mode = ("full (early stopping on valid NDCG@10)" if converged
            else f"timing only: both capped at {epochs} epoch{'s' if epochs != 1 else ''}")
    lines = [BEGIN, "## Side by side with RecBole 1.2.1 (`scripts/peer/compare.py`)", "",
             f"Run {report['started']} ({mode}), one framework after the other on the same machine: "
             f"{machine_line(report['machine'])}. Load average (1/5/15 min) at the start "
             f"{fmt_load(report['load_start'])}, at the end {fmt_load(report['load_end'])}.", "",
             f"Command: `{report['command']}`", "",
             "Protocol (ANCHORS.md): ml-100k atomic files from the recbole 1.2.1 wheel (the same files for both), "
             "all interactions, time-ordered leave-one-out, full ranking, seen items not filtered, window 50, "
             "full-softmax CE, batch 256, early stopping on valid NDCG@10 (RecBole stopping_step 10), seed 2020. "
             f"Each framework keeps its own training recipe (RecBole: every prefix a sample, lr 0.001; "
             f"ours: {ours_recipe(report)}). s/epoch: median over epochs of the "
             "training part of an epoch (no validation); wall, CPU s and peak RSS of the whole process, measured "
             "from outside. Epochs are 0-based.", ""]
    if not converged:
        lines += [f"† not converged: a timing-only run capped at {epochs} epoch{'s' if epochs != 1 else ''}; "
                  "these accuracy numbers say nothing about either framework.", ""]
    lines.append(TABLE_HEADER)
    for model, entry in report["models"].items():
        label = MODELS[model]["label"]
        if "recbole" in entry:
            lines.append(result_row(f"RecBole {entry['recbole']['raw']['recbole_version']}", label,
                                    entry["recbole"], converged))
        if "ours" in entry:
            lines.append(result_row("lsti (this repo)", label, entry["ours"], converged))
    with_ratios = [(model, entry["ratios"]) for model, entry in report["models"].items() if entry.get("ratios")]
    if with_ratios:
        lines += ["", RATIO_HEADER]
    for model, q in with_ratios:
        lines.append("| " + " | ".join([
            MODELS[model]["label"], fmt_ratio(q["ndcg_ours_over_recbole"], converged),
            fmt_ratio(q["hr_ours_over_recbole"], converged), fmt_ratio(q["speedup_s_per_epoch"]),
            fmt_ratio(q["speedup_cpu_s_per_epoch"]), fmt_ratio(q["speedup_wall"])]) + " |")
    lines += ["", "Per-run commands:", ""]
    for model, entry in report["models"].items():
        for side in ("recbole", "ours"):
            if side in entry:
                lines.append(f"- {MODELS[model]['label']}, {side}: `{entry[side]['command']}`")
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(doc_text: str, section: str) -> str:
    """Put `section` (which starts with BEGIN and ends with END) in place of an existing one, else append."""
    start, end = doc_text.find(BEGIN), doc_text.find(END)
    if start != -1 and end != -1 and end > start:
        tail = doc_text[end + len(END):]
        return doc_text[:start] + section.rstrip("\n") + ("\n" if not tail.startswith("\n") else "") + tail
    body = doc_text.rstrip("\n")
    return (body + "\n\n" if body else "") + section


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="sasrec,gru4rec", help="comma-separated: sasrec, gru4rec")
    p.add_argument("--epochs", type=int, default=None, help="timing only: cap both at N epochs")
    p.add_argument("--only", choices=("both", "recbole", "ours"), default="both", help="run one side only (debug)")
    p.add_argument("--data-dir", default=None, help="atomic files (default: our cached ml-100k)")
    p.add_argument("--out-dir", default=None, help="default outputs/peer/<timestamp>")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--no-setup", action="store_true", help="only check that the peer venv exists")
    p.add_argument("--render", default=None, metavar="COMPARE_JSON",
                   help="no runs: rewrite the doc section from a finished run's compare.json")
    p.add_argument("--cpu", action="store_true", help="both on CPU even if a GPU is visible")
    p.add_argument("--nice", type=int, default=0, help="run both under `nice -n N` (a shared machine)")
    p.add_argument("--ours", action="append", default=[], metavar="OVERRIDE",
                   help="extra Hydra override for our run (repeatable), e.g. --ours optim.lr=0.001")
    args = p.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def ensure_peer_venv(no_setup: bool) -> Path:
    python = peer_venv() / "bin" / "python"
    if not no_setup:
        subprocess.run(["bash", str(HERE / "setup.sh")], check=True)
    if not python.exists():
        raise SystemExit(f"no peer venv at {peer_venv()}: run `bash scripts/peer/setup.sh` (or drop --no-setup)")
    return python


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:  # re-render the doc section from a finished run's compare.json (no runs)
        report = json.loads(Path(args.render).read_text())
        section = render_section(report)
        if not args.no_doc:
            doc = Path(args.doc)
            doc.write_text(replace_section(doc.read_text() if doc.exists() else "# Benchmarks\n", section))
        print(section)
        return report
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    out_dir = Path(args.out_dir or ROOT / "outputs" / "peer" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.data_dir:
        data_dir = Path(args.data_dir).expanduser().resolve()
    else:
        sys.path.insert(0, str(ROOT))
        from training.data.movielens import ml100k_dir

        data_dir = ml100k_dir()
    peer_python = ensure_peer_venv(args.no_setup) if args.only != "ours" else None
    env = dict(os.environ)
    report = {"started": started, "command": command_line(sys.argv[1:] if argv is None else argv),
              "epoch_cap": args.epochs, "ours_extra": list(args.ours), "data_dir": str(data_dir), "out_dir": str(out_dir),
              "machine": machine_description(), "load_start": os.getloadavg(), "models": {}}
    for model in args.models:
        entry: dict = {}
        report["models"][model] = entry
        if args.only in ("both", "recbole"):
            json_out = out_dir / f"recbole_{model}.json"
            cmd = recbole_command(model, peer_python, data_dir, out_dir / f"recbole_{model}", json_out,
                                  args.epochs, args.cpu, args.nice)
            print(f"[peer] RecBole {model}: {display_command(cmd)}", flush=True)
            m = run_measured(cmd, out_dir / f"recbole_{model}.log", env)
            if m["returncode"] != 0:
                raise SystemExit(f"RecBole {model} failed (exit {m['returncode']}); see {m['log']}")
            entry["recbole"] = read_recbole(json_out) | m | {"command": display_command(cmd)}
        if args.only in ("both", "ours"):
            run_dir = out_dir / f"ours_{model}"
            cmd = ours_command(ours_overrides(model, data_dir, run_dir, args.epochs, args.cpu, args.ours),
                               nice=args.nice)
            print(f"[peer] ours {model}: {display_command(cmd)}", flush=True)
            m = run_measured(cmd, out_dir / f"ours_{model}.log", env)
            if m["returncode"] != 0:
                raise SystemExit(f"our {model} run failed (exit {m['returncode']}); see {m['log']}")
            entry["ours"] = read_ours(run_dir) | m | {"command": display_command(cmd)}
        if "recbole" in entry and "ours" in entry:
            entry["ratios"] = ratios(entry["ours"], entry["recbole"])
    report["load_end"] = os.getloadavg()
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    section = render_section(report)
    (out_dir / "compare.md").write_text(section)
    if not args.no_doc:
        doc = Path(args.doc)
        doc.write_text(replace_section(doc.read_text() if doc.exists() else "# Benchmarks\n", section))
    print(section)
    print(f"[peer] wrote {out_dir / 'compare.json'}" + ("" if args.no_doc else f" and {args.doc}"))
    return report


if __name__ == "__main__":
    main()
