"""Re-evaluate a checkpoint (Lightning .ckpt, ZeRO directory or exported weights) with full ranking.

    python -m training.evaluate ckpt=outputs/train/<run>/checkpoints/best.ckpt
    python -m training.evaluate ckpt=... evaluation.filter_seen=true split=valid
    python -m training.evaluate ckpt=... trainer.devices=2 trainer.accelerator=cpu   # exact in N processes
    python -m training.evaluate ckpt=... history_cap=5   # as if each user had only their latest 5 events
    python -m training.evaluate ckpt=... save_ranks=true # + ranks.csv: every query's rank (paired tests)
    python -m training.evaluate ckpt=... split=cold_users  # users held out of training (data.preprocess.cold_user_fraction)

The data config stored in the checkpoint is used unless `data=...` overrides it (the catalogue must match).
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from training.checkpoints import CheckpointError, load_checkpoint_dict, load_module
from training.data.datamodule import EVAL_SPLITS
from training.data.errors import DataError
from training.report import results_table, write_json_atomic
from training.train import build_trainer, first_metrics, test_on


def evaluate(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt"):
        raise CheckpointError("pass ckpt=<path to a checkpoint file or ZeRO directory>.")
    if cfg.split not in EVAL_SPLITS:
        raise DataError(f"split={cfg.split!r}: use one of {', '.join(EVAL_SPLITS)}.")
    hp = load_checkpoint_dict(cfg.ckpt)["hyper_parameters"]
    evaluation = {**hp.get("evaluation", {}), **OmegaConf.to_container(cfg.evaluation, resolve=True)}
    module = load_module(cfg.ckpt, evaluation=evaluation)
    data_cfg = OmegaConf.create(hp["data"]) if cfg.get("data") is None else cfg.data
    if cfg.get("history_cap") is not None:
        with open_dict(data_cfg):  # checkpoints saved before the setting existed lack the key
            data_cfg.eval_history_cap = cfg.history_cap
    L.seed_everything(cfg.seed, workers=True)
    dm = hydra.utils.instantiate(data_cfg, _convert_="all")
    dm.prepare()
    if dm.info.num_items != module.hparams["info"]["num_items"]:
        raise CheckpointError(f"checkpoint {cfg.ckpt} was trained on {module.hparams['info']['num_items']} items but "
                              f"the data has {dm.info.num_items}: evaluate it on the dataset it was trained on.")
    out = Path(cfg.paths.output_dir)
    trainer = build_trainer(cfg, out)
    if cfg.split == "valid":
        results = first_metrics(trainer.validate(module, datamodule=dm, verbose=False))
    else:
        results = test_on(trainer, module, dm, cfg.split)
    results = {k: float(v) for k, v in results.items()}
    if trainer.is_global_zero:
        write_json_atomic(out / "metrics.json", results)
        if cfg.get("save_ranks"):
            from training.metrics import head_items

            is_head = head_items(module.item_counts.cpu(), module.eval_cfg.head_fraction)
            write_ranks(out / "ranks.csv", module.last_ranks, dm.prepare(), cfg.split, is_head)
        print(results_table(results, "val" if cfg.split == "valid" else cfg.split))
    return results


def write_ranks(path: Path, ranks: dict, data, split: str, is_head) -> None:
    """One row per query (query order): raw user id, raw target item id, history length the model saw,
    whether the target is a head item (the evaluator's items_head slice; `is_head` [N+1] bool), and the
    target's 0-based full-ranking rank; written via a temp file, so a reader never sees half of it."""
    import pandas as pd

    eval_split = getattr(data, split)
    query = ranks["query"].numpy()
    frame = pd.DataFrame({"user": data.user_ids[eval_split.user[query]], "item": data.item_ids[ranks["target"].numpy()],
                          "history": ranks["train_len"].numpy(), "head_item": is_head[ranks["target"]].numpy(),
                          "rank": ranks["rank"].numpy()})
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    evaluate(cfg)


if __name__ == "__main__":
    main()
