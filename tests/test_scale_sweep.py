"""scripts/scale_sweep.py: the --quick flow end to end with stand-in subprocesses, and its real pieces."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_sweep", ROOT / "scripts" / "scale_sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules.setdefault("scale_sweep", sweep)  # dataclasses look their module up
spec.loader.exec_module(sweep)


def _fake_prepare(overrides, run_dir, timeout):
    items = int(next(o for o in overrides if "num_items=" in o).split("=")[1])
    users = int(next(o for o in overrides if "num_users=" in o).split("=")[1])
    return {"interactions": users * sweep.MEAN_LENGTH, "num_items": items, "steps_per_epoch": max(users // 256, 1),
            "max_targets": 10_000, "positions": 12_800, "hidden": 64, "num_negatives": 256, "prepare_s": 0.0}


def _fake_bench(overrides, run_dir, timeout):
    get = {o.split("=")[0]: o.split("=")[1] for o in overrides}
    if get["data.source.synthetic.num_users"] == "20" and get["loss.name"] == "sampled":
        raise RuntimeError("rc -9: killed (SIGKILL: out of memory?)")
    items = int(get["data.source.synthetic.num_items"])
    step = 100.0 + (items if get["loss.name"] == "ce" else 1.0)
    return {"num_items": items, "interactions": int(get["data.source.synthetic.num_users"]) * 50,
            "loss": get["loss.name"], "step_ms": step, "epoch_s": step / 100, "steps_per_epoch": 1,
            "data_wait_share": 0.01, "peak_rss_gb": 1.0 + items / 1e4}


def test_quick_sweep_records_skips_failures_and_replaces_its_section(tmp_path):
    big_ce = sweep.estimate_gb("ce", _fake_prepare(sweep.data_overrides(3_000, 1_000), None, 0))
    big_sampled = sweep.estimate_gb("sampled", _fake_prepare(sweep.data_overrides(3_000, 1_000), None, 0))
    assert big_ce > big_sampled
    budget = (big_ce + big_sampled) / 2  # the ce point at 1,000 items does not fit
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept above\n")
    argv = ["--quick", "--out-dir", str(tmp_path / "out"), "--doc", str(doc), "--run-dir", str(tmp_path / "runs"),
            "--mem-budget-gb", str(budget)]
    summary = sweep.main(argv, prepare_fn=_fake_prepare, bench_fn=_fake_bench)
    status = {(p["target_interactions"], p["target_items"], p["loss"]): p["status"] for p in summary["points"]}
    assert len(status) == 9  # 3 (interactions, items) pairs x 3 losses: (3000, 100) is in both sweeps, runs once
    assert status[(3_000, 1_000, "ce")].startswith("not run: needs ~")
    assert status[(1_000, 100, "sampled")].startswith("failed: rc -9")
    assert status[(3_000, 100, "ce")] == "ok"
    saved = json.loads((tmp_path / "out" / "scale_sweep.json").read_text())
    assert len(saved["points"]) == 9 and saved["load_before"]
    for name in ("scale_interactions.png", "scale_items.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    sweep.main(argv, prepare_fn=_fake_prepare, bench_fn=_fake_bench)  # rerun: replaced, not appended
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n")
    assert text.count(sweep.BEGIN) == 1 and text.count(sweep.END) == 1
    assert "not run: needs ~" in text and "out/scale_items.png" in text and "extrapolated" in text


def test_sweep_overrides_are_valid_bench_configs_and_prepare_measures_the_data(tmp_path):
    from hydra import compose, initialize_config_dir

    point = sweep.points(sweep.QUICK)[0]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=sweep.bench_overrides(point, 2, 1))
    assert point["loss"] == "ce" and cfg.loss.name == "ce" and cfg.bench.write_doc is False and cfg.bench.eval is False
    assert cfg.data.source.synthetic.num_items == point["target_items"]
    info = sweep.prepare(sweep.data_overrides(point["target_interactions"], point["target_items"]))
    assert info["interactions"] == pytest.approx(point["target_interactions"], rel=0.3)
    assert 0 < info["max_targets"] <= info["positions"] and info["steps_per_epoch"] >= 1
    assert sweep.estimate_gb("ce", info) > 0 and sweep.estimate_gb("sampled", info) > 0
    sparse = next(p for p in sweep.points(sweep.QUICK) if p["loss"] == "sparse")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=sweep.bench_overrides(sparse, 2, 1))
    assert cfg.loss.name == "sampled" and cfg.optim.sparse_item_grad is True
