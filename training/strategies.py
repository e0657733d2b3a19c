"""Strategy factory: turns `conf/strategy/*.yaml` into what `lightning.Trainer(strategy=...)` accepts.

    single                 one device (Lightning "auto")
    ddp                    DistributedDataParallel (gloo on CPU, nccl on GPU)
    deepspeed_zero1/2/3    DeepSpeed ZeRO stage 1/2/3 (`deepspeed_strategy`)
    deepspeed_zero2_offload, deepspeed_zero3_offload   optimizer (and parameter) offload to CPU or NVMe
    fsdp                   PyTorch FSDP (full state-dict checkpoints, one file)

DeepSpeed on CPU: Lightning's `DeepSpeedStrategy` refuses anything but CUDA. `CPUDeepSpeedStrategy` lifts the
three CUDA-only assumptions (see its docstring), so `trainer.accelerator=cpu trainer.devices=2` dry-runs ZeRO
on a laptop with gloo. `deepspeed_strategy` picks it automatically when the accelerator is the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies.deepspeed import remove_module_hooks  # (does not import deepspeed itself)
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_OFFLOAD_TARGETS = (None, "none", "cpu", "nvme")


def build_strategy(cfg: DictConfig | dict | str | None) -> Any:
    """`auto`/None -> "auto"; a node with `_target_` -> that object; a node with `name` -> the name."""
    if cfg is None or isinstance(cfg, str):
        return cfg or "auto"
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if "_target_" in node:
        return instantiate(node, _convert_="all")
    return node.get("name", "auto")


def on_gpu(accelerator: str | None) -> bool:
    import torch

    accelerator = (accelerator or "auto").lower()
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def default_precision(accelerator: str) -> str:
    """bf16-mixed on GPU, full fp32 on CPU (where bf16 autocast is slower and less exact)."""
    return "bf16-mixed" if on_gpu(accelerator) else "32-true"


def precision_for_strategy(strategy: Any, precision: str) -> str:
    """The Trainer precision a strategy needs: a DeepSpeed config (e.g. an explicit JSON) that enables bf16/fp16
    makes DeepSpeed cast the weights, so the Trainer must autocast the inputs to match (else: mixed dtypes)."""
    config = getattr(strategy, "config", None)
    if not _is_deepspeed(strategy) or not isinstance(config, dict):
        return precision
    precision = str(precision)
    if _enabled(config.get("bf16")) and not precision.startswith("bf16"):
        log.warning("the DeepSpeed config enables bf16: setting trainer.precision=bf16-mixed (was %s)", precision)
        return "bf16-mixed"
    if _enabled(config.get("fp16")) and not precision.startswith("16"):
        log.warning("the DeepSpeed config enables fp16: setting trainer.precision=16-mixed (was %s)", precision)
        return "16-mixed"
    return precision


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (None for anything else)."""
    if not _is_deepspeed(strategy):
        return None
    return int(((strategy.config or {}).get("zero_optimization") or {}).get("stage", 0))


# ----------------------------------------------------------------------------------------------- DDP / FSDP
def ddp_strategy(find_unused_parameters: bool = False, static_graph: bool = False,
                 gradient_as_bucket_view: bool = True, timeout_minutes: float = 30,
                 process_group_backend: str | None = None):
    """DDP; processes come from torchrun/srun (or Lightning's own launcher in a single, non-multirun job)."""
    return DDPStrategy(find_unused_parameters=find_unused_parameters, static_graph=static_graph,
                       gradient_as_bucket_view=gradient_as_bucket_view, timeout=timedelta(minutes=timeout_minutes),
                       process_group_backend=process_group_backend)


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full", cpu_offload: bool = False,
                  auto_wrap_min_params: int | None = 100_000, timeout_minutes: float = 30,
                  process_group_backend: str | None = None):
    """FSDP. `state_dict_type=full` writes ordinary one-file checkpoints (rank 0 gathers the weights)."""
    import functools

    policy = None
    if auto_wrap_min_params:
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        policy = functools.partial(size_based_auto_wrap_policy, min_num_params=int(auto_wrap_min_params))
    return FSDPStrategy(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, cpu_offload=cpu_offload,
                        auto_wrap_policy=policy, timeout=timedelta(minutes=timeout_minutes),
                        process_group_backend=process_group_backend)


