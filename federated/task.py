"""Per-client data and the local training / evaluation step, built from the training package.

Nothing here is a second model or training loop: a client builds the very same `LitRecommender` (and
so the same `nn.Module`, loss and full-ranking evaluation) over its own users' `SequenceData`
(`SequenceData.subset_users`, leave-one-out split kept per user) and steps it with a small loop that
calls `LitRecommender.training_step` (Lightning's Trainer costs ~0.5 s per call, too much for
thousands of client rounds) and `LitRecommender`'s evaluation hooks.

Parameters are split three ways by name (`LitRecommender.named_parameters()`, e.g.
`model.encoder.blocks.1.qkv.weight`):

* private: names matching `federated.private_patterns` (per-user state such as `user_emb`, or a
  personal head). Trained locally, kept in the client's `context.state`, never sent.
* shared: everything else that is trainable; in `finetune` mode only names matching
  `federated.share_patterns` (the rest stays frozen at the pre-trained checkpoint, which every
  party already holds). These are exchanged and aggregated.
* buffers (item text embeddings, popularity counts) are never exchanged: the text embeddings are
  public metadata computed once (or shipped in the checkpoint) and do not change.

The run description a client needs (data, model, local-training settings) travels in the train /
evaluate messages as one JSON string (`spec`), so the same ClientApp works in simulation, under
`flwr run` and on SuperNodes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from training.data.datamodule import EvalQueries, SeqDataModule, ShardedBatchSampler, TrainWindows
from training.data.sequences import SequenceData
from training.module import LitRecommender

warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # LitRecommender.log without a Trainer is a no-op
warnings.filterwarnings("ignore", message=r".*min_partition_size.*")

SPEC_VERSION = 1
MODES = ("from_scratch", "finetune")


class FederatedConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- spec
def make_spec(cfg: DictConfig | dict, num_clients: int, client_state_dir: str | None) -> dict:
    """The JSON-able description of the run that the server sends to every client."""
    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    fed = c["federated"]
    if fed["mode"] not in MODES:
        raise FederatedConfigError(f"federated.mode={fed['mode']!r}: use one of {', '.join(MODES)}.")
    if fed["mode"] == "finetune" and not fed.get("checkpoint"):
        raise FederatedConfigError("federated.mode=finetune needs federated.checkpoint=<a checkpoint file or ZeRO "
                                   "directory written by training.train or training.export>.")
    local = dict(fed["local"])
    if int(local.get("epochs", 1)) < 1 or int(local.get("batch_size", 1)) < 1:
        raise FederatedConfigError(f"federated.local.epochs/batch_size must be >= 1, got {local}.")
    if float((c.get("loss") or {}).get("neighbour_distill", 0) or 0) > 0:
        raise FederatedConfigError("loss.neighbour_distill retrieves similar users from every user's training "
                                   "events, which no federated client sees (raw interactions stay on their client): "
                                   "set loss.neighbour_distill=0 for federated runs.")
    checkpoint = fed.get("checkpoint")
    return {
        "version": SPEC_VERSION,
        "seed": int(c.get("seed", 0)),
        "data": c["data"],
        "model": c["model"],
        "optim": c.get("optim") or {},
        "loss": c.get("loss") or {},
        "evaluation": c.get("evaluation") or {},
        "mode": fed["mode"],
        "checkpoint": str(Path(checkpoint).expanduser().resolve()) if checkpoint else None,
        "share_patterns": list(fed.get("share_patterns") or []),
        "private_patterns": list(fed.get("private_patterns") or []),
        "local": local,
        "partition": dict(fed["partition"]),
        "num_clients": int(num_clients),
        "failure": dict(fed.get("failure") or {}),
        "client_eval_split": fed.get("evaluation", {}).get("client_split", "test"),
        "client_state_dir": client_state_dir,
        "cache_dir": os.environ.get("LSTI_CACHE_DIR"),
        "torch_threads": int((c.get("backend") or {}).get("torch_threads", 1) or 1),
    }


def spec_to_str(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _apply_runtime(spec: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.get("cache_dir") and os.environ.get("LSTI_CACHE_DIR") != spec["cache_dir"]:
        os.environ["LSTI_CACHE_DIR"] = spec["cache_dir"]
    threads = spec.get("torch_threads")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def _datamodule(data_json: str) -> SeqDataModule:
    from hydra.utils import instantiate

    dm = instantiate(OmegaConf.create(json.loads(data_json)), _convert_="all")
    dm.prepare()
    return dm


def datamodule(spec: dict) -> SeqDataModule:
    _apply_runtime(spec)
    return _datamodule(json.dumps(spec["data"], sort_keys=True))


def _items_frame(dm: SeqDataModule):
    try:
        return dm.load_items_frame()
    except Exception:  # noqa: BLE001 - metadata is optional for partitioning (popularity groups instead)
        return None


@functools.lru_cache(maxsize=2)
def _partitions(data_json: str, partition_json: str, num_clients: int) -> tuple:
    from federated.partition import partition_users

    dm = _datamodule(data_json)
    return tuple(partition_users(dm.prepare(), num_clients, json.loads(partition_json), _items_frame(dm)))


def partitions(spec: dict) -> tuple:
    datamodule(spec)
    return _partitions(json.dumps(spec["data"], sort_keys=True), json.dumps(spec["partition"], sort_keys=True),
                       spec["num_clients"])


@dataclass
class ClientData:
    partition_id: int
    users: np.ndarray  # global user indices
    data: SequenceData  # local users only (0..k-1), same item catalogue
    train: TrainWindows | None
    valid: EvalQueries
    test: EvalQueries
    num_targets: int  # training targets (the FedAvg weight)


@functools.lru_cache(maxsize=512)
def _client_data(spec_str: str, partition_id: int) -> ClientData:
    spec = json.loads(spec_str)
    parts = partitions(spec)
    if not 0 <= partition_id < len(parts):
        raise FederatedConfigError(f"partition-id {partition_id} is outside the {len(parts)} partitions of this run "
                                   "(node_config partition-id / num-partitions do not match federated.num_clients).")
    dm = datamodule(spec)
    users = parts[partition_id]
    local = dm.prepare().subset_users(users)
    try:
        train = dm.make_train_windows(local, crop_seed=_seed(spec["seed"], 0, partition_id))
    except ValueError:
        train = None  # no user with two training events: this client can only evaluate
    num_targets = int(np.clip(local.train_end - 1, 0, None).sum())
    # the datamodule's window and data.eval_history_cap (the short-history study) apply to federated evaluation too
    return ClientData(partition_id, users, local, train, dm.make_eval_queries("valid", local),
                      dm.make_eval_queries("test", local), num_targets)


def client_data(spec: dict, partition_id: int) -> ClientData:
    return _client_data(spec_to_str(spec), int(partition_id))


# ---------------------------------------------------------------------------------------------- modules
@functools.lru_cache(maxsize=1)
def _checkpoint_module(path: str) -> LitRecommender:
    from training.checkpoints import load_module

    return load_module(path)


@functools.lru_cache(maxsize=2)
def _item_side(spec_str: str) -> tuple[dict, dict]:
    """(item tensors, info scalars) exactly as training.train builds them (text embeddings cached on disk)."""
    from training.train import item_tensors

    spec = json.loads(spec_str)
    return item_tensors(OmegaConf.create({"model": spec["model"]}), datamodule(spec))


def _check_catalogue(spec: dict, hp_info: dict) -> None:
    n = datamodule(spec).prepare().num_items
    if int(hp_info["num_items"]) != n:
        raise FederatedConfigError(f"federated.checkpoint {spec['checkpoint']} was trained on {hp_info['num_items']} "
                                   f"items but data has {n}: fine-tune on the data config it was trained with.")


def build_module(spec: dict, num_users: int | None = None, item_counts: torch.Tensor | None = None,
                 user_index: np.ndarray | None = None) -> LitRecommender:
    """The global model (num_users None) or a client's model (its own user count and popularity).

    finetune: weights from `spec['checkpoint']`; a client's user-indexed private tables are the rows of
    its own users (`user_index`, global indices).
    """
    _apply_runtime(spec)
    if spec["mode"] == "finetune":
        base = _checkpoint_module(spec["checkpoint"])
        hp = dict(base.hparams)
        _check_catalogue(spec, hp["info"])
        global_users = int(hp["info"]["num_users"])
        info = dict(hp["info"], num_users=num_users or global_users)
        tensors = {"item_counts": base.item_counts if item_counts is None else item_counts,
                   "train_items": base.item_counts > 0}  # the global training catalogue, not the client's
        if getattr(base.model, "item_text", None) is not None:
            tensors["item_text"] = base.model.item_text
        profiles = _local_profiles(getattr(base.model, "user_text", None), user_index)
        if profiles is not None:
            tensors["user_text"] = profiles
        module = LitRecommender(model=hp["model"], info=info, optim=spec["optim"] or hp.get("optim"),
                                loss=spec["loss"] or hp.get("loss"), evaluation=spec["evaluation"] or hp.get("evaluation"),
                                item_tensors=tensors, data=hp.get("data"))
        state = {k: v for k, v in base.state_dict().items() if k != "item_counts"}
        if profiles is not None:
            state["model.user_text"] = profiles
        if num_users is not None and user_index is not None:
            private = set(private_names(module, spec))
            for k in list(state):
                if k in private and state[k].dim() >= 1 and state[k].shape[0] == global_users:
                    state[k] = state[k][torch.as_tensor(user_index, dtype=torch.long)]
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("neg_probs", "item_counts"))]
        if missing or unexpected:
            raise FederatedConfigError(f"checkpoint {spec['checkpoint']} does not fit the rebuilt model: missing "
                                       f"{missing[:5]}, unexpected {unexpected[:5]}.")
    else:
        tensors, info = _item_side(spec_to_str(spec))
        tensors = dict(tensors)
        if item_counts is not None:
            tensors["item_counts"] = item_counts
        if tensors.get("user_text") is not None:
            tensors["user_text"] = _local_profiles(tensors["user_text"], user_index)
        info = dict(info, num_users=num_users or info["num_users"])
        module = LitRecommender(model=spec["model"], info=info, optim=spec["optim"], loss=spec["loss"],
                                evaluation=spec["evaluation"], item_tensors=tensors, data=spec["data"])
    freeze_unshared(module, spec)
    return module


def _local_profiles(table: torch.Tensor | None, user_index: np.ndarray | None) -> torch.Tensor | None:
    """Users' profile embeddings (model.user_profile) as a party holds them: a client the rows of its own users,
    the server's global model none (zeros). A buffer, never a parameter, so it is never exchanged either."""
    if table is None:
        return None
    if user_index is None:
        return torch.zeros_like(table)
    return table[torch.as_tensor(user_index, dtype=torch.long)].clone()


