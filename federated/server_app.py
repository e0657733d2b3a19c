"""The Flower ServerApp (Message API): rounds, aggregation, evaluation, accounting, logging, resume.

`app = ServerApp()` with `@app.main()` reads its Hydra overrides from the run config (`flwr run`,
SuperLink); `make_app(cfg)` binds an already composed config (`python -m federated.simulate`). Both run
`run_server`, one loop over rounds that drives a strategy from `flwr.serverapp.strategy`
(FedAvg / FedProx / FedAdam / FedYogi, optionally wrapped for central DP) through its
`configure_*`/`aggregate_*` methods, rather than `Strategy.start`, so that each round can:

* drop failed / timed-out clients and aggregate what arrived when at least `min_train_clients` did;
* run federated evaluation (clients' own held-out items, weighted by query count) and centralized
  evaluation of the global model on the test split (LitRecommender's evaluation);
* count bytes sent / received per client (`flwr` record sizes, through `CountingGrid`);
* compose the round in the privacy accountant;
* append a row to `rounds.csv` (one per round) and `clients.csv` (one per client and phase), save a
  resumable state (`server_state/`: global parameters, round, strategy and accountant state; clients
  keep their own state files) and redraw `ndcg_per_round.png`.

With `federated.secure_aggregation=true` the training step of each round is Flower's older
`SecAggPlusWorkflow` over a legacy strategy instead (see `_SecAggRound`); evaluation is unchanged.
At the end: `metrics.json` (same keys as training: `val/...`, `test/...`) and `global_model.ckpt`, a
checkpoint `training.checkpoints.load_module` (and so training.evaluate / serving) reads.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fl_strategy
from omegaconf import DictConfig, OmegaConf

from federated import privacy, task

log = logging.getLogger("federated.server")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")
HEADLINE = ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20")


# ---------------------------------------------------------------------------------------------- config
def compose_config(overrides: list[str] | str | None = None) -> DictConfig:
    """conf/simulate.yaml with Hydra overrides, outside a Hydra main (flwr run / SuperLink)."""
    from hydra import compose, initialize_config_dir

    if isinstance(overrides, str):
        overrides = overrides.split()
    overrides = list(overrides or [])
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides.append(f"paths.output_dir={Path('outputs/flwr') / time.strftime('%Y-%m-%d_%H-%M-%S')}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="simulate", overrides=overrides)


def resolve_num_clients(cfg: DictConfig) -> int:
    """Number of clients (SuperNodes): the config's, or what natural/grouped partitioning makes."""
    from federated.partition import PartitionConfig, num_partitions

    part = PartitionConfig(**OmegaConf.to_container(cfg.federated.partition, resolve=True))
    if part.scheme in ("natural", "grouped"):
        dm = task.datamodule({"data": OmegaConf.to_container(cfg.data, resolve=True)})
        return num_partitions(part, None, dm.prepare().num_users)
    return int(cfg.federated.num_clients)


# ---------------------------------------------------------------------------------------------- bytes
def content_bytes(msg: Message) -> int:
    """Payload bytes of a message (array data, config and metric values, keys), as Flower counts them."""
    if not msg.has_content():
        return 0
    return int(sum(_record_bytes(record) for record in msg.content.values()))


def _record_bytes(record) -> int:
    try:
        return int(record.count_bytes())
    except IndexError:  # flwr's ConfigRecord.count_bytes fails on empty lists (SecAgg+ sends some)
        total = 0
        for k, v in record.items():
            values = v if isinstance(v, list) else [v]
            total += len(k) + sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in values)
        return total


