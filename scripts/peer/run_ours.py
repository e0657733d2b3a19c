"""`python -m training.train` plus a per-epoch timer; for scripts/peer/compare.py (runs in our venv).

    .venv/bin/python scripts/peer/run_ours.py model=sasrec trainer.max_epochs=2 hydra.run.dir=/tmp/x

Takes exactly training.train's Hydra overrides and runs its `main()` unchanged; the only addition is a
Lightning callback, appended to the trainer's callbacks, that writes `<run dir>/peer_timing.json`:
wall and CPU seconds of each training epoch (from `on_train_epoch_start` to the start of that epoch's
validation, i.e. data loading + forward/backward/optimizer, like RecBole's `_train_epoch`), validation
seconds and val/ndcg@10 per epoch, and the trainable parameter count. Epochs are 0-based, as in RecBole.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import training.train as train_module  # noqa: E402

MONITOR = "val/ndcg@10"


class EpochTimer(Callback):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.train_wall: list[float] = []
        self.train_cpu: list[float] = []
        self.valid_wall: list[float] = []
        self.valid_ndcg: list[float] = []
        self.params = 0
        self._epoch_open = False
        self._w0 = self._c0 = self._v0 = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_open = True
        self._w0, self._c0 = time.perf_counter(), time.process_time()

    def _close_epoch(self) -> None:
        if self._epoch_open:
            self.train_wall.append(time.perf_counter() - self._w0)
            self.train_cpu.append(time.process_time() - self._c0)
            self._epoch_open = False

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._close_epoch()
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.valid_wall.append(time.perf_counter() - self._v0)
        value = trainer.callback_metrics.get(MONITOR)
        self.valid_ndcg.append(float(value) if value is not None else float("nan"))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close_epoch()  # no validation this epoch

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary(), indent=2) + "\n")

    def summary(self) -> dict:
        ndcg = self.valid_ndcg
        best = max(ndcg) if ndcg else None
        return {
            "params": self.params,
            "epochs": len(self.train_wall),
            "s_per_epoch": statistics.median(self.train_wall) if self.train_wall else None,
            "s_per_epoch_mean": statistics.fmean(self.train_wall) if self.train_wall else None,
            "cpu_s_per_epoch": statistics.median(self.train_cpu) if self.train_cpu else None,
            "epoch_train_s": self.train_wall,
            "epoch_train_cpu_s": self.train_cpu,
            "epoch_valid_s": self.valid_wall,
            "valid_ndcg@10": ndcg,
            # ModelCheckpoint keeps the first of equal best scores (strict improvement)
            "best_epoch": ndcg.index(best) if ndcg else None,
            "best_valid_ndcg@10": best,
        }


_build_trainer = train_module.build_trainer


def build_trainer_with_timer(cfg, output_dir, callbacks=None):
    callbacks = list(callbacks or []) + [EpochTimer(Path(output_dir) / "peer_timing.json")]
    return _build_trainer(cfg, output_dir, callbacks)


def main() -> None:
    train_module.build_trainer = build_trainer_with_timer
    # training.train.main, re-decorated with an absolute config path: Hydra resolves train.py's relative
    # "../conf" against the calling module, which is not __main__ when run from here (it would look for a
    # `conf` package)
    task = getattr(train_module.main, "__wrapped__", train_module.main)
    hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")(task)()


if __name__ == "__main__":
    main()
