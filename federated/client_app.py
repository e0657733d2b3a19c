"""The Flower ClientApp (Message API): local training and evaluation on one client's users.

`app = ClientApp()` with `@app.train()` / `@app.evaluate()`. One app serves every configuration; the
switches live in the messages the server sends:

* central DP: `fixedclipping_mod` runs only when the train config carries the clipping norm (the
  server's `DifferentialPrivacyClientSideFixedClipping` puts it there). It is registered on the train
  handler only: Flower's clipping mod rejects evaluate messages.
* local DP: `LocalDpMod` built from the `local-dp-*` keys of the train config, when present.
* SecAgg+: `secaggplus_mod` handles the SecAgg+ stages when a message carries its configs (the
  server's `SecAggPlusWorkflow`, older API); the model-training stage then arrives in the legacy
  `fitins` format and is answered as `fitres`, both handled by the same train function.

Per-user parameters (`private_patterns`) live in `context.state` (an ArrayRecord under `private`)
between rounds and, when `client_state_dir` is set, in a file only this client writes (for resuming a
simulation). They are never put in a reply; raw sequences never leave either.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

from federated import task

log = logging.getLogger("federated.client")

PRIVATE_KEY = "private"
CLIENT_KEY = "client"
KEY_CLIPPING_NORM = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM
LEGACY_PARAMS, LEGACY_CONFIG = "fitins.parameters", "fitins.config"


class InjectedFailure(RuntimeError):
    """Raised on purpose (federated.failure.probability) to exercise the server's fault tolerance."""


# ---------------------------------------------------------------------------------------------- mods
def dp_clipping_switch(msg: Message, ctxt: Context, call_next):
    """fixedclipping_mod when the server asked for central-DP clipping, else a pass-through."""
    content = msg.content
    if ("arrays" in content.array_records and "config" in content.config_records
            and KEY_CLIPPING_NORM in content.config_records["config"]):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def local_dp_switch(msg: Message, ctxt: Context, call_next):
    """LocalDpMod with the settings the server sent (`local-dp-*`), else a pass-through."""
    cfg = msg.content.config_records.get("config")
    if cfg is not None and "local-dp-epsilon" in cfg and "arrays" in msg.content.array_records:
        mod = LocalDpMod(clipping_norm=float(cfg["local-dp-clipping-norm"]),
                         sensitivity=float(cfg["local-dp-sensitivity"]), epsilon=float(cfg["local-dp-epsilon"]),
                         delta=float(cfg["local-dp-delta"]))
        return mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secagg_switch(msg: Message, ctxt: Context, call_next):
    """secaggplus_mod for SecAgg+ rounds (their messages carry its config record), else a pass-through."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp()


# ---------------------------------------------------------------------------------------------- helpers
def _partition_id(context: Context) -> int:
    node_config = context.node_config or {}
    if "partition-id" not in node_config:
        raise task.FederatedConfigError(
            "this SuperNode has no node_config 'partition-id': start it with --node-config "
            "\"partition-id=<i> num-partitions=<n>\" (simulation sets it for every virtual node).")
    return int(node_config["partition-id"])


def _maybe_fail(spec: dict, server_round: int, partition_id: int, phase: str) -> None:
    failure = spec.get("failure") or {}
    p = float(failure.get("probability", 0.0) or 0.0)
    forced = partition_id in set(failure.get("partitions") or []) and phase in failure.get("phases", ["train"])
    rng = np.random.default_rng([int(failure.get("seed", 0)), int(server_round), int(partition_id),
                                 0 if phase == "train" else 1])
    if forced or (p > 0 and rng.random() < p):
        if failure.get("mode", "error") == "delay":
            time.sleep(float(failure.get("delay_s", 0.0)))
            return
        raise InjectedFailure(f"injected {phase} failure on partition {partition_id} in round {server_round}")


def _state_file(spec: dict, partition_id: int) -> Path | None:
    d = spec.get("client_state_dir")
    return Path(d) / f"client_{partition_id:05d}.pt" if d else None


def _restore_private(module, names: list[str], context: Context, spec: dict, partition_id: int) -> int:
    """Put this client's private parameters back; returns how many rounds it has trained before."""
    if not names:
        return int(context.state.config_records.get(CLIENT_KEY, ConfigRecord({"rounds": 0}))["rounds"])
    if PRIVATE_KEY not in context.state.array_records:
        path = _state_file(spec, partition_id)
        if path is not None and path.exists():  # a resumed simulation: reload what this client wrote
            saved = torch.load(path, map_location="cpu", weights_only=True)
            context.state.array_records[PRIVATE_KEY] = ArrayRecord(
                {k: Array(v.numpy()) for k, v in saved["private"].items()})
            context.state.config_records[CLIENT_KEY] = ConfigRecord({"rounds": int(saved["rounds"])})
    if PRIVATE_KEY in context.state.array_records:
        record = context.state.array_records[PRIVATE_KEY]
        task.set_params(module, {k: record[k].numpy() for k in names if k in record})
    return int(context.state.config_records.get(CLIENT_KEY, ConfigRecord({"rounds": 0}))["rounds"])


