#!/usr/bin/env bash
# Multi-process training (or evaluation) with torchrun: one process per GPU, on one node or several.
# torchrun creates the processes (not Lightning), so Hydra runs once per rank with the same overrides; all ranks
# get the same run directory (RUN_DIR -> hydra.run.dir) and rank r logs to <run dir>/<entry>_rank<r>.log.
#
# Usage (run from anywhere; extra arguments are Hydra overrides):
#   one node, all its GPUs:    bash scripts/torchrun.sh strategy=deepspeed_zero2
#   one node, 8 GPUs, ZeRO-3:  NPROC=8 bash scripts/torchrun.sh strategy=deepspeed_zero3 data.batch_size=512
#   several nodes: on every node (RUN_DIR on a shared filesystem, the same on all nodes):
#     NNODES=2 NODE_RANK=<0 or 1> MASTER_ADDR=<host of node 0> MASTER_PORT=29500 NPROC=8 \
#       RUN_DIR=/shared/runs/zero2-2x8 bash scripts/torchrun.sh strategy=deepspeed_zero2
#   CPU dry run (no GPU):      NPROC=2 bash scripts/torchrun.sh strategy=deepspeed_zero2 trainer.accelerator=cpu
#   evaluate in N processes:   ENTRY=training.evaluate NPROC=2 bash scripts/torchrun.sh ckpt=<ckpt> strategy=ddp
#   resume a killed run:       RUN_DIR=<its run dir> bash scripts/torchrun.sh <same overrides> ckpt_path=latest
#
# Environment: NPROC (processes per node; default: number of GPUs, or 2 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RUN_DIR (default outputs/<task>/<timestamp>; required with
# NNODES>1), ENTRY (training.train), LSTI_VENV (the virtualenv, default .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${LSTI_VENV:-$root/.venv}/bin/python"
entry="${ENTRY:-training.train}"
task="${entry##*.}"
nnodes="${NNODES:-1}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [ "$NPROC" -gt 0 ] || NPROC=2
fi
if [ "$nnodes" -gt 1 ] && [ -z "${RUN_DIR:-}" ]; then
  echo "NNODES=$nnodes: set RUN_DIR to the same directory (on a shared filesystem) on every node" >&2
  exit 2
fi
run_dir="${RUN_DIR:-outputs/$task/$(date +%Y-%m-%d_%H-%M-%S)}"
cd "$root"
# trainer.devices/num_nodes come first so that explicit overrides after them win (Hydra: last value wins).
exec "$py" -m torch.distributed.run \
  --nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --max_restarts=0 \
  -m "$entry" trainer.devices="$NPROC" trainer.num_nodes="$nnodes" \
  "hydra.run.dir=$run_dir" "hydra.job.name=${task}_rank\${oc.env:RANK,0}" "$@"
