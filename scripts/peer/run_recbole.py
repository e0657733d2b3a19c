"""Run RecBole 1.2.1's SASRec or GRU4Rec on an atomic dataset under the ANCHORS.md protocol; write a JSON.

Runs inside the peer venv (scripts/peer/setup.sh), never in ours:

    $PEER/bin/python scripts/peer/run_recbole.py --model SASRec --out /tmp/recbole_sasrec.json
    $PEER/bin/python scripts/peer/run_recbole.py --model GRU4Rec --epochs 2 --out /tmp/t.json   # timing only

Protocol (ANCHORS.md): all interactions as implicit feedback, time-ordered leave-one-out
(`eval_args: split {LS: valid_and_test}, order TO, mode full`), full ranking, history not filtered,
MAX_ITEM_LIST_LENGTH 50, CE loss without negative sampling, batch 256, lr 0.001, early stopping on
valid NDCG@10 with stopping_step 10, seed 2020, Hit/NDCG/MRR@10. SASRec: hidden 64, 2 layers, 2 heads
(RecBole's defaults); GRU4Rec: RecBole's defaults (embedding 64, hidden 128, 1 layer).

This file uses only the standard library and RecBole's own modules (not `recbole.quick_start`, which
imports ray at module level). Shims applied at import time, none of which edits site-packages:
  * `torch.load` defaults to `weights_only=False` again: RecBole reloads its own best checkpoint
    (`Trainer.evaluate(load_best_model=True)`), which pickles the Config object; since torch 2.6 the
    default `weights_only=True` refuses it.
  * numpy 2 removed `np.float_`, `np.complex_`, `np.unicode_`, which RecBole's
    `Config.compatibility_settings()` reads; the peer venv pins numpy<2, the aliases are restored only if
    a numpy 2 is found anyway.
  * importing `recbole.model.sequential_recommender` imports SINE, which calls
    `torch.autograd.set_detect_anomaly(True)` at module level (a 25-30% slowdown of every model);
    it is switched back off right after the import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}

PROTOCOL = {
    "USER_ID_FIELD": "user_id",
    "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "MAX_ITEM_LIST_LENGTH": 50,
    "loss_type": "CE",
    "train_neg_sample_args": None,
    "train_batch_size": 256,
    "learning_rate": 0.001,
    "valid_metric": "NDCG@10",
    "valid_metric_bigger": True,
    "stopping_step": 10,
    "seed": 2020,
    "reproducibility": True,
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10],
    "epochs": 300,
    "user_inter_num_interval": "[0,inf)",
    "item_inter_num_interval": "[0,inf)",
    "val_interval": None,
    "show_progress": False,
    "log_wandb": False,
    "save_dataset": False,
    "save_dataloaders": False,
}

MODEL_SIZES = {
    "SASRec": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256,
               "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5},
    "GRU4Rec": {"embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3},
}


def default_data_dir() -> Path:
    """Our cached ml-100k atomic files (training/data/movielens.py puts them there)."""
    cache = Path(os.environ.get("LSTI_CACHE_DIR") or Path.home() / ".cache" / "lsti").expanduser()
    return cache / "datasets" / "ml-100k"


def inter_columns(inter_file: Path) -> list[str]:
    """The protocol's columns present in the .inter header (`name:type` fields, tab-separated)."""
    with open(inter_file, encoding="utf-8") as f:
        names = [field.split(":")[0] for field in f.readline().rstrip("\n").split("\t")]
    wanted = ["user_id", "item_id", "rating", "timestamp"]  # rating: loaded like RecBole's ml-100k.yaml
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in names]
    if missing:
        raise SystemExit(f"{inter_file}: header lacks {missing} (has {names})")
    return [c for c in wanted if c in names]


def build_config_dict(model: str, data_dir: Path, dataset: str, work_dir: Path, epochs: int | None,
                      use_gpu: bool) -> dict:
    cfg = dict(PROTOCOL)
    cfg.update(MODEL_SIZES[model])
    cfg.update({
        "data_path": str(data_dir.parent),  # RecBole reads <data_path>/<dataset>/<dataset>.inter
        "checkpoint_dir": str(work_dir / "saved"),
        "load_col": {"inter": inter_columns(data_dir / f"{dataset}.inter")},
        "use_gpu": use_gpu,
    })
    if epochs is not None:
        cfg["epochs"] = epochs
    return cfg


