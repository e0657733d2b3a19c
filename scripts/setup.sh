#!/usr/bin/env bash
# Creates .venv (or $LSTI_VENV) and installs torch first, then the package with dev tools.
# Idempotent: a stamp keyed on pyproject.toml + constraints.txt skips the install when nothing changed.
# Usage: bash scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LSTI_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.lsti-installed"
key="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
echo "setting up $venv (torch first, then the package; about 2 minutes)"
pip_quiet() { "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip_quiet "torch==2.13.0"
pip_quiet -c "$root/constraints.txt" -e "$root[dev]"
echo "$key" > "$stamp"
