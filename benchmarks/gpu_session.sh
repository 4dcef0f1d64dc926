#!/usr/bin/env bash
# One device-tool call on an H100/H200: CUDA test suite, then the quick benchmark, results in $OUT.
# From the repository root on the GPU box, carrying the wheels in .whl (see benchmarks/README.md):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Phases have their own time limits so that a slow phase still leaves the other's results.
set -uo pipefail
OUT=${OUT:-/tmp/llama-kernels-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout "${TEST_TIMEOUT:-270}" python3 -m pytest -q -p no:cacheprovider --timeout 150 \
  --durations=15 tests 2>&1 | tee "$OUT/tests.txt"
timeout "${BENCH_TIMEOUT:-270}" python3 -m benchmarks --quick --out /tmp/bench 2>&1 | tee "$OUT/bench.txt"
tar -czf "$OUT/bench.tgz" -C /tmp/bench . 2>/dev/null
exit 0
