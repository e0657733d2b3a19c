"""Compose the real Hydra configs for tests (tiny synthetic data, small models, no loggers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF = str(Path(__file__).resolve().parents[1] / "conf")

TINY = [
    "data=synthetic", "data.source.synthetic.num_users=60", "data.source.synthetic.num_items=50",
    "data.source.synthetic.num_groups=5", "data.source.synthetic.mean_length=12", "data.max_len=10",
    "data.batch_size=32", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
    "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
]
SMALL_MODEL = {
    "sasrec": ["model.hidden=16", "model.inner=32"],
    "gru4rec": ["model.embedding=16", "model.hidden=16"],
    "pop": [],
    "lsti": ["model.hidden=16", "model.inner=32", "model.short_len=3", "model.text.template='{title}'"],
}


def tiny_config(output_dir: Path, model: str = "sasrec", overrides: list[str] | None = None,
                config_name: str = "train") -> DictConfig:
    base = model.split("_")[0] if model.startswith("lsti") else model
    if config_name == "train":
        overrides = [f"model={model}", *TINY, *SMALL_MODEL.get(base, []), *(overrides or [])]
    else:  # evaluate/recommend configs take the data and model from the checkpoint
        overrides = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", *(overrides or [])]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module (scripts is no package, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location(name, Path(CONF).parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
