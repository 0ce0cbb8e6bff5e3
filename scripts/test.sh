#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite: ruff (lint + format check), then pytest.
# Chromium (Debian package) is installed for the browser test when apt-get is available and we are root.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
source scripts/setup_env.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] running as root without chromium: installing Debian's chromium package (apt-get) for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] chromium could not be installed: the browser test will skip"
fi
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
ruff check .
ruff format --check .
# every core (pytest-xdist; a test file stays on one worker, the session fixtures are built once per run)
python -m pytest -q -n "${CBVAE_TEST_WORKERS:-auto}" --dist loadfile "$@"
