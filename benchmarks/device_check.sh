#!/usr/bin/env bash
# The GPU check (issue 13): model alone (eager, compiled), `batchsight run` with CPU
# and with GPU decode, and a plain DataLoader baseline, on 20,000 images of the
# throughput mix and 20,000 ImageNet-like 500x375 JPEGs; JSON to --out. About 6-8
# minutes on one H200 with 16 cores.
#
# Needs python3 with torch, torchvision, numpy, pandas, pyarrow and Pillow. Where
# prefect, faiss-cpu, boto3 or pypdfium2 are missing and there is no network, bring
# them as wheels (benchmarks/gpu_wheels.sh makes them) and pass --wheels DIR: they are
# unpacked into a private folder on PYTHONPATH, which `batchsight run` keeps.
#
#     benchmarks/device_check.sh --wheels .whl --out /tmp/device_check.json
#     benchmarks/device_check.sh --device cpu --images 200 --model resnet18     # smoke test, anywhere
#
# The next GPU session's question (issue 13): do several shard processes on the one card
# beat one? In-process against --workers 4, GPU decode, both sets, about 5 minutes:
#
#     benchmarks/device_check.sh --wheels .whl --compile off --only "GPU decode" --budget-s 360 \
#         --out "$OUT/device_check.json"
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
