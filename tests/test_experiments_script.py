"""scripts/experiments.py: reuse of finished runs, --report-only, the table's cells."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "scripts" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_only_reuses_finished_runs_and_starts_nothing(tmp_path):
    ex = _load()
    run = tmp_path / "sasrec" / "seed1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"test/ndcg@10": 0.05, "test/hr@10": 0.1, "epochs": 12}))
    assert ex.run_one("sasrec", ["model=sasrec"], 1, tmp_path, [], report_only=True)["test/ndcg@10"] == 0.05
    assert ex.run_one("sasrec", ["model=sasrec"], 2, tmp_path, [], report_only=True) is None
    assert not (tmp_path / "sasrec" / "seed2").exists()


def test_table_cells():
    ex = _load()
    one = {"a": [{"test/ndcg@10": 0.05, "test/hr@10": 0.1}]}
    two = {"b": [{"test/ndcg@10": 0.04, "test/hr@10": 0.1}, {"test/ndcg@10": 0.06, "test/hr@10": 0.1}]}
    text = ex.table("ablations", {**one, **two}, [1, 2], [])
    row_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    row_b = next(line for line in text.splitlines() if line.startswith("| b |"))
    assert "0.0500 |" in row_a and "±" not in row_a  # one run: no spread
    assert "0.0500 ± 0.0141" in row_b  # sample std of .04 and .06
    assert "| - |" in row_a  # slices without values (e.g. no user with <= 5 items)