class CountingGrid:
    """A Grid proxy that counts the content bytes of every message to / from each node."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def take(self) -> tuple[dict[int, int], dict[int, int]]:
        down, up = dict(self.down), dict(self.up)
        self.down.clear()
        self.up.clear()
        return down, up

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] += content_bytes(m)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        for r in replies:
            self.up[r.metadata.src_node_id] += content_bytes(r)
        return replies

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] += content_bytes(m)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            self.up[r.metadata.src_node_id] += content_bytes(r)
        return replies


# ---------------------------------------------------------------------------------------------- strategy
def build_strategy(fed: DictConfig, dp: privacy.DPSettings, num_clients: int):
    s = fed.strategy
    name = str(s.name).lower()
    if name not in STRATEGIES:
        raise task.FederatedConfigError(f"federated.strategy.name={s.name!r}: use one of {', '.join(STRATEGIES)}.")
    min_available = int(s.min_available_clients or num_clients)
    common = dict(fraction_train=float(s.fraction_train), fraction_evaluate=float(s.fraction_evaluate),
                  min_train_nodes=int(s.min_train_clients), min_evaluate_nodes=int(s.min_evaluate_clients),
                  min_available_nodes=min(min_available, num_clients),
                  # central DP calibrates noise to a plain average of clipped updates
                  weighted_by_key="unit-weight" if (dp.central or not s.weighted) else "num-examples")
    if name == "fedavg":
        base = fl_strategy.FedAvg(**common)
    elif name == "fedavgm":  # server SGD with momentum on the averaged update (Hsu et al., 2019)
        base = fl_strategy.FedAvgM(**common, server_learning_rate=float(s.server_lr),
                                   server_momentum=float(s.server_momentum))
    elif name == "fedprox":
        base = fl_strategy.FedProx(**common, proximal_mu=float(s.proximal_mu))
    else:
        cls = fl_strategy.FedAdam if name == "fedadam" else fl_strategy.FedYogi
        base = cls(**common, eta=float(s.eta), eta_l=float(s.eta_l), beta_1=float(s.beta_1),
                   beta_2=float(s.beta_2), tau=float(s.tau))
    if dp.central:
        sampled = max(int(num_clients * float(s.fraction_train)), int(s.min_train_clients))
        return privacy.RobustClientSideFixedClipping(base, noise_multiplier=float(dp.noise_multiplier),
                                                     clipping_norm=float(dp.clipping_norm),
                                                     num_sampled_clients=sampled)
    return base


def _base(strategy):
    return getattr(strategy, "strategy", strategy)


_OPT_STATE = ("m_t", "v_t", "momentum_vector")  # FedAdam/FedYogi moments (dicts), FedAvgM momentum (a list)


def strategy_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The server optimiser's state as {attribute: {name: array}} (lists keyed by position)."""
    base = _base(strategy)
    state = {}
    for k in _OPT_STATE:
        value = getattr(base, k, None)
        if value:
            state[k] = dict(value) if isinstance(value, dict) else {str(i): a for i, a in enumerate(value)}
    return state


def load_strategy_state(strategy, state: dict) -> None:
    base = _base(strategy)
    for k, v in state.items():
        if k == "momentum_vector":  # FedAvgM keeps a list, saved keyed by position
            setattr(base, k, [np.asarray(v[str(i)]) for i in range(len(v))])
        else:
            setattr(base, k, {n: np.asarray(a) for n, a in v.items()})


