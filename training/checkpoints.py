"""Loading any checkpoint form the training package writes: a Lightning .ckpt file, or a DeepSpeed ZeRO
checkpoint directory (consolidated on the fly), or a consolidated weights file from `training.export`."""

from __future__ import annotations

from pathlib import Path

import torch

from training.module import LitRecommender


class CheckpointError(ValueError):
    pass


def load_checkpoint_dict(path: str | Path) -> dict:
    """A dict with `state_dict` and `hyper_parameters`, whatever form the checkpoint is in."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; pass ckpt=<path to a .ckpt file or ZeRO directory>.")
    if p.is_dir():
        from training.export import consolidate_zero_checkpoint

        return consolidate_zero_checkpoint(p)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {p} could not be read ({exc}); is it a file this framework wrote?") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"checkpoint {p} lacks state_dict/hyper_parameters: not written by training.train "
                              "or training.export.")
    return ckpt


def load_module(path: str | Path, **overrides) -> LitRecommender:
    """Rebuild the LightningModule from its hyperparameters and load the weights (strict)."""
    ckpt = load_checkpoint_dict(path)
    hp = dict(ckpt["hyper_parameters"])
    hp.update({k: v for k, v in overrides.items() if v is not None})
    module = LitRecommender(**hp)
    state = {k: v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("neg_probs")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return module
