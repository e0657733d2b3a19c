"""Every conf/experiment/*.yaml composes with conf/train.yaml and sets what its header promises."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_composes(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    assert cfg.model._target_ and cfg.data._target_


def test_sasrec_recbole_is_the_per_prefix_regime():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=sasrec_recbole"])
    assert cfg.data.train_stride == 1 and cfg.optim.lr == 0.001 and cfg.optim.warmup_steps == 0
    assert cfg.model._target_.endswith("SASRecConfig")


def test_sasrec_prefix_shares_prefix_windows_with_absolute_positions():
    """share_prefix_window equals per-prefix training only with positions counted from the oldest event."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=sasrec_prefix"])
    assert cfg.data.train_stride == 1 and cfg.data.share_prefix_window
    assert cfg.model.positions == "absolute" and cfg.model.norm == "post" and cfg.model.ff_dropout == "output"
    assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.lr == 0.001
    assert cfg.trainer.gradient_clip_val is None and cfg.callbacks.early_stopping.patience == 18


@pytest.mark.parametrize("model", [None, "lsti_no_text", "lsti_short_only"])
def test_lsti_prefix_uses_sasrec_prefix_recipe_for_the_model_and_its_ablations(model):
    """LSTI vs SASRec compares models, not recipes: every shared training setting is the same."""
    extra = [f"model={model}"] if model else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        lsti = compose(config_name="train", overrides=["experiment=lsti_prefix", *extra])
        sasrec = compose(config_name="train", overrides=["experiment=sasrec_prefix"])
    assert lsti.model._target_.endswith("LSTIConfig")
    if model:
        assert lsti.model.fusion == "id" or not lsti.model.use_long
    for group in ("data", "optim", "trainer", "callbacks", "loss", "evaluation"):
        assert lsti[group] == sasrec[group], group
    for key in ("norm", "positions", "ff_dropout", "hidden", "layers", "heads", "inner", "dropout", "attn_dropout"):
        assert lsti.model[key] == sasrec.model[key], key


def test_lsti_crop_and_sasrec_crop_share_the_data_recipe():
    """The short-history recipe: both models see the same cut windows; only LSTI's gate is told the length."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        lsti = compose(config_name="train", overrides=["experiment=lsti_crop"])
        sasrec = compose(config_name="train", overrides=["experiment=sasrec_crop"])
        default = compose(config_name="train", overrides=["model=lsti"])
    assert lsti.model._target_.endswith("LSTIConfig") and sasrec.model._target_.endswith("SASRecConfig")
    assert lsti.data.train_history_crop == sasrec.data.train_history_crop == 0.3
    assert lsti.model.gate_length and not default.model.gate_length
    for group in ("data", "optim", "trainer", "callbacks", "loss", "evaluation"):
        assert lsti[group] == sasrec[group], group
    # everything else is the default recipe
    assert {k: v for k, v in lsti.data.items() if k != "train_history_crop"} == \
        {k: v for k, v in default.data.items() if k != "train_history_crop"}
