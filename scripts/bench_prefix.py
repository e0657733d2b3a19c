"""What makes per-prefix training (RecBole's regime) cheap here: each speed-up switched on in turn.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_prefix.py [--steps 30] [--repeats 2]

Per-prefix training makes every prefix of every training sequence a sample scored at its last position
(97,171 samples an epoch on MovieLens-100k). Four settings, timed with `training.bench` (same data module,
model and optimiser as training; epoch time = mean step time x steps an epoch):

1. before: `experiment=sasrec_recbole` (stride-1 windows) with the full last block and PyTorch's dropout;
2. + last block only where scored (`query_mask`; the SASRec default when few positions carry a target);
3. + the CPU dropout path (`training.models.layers.dropout`: rand < keep instead of the Bernoulli kernel);
4. + shared prefix windows (`experiment=sasrec_prefix`: a user's first max_len targets in one window).

Settings 1-3 switch the speed-ups off by patching the model code in this process, which is the only place
they can be switched off; 4 is the shipped configuration. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import training.models.layers as layers
from training.bench import run_bench
from training.models.sasrec import SASRec

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    ("per-prefix, before", "sasrec_recbole", False, False),
    ("+ last block only where scored", "sasrec_recbole", True, False),
    ("+ CPU dropout path", "sasrec_recbole", True, True),
    ("+ shared prefix windows (`experiment=sasrec_prefix`)", "sasrec_prefix", True, True),
]


@contextlib.contextmanager
def speedups(query_mask: bool, fast_dropout: bool):
    saved = SASRec.supports_query_mask, layers.dropout, layers.attention
    SASRec.supports_query_mask = query_mask
    if not fast_dropout:
        layers.dropout = lambda x, p, training: F.dropout(x, p, training)
        layers.attention = lambda q, k, v, mask, p, training: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    try:
        yield
    finally:
        SASRec.supports_query_mask, layers.dropout, layers.attention = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the settings (interleaved)")
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for label, experiment, query_mask, fast_dropout in SETTINGS:
            overrides = [f"experiment={experiment}", f"bench.steps={args.steps}", f"bench.warmup={args.warmup}",
                         "bench.eval=false", "bench.write_doc=false"]
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="bench", overrides=overrides)
            with speedups(query_mask, fast_dropout):
                r = run_bench(cfg)
            rows.setdefault(label, []).append(r)
            print(f"{label}: {r['step_ms']:.0f} ms/step x {r['steps_per_epoch']} = {r['epoch_s']:.1f} s/epoch",
                  flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, OMP_NUM_THREADS={threads}, load {os.getloadavg()[0]:.1f}\n")
    print("| setting | samples an epoch | steps an epoch | step ms | s/epoch | vs before |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for label, runs in rows.items():
        epoch = sorted(r["epoch_s"] for r in runs)[len(runs) // 2]
        step = sorted(r["step_ms"] for r in runs)[len(runs) // 2]
        base = base or epoch
        samples = runs[0]["steps_per_epoch"] * runs[0]["batch_size"]
        print(f"| {label} | ~{samples:,} | {runs[0]['steps_per_epoch']} | {step:.0f} | {epoch:.1f} | "
              f"{base / epoch:.2f}x |")


if __name__ == "__main__":
    main()
