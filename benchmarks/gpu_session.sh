#!/usr/bin/env bash
# One device-tool call on an H100/H200, its phases in order of value, each under its own time limit
# so that a slow phase still leaves the others' results in $OUT:
#   a. check.txt  quick CUDA correctness (< 2 min): every op forward + backward at the LLaMA-3-8B
#                 shape in fp16 and bf16 by the 2x rule (llama-kernels check), the CUDA-graph decode
#                 step and the patched models' logits (a few tests)   CHECK_TIMEOUT (110 s)
#   b. bench.txt  the --quick benchmark of every op but the two attention sweeps below (their shapes
#                 are theirs) and of the model, its JSON/markdown rewritten after every op and model,
#                 then copied as plain files (<stem>.json, <stem>.md) + bench.tgz (those and all plots).
#                 linear_cross_entropy (LM head + loss at LLaMA-3-8B's hidden 4096, vocab 128256; 4096
#                 and 8192 tokens, bf16; ours, eager, torch.compile, Liger) is its costliest op: about
#                 60 ms of matmuls per eager fwd+bwd at 8k tokens and ~12 calls per timed mode, so about
#                 30 s of measuring, plus inductor compiling its forward and backward twice (the second
#                 token count recompiles dynamic) for about 60 s more (estimates)
#                                                                      BENCH_TIMEOUT (300 s)
#   v. bench.txt  (appended) packed and padded batches, VARLEN_ARGS (default: --quick --only
#                 ops,batches --ops varlen_attention --shapes llama3-8b,smollm2-135m): varlen attention
#                 fwd and fwd+bwd at 8k and 16k packed tokens (ours, eager, flash-attn varlen if
#                 importable, SDPA on the padded batch with and without a mask, SDPA per sequence),
#                 and transformers' LLaMA-3.2-1B-shaped model generating for a left-padded batch and
#                 training on packed / padded sequences (hf+ours, sdpa, eager, flash_attention_2 if
#                 importable); out to VARLEN_DIR, its files renamed <stem>-varlen*, packed into
#                 bench.tgz and its markdown appended to bench.txt (no plain copies: the tool returns
#                 8 files at most)                                     VARLEN_TIMEOUT (150 s)
#   d. bench.txt  (appended) the attention sweep, ATTN_ARGS (default: --quick --only ops --ops
#                 flash_attention --shapes llama3-8b,smollm2-135m --tokens 2048,4096,8192,16384
#                 --no-compile: fwd, bwd, fwd+bwd at head dim 128 and 64, ours, ours-portable-fwd,
#                 ours-deterministic, eager, sdpa-flash, sdpa-cudnn, flash-attn if importable), out
#                 to ATTN_DIR; its files renamed <stem>-attention*, copied as <stem>-attention.json,
#                 <stem>-attention.md, and packed into bench.tgz too     ATTN_TIMEOUT (150 s)
#   f. bench.txt  (appended; not in the default PHASES) the model benchmark of another transformers
#                 family, FAMILY_ARGS (default: --quick --only model --family qwen3: Qwen3-8B's shapes,
#                 2 layers; hf, hf+ours, hf+compile, hf+liger), out to FAMILY_DIR; its files are named
#                 <stem>-<family>* by the benchmark itself, packed into bench.tgz, its markdown appended
#                 to bench.txt (no plain copies: 8 files at most come back)   FAMILY_TIMEOUT (240 s)
#   m. bench.txt  (appended; not in the default PHASES) training-step memory, MEMORY_ARGS (default:
#                 --only memory --memory-models llama3.2-1b --memory-modes full,lora+ckpt
#                 --memory-providers hf-sdpa,hf+ours,hf+ours+long --memory-tokens 2048,4096
#                 --memory-max-tokens 4096 --memory-no-search): the fake-tensor figure on fake CUDA
#                 tensors beside torch.cuda.max_memory_allocated of the same step run for real (the
#                 CPU results' table, checked on the device); out to MEMORY_DIR, its markdown appended
#                 to bench.txt, its files packed into bench.tgz          MEMORY_TIMEOUT (180 s)
#   q. bench.txt  (appended; not in the default PHASES) weight-only quantisation, QUANT_ARGS (default:
#                 --quick --only ops,model --ops int8_linear,int4_linear-g128 --quantize 8,4): the
#                 quantised linear at LLaMA-3-8B's four projection shapes, 1, 2, 4, 8, 16 and 2048
#                 rows (ours, bf16 cuBLAS, eager dequantise + matmul, torch.compile of it, torchao and
#                 bitsandbytes when importable), then the 32-layer model in bf16, int8 and int4-g128
#                 (apply_kernels, quantize_weights): prefill and batch-1 decode with and without CUDA
#                 graphs; out to QUANT_DIR, its files named <stem>-quantized* by the benchmark, packed
#                 into bench.tgz, its markdown appended to bench.txt.  About 60 s of op timings, 100 s
#                 of inductor compiles (two formats, a few dynamic-shape recompiles each) and 80 s for
#                 the three 32-layer models (estimates; not yet run on a GPU)   QUANT_TIMEOUT (300 s)
#   c. tests.txt  the rest of the CUDA test suite in the time left (pytest-xdist / pytest-timeout
#                 when importable)                                     the rest of SESSION_BUDGET
# The phases run in the order a, b, v, d, f, m, q, c.  SESSION_BUDGET (default 540 s) bounds all of them
# together (the device tool allows 600 s a call): each phase's limit is cut to what is left.
# What phase v cost the others: phase b no longer runs flash_attention (phase d sweeps the same
# shapes with the same providers) and its limit went from 300 s to 240 s.  linear_cross_entropy
# (issue 15) brought it back to 300 s (about 90 s more, above): a and b at their limits take
# 410 s, so v then gets 130 s of its 150, d nothing (stopped early, a phase still writes what it
# measured) and c nothing: run PHASES=dc (or PHASES=vdc) on the warm machine for them.  If phase b
# is cut at its limit (the model part runs after the ops), BENCH_ARGS with --no-compile saves
# inductor's compile time.
# PHASES (default abvdc) runs only some, e.g. PHASES=b to rerun the benchmark on a warm machine,
# PHASES=v for the packed/padded benchmarks alone, PHASES=dc for the attention sweep and the tests,
# PHASES=f for the other family's model benchmark (the default first call is at its time limit, so
# phase f is never in it: FAMILY_ARGS="--quick --only model --family gemma2" for Gemma-2-9B);
# BENCH_ARGS are the benchmark's arguments (default: --quick --only ops,model and every op but
# flash_attention and varlen_attention; a new op must be added to that list), e.g. "--quick
# --no-compile"; VARLEN_ARGS, ATTN_ARGS and FAMILY_ARGS those of phases v, d and f (--out is added).
# From the repository root on the GPU box, carrying the wheels in .whl (see benchmarks/README.md):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# then, on the warm machine, the attention sweep and the tests (their logs in bench.txt, tests.txt):
#   run(command="SESSION_BUDGET=190 PHASES=dc bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=220)
# (15 minutes of device time hold the start, about 560 s and about 200 s), or the packed/padded
# benchmarks alone:
#   run(command="PHASES=v bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=240)
# or the model benchmark of another family (Qwen3-8B's shapes; a session of its own, or instead of dc):
#   run(command="SESSION_BUDGET=270 PHASES=f bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=300)
# or the memory of real training steps beside the fake-tensor count (peft travels in .whl if missing):
#   run(command="SESSION_BUDGET=200 PHASES=m bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=230)
# or the quantised linear and the quantised model (a session of its own, or instead of dc; torchao and
# bitsandbytes are measured when their wheels travel in .whl; add --no-compile to QUANT_ARGS if
# inductor's compiles do not fit):
#   run(command="SESSION_BUDGET=330 PHASES=q bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=360)
# The tool returns at most 8 files from $OUT, and these are the 8: check.txt, bench.txt,
# <stem>.json, <stem>.md, <stem>-attention.json, <stem>-attention.md, bench.tgz, tests.txt.
set -uo pipefail
OUT=${OUT:-/tmp/llama-kernels-out}
PY=${PYTHON:-python3}
BUDGET=${SESSION_BUDGET:-540}
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
ATTN_DIR=${ATTN_DIR:-/tmp/bench-attention}
VARLEN_DIR=${VARLEN_DIR:-/tmp/bench-varlen}
FAMILY_DIR=${FAMILY_DIR:-/tmp/bench-family}
MEMORY_DIR=${MEMORY_DIR:-/tmp/bench-memory}
QUANT_DIR=${QUANT_DIR:-/tmp/bench-quantized}
PHASES=${PHASES:-abvdc}
# Every op but flash_attention (phase d), varlen_attention (phase v) and the quantised linears
# (phase q): a new op goes here.
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:---quick --only ops,model --ops rms_norm,rms_norm+residual,swiglu,apply_rotary,decode,linear_cross_entropy}"
read -r -a VARLEN_ARGS <<< "${VARLEN_ARGS:---quick --only ops,batches --ops varlen_attention --shapes llama3-8b,smollm2-135m}"
read -r -a ATTN_ARGS <<< "${ATTN_ARGS:---quick --only ops --ops flash_attention --shapes llama3-8b,smollm2-135m --tokens 2048,4096,8192,16384 --no-compile}"
read -r -a FAMILY_ARGS <<< "${FAMILY_ARGS:---quick --only model --family qwen3}"
read -r -a QUANT_ARGS <<< "${QUANT_ARGS:---quick --only ops,model --ops int8_linear,int4_linear-g128 --quantize 8,4}"
read -r -a MEMORY_ARGS <<< "${MEMORY_ARGS:---only memory --memory-models llama3.2-1b --memory-modes full,lora+ckpt --memory-providers hf-sdpa,hf+ours,hf+ours+long --memory-tokens 2048,4096 --memory-max-tokens 4096 --memory-no-search}"
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
# `pack`: every file of phases b, v, d, f, m and q (the folders at the root: their names differ) in bench.tgz.
pack() {
  local args=() d
  for d in "$BENCH_DIR" "$VARLEN_DIR" "$ATTN_DIR" "$FAMILY_DIR" "$MEMORY_DIR" "$QUANT_DIR"; do
    compgen -G "$d/*" > /dev/null && args+=(-C "$d" .)
  done
  if ((${#args[@]})); then
    tar -czf "$OUT/bench.tgz" "${args[@]}" && echo "copied to $OUT: $(ls "$OUT" | tr '\n' ' ')"
  else
    echo "the benchmarks wrote nothing to $BENCH_DIR, $VARLEN_DIR, $ATTN_DIR, $FAMILY_DIR, $MEMORY_DIR or $QUANT_DIR"
  fi
}
# `add_suffix DIR SUFFIX`: <stem>.json, <stem>.md, <stem>-ops-<op>.png ... in DIR become <stem>-SUFFIX.json,
# ...: apart from phase b's files of the same stem, in $OUT and in bench.tgz.
add_suffix() {
  local j stem f
  for j in "$1"/*.json; do
    [ -f "$j" ] || continue
    stem=$(basename "$j" .json)
    for f in "$1/$stem"*; do
      mv "$f" "$1/$stem-$2${f#"$1/$stem"}"
    done
  done
}
CHECK_RC=- CHECK_TESTS_RC=- BENCH_RC=- VARLEN_RC=- ATTN_RC=- FAMILY_RC=- MEMORY_RC=- QUANT_RC=- TESTS_RC=-

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
  for m in pytest xdist pytest_timeout liger_kernel gguf transformers matplotlib flash_attn torchao bitsandbytes; do
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
  # Plain files, to commit as they are; the tool returns 8 files at most, so the plots travel in
  # bench.tgz only.
  for f in "$BENCH_DIR"/*.json "$BENCH_DIR"/*.md; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  pack | tee -a "$OUT/bench.txt"
fi

# --- v. packed and padded batches ----------------------------------------------------------------------
if wanted v; then
  phase "v. python -m benchmarks ${VARLEN_ARGS[*]} --out $VARLEN_DIR" | tee -a "$OUT/bench.txt"
  rm -rf "${VARLEN_DIR:?}" # a fresh folder: its files are renamed below
  limited "$(limit "${VARLEN_TIMEOUT:-150}")" "$PY" -m benchmarks "${VARLEN_ARGS[@]}" --out "$VARLEN_DIR" \
    2>&1 | tee -a "$OUT/bench.txt"
  VARLEN_RC=$?
  add_suffix "$VARLEN_DIR" varlen
  # No plain copies in $OUT (8 files at most come back): the JSON is in bench.tgz, the tables here.
  for f in "$VARLEN_DIR"/*-varlen.md; do
    [ -f "$f" ] && { echo "--- $(basename "$f")"; cat "$f"; } >> "$OUT/bench.txt"
  done
  pack | tee -a "$OUT/bench.txt"
fi

# --- d. the attention sweep ---------------------------------------------------------------------------
if wanted d; then
  phase "d. python -m benchmarks ${ATTN_ARGS[*]} --out $ATTN_DIR" | tee -a "$OUT/bench.txt"
  rm -rf "${ATTN_DIR:?}" # a fresh folder: its files are renamed below
  limited "$(limit "${ATTN_TIMEOUT:-150}")" "$PY" -m benchmarks "${ATTN_ARGS[@]}" --out "$ATTN_DIR" \
    2>&1 | tee -a "$OUT/bench.txt"
  ATTN_RC=$?
  add_suffix "$ATTN_DIR" attention
  for f in "$ATTN_DIR"/*-attention.json "$ATTN_DIR"/*-attention.md; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  pack | tee -a "$OUT/bench.txt"
fi

# `appended NAME DIR SECONDS ARGS...`: phase NAME, the benchmark with ARGS into a fresh DIR (only this
# run's files are packed and appended) under SECONDS; no plain copies in $OUT (8 files at most come
# back): its JSON is in bench.tgz, its tables appended to bench.txt.  Returns the benchmark's status.
appended() {
  local name=$1 dir=$2 seconds=$3 rc f
  shift 3
  phase "$name. python -m benchmarks $* --out $dir" | tee -a "$OUT/bench.txt"
  rm -rf "${dir:?}"
  limited "$(limit "$seconds")" "$PY" -m benchmarks "$@" --out "$dir" 2>&1 | tee -a "$OUT/bench.txt"
  rc=$?
  for f in "$dir"/*.md; do
    [ -f "$f" ] && { echo "--- $(basename "$f")"; cat "$f"; } >> "$OUT/bench.txt"
  done
  pack | tee -a "$OUT/bench.txt"
  return $rc
}

# --- f. another model family (not in the default PHASES) ----------------------------------------------
if wanted f; then
  appended f "$FAMILY_DIR" "${FAMILY_TIMEOUT:-240}" "${FAMILY_ARGS[@]}"
  FAMILY_RC=$?
fi

# --- m. training-step memory, fake count beside the real step (not in the default PHASES) -------------
if wanted m; then
  appended m "$MEMORY_DIR" "${MEMORY_TIMEOUT:-180}" "${MEMORY_ARGS[@]}"
  MEMORY_RC=$?
fi

# --- q. weight-only quantisation: the op at LLaMA-3-8B's projections, the 32-layer model (not in the default PHASES)
if wanted q; then
  appended q "$QUANT_DIR" "${QUANT_TIMEOUT:-300}" "${QUANT_ARGS[@]}"
  QUANT_RC=$?
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

phase "done: check rc $CHECK_RC, quick tests rc $CHECK_TESTS_RC, benchmark rc $BENCH_RC, varlen rc $VARLEN_RC," \
  "attention rc $ATTN_RC, family rc $FAMILY_RC, memory rc $MEMORY_RC, quantized rc $QUANT_RC, tests rc $TESTS_RC" \
  | tee -a "$OUT/check.txt"
exit 0
