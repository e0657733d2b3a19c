"""One consolidated checkpoint file from any checkpoint form (DeepSpeed ZeRO directory or Lightning .ckpt).

    python -m training.export ckpt=outputs/train/<run>/checkpoints/best.ckpt out=best-fp32.ckpt

A ZeRO checkpoint is a directory of per-rank shards (`<dir>/latest`, `<dir>/checkpoint/*model_states.pt`,
`*optim_states.pt`). The full fp32 weights are rebuilt with DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint` (stages 1, 2 and 3; bf16 runs give their fp32 master weights) and
written with the run's `hyper_parameters`, i.e. a Lightning-style file that `training.evaluate`,
`training.checkpoints.load_module` and federated fine-tuning read like any other. No GPU and no process group
are needed: it runs on the login node. Optimizer state is not kept (resume from the ZeRO directory itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

KEEP = ("hyper_parameters", "epoch", "global_step", "pytorch-lightning_version", "hparams_name")


class ExportError(ValueError):
    pass


def is_zero_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(p.glob("*/*mp_rank_*_model_states.pt")))


def _tag(path: Path) -> str:
    latest = path / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    tags = sorted({f.parent.name for f in path.glob("*/*mp_rank_*_model_states.pt")})
    if len(tags) != 1:
        raise ExportError(f"{path}: no 'latest' file and {len(tags)} checkpoint tags ({tags}); pass a directory "
                          "written by a DeepSpeed run of training.train (checkpoints/best.ckpt or last.ckpt).")
    return tags[0]


def consolidate_zero_checkpoint(path: str | Path, quiet: bool = True) -> dict[str, Any]:
    """{state_dict (fp32 weights + buffers), hyper_parameters, epoch, global_step, ...} from a ZeRO directory."""
    p = Path(path)
    if not is_zero_checkpoint(p):
        raise ExportError(f"{p} is not a DeepSpeed ZeRO checkpoint directory (expected 'latest' and "
                          "<tag>/*mp_rank_00_model_states.pt inside).")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _tag(p)
    # rank 0's model states: mp_rank_00_model_states.pt (stages 1/2) or zero_pp_rank_0_mp_rank_00_... (stage 3)
    model_files = [f for f in ((p / tag) / "mp_rank_00_model_states.pt",
                               (p / tag) / "zero_pp_rank_0_mp_rank_00_model_states.pt") if f.is_file()]
    if not model_files:
        raise ExportError(f"{p / tag}: no mp_rank_00_model_states.pt (the directory is incomplete: was the run "
                          "killed while saving?).")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(p), tag)
    client = torch.load(model_files[0], map_location="cpu", weights_only=False)
    if "hyper_parameters" not in client:
        raise ExportError(f"{p}: the checkpoint has no hyper_parameters; it was not written by training.train.")
    # DeepSpeed hands buffers back as float32; keep their saved dtype (e.g. int64 item counts).
    module = client.get("module") or {}
    for name in client.get("buffer_names") or []:
        value = module.get(name)
        if torch.is_tensor(value) and value.numel() and name in weights:
            weights[name] = value.clone()
    state = {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v for k, v in weights.items()}
    out = {k: client[k] for k in KEEP if k in client}
    out["state_dict"] = state
    out["exported_from"] = {"path": str(p.resolve()), "tag": tag, "format": "deepspeed-zero",
                            "zero_stage": _zero_stage(p / tag)}
    return out


def _zero_stage(tag_dir: Path) -> int | None:
    optim = sorted(tag_dir.glob("*optim_states.pt"))
    if not optim:
        return None
    try:
        state = torch.load(optim[0], map_location="cpu", weights_only=False)
        return int(state["optimizer_state_dict"]["zero_stage"])
    except Exception:  # informative only
        return None


def export_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write one file with state_dict + hyper_parameters from a ZeRO directory or a Lightning checkpoint file."""
    src, dst = Path(ckpt), Path(out)
    if not src.exists():
        raise ExportError(f"ckpt={src} does not exist.")
    if dst.resolve() == src.resolve():
        raise ExportError("out must differ from ckpt.")
    if src.is_dir():
        data = consolidate_zero_checkpoint(src)
    else:
        from training.checkpoints import load_checkpoint_dict

        full = load_checkpoint_dict(src)
        data = {k: full[k] for k in KEEP if k in full}
        data["state_dict"] = full["state_dict"]
        data["exported_from"] = {"path": str(src.resolve()), "format": "lightning"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data


def evaluation_checkpoint(trainer, best_path: str) -> str:
    """The checkpoint `trainer.validate/test(ckpt_path=...)` should load after `fit`.

    Under ZeRO-3, DeepSpeed cannot load its own sharded directory into an inference engine
    (`_restore_from_bit16_weights` fails), so rank 0 consolidates it into `<name>-consolidated.ckpt` next to it
    and the strategy loads that one file into the partitioned parameters (`load_full_weights`). Any other
    strategy (ZeRO-1/2 included) gets `best_path` back unchanged.
    """
    from training.strategies import zero_stage

    if zero_stage(trainer.strategy) != 3 or not Path(best_path).is_dir():
        return best_path
    src = Path(best_path)
    dst = src.with_name(f"{src.stem}-consolidated.ckpt")
    if trainer.is_global_zero:
        export_checkpoint(src, dst)
    trainer.strategy.barrier("consolidate-zero3")
    trainer.strategy.load_full_weights = True
    return str(dst)


USAGE = "usage: python -m training.export ckpt=<ZeRO checkpoint directory or .ckpt file> out=<file.ckpt>"


def main(argv: list[str] | None = None) -> int:
    args = {}
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("ckpt", "out"):
            print(f"unknown argument {arg!r}\n{USAGE}", file=sys.stderr)
            return 2
        args[key] = value
    if set(args) != {"ckpt", "out"}:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        data = export_checkpoint(args["ckpt"], args["out"])
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = sum(v.numel() for v in data["state_dict"].values() if torch.is_tensor(v))
    print(f"wrote {args['out']}: {len(data['state_dict'])} tensors, {n:,} values "
          f"(from {data['exported_from']['format']} checkpoint {args['ckpt']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
