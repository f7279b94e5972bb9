#!/usr/bin/env bash
# One prepared run on a lent GPU host, no network. STEPS picks what runs, in this order:
#   tests     the CUDA tests (tests/unit/test_gpu.py: CUDA graphs vs eager on the digits and a
#             random ViT-B, every bucket, the preprocessing stream), ~1 min
#   bench     python -m loadtests.bench gpu: vit_base bf16 offline per batch size (eager and
#             CUDA graphs), served at 1/64/256 clients, /classify_batch, an open loop at 70 %
#             of capacity, eager and two model processes at 256 clients, nvJPEG vs Pillow, the
#             served device-decode check (with the bad uploads' statuses), ~4 min
#   decode    that served device-decode check alone (when bench is not run), ~40 s
#   transport tests/unit/test_transport.py, ~15 s
#   overload  python -m loadtests.overload --pin --servers vit-serve: goodput at 2x and 5x of
#             capacity, server and generator on CPUs of their own, ~1.5 min
#   compile   python -m loadtests.bench gpu-compile: torch.compile max-autotune of the served
#             forward pass at batch 1 and 32 (images/s, compile time), with what time is left
# A step is skipped once too little of BUDGET_S is left for it.
# Default: tests bench overload compile (under 8 min). Expects the Python wheels the host lacks in
# .gpu/whl and, where it can be had, wrk in .gpu/bin with its library in .gpu/lib (docs/BENCHMARKS.md
# says how); without wrk, bench.py's asyncio client runs in several processes. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-results/gpu}
STEPS=" ${STEPS:-tests bench overload compile} "
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
started=$SECONDS
has() { [[ $STEPS == *" $1 "* ]]; }
left() { echo $((BUDGET_S - (SECONDS - started))); }
# has STEP NEEDED_S: the step is asked for and at least NEEDED_S seconds are left.
fits() { has "$1" && { (($(left) >= $2)) || { echo "$1 skipped: $(left) s left" | tee -a "$OUT/gpu.txt"; false; }; }; }
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
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py 2>&1 \
    | tee "$OUT/tests.txt"
fi
if has bench; then
  timeout 330 python3 -m loadtests.bench gpu --seconds "${BENCH_SECONDS:-5}" 2>&1 \
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
if fits overload 100; then
  timeout "$(left)" python3 -m loadtests.overload --pin --servers vit-serve \
    --seconds "${OVERLOAD_SECONDS:-5}" 2>&1 | tee "$OUT/overload.txt"
  cp results/overload-pinned.json "$OUT/" 2>/dev/null
fi
if fits compile 60; then
  timeout "$(left)" python3 -m loadtests.bench gpu-compile 2>&1 | tee "$OUT/compile.txt"
  cp results/bench-gpu-compile.json "$OUT/" 2>/dev/null
fi
echo "gpu_check: $((SECONDS - started)) s" | tee -a "$OUT/gpu.txt"
exit 0
