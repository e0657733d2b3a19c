"""scripts/experiments.py: reuse of finished runs, --report-only, the table's cells."""

import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script("experiments")


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
    assert "Runs made with: not recorded (3 runs)." in text


def test_table_names_the_environments_its_runs_were_made_with(tmp_path):
    ex = _load()
    env = {"git": {"commit": "b" * 40, "dirty": False}, "packages": {"torch": "2.13.0"},
           "hardware": {"torch_cpu_capability": "AVX2", "torch_threads": 1, "cuda_devices": []}}
    for seed in (1, 2):
        run = tmp_path / "sasrec" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"test/ndcg@10": 0.05, "epochs": 12}))
    (tmp_path / "sasrec" / "seed1" / "environment.json").write_text(json.dumps(env))
    _, results = ex.finished("ablations", tmp_path, [1, 2])
    text = ex.table("ablations", results, [1, 2], [])
    assert "Runs made with: bbbbbbb, torch 2.13.0, AVX2 x1, cpu (1 runs); not recorded (1 runs)." in text


def test_every_suite_configuration_composes():
    """A typo in a suite's overrides would otherwise surface only after hours of earlier runs."""
    from hydra import compose, initialize_config_dir

    ex = _load()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for suite, configs in ex.SUITES.items():
            for name, overrides in configs.items():
                cfg = compose(config_name="train", overrides=[*overrides, *ex.SUITE_EXTRA.get(suite, [])])
                assert cfg.model._target_, (suite, name)


def test_coldstart_seeds_hold_out_different_items_and_pool_their_hits(tmp_path, monkeypatch):
    ex = _load()
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        run_dir = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"test/items_unseen/hr@10": 0.25,
                                                          "test/items_unseen/count": 8}))
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(ex.subprocess, "run", fake_run)
    runs = [ex.run_one("lsti text", ["model=lsti_text_only"], s, tmp_path, ex.SUITE_EXTRA["coldstart"],
                       suite="coldstart") for s in (1, 2)]
    assert "data.preprocess.cold_item_seed=0" in calls[0] and "data.preprocess.cold_item_seed=1" in calls[1]
    text = ex.table("coldstart", {"lsti text": runs}, [1, 2], [])
    assert "| 4/16 |" in text  # 2 hits of 8 targets on each seed


def test_the_table_keeps_every_finished_run_of_the_suite(tmp_path):
    """Running one more configuration or seed (--only / --seeds) must not drop rows measured before."""
    ex = _load()
    for name, seed in [("sasrec", 1), ("sasrec", 2), ("lsti", 3)]:
        run = tmp_path / name / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"test/ndcg@10": 0.05 + seed / 100}))
    seeds, results = ex.finished("ablations", tmp_path, [3])
    assert seeds == [1, 2, 3]
    assert list(results) == ["sasrec", "lsti"]  # suite order
    assert [r["test/ndcg@10"] for r in results["sasrec"]] == pytest.approx([0.06, 0.07])
