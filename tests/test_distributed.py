"""Multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO-2/3, exact distributed evaluation, exact resume.

Every distributed run is a real `torchrun --nproc_per_node=2 -m training.train ...` (processes created outside
Lightning, as on a cluster) on a tiny synthetic dataset. Each launch gets a free MASTER_PORT, a timeout that
kills its whole process group, and its own log file (shown when it fails). DeepSpeed compiles a C++ op the first
time (about 30 s; cached in TORCH_EXTENSIONS_DIR, which these tests keep outside the per-session cache).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Outside the per-session LSTI_CACHE_DIR (conftest), so the DeepSpeed op compiles once per machine, not per run.
TORCH_EXT = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
    Path(os.environ.get("LSTI_CACHE_DIR") or Path.home() / ".cache" / "lsti").expanduser() / "torch_extensions")
TIMINGS: dict[str, float] = {}

# 60 users, 50 items; with 2 processes and batch 16: 3 training batches per rank and epoch, 6 steps in 2 epochs.
# eval batch 7: 9 evaluation batches, split 4/5 between the ranks, so rank 0 runs a padding batch.
OVERRIDES = [
    "model=sasrec", "model.hidden=16", "model.inner=32", "data=synthetic", "data.source.synthetic.num_users=60",
    "data.source.synthetic.num_items=50", "data.source.synthetic.num_groups=5", "data.source.synthetic.mean_length=12",
    "data.max_len=10", "data.batch_size=16", "data.eval_batch_size=7", "trainer.max_epochs=2", "logger=none",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "optim.scheduler=cosine", "optim.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
]
FAIL_AFTER = 4  # step 4 = epoch 1 after its first batch: a mid-epoch kill


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(name: str, run_dir: Path, overrides: list[str], cache: Path, entry: str = "training.train",
             nproc: int = 2, env: dict | None = None, expect_ok: bool = True, timeout: int = 600) -> int:
    """Run `torchrun -m <entry>` in its own process group; returns the exit code (asserts success by default)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--max_restarts=0", "-m", entry,
           *overrides, f"trainer.devices={nproc}", f"hydra.run.dir={run_dir}",
           f"hydra.job.name={entry.rsplit('.', 1)[-1]}_rank${{oc.env:RANK,0}}"]
    full_env = {**os.environ, "LSTI_CACHE_DIR": str(cache), "TORCH_EXTENSIONS_DIR": TORCH_EXT,
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if "LSTI_FAIL_AFTER_STEPS" not in (env or {}):
        full_env.pop("LSTI_FAIL_AFTER_STEPS", None)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{name}: no result after {timeout} s (hung collective?); log {log_path}:\n"
                        f"{log_path.read_text()[-4000:]}")
    TIMINGS[name] = time.perf_counter() - t0
    print(f"[timing] {name}: {TIMINGS[name]:.1f} s", file=sys.stderr)
    if expect_ok and rc != 0:
        pytest.fail(f"{name} exited with {rc}; log {log_path}:\n{log_path.read_text()[-6000:]}")
    return rc


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _eval_in_process(tmp: Path, ckpt: Path, split: str = "test", **evaluation) -> dict:
    from training.evaluate import evaluate

    cfg = tiny_config(tmp, config_name="evaluate")
    cfg.ckpt = str(ckpt)
    cfg.split = split
    cfg.evaluation = dict(evaluation)
    return evaluate(cfg)


