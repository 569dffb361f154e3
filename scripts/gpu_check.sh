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

step "environment" 60 bash -c 'nvidia-smi; python3 -c "import json, torch; from opaudit.engine.environment import fingerprint; print(json.dumps(fingerprint(\"cuda\"), indent=1))"'

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
# Attention: scaled_dot_product_attention's backward reads warn_only (flash and
# memory-efficient take their deterministic branch only under strict mode), and the
# replay runs the deterministic series strict plus one warn_only run for the warning:
# expected 'diverges' with 0/N deterministic-mode runs differing and the warning on
# the finding. If the machine picks cuDNN attention, that backward can instead come
# out 'diverges_deterministic': strict mode would not have chosen cuDNN (docs/limits.md).
step "decoder (attention backward)" 60 env CUBLAS_WORKSPACE_CONFIG=:4096:8 OPAUDIT_DEVICE=cuda \
  python3 -m opaudit opaudit/examples/decoder.py --exit-zero -q -o "$OUT/h100-decoder.yaml"

# --- catalog: the CUDA catalog, checked against torch's documented list ---------
# Restricted to stay under 8 minutes on one H100 (the step's timeout is 330 s): the
# OpInfo entries whose kernels use atomics, parallel scans, index collisions, pools,
# upsampling, losses, convolutions, attention and matmuls -- the families every CUDA
# entry of torch.use_deterministic_algorithms.__doc__ belongs to -- for float32 and
# float16, with the default stress inputs (about 1e6 elements) and a 20 s limit per op.
# A timeout leaves $OUT/<name>.yaml.partial (complete: false); rerun with --resume.
# CUBLAS_WORKSPACE_CONFIG is set before start, as a run that wants determinism must:
# without it every cuBLAS matmul "raises" (the workspace alert), which hides the rest.
CATALOG_OPS='index_put,put,take,index_add,index_copy,index_fill,index_reduce*,index_select,scatter,scatter_add,scatter_reduce*,gather,take_along_dim,masked_scatter,nn.functional.embedding*,nn.functional.max_unpool*,nn.functional.max_pool*,nn.functional.avg_pool*,nn.functional.adaptive_*,nn.functional.fractional_max_pool*,nn.functional.interpolate.*,nn.functional.upsample*,nn.functional.pad.*,nn.functional.grid_sample,nn.functional.nll_loss,nn.functional.cross_entropy,nn.functional.ctc_loss,nn.functional.conv*,nn.functional.scaled_dot_product_attention,nn.functional.batch_norm,nn.functional.layer_norm,cumsum,cumprod,logcumsumexp,histc,bincount,median,nanmedian,kthvalue,sort,argsort,topk,unique,unique_consecutive,repeat_interleave,__getitem__,matmul,mm,bmm,addmm,baddbmm,sum,mean,var,std,nn.functional.softmax,nn.functional.log_softmax,nn.ReflectionPad*,nn.ReplicationPad*,nn.LSTM,nn.GRU,nn.MultiheadAttention'
CATALOG_NAME=$(python3 - <<'PY' 2>>"$LOG"
import re, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nocuda"
gpu = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
print(f"cuda-{gpu}-torch{torch.__version__.split('+')[0]}")
PY
)
# Drop the globs this torch's OpInfo database does not know (opaudit catalog refuses them).
CATALOG_OPS=$(python3 - "$CATALOG_OPS" <<'PY' 2>>"$LOG"
import sys
from opaudit.flows.catalog import CatalogError, select_tasks
keep = []
for p in sys.argv[1].split(","):
    try:
        select_tasks("cuda", [p], ("float32", "float16"))
        keep.append(p)
    except CatalogError as e:
        print(f"catalog: dropping --ops {p}: {e}", file=sys.stderr)
print(",".join(keep))
PY
)
step "catalog ($CATALOG_NAME)" 330 env CUBLAS_WORKSPACE_CONFIG=:4096:8 \
  python3 -m opaudit catalog --device cuda --ops "$CATALOG_OPS" --dtypes float32,float16 --op-timeout 20 \
  -o "$OUT/$CATALOG_NAME.yaml"
CATALOG_FILE="$OUT/$CATALOG_NAME.yaml"
[ -f "$CATALOG_FILE" ] || CATALOG_FILE="$OUT/$CATALOG_NAME.yaml.partial"
step "catalog markdown export" 60 python3 -c "
import sys
from opaudit.cli.formats import Format, Kind, render
from opaudit.flows.catalog import load_catalog
open(sys.argv[2], 'w').write(render(load_catalog(sys.argv[1]), Kind.CATALOG, Format.MARKDOWN))
" "$CATALOG_FILE" "$OUT/$CATALOG_NAME.md"
# Names every difference with the documented list; exit 1 when any (see the log).
step "catalog vs torch docs" 60 bash -c "python3 scripts/check_docs.py --markdown '$CATALOG_FILE' | tee '$OUT/$CATALOG_NAME-docs.md'"
