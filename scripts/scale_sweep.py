"""Scale sweep: training cost of SASRec with full vs sampled softmax as interactions and the catalogue grow.

    OMP_WAIT_POLICY=PASSIVE nice -n 19 .venv/bin/python scripts/scale_sweep.py            # the full grid
    .venv/bin/python scripts/scale_sweep.py --quick                                        # a tiny grid (seconds)

Grid (synthetic data, `training/data/synthetic.py`, uniform popularity inside groups so the catalogue is
covered; users = interactions / 50, the mean sequence length):
- interactions 1e5, 1e6, 1e7 at a fixed catalogue of 1e4 items;
- items 1e3, 1e4, 1e5, 1e6 at a fixed 1e7 interactions (enough for ~all 1e6 items to appear);
each with `loss.name=ce` (full softmax) and `loss.name=sampled` (log-Q corrected sampled softmax, default
negatives), SASRec at its default size (conf/model/sasrec.yaml). A point shared by both sweeps runs once.

Each point: one subprocess that generates and caches the data and estimates the memory of a step
(`--prepare`), then, if that fits the memory budget, one `python -m training.bench` subprocess (so peak RSS is
per point) with `bench.eval=false bench.write_doc=false`; its bench.json is collected. A point whose estimate
exceeds the budget (full softmax at 1e6 items: a [positions x 1e6] float logit matrix) is recorded as
"not run: needs ~X GB"; a failing or killed bench run is recorded as failed, and the sweep goes on.

Writes `<out>/scale_sweep.json` (every point, machine, command, load average before/after),
`<out>/scale_interactions.png`, `<out>/scale_items.png` and the section between `<!-- scale:begin -->` and
`<!-- scale:end -->` in the doc (replaced on rerun). Defaults: docs/ and docs/benchmarks.md; with --quick
outputs/scale_sweep_quick/ (so a quick run never touches docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
MEAN_LENGTH = 50  # synthetic mean sequence length: users = interactions / MEAN_LENGTH
LOGIT_COPIES = 3  # live [positions x classes] float tensors at the peak of a step (logits, log-softmax, grads)


@dataclass(frozen=True)
class Grid:
    interactions: tuple[int, ...]  # the interaction sweep, at fixed_items
    fixed_items: int
    items: tuple[int, ...]  # the item sweep, at fixed_interactions
    fixed_interactions: int
    # ce: full softmax; sampled: sampled softmax + log-Q, dense item-table gradients and AdamW;
    # sparse: the same loss with optim.sparse_item_grad=true (row-sparse gradients, lazy Adam on touched rows)
    losses: tuple[str, ...] = ("ce", "sampled", "sparse")


FULL = Grid((10**5, 10**6, 10**7), 10**4, (10**3, 10**4, 10**5, 10**6), 10**7)
QUICK = Grid((1_000, 3_000), 100, (100, 1_000), 3_000)


def points(grid: Grid) -> list[dict]:
    """Distinct (interactions, items, loss) points, each with the sweeps it belongs to."""
    out: dict[tuple, dict] = {}
    for sweep, pairs in (("interactions", [(n, grid.fixed_items) for n in grid.interactions]),
                         ("items", [(grid.fixed_interactions, n) for n in grid.items])):
        for interactions, items in pairs:
            for loss in grid.losses:
                key = (interactions, items, loss)
                point = out.setdefault(key, {"target_interactions": interactions, "target_items": items,
                                             "loss": loss, "sweeps": []})
                point["sweeps"].append(sweep)
    return list(out.values())


def data_overrides(interactions: int, items: int) -> list[str]:
    users = max(1, round(interactions / MEAN_LENGTH))
    return ["data=synthetic", f"data.source.synthetic.num_users={users}", f"data.source.synthetic.num_items={items}",
            f"data.source.synthetic.mean_length={MEAN_LENGTH}", "data.source.synthetic.num_groups=20",
            "++data.source.synthetic.popularity=0.0"]


def point_name(point: dict) -> str:
    return f"i{point['target_interactions']:.0e}_n{point['target_items']:.0e}_{point['loss']}".replace("+", "")


# ----------------------------------------------------------------------------------------------- data + memory
def prepare(overrides: list[str], probe_batches: int = 50) -> dict:
    """Generate + cache the data of `overrides` (conf/bench.yaml) and measure what the memory estimate needs."""
    from hydra import compose, initialize_config_dir

    from training.train import build_datamodule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    t0 = time.perf_counter()
    dm = build_datamodule(cfg)
    seconds = time.perf_counter() - t0
    loader = dm.train_dataloader()
    max_targets = 0
    for i, batch in enumerate(loader):
        max_targets = max(max_targets, int((batch["targets"] > 0).sum()))
        if i + 1 >= probe_batches:
            break
    stats = dm.prepare().stats
    return {"interactions": int(stats["interactions"]), "num_items": int(dm.info.num_items),
            "steps_per_epoch": len(loader), "max_targets": max_targets,
            "positions": int(cfg.data.batch_size) * int(cfg.data.max_len), "hidden": int(cfg.model.get("hidden", 64)),
            "num_negatives": int(cfg.loss.num_negatives), "prepare_s": seconds}


def estimate_gb(loss: str, info: dict) -> float:
    """Rough peak RSS of a bench run: process + data + item table (weights, grads, Adam, copies) + the logits.

    The logits dominate for full softmax: cross-entropy over [positions with a target, items + 1] keeps about
    LOGIT_COPIES float32 copies alive at the peak of the backward pass (logits / log-softmax / their grads).
    Calibrated on this machine at 1e4 items (measured 0.94 GB more for ce than for sampled)."""
    classes = info["num_items"] + 1 if loss == "ce" else info["num_negatives"] + 1
    table = (info["num_items"] + 1) * info["hidden"] * 4
    base = 0.75e9 + 8 * table + 48 * info["interactions"]
    return (base + LOGIT_COPIES * 4 * info["max_targets"] * classes) / 2**30


def memory_budget_gb() -> float:
    """80% of MemAvailable now (other jobs share the machine)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 0.8 * int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


