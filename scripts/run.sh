#!/usr/bin/env bash
# Sets up (idempotent) and trains the default experiment: SASRec on MovieLens-100k, prints test metrics.
# Usage: bash scripts/run.sh [hydra overrides...]     e.g. bash scripts/run.sh model=gru4rec
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${LSTI_VENV:-$root/.venv}/bin/python" -m training.train "$@"
