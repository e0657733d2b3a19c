"""Plot test NDCG@10 of the global model per round for several federated runs, against centralized runs.

    python scripts/plot_federated.py --out docs/federated_ndcg_per_round.png \
        --run "from scratch, FedAvg=outputs/federated_ref/scratch_fedavg" \
        --central "centralized, 30 epochs=outputs/federated_ref/central30/metrics.json"

Each `--run LABEL=DIR` reads `DIR/rounds.csv` (written by `python -m federated.simulate`); each
`--central LABEL=FILE` reads `test/ndcg@10` from a `metrics.json` of `python -m training.train` and draws
it, and 85% of it (the from-scratch target of docs/federated.md), as horizontal lines.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def labelled(value: str) -> tuple[str, Path]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"{value!r}: expected LABEL=PATH")
    label, path = value.rsplit("=", 1)
    return label, Path(path)


def round_curve(run_dir: Path, metric: str = "test/ndcg@10") -> list[tuple[int, float]]:
    path = run_dir / "rounds.csv"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: is {run_dir} a federated.simulate run directory?")
    with path.open() as f:
        return [(int(r["round"]), float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=labelled, action="append", default=[], help="LABEL=federated run directory")
    ap.add_argument("--central", type=labelled, action="append", default=[], help="LABEL=central metrics.json")
    ap.add_argument("--title", default="MovieLens-100k, SASRec, 50 non-IID clients")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, run_dir in args.run:
        ax.plot(*zip(*round_curve(run_dir)), marker="o", ms=3, label=label)
    for i, (label, path) in enumerate(args.central):
        value = json.loads(path.read_text())["test/ndcg@10"]
        color = f"C{len(args.run) + i}"
        ax.axhline(value, color=color, linestyle=":", label=f"{label} ({value:.4f})")
        ax.axhline(0.85 * value, color=color, linestyle="-.", alpha=0.5, label=f"85% of it ({0.85 * value:.4f})")
    ax.set_xlabel("round (0 = initial global model)")
    ax.set_ylabel("test NDCG@10 of the global model")
    ax.set_title(args.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
