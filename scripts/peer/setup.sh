#!/usr/bin/env bash
# Creates the peer venv for RecBole 1.2.1 (it cannot share ours: it pins ray<=2.6.3, which clashes with
# flwr[simulation]) and installs torch first, then recbole with --no-deps plus the dependencies the
# runner really imports. Idempotent: a stamp keyed on this file skips the install when nothing changed.
#
#   bash scripts/peer/setup.sh            # venv at ${LSTI_PEER_VENV:-${LSTI_CACHE_DIR:-~/.cache/lsti}/peer-venv}
#   PYTHON=python3.11 bash scripts/peer/setup.sh
#
# What is left out on purpose (RecBole declares them, the runner never imports them): ray (only
# recbole.quick_start imports it, for hyper-parameter tuning; run_recbole.py does not use quick_start),
# hyperopt (its extra), plotly (plots only, imported lazily). numpy stays < 2: RecBole's Config assigns np.float_,
# np.complex_, np.unicode_ (removed in numpy 2) in compatibility_settings().
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${LSTI_CACHE_DIR:-$HOME/.cache/lsti}"
venv="${LSTI_PEER_VENV:-$cache/peer-venv}"
py="${PYTHON:-python3}"
stamp="$venv/.lsti-peer-installed"
key="$(cat "$here/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "setting up the RecBole peer venv in $venv (torch first, then recbole 1.2.1; 1-3 minutes)"
mkdir -p "$(dirname "$venv")"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# Be a good neighbour on a shared machine: installs are CPU-heavy (wheel unpacking, byte-compiling).
nice_cmd=(nice -n 19)
pip_quiet() {
  OMP_NUM_THREADS=2 "${nice_cmd[@]}" "$venv/bin/python" -m pip install -q "$@" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.13.0\nnumpy<2\n' > "$constraints"
pip_quiet "torch==2.13.0"
pip_quiet --no-deps "recbole==1.2.1"
echo "(pip will report that recbole requires ray and plotly, which are not installed: left out on purpose)"
pip_quiet -c "$constraints" \
  "numpy>=1.24,<2" "scipy>=1.10" "pandas>=2.0,<3" "tqdm>=4.48.2" "colorlog==4.7.2" "colorama==0.4.4" \
  "scikit-learn>=1.3" "pyyaml>=5.1" "tensorboard>=2.5" "texttable>=0.9" "tabulate>=0.8.10" "psutil>=5.9" \
  "thop>=0.1.1.post2207130030"
"$venv/bin/python" - <<'EOF'
import numpy, torch
import recbole.config, recbole.data, recbole.trainer, recbole.utils  # noqa: F401
print(f"peer venv ok: recbole {__import__('recbole').__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
EOF
echo "$key" > "$stamp"
