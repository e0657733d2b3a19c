"""The one LightningModule: every model trains, validates and tests through it.

It owns the loss, the optimiser (AdamW), the warm-up + cosine schedule, logging and full-ranking
evaluation. Models stay plain `nn.Module`s (built from their dataclass config), so the federated client
and the serving path use exactly the same weights without Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from training import metrics as M
from training.data.sequences import DataInfo
from training.losses import (
    LossConfig,
    candidate_softmax_loss,
    negative_distribution,
    neighbour_distill_loss,
    recommendation_loss,
)
from training.optim import DenseSparseAdam, sparse_grad_norm_clip_

# Evaluation metrics are gathered and reduced exactly on every rank (`_gather`), so logging them without
# sync_dist is right; silence Lightning's per-metric advice to sync them.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level in distributed")
log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    # Fused AdamW (one kernel over all parameters; ~6x faster steps on a 1M-item table on CPU).
    # null: on, except under DeepSpeed, which manages the optimiser's partitions itself.
    fused: bool | None = None
    # Row-sparse gradients and a lazy Adam for the item table (training/optim.py): flat step time in the
    # catalogue size with sampled softmax. Needs loss.name=sampled|bce, a plain item embedding (sasrec,
    # gru4rec) and one process.
    sparse_item_grad: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0.")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"optim.scheduler={self.scheduler!r}: use cosine or constant.")


@dataclass
class EvalConfig:
    ks: list = field(default_factory=lambda: [5, 10, 20])
    filter_seen: bool = False
    length_bins: list = field(default_factory=lambda: [5, 20])
    head_fraction: float = 0.2
    sampled_negatives: int = 0  # > 0 adds the clearly labelled sampled-negative metrics
    sampled_sampler: str = "uniform"
    item_chunk_size: int | None = None  # score items in chunks for huge catalogues


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if hasattr(cfg, "__dataclass_fields__"):
        return asdict(cfg)
    return dict(cfg)


def _gathered(params):
    """Context in which ZeRO-3 partitioned parameters are whole (read-only); a no-op for anything else."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def build_model(model_cfg: dict, info: DataInfo) -> torch.nn.Module:
    """Instantiate the model's dataclass config (Hydra `_target_`) and build the module.

    The `text` node (which language model encodes item text) is consumed by the data side, not the model.
    """
    cfg = {k: v for k, v in model_cfg.items() if k != "text"}
    return instantiate(OmegaConf.create(cfg), _convert_="all").build(info)


def compile_model(model: torch.nn.Module, cfg, strategy=None) -> bool:
    """Optionally `torch.compile` the plain model (config node `compile`, conf/train.yaml); True if compiled.

    Uses `nn.Module.compile()`, i.e. torch.compile of the module's call, in place: `model` stays the same object
    and type, so its state-dict keys (and every checkpoint) carry no `_orig_mod.` prefix and load with or without
    compile. The LightningModule itself is never compiled (the loss, logging and evaluation stay eager); under a
    DeepSpeed strategy (which wraps and partitions the module itself) the switch is ignored with a warning.
    `cfg` may be a bool or a node with enabled / backend / mode / dynamic.
    """
    cfg = _plain(cfg) if not isinstance(cfg, bool) else {"enabled": cfg}
    if not cfg.get("enabled", False) or not getattr(model, "trainable", True):
        return False
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy) or "deepspeed" in type(strategy).__name__.lower():
        warnings.warn("compile.enabled=true is ignored under DeepSpeed strategies: training the eager model.",
                      stacklevel=2)
        return False
    model.compile(backend=cfg.get("backend") or "inductor", mode=cfg.get("mode"), dynamic=cfg.get("dynamic"))
    return True


