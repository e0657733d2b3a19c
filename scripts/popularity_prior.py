"""Would a popularity prior help a trained model? Adds beta * log(1 + training count) to every item's score.

    python scripts/popularity_prior.py outputs/experiments/crop/sasrec_crop outputs/experiments/crop/lsti_crop_len
    python scripts/popularity_prior.py A_dir B_dir --betas 0 0.1 0.3 --shortest-share 0.2 --section popularity_prior

A learned per-item bias (a popularity prior) is the usual help for users the model knows little about. Before
building one into a model, this asks the cheaper question on finished runs: for each configuration directory
(one run per seed, `seed<s>/checkpoints/best.ckpt`, as `scripts/experiments.py` writes) and each seed, beta is
chosen on the validation split's NDCG@10 among `--betas` (0 included), and the test split is scored with beta = 0
and with the chosen beta. The table gives test NDCG@10 overall, on the shortest `--shortest-share` of users'
histories, and on those users' head-item and tail-item targets (the evaluator's items_head / items_tail), mean
over seeds. The models are
not changed or saved.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # scripts is no package: loaded by path
    spec.loader.exec_module(module)
    return module


def with_prior(model: torch.nn.Module, log_counts: torch.Tensor, beta: float) -> None:
    """Make `model.score` add beta * log(1 + count) to each item's dot-product score (this instance only)."""
    base = type(model).score

    def score(self, states: torch.Tensor, item_table: torch.Tensor | None = None) -> torch.Tensor:
        return base(self, states, item_table) + beta * log_counts.to(states.device, states.dtype)

    model.score = types.MethodType(score, model)


def run_scores(run: Path, betas: list[float]) -> dict:
    """Validation NDCG@10 per beta, the chosen beta, the test ranks (with each query's history length, target and
    head flag) at beta = 0 and at the chosen beta, and the training counts the prior is made of."""
    import hydra
    import lightning as L
    from omegaconf import OmegaConf

    from training.checkpoints import load_checkpoint_dict, load_module
    from training.metrics import head_items
    from training.train import first_metrics, test_on

    ckpt = run / "checkpoints" / "best.ckpt"
    hp = load_checkpoint_dict(str(ckpt))["hyper_parameters"]
    module = load_module(str(ckpt), evaluation=hp.get("evaluation", {}))
    module.eval_cfg.item_chunk_size = None  # score through model.score, where the prior is added
    L.seed_everything(0, workers=True)
    dm = hydra.utils.instantiate(OmegaConf.create(hp["data"]), _convert_="all")
    dm.prepare()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    counts = module.item_counts.float().cpu()
    log_counts, is_head = torch.log1p(counts), head_items(counts, module.eval_cfg.head_fraction)
    quiet = contextlib.redirect_stdout(io.StringIO())
    valid = {}
    for beta in betas:
        with_prior(module.model, log_counts, beta)
        with quiet:
            valid[beta] = first_metrics(trainer.validate(module, datamodule=dm, verbose=False))["val/ndcg@10"]
    chosen = max(valid, key=lambda b: (valid[b], -b))  # ties: the smaller prior
    test = {}
    for beta in sorted({0.0, chosen}):
        with_prior(module.model, log_counts, beta)
        with quiet:
            test_on(trainer, module, dm, "test")
        ranks = module.last_ranks
        test[beta] = {"rank": ranks["rank"].numpy(), "history": ranks["train_len"].numpy(),
                      "target": ranks["target"].numpy(), "head": is_head[ranks["target"]].numpy()}
    return {"valid": valid, "chosen": chosen, "test": test, "item_counts": counts.numpy()}


def ndcg(rank: np.ndarray) -> np.ndarray:
    return np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)


def summary(result: dict, bound: int) -> dict[str, float]:
    """Test NDCG@10 overall / on histories <= bound / on their head and tail targets, at beta 0 and at the chosen
    beta."""
    out = {"chosen": result["chosen"]}
    for name, beta in (("none", 0.0), ("prior", result["chosen"])):
        t = result["test"][beta]
        gains, short = ndcg(t["rank"]), t["history"] <= bound
        out[f"{name}_all"], out[f"{name}_short"] = gains.mean(), gains[short].mean()
        out[f"{name}_short_head"] = gains[short & t["head"]].mean()
        out[f"{name}_short_tail"] = gains[short & ~t["head"]].mean()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", type=Path, nargs="+", help="configuration directories (one run per seed)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
    ap.add_argument("--shortest-share", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: every finished)")
    ap.add_argument("--section", default=None, help="also write the table into docs/results.md under this name")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    if any(b < 0 for b in args.betas):
        raise SystemExit(f"--betas {args.betas}: a popularity prior's weight is >= 0.")
    if not 0.0 < args.shortest_share < 1.0:
        raise SystemExit(f"--shortest-share {args.shortest_share}: give a share of users between 0 and 1 (e.g. 0.2).")
    betas = sorted({0.0, *args.betas})
    pb = _load_script("paired_bootstrap")
    rows = []
    for config in args.configs:
        runs = pb.finished_runs(config, args.seeds)
        results = [run_scores(run, betas) for run in runs]
        bound = pb.shortest_bound(results[0]["test"][0.0]["history"], args.shortest_share)
        per_seed = [summary(r, bound) for r in results]
        mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
        chosen = ", ".join(f"{s['chosen']:g}" for s in per_seed)
        rows.append(f"| {config.name} | {len(runs)} | {chosen} | "
                    + " | ".join(f"{mean['none_' + k]:.4f} -> {mean['prior_' + k]:.4f}"
                                 for k in ("all", "short", "short_head", "short_tail")) + " |")
        print(rows[-1], flush=True)
    shown = " ".join(str(c.resolve().relative_to(ROOT)) if c.resolve().is_relative_to(ROOT) else str(c)
                     for c in args.configs)
    cmd = (f"python scripts/popularity_prior.py {shown} --betas {' '.join(f'{b:g}' for b in betas)} "
           f"--shortest-share {args.shortest_share:g}" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""))
    text = "\n".join([
        f"Command: `{cmd}` (test NDCG@10 without -> with the prior, beta chosen per seed on validation NDCG@10; "
        f"mean over seeds; short: the shortest {100 * args.shortest_share:g}% of histories).", "",
        "| config | seeds | chosen beta per seed | all users | short histories | short histories, head targets "
        "| short histories, tail targets |", "|---|---|---|---|---|---|---|", *rows])
    print(text)
    if args.section:
        _load_script("experiments").write_section(args.section, text, args.doc)


if __name__ == "__main__":
    main()