def client_module(spec: dict, cd: ClientData) -> LitRecommender:
    torch.manual_seed(_seed(spec["seed"], 0, cd.partition_id))  # private params' initialisation
    counts = torch.from_numpy(cd.data.train_item_counts())
    return build_module(spec, num_users=len(cd.users), item_counts=counts, user_index=cd.users)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def private_names(module: torch.nn.Module, spec: dict) -> list[str]:
    return [n for n, _ in module.named_parameters() if _matches(n, spec["private_patterns"])]


def shared_names(module: torch.nn.Module, spec: dict) -> list[str]:
    """Exchanged parameters, in module order (the key order of every ArrayRecord of the run)."""
    names = []
    for n, _ in module.named_parameters():
        if _matches(n, spec["private_patterns"]):
            continue
        if spec["mode"] == "finetune" and spec["share_patterns"] and not _matches(n, spec["share_patterns"]):
            continue
        names.append(n)
    if not names:
        raise FederatedConfigError(f"no parameter is shared: share_patterns {spec['share_patterns']} / "
                                   f"private_patterns {spec['private_patterns']} leave nothing to aggregate.")
    return names


def freeze_unshared(module: torch.nn.Module, spec: dict) -> None:
    """finetune: parameters neither shared nor private stay at the checkpoint (every party has them)."""
    keep = set(shared_names(module, spec)) | set(private_names(module, spec))
    for n, p in module.named_parameters():
        p.requires_grad_(n in keep)


