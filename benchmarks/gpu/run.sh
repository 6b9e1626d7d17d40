#!/usr/bin/env bash
# The GPU benchmark on a lent GPU machine, which has PyTorch but no network and no diffusers: install the
# wheels benchmarks/gpu/fetch_wheels.py put in .whl/ (carried with the call) and squeeze itself from this
# working tree into /tmp/site, then run benchmarks/gpu.py --quick into $OUT (more arguments are passed on)
# and print its table. SQUEEZE_GPU_KIT_INSTALLED=1 skips the installs (the CPU test runs the rest with
# --small); PYTHON names the interpreter (default python3, the one that holds PyTorch there).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
if [ -z "${SQUEEZE_GPU_KIT_INSTALLED:-}" ]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "run.sh: no wheels in .whl/: run benchmarks/gpu/fetch_wheels.py first and carry .whl" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site .
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
"$python" benchmarks/gpu.py --quick --out "${OUT:-gpu-results}" "$@"
