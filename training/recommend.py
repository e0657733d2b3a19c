"""Write top-K recommendations for users of a checkpoint's dataset (batched, full re-encoding).

    python -m training.recommend ckpt=outputs/train/<run>/checkpoints/best.ckpt              # all users
    python -m training.recommend ckpt=... users=[196,186] k=20 out=recs.jsonl
    python -m training.recommend ckpt=... users=user_ids.txt exclude_seen=false quantize=int8

Each user's history is every event of that user in the data config stored in the checkpoint (`data=...`
overrides it; the catalogue must match); the model sees the last data.max_len events, as in evaluation.
Output: one row per recommendation with columns user (raw id), rank (1 = best), item (raw id), score, as
Parquet (`.parquet`) or JSON lines (`.jsonl`), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from training import metrics as M
from training.data.datamodule import window_indices
from training.serving import Recommender, ServingError, resolve_users

log = logging.getLogger("training.recommend")
FORMATS = (".parquet", ".jsonl")


class _Writer:
    """Streams row batches into a temporary file next to `path`, renamed into place on close."""

    def __init__(self, path: Path):
        self.path, self.kind = path, path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        self._pq = None
        self._fh = open(self.tmp, "w") if self.kind == ".jsonl" else None  # noqa: SIM115 (closed in close())

    def write(self, users: np.ndarray, ranks: np.ndarray, items: np.ndarray, scores: np.ndarray) -> None:
        if self.kind == ".jsonl":
            for u, r, i, s in zip(users.tolist(), ranks.tolist(), items.tolist(), scores.tolist(), strict=True):
                self._fh.write(json.dumps({"user": u, "rank": r, "item": i, "score": s}) + "\n")
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"user": pa.array(users, pa.string()), "rank": pa.array(ranks, pa.int32()),
                          "item": pa.array(items, pa.string()), "score": pa.array(scores, pa.float32())})
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.tmp, table.schema)
        self._pq.write_table(table)

    def close(self, ok: bool) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._pq is not None:
            self._pq.close()
        if ok:
            if self.kind == ".parquet" and self._pq is None:  # no rows: still a valid, empty file
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({"user": pa.array([], pa.string()), "rank": pa.array([], pa.int32()),
                                         "item": pa.array([], pa.string()), "score": pa.array([], pa.float32())}),
                               self.tmp)
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def recommend(cfg: DictConfig) -> Path:
    """Run the CLI's job; returns the output path."""
    if not cfg.get("ckpt"):
        raise ServingError("pass ckpt=<path to a checkpoint file or ZeRO directory>.")
    out = Path(str(cfg.out)).expanduser()
    if out.suffix.lower() not in FORMATS:
        raise ServingError(f"out={cfg.out}: the file name must end in .parquet or .jsonl (it picks the format).")
    if int(cfg.batch_size) < 1:
        raise ServingError(f"batch_size={cfg.batch_size} must be >= 1.")
    data_cfg = None if cfg.get("data") is None else OmegaConf.to_container(cfg.data, resolve=True)
    t0 = time.perf_counter()
    rec = Recommender.from_checkpoint(cfg.ckpt, quantize=cfg.get("quantize"), dtype=cfg.get("dtype"),
                                      device=cfg.get("device", "cpu"), data=data_cfg)
    k = rec.check_k(cfg.k)
    data = rec.data
    users = resolve_users(cfg.users, data.user_ids, unknown=cfg.get("unknown_users", "error"))
    log.info("%s; %d users, k=%d, exclude_seen=%s", rec.incremental.split(":")[0], len(users), k, cfg.exclude_seen)

    offsets, items, times = (torch.from_numpy(a) for a in (data.offsets, data.items, data.times))
    lengths = offsets[1:] - offsets[:-1]
    writer = _Writer(out)
    ok, rows = False, 0
    try:
        for s in range(0, len(users), int(cfg.batch_size)):
            u = torch.from_numpy(users[s:s + int(cfg.batch_size)])
            idx, valid = window_indices(offsets, u, lengths[u], rec.window)
            vectors = rec.encode_batch(torch.where(valid, items[idx], 0), torch.where(valid, times[idx], 0), u)
            scores = rec.score(vectors)
            exclude = None
            if cfg.exclude_seen:  # the whole history, not only the window
                seen_offsets = torch.zeros(u.shape[0] + 1, dtype=torch.int64)
                torch.cumsum(lengths[u], 0, out=seen_offsets[1:])
                n = lengths[u]
                row_start = torch.repeat_interleave(seen_offsets[:-1], n)
                flat = items[torch.repeat_interleave(offsets[u], n) + torch.arange(int(seen_offsets[-1])) - row_start]
                exclude = M.seen_mask_from_csr(seen_offsets, flat.to(scores.device), scores.shape[1])
            values, ids = M.topk_items(scores, k, exclude)
            values, ids = values.cpu().numpy(), ids.cpu().numpy()
            keep = ids > 0  # exclusion can leave fewer than k items
            rank = np.broadcast_to(np.arange(1, ids.shape[1] + 1), ids.shape)
            row_user = np.broadcast_to(data.user_ids[u.numpy()][:, None], ids.shape)
            writer.write(row_user[keep], rank[keep], rec.item_ids[ids[keep]], values[keep])
            rows += int(keep.sum())
        ok = True
    finally:
        writer.close(ok)
    log.info("wrote %d recommendations for %d users to %s in %.1f s", rows, len(users), out, time.perf_counter() - t0)
    print(f"wrote {rows} recommendations ({len(users)} users, k={k}) to {out}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="recommend")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recommend(cfg)


if __name__ == "__main__":
    main()
