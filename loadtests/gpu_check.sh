#!/usr/bin/env bash
# One prepared run on a lent GPU host, no network. STEPS picks what runs, in this order:
#   tests     the CUDA tests (tests/unit/test_gpu.py), ~15 s
#   bench     python -m loadtests.bench gpu: vit_base bf16 served vs offline, nvJPEG vs Pillow,
#             the served device-decode check (with the bad uploads' statuses), ~3 min
#   decode    that served device-decode check alone (when bench is not run), ~40 s
#   transport tests/unit/test_transport.py, ~15 s
#   overload  python -m loadtests.overload --pin: ours and the peer, server and generator on
#             CPUs of their own, ~3 min; skipped once BUDGET_S - 100 s are spent
# Default: tests bench transport overload (~7 min). Expects the Python wheels the host lacks in
# .gpu/whl and, where it can be had, wrk in .gpu/bin with its library in .gpu/lib (docs/BENCHMARKS.md
# says how); without wrk, bench.py's asyncio client runs in several processes. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
STEPS=" ${STEPS:-tests bench transport overload} "
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
started=$SECONDS
has() { [[ $STEPS == *" $1 "* ]]; }
shopt -s nullglob
wheels=(.gpu/whl/*.whl)
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "${wheels[@]}" || exit 1
fi
# HF_HUB_OFFLINE: the benchmark writes random weights locally; fail at once, never wait on a
# download that cannot happen.
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.gpu/bin:$PATH PYTHONUNBUFFERED=1 \
  LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
  BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "cores: $(nproc)"
  python3 -c "import torch, torchvision, timm, bentoml
print(torch.__version__, torchvision.__version__, timm.__version__, bentoml.__version__)"
  if command -v wrk >/dev/null; then wrk --version 2>&1 | head -1
  else echo "wrk missing: the Python client drives the loads"; fi
} 2>&1 | tee "$OUT/gpu.txt"
# Each step has its own cap, so one that hangs leaves time for the rest.
if has tests; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py 2>&1 \
    | tee "$OUT/tests.txt"
fi
if has bench; then
  timeout 240 python3 -m loadtests.bench gpu --seconds "${BENCH_SECONDS:-5}" 2>&1 \
    | tee "$OUT/bench.txt"
  cp results/bench-gpu.json results/bench-gpu.md "$OUT/" 2>/dev/null
elif has decode; then
  timeout 90 python3 -c "import json, pathlib; from loadtests.bench import served_check
work = pathlib.Path('results/work'); work.mkdir(parents=True, exist_ok=True)
print(json.dumps({'served_check': served_check(work)}))" 2>&1 | tee "$OUT/decode.txt"
fi
if has transport; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_transport.py 2>&1 \
    | tee -a "$OUT/tests.txt"
fi
if has overload; then
  if ((SECONDS - started < BUDGET_S - 100)); then
    timeout $((BUDGET_S - (SECONDS - started))) python3 -m loadtests.overload --pin \
      --seconds "${OVERLOAD_SECONDS:-5}" 2>&1 | tee "$OUT/overload.txt"
    cp results/overload-pinned.json "$OUT/" 2>/dev/null
  else
    echo "overload drill skipped: $((SECONDS - started)) s spent" | tee -a "$OUT/gpu.txt"
  fi
fi
echo "gpu_check: $((SECONDS - started)) s" | tee -a "$OUT/gpu.txt"
exit 0