# ----------------------------------------------------------------------------------------------- DeepSpeed
def ensure_torch_extensions_dir() -> str:
    """DeepSpeed compiles C++ ops on first use (on CPU: a shared-memory comm op, ~30 s); cache them under
    $LSTI_CACHE_DIR/torch_extensions unless TORCH_EXTENSIONS_DIR is already set."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from training.paths import cache_dir

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir("torch_extensions"))
    return os.environ["TORCH_EXTENSIONS_DIR"]


def deepspeed_config(
    stage: int = 2,
    offload_optimizer: str | None = None,
    offload_parameters: str | None = None,
    nvme_path: str = "/local_nvme",
    pin_memory: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int = 200_000_000,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    reduce_scatter: bool = True,
    sub_group_size: int = 1_000_000_000,
    stage3_prefetch_bucket_size: int = 50_000_000,
    stage3_param_persistence_threshold: int = 100_000,
    stage3_max_live_parameters: int = 1_000_000_000,
    stage3_max_reuse_distance: int = 1_000_000_000,
    stage3_gather_16bit_weights_on_model_save: bool = False,
) -> dict:
    """The DeepSpeed JSON (as a dict) for a ZeRO stage. Precision, gradient accumulation, gradient clipping and
    the micro-batch size are left out on purpose: Lightning fills them in from the Trainer."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"strategy.stage={stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3.")
    for name, value in (("offload_optimizer", offload_optimizer), ("offload_parameters", offload_parameters)):
        if value not in _OFFLOAD_TARGETS:
            raise ValueError(f"strategy.{name}={value!r}: use null, cpu or nvme.")
    offload_optimizer = None if offload_optimizer == "none" else offload_optimizer
    offload_parameters = None if offload_parameters == "none" else offload_parameters
    if offload_optimizer and stage < 1:
        raise ValueError("strategy.offload_optimizer needs ZeRO stage >= 1.")
    if offload_parameters and stage != 3:
        raise ValueError("strategy.offload_parameters needs ZeRO stage 3 (parameters are only partitioned there).")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": contiguous_gradients,
        "allgather_partitions": True,
        "allgather_bucket_size": int(allgather_bucket_size),
        "reduce_scatter": reduce_scatter,
        "reduce_bucket_size": int(reduce_bucket_size),
    }
    if stage == 3:
        zero.update({
            "sub_group_size": int(sub_group_size),
            "stage3_prefetch_bucket_size": int(stage3_prefetch_bucket_size),
            "stage3_param_persistence_threshold": int(stage3_param_persistence_threshold),
            "stage3_max_live_parameters": int(stage3_max_live_parameters),
            "stage3_max_reuse_distance": int(stage3_max_reuse_distance),
            "stage3_gather_16bit_weights_on_model_save": stage3_gather_16bit_weights_on_model_save,
        })
    if offload_optimizer:
        # The module's torch AdamW then steps the offloaded fp32 partitions on the CPU (DeepSpeed refuses a
        # client optimizer with offload unless told so; its DeepSpeedCPUAdam would be faster, see distributed.md).
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": pin_memory}
        if offload_optimizer == "nvme":
            zero["offload_optimizer"].update({"nvme_path": nvme_path, "buffer_count": 4})
    if offload_parameters:
        zero["offload_param"] = {"device": offload_parameters, "pin_memory": pin_memory}
        if offload_parameters == "nvme":
            zero["offload_param"].update({"nvme_path": nvme_path, "buffer_count": 5, "buffer_size": 100_000_000,
                                          "max_in_cpu": 1_000_000_000})
    config: dict[str, Any] = {"zero_optimization": zero, "zero_allow_untested_optimizer": True}
    if offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    if "nvme" in (offload_optimizer, offload_parameters):
        config["aio"] = {"block_size": 1_048_576, "queue_depth": 8, "single_submit": False,
                         "overlap_events": True, "thread_count": 1}
    return config


def load_deepspeed_json(path: str | Path) -> dict:
    """An explicit DeepSpeed JSON. Gradient accumulation comes from trainer.accumulate_grad_batches, so the file
    must not set it (an "auto" value is dropped); precision sections are honoured (`precision_for_strategy`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"strategy.config_file={path}: no such file (an absolute path, or relative to the "
                                f"directory you launched from: {os.getcwd()}).")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"strategy.config_file={p} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"strategy.config_file={p} must hold a JSON object.")
    for key in ("gradient_accumulation_steps", "train_batch_size"):
        if key in config:
            if config[key] != "auto":
                raise ValueError(f"{p}: remove {key!r} (it is set from trainer.accumulate_grad_batches and "
                                 "data.batch_size) or set it to \"auto\".")
            del config[key]
    if config.get("train_micro_batch_size_per_gpu") == "auto":
        del config["train_micro_batch_size_per_gpu"]
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def deepspeed_strategy(
    accelerator: str | None = "auto",
    stage: int = 2,
    config_file: str | None = None,
    timeout_minutes: float = 30,
    logging_level: str = "WARN",
    load_full_weights: bool = False,
    process_group_backend: str | None = None,
    micro_batch_size: int | None = None,
    **zero: Any,
):
    """A DeepSpeed strategy from `conf/strategy/deepspeed_*.yaml`: `CPUDeepSpeedStrategy` when the accelerator is
    the CPU, Lightning's `DeepSpeedStrategy` otherwise. `config_file` (a DeepSpeed JSON) replaces the ZeRO settings.
    """
    ensure_torch_extensions_dir()
    config = load_deepspeed_json(config_file) if config_file else deepspeed_config(stage=stage, **zero)
    if micro_batch_size:  # only for DeepSpeed's throughput logging; the data module makes the batches
        config.setdefault("train_micro_batch_size_per_gpu", int(micro_batch_size))
    cls = DeepSpeedStrategy if on_gpu(accelerator) else CPUDeepSpeedStrategy
    level = logging.getLevelName(str(logging_level).upper()) if isinstance(logging_level, str) else logging_level
    return cls(config=config, timeout=timedelta(minutes=timeout_minutes), logging_level=level,
               load_full_weights=load_full_weights, process_group_backend=process_group_backend)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, usable on CPU (gloo) for dry runs and CI.

    Lightning assumes CUDA in three places; this subclass changes exactly those:
    1. `setup_environment` refuses non-CUDA accelerators -> run DDP's environment set-up instead.
    2. `setup_distributed` validates device indices (CPU devices have index None) -> skipped.
    3. `deepspeed.initialize(args=Namespace(device_rank=root_device.index))` gets None on CPU, which DeepSpeed's
       engine cannot use -> the local rank is passed as the device rank.
    Everything else (ZeRO partitioning, checkpoint format, resume) is DeepSpeed's own code path.
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
            dist_init_required=False)
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        import deepspeed

        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config.update({
                "zero_allow_untested_optimizer": self.config.get("zero_allow_untested_optimizer", True),
                "zero_optimization": self.config["zero_optimization"],
            })
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=inference_config, model=model,
            optimizer=None, lr_scheduler=None, model_parameters=[], dist_init_required=False)
