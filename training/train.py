"""Train a sequential recommender, test it at the best validation checkpoint, write metrics.json (and
environment.json: code, packages and hardware the run was made with, `training.provenance`).

    python -m training.train                               # SASRec on MovieLens-100k
    python -m training.train model=gru4rec trainer.max_epochs=50
    python -m training.train model=lsti                    # the full long/short-term model
    python -m training.train experiment=lsti_crop          # ... trained on short histories too
    python -m training.train -m model=sasrec,gru4rec        # a multirun
    python -m training.train hparams_search=sasrec_optuna  # an Optuna sweep (docs/sweeps.md)

Returns the best validation metric (`callbacks.checkpoint.monitor`), which sweeps optimise.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from training.module import LitRecommender, compile_model
from training.provenance import run_environment
from training.report import results_table, write_json_atomic
from training.resume import resolve_ckpt_path, resume_callbacks
from training.strategies import build_strategy, default_precision, precision_for_strategy
from training.sweep_report import NonFiniteMetric, free_memory, record_failure, swallow_failures

log = logging.getLogger("training.train")


def build_datamodule(cfg: DictConfig):
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare()
    return dm


def item_tensors(cfg: DictConfig, dm) -> tuple[dict, dict]:
    """The data-side tensors the model needs (popularity, item text embeddings or texts, user profile
    embeddings) and the info scalars."""
    info = dm.info
    tensors = {"item_counts": info.item_counts, "train_items": info.item_counts > 0}
    text_cfg = cfg.model.get("text")
    model_cfg = instantiate({k: v for k, v in cfg.model.items() if k != "text"}, _convert_="all")
    options = text_cfg or {}  # which language model encodes item (and user) texts, and how
    encoder = {"model_path": options.get("path"), "pooling": options.get("pooling", "mean"),
               "max_length": options.get("max_length", 64), "batch_size": options.get("batch_size", 64)}
    if text_cfg is not None and getattr(model_cfg, "needs_text", False):
        from training.text import item_text_embeddings

        tensors["item_text"] = item_text_embeddings(dm.load_items_frame(), list(dm.prepare().item_ids),
                                                    text_cfg.template, **encoder)
        info.text_dim = int(tensors["item_text"].shape[1])
    if text_cfg is not None and getattr(model_cfg, "needs_item_texts", False):  # LoRA: the model encodes them
        from training.text import render_item_texts

        tensors["item_texts"] = render_item_texts(dm.load_items_frame(), text_cfg.template, list(dm.prepare().item_ids))
    if getattr(model_cfg, "user_profile", False):
        from training.text import user_text_embeddings

        template = options.get("user_template")
        if not template:
            raise ValueError("model.user_profile=true needs model.text.user_template, a format string over the user "
                             "table's columns (e.g. '{age} year old {gender} {occupation}').")
        tensors["user_text"] = user_text_embeddings(dm.load_users_frame(), list(dm.prepare().user_ids), template,
                                                    **encoder)
        info.user_text_dim = int(tensors["user_text"].shape[1])
    loss_cfg = cfg.get("loss") or {}
    if float(loss_cfg.get("neighbour_distill", 0) or 0) > 0:
        from training.neighbours import user_neighbours

        key = loss_cfg.get("neighbour_key", "items")
        if key == "text" and "item_text" not in tensors:
            raise ValueError("loss.neighbour_key=text retrieves similar users by their items' text embeddings, which "
                             f"this model does not use (model={cfg.model.get('_target_')}): use a model with text "
                             "(e.g. model=lsti) or loss.neighbour_key=items.")
        tensors["user_neighbours"] = user_neighbours(dm.prepare(), int(loss_cfg.get("neighbours", 10)), key,
                                                     tensors.get("item_text"))
        log.info("neighbour distillation: %d similar users each (by %s), weight %s",
                 tensors["user_neighbours"].shape[1], key, loss_cfg.neighbour_distill)
    return tensors, info.scalars()


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list | None = None) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("precision") in (None, "auto"):
        trainer_cfg["precision"] = default_precision(trainer_cfg.get("accelerator", "auto"))
    strategy = build_strategy(cfg.get("strategy"))
    trainer_cfg["precision"] = precision_for_strategy(strategy, trainer_cfg["precision"])  # e.g. bf16 in a DS JSON
    loggers = [instantiate(c, save_dir=str(output_dir)) for c in (cfg.get("logger") or {}).values() if c]
    return instantiate(trainer_cfg, strategy=strategy, callbacks=callbacks or [],
                       logger=loggers or False, default_root_dir=str(output_dir))


def train(cfg: DictConfig) -> tuple[dict, float]:
    """Fit + test; returns (all metrics, the optimised validation metric)."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    log.info("data:\n%s", dm.describe())
    tensors, info = item_tensors(cfg, dm)
    lit = LitRecommender(model=cfg.model, info=info, optim=cfg.optim, loss=cfg.loss, evaluation=cfg.evaluation,
                         item_tensors=tensors, data=cfg.data)
    log.info("model: %s, %s trainable parameters", type(lit.model).__name__,
             f"{sum(p.numel() for p in lit.model.parameters() if p.requires_grad):,}")
    monitor = cfg.callbacks.checkpoint.monitor
    checkpoint = ModelCheckpoint(dirpath=str(output_dir / "checkpoints"), filename="best", monitor=monitor,
                                 mode="max", save_last=cfg.callbacks.checkpoint.save_last, save_top_k=1,
                                 auto_insert_metric_name=False)
    callbacks = [checkpoint] + ([LearningRateMonitor(logging_interval="step")] if cfg.get("logger") else [])
    if cfg.callbacks.early_stopping.patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.callbacks.early_stopping.patience))
    # exact resume: RNG states + optional step checkpoints (the data position is in SeqDataModule.state_dict)
    callbacks += resume_callbacks(str(output_dir / "checkpoints"), cfg.callbacks.checkpoint.get("every_n_train_steps"))
    trainer = build_trainer(cfg, output_dir, callbacks)
    if trainer.is_global_zero:  # what the run was made with: the same seed reproduces only on the same
        write_json_atomic(output_dir / "environment.json", {**run_environment(), "seed": cfg.seed})  # kernels
    if compile_model(lit.model, cfg.get("compile"), trainer.strategy):
        log.info("model compiled (torch.compile, backend %s)", cfg.compile.get("backend"))

    best_path = None
    if lit.model.trainable:
        trainer.fit(lit, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), output_dir))
        best_path = checkpoint.best_model_path or None
        if best_path:  # ZeRO-3 cannot re-load its own directory for evaluation: use consolidated weights
            from training.export import evaluation_checkpoint

            best_path = evaluation_checkpoint(trainer, best_path)
    results: dict = {}
    results.update(first_metrics(trainer.validate(lit, datamodule=dm, ckpt_path=best_path, verbose=False)))
    if cfg.get("test", True):  # + the users held out of training, evaluated as new users, when there are any
        for split in dm.test_splits:
            results.update(test_on(trainer, lit, dm, split, best_path))
    results = {k: float(v) for k, v in results.items() if k.startswith(("val/", "test/", "cold_users/"))}
    results["epochs"] = float(trainer.current_epoch)
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", results)
        table = results_table(results, "test")
        if any(k.startswith("cold_users/") for k in results):
            table += "\n\n" + results_table(results, "cold_users")
        (output_dir / "results.md").write_text(table + "\n")
        print(f"\n{table}\n\nbest checkpoint: {best_path}\nrun directory: {output_dir}")
    value = results.get(monitor, float("nan"))
    return results, value if math.isfinite(value) else float("nan")