def get_params(module: torch.nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    params = dict(module.named_parameters())
    return {n: params[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names}


def set_params(module: torch.nn.Module, values: dict[str, np.ndarray]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            if n not in params:
                raise FederatedConfigError(f"received parameter {n!r} that the model does not have.")
            t = torch.as_tensor(np.asarray(v))
            if t.shape != params[n].shape:
                raise FederatedConfigError(f"parameter {n!r}: received shape {tuple(t.shape)}, model has "
                                           f"{tuple(params[n].shape)} (server and client configs differ).")
            params[n].copy_(t.to(params[n].dtype))


# ---------------------------------------------------------------------------------------------- steps
def _seed(seed: int, server_round: int, partition_id: int) -> int:
    return (int(seed) * 1_000_003 + int(server_round) * 10_007 + int(partition_id)) % (2**31 - 1)


def _optimizer(module: LitRecommender, lr: float) -> torch.optim.Optimizer:
    """AdamW with LitRecommender.configure_optimizers' groups (no decay on norms/biases), constant lr."""
    cfg = module.optim_cfg
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.betas))


def train_local(module: LitRecommender, cd: ClientData, spec: dict, server_round: int,
                proximal_mu: float = 0.0, anchor_names: list[str] | None = None) -> dict[str, float]:
    """Local epochs over the client's training windows; FedProx adds mu/2 ||w - w_global||^2 over the
    shared parameters (`anchor_names`, whose current values are the global ones)."""
    local = spec["local"]
    t0 = time.perf_counter()
    if cd.train is None or len(cd.train) == 0:
        return {"train-loss": float("nan"), "steps": 0, "seconds": 0.0}
    torch.manual_seed(_seed(spec["seed"], server_round, cd.partition_id))
    module.train()
    lr = float(local.get("lr") or module.optim_cfg.lr)
    opt = _optimizer(module, lr)
    params = dict(module.named_parameters())
    anchors = {}
    if proximal_mu > 0:
        anchors = {n: params[n].detach().clone() for n in (anchor_names or []) if params[n].requires_grad}
    trainable = [p for p in module.parameters() if p.requires_grad]
    sampler = ShardedBatchSampler(len(cd.train), int(local.get("batch_size", 64)), shuffle=True,
                                  seed=_seed(spec["seed"], server_round, cd.partition_id))
    clip = float(local.get("gradient_clip", 1.0) or 0.0)
    max_steps = local.get("max_steps")
    steps, loss_sum = 0, 0.0
    for epoch in range(int(local.get("epochs", 1))):
        sampler.set_epoch(epoch)
        for idx in sampler:
            loss = module.training_step(cd.train[(server_round * 1000 + epoch, idx)], steps)  # epoch key: crops
            loss_sum += float(loss.detach())
            if anchors:
                loss = loss + proximal_mu / 2 * sum((params[n] - a).pow(2).sum() for n, a in anchors.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
            opt.step()
            steps += 1
            if max_steps and steps >= int(max_steps):
                break
        if max_steps and steps >= int(max_steps):
            break
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"client {cd.partition_id}: training loss became {loss_sum} (diverged); lower "
                                 "federated.local.lr.")
    return {"train-loss": loss_sum / max(steps, 1), "steps": float(steps), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(module: LitRecommender, queries: EvalQueries, prefix: str, batch_size: int = 512) -> dict[str, float]:
    """LitRecommender's own full-ranking evaluation (same metrics, slices and keys as training)."""
    n = len(queries)
    if n == 0:
        return {f"{prefix}/num_queries": 0.0}
    module.eval()
    module._eval_start()
    for s in range(0, n, batch_size):
        module._eval_step(queries[torch.arange(s, min(s + batch_size, n))])
    return module._eval_end(prefix)


def headline(metrics: dict[str, float], prefix: str, ks=(5, 10, 20)) -> dict[str, float]:
    """The overall (unsliced) metrics without the prefix: {'ndcg@10': ..., 'num_queries': ...}."""
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix + "/") and k.count("/") == 1:
            out[k[len(prefix) + 1:]] = float(v)
    return out


# ---------------------------------------------------------------------------------------------- server side
class GlobalModel:
    """The server's copy of the model: initial shared parameters and centralized evaluation."""

    def __init__(self, spec: dict):
        self.spec = spec
        torch.manual_seed(int(spec["seed"]))
        self.module = build_module(spec)
        if spec["mode"] == "from_scratch":
            with torch.no_grad():  # the global model holds no per-user state: private tables stay zero
                for n, p in self.module.named_parameters():
                    if n in set(private_names(self.module, spec)):
                        p.zero_()
        self.names = shared_names(self.module, spec)
        dm = datamodule(spec)
        # + the users held out of training (data.preprocess.cold_user_fraction), evaluated as new users
        self.queries = {split: dm.make_eval_queries(split) for split in ("valid", *dm.test_splits)}
        self.eval_batch_size = int(spec["data"].get("eval_batch_size", 512))

    def initial(self) -> dict[str, np.ndarray]:
        return get_params(self.module, self.names)

    def evaluate(self, values: dict[str, np.ndarray], split: str = "test") -> dict[str, float]:
        set_params(self.module, values)
        prefix = "val" if split == "valid" else split
        return evaluate(self.module, self.queries[split], prefix, self.eval_batch_size)

    def checkpoint(self, values: dict[str, np.ndarray]) -> dict:
        """A checkpoint dict `training.checkpoints.load_module` reads (state_dict + hyper_parameters)."""
        set_params(self.module, values)
        return {"state_dict": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "hyper_parameters": dict(self.module.hparams)}
