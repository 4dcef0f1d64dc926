#!/usr/bin/env bash
# One device-tool call on an H100/H200, its phases in order of value, each under its own time limit
# so that a slow phase still leaves the others' results in $OUT:
#   a. check.txt  quick CUDA correctness (< 2 min): every op forward + backward at the LLaMA-3-8B
#                 shape in fp16 and bf16 by the 2x rule (llama-kernels check), the CUDA-graph decode
#                 step and the patched models' logits (a few tests)   CHECK_TIMEOUT
#   b. bench.txt  the --quick benchmark, its JSON/markdown rewritten after every op and model, then
#                 copied as plain files (<stem>.json, <stem>.md, two plots) + bench.tgz (all plots)
#                                                                      BENCH_TIMEOUT
#   c. tests.txt  the rest of the CUDA test suite in the time left (pytest-xdist / pytest-timeout
#                 when importable)                                     the rest of SESSION_BUDGET
# SESSION_BUDGET (default 540 s) bounds all phases together: the device tool allows 600 s a call.
# PHASES (default abc) runs only some, e.g. PHASES=b to rerun the benchmark on a warm machine;
# BENCH_ARGS (default --quick) are the benchmark's arguments, e.g. "--quick --no-compile".
# From the repository root on the GPU box, carrying the wheels in .whl (see benchmarks/README.md):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# The tool returns at most 8 files from $OUT: the 8 named above (with bench.tgz) are all there is.
set -uo pipefail
OUT=${OUT:-/tmp/llama-kernels-out}
PY=${PYTHON:-python3}
BUDGET=${SESSION_BUDGET:-540}
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
PHASES=${PHASES:-abc}
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:---quick}"
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The phase (a) tests, by node id: selected there, deselected in phase (c).
QUICK_TESTS=(
  tests/test_cuda_graphs.py::test_flash_decode_capture_and_replay
  tests/test_cuda_graphs.py::test_generate_with_cuda_graphs_matches_eager_generation
  tests/test_cuda_graphs.py::test_cuda_graph_replays_the_static_step_exactly
  tests/test_patch.py::test_bf16_patched_error_within_twice_eager
  tests/test_hf.py::test_tiny_hf_logits_grads_and_launches
)

phase() { echo "=== [$((SECONDS - START)) s] $*"; }
# `limit N`: N seconds, cut to what is left of the session budget (0 when nothing is).
limit() {
  local left=$((BUDGET - (SECONDS - START)))
  ((left < 0)) && left=0
  echo $(($1 < left ? $1 : left))
}
# `limited N CMD...`: CMD under `timeout`, SIGKILL 10 s after the SIGTERM; says when time is out.
limited() {
  local t=$1
  shift
  if ((t < 10)); then
    echo "skipped: only ${t} s left of the ${BUDGET} s budget"
    return 124
  fi
  timeout -k 10 "$t" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "stopped: over its ${t} s limit (rc $rc)"
  return $rc
}
has() { "$PY" -c "import $1" 2>/dev/null; }
wanted() { [[ $PHASES == *$1* ]]; }
CHECK_RC=- CHECK_TESTS_RC=- BENCH_RC=- TESTS_RC=-

phase "setup" | tee "$OUT/check.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "wheel install failed: going on without .whl" | tee -a "$OUT/check.txt"
    export PYTHONPATH=$PWD
  fi
else
  export PYTHONPATH=$PWD
fi
PYTEST=()  # pytest's options that this box's plugins allow
if has pytest; then
  PYTEST=(-q -p no:cacheprovider -rfEs)
  has pytest_timeout && PYTEST+=(--timeout 150)
fi
XDIST=()
has xdist && XDIST=(-n "${TEST_WORKERS:-8}")
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                                       'cuda', torch.cuda.is_available())"
  for m in pytest xdist pytest_timeout liger_kernel gguf transformers matplotlib; do
    has "$m" && echo "have $m" || echo "no $m"
  done
} 2>&1 | tee -a "$OUT/check.txt"

