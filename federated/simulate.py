"""Run a federated simulation in-process: Flower's `run_simulation` with the Ray backend.

    python -m federated.simulate                                            # 10 IID clients, FedAvg
    python -m federated.simulate federated=noniid50 federated.mode=finetune federated.checkpoint=best.ckpt \
        'federated.share_patterns=[encoder\\.blocks\\.1\\.,encoder\\.norm]'
    python -m federated.simulate federated=dp federated.dp.noise_multiplier=1.0
    python -m federated.simulate federated=secagg
    python -m federated.simulate federated.resume=true hydra.run.dir=<run dir>    # continue a run

Writes to the run directory: rounds.csv, clients.csv, ndcg_per_round.png, metrics.json (training's
keys), summary.json, environment.json (`training.provenance`), global_model.ckpt, server_state/ and
client_state/ (for resuming).
"""

from __future__ import annotations

import logging
import os
import time

import hydra
from omegaconf import DictConfig

log = logging.getLogger("federated.simulate")


def backend_config(cfg: DictConfig) -> dict:
    b = cfg.backend
    init_args = {"include_dashboard": False, "logging_level": "ERROR" if not b.verbose else "INFO",
                 "log_to_driver": bool(b.verbose)}
    if b.num_cpus:
        init_args["num_cpus"] = int(b.num_cpus)
    return {"client_resources": {"num_cpus": float(b.client_cpus), "num_gpus": float(b.client_gpus)},
            "init_args": init_args}


def simulate(cfg: DictConfig) -> None:
    from flwr.simulation import run_simulation

    from federated import privacy, task
    from federated.client_app import app as client_app
    from federated.server_app import make_app, resolve_num_clients

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    num_clients = resolve_num_clients(cfg)
    # Fail fast, before Ray starts, on settings the server would reject.
    from omegaconf import OmegaConf

    privacy.validate_dp(OmegaConf.to_container(cfg.federated.dp, resolve=True), num_clients,
                        str(cfg.federated.strategy.name), bool(cfg.federated.secure_aggregation))
    task.make_spec(cfg, num_clients, None)
    t0 = time.perf_counter()
    run_simulation(server_app=make_app(cfg), client_app=client_app, num_supernodes=num_clients,
                   backend_name="ray", backend_config=backend_config(cfg), verbose_logging=bool(cfg.backend.verbose))
    log.info("simulation of %d clients x %d rounds took %.1fs", num_clients, cfg.federated.num_rounds,
             time.perf_counter() - t0)


@hydra.main(version_base="1.3", config_path="../conf", config_name="simulate")
def main(cfg: DictConfig) -> None:
    simulate(cfg)


if __name__ == "__main__":
    main()
