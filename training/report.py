"""Readable tables of flat metric dicts (`test/ndcg@10`, `test/users_len<=5/ndcg@10`, ...)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20")


def results_table(metrics: dict[str, float], split: str = "test", columns=COLUMNS) -> str:
    """Markdown table: one row for all queries, one per slice, with the query count."""
    prefix = f"{split}/"
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        group, _, metric = rest.rpartition("/")
        rows.setdefault(group or "all", {})[metric] = value
    if not rows:
        return f"(no {split} metrics)"
    header = f"| {split} slice | queries | " + " | ".join(c.upper() for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    order = ["all"] + sorted(k for k in rows if k != "all" and not k.startswith("sampled"))
    order += sorted(k for k in rows if k.startswith("sampled"))
    for name in order:
        r = rows[name]
        count = r.get("count", metrics.get(f"{prefix}num_queries", float("nan")) if name == "all" else float("nan"))
        cells = " | ".join(f"{r[c]:.4f}" if c in r else "" for c in columns)
        lines.append(f"| {name} | {int(count) if count == count else ''} | {cells} |")
    return "\n".join(lines)


def write_json_atomic(path: Path, data: dict) -> None:
    """Never leave a half-written metrics file behind when a run is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