# --- a. quick correctness -------------------------------------------------------------------------
if wanted a; then
  # The check and the tests run side by side: both are mostly Triton compiling (the attention
  # autotuner compiles its candidates one after another), and the box has 16 cores.
  phase "a. check (every op forward+backward, LLaMA-3-8B shape, fp16 and bf16) and tests (CUDA-graph" \
    "decode step, patched-model logits), side by side" | tee -a "$OUT/check.txt"
  A_LIMIT=$(limit "${CHECK_TIMEOUT:-110}")
  limited "$A_LIMIT" "$PY" -m llama_kernels check --shape llama3-8b --dtypes fp16,bf16 > /tmp/check-ops.txt 2>&1 &
  OPS_PID=$!
  if ((${#PYTEST[@]})); then
    limited "$A_LIMIT" "$PY" -m pytest "${PYTEST[@]}" "${QUICK_TESTS[@]}" > /tmp/check-tests.txt 2>&1 &
    TESTS_PID=$!
  else
    echo "skipped: pytest is not importable" > /tmp/check-tests.txt
    TESTS_PID=
  fi
  wait "$OPS_PID"
  CHECK_RC=$?
  CHECK_TESTS_RC=127
  [ -n "$TESTS_PID" ] && { wait "$TESTS_PID"; CHECK_TESTS_RC=$?; }
  { echo "--- llama-kernels check --shape llama3-8b --dtypes fp16,bf16 (rc $CHECK_RC)"
    cat /tmp/check-ops.txt
    echo "--- pytest ${QUICK_TESTS[*]} (rc $CHECK_TESTS_RC)"
    cat /tmp/check-tests.txt
  } | tee -a "$OUT/check.txt"
fi

# --- b. the quick benchmark -------------------------------------------------------------------------
if wanted b; then
  phase "b. python -m benchmarks ${BENCH_ARGS[*]} --out $BENCH_DIR" | tee "$OUT/bench.txt"
  # SIGTERM at the limit makes the benchmark write what it measured (plots too); the 10 s before the
  # SIGKILL are for that.  Killed outright, its last partial JSON/markdown (after each op) remain.
  limited "$(limit "${BENCH_TIMEOUT:-300}")" "$PY" -m benchmarks "${BENCH_ARGS[@]}" --out "$BENCH_DIR" \
    2>&1 | tee -a "$OUT/bench.txt"
  BENCH_RC=$?
  # Plain files, to commit as they are; the tool returns 8 files at most, so two plots travel plain
  # (decode against the copy bandwidth, and the first op) and all of them in bench.tgz.
  for f in "$BENCH_DIR"/*.json "$BENCH_DIR"/*.md "$BENCH_DIR"/*-model-decode.png "$BENCH_DIR"/*-ops-rms_norm.png; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  if compgen -G "$BENCH_DIR/*" > /dev/null; then
    tar -czf "$OUT/bench.tgz" -C "$BENCH_DIR" . \
      && echo "copied to $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$OUT/bench.txt"
  else
    echo "the benchmark wrote nothing to $BENCH_DIR" | tee -a "$OUT/bench.txt"
  fi
fi

# --- c. the rest of the CUDA test suite ---------------------------------------------------------------
if wanted c; then
  phase "c. the rest of the test suite${XDIST:+ (pytest-xdist, ${XDIST[1]} workers)}" | tee "$OUT/tests.txt"
  if ((${#PYTEST[@]})); then
    DESELECT=()
    for t in "${QUICK_TESTS[@]}"; do DESELECT+=(--deselect "$t"); done
    limited "$(limit "$BUDGET")" "$PY" -m pytest "${PYTEST[@]}" "${XDIST[@]}" --durations=15 tests "${DESELECT[@]}" \
      2>&1 | tee -a "$OUT/tests.txt"
    TESTS_RC=$?
  else
    echo "skipped: pytest is not importable" | tee -a "$OUT/tests.txt"
    TESTS_RC=127
  fi
fi

phase "done: check rc $CHECK_RC, quick tests rc $CHECK_TESTS_RC, benchmark rc $BENCH_RC, tests rc $TESTS_RC" \
  | tee -a "$OUT/check.txt"
exit 0