class LitRecommender(L.LightningModule):
    def __init__(
        self,
        model: dict,
        info: dict,
        optim: dict | None = None,
        loss: dict | None = None,
        evaluation: dict | None = None,
        item_tensors: dict | None = None,
        data: dict | None = None,
    ):
        """`data` is the data config the model was trained on, kept so a checkpoint can be re-evaluated."""
        super().__init__()
        model, optim, loss, evaluation = _plain(model), _plain(optim), _plain(loss), _plain(evaluation)
        self.save_hyperparameters({"model": model, "info": info, "optim": optim, "loss": loss,
                                   "evaluation": evaluation, "data": _plain(data)})
        tensors = item_tensors or {}
        n = info["num_items"] + 1
        counts = tensors.get("item_counts")
        text = tensors.get("item_text")
        if text is None and info.get("text_dim"):
            text = torch.zeros(n, info["text_dim"])  # placeholder; the checkpoint's buffer replaces it
        data_info = DataInfo(num_items=info["num_items"], num_users=info["num_users"], max_len=info["max_len"],
                             item_counts=counts if counts is not None else torch.zeros(n, dtype=torch.int64),
                             item_text=text, text_dim=info.get("text_dim", 0), item_texts=tensors.get("item_texts"),
                             train_items=tensors.get("train_items"), user_text=tensors.get("user_text"),
                             user_text_dim=info.get("user_text_dim", 0))
        self.model = build_model(model, data_info)
        self.optim_cfg, self.loss_cfg, self.eval_cfg = OptimConfig(**optim), LossConfig(**loss), EvalConfig(**evaluation)
        self.register_buffer("item_counts", data_info.item_counts.to(torch.int64).clone(), persistent=True)
        # The training catalogue (LossConfig.exclude_unseen): given by the caller (training.train: items with a
        # training interaction in the whole data set), never inferred here, since a federated client's own
        # counts cover only its users' items. Not saved: only training uses it.
        train_items = tensors.get("train_items") if self.loss_cfg.exclude_unseen else None
        self.register_buffer("train_items", None if train_items is None else train_items.to(torch.bool).clone(),
                             persistent=False)
        self.register_buffer("neg_probs", negative_distribution(self.loss_cfg, data_info.item_counts, info["num_items"],
                                                                self.train_items), persistent=False)
        # loss.neighbour_distill: every user's k most similar users (training.neighbours, built by training.train
        # from the training events) and the bank of the users' latest training states (not saved: a resumed run
        # refills it within an epoch; under DDP each rank banks the users it trains on)
        neighbours = tensors.get("user_neighbours")
        self.register_buffer("user_neighbours", None if neighbours is None else neighbours.to(torch.int64).clone(),
                             persistent=False)
        self._user_bank: torch.Tensor | None = None
        self._user_banked: torch.Tensor | None = None
        # what the full-softmax teacher may score: derived once, not on every training step (the term is off by default)
        self.register_buffer("score_mask", None if neighbours is None else self._catalogue_mask(), persistent=False)
        self._eval_outputs: list[dict] = []
        self._eval_table: torch.Tensor | None = None
        self._t_last = None
        self.test_prefix = "test"  # metric prefix of trainer.test: "cold_users" when it serves the held-out users

    # ------------------------------------------------------------------ training
    def forward(self, items, times, users):
        return self.model(items, times, users)

    def training_step(self, batch: dict, batch_idx: int):
        has_target = batch["targets"] > 0
        if getattr(self.model, "trains_on_candidates", False):
            loss = self._candidate_step(batch, has_target)
        else:
            item_table = self.model.item_table()
            inputs = (batch["items"], batch["times"], batch["users"])
            if getattr(self.model, "supports_query_mask", False) and 2 * int(has_target.sum()) < has_target.numel():
                # Few scored positions (per-prefix windows score one each): skip the last block elsewhere.
                states = self.model(*inputs, query_times=batch["target_times"], item_table=item_table,
                                    query_mask=has_target)
            else:
                states = self.model(*inputs, query_times=batch["target_times"], item_table=item_table)[has_target]
            loss = recommendation_loss(states, batch["targets"][has_target], item_table, self.loss_cfg,
                                       self.neg_probs, item_mask=self.train_items,
                                       sparse_rows=self.optim_cfg.sparse_item_grad)
            loss = loss + self._neighbour_term(states, has_target, batch["users"], item_table, self.score_mask)
        n_seq = batch["items"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n_seq)
        now = time.perf_counter()
        if self._t_last is not None:
            dt = max(now - self._t_last, 1e-9)
            self.log("train/seq_per_s", n_seq / dt, batch_size=n_seq)
            self.log("train/items_per_s", has_target.sum().float() / dt, batch_size=n_seq)
        self._t_last = now
        return loss

    def _candidate_step(self, batch: dict, has_target: torch.Tensor) -> torch.Tensor:
        """Models whose item representations are expensive (LSTI with text_mode=lora runs the language model
        per item) encode only this step's candidates: the batch's input and target items plus
        `lora_negatives` uniformly drawn items. Inputs look their representations up in a full-size table
        holding only the candidates (index_copy keeps the gradients); the loss is a sampled softmax over the
        candidate set (`losses.candidate_softmax_loss`), so in-batch items double as negatives."""
        items, targets = batch["items"], batch["targets"]
        n = self.model.num_items
        parts = [items.flatten(), targets.flatten()]
        k = int(getattr(self.model.cfg, "lora_negatives", 0))
        if k:
            negatives = torch.randint(1, n + 1, (k,), device=items.device)
            if self.train_items is not None:
                negatives = negatives[self.train_items[negatives]]
            parts.append(negatives)
        candidates = torch.unique(torch.cat(parts))  # sorted
        candidates = candidates[candidates > 0]
        reps = self.model.candidate_table(candidates)
        table = reps.new_zeros(n + 1, reps.shape[1]).index_copy(0, candidates, reps)
        states = self.model(items, batch["times"], batch["users"], query_times=batch["target_times"],
                            item_table=table)
        self.log("train/candidates", float(candidates.numel()), batch_size=items.shape[0])
        loss = candidate_softmax_loss(states[has_target], targets[has_target], candidates, reps,
                                      self.loss_cfg.temperature)
        return loss + self._neighbour_term(states[has_target], has_target, batch["users"], reps)

    def _catalogue_mask(self) -> torch.Tensor:
        """The items full softmax may score: the training catalogue (`loss.exclude_unseen`), never the padding."""
        mask = torch.ones_like(self.item_counts, dtype=torch.bool) if self.train_items is None else self.train_items
        mask = mask.clone()
        mask[0] = False
        return mask

    def _neighbour_term(self, states: torch.Tensor, has_target: torch.Tensor, users: torch.Tensor,
                        table: torch.Tensor, item_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`loss.neighbour_distill` times the neighbour-distillation loss (0 when off).

        `states` [Q, D] are the scored positions of `has_target` [B, L], row-major. Each window's newest position
        (its last column) is the user's latest state in the batch: its next-item distribution over `table` (the
        catalogue, or the step's candidates) is pulled toward its neighbours' (from their banked states, scored
        with the current table, no gradient: a teacher; neighbours not banked yet are left out,
        `losses.neighbour_distill_loss`); then the state replaces the user's own bank entry."""
        weight = self.loss_cfg.neighbour_distill
        if not weight:
            return states.new_zeros(())
        if self.user_neighbours is None:
            raise ValueError("loss.neighbour_distill > 0 needs each user's similar users (training.neighbours), "
                             "which training.train builds from the whole training set; a federated client, which "
                             "sees only its own users, cannot: set loss.neighbour_distill=0 there.")
        positions = has_target.nonzero()
        newest = positions[:, 1] == has_target.shape[1] - 1
        latest, users = states[newest], users[positions[newest, 0]]
        if self._user_bank is None or self._user_bank.device != states.device:
            self._user_bank = torch.zeros(self.user_neighbours.shape[0], states.shape[-1], device=states.device)
            self._user_banked = torch.zeros(self.user_neighbours.shape[0], dtype=torch.bool, device=states.device)
        neighbours = self.user_neighbours[users]  # [b, k], -1: none
        usable = (neighbours >= 0) & self._user_banked[neighbours.clamp_min(0)]
        teachers = self._user_bank[neighbours.clamp_min(0)].to(latest.dtype)
        distill = neighbour_distill_loss(latest, teachers, usable, table, item_mask,
                                         self.loss_cfg.temperature)
        with torch.no_grad():
            self._user_bank[users] = latest.detach().float()
            self._user_banked[users] = True
        if self._trainer is not None:  # driven without a Trainer (tests, training.bench): nothing to log to
            self.log("train/neighbour_distill", distill.detach(), batch_size=int(has_target.shape[0]))
        return weight * distill

    def on_train_epoch_start(self) -> None:
        self._t_last = None
        self._epoch_started = time.perf_counter()

    def build_optimizer(self, strategy_name: str = "", world_size: int = 1) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (no decay on biases/norms), or DenseSparseAdam when
        optim.sparse_item_grad is set. Also used without a Trainer (training.bench)."""
        cfg = self.optim_cfg
        sparse_table = self._sparse_item_table(strategy_name, world_size) if cfg.sparse_item_grad else None
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or p is sparse_table:
                continue
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = cfg.fused
        if fused is None:
            fused = "DeepSpeed" not in strategy_name
        if sparse_table is not None:
            return DenseSparseAdam(groups, [sparse_table], lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = self.build_optimizer(type(self.trainer.strategy).__name__, int(self.trainer.world_size))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if cfg.scheduler == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _sparse_item_table(self, strategy_name: str, world_size: int) -> torch.nn.Parameter:
        """Switch the item embedding to row-sparse gradients; refuse setups where that cannot work."""
        emb = getattr(self.model, "item_emb", None)
        if self.loss_cfg.name not in ("sampled", "bce"):
            raise ValueError(f"optim.sparse_item_grad=true needs loss.name=sampled or bce (got {self.loss_cfg.name!r}): "
                             "full softmax scores every item, so its gradient is dense anyway.")
        if not isinstance(emb, torch.nn.Embedding) or self.model.item_table() is not emb.weight:
            raise ValueError(f"optim.sparse_item_grad=true needs a model whose item table is a plain embedding "
                             f"(sasrec, gru4rec); {type(self.model).__name__} computes its item representations.")
        if world_size > 1 or "DeepSpeed" in strategy_name:
            raise ValueError("optim.sparse_item_grad=true runs in a single process (strategy=single); "
                             f"this run has {world_size} processes / {strategy_name}.")
        emb.sparse = True
        return emb.weight

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if isinstance(optimizer, DenseSparseAdam) and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("optim.sparse_item_grad=true supports gradient clipping by norm only.")
            sparse_grad_norm_clip_([p for g in optimizer.param_groups for p in g["params"]], float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        self._eval_outputs = []
        gather = _gathered(self.model.parameters())
        with torch.no_grad(), gather:
            table = self.model.item_table().detach()
            # under ZeRO-3 the gathered weights are freed on exit: keep a copy
            self._eval_table = table if isinstance(gather, contextlib.nullcontext) else table.clone()

    # ------------------------------------------------------------------ DeepSpeed ZeRO-3
    def setup(self, stage: str) -> None:
        """ZeRO-3 partitions every parameter outside the forward pass of the module that owns it, but
        `item_table()` reads embedding tables directly (no module call) inside training_step. Registering those
        tables as external parameters of this module makes DeepSpeed gather them for the whole step."""
        from training.strategies import zero_stage

        if self._trainer is None or zero_stage(self.trainer.strategy) != 3:
            return
        import deepspeed

        for module in self.model.modules():
            if isinstance(module, torch.nn.Embedding):
                deepspeed.zero.register_external_parameter(self, module.weight)

    def _eval_step(self, batch: dict) -> None:
        query_times = torch.cat([batch["times"][:, 1:], batch["target_time"].unsqueeze(1)], dim=1)
        states = self.model.latest_states(batch["items"], batch["times"], batch["users"], query_times=query_times,
                                          item_table=self._eval_table)
        if bool((batch["query"] < 0).all()):
            return  # a padding batch (ShardedBatchSampler): its forward pass only keeps the ranks in step
        chunk = self.eval_cfg.item_chunk_size
        if chunk and chunk < self._eval_table.shape[0]:
            # Bounded memory for huge catalogues: [B, chunk] scores at a time instead of [B, N+1].
            exclude_fn = (M.csr_exclude_fn(batch["seen_offsets"], batch["seen_items"])
                          if self.eval_cfg.filter_seen else None)
            ranks = M.full_ranking_ranks(states, self._eval_table, batch["target"], exclude_fn,
                                         chunk_size=max(int(states.shape[0]), 1), item_chunk_size=int(chunk))
            scores = None
        else:
            exclude = None
            if self.eval_cfg.filter_seen:
                exclude = M.seen_mask_from_csr(batch["seen_offsets"], batch["seen_items"], self._eval_table.shape[0])
            scores = self.model.score(states, self._eval_table).float()
            ranks = M.target_ranks(scores, batch["target"], exclude)
        out = {"rank": ranks, "query": batch["query"], "train_len": batch["train_len"], "target": batch["target"]}
        if self.eval_cfg.sampled_negatives > 0:
            n = self.eval_cfg.sampled_negatives
            negatives = M.sample_negatives(batch["target"], n, self.eval_cfg.sampled_sampler, self.item_counts,
                                           uniforms=M.query_uniforms(batch["query"], n))
            if scores is None:
                out["sampled_rank"] = M.sampled_ranks(states, self._eval_table, batch["target"], n, negatives=negatives)
            else:
                out["sampled_rank"] = M.sampled_ranks_from_scores(scores, batch["target"], n, negatives=negatives)
        self._eval_outputs.append(out)

    def _gather(self) -> dict[str, torch.Tensor]:
        """Concatenate this rank's outputs and gather every rank's, unpadded, in query order."""
        keys = ["rank", "query", "train_len", "target"] + (["sampled_rank"] if self.eval_cfg.sampled_negatives else [])
        local = {k: torch.cat([o[k] for o in self._eval_outputs]) if self._eval_outputs
                 else torch.zeros(0, dtype=torch.int64, device=self.device) for k in keys}
        if self._trainer is not None and self.trainer.world_size > 1:  # None: driven without a Trainer
            n = torch.tensor([local["rank"].shape[0]], device=self.device)
            sizes = self.all_gather(n).flatten()
            top = int(sizes.max())
            gathered = {}
            for k, v in local.items():
                padded = torch.zeros(top, dtype=v.dtype, device=self.device)
                padded[: v.shape[0]] = v
                allv = self.all_gather(padded)  # [world, top]
                gathered[k] = torch.cat([allv[r, : int(sizes[r])] for r in range(allv.shape[0])])
            local = gathered
        order = torch.argsort(local["query"])
        return {k: v[order].cpu() for k, v in local.items()}

    def _eval_end(self, prefix: str) -> dict[str, float]:
        g = self._gather()
        per_query = M.rank_metrics(g["rank"], tuple(self.eval_cfg.ks))
        results = M.summarise(per_query)
        slices = {**M.user_length_slices(g["train_len"], tuple(self.eval_cfg.length_bins)),
                  **M.item_popularity_slices(g["target"], self.item_counts.cpu(), self.eval_cfg.head_fraction)}
        unseen = self.item_counts.cpu()[g["target"]] == 0  # targets never seen in training (cold items)
        if bool(unseen.any()):
            slices["items_unseen"] = unseen
        results.update(M.sliced_summary(per_query, slices))
        if "sampled_rank" in g:
            tag = f"sampled_{self.eval_cfg.sampled_sampler}{self.eval_cfg.sampled_negatives}"
            results.update({f"{tag}/{k}": v for k, v in M.summarise(M.rank_metrics(g["sampled_rank"],
                                                                                   tuple(self.eval_cfg.ks))).items()})
        results["num_queries"] = float(g["rank"].shape[0])
        results = {f"{prefix}/{k}": float(v) for k, v in results.items()}
        for k, v in results.items():
            self.log(k, v, prog_bar=k == f"{prefix}/ndcg@10", sync_dist=False, rank_zero_only=False)
        self._eval_outputs, self._eval_table = [], None
        self.last_eval = results
        self.last_ranks = g  # per query, in query order: rank, query, train_len, target (training.evaluate save_ranks)
        return results

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        results = self._eval_end("val")
        if self.trainer.sanity_checking or self.global_rank != 0:
            return
        # One plain line per epoch, so logs without a progress bar (SLURM, CI, sweeps) show the curve.
        loss = self.trainer.callback_metrics.get("train/loss")
        took = time.perf_counter() - getattr(self, "_epoch_started", time.perf_counter())
        log.info("epoch %d step %d: val/ndcg@10 %.4f val/hr@10 %.4f train/loss %s (%.1f s)",
                 self.current_epoch, self.global_step, results.get("val/ndcg@10", float("nan")),
                 results.get("val/hr@10", float("nan")), "n/a" if loss is None else f"{float(loss):.4f}", took)

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end(self.test_prefix)
