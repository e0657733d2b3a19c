#!/usr/bin/env bash
# Sets up (idempotent) and runs the default test suite (fast; `slow`/`gpu` tests run with -m slow / -m gpu).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
"${LSTI_VENV:-$root/.venv}/bin/ruff" check training federated tests scripts
exec "${LSTI_VENV:-$root/.venv}/bin/python" -m pytest "$@"