def _store_private(module, names: list[str], context: Context, spec: dict, partition_id: int, rounds: int) -> None:
    values = task.get_params(module, names)
    context.state.array_records[PRIVATE_KEY] = ArrayRecord({k: Array(v) for k, v in values.items()})
    context.state.config_records[CLIENT_KEY] = ConfigRecord({"rounds": rounds})
    path = _state_file(spec, partition_id)
    if path is not None and names:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"private": {k: torch.from_numpy(v) for k, v in values.items()}, "rounds": rounds}, tmp)
        tmp.replace(path)


def _read_train_message(msg: Message) -> tuple[dict[str, np.ndarray], ConfigRecord, bool]:
    """(named arrays, config, legacy?) from a Message-API train message or a legacy `fitins` one."""
    content = msg.content
    if LEGACY_PARAMS in content.array_records:
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        fitins = compat.recorddict_to_fitins(content, keep_input=True)
        cfg = ConfigRecord(dict(fitins.config))
        names = json.loads(cfg["param-names"])
        arrays = parameters_to_ndarrays(fitins.parameters)
        if len(names) != len(arrays):
            raise task.FederatedConfigError(f"received {len(arrays)} arrays for {len(names)} parameter names.")
        return dict(zip(names, arrays)), cfg, True
    record = content.array_records["arrays"]
    return {k: record[k].numpy() for k in record.keys()}, content.config_records["config"], False


def _setup(config: ConfigRecord, context: Context, phase: str):
    spec = json.loads(config["spec"])
    server_round = int(config.get("server-round", 0))
    pid = _partition_id(context)
    _maybe_fail(spec, server_round, pid, phase)
    cd = task.client_data(spec, pid)
    module = task.client_module(spec, cd)
    return spec, server_round, pid, cd, module


# ---------------------------------------------------------------------------------------------- handlers
@app.train(mods=[secagg_switch, local_dp_switch, dp_clipping_switch])
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    arrays, config, legacy = _read_train_message(msg)
    spec, server_round, pid, cd, module = _setup(config, context, "train")
    names = list(arrays)
    private = task.private_names(module, spec)
    rounds = _restore_private(module, private, context, spec, pid)
    task.set_params(module, arrays)  # the global shared parameters
    stats = task.train_local(module, cd, spec, server_round, proximal_mu=float(config.get("proximal-mu", 0.0)),
                             anchor_names=names)
    _store_private(module, private, context, spec, pid, rounds + 1)
    updated = task.get_params(module, names)  # exactly the keys received: nothing private goes out
    metrics = {"num-examples": cd.num_targets, "unit-weight": 1, "partition-id": pid,
               "train-loss": stats["train-loss"], "steps": stats["steps"], "seconds": time.perf_counter() - t0}
    if legacy:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        fitres = FitRes(status=Status(code=Code.OK, message="ok"),
                        parameters=ndarrays_to_parameters([updated[n] for n in names]),
                        num_examples=cd.num_targets, metrics=metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord({n: Array(updated[n]) for n in names}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    record = msg.content.array_records["arrays"]
    config = msg.content.config_records["config"]
    spec, server_round, pid, cd, module = _setup(config, context, "evaluate")
    _restore_private(module, task.private_names(module, spec), context, spec, pid)
    task.set_params(module, {k: record[k].numpy() for k in record.keys()})
    split = spec.get("client_eval_split", "test")
    results = task.evaluate(module, cd.test if split == "test" else cd.valid, "client")
    head = task.headline(results, "client")
    metrics = {k: v for k, v in head.items() if k != "num_queries"}
    metrics.update({"num-queries": int(head.get("num_queries", 0)), "num-examples": int(head.get("num_queries", 0)),
                    "unit-weight": 1, "partition-id": pid, "seconds": time.perf_counter() - t0})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
