"""Benchmark harness: training throughput, data-wait share, evaluation throughput, memory and MFU.

    python -m training.bench                                   # SASRec on MovieLens-100k
    python -m training.bench model=lsti bench.steps=30
    python -m training.bench data=synthetic data.source.synthetic.num_items=100000 loss.name=sampled

Uses the same config groups as `training.train` (plus `bench.*`). It runs a plain training loop over
the real data module and model (no Trainer), so each phase can be timed on its own:
- data wait: time blocked in the loader before each step, as a share of step time;
- step time, sequences/s and items (scored positions)/s, and epoch time extrapolated from steps/epoch;
- model FLOPs per step (torch's FlopCounterMode on one forward+backward) and achieved FLOP/s against the
  device's measured dense matmul peak (MFU);
- evaluation: full-ranking users/s over the validation queries;
- peak RSS (and peak GPU memory on CUDA).
`compile.enabled=true` times the torch.compile'd model (compiled after the FLOP count, so the warm-up steps
absorb the compilation; `warmup_s` reports their total time).
Writes `bench.json` in the run directory and appends a Markdown row to `docs/benchmarks.md`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from training import metrics as M
from training.module import LitRecommender, compile_model
from training.train import build_datamodule, item_tensors

ROOT = Path(__file__).resolve().parents[1]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s: the denominator of MFU on this exact device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def step_flops(lit: LitRecommender, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = lit.training_step(batch, 0)
        loss.backward()
    lit.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_bench(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed)
    bench = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and bench.bf16 else torch.float32
    dm = build_datamodule(cfg)
    tensors, info = item_tensors(cfg, dm)
    lit = LitRecommender(model=cfg.model, info=info, optim=cfg.optim, loss=cfg.loss, evaluation=cfg.evaluation,
                         item_tensors=tensors).to(device)
    lit.log = lambda *a, **k: None  # no Trainer: logging is a no-op here
    optimizer = lit.build_optimizer()  # the training optimiser (fused AdamW, or DenseSparseAdam)
    loader = dm.train_dataloader()
    steps_per_epoch = len(loader)
    result: dict = {"model": type(lit.model).__name__, "params": sum(p.numel() for p in lit.model.parameters()),
                    "num_items": info["num_items"], "interactions": dm.prepare().stats["interactions"],
                    "batch_size": cfg.data.batch_size, "max_len": cfg.data.max_len, "loss": cfg.loss.name,
                    "device": device_description(device), "dtype": str(dtype).removeprefix("torch."),
                    "steps_per_epoch": steps_per_epoch}

    it = iter(loader)
    first = _to(next(it), device)
    result["flops_per_step"] = step_flops(lit, first) if lit.model.trainable else 0.0
    result["compiled"] = compile_model(lit.model, cfg.get("compile"))  # after the FLOP count (eager)
    wait = compute = warmup_s = 0.0
    seqs = items = 0
    measured = 0
    total = bench.warmup + bench.steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    for step in range(total):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = _to(batch, device)
        _sync(device)
        t1 = time.perf_counter()
        if lit.model.trainable:
            with autocast:
                loss = lit.training_step(batch, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if step >= bench.warmup:
            wait += t1 - t0
            compute += t2 - t1
            seqs += batch["items"].shape[0]
            items += int((batch["targets"] > 0).sum())
            measured += 1
        else:
            warmup_s += t2 - t0
    step_time = (wait + compute) / max(measured, 1)
    peak = matmul_peak(device, dtype)
    achieved = result["flops_per_step"] / max(compute / max(measured, 1), 1e-12)
    result.update(step_ms=1000 * step_time, data_wait_share=wait / max(wait + compute, 1e-12),
                  seq_per_s=seqs / max(wait + compute, 1e-12), items_per_s=items / max(wait + compute, 1e-12),
                  epoch_s=step_time * steps_per_epoch, peak_flops=peak, achieved_flops=achieved,
                  mfu=achieved / peak, warmup_s=warmup_s)

    if bench.eval:
        lit.eval()
        with torch.no_grad():
            table = lit.model.item_table().detach()
            queries = 0
            _sync(device)
            t0 = time.perf_counter()
            for batch in dm.val_dataloader():
                batch = _to(batch, device)
                with autocast:
                    states = lit.model.latest_states(batch["items"], batch["times"], batch["users"], item_table=table)
                M.full_ranking_ranks(states, table, batch["target"], chunk_size=cfg.data.eval_batch_size,
                                     item_chunk_size=bench.item_chunk_size)
                queries += batch["target"].shape[0]
            _sync(device)
            result["eval_users_per_s"] = queries / (time.perf_counter() - t0)
            result["eval_queries"] = queries
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def markdown_row(r: dict, command: str) -> str:
    return (f"| {r['model']} | {r['num_items']:,} | {r['interactions']:,} | {r['loss']} | {r['batch_size']}x{r['max_len']} "
            f"| {r['step_ms']:.1f} | {r['seq_per_s']:.0f} | {r['items_per_s']:.0f} | {r['epoch_s']:.1f} "
            f"| {100 * r['data_wait_share']:.1f}% | {r.get('eval_users_per_s', float('nan')):.0f} "
            f"| {r['flops_per_step'] / 1e9:.2f} | {100 * r['mfu']:.1f}% | {r['peak_rss_gb']:.2f} "
            f"| {r.get('peak_gpu_gb', float('nan')):.2f} | {r['device']} | `{command}` |")


HEADER = ("| model | items | interactions | loss | batch | step ms | seq/s | items/s | epoch s | data wait "
          "| eval users/s | GFLOP/step | MFU | peak RSS GB | peak GPU GB | device | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def append_to_doc(row: str, doc: Path) -> None:
    marker = "<!-- bench:rows -->"
    body = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if marker not in body:
        body = body.rstrip() + f"\n\n## Training and evaluation throughput (`python -m training.bench`)\n\n{HEADER}\n{marker}\n"
    body = body.replace(marker, f"{row}\n{marker}")
    doc.write_text(body)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_bench(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    overrides = OmegaConf.to_container(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    command = " ".join(["python -m training.bench", *overrides])
    if cfg.bench.write_doc:
        append_to_doc(markdown_row(result, command), ROOT / "docs" / "benchmarks.md")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
