"""Exact resume: whatever a run is killed after, resuming from its last checkpoint ends in the same metrics.

Lightning already checkpoints the weights, optimizer, LR scheduler, step/epoch counters and callback states
(for every strategy; DeepSpeed keeps optimizer shards in its checkpoint directory). Two things are added here:

* the position in the training data: `training.data.datamodule.TrainLoader` is a stateful loader (epoch and
  batches already trained), so a run resumed mid-epoch continues with the next batch of the same order;
* the random number generators (dropout, sampled negatives): `RNGStateCallback` stores every rank's
  torch/CUDA/numpy/python RNG state and puts it back right before the first resumed training step.

`FailAfterSteps` (env `LSTI_FAIL_AFTER_STEPS=N`) kills the process right after the checkpoint of step N, to test
all of this (tests/test_distributed.py) or to rehearse a pre-emption.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)

FAIL_ENV = "LSTI_FAIL_AFTER_STEPS"
FAIL_EXIT_CODE = 75


def _rng_state() -> dict[str, Any]:
    """Plain tensors/ints only, so checkpoints still load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RNGStateCallback(Callback):
    """Saves each rank's RNG state with the checkpoint and restores it before the first resumed training step.

    Ranks draw different random numbers (e.g. a sampled loss draws per target), so every rank's state is kept
    (gathered to rank 0, which writes the checkpoint). All ranks save checkpoints together in Lightning (the
    checkpoint callbacks and the SLURM requeue handler run on every rank), which the gather relies on.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        rank, world = _world()
        states: list[Any] = [_rng_state()]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, _rng_state())
        return {"world_size": world, "states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = _world()
        states = state_dict.get("states") or []
        if not states:
            return
        if state_dict.get("world_size") != world:
            log.warning("resuming with %d processes from a checkpoint written by %s: random streams (dropout) "
                        "continue from rank 0's state, so results will not match an uninterrupted run bit for bit",
                        world, state_dict.get("world_size"))
        self._pending = states[rank] if rank < len(states) else states[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None


class FailAfterSteps(Callback):
    """Exit the process (code 75, no clean-up, like a kill) once `steps` optimizer steps are done and
    checkpointed; it fires at the start of the next training batch, after every checkpoint callback has run."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.strategy.barrier("fail-after-steps")
            print(f"[rank {trainer.global_rank}] {FAIL_ENV}={self.steps}: simulated failure after step "
                  f"{trainer.global_step}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(FAIL_EXIT_CODE)


def _saved_at(path: Path) -> float:
    """When a checkpoint was completed: a ZeRO directory's `latest` file is written last."""
    latest = path / "latest"
    return (latest if latest.is_file() else path).stat().st_mtime


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """`ckpt_path=latest`: the newest checkpoint of this run directory (step-*, last*, best*, hpc_ckpt_*), or None
    (start from scratch) when there is none yet, so one command both starts and resumes a pre-emptible job.
    Anything else is passed to Lightning unchanged ("last", "hpc", a path)."""
    if ckpt_path != "latest":
        return ckpt_path
    out = Path(output_dir)
    found = [p for pattern in ("checkpoints/step-*.ckpt", "checkpoints/last*.ckpt", "checkpoints/best*.ckpt",
                               "hpc_ckpt_*.ckpt")
             for p in out.glob(pattern) if not p.name.endswith("-consolidated.ckpt")]
    found = [p for p in found if p.is_file() or (p / "latest").is_file()]  # complete checkpoints only
    if not found:
        log.info("ckpt_path=latest: no checkpoint in %s yet, starting from scratch", out)
        return None
    newest = max(found, key=_saved_at)
    log.info("ckpt_path=latest: resuming from %s", newest)
    return str(newest)


def resume_callbacks(checkpoint_dir: str, every_n_train_steps: int | None = None) -> list[Callback]:
    """Callbacks train.py adds for resumable runs: RNG state, optional step checkpoints
    (`callbacks.checkpoint.every_n_train_steps`, kept: the latest one, `step-<N>.ckpt`), optional failure."""
    callbacks: list[Callback] = [RNGStateCallback()]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="step-{step}", monitor=None, save_top_k=1,
                                         every_n_train_steps=int(every_n_train_steps), save_last=False,
                                         auto_insert_metric_name=False))
    fail = os.environ.get(FAIL_ENV)
    if fail:
        callbacks.append(FailAfterSteps(int(fail)))
    return callbacks
