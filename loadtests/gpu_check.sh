#!/usr/bin/env bash
# One prepared run on a lent GPU host, ~9 minutes, no network: the GPU benchmark, then the CUDA
# and transport tests. Expects the Python wheels the host lacks in .gpu/whl and, where it can be
# had, wrk (+ its libraries) in .gpu/ (docs/BENCHMARKS.md says how); without wrk, bench.py's
# asyncio client runs in several processes. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
started=$SECONDS
shopt -s nullglob
wheels=(.gpu/whl/*.whl)
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "${wheels[@]}" || exit 1
fi
# HF_HUB_OFFLINE: the benchmark writes random weights locally; fail at once, never wait on a
# download that cannot happen.
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.gpu/bin:$PATH PYTHONUNBUFFERED=1 \
  BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, timm, bentoml
print(torch.__version__, torchvision.__version__, timm.__version__, bentoml.__version__)" \
  | tee -a "$OUT/gpu.txt"
command -v wrk >/dev/null || echo "wrk missing: the Python client drives the loads" | tee -a "$OUT/gpu.txt"
# The benchmark first: its figures are what the device time is for; each step has its own cap.
timeout 330 python3 -m loadtests.bench gpu --seconds "${BENCH_SECONDS:-5}" 2>&1 | tee "$OUT/bench.txt"
cp results/bench-gpu.json results/bench-gpu.md "$OUT/" 2>/dev/null
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py \
  tests/unit/test_transport.py 2>&1 | tee "$OUT/tests.txt"
echo "gpu_check: $((SECONDS - started)) s" | tee -a "$OUT/gpu.txt"
exit 0
