"""Strategy factory: turns `conf/strategy/*.yaml` into what `lightning.Trainer(strategy=...)` accepts."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_strategy(cfg: DictConfig | dict | str | None) -> Any:
    """`auto`/None -> "auto"; a node with `_target_` -> that object; a node with `name` -> the name."""
    if cfg is None or isinstance(cfg, str):
        return cfg or "auto"
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if "_target_" in node:
        return instantiate(node, _convert_="all")
    return node.get("name", "auto")


def default_precision(accelerator: str) -> str:
    """bf16-mixed on GPU, full fp32 on CPU (where bf16 autocast is slower and less exact)."""
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"
