#!/usr/bin/env bash
# The GPU check (issue 26): on one GPU machine, `batchsight run --gpu-decode` on
# 100,000 ImageNet-like JPEGs (target 8,000 img/s, 3x the DataLoader peer) and on
# 20,000 objects of the mix, 10% of them 12-MP camera photos (target 2,500 img/s,
# and no crash); after every run, no process of it may hold the GPU (nvidia-smi);
# the model alone and the DataLoader peer beside them. About 6-8 minutes on one
# H200 with 16 cores; JSON to --out after every step.
#
# Needs python3 with torch, torchvision, numpy, pandas, pyarrow and Pillow. Where
# prefect, faiss-cpu, boto3 or pypdfium2 are missing and there is no network, bring
# them as wheels (benchmarks/gpu_wheels.sh makes them, under the 64 MiB a device
# call carries) and pass --wheels DIR: they are unpacked into a private folder on
# PYTHONPATH, which `batchsight run` keeps.
#
# The next GPU session's command (the default steps are exactly issue 26's check):
#
#     benchmarks/device_check.sh --wheels .whl --out "$OUT/device_check.json"
#
# Smoke test, anywhere:
#
#     benchmarks/device_check.sh --device cpu --images 200 --mix-images 100 --model resnet18
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if ! "$PY" -c "import prefect, prefect_dask, faiss, boto3, pypdfium2" 2>/dev/null; then
    [[ -n "$WHEELS" ]] || { echo "prefect, prefect-dask, faiss, boto3 or pypdfium2 is missing: pass --wheels DIR (benchmarks/gpu_wheels.sh)" >&2; exit 2; }
    SITE=${TMPDIR:-/tmp}/batchsight-wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import prefect, prefect_dask, faiss, boto3, pypdfium2; print('wheels:', 'prefect', prefect.__version__, 'faiss', faiss.__version__)"
fi
export PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)} PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_check.py "${ARGS[@]}"
