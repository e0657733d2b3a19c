"""Hydra sweeps: an Optuna sweep with an injected failing trial, a grid multirun, the sweep report, and the
failure handling of training.train.main. The sweeps run the real CLI in a subprocess on a tiny dataset."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from training import sweep_report as sr

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=synthetic", "data.source.synthetic.num_users=60", "data.source.synthetic.num_items=50",
    "data.source.synthetic.num_groups=5", "data.source.synthetic.mean_length=12", "data.max_len=10",
    "data.batch_size=32", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
    "trainer.accelerator=cpu", "trainer.enable_model_summary=false", "model.hidden=16", "model.inner=32",
    "model.layers=1",
]


def _cli(args: list[str], tmp_path: Path, module: str = "training.train") -> subprocess.CompletedProcess:
    env = dict(os.environ, LSTI_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def test_optuna_sweep_records_failed_trial_and_reports(tmp_path, capsys):
    sweep = tmp_path / "optuna"
    # model.heads=3 does not divide hidden=16: the model raises, main() records failed.json and returns None.
    # TPE seed 0 draws heads 1, 3, 1 for the first three trials.
    _cli(["hparams_search=sasrec_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
          "model.heads=choice(1,3)", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)

    trials, _ = sr.collect([sweep])
    assert len(trials) == 3
    for t in trials:
        assert (t.path / ".hydra" / "config.yaml").exists() and (t.path / "train.log").exists()
        if t.params["model.heads"] == "3":
            assert t.status == "failed" and "divisible" in t.reason
            rec = json.loads((t.path / "failed.json").read_text())
            assert rec["type"] == "ValueError" and "Traceback" in rec["traceback"] and rec["multirun"]
            assert "model.heads=3" in rec["overrides"]
            assert not (t.path / "metrics.json").exists()
        else:
            assert t.status == "complete" and 0.0 < t.value <= 1.0
            assert t.value == json.loads((t.path / "metrics.json").read_text())["val/ndcg@10"]
    assert {t.status for t in trials} == {"complete", "failed"}

    assert sr.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    result = sr.report([sweep], tmp_path / "report")
    done = [t for t in trials if t.status == "complete"]
    best = max(done, key=lambda t: t.value)
    assert result["best"].name == best.name
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert math.isclose(optuna["best_value"], best.value)
    assert f"## Best trial: {best.name} (val/ndcg@10 = {best.value:.4f})" in printed
    assert "hparams_search" not in sr.rerun_command(best) and "model=sasrec" in sr.rerun_command(best)
    assert "## Failed trials" in printed and "divisible" in printed
    with open(tmp_path / "report" / "sweep_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows][: len(done)] == [t.name for t in sorted(done, key=lambda t: -t.value)]
    assert {r["trial"]: r["status"] for r in rows} == {t.name: t.status for t in trials}
    assert all(r["val/ndcg@10"] for r in rows if r["status"] == "complete")
    assert "model.heads" in rows[0] and "optim.lr" in rows[0]
    for png in ("sweep_metric_per_trial.png", "sweep_metric_vs_params.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_grid_multirun_report_and_best_command_reproduces(tmp_path):
    sweep = tmp_path / "grid"
    _cli(["-m", *TINY, "model.hidden=8,16", f"hydra.sweep.dir={sweep}"], tmp_path)
    result = sr.report([sweep])
    trials = result["trials"]
    assert [t.status for t in trials] == ["complete", "complete"]
    assert sorted(t.params["model.hidden"] for t in trials) == ["16", "8"]
    assert result["keys"] == ["model.hidden"]
    assert trials[0].value >= trials[1].value and result["best"] is trials[0]
    for t in trials:
        assert f"| {t.name} | complete | {t.value:.4f} |" in result["markdown"]

    # The printed command reproduces the best trial as a single run.
    command = sr.rerun_command(result["best"])
    assert command.startswith("python -m training.train ") and "hydra" not in command
    run_dir = tmp_path / "rerun"
    _cli([*shlex.split(command)[3:], f"hydra.run.dir={run_dir}"], tmp_path)
    again = json.loads((run_dir / "metrics.json").read_text())["val/ndcg@10"]
    assert math.isclose(again, result["best"].value, rel_tol=1e-6)
    # ... and so does the exact replay of its saved config.
    replay = sr.replay_command(result["best"])
    assert replay in result["markdown"]
    _cli([*shlex.split(replay)[3:], f"hydra.run.dir={tmp_path / 'replay'}"], tmp_path)
    again = json.loads((tmp_path / "replay" / "metrics.json").read_text())["val/ndcg@10"]
    assert math.isclose(again, result["best"].value, rel_tol=1e-6)


# --- report on hand-made sweep directories (no training) ---------------------------------------------------


def _fake_trial(root: Path, num: int, overrides: list[str], metrics: dict | None = None, failed: str | None = None):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}, "runtime": {
        "choices": {"model": "sasrec", "hparams_search": "sasrec_optuna", "hydra/sweeper": "optuna"}}}}))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if failed is not None:
        (d / "failed.json").write_text(json.dumps({"type": "OutOfMemoryError", "message": failed}))
    return d


def test_report_interrupted_sweep_and_its_continuation(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _fake_trial(first, 0, ["hparams_search=sasrec_optuna", "optim.lr=0.001"], {"val/ndcg@10": 0.10})
    _fake_trial(first, 1, ["hparams_search=sasrec_optuna", "optim.lr=0.01"], failed="CUDA out of\nmemory")
    _fake_trial(first, 2, ["hparams_search=sasrec_optuna", "optim.lr=0.003"])  # killed: no metrics, no failed.json
    _fake_trial(second, 0, ["hparams_search=sasrec_optuna", "optim.lr=0.002"], {"val/ndcg@10": 0.12})
    _fake_trial(second, 1, ["hparams_search=sasrec_optuna", "optim.lr=0.004"], {"val/ndcg@10": float("nan")})
    (first / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"direction": "maximize", "params": {"optim.lr": "tag(log, interval(0.0003, 0.01))"}},
                   "overrides": {"task": ["hparams_search=sasrec_optuna"]}}}))

    result = sr.report([first, second], tmp_path / "out", plots=False)
    names = [(t.name, t.status) for t in result["trials"]]
    assert names == [("second/0", "complete"), ("first/0", "complete"), ("first/2", "incomplete"),
                     ("first/1", "failed"), ("second/1", "failed")]
    assert result["counts"] == {"complete": 2, "failed": 2, "incomplete": 1}
    assert result["keys"] == ["optim.lr"]
    assert "OutOfMemoryError: CUDA out of memory" in result["markdown"]
    assert "## Incomplete trials" in result["markdown"]
    assert sr.rerun_command(result["best"]) == "python -m training.train model=sasrec optim.lr=0.002"

    low = sr.report([first, second], tmp_path / "out2", direction="minimize", plots=False)
    assert low["best"].name == "first/0"


def test_report_plots_with_categorical_and_failed(tmp_path):
    root = tmp_path / "s"
    _fake_trial(root, 0, ["model.fusion=id", "model.hidden=32"], {"val/ndcg@10": 0.1})
    _fake_trial(root, 1, ["model.fusion=id+text", "model.hidden=64"], {"val/ndcg@10": 0.2})
    _fake_trial(root, 2, ["model.fusion=text", "model.hidden=128"], failed="boom")
    result = sr.report([root])
    assert result["keys"] == ["model.fusion", "model.hidden"] and len(result["pngs"]) == 2
    assert all(p.stat().st_size > 1000 for p in result["pngs"])


def test_report_errors(tmp_path, capsys):
    assert sr.main([str(tmp_path / "missing")]) == 2
    assert "no such sweep directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sr.main([str(empty), "--no-plots"]) == 1


# --- failure handling of training.train.main -------------------------------------------------------------


@pytest.fixture
def bare_main(monkeypatch, tmp_path):
    """training.train.main without the Hydra decorator, with train() replaced."""
    import training.train as T

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")},
                            "callbacks": {"checkpoint": {"monitor": "val/ndcg@10"}}})

    def run(outcome, multirun: bool):
        def fake_train(_cfg):
            if isinstance(outcome, BaseException):
                raise outcome
            return {}, outcome

        monkeypatch.setattr(T, "train", fake_train)
        monkeypatch.setattr(T, "swallow_failures", lambda: multirun)
        return T.main.__wrapped__(cfg)

    return run, tmp_path / "run"


def test_main_single_run_reraises_and_records(bare_main):
    run, run_dir = bare_main
    with pytest.raises(MemoryError):
        run(MemoryError("out of memory"), multirun=False)
    rec = json.loads((run_dir / "failed.json").read_text())
    assert rec["type"] == "MemoryError" and rec["message"] == "out of memory" and "MemoryError" in rec["traceback"]


def test_main_multirun_returns_none_on_failure(bare_main):
    run, run_dir = bare_main
    assert run(RuntimeError("bad combination"), multirun=True) is None
    assert json.loads((run_dir / "failed.json").read_text())["type"] == "RuntimeError"


def test_main_nan_metric_is_a_failed_trial(bare_main):
    run, run_dir = bare_main
    assert run(float("nan"), multirun=True) is None  # NaN would crash hydra-optuna-sweeper 1.3
    rec = json.loads((run_dir / "failed.json").read_text())
    assert rec["type"] == "NonFiniteMetric" and "val/ndcg@10" in rec["message"]
    assert math.isnan(run(float("nan"), multirun=False))


def test_main_success_returns_metric(bare_main):
    run, run_dir = bare_main
    assert run(0.25, multirun=True) == 0.25
    assert not (run_dir / "failed.json").exists()


def test_swallow_failures_outside_hydra_and_distributed(monkeypatch):
    assert sr.swallow_failures() is False  # no Hydra context: a plain call re-raises
    monkeypatch.setattr(sr, "_hydra_job", lambda: (True, [], 0))
    assert sr.swallow_failures() is True
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sr.swallow_failures() is False


def test_search_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, model in (("sasrec_optuna", "SASRecConfig"), ("lsti_optuna", "LSTIConfig")):
            cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
            sweeper = cfg.hydra.sweeper
            assert sweeper.direction == "maximize" and sweeper.storage is None
            assert sweeper.sampler.seed is not None and sweeper.max_failure_rate == 1.0
            assert sweeper.n_trials > 0 and sweeper.n_jobs >= 1 and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
            assert cfg.model._target_.endswith(model) and cfg.callbacks.checkpoint.monitor == "val/ndcg@10"
            assert {"optim.lr", "model.hidden", "model.layers", "model.dropout"} <= set(sweeper.params)
        assert {"model.short_len", "model.fusion"} <= set(sweeper.params)
