"""The optional torch.compile switch (`compile.enabled`): off by default, same checkpoints, skipped under DeepSpeed.

The `eager` backend runs the TorchDynamo capture without code generation, so these stay fast; inductor is
measured with the bench harness (docs/benchmarks.md, compile section)."""

import pytest
import torch

from tests.helpers import tiny_config
from training.module import LitRecommender, compile_model
from training.train import build_datamodule, item_tensors, train

EAGER = ["compile.enabled=true", "compile.backend=eager"]


def _lit(cfg) -> tuple[LitRecommender, dict]:
    dm = build_datamodule(cfg)
    tensors, info = item_tensors(cfg, dm)
    lit = LitRecommender(model=cfg.model, info=info, optim=cfg.optim, loss=cfg.loss, evaluation=cfg.evaluation,
                         item_tensors=tensors)
    return lit, next(iter(dm.train_dataloader()))


def test_compile_is_off_by_default(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.compile.enabled is False
    lit, _ = _lit(cfg)
    assert not compile_model(lit.model, cfg.compile) and not compile_model(lit.model, None)


def test_compiled_model_same_loss_and_state_dict_keys(tmp_path):
    cfg = tiny_config(tmp_path, overrides=EAGER)
    lit, batch = _lit(cfg)
    lit.eval()  # no dropout: the two losses must match exactly
    keys = set(lit.state_dict())
    with torch.no_grad():
        eager = lit.training_step(batch, 0)
    assert compile_model(lit.model, cfg.compile)
    assert type(lit.model).__name__ == "SASRec" and set(lit.state_dict()) == keys
    assert not any("_orig_mod" in k for k in lit.state_dict())
    with torch.no_grad():
        compiled = lit.training_step(batch, 0)
    torch.testing.assert_close(compiled, eager)


def test_checkpoint_trained_with_compile_loads_without_it(tmp_path):
    from training.checkpoints import load_module

    results, _ = train(tiny_config(tmp_path, overrides=[*EAGER, "trainer.max_epochs=1"]))
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)
    lit = load_module(ckpt)  # a plain (uncompiled) module: strict load
    assert set(lit.state_dict()) >= set(state) and "test/ndcg@10" in results


def test_compile_is_skipped_under_deepspeed(tmp_path):
    class DeepSpeedStrategyStandIn:
        pass

    lit, _ = _lit(tiny_config(tmp_path))
    with pytest.warns(UserWarning, match="DeepSpeed"):
        assert not compile_model(lit.model, {"enabled": True}, DeepSpeedStrategyStandIn())


def test_bench_times_the_compiled_model(tmp_path):
    from training.bench import run_bench

    cfg = tiny_config(tmp_path, "sasrec", [*EAGER, "+bench.steps=2", "+bench.warmup=1", "+bench.eval=false",
                                           "+bench.bf16=false", "+bench.item_chunk_size=null", "+bench.write_doc=false"])
    r = run_bench(cfg)
    assert r["compiled"] and r["step_ms"] > 0 and r["warmup_s"] > 0
