#!/usr/bin/env bash
# Wheels that let benchmarks/device_check.sh run on a GPU machine with no network
# that already has torch, torchvision, numpy, pandas, pyarrow and Pillow (and, like
# most CUDA images, jinja2, pyyaml, pygments and regex): prefect, faiss-cpu, boto3,
# pypdfium2 and whatever of their dependencies such an image lacks, for CPython 3.12
# on x86-64 Linux, into .whl/ (about 62 MiB; prefect-dask, dask and distributed for
# --workers). botocore keeps only its s3 and sts data
# (16 MB -> 1 MB). Run where pip can reach a package index:
#
#     benchmarks/gpu_wheels.sh            # then: benchmarks/device_check.sh --wheels .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=$(realpath -m "${1:-.whl}")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_5_x86_64)
TARGET=(--python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]}")
# The versions this project's venv resolved, closed over their dependencies for 3.12.
ROOTS=(prefect==3.9.1 prefect-dask==0.3.7 faiss-cpu==1.15.1 boto3==1.44.8 pypdfium2==5.15.2)
# On the GPU image already (.library/device/KINDS.md lists its packages): carrying them
# would shadow the image's own builds, and the call carries 64 MiB at most. Besides
# the builds, the small pure-Python ones whose interfaces have long been stable;
# typer, rich, httpx, anyio, click and jinja2 travel, for the versions prefect pins.
SKIP='^(numpy|pygments|pyyaml|regex|msgpack|charset-normalizer|python-dateutil|fsspec|psutil|urllib3|certifi|requests|idna|toolz|sortedcontainers|six|zipp|mdurl|colorama|pluggy|cloudpickle)=='

"$PY" -m pip install --dry-run --quiet --ignore-installed --target "$WORK/t" --report "$WORK/report.json" \
    "${TARGET[@]}" "${ROOTS[@]}"
"$PY" - "$WORK/report.json" >"$WORK/reqs.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    print(f"{meta['name'].lower()}=={meta['version']}")
EOF
grep -viE "$SKIP" "$WORK/reqs.txt" >"$WORK/keep.txt"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DEST" -r "$WORK/keep.txt"

# botocore: drop the service models of everything but s3 and sts.
for whl in "$DEST"/botocore-*.whl; do
    mkdir "$WORK/bc" && (cd "$WORK/bc" && unzip -q "$whl")
    find "$WORK/bc/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
    rm "$whl" && (cd "$WORK/bc" && zip -q -r "$whl" .)
    rm -rf "$WORK/bc"
done
du -sh "$DEST"