# ---------------------------------------------------------------------------------------------- records
class Recorder:
    """rounds.csv / clients.csv (appended, header once), the per-round plot."""

    def __init__(self, run_dir: Path, resume: bool):
        self.run_dir = run_dir
        self.rounds_path, self.clients_path = run_dir / "rounds.csv", run_dir / "clients.csv"
        self.rows: list[dict] = []
        if resume and self.rounds_path.exists():
            with self.rounds_path.open() as f:
                self.rows = list(csv.DictReader(f))
        elif not resume:
            for p in (self.rounds_path, self.clients_path):
                p.unlink(missing_ok=True)

    def truncate(self, last_round: int) -> None:
        """On resume, forget rows of rounds after the last saved state (they will be redone)."""
        self.rows = [r for r in self.rows if int(r["round"]) <= last_round]
        self._rewrite(self.rounds_path, self.rows)
        if self.clients_path.exists():
            with self.clients_path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["round"]) <= last_round]
            self._rewrite(self.clients_path, rows)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        if not rows:
            path.unlink(missing_ok=True)
            return
        keys = list(rows[0].keys())
        for r in rows:
            keys += [k for k in r if k not in keys]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def _append(self, path: Path, rows: list[dict]) -> None:
        if not rows:
            return
        existing = []
        if path.exists():
            with path.open() as f:
                existing = list(csv.DictReader(f))
        self._rewrite(path, existing + [{k: _fmt(v) for k, v in r.items()} for r in rows])

    def round(self, row: dict) -> None:
        self.rows.append({k: _fmt(v) for k, v in row.items()})
        self._append(self.rounds_path, [row])

    def clients(self, rows: list[dict]) -> None:
        self._append(self.clients_path, rows)

    def plot(self, reference: dict[str, float] | None = None) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("test/ndcg@10", "global model, test (centralized eval)"),
                           ("fed/ndcg@10", "clients' held-out items (federated eval)")):
            pts = [(int(r["round"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "", "nan")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        for name, value in (reference or {}).items():
            ax.axhline(value, linestyle="--", color="grey")
            ax.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
        ax.set_xlabel("round")
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.run_dir / "ndcg_per_round.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else (repr(v) if math.isinf(v) else f"{v:.10g}")
    return v


# ---------------------------------------------------------------------------------------------- resume
def save_state(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], strategy, accountant,
               node_partition: dict[int, int]) -> None:
    d = run_dir / "server_state"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.tmp"
    torch.save({"round": server_round, "arrays": {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()},
                "strategy": {k: {n: torch.from_numpy(np.asarray(a)) for n, a in v.items()}
                             for k, v in strategy_state(strategy).items()},
                "accountant": accountant.state_dict() if accountant else None,
                "node_partition": dict(node_partition), "python_random": random.getstate()}, tmp)
    tmp.replace(d / "state.pt")


def load_state(run_dir: Path) -> dict | None:
    path = run_dir / "server_state" / "state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- rounds
def _replies_table(replies: list[Message], sampled: list[int], phase: str, server_round: int,
                   node_partition: dict[int, int], down: dict, up: dict) -> tuple[list[Message], list[dict]]:
    ok, rows = [], []
    by_node = {r.metadata.src_node_id: r for r in replies}
    for node in sampled:
        r = by_node.get(node)
        row = {"round": server_round, "phase": phase, "node_id": node, "bytes_down": down.get(node, 0),
               "bytes_up": up.get(node, 0)}
        if r is None:
            row.update(status="timeout", partition=node_partition.get(node, ""))
        elif r.has_error():
            row.update(status="error", partition=node_partition.get(node, ""), error=str(r.error.reason)[:300])
        else:
            m = next(iter(r.content.metric_records.values()))
            node_partition[node] = int(m.get("partition-id", -1))
            row.update(status="ok", partition=node_partition[node],
                       **{k: float(v) for k, v in m.items() if k != "partition-id" and not isinstance(v, list)})
            ok.append(r)
        rows.append(row)
    for row in rows:
        if row["status"] != "ok":
            log.warning("round %d %s: client node %s (partition %s) %s %s", server_round, phase, row["node_id"],
                        row["partition"], row["status"], row.get("error", ""))
    return ok, rows


def _weighted_metrics(replies: list[Message], weight_key: str) -> dict[str, float]:
    sums, total = defaultdict(float), 0.0
    for r in replies:
        m = next(iter(r.content.metric_records.values()))
        w = float(m.get(weight_key, 0))
        total += w
        for k, v in m.items():
            if k not in ("partition-id", weight_key) and not isinstance(v, list):
                sums[k] += w * float(v)
    return {k: v / total for k, v in sums.items()} if total > 0 else {}


def _to_record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


class _SecAggRound:
    """One SecAgg+ training round through Flower's older API (the only one that has SecAgg+)."""

    def __init__(self, grid: CountingGrid, context: Context, fed: DictConfig, names: list[str],
                 num_clients: int, train_config: dict, max_weight: float):
        from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import SecAggPlusWorkflow

        name = str(fed.strategy.name).lower()
        if name not in ("fedavg", "fedprox"):
            raise task.FederatedConfigError(f"federated.secure_aggregation=true supports strategy fedavg or fedprox, "
                                            f"not {name!r} (SecAgg+ returns only the weighted average).")
        s, sa = fed.strategy, fed.secagg
        names_json = json.dumps(names)
        self.last: dict = {}
        outer = self

        class Recording(LegacyFedAvg):
            def aggregate_fit(self, server_round, results, failures):
                outer.last = {"results": [(p.node_id, r) for p, r in results], "failures": failures}
                if len(results) < int(s.min_train_clients):
                    return None, {}
                return super().aggregate_fit(server_round, results, failures)

        config = dict(train_config, **{"param-names": names_json})
        if name == "fedprox":
            config["proximal-mu"] = float(s.proximal_mu)
        min_available = min(int(s.min_available_clients or num_clients), num_clients)
        self.strategy = Recording(fraction_fit=float(s.fraction_train), fraction_evaluate=0.0,
                                  min_fit_clients=int(s.min_train_clients), min_available_clients=min_available,
                                  on_fit_config_fn=lambda rnd: dict(config, **{"server-round": rnd}),
                                  accept_failures=True)
        self.context = LegacyContext(context, config=ServerConfig(num_rounds=int(fed.num_rounds)),
                                     strategy=self.strategy, client_manager=SimpleClientManager())
        self.grid, self.names = grid, names
        self.thread, self.f_stop, done = start_update_client_manager_thread(grid, self.context.client_manager)
        done.wait()
        self.workflow = SecAggPlusWorkflow(
            num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
            max_weight=float(max_weight), clipping_range=float(sa.clipping_range),
            quantization_range=int(sa.quantization_range), timeout=float(fed.round_timeout))

    def __call__(self, server_round: int, values: dict[str, np.ndarray]):
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round,
                                                                  Key.START_TIME: time.time()})
        before = compat.parameters_to_arrayrecord(ndarrays_to_parameters([values[n] for n in self.names]), True)
        state.array_records[MAIN_PARAMS_RECORD] = before
        self.last = {}
        self.workflow(self.grid, self.context)
        after = state.array_records[MAIN_PARAMS_RECORD]
        new = None
        if after is not before:
            arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
            new = dict(zip(self.names, arrays))
        return new, self.last

    def close(self) -> None:
        self.f_stop.set()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- main loop
