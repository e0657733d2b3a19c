"""Federated learning (federated/*): partitioning, privacy, the client/server apps, a Ray simulation.

Most tests drive the real ServerApp loop (`run_server`) and ClientApp (`federated.client_app.app`)
through `InProcessGrid`, a Grid that hands each message straight to the ClientApp in this process
(a persistent Context per node, exceptions turned into error replies as Flower does), so they take
seconds. One test runs the same apps under `flwr.simulation.run_simulation` with Ray.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_interactions
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from omegaconf import OmegaConf

from federated import privacy, task
from federated.partition import PartitionConfig, PartitionError, partition_users
from training.data.sequences import PreprocessConfig, build_sequences

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

SMALL = [
    "data=synthetic", "data.source.synthetic.num_users=48", "data.source.synthetic.num_items=40",
    "data.source.synthetic.num_groups=4", "data.source.synthetic.mean_length=10", "data.max_len=8",
    "data.eval_batch_size=64",
    "model=lsti", "model.hidden=16", "model.inner=32", "model.layers=1", "model.heads=1", "model.fusion=id",
    "model.user_embedding=true", "model.short_len=3", "model.gate_hidden=8", "model.time_buckets=8",
    "federated.num_clients=3", "federated.num_rounds=2", "federated.local.batch_size=16",
    "backend.num_cpus=2", "backend.client_cpus=1",
]


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a Flower runtime need the ids a SuperLink / simulation would set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def compose(tmp_path: Path, *overrides: str):
    from federated.server_app import compose_config

    return compose_config([*SMALL, f"paths.output_dir={tmp_path}", *overrides])


class InProcessGrid:
    """A Grid that delivers messages to the ClientApp in-process (one persistent Context per node)."""

    def __init__(self, client_app, num_nodes: int):
        self.app = client_app
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i,
                                        node_config={"partition-id": i, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={}) for i in range(num_nodes)}
        self.run = SimpleNamespace(run_id=1)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._next_id = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self._next_id += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._next_id}"  # as the SuperLink would assign
            self.sent.append(msg)
            try:  # a deep copy, as if serialised: mods may edit the incoming content (SecAgg+ does)
                reply = self.app(copy.deepcopy(msg), self.nodes[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - Flower turns ClientApp exceptions into error replies
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.replies.append(reply)
            out.append(reply)
        return out


def run_inprocess(cfg, num_nodes: int = 3) -> tuple[dict, InProcessGrid]:
    from federated.client_app import app as client_app
    from federated.server_app import run_server

    grid = InProcessGrid(client_app, num_nodes)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_server(grid, ctx, cfg), grid


def read_rounds(run_dir: Path) -> list[dict]:
    with (run_dir / "rounds.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- partition
@pytest.fixture(scope="module")
def seqdata():
    return build_sequences(make_interactions(num_users=60, num_items=30, seed=3, min_len=4), PreprocessConfig())


@pytest.mark.parametrize("cfg,n", [({"scheme": "iid"}, 5), ({"scheme": "dirichlet", "alpha": 0.3, "by": "group"}, 4),
                                   ({"scheme": "dirichlet", "alpha": 0.3, "by": "activity"}, 4),
                                   ({"scheme": "natural"}, None), ({"scheme": "grouped", "users_per_client": 25}, None)])
def test_partitions_cover_every_user_once(seqdata, cfg, n):
    parts = partition_users(seqdata, n, {**cfg, "min_partition_size": 1})
    users = np.concatenate(parts)
    assert sorted(users.tolist()) == list(range(seqdata.num_users))
    if cfg["scheme"] == "natural":
        assert len(parts) == seqdata.num_users and all(len(p) == 1 for p in parts)
    if cfg["scheme"] == "grouped":
        assert [len(p) for p in parts] == [25, 25, 10]
    # each client keeps the central leave-one-out split of its users
    local = seqdata.subset_users(parts[0])
    assert np.array_equal(local.train_end, seqdata.train_end[parts[0]])
    assert np.array_equal(local.items[: local.offsets[1]], seqdata.items[seqdata.offsets[parts[0][0]]:
                                                                        seqdata.offsets[parts[0][0] + 1]])


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_is_skewed_and_seeded(seqdata):
    from federated.partition import user_labels

    cfg = PartitionConfig(scheme="dirichlet", by="activity", alpha=0.05, min_partition_size=1, seed=1)
    a, b = partition_users(seqdata, 4, cfg), partition_users(seqdata, 4, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    labels = user_labels(seqdata, None, cfg)
    share = [np.bincount(labels[p], minlength=labels.max() + 1).max() / len(p) for p in a]
    assert np.mean(share) > 0.5  # small alpha: clients dominated by one activity bin
    with pytest.raises(PartitionError, match="scheme"):
        PartitionConfig(scheme="bogus")
    with pytest.raises(PartitionError, match="num_clients"):
        partition_users(seqdata, 1000, {"scheme": "iid"})


# ---------------------------------------------------------------------------------------------- privacy
def test_dp_validation_names_the_setting():
    ok = privacy.validate_dp({"central": True, "noise_multiplier": 1.0, "clipping_norm": 0.5}, num_clients=20)
    assert ok.delta == pytest.approx(0.1 / 20)
    bad = [({"noise_multiplier": -0.1}, "noise_multiplier"), ({"clipping_norm": 0.0}, "clipping_norm"),
           ({"clipping_norm": -1.0}, "clipping_norm"), ({"delta": 0.05}, "delta"), ({"delta": 1.0}, "delta"),
           ({"delta": 0.0}, "delta")]
    for override, name in bad:
        with pytest.raises(privacy.PrivacyConfigError, match=rf"federated\.dp\.{name}="):
            privacy.validate_dp({"central": True, **override}, num_clients=20)
    with pytest.raises(privacy.PrivacyConfigError, match="strategy"):
        privacy.validate_dp({"central": True}, num_clients=20, strategy="fedadam")
    with pytest.raises(privacy.PrivacyConfigError, match="local_epsilon"):
        privacy.validate_dp({"local": True, "local_epsilon": 0}, num_clients=20)
    with pytest.raises(privacy.PrivacyConfigError, match="unknown"):
        privacy.validate_dp({"noise": 1.0}, num_clients=20)
    # DP off: the central settings are not checked
    privacy.validate_dp({"central": False, "noise_multiplier": -1}, num_clients=20)


def test_neighbour_distillation_is_refused(tmp_path):
    cfg = compose(tmp_path, "++loss.neighbour_distill=0.5")
    with pytest.raises(task.FederatedConfigError, match="loss.neighbour_distill"):
        task.make_spec(cfg, 3, str(tmp_path / "client_state"))


def test_accountant_grows_and_matches_opacus():
    from opacus.accountants import RDPAccountant

    acc = privacy.ClientLevelAccountant(noise_multiplier=1.0, delta=1e-3)
    eps, amp = [], []
    for _ in range(5):
        acc.step(sample_rate=0.2)
        eps.append(acc.epsilon())
        amp.append(acc.epsilon_amplified())
    assert all(b > a for a, b in zip(eps, eps[1:])) and all(b > a for a, b in zip(amp, amp[1:]))
    assert all(a < e for a, e in zip(amp, eps))  # amplification by sampling only helps
    ref = RDPAccountant()
    ref.history = [(1.0, 1.0, 5)]
    assert eps[-1] == pytest.approx(ref.get_epsilon(1e-3), rel=1e-9)
    # sanity: Gaussian mechanism without sampling, RDP(alpha) = T alpha / (2 sigma^2), converted at the best order
    orders = np.linspace(1.01, 200, 20000)
    rdp = 5 * orders / 2
    classic = np.min(rdp + np.log(1 / 1e-3) / (orders - 1))
    assert eps[-1] <= classic + 1e-6 and eps[-1] > 0.5 * classic
    state = acc.state_dict()
    again = privacy.ClientLevelAccountant(1.0, 1e-3)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.epsilon() == pytest.approx(eps[-1]) and again.epsilon_amplified() == pytest.approx(amp[-1])


# ---------------------------------------------------------------------------------------------- client app
def _train_message(cfg, tmp_path: Path, extra: dict | None = None) -> tuple[Message, dict, list[str]]:
    spec = task.make_spec(cfg, 3, str(tmp_path / "client_state"))
    model = task.GlobalModel(spec)
    arrays = ArrayRecord({k: Array(v) for k, v in model.initial().items()})
    config = ConfigRecord({"spec": task.spec_to_str(spec), "server-round": 1, **(extra or {})})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1000,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg, spec, model.names


def test_private_parameters_never_leave_the_client(tmp_path):
    from federated.client_app import PRIVATE_KEY, app

    cfg = compose(tmp_path)
    msg, spec, names = _train_message(cfg, tmp_path, {"clipping_norm": 0.5})  # central-DP clipping mod active
    assert not any("user_emb" in n for n in names) and names
    sent = {k: msg.content["arrays"][k].numpy().copy() for k in names}
    ctx = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert list(content.array_records) == ["arrays"] and list(content["arrays"].keys()) == names
    private = ctx.state.array_records[PRIVATE_KEY]
    assert list(private.keys()) == ["model.user_emb.weight"]
    user_table = private["model.user_emb.weight"].numpy()
    assert user_table.shape[0] == len(task.client_data(spec, 0).users)  # only this client's users
    # nothing in the reply is (a row of) the user table, nor any config/metric record carries arrays
    rows = {r.tobytes() for r in user_table}
    for k in content["arrays"].keys():
        arr = content["arrays"][k].numpy()
        assert arr.shape[-1:] != user_table.shape[-1:] or not any(r.tobytes() in rows for r in arr.reshape(-1, arr.shape[-1]))
    assert all(not isinstance(v, (bytes, list)) for rec in content.metric_records.values() for v in rec.values())
    assert not content.config_records
    # the update is clipped to the norm the server asked for (fixedclipping_mod on the train handler)
    update = np.sqrt(sum(((content["arrays"][k].numpy() - sent[k]) ** 2).sum() for k in names))
    assert 0 < update <= 0.5 + 1e-5
    # private state persists in the client's own file for resuming
    assert (tmp_path / "client_state" / "client_00000.pt").exists()
    # an evaluate message goes through the same app (the clipping mod is registered on train only)
    ev = Message(RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord({"spec": task.spec_to_str(spec),
                                                                                      "server-round": 1})}),
                 dst_node_id=1000, message_type=MessageType.EVALUATE)
    ev.metadata.__dict__["_message_id"] = "m2"
    ereply = app(ev, ctx)
    assert not ereply.has_error(), ereply.error
    metrics = ereply.content["metrics"]
    assert metrics["num-queries"] > 0 and 0 <= metrics["ndcg@10"] <= 1


# ---------------------------------------------------------------------------------------------- server loop
def test_rounds_with_failure_dp_and_resume(tmp_path):
    """3 clients, central DP; partition 2 always fails training: the run goes on with 2 updates."""
    cfg = compose(tmp_path, "federated=dp", "federated.failure.partitions=[2]", "federated.strategy.min_train_clients=2")
    results, grid = run_inprocess(cfg)
    rounds = read_rounds(tmp_path)
    assert [int(r["round"]) for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert (int(r["clients_sampled"]), int(r["clients_ok"]), int(r["clients_failed"])) == (3, 2, 1)
        assert int(r["aggregated"]) == 1
        assert int(r["bytes_down_train"]) > 0 and int(r["bytes_up_train"]) > 0 and r["fed/ndcg@10"] != ""
    # round 1: the server has never heard from the failing node, so it is named by node id; later by partition
    assert rounds[1]["failed_partitions"] == "node:1002" and rounds[2]["failed_partitions"] == "2"
    eps = [float(r["epsilon"]) for r in rounds[1:]]
    ref = privacy.ClientLevelAccountant(1.0, 0.1 / 3)
    for e in eps:
        ref.step(1.0)
        assert e == pytest.approx(ref.epsilon(), rel=1e-6)
    assert eps[1] > eps[0] > 0
    assert {"test/ndcg@10", "test/hr@10", "val/ndcg@10"} <= set(results)
    assert json.loads((tmp_path / "metrics.json").read_text())["test/ndcg@10"] == pytest.approx(results["test/ndcg@10"])
    assert json.loads((tmp_path / "environment.json").read_text())["packages"]["flwr"]
    assert (tmp_path / "ndcg_per_round.png").stat().st_size > 0
    # no reply of any client ever carried a private parameter
    for reply in grid.replies:
        if reply.has_content():
            for rec in reply.content.array_records.values():
                assert not any("user_emb" in k for k in rec.keys())
    with (tmp_path / "clients.csv").open() as f:
        failed = [r for r in csv.DictReader(f) if r["status"] == "error"]
    assert len(failed) == 2 and all("injected" in r["error"] for r in failed)
    # the final global model is a checkpoint the training package loads
    from training.checkpoints import load_module

    assert load_module(tmp_path / "global_model.ckpt").model is not None

    # resume: one more round continues from the saved state (round 3 only, epsilon keeps composing)
    cfg3 = compose(tmp_path, "federated=dp", "federated.failure.partitions=[2]", "federated.num_rounds=3",
                   "federated.resume=true")
    run_inprocess(cfg3)
    rounds = read_rounds(tmp_path)
    assert [int(r["round"]) for r in rounds] == [0, 1, 2, 3]
    ref.step(1.0)
    assert float(rounds[-1]["epsilon"]) == pytest.approx(ref.epsilon(), rel=1e-6)


def test_too_few_updates_keep_the_global_model(tmp_path):
    cfg = compose(tmp_path, "federated.failure.partitions=[1,2]", "federated.num_rounds=1",
                  "federated.evaluation.federated=false")
    run_inprocess(cfg)
    r = read_rounds(tmp_path)
    assert int(r[1]["clients_ok"]) == 1 and int(r[1]["aggregated"]) == 0
    assert r[1]["test/ndcg@10"] == r[0]["test/ndcg@10"]


def test_held_out_users_are_evaluated_centrally(tmp_path):
    """With data.preprocess.cold_user_fraction the held-out users train on no client and the final global model is
    evaluated on them as new users (cold_users/*), as training.train does."""
    cfg = compose(tmp_path, "data.preprocess.cold_user_fraction=0.2", "federated.num_rounds=1",
                  "federated.evaluation.federated=false")
    results, _ = run_inprocess(cfg)
    assert results["cold_users/num_queries"] > 0 and math.isfinite(results["cold_users/ndcg@10"])
    assert "cold_users slice" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedavgm"])
def test_other_strategies_run(tmp_path, strategy):
    cfg = compose(tmp_path, f"federated={strategy}", "federated.num_rounds=1", "federated.evaluation.federated=false")
    results, _ = run_inprocess(cfg)
    assert math.isfinite(results["test/ndcg@10"])


def test_finetune_exchanges_only_selected_parameters(tmp_path):
    cfg = compose(tmp_path / "a", "federated.num_rounds=1", "federated.evaluation.federated=false")
    run_inprocess(cfg)
    ckpt = tmp_path / "a" / "global_model.ckpt"
    cfg = compose(tmp_path / "b", "federated=finetune", f"federated.checkpoint={ckpt}", "federated.num_rounds=1",
                  "federated.evaluation.federated=false", "federated.share_patterns=[gate,out_norm]")
    _, grid = run_inprocess(cfg)
    keys = set(grid.sent[0].content["arrays"].keys())
    assert keys and all(("gate" in k or "out_norm" in k) for k in keys)
    rounds = read_rounds(tmp_path / "b")
    assert float(rounds[0]["test/ndcg@10"]) == pytest.approx(
        json.loads((tmp_path / "a" / "metrics.json").read_text())["test/ndcg@10"], abs=1e-6)


def test_secure_aggregation_matches_plain_average(tmp_path):
    common = ["federated.num_rounds=1", "federated.evaluation.federated=false"]
    plain, _ = run_inprocess(compose(tmp_path / "plain", *common))
    secure, grid = run_inprocess(compose(tmp_path / "secagg", *common, "federated=secagg"))
    assert any("secaggplus_configs" in m.content.config_records for m in grid.sent)
    assert int(read_rounds(tmp_path / "secagg")[1]["aggregated"]) == 1
    a = torch.load(tmp_path / "plain" / "global_model.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "secagg" / "global_model.ckpt", weights_only=False)["state_dict"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("model.") and a[k].is_floating_point())
    assert diff < 1e-3  # equal up to SecAgg+'s quantisation
    assert secure["test/ndcg@10"] == pytest.approx(plain["test/ndcg@10"], abs=0.02)


# ---------------------------------------------------------------------------------------------- Ray
def test_ray_simulation_end_to_end(tmp_path):
    """The real runtime: run_simulation with the Ray backend, 3 clients, 2 rounds, one injected failure."""
    pytest.importorskip("ray")
    from federated.simulate import simulate

    cfg = compose(tmp_path, "federated.failure.partitions=[1]", "federated.failure.phases=[evaluate]")
    OmegaConf.resolve(cfg)
    simulate(cfg)
    rounds = read_rounds(tmp_path)
    assert [int(r["round"]) for r in rounds] == [0, 1, 2]
    assert all(int(r["clients_ok"]) == 3 and int(r["eval_clients_failed"]) == 1 for r in rounds[1:])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["test/ndcg@10"] <= 1 and metrics["test/num_queries"] > 0


def test_buffers_and_frozen_parameters_are_not_exchanged():
    """LSTI with item text: the text embeddings are a buffer (never sent); finetune shares by pattern."""
    from training.module import LitRecommender

    model = {"_target_": "training.models.lsti.LSTIConfig", "hidden": 8, "inner": 16, "layers": 1, "heads": 1,
             "fusion": "id+text", "user_embedding": True, "short_len": 2, "gate_hidden": 4, "time_buckets": 4}
    lit = LitRecommender(model=model, info={"num_items": 12, "num_users": 5, "max_len": 6, "text_dim": 10},
                         item_tensors={"item_text": torch.randn(13, 10)})
    spec = {"mode": "from_scratch", "share_patterns": [], "private_patterns": ["user_emb", "personal"]}
    shared = task.shared_names(lit, spec)
    assert "model.model.item_text" not in shared and not any("item_text" in n for n in shared)
    assert any("adapter" in n for n in shared) and "model.user_emb.weight" not in shared
    assert task.private_names(lit, spec) == ["model.user_emb.weight"]
    ft = dict(spec, mode="finetune", share_patterns=["adapter", "gate"])
    task.freeze_unshared(lit, ft)
    assert all(("adapter" in n or "gate" in n) for n in task.shared_names(lit, ft))
    trainable = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert trainable == set(task.shared_names(lit, ft)) | {"model.user_emb.weight"}


def test_local_dp_mod_noises_updates(tmp_path):
    cfg = compose(tmp_path, "federated.dp.local=true", "federated.dp.local_epsilon=1.0", "federated.num_rounds=1",
                  "federated.evaluation.federated=false")
    _, grid = run_inprocess(cfg)
    r = read_rounds(tmp_path)[1]
    assert float(r["local_epsilon_max"]) == pytest.approx(1.0) and int(r["aggregated"]) == 1
    sent = grid.sent[0].content["arrays"]
    std = privacy.gaussian_local_std(1.0, 1.0, 1e-5)
    for reply in grid.replies:
        arrays = reply.content["arrays"]
        diff = np.concatenate([(arrays[k].numpy() - sent[k].numpy()).ravel() for k in sent.keys()])
        assert diff.std() == pytest.approx(std, rel=0.1)  # clipped update (norm <= 1) + N(0, std^2) noise


def test_server_optimiser_state_round_trips_for_resume():
    from federated import server_app

    fed = OmegaConf.create({"strategy": {"name": "fedavgm", "fraction_train": 1.0, "fraction_evaluate": 1.0,
                                         "min_train_clients": 2, "min_evaluate_clients": 2,
                                         "min_available_clients": None, "weighted": True,
                                         "server_lr": 1.0, "server_momentum": 0.9}})
    dp = privacy.validate_dp({}, num_clients=4)
    strategy = server_app.build_strategy(fed, dp, num_clients=4)
    strategy.momentum_vector = [np.ones(3, dtype=np.float32), np.arange(4, dtype=np.float32)]
    saved = server_app.strategy_state(strategy)
    fresh = server_app.build_strategy(fed, dp, num_clients=4)
    server_app.load_strategy_state(fresh, saved)
    assert isinstance(fresh.momentum_vector, list)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.momentum_vector, strategy.momentum_vector, strict=True))