def _zero_client_state(ckpt_dir: Path) -> dict:
    tag = (ckpt_dir / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (ckpt_dir / tag / name).is_file():
            return torch.load(ckpt_dir / tag / name, map_location="cpu", weights_only=False)
    raise AssertionError(f"no model states in {ckpt_dir}")


# ----------------------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    run = base / "run"
    torchrun("ddp_fit_test", run, [*OVERRIDES, "strategy=ddp"], tmp_path_factory.getbasetemp() / "lsti-cache")
    return run


@pytest.mark.timeout(900)
def test_ddp_two_processes_fit_and_test(ddp_run):
    saved = metrics(ddp_run)
    assert saved["test/num_queries"] == 60 and saved["val/num_queries"] == 60  # no query lost or doubled
    assert 0.0 <= saved["test/ndcg@10"] <= saved["test/hr@10"] <= 1.0
    assert (ddp_run / "checkpoints" / "best.ckpt").is_file()
    # both ranks ran in the one run directory; only rank 0 wrote results
    assert (ddp_run / "train_rank0.log").exists() and (ddp_run / "train_rank1.log").exists()
    assert sorted(p.name for p in ddp_run.parent.rglob("metrics.json")) == ["metrics.json"]


@pytest.mark.timeout(600)
def test_one_process_equals_two_processes_exactly(ddp_run, tmp_path):
    """The run tested its best checkpoint in 2 processes; 1 process on the same checkpoint gives the same bits."""
    two = metrics(ddp_run)
    ckpt = ddp_run / "checkpoints" / "best.ckpt"
    one_test = _eval_in_process(tmp_path / "t", ckpt)
    one_val = _eval_in_process(tmp_path / "v", ckpt, split="valid")
    for one, prefix in ((one_test, "test/"), (one_val, "val/")):
        keys = [k for k in two if k.startswith(prefix)]
        assert len(keys) > 50
        assert {k: one[k] for k in keys} == {k: two[k] for k in keys}
    # bounded-memory scoring (items in chunks) ranks the same
    chunked = _eval_in_process(tmp_path / "c", ckpt, item_chunk_size=16)
    assert chunked["test/ndcg@10"] == one_test["test/ndcg@10"] and chunked["test/hr@20"] == one_test["test/hr@20"]


# ----------------------------------------------------------------------------------------------- ZeRO
@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_runs(request, tmp_path_factory) -> dict:
    """An uninterrupted 2-process ZeRO run, and the same run killed after step 4 then resumed (ckpt_path=latest)."""
    stage = request.param
    base = tmp_path_factory.mktemp(f"zero{stage}")
    cache = tmp_path_factory.getbasetemp() / "lsti-cache"
    over = [*OVERRIDES, f"strategy=deepspeed_zero{stage}"]
    torchrun(f"zero{stage}_fit", base / "full", over, cache)
    rc = torchrun(f"zero{stage}_killed", base / "resumed", over, cache,
                  env={"LSTI_FAIL_AFTER_STEPS": str(FAIL_AFTER)}, expect_ok=False)
    killed_ckpts = sorted(p.name for p in (base / "resumed" / "checkpoints").iterdir())
    killed_state = _zero_client_state(base / "resumed" / "checkpoints" / f"step-{FAIL_AFTER}.ckpt")
    killed_had_metrics = (base / "resumed" / "metrics.json").exists()
    torchrun(f"zero{stage}_resume", base / "resumed", [*over, "ckpt_path=latest"], cache)
    return {"stage": stage, "full": base / "full", "resumed": base / "resumed", "killed_rc": rc,
            "killed_ckpts": killed_ckpts, "killed_state": killed_state, "killed_had_metrics": killed_had_metrics}


@pytest.mark.timeout(1200)
def test_zero_fit_validate_checkpoint_export_evaluate(zero_runs, tmp_path):
    from training.checkpoints import load_checkpoint_dict
    from training.export import main as export_main

    run = zero_runs["full"]
    saved = metrics(run)  # written after validate + test at the best checkpoint (ZeRO-3: consolidated weights)
    assert saved["val/num_queries"] == 60 and saved["test/num_queries"] == 60
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_dir() and (best / "latest").is_file()  # a sharded ZeRO checkpoint
    assert (run / "checkpoints" / "last.ckpt").is_dir()
    out = tmp_path / "best-fp32.ckpt"
    assert export_main([f"ckpt={best}", f"out={out}"]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=False)
    assert exported["exported_from"]["zero_stage"] == zero_runs["stage"]
    assert exported["state_dict"]["item_counts"].dtype == torch.int64
    assert {"state_dict", "hyper_parameters"} <= set(exported)
    assert set(load_checkpoint_dict(best)["state_dict"]) == set(exported["state_dict"])  # the directory reads too
    again = _eval_in_process(tmp_path / "eval", out)
    assert {k: again[k] for k in saved if k.startswith("test/")} == {k: v for k, v in saved.items()
                                                                      if k.startswith("test/")}


@pytest.mark.timeout(1200)
def test_zero_kill_mid_epoch_and_resume_is_exact(zero_runs):
    assert zero_runs["killed_rc"] != 0 and not zero_runs["killed_had_metrics"]
    assert f"step-{FAIL_AFTER}.ckpt" in zero_runs["killed_ckpts"]
    state = zero_runs["killed_state"]
    assert state["global_step"] == FAIL_AFTER
    assert state["SeqDataModule"]["train"] == {"epoch": 1, "batches": 1}  # mid-epoch: 1 of 3 batches done
    assert "RNGStateCallback" in state["callbacks"] and len(state["callbacks"]["RNGStateCallback"]["states"]) == 2
    assert metrics(zero_runs["resumed"]) == metrics(zero_runs["full"])


# ----------------------------------------------------------------------------------------------- slow extras
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ddp_kill_and_resume_and_torchrun_evaluate(tmp_path):
    cache = tmp_path / "cache"
    over = [*OVERRIDES, "strategy=ddp", "loss.name=bce"]  # bce draws per-target negatives: per-rank RNG streams
    torchrun("ddp_full", tmp_path / "full", over, cache)
    torchrun("ddp_killed", tmp_path / "resumed", over, cache, env={"LSTI_FAIL_AFTER_STEPS": "3"}, expect_ok=False)
    torchrun("ddp_resume", tmp_path / "resumed", [*over, "ckpt_path=latest"], cache)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "best.ckpt"
    torchrun("ddp_evaluate", tmp_path / "eval", [f"ckpt={ckpt}", "strategy=ddp", "trainer.accelerator=cpu",
                                                  "trainer.enable_progress_bar=false"], cache,
             entry="training.evaluate")
    full = metrics(tmp_path / "full")
    assert metrics(tmp_path / "eval") == {k: v for k, v in full.items() if k.startswith("test/")}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("strategy", ["deepspeed_zero1", "deepspeed_zero2_offload", "deepspeed_zero3_offload"])
def test_other_zero_configs_train_on_cpu(tmp_path, strategy):
    torchrun(strategy, tmp_path / "run", [*OVERRIDES, f"strategy={strategy}"], tmp_path / "cache")
    assert metrics(tmp_path / "run")["test/num_queries"] == 60


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_json_with_bf16_sets_trainer_precision(tmp_path):
    cfg_file = tmp_path / "ds.json"
    cfg_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                    "gradient_accumulation_steps": "auto"}))
    torchrun("zero2_json_bf16", tmp_path / "run", [*OVERRIDES, "strategy=deepspeed_zero2",
                                                   f"strategy.config_file={cfg_file}"], tmp_path / "cache")
    assert metrics(tmp_path / "run")["test/num_queries"] == 60


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lightning_launcher_single_run(tmp_path):
    """Without torchrun, Lightning relaunches `python -m training.train ...` for rank 1 (fine outside multirun)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train", *OVERRIDES, "strategy=ddp", "trainer.devices=2",
           f"hydra.run.dir={run}"]
    env = {**os.environ, "LSTI_CACHE_DIR": str(tmp_path / "cache"), "MASTER_PORT": str(_free_port()),
           "HF_HUB_OFFLINE": "1"}
    env.pop("LSTI_FAIL_AFTER_STEPS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert metrics(run)["test/num_queries"] == 60


# ----------------------------------------------------------------------------------------------- fast units
def test_eval_shards_are_whole_global_batches_with_equal_counts(monkeypatch):
    import training.data.datamodule as dmod
    from training.data.datamodule import ShardedBatchSampler

    for size, batch in ((60, 7), (100, 10), (5, 7), (64, 8)):
        monkeypatch.setattr(dmod, "_dist", lambda: (0, 1))
        single = [b.tolist() for b in ShardedBatchSampler(size, batch, shuffle=False)]
        for world in (2, 3, 4):
            per_rank = []
            for rank in range(world):
                monkeypatch.setattr(dmod, "_dist", lambda r=rank, w=world: (r, w))
                s = ShardedBatchSampler(size, batch, shuffle=False)
                batches = [b.tolist() for b in s]
                assert len(batches) == len(s)
                per_rank.append(batches)
            assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of forward passes
            real = [b for batches in per_rank for b in batches if b != [ShardedBatchSampler.PAD]]
            assert real == single  # the very batches of one process, in order


def test_resume_skips_only_the_trained_batches_of_that_epoch():
    from training.data.datamodule import ShardedBatchSampler

    s = ShardedBatchSampler(50, 8, shuffle=True, seed=3)
    s.set_epoch(2)
    full = [b.tolist() for b in s]
    s.resume_at(2, 3)
    assert [b.tolist() for b in s] == full[3:]
    assert [b.tolist() for b in s] == full  # one-shot
    s.resume_at(1, 3)  # a position in another epoch does not apply
    assert [b.tolist() for b in s] == full


def test_strategy_configs_build_and_pick_the_cpu_deepspeed_class(monkeypatch):
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from tests.helpers import CONF
    from training.strategies import CPUDeepSpeedStrategy, build_strategy, zero_stage

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # unset: defaults to $LSTI_CACHE_DIR/torch_extensions

    def build(*over):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return build_strategy(compose(config_name="train", overrides=list(over)).strategy)

    assert build("strategy=single") == "auto"
    assert isinstance(build("strategy=ddp"), DDPStrategy)
    assert isinstance(build("strategy=fsdp"), FSDPStrategy)
    for name, stage in (("deepspeed_zero1", 1), ("deepspeed_zero2", 2), ("deepspeed_zero2_offload", 2),
                        ("deepspeed_zero3", 3), ("deepspeed_zero3_offload", 3)):
        s = build(f"strategy={name}", "trainer.accelerator=cpu", "data.batch_size=64")
        assert isinstance(s, CPUDeepSpeedStrategy) and zero_stage(s) == stage
        assert s.config["train_micro_batch_size_per_gpu"] == 64
    gpu = build("strategy=deepspeed_zero3_offload", "trainer.accelerator=gpu")
    assert type(gpu) is DeepSpeedStrategy
    assert gpu.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    nvme = build("strategy=deepspeed_zero3", "strategy.offload_optimizer=nvme", "strategy.offload_parameters=nvme",
                 "strategy.nvme_path=/scratch/nvme", "trainer.accelerator=cpu")
    assert nvme.config["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/scratch/nvme"
    assert nvme.config["zero_optimization"]["offload_param"]["device"] == "nvme"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(os.environ["LSTI_CACHE_DIR"]) / "torch_extensions")


def test_deepspeed_json_and_precision_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    from training.strategies import deepspeed_config, deepspeed_strategy, precision_for_strategy

    with pytest.raises(ValueError, match="offload_parameters needs ZeRO stage 3"):
        deepspeed_config(stage=2, offload_parameters="cpu")
    with pytest.raises(ValueError, match="use null, cpu or nvme"):
        deepspeed_config(stage=2, offload_optimizer="disk")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        deepspeed_strategy(accelerator="cpu", config_file=str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        deepspeed_strategy(accelerator="cpu", config_file=str(tmp_path / "missing.json"))
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                                "gradient_accumulation_steps": "auto"}))
    s = deepspeed_strategy(accelerator="cpu", config_file=str(good))
    assert "gradient_accumulation_steps" not in s.config and s.config["zero_allow_untested_optimizer"]
    assert precision_for_strategy(s, "32-true") == "bf16-mixed"
    assert precision_for_strategy(deepspeed_strategy(accelerator="cpu", stage=2), "32-true") == "32-true"
    assert precision_for_strategy("auto", "32-true") == "32-true"


def test_latest_checkpoint_resolution(tmp_path):
    from training.resume import resolve_ckpt_path

    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"
    assert resolve_ckpt_path("latest", tmp_path) is None  # nothing yet: start from scratch
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "best.ckpt").write_bytes(b"x")
    os.utime(ck / "best.ckpt", (1, 1))
    (ck / "step-8.ckpt").mkdir()  # an incomplete ZeRO directory (no 'latest'): ignored
    (ck / "last.ckpt").mkdir()
    (ck / "last.ckpt" / "latest").write_text("checkpoint")
    assert resolve_ckpt_path("latest", tmp_path) == str(ck / "last.ckpt")


def test_export_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    from training.export import ExportError, consolidate_zero_checkpoint, main

    with pytest.raises(ExportError, match="not a DeepSpeed ZeRO checkpoint"):
        consolidate_zero_checkpoint(tmp_path)
    assert main(["ckpt=" + str(tmp_path / "nope"), "out=" + str(tmp_path / "o.ckpt")]) == 1
    assert main(["checkpoint=x"]) == 2
    assert "usage" in capsys.readouterr().err