def run_server(grid: Grid, context: Context, cfg: DictConfig) -> dict[str, float]:
    fed = cfg.federated
    run_dir = Path(cfg.paths.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    num_clients = resolve_num_clients(cfg)
    dp = privacy.validate_dp(OmegaConf.to_container(fed.dp, resolve=True), num_clients, str(fed.strategy.name),
                             bool(fed.secure_aggregation))
    client_state_dir = fed.client_state_dir or str(run_dir / "client_state")
    spec = task.make_spec(cfg, num_clients, client_state_dir)
    spec_str = task.spec_to_str(spec)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    if OmegaConf.select(cfg, "paths") is not None:
        OmegaConf.save(cfg, run_dir / "simulate_config.yaml", resolve=True)

    t_setup = time.perf_counter()
    model = task.GlobalModel(spec)
    parts = task.partitions(spec)
    from federated.partition import describe

    log.info("federation: %s", describe(list(parts), task.datamodule(spec).prepare()))
    log.info("shared parameters: %d tensors, %s values; private: %s", len(model.names),
             f"{sum(int(np.prod(v.shape)) for v in model.initial().values()):,}",
             task.private_names(model.module, spec) or "none")

    strategy = build_strategy(fed, dp, num_clients)
    accountant = privacy.ClientLevelAccountant(dp.noise_multiplier, dp.delta) if dp.central else None
    counting = CountingGrid(grid)
    resume = bool(fed.resume)
    recorder = Recorder(run_dir, resume)
    values = model.initial()
    node_partition: dict[int, int] = {}
    start = 1
    saved = load_state(run_dir) if resume else None
    random.seed(int(cfg.seed))
    if saved is not None:
        start = int(saved["round"]) + 1
        values = {k: v.numpy() for k, v in saved["arrays"].items()}
        if list(values) != model.names:
            raise task.FederatedConfigError(f"{run_dir}/server_state was saved with other shared parameters; "
                                            "resume with the run's own config.")
        load_strategy_state(strategy, {k: {n: a.numpy() for n, a in v.items()} for k, v in saved["strategy"].items()})
        if accountant and saved.get("accountant"):
            accountant.load_state_dict(saved["accountant"])
        node_partition.update(saved.get("node_partition") or {})
        random.setstate(saved["python_random"])
        recorder.truncate(int(saved["round"]))
        log.info("resuming %s after round %d", run_dir, start - 1)
    elif resume:
        log.info("federated.resume=true but %s has no server_state: starting at round 1", run_dir)
        recorder.truncate(-1)

    train_cfg: dict = {"spec": spec_str}
    if dp.local:
        train_cfg.update({"local-dp-epsilon": dp.local_epsilon, "local-dp-delta": dp.local_delta,
                          "local-dp-sensitivity": dp.local_sensitivity,
                          "local-dp-clipping-norm": dp.local_clipping_norm})
    eval_cfg = {"spec": spec_str}
    timeout = float(fed.round_timeout)
    min_train = int(fed.strategy.min_train_clients)
    secagg = None
    if fed.secure_aggregation:
        max_weight = fed.secagg.max_weight or max(task.client_data(spec, i).num_targets for i in range(len(parts)))
        secagg = _SecAggRound(counting, context, fed, model.names, num_clients, train_cfg, max_weight)
    central_split = str(fed.evaluation.central_split)
    log.info("server setup %.1fs", time.perf_counter() - t_setup)

    if start == 1 and fed.evaluation.centralized:
        m0 = model.evaluate(values, central_split)
        prefix = "val" if central_split == "valid" else central_split
        recorder.round({"round": 0, **{f"{prefix}/{k}": m0.get(f"{prefix}/{k}", float("nan")) for k in HEADLINE}})

    try:
        for rnd in range(start, int(fed.num_rounds) + 1):
            t0 = time.perf_counter()
            row: dict = {"round": rnd}
            client_rows: list[dict] = []
            # ------------------------------------------------------------ training
            if secagg is not None:
                new, info = secagg(rnd, values)
                down, up = counting.take()
                results = info.get("results", [])
                ok_nodes = {nid for nid, _ in results}
                for nid, fitres in results:
                    node_partition[nid] = int(fitres.metrics.get("partition-id", -1))
                sampled = sorted(set(down))
                for nid in sampled:
                    status = "ok" if nid in ok_nodes else "error"
                    r = {"round": rnd, "phase": "train", "node_id": nid, "status": status,
                         "partition": node_partition.get(nid, ""), "bytes_down": down.get(nid, 0),
                         "bytes_up": up.get(nid, 0)}
                    r.update({k: float(v) for k, v in dict(next((f.metrics for n, f in results if n == nid), {})).items()
                              if k != "partition-id"})
                    client_rows.append(r)
                n_ok = len(ok_nodes)
                train_metrics = {"train-loss": _mean([float(f.metrics.get("train-loss", float("nan")))
                                                      for _, f in results])}
            else:
                msgs = list(strategy.configure_train(rnd, _to_record(values), ConfigRecord(dict(train_cfg)), counting))
                sampled = [m.metadata.dst_node_id for m in msgs]
                replies = counting.send_and_receive(msgs, timeout=timeout) if msgs else []
                down, up = counting.take()
                ok, rows = _replies_table(replies, sampled, "train", rnd, node_partition, down, up)
                client_rows += rows
                n_ok = len(ok)
                new = None
                if n_ok >= min_train:
                    agg, _ = strategy.aggregate_train(rnd, ok)
                    new = _from_record(agg) if agg is not None else None
                else:
                    log.warning("round %d: only %d of %d clients returned updates (< min_train_clients=%d): global "
                                "model unchanged", rnd, n_ok, len(sampled), min_train)
                train_metrics = _weighted_metrics(ok, "num-examples")
            aggregated = new is not None
            if aggregated:
                values = new
            row.update(clients_sampled=len(sampled), clients_ok=n_ok, clients_failed=len(sampled) - n_ok,
                       failed_partitions=" ".join(_who(r) for r in client_rows
                                                  if r["phase"] == "train" and r["status"] != "ok"),
                       aggregated=int(aggregated), train_loss=train_metrics.get("train-loss", float("nan")),
                       bytes_down_train=sum(down.values()), bytes_up_train=sum(up.values()))
            if accountant is not None and aggregated:
                accountant.step(sample_rate=min(1.0, len(sampled) / num_clients))
            if accountant is not None:
                row.update(epsilon=accountant.epsilon(), epsilon_amplified=accountant.epsilon_amplified(),
                           delta=dp.delta, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm)
            if dp.local:
                row.update(local_epsilon_max=dp.local_epsilon * rnd, local_delta_max=dp.local_delta * rnd)
            # ------------------------------------------------------------ federated evaluation
            if fed.evaluation.federated and float(fed.strategy.fraction_evaluate) > 0:
                msgs = list(strategy.configure_evaluate(rnd, _to_record(values), ConfigRecord(dict(eval_cfg)),
                                                        counting))
                sampled_e = [m.metadata.dst_node_id for m in msgs]
                replies = counting.send_and_receive(msgs, timeout=timeout) if msgs else []
                down_e, up_e = counting.take()
                ok_e, rows = _replies_table(replies, sampled_e, "evaluate", rnd, node_partition, down_e, up_e)
                client_rows += rows
                fed_metrics = _weighted_metrics(ok_e, "num-queries")
                row.update({f"fed/{k}": fed_metrics.get(k, float("nan")) for k in HEADLINE})
                row.update(fed_queries=sum(int(next(iter(r.content.metric_records.values()))["num-queries"])
                                           for r in ok_e),
                           eval_clients_ok=len(ok_e), eval_clients_failed=len(sampled_e) - len(ok_e),
                           bytes_down_eval=sum(down_e.values()), bytes_up_eval=sum(up_e.values()))
            # ------------------------------------------------------------ centralized evaluation
            if fed.evaluation.centralized:
                central = model.evaluate(values, central_split)
                prefix = "val" if central_split == "valid" else central_split
                row.update({f"{prefix}/{k}": central.get(f"{prefix}/{k}", float("nan")) for k in HEADLINE})
            row["seconds"] = time.perf_counter() - t0
            recorder.round(row)
            recorder.clients(client_rows)
            save_state(run_dir, rnd, values, strategy, accountant, node_partition)
            recorder.plot()
            log.info("round %d: %s", rnd, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    finally:
        if secagg is not None:
            secagg.close()

    # ---------------------------------------------------------------- final
    results = {}
    for split in model.queries:  # valid, test and, when there are held-out users, cold_users
        results.update(model.evaluate(values, split))
    results = {k: float(v) for k, v in results.items()}
    results["rounds"] = float(fed.num_rounds)
    from training.provenance import run_environment
    from training.report import results_table, write_json_atomic

    write_json_atomic(run_dir / "metrics.json", results)
    write_json_atomic(run_dir / "environment.json", run_environment())  # what a rerun must match to reproduce it
    torch.save(model.checkpoint(values), run_dir / "global_model.ckpt")
    summary = {"num_clients": num_clients, "rounds": int(fed.num_rounds), "mode": spec["mode"],
               "strategy": str(fed.strategy.name), "secure_aggregation": bool(fed.secure_aggregation),
               "shared_tensors": len(model.names),
               "bytes_total": int(sum(float(r.get("bytes_down_train") or 0) + float(r.get("bytes_up_train") or 0)
                                      + float(r.get("bytes_down_eval") or 0) + float(r.get("bytes_up_eval") or 0)
                                      for r in recorder.rows))}
    if accountant is not None:
        summary.update(epsilon=accountant.epsilon(), epsilon_amplified=accountant.epsilon_amplified(),
                       delta=dp.delta, releases=accountant.releases)
    write_json_atomic(run_dir / "summary.json", summary)
    table = "\n\n".join(results_table(results, split) for split in model.queries if split != "valid")
    (run_dir / "results.md").write_text(table + "\n")
    recorder.plot()
    print(f"\n{table}\n\nrun directory: {run_dir}")
    return results


def _who(row: dict) -> str:
    """A failed client: its partition id once it has answered some message, else its node id."""
    return str(row["partition"]) if row.get("partition") not in (None, "") else f"node:{row['node_id']}"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- apps
def make_app(cfg: DictConfig) -> ServerApp:
    """A ServerApp bound to an already composed config (used by federated.simulate)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, context, cfg)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run` / SuperLink entry: run config `overrides` = Hydra overrides of conf/simulate.yaml."""
    run_config = dict(context.run_config or {})
    cfg = compose_config(str(run_config.get("overrides", "") or ""))
    run_server(grid, context, cfg)