def test_on(trainer: L.Trainer, lit: LitRecommender, dm, split: str, ckpt_path: str | None = None) -> dict:
    """`trainer.test` on an evaluation split ("test" or "cold_users"), its metrics prefixed with the split's name."""
    dm.test_split, lit.test_prefix = split, split
    try:
        return first_metrics(trainer.test(lit, datamodule=dm, ckpt_path=ckpt_path, verbose=False))
    finally:
        dm.test_split, lit.test_prefix = "test", "test"


def first_metrics(out: list) -> dict:
    return dict(out[0]) if out else {}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """A failing run (exception, out of memory, NaN metric) writes `failed.json` in its run directory. In a
    single-process multirun trial it then returns None, which the Optuna sweeper records as a FAILED trial
    while the sweep goes on (NaN would crash hydra-optuna-sweeper 1.3, see docs/sweeps.md); otherwise the
    exception propagates (a single run exits non-zero; a distributed trial must not leave peers hanging)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_float32_matmul_precision("high")
    try:
        _, value = train(cfg)
        if math.isnan(value):
            record_failure(cfg.paths.output_dir, NonFiniteMetric(f"{cfg.callbacks.checkpoint.monitor} is NaN"))
    except Exception as err:
        record_failure(cfg.paths.output_dir, err)
        if not swallow_failures():
            raise
        log.error("trial failed, recorded in %s/failed.json: %s: %s", cfg.paths.output_dir, type(err).__name__, err)
        value = float("nan")
    if math.isnan(value):
        free_memory()
        return None if swallow_failures() else value
    return value


if __name__ == "__main__":
    main()
