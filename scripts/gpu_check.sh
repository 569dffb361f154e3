#!/usr/bin/env bash
# GPU check: audit the shipped examples on CUDA and write reports and a log into OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Runs from the repository root with PYTHONPATH=. and installs nothing from a
# registry (a carried expecttest wheel in .whl/ is used for the catalog step if
# present). Budget: well under 8 minutes on one H100; each step has its own
# timeout so that one slow step cannot eat the others.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  timeout "$secs" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $?" | tee -a "$LOG"
}

step "environment" 60 bash -c 'nvidia-smi; python3 -c "import json, torch; from opaudit.environment import fingerprint; print(json.dumps(fingerprint(\"cuda\"), indent=1))"'

# --- audit: the shipped examples on CUDA ------------------------------------
# Without CUBLAS_WORKSPACE_CONFIG: cuBLAS matmuls raise the workspace error kind.
step "recommender (no CUBLAS_WORKSPACE_CONFIG)" 120 env -u CUBLAS_WORKSPACE_CONFIG OPAUDIT_DEVICE=cuda \
  python3 -m opaudit opaudit/examples/recommender.py --exit-zero -q -o "$OUT/h100-recommender.yaml"
# With it set before start: the matmuls become deterministic; atomics in the
# embedding-style backward remain.
step "recommender (CUBLAS_WORKSPACE_CONFIG=:4096:8)" 120 env CUBLAS_WORKSPACE_CONFIG=:4096:8 OPAUDIT_DEVICE=cuda \
  python3 -m opaudit opaudit/examples/recommender.py --exit-zero -q -o "$OUT/h100-recommender-cublas.md"
# cuDNN convolutions (replayed under every cudnn.deterministic/benchmark setting),
# batch norm, and the bilinear-upsample backward that has no deterministic kernel.
step "segmenter" 120 env CUBLAS_WORKSPACE_CONFIG=:4096:8 OPAUDIT_DEVICE=cuda \
  python3 -m opaudit opaudit/examples/segmenter.py --exit-zero -q -o "$OUT/h100-segmenter.yaml"
step "mlp" 60 env OPAUDIT_DEVICE=cuda \
  python3 -m opaudit opaudit/examples/mlp.py --exit-zero -q -o "$OUT/h100-mlp.md"
