"""Serving latency and int8/bf16 accuracy of `training.serving.Recommender` (results: docs/benchmarks.md).

Latency of one request = `update(state, new_event)` + scoring every item + top-k (seen items excluded),
timed per request with perf_counter (wall) and process_time (CPU time of all threads) after a warm-up, on
`--threads` CPU threads:

    python scripts/latency_bench.py latency --ckpt /tmp/serve_ckpt/checkpoints/best.ckpt
    python scripts/latency_bench.py latency --synthetic-items 100000 --model sasrec,gru4rec,lsti
    python scripts/latency_bench.py latency --synthetic-items 100000 --model sasrec --quantize none,int8

Accuracy of the quantised/bf16 variants against float32 on the test split (history = every event before
the test event, as the trainer's test, no seen-item filtering), through the online path:

    python scripts/latency_bench.py accuracy --ckpt /tmp/serve_ckpt/checkpoints/best.ckpt

Synthetic catalogues use random weights at the model's default size (conf/model/*.yaml); LSTI uses
fusion=id there because text only changes the item table, which is precomputed once at load time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads that get
# descheduled turn a 5 ms request into 500 ms (measured, docs/benchmarks.md). Must be set before torch
# starts its thread pool; OMP_WAIT_POLICY=ACTIVE in the environment measures the default instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import metrics as M  # noqa: E402
from training.data.sequences import DataInfo  # noqa: E402
from training.serving import Recommender  # noqa: E402


def _modes(text: str) -> list[str | None]:
    return [None if m in ("none", "float", "fp32") else m for m in text.split(",")]


def synthetic_recommender(model: str, num_items: int, window: int, quantize: str | None, dtype: str | None,
                          device: str) -> Recommender:
    from training.models.gru4rec import GRU4RecConfig
    from training.models.lsti import LSTIConfig
    from training.models.sasrec import SASRecConfig

    cfg = {"sasrec": SASRecConfig(), "gru4rec": GRU4RecConfig(), "lsti": LSTIConfig(fusion="id")}[model]
    torch.manual_seed(0)
    info = DataInfo(num_items=num_items, num_users=1, max_len=window, item_counts=torch.zeros(num_items + 1))
    ids = ["<pad>"] + [str(i) for i in range(1, num_items + 1)]
    return Recommender(cfg.build(info), ids, window, quantize=quantize, dtype=dtype, device=device)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, 1-min load average {load:.1f}")


def latency(rec: Recommender, history: int, requests: int, warmup: int, k: int, users: int, seed: int) -> dict:
    """Per-request wall time of update + recommend_from_state over a pool of users (ms percentiles)."""
    rng = np.random.default_rng(seed)
    n = rec.num_items
    t0 = 1_700_000_000
    states = []
    for _ in range(users):
        items = rng.integers(1, n + 1, history)
        times = t0 + np.cumsum(rng.integers(10, 600, history))
        states.append(rec.start(rec.item_ids[items].tolist(), times=times.tolist()))
    events = rec.item_ids[rng.integers(1, n + 1, warmup + requests)].tolist()
    who = rng.integers(0, users, warmup + requests)
    samples, cpu = np.empty(requests), np.empty(requests)
    full = np.empty(min(requests, 200))
    for r in range(warmup + requests):
        state = states[who[r]]
        event = (events[r], state.last_time + 60)
        start, start_cpu = time.perf_counter(), time.process_time()
        rec.update(state, event)
        out = rec.recommend_from_state(state, k, exclude_seen=True)
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if r >= warmup:
            samples[r - warmup], cpu[r - warmup] = elapsed, elapsed_cpu
        assert len(out) == k
    hist = rec.item_ids[rng.integers(1, n + 1, history)].tolist()
    for r in range(full.shape[0]):  # for comparison: re-encode a whole history per request
        start = time.perf_counter()
        rec.recommend(hist, k)
        full[r] = time.perf_counter() - start
    ms = samples * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max()),
            "cpu_p50": float(np.percentile(cpu * 1e3, 50)), "cpu_p99": float(np.percentile(cpu * 1e3, 99)),
            "full_p50": float(np.percentile(full * 1e3, 50)), "full_p99": float(np.percentile(full * 1e3, 99)),
            "requests": requests}


def run_latency(args) -> list[dict]:
    rows = []
    for quantize in _modes(args.quantize):
        models = [None] if args.ckpt else args.model.split(",")
        for model in models:
            t = time.perf_counter()
            if args.ckpt:
                rec = Recommender.from_checkpoint(args.ckpt, quantize=quantize, dtype=args.dtype, device=args.device)
            else:
                rec = synthetic_recommender(model, args.synthetic_items, args.window, quantize, args.dtype, args.device)
            load_s = time.perf_counter() - t
            for rep in range(args.repeats):
                res = latency(rec, args.history, args.requests, args.warmup, args.k, args.users, args.seed + rep)
                row = {"model": type(rec.model).__name__, "items": rec.num_items, "window": rec.window,
                       "quantize": quantize or "none", "dtype": args.dtype or "fp32", "repeat": rep,
                       "load_s": load_s, **res}
                rows.append(row)
                print(f"{row['model']:8s} items={row['items']:>7,} quantize={row['quantize']:12s} rep {rep}: "
                      f"p50 {res['p50']:.2f}  p95 {res['p95']:.2f}  p99 {res['p99']:.2f}  mean {res['mean']:.2f} ms; "
                      f"CPU time p50 {res['cpu_p50']:.2f} p99 {res['cpu_p99']:.2f} ms; "
                      f"full re-encode p50 {res['full_p50']:.2f} ms", flush=True)
    return rows


def run_accuracy(args) -> list[dict]:
    """NDCG@10/HR@10 on the test split and top-10 overlap with float32, for each variant, online path."""
    base = Recommender.from_checkpoint(args.ckpt)
    data = base.data
    split = data.test
    rows, ref_lists = [], None
    for mode in ["none", *[m for m in args.variants.split(",") if m != "none"]]:
        kwargs = {"dtype": "bf16"} if mode == "bf16" else {"quantize": None if mode == "none" else mode}
        rec = base if mode == "none" else Recommender.from_checkpoint(args.ckpt, device=args.device, **kwargs)
        ranks, lists = [], []
        t = time.perf_counter()
        for u, pos in zip(split.user.tolist(), split.pos.tolist(), strict=True):
            span = slice(int(data.offsets[u]), int(data.offsets[u]) + pos)
            state = rec.start(data.item_ids[data.items[span]].tolist(), times=data.times[span].tolist())
            with torch.inference_mode():
                scores = rec.score(rec.encoder.vector(state, None).unsqueeze(0))
            target = torch.tensor([int(data.items[data.offsets[u] + pos])])
            ranks.append(int(M.target_ranks(scores.cpu(), target)[0]))
            lists.append(M.topk_items(scores.cpu(), 10)[1][0].tolist())
        ranks_t = torch.tensor(ranks)
        summary = M.summarise(M.rank_metrics(ranks_t, (10,)))
        row = {"variant": mode, "queries": len(ranks), "ndcg@10": float(summary["ndcg@10"]),
               "hr@10": float(summary["hr@10"]), "seconds": time.perf_counter() - t}
        if ref_lists is None:
            ref_lists = lists
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(ref_lists, lists, strict=True)]
        row["top10_overlap"] = float(np.mean(overlap))
        row["identical_top10"] = float(np.mean([a == b for a, b in zip(ref_lists, lists, strict=True)]))
        rows.append(row)
        print(f"{mode:13s} NDCG@10 {row['ndcg@10']:.4f}  HR@10 {row['hr@10']:.4f}  top-10 overlap with float "
              f"{row['top10_overlap']:.3f}  identical lists {row['identical_top10']:.3f}  ({row['queries']} queries)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["latency", "accuracy"])
    parser.add_argument("--ckpt", help="a trained checkpoint (any form training.checkpoints reads)")
    parser.add_argument("--synthetic-items", type=int, default=100_000, help="catalogue size without --ckpt")
    parser.add_argument("--model", default="sasrec", help="comma list of sasrec,gru4rec,lsti (synthetic only)")
    parser.add_argument("--window", type=int, default=50, help="data.max_len of the synthetic models")
    parser.add_argument("--quantize", default="none", help="comma list of none,int8,int8-encoder")
    parser.add_argument("--dtype", default=None, help="bf16 (GPU)")
    parser.add_argument("--variants", default="int8,int8-encoder", help="accuracy: variants to compare with float")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--history", type=int, default=50, help="events per user before the timed ones")
    parser.add_argument("--users", type=int, default=32, help="user states requests rotate over")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine(), flush=True)
    if args.task == "accuracy" and not args.ckpt:
        parser.error("accuracy needs --ckpt")
    rows = run_latency(args) if args.task == "latency" else run_accuracy(args)
    print("end:", machine(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