# ----------------------------------------------------------------------------------------------- subprocesses
def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def prepare_subprocess(overrides: list[str], run_dir: Path, timeout: float) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    (run_dir / "prepare.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed (rc {proc.returncode}): {_tail(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_subprocess(overrides: list[str], run_dir: Path, timeout: float) -> dict:
    """One `python -m training.bench` process; returns its bench.json, or raises with the reason."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training.bench", *overrides, f"hydra.run.dir={run_dir}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from err
    (run_dir / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        why = "killed (SIGKILL: out of memory?)" if proc.returncode in (-9, 137) else _tail(proc.stderr)
        raise RuntimeError(f"rc {proc.returncode}: {why}")
    return json.loads((run_dir / "bench.json").read_text())


# ----------------------------------------------------------------------------------------------- the sweep
LOSS_OVERRIDES = {"ce": ["loss.name=ce"], "sampled": ["loss.name=sampled"],
                  "sparse": ["loss.name=sampled", "optim.sparse_item_grad=true"]}


def bench_overrides(point: dict, steps: int, warmup: int) -> list[str]:
    return [*data_overrides(point["target_interactions"], point["target_items"]), *LOSS_OVERRIDES[point["loss"]],
            f"bench.steps={steps}", f"bench.warmup={warmup}", "bench.eval=false", "bench.write_doc=false"]


def run_sweep(grid: Grid, run_root: Path, steps: int, warmup: int, heavy_steps: int, budget_gb: float,
              timeout: float, prepare_fn: Callable = prepare_subprocess, bench_fn: Callable = bench_subprocess,
              log: Callable = print) -> list[dict]:
    """Run every point (prepare, estimate, bench); never raises for a single point."""
    infos: dict[tuple, dict] = {}
    results = []
    for point in points(grid):
        key = (point["target_interactions"], point["target_items"])
        point = dict(point)
        run_dir = run_root / point_name(point)
        t0 = time.perf_counter()
        try:
            if key not in infos:
                infos[key] = prepare_fn(data_overrides(*key), run_dir, timeout)
            info = infos[key]
            point["data"] = info
            point["estimate_gb"] = estimate_gb(point["loss"], info)
            # full softmax over >= ~1e8 logits per step takes seconds a step here: fewer measured steps
            heavy = point["loss"] == "ce" and info["max_targets"] * (info["num_items"] + 1) > 2e8
            point["steps"], point["warmup"] = (heavy_steps, 1) if heavy else (steps, warmup)
            if point["estimate_gb"] > budget_gb:
                point["status"] = f"not run: needs ~{point['estimate_gb']:.0f} GB (budget {budget_gb:.0f} GB)"
            else:
                point["bench"] = bench_fn(bench_overrides(point, point["steps"], point["warmup"]), run_dir, timeout)
                point["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a failed point is recorded, the sweep goes on
            point["status"] = f"failed: {err}"
        point["seconds"] = time.perf_counter() - t0
        log(f"[scale_sweep] {point_name(point)}: {point['status']} ({point['seconds']:.0f} s)"
            + (f" step {point['bench']['step_ms']:.0f} ms, RSS {point['bench']['peak_rss_gb']:.2f} GB"
               if "bench" in point else ""))
        results.append(point)
    return results


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal:")) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_gb": round(mem, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: ACTIVE)"), "nice": os.nice(0)}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------- outputs
def _value(point: dict, key: str) -> float:
    return float(point["bench"][key]) if "bench" in point else float("nan")


def _items(point: dict) -> int:
    return point.get("bench", {}).get("num_items") or point.get("data", {}).get("num_items") or point["target_items"]


def _interactions(point: dict) -> int:
    return (point.get("bench", {}).get("interactions") or point.get("data", {}).get("interactions")
            or point["target_interactions"])


def table(results: list[dict], sweep: str) -> str:
    rows = ["| interactions | items | loss | steps/epoch | step ms | epoch s (extrapolated) | data wait "
            "| peak RSS GB | est. GB | steps timed | status |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = (lambda p: (_interactions(p), p["loss"])) if sweep == "interactions" else (lambda p: (_items(p), p["loss"]))
    for p in sorted((p for p in results if sweep in p["sweeps"]), key=order):
        spe = p.get("bench", {}).get("steps_per_epoch") or p.get("data", {}).get("steps_per_epoch")
        if "bench" in p:
            b = p["bench"]
            cells = (f"{b['step_ms']:,.0f} | {b['epoch_s']:,.1f} | {100 * b['data_wait_share']:.1f}% "
                     f"| {b['peak_rss_gb']:.2f}")
        else:
            cells = "- | - | - | -"
        est = f"{p['estimate_gb']:.1f}" if "estimate_gb" in p else "-"
        timed = f"{p['steps']} (+{p['warmup']})" if "bench" in p else "-"
        rows.append(f"| {_interactions(p):,} | {_items(p):,} | {p['loss']} | {f'{spe:,}' if spe else '-'} | {cells} "
                    f"| {est} | {timed} | {p['status']} |")
    return "\n".join(rows)


def plot(results: list[dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ce": dict(color="tab:red", marker="o", label="full softmax (ce)"),
              "sampled": dict(color="tab:blue", marker="s", label="sampled softmax + log-Q (sampled)"),
              "sparse": dict(color="tab:green", marker="^",
                             label="sampled + row-sparse item grads (optim.sparse_item_grad)")}
    paths = []
    for sweep, xkey, panels, name in (
            ("interactions", _interactions, (("epoch_s", "time per epoch, s (step x steps/epoch)"),
                                             ("peak_rss_gb", "peak RSS, GB")), "scale_interactions.png"),
            ("items", _items, (("step_ms", "step time, ms"), ("peak_rss_gb", "peak RSS, GB")), "scale_items.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (key, label) in zip(axes, panels):
            for loss, style in styles.items():
                pts = sorted((p for p in results if sweep in p["sweeps"] and p["loss"] == loss), key=xkey)
                ran = [(xkey(p), _value(p, key)) for p in pts if "bench" in p]
                if ran:
                    ax.plot(*zip(*ran), **style)
                if key == "peak_rss_gb":
                    skipped = [(xkey(p), p["estimate_gb"]) for p in pts if "bench" not in p and "estimate_gb" in p]
                    if skipped:
                        ax.plot(*zip(*skipped), linestyle="none", marker="x", markersize=9, color=style["color"],
                                label=f"{loss}: not run, estimated need")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("interactions" if sweep == "interactions" else "items in the catalogue")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fixed = "catalogue fixed" if sweep == "interactions" else "interactions fixed"
        fig.suptitle(f"SASRec, {title} ({fixed})", fontsize=10)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def reading(results: list[dict]) -> list[str]:
    """Generated one-line findings: how step time grows with the catalogue for each loss."""
    lines = []
    for loss in ("sparse", "sampled", "ce"):
        pts = sorted((p for p in results if "items" in p["sweeps"] and p["loss"] == loss and "bench" in p), key=_items)
        big = [p for p in pts if _items(p) >= 10**4] or pts
        if len(big) >= 2:
            a, b = big[0], big[-1]
            lines.append(f"- {loss}: step time {a['bench']['step_ms']:,.0f} ms at {_items(a):,} items -> "
                         f"{b['bench']['step_ms']:,.0f} ms at {_items(b):,} items "
                         f"(x{b['bench']['step_ms'] / a['bench']['step_ms']:.2f} for x{_items(b) / _items(a):,.0f} items).")
    for p in results:
        if p["status"] != "ok" and "items" in p["sweeps"]:
            lines.append(f"- {p['loss']} at {_items(p):,} items: {p['status']}.")
    return lines


def section(summary: dict, doc_dir: Path, out_dir: Path) -> str:
    results, grid = summary["points"], summary["grid"]
    rel = Path(os.path.relpath(out_dir, doc_dir))
    m = summary["machine"]
    return "\n".join([
        BEGIN,
        "## Scale sweep: full vs sampled softmax, dense vs sparse item gradients (`scripts/scale_sweep.py`)",
        "",
        "Generated by the script (rerunning it replaces this section). Command:",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['mem_gb']} GiB RAM, torch {m['torch']}, "
        f"{m['threads']} threads, fp32, OMP_WAIT_POLICY={m['omp_wait_policy']}, nice {m['nice']}. "
        f"**Shared machine**: 1/5/15-minute load average {summary['load_before']} before and {summary['load_after']} "
        f"after the sweep (other sessions' jobs), so step times are upper bounds; a quiet machine gives lower ones. "
        f"Wall time of the sweep {summary['seconds'] / 60:.1f} min, {summary['started']}.",
        "",
        "What is measured: SASRec at its default size (conf/model/sasrec.yaml), batch 256 x 50 positions, the "
        "training optimiser (fused AdamW; for `sparse`, `optim.sparse_item_grad=true`: fused AdamW for the model "
        "and a lazy SparseAdam for the item table), three objectives: `ce` full softmax, `sampled` sampled "
        "softmax with log-Q correction (256 shared negatives) and dense item-table gradients, `sparse` the same "
        "loss with row-sparse item-table gradients; "
        "synthetic data (uniform item popularity inside 20 groups, mean sequence length 50), one "
        "`python -m training.bench` process per point (peak RSS is per point and includes the process, the data "
        "arrays and the model). **Time per epoch is extrapolated**, as bench.py does: mean measured step time "
        "(data wait + forward + backward + optimizer step) x steps/epoch; no full epoch is run. "
        f"Steps timed: {summary['steps']} after {summary['warmup']} warm-up (full softmax with more than 2e8 logits "
        f"per step: {summary['heavy_steps']} after 1, it takes seconds a step here). The memory estimate "
        f"(`estimate_gb`: base + {LOGIT_COPIES} float32 copies of the [positions with a target x classes] logits) "
        f"decides whether a point runs; budget {summary['budget_gb']:.1f} GB (80% of the memory available at the "
        "start). Interactions and items are the actual counts of the generated data (targets: "
        f"{', '.join(f'{n:.0e}' for n in grid['interactions'])} interactions at {grid['fixed_items']:,} items; "
        f"{', '.join(f'{n:.0e}' for n in grid['items'])} items at {grid['fixed_interactions']:.0e} interactions).",
        "",
        "### Interactions (catalogue fixed)",
        "",
        table(results, "interactions"),
        "",
        f"![time per epoch and peak memory vs interactions]({rel / 'scale_interactions.png'})",
        "",
        "### Catalogue size (interactions fixed)",
        "",
        table(results, "items"),
        "",
        f"![step time and peak memory vs items]({rel / 'scale_items.png'})",
        "",
        "Reading:",
        "",
        *reading(results),
        "- Step time does not depend on the number of interactions (same batch shapes, data wait well under 1%): "
        "the interaction sweep's epoch time is steps/epoch x a constant step, and the spread of step times "
        "between its rows (same catalogue) shows the noise of the shared machine.",
        "- Full softmax materialises a [positions x (items + 1)] float32 logit matrix (~8-12k positions with a "
        "target per batch of 256 x 50), plus its log-softmax and gradients: memory and time grow linearly with "
        "the catalogue. At 1e6 items one copy is ~40 GB, so it cannot run on this machine; sampled softmax "
        "scores 256 shared negatives + the positive instead, so its cost is the encoder plus the item table's "
        "embedding gradient and optimiser update. With dense gradients that part is linear in items (~64 floats "
        "per item instead of ~10k): at 1e6 items the table's three uses (input embedding, positives, negatives) "
        "each produce a dense [1e6 x 64] gradient and the optimiser reads and writes the whole table and its two "
        "moments every step. `sparse` looks every row up with `F.embedding(..., sparse=True)`, so the gradient "
        "holds only the rows of the batch (inputs, targets, negatives: a few thousand), and SparseAdam updates "
        "only those rows (lazy Adam: an untouched row keeps its moments until it appears again). What remains "
        "linear in items is the negative sampler's per-step draw over the catalogue, which is small next to the "
        "encoder.",
        f"- Raw numbers: `{(rel / 'scale_sweep.json').as_posix()}`.",
        END,
    ])


def write_section(doc: Path, text: str) -> None:
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in body and END in body:
        start, end = body.index(BEGIN), body.index(END) + len(END)
        body = body[:start] + text + body[end:]
    else:
        body = body.rstrip() + "\n\n" + text + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(body)


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None, prepare_fn: Callable = prepare_subprocess,
         bench_fn: Callable = bench_subprocess) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid (tests, smoke runs)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per point")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--heavy-steps", type=int, default=3, help="measured steps for heavy full-softmax points")
    parser.add_argument("--mem-budget-gb", type=float, default=None, help="default: 80%% of MemAvailable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON + plots (default docs/)")
    parser.add_argument("--doc", type=Path, default=None, help="Markdown file (default docs/benchmarks.md)")
    parser.add_argument("--run-dir", type=Path, default=None, help="bench run directories")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the plots and the doc section from a scale_sweep.json (no runs)")
    parser.add_argument("--prepare", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare is not None:  # internal: the data step of one point, in its own process
        print(json.dumps(prepare(args.prepare)))
        return {}
    if args.from_json is not None:
        summary = json.loads(args.from_json.read_text())
        out_dir, doc = args.out_dir or args.from_json.parent, args.doc or ROOT / "docs" / "benchmarks.md"
        render(summary, out_dir, doc)
        return summary

    grid = QUICK if args.quick else FULL
    default_out = ROOT / ("outputs/scale_sweep_quick" if args.quick else "docs")
    out_dir = args.out_dir or default_out
    doc = args.doc or (default_out / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    run_root = args.run_dir or ROOT / "outputs" / "scale_sweep" / time.strftime("%Y-%m-%d_%H-%M-%S")
    budget = args.mem_budget_gb if args.mem_budget_gb is not None else memory_budget_gb()
    command = "OMP_WAIT_POLICY=PASSIVE nice -n 19 .venv/bin/python scripts/scale_sweep.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started, load_before, t0 = time.strftime("%Y-%m-%d %H:%M"), loadavg(), time.perf_counter()
    results = run_sweep(grid, run_root, args.steps, args.warmup, args.heavy_steps, budget, args.timeout,
                        prepare_fn, bench_fn)
    summary = {"command": command.strip(), "started": started, "seconds": time.perf_counter() - t0,
               "load_before": load_before, "load_after": loadavg(), "machine": machine(), "budget_gb": budget,
               "steps": args.steps, "warmup": args.warmup, "heavy_steps": args.heavy_steps,
               "grid": {"interactions": list(grid.interactions), "fixed_items": grid.fixed_items,
                        "items": list(grid.items), "fixed_interactions": grid.fixed_interactions},
               "points": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale_sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    render(summary, out_dir, doc)
    print(f"[scale_sweep] {len(results)} points in {summary['seconds']:.0f} s -> {out_dir}, {doc}")
    return summary


def render(summary: dict, out_dir: Path, doc: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(summary["points"], out_dir,
         f"{summary['machine']['logical_cpus']} CPUs, load {summary['load_before']} -> {summary['load_after']}")
    write_section(doc, section(summary, doc.parent, out_dir))


if __name__ == "__main__":
    main()
