#!/usr/bin/env bash
# Create ./.venv and install the project with every extra (app, cloud, tracking) and the test extra. Sourced by run_main.sh and test.sh.
# torch is installed first as 2.13.0 when absent: on a CPU machine that is the small CPU wheel,
# and the project's torch range (>=2.4,<2.15) then installs nothing more. Set CBVAE_VENV to reuse a venv.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CBVAE_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0"
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing cbvae and its dependencies"
"$venv/bin/python" -m pip install -q -e "$repo_root[all,test]"  # all: the app, cloud and tracking extras
export PATH="$venv/bin:$PATH"
