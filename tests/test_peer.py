"""scripts/peer/: the parts that need no RecBole install (commands, overrides, ratios, the docs section)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "scripts" / "peer"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peer_{name}", PEER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


compare = _load("compare")
run_recbole = _load("run_recbole")  # stdlib-only at import time: recbole is imported inside run()


def _side(ndcg, s_per_epoch, wall, converged=True):
    return {"params": 211008, "epochs": 1, "best_epoch": 0, "best_valid_ndcg@10": 0.05,
            "s_per_epoch": s_per_epoch, "cpu_s_per_epoch": s_per_epoch / 2, "wall_s": wall, "peak_rss_gb": 1.1,
            "test": {"hr@10": 0.1, "ndcg@10": ndcg, "mrr@10": 0.03}, "load_before": (1.0, 2.0, 3.0),
            "load_after": (1.5, 2.0, 3.0), "command": "cmd", "raw": {"recbole_version": "1.2.1"}}


def _report(epoch_cap):
    ours, peer = _side(0.06, 5.0, 60.0), _side(0.05, 90.0, 600.0)
    return {"started": "2026-11-24 16:00", "command": compare.command_line(["--epochs", "1"]),
            "epoch_cap": epoch_cap, "load_start": (1.0, 1.0, 1.0), "load_end": (2.0, 2.0, 2.0),
            "machine": {"cpu": "Test CPU", "logical_cpus": 2, "usable_cpus": 2, "mem_gb": 24.0, "python": "3.11",
                        "torch": "2.13.0", "gpu": None},
            "models": {"sasrec": {"recbole": peer, "ours": ours, "ratios": compare.ratios(ours, peer)}}}


def test_ratios():
    q = compare.ratios(_side(0.06, 5.0, 60.0), _side(0.05, 90.0, 600.0))
    assert q["ndcg_ours_over_recbole"] == pytest.approx(1.2)
    assert q["speedup_s_per_epoch"] == pytest.approx(18.0)
    assert q["speedup_cpu_s_per_epoch"] == pytest.approx(18.0)
    assert q["speedup_wall"] == pytest.approx(10.0)
    assert compare.ratio(1.0, 0.0) is None and compare.ratio(None, 1.0) is None


def test_section_marks_timing_only_accuracy_as_not_converged():
    timing = compare.render_section(_report(epoch_cap=1))
    assert timing.startswith(compare.BEGIN) and timing.rstrip().endswith(compare.END)
    assert "timing only: both capped at 1 epoch" in timing and "† not converged" in timing
    assert "| RecBole 1.2.1 | SASRec | 211,008 | .1000† | .0500† |" in timing
    assert "| SASRec | 1.20x† | 1.00x† | 18.00x | 18.00x | 10.00x |" in timing
    assert "`.venv/bin/python scripts/peer/compare.py --epochs 1`" in timing and "Test CPU, 2 usable" in timing
    full = compare.render_section(_report(epoch_cap=None))
    assert "†" not in full and "full (early stopping" in full and "| SASRec | 1.20x | 1.00x | 18.00x |" in full
    one_side = _report(epoch_cap=None)
    one_side["models"]["sasrec"] = {"ours": one_side["models"]["sasrec"]["ours"]}
    text = compare.render_section(one_side)
    assert "lsti (this repo) | SASRec" in text and "RecBole 1.2.1 |" not in text and "speed-up" not in text


def test_section_names_our_overrides_and_render_rewrites_the_doc(tmp_path):
    assert "ours: windows of 50 scored at every position, our defaults" in compare.render_section(_report(1))
    report = _report(epoch_cap=2)
    report["command"] = compare.command_line(["--epochs", "2", "--ours", "experiment=sasrec_prefix"])
    assert "ours: our defaults with `experiment=sasrec_prefix`" in compare.render_section(report)  # old reports
    report["ours_extra"] = ["optim.lr=0.002"]
    path, doc = tmp_path / "compare.json", tmp_path / "benchmarks.md"
    path.write_text(json.dumps(report))
    doc.write_text("# Benchmarks\n")
    compare.main(["--render", str(path), "--doc", str(doc)])
    assert "ours: our defaults with `optim.lr=0.002`" in doc.read_text()


def test_replace_section_appends_once_and_replaces_in_place():
    doc = "# Benchmarks\n\nintro\n<!-- bench:rows -->\n"
    first = compare.replace_section(doc, f"{compare.BEGIN}\nA\n{compare.END}\n")
    assert first == f"# Benchmarks\n\nintro\n<!-- bench:rows -->\n\n{compare.BEGIN}\nA\n{compare.END}\n"
    with_tail = first + "\n## Later section\n"
    second = compare.replace_section(with_tail, f"{compare.BEGIN}\nB\n{compare.END}\n")
    assert second.count(compare.BEGIN) == 1 and "\nA\n" not in second and "\nB\n" in second
    assert second.endswith(f"{compare.END}\n\n## Later section\n") and second.startswith("# Benchmarks\n\nintro")
    assert compare.replace_section("", f"{compare.BEGIN}\nC\n{compare.END}\n") == f"{compare.BEGIN}\nC\n{compare.END}\n"


def test_commands_and_overrides(tmp_path):
    py = tmp_path / "peer" / "bin" / "python"
    cmd = compare.recbole_command("sasrec", py, tmp_path / "ml-100k", tmp_path / "w", tmp_path / "o.json", 2, nice=19)
    assert cmd[:3] == ["nice", "-n", "19"] and cmd[3] == str(py) and cmd[4].endswith("run_recbole.py")
    assert cmd[cmd.index("--model") + 1] == "SASRec" and cmd[cmd.index("--epochs") + 1] == "2"
    full = compare.recbole_command("gru4rec", py, tmp_path, tmp_path, tmp_path / "o.json", None)
    assert "--epochs" not in full and full[0] == str(py) and "GRU4Rec" in full

    timing = compare.ours_overrides("sasrec", tmp_path, tmp_path / "run", 2, extra=["optim.lr=0.001"])
    assert {"model=sasrec", "model.hidden=64", "model.layers=2", "model.heads=2", "trainer.max_epochs=2",
            "callbacks.early_stopping.patience=0", "seed=2020", "evaluation.filter_seen=false", "loss.name=ce",
            "data.max_len=50", "data.batch_size=256", "optim.lr=0.001"} <= set(timing)
    assert timing[-1] == f"hydra.run.dir={tmp_path / 'run'}"
    converge = compare.ours_overrides("gru4rec", tmp_path, tmp_path / "run", None, cpu=True)
    assert "callbacks.early_stopping.patience=11" in converge and "trainer.max_epochs=300" in converge
    assert "trainer=cpu" in converge and "model.embedding=64" in converge and "model.hidden=128" in converge
    ours = compare.ours_command(timing, python="/x/python")
    assert ours[:2] == ["/x/python", str(PEER / "run_ours.py")]


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
def test_our_overrides_compose_against_the_real_config(tmp_path, model):
    overrides = [o for o in compare.ours_overrides(model, tmp_path, tmp_path / "run", None) if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.seed == 2020 and cfg.data.max_len == 50 and cfg.loss.name == "ce"
    assert cfg.evaluation.filter_seen is False and cfg.data.source.path == str(tmp_path)
    assert cfg.callbacks.early_stopping.patience == 11


def test_args():
    args = compare.parse_args(["--models", "SASRec, gru4rec", "--epochs", "2", "--ours", "optim.lr=0.001"])
    assert args.models == ["sasrec", "gru4rec"] and args.epochs == 2 and args.ours == ["optim.lr=0.001"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--models", "bert4rec"])
    with pytest.raises(SystemExit):
        compare.parse_args(["--epochs", "0"])


def test_recbole_config_follows_the_protocol(tmp_path):
    data = tmp_path / "ml-100k"
    data.mkdir()
    (data / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t4\n")
    cfg = run_recbole.build_config_dict("SASRec", data, "ml-100k", tmp_path / "w", 2, use_gpu=False)
    assert cfg["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"}
    assert cfg["train_neg_sample_args"] is None and cfg["loss_type"] == "CE" and cfg["MAX_ITEM_LIST_LENGTH"] == 50
    assert (cfg["train_batch_size"], cfg["learning_rate"], cfg["stopping_step"], cfg["seed"]) == (256, 0.001, 10, 2020)
    assert cfg["valid_metric"] == "NDCG@10" and cfg["metrics"] == ["Hit", "NDCG", "MRR"] and cfg["topk"] == [10]
    assert (cfg["hidden_size"], cfg["n_layers"], cfg["n_heads"], cfg["epochs"]) == (64, 2, 2, 2)
    assert cfg["data_path"] == str(tmp_path) and cfg["load_col"] == {"inter": ["user_id", "item_id", "rating", "timestamp"]}
    gru = run_recbole.build_config_dict("GRU4Rec", data, "ml-100k", tmp_path / "w", None, use_gpu=False)
    assert (gru["embedding_size"], gru["hidden_size"], gru["epochs"]) == (64, 128, 300)
    (data / "bad.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(SystemExit):
        run_recbole.inter_columns(data / "bad.inter")
    args = run_recbole.parse_args(["--model", "gru4rec", "--epochs", "3"])
    assert args.model == "GRU4Rec" and args.epochs == 3
