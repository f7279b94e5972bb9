#!/usr/bin/env bash
# One prepared run on a lent GPU host: the CUDA tests, then the GPU benchmark.
# Expects the Python wheels the host lacks in .gpu/whl and wrk (+ its libraries) in .gpu/,
# made on the development machine (docs/BENCHMARKS.md says how). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.gpu/bin:$PATH PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, bentoml; print(torch.__version__, timm.__version__, bentoml.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py tests/unit/test_engine.py \
  tests/unit/test_precision.py 2>&1 | tee "$OUT/tests.txt"
timeout 380 python3 -m loadtests.bench gpu --seconds "${BENCH_SECONDS:-5}" 2>&1 | tee "$OUT/bench.txt"
cp results/bench-gpu.json results/bench-gpu.md "$OUT/" 2>/dev/null
exit 0