def apply_shims() -> None:
    import numpy as np
    import torch

    # pandas 2.2+ warns about RecBole's chained `feat[field].fillna(..., inplace=True)`; it still fills in
    # pandas 2.x (copy-on-write is off), which the peer venv pins (<3)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    original = torch.load
    if not getattr(original, "_lsti_peer_shim", False):
        def load(*args, **kwargs):
            kwargs.setdefault("weights_only", False)  # RecBole's own checkpoints (pickled Config)
            return original(*args, **kwargs)

        load._lsti_peer_shim = True
        torch.load = load
    for alias, target in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_")):
        if not hasattr(np, alias):
            setattr(np, alias, getattr(np, target))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    apply_shims()
    import recbole
    import recbole.model.sequential_recommender  # noqa: F401  (imports SINE: anomaly detection on)
    import torch

    torch.autograd.set_detect_anomaly(False)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    model_name = MODELS[args.model.lower()]
    data_dir = Path(args.data_dir).expanduser().resolve()
    dataset = args.dataset or data_dir.name
    if not (data_dir / f"{dataset}.inter").is_file():
        raise SystemExit(f"{data_dir / (dataset + '.inter')} not found (RecBole atomic files expected)")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix=f"recbole-{model_name}-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(work_dir)  # RecBole writes log/, log_tensorboard/ and saved/ under the working directory
    use_gpu = torch.cuda.is_available() and not args.cpu
    config_dict = build_config_dict(model_name, data_dir, dataset, work_dir, args.epochs, use_gpu)

    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config also parses `--key=value` from sys.argv
    try:
        config = Config(model=model_name, dataset=dataset, config_dict=config_dict)
    finally:
        sys.argv = argv
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    t_data = time.perf_counter()
    ds = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, ds)
    data_s = time.perf_counter() - t_data
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    train_wall: list[float] = []
    train_cpu: list[float] = []
    valid_wall: list[float] = []
    valid_ndcg: list[float] = []
    inner_train, inner_valid = trainer._train_epoch, trainer._valid_epoch

    def timed_train_epoch(*a, **kw):
        w0, c0 = time.perf_counter(), time.process_time()
        out = inner_train(*a, **kw)
        train_wall.append(time.perf_counter() - w0)
        train_cpu.append(time.process_time() - c0)
        return out

    def timed_valid_epoch(*a, **kw):
        w0 = time.perf_counter()
        score, result = inner_valid(*a, **kw)
        valid_wall.append(time.perf_counter() - w0)
        valid_ndcg.append(float(score))
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, timed_valid_epoch
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    # RecBole keeps the latest epoch among equal best scores (early_stopping uses >=)
    best_epoch = max((i for i, v in enumerate(valid_ndcg) if v == max(valid_ndcg)), default=None)
    epochs = len(train_wall)
    converged = args.epochs is None or epochs < args.epochs
    return {
        "framework": "recbole",
        "recbole_version": recbole.__version__,
        "torch_version": torch.__version__,
        "model": model_name,
        "dataset": dataset,
        "data_dir": str(data_dir),
        "work_dir": str(work_dir),
        "device": str(config["device"]),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_samples": len(train_data._dataset),
        "epochs": epochs,
        "epoch_cap": args.epochs,
        "stopped_early": converged and args.epochs is None and epochs < config["epochs"],
        "converged": converged,
        "s_per_epoch": statistics.median(train_wall) if train_wall else None,
        "s_per_epoch_mean": statistics.fmean(train_wall) if train_wall else None,
        "cpu_s_per_epoch": statistics.median(train_cpu) if train_cpu else None,
        "epoch_train_s": train_wall,
        "epoch_train_cpu_s": train_cpu,
        "epoch_valid_s": valid_wall,
        "valid_ndcg@10": valid_ndcg,
        "best_valid_ndcg@10": float(best_valid),
        "best_epoch": best_epoch,
        "test": {k.lower(): float(v) for k, v in (test or {}).items()},  # hit@10, ndcg@10, mrr@10
        "data_prep_s": data_s,
        "wall_s": time.perf_counter() - t_start,
        "peak_rss_gb": peak_rss_gb(),
        "anomaly_detection": torch.is_anomaly_enabled(),
        "config": {k: config_dict[k] for k in ("eval_args", "MAX_ITEM_LIST_LENGTH", "loss_type", "train_batch_size",
                                               "learning_rate", "valid_metric", "stopping_step", "seed", "epochs",
                                               "load_col")} | MODEL_SIZES[model_name],
        "python": platform.python_version(),
        "argv": sys.argv,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SASRec", type=lambda s: MODELS.get(s.lower(), s),
                   choices=sorted(MODELS.values()))
    p.add_argument("--epochs", type=int, default=None,
                   help="cap the number of epochs (timing-only run); default: 300 with early stopping")
    p.add_argument("--data-dir", default=str(default_data_dir()),
                   help="directory holding <dataset>.inter (default: our cached ml-100k)")
    p.add_argument("--dataset", default=None, help="atomic file prefix (default: the directory's name)")
    p.add_argument("--work-dir", default=None, help="RecBole's log/ and saved/ go here (default: a temp dir)")
    p.add_argument("--cpu", action="store_true", help="do not use a GPU even if one is visible")
    p.add_argument("--out", default=None, help="write the result JSON here (always printed too)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.model = args.model.lower()
    out = Path(args.out).expanduser().resolve() if args.out else None  # before run() changes directory
    result = run(args)
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
