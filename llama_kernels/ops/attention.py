"""Flash attention: forward and backward for training and prefill, grouped-query heads, any strides.

Notation: for one (batch, query head) pair, ``q (Tq, D)`` and the ``k, v (Tk, D)`` of its KV head
(query head ``h`` reads KV head ``h // group``, ``group = Hq // Hk``), ``c = sm_scale * log2(e)``.
Causal masking is aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + (Tk - Tq)``.

Forward (online softmax in base 2; ``T x T`` scores never leave a tile)::

    for each key tile j:   s = c * q k_j^T                      (float32, masked entries -inf)
                           m' = max(m, rowmax(s));  p = 2^(s - m')
                           l  = 2^(m - m') l + rowsum(p)
                           acc = 2^(m - m') acc + cast(p) v_j   (cast to the input dtype, as the GPU
                                                                  feeds the tensor cores)
    o = acc / l;   kept for the backward, per row: m and log2(l)   (float32 "stats")

The backward recomputes ``P = 2^((s - m) - log2(l))``.  ``m`` and ``log2(l)`` are stored apart, not
as their sum (the log-sum-exp): rounded to float32 that sum loses ``|lse| * 2^-24`` in every
exponent, which with large logits (``|s|`` in the hundreds) would make the recomputed ``P`` differ
from the forward's by ~1e-5 relative, far more than eager float32 attention's error.  ``s - m``
repeats the forward's own arithmetic, so the two agree.  This matters for float32 inputs, which
also keep ``m`` in raw score units and form exponents as ``c (s - m)``, exact at the max (see
``softmax_row_max``); half precision folds ``m + log2(l)`` in the backward, one FMA per score,
since there the rounding is far below the input precision.

A row that sees no key (causal with ``Tq > Tk``) ends with ``l = 0``: it outputs zeros and stores
``m = +inf``, so every probability the backward recomputes for it is ``2^(s - inf) = 0``.

Backward, with ``P`` recomputed tile by tile from q, k and the stats::

    Delta = rowsum(dO * O)                  (preprocess kernel, float32)
    dV    = P^T dO
    dP    = dO V^T
    dS    = P * (dP - Delta)                (gradient of the scaled scores sm_scale * q k^T)
    dQ    = sm_scale * dS K
    dK    = sm_scale * dS^T Q

For float32 inputs ``Delta`` is instead summed as ``rowsum(P * dP)`` by a first pass of the dQ
kernel over the same ``P`` and ``dP`` tiles, so ``dP - Delta`` cancels exactly where a row's
softmax is one-hot (large logits), as in eager autograd; ``rowsum(dO * O)`` differs from it by
roundings that large logits magnify.  That pass costs two matmuls per tile, so only float32, the
accuracy reference rather than the fast path, pays for it.

``attention_bwd_dkdv_kernel`` runs one program per (key tile, batch, KV head): it keeps that tile's
``k, v`` and float32 ``dK, dV`` accumulators on chip and loops over every query head of the GQA
group and their query tiles, so the group sum happens inside the program: no atomics, and the
result is bitwise reproducible.  ``attention_bwd_dq_kernel`` runs one program per query tile and
walks the key tiles like the forward.  Both only visit tiles that the causal mask leaves visible,
and only tiles that straddle the diagonal (or a ragged edge) pay for masking.  Padding rows of a
ragged tile are masked in the exponent, never left to produce inf/NaN that is merely not stored:
a padding key's zero score can exceed the max of a row whose scores are all negative, and
``2^(0 - m)`` would overflow (non-causal; causal masking hides those keys anyway).

Precision: scores, softmax statistics and all accumulators are float32.  With float32 inputs the
dots run in IEEE float32 (the GPU's default TF32 would lose accuracy); with float16/bfloat16 the
operands of every dot are in the input dtype.  Under the Triton interpreter, which computes
bfloat16 dots and arithmetic wrongly, the operands are rounded to the input dtype (``cast_rne``) and
then multiplied in float32, which gives the same values as the GPU's tensor cores.

Launch order and tuning: forward and dQ programs run the query tiles of one head back to back
(last tiles first, since under causal masking they see the most keys) and the query heads of one
KV group are neighbours, so the K/V tiles that the programs in flight read stay in L2.  On the GPU
large problems are autotuned over a few tile shapes per kernel, head dim and dtype (``CONFIGS``);
small ones, and the interpreter, use one fixed tiling.

Calls that need no gradient and have few queries per KV group (``Tq * Hq / Hk <= 64``: generation)
go to the split-KV kernels of ``decode.py`` instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    INTERPRET,
    autocast_inputs,
    cast_rne,
    check_float_arg,
    check_same,
    check_tensor,
    compilable,
    count_launch,
    use_triton,
)

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels have tiles for ``head_dim``: a multiple of 16 from 16 to ``MAX_HEAD_DIM``."""
    return head_dim % 16 == 0 and 16 <= head_dim <= MAX_HEAD_DIM


# Under the interpreter every kernel runs with one fixed, small tiling: (BLOCK_M, BLOCK_N).
# The forward/dQ and dK/dV orientations differ on purpose so that tests cover both BLOCK_M > BLOCK_N
# and BLOCK_M < BLOCK_N around the causal diagonal.  Tests may patch these.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}

# Problems with at least this many (query, key) pairs per head are autotuned on the GPU; smaller
# ones use a fixed configuration (cheap to compile, nothing to benchmark on the first call).
AUTOTUNE_MIN_PAIRS = 512 * 512


# ------------------------------------------------------------------------------------------------
# Tile helpers (inlined into the kernels)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows_in, cols_in, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr,
               DOT_IN_FP32: tl.constexpr):
    # A (rows, BLOCK_D) tile.  Masks are compiled in only where a tile can leave the tensor: the
    # head-dim padding (PAD_D) and ragged sequence edges (MASK_ROWS).
    if MASK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=rows_in[:, None] & cols_in[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_in[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=cols_in[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # Round a float32 tile to the input dtype, the precision the tensor cores multiply in.  Under
    # the interpreter the rounded value is kept in float32 (its bfloat16 dots are wrong).
    x = cast_rne(x, DTYPE)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def softmax_row_max(m_i, s, qk_scale, RAW_MAX: tl.constexpr):
    """Running row max of the scores ``s``: raw units (RAW_MAX) or scaled by ``qk_scale``.

    float32 inputs keep the max in raw score units and exponents as ``(s - m) * c``: the max
    score's exponent is then exactly 0 (``s - m`` is exact for nearby scores), so a one-hot row
    gets ``P = 1`` exactly and its gradient cancels exactly, as in eager float32.  Half precision
    uses ``s * c - m``, one fused multiply-add per score, whose rounding of ``m`` (a common
    offset of the row, up to ``|s| * 2^-24``) is far below the error of half-precision eager.
    """
    if RAW_MAX:
        return tl.maximum(m_i, tl.max(s, 1))
    # qk_scale > 0, so scaling the row max equals the max of the scaled row.
    return tl.maximum(m_i, tl.max(s, 1) * qk_scale)


@triton.jit
def softmax_exponent(s, m, qk_scale, RAW_MAX: tl.constexpr):
    """log2 of the unnormalised probability ``2^(c s - c max)`` (``m`` broadcasts against ``s``)."""
    if RAW_MAX:
        return (s - m) * qk_scale
    return s * qk_scale - m


@triton.jit
def softmax_log_prob(s, m, log2_l, qk_scale, RAW_MAX: tl.constexpr):
    """log2 of the normalised probability, as the backward recomputes it from the row stats.

    Half precision folds ``m + log2(l)`` first (one fused multiply-add per score; rounding that
    log-sum-exp costs ~``|lse| * 2^-24`` relative, far below half-precision error); float32
    keeps them apart so the exponent of a one-hot row's max is exactly 0.
    """
    if RAW_MAX:
        return (s - m) * qk_scale - log2_l
    return s * qk_scale - (m + log2_l)


@triton.jit
def softmax_rescale(m_old, m_new, qk_scale, RAW_MAX: tl.constexpr):
    """The factor ``2^(c (max_old - max_new))`` that moves sums kept against ``m_old`` to ``m_new``."""
    if RAW_MAX:
        return tl.exp2((m_old - m_new) * qk_scale)
    return tl.exp2(m_old - m_new)


@triton.jit
def _store_tile(ptrs, x, rows_in, cols_in, PAD_D: tl.constexpr):
    x = cast_rne(x, ptrs.dtype.element_ty)
    if PAD_D:
        tl.store(ptrs, x, mask=rows_in[:, None] & cols_in[None, :])
    else:
        tl.store(ptrs, x, mask=rows_in[:, None])


@triton.jit
def _causal_key_bounds(start_m, seq_q, seq_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Key range of the query tile at ``start_m``: ``[0, full_hi)`` needs no mask at all,
    ``[full_hi, hi)`` holds the diagonal and the ragged end of the keys; the rest is invisible."""
    whole_tiles = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        offset = seq_k - seq_q
        # Key j is visible to every row of the tile iff j <= start_m + offset.
        first_row_sees = start_m + offset + 1
        full_hi = tl.minimum(tl.maximum(first_row_sees, 0) // BLOCK_N * BLOCK_N, whole_tiles)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), seq_k)
    else:
        full_hi = whole_tiles
        hi = seq_k
    return full_hi, hi


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile_scores(q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in,
                     seq_q, seq_k, MASK: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                     DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # The key/value tile at start_n, the raw scores q k^T, and which (query, key) pairs are
    # visible (ragged end of the keys, causal diagonal); callers apply it only where MASK.
    start_n = tl.multiple_of(start_n, offs_n.shape[0])
    tile = start_n.to(tl.int64)
    keys = start_n + offs_n
    keys_in = keys < seq_k
    k = _load_tile(k_base + tile * k_st + k_offs, keys_in, d_in, MASK, PAD_D, DOT_IN_FP32)
    v = _load_tile(v_base + tile * v_st + v_offs, keys_in, d_in, MASK, PAD_D, DOT_IN_FP32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    visible = keys_in[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= offs_m[:, None] + (seq_k - seq_q))
    return k, v, s, visible


@triton.jit
def _fwd_key_range(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, hi, offs_n,
                   offs_m, offs_d, seq_q, seq_k, qk_scale,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAD_D: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, RAW_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax over the key tiles [lo, hi); MASK compiles the causal/ragged masks in.
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = _key_tile_scores(
            q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in, seq_q,
            seq_k, MASK, CAUSAL, PAD_D, DOT_IN_FP32, PRECISION,
        )
        if MASK:
            s = tl.where(visible, s, float("-inf"))
        m_new = softmax_row_max(m_i, s, qk_scale, RAW_MAX)
        p = tl.exp2(softmax_exponent(s, m_new[:, None], qk_scale, RAW_MAX))
        alpha = softmax_rescale(m_i, m_new, qk_scale, RAW_MAX)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(_dot_operand(p, DTYPE, DOT_IN_FP32), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile_program(num_heads, group, BLOCK_M: tl.constexpr):
    # (start_m, bh, b, h, kvh) of this forward/dQ program.  Tiles of one head are adjacent in
    # launch order (axis 0 fastest), and the query heads of one KV group are adjacent heads, so the
    # K/V tiles that programs in flight share stay in L2.  Under causal masking the last query
    # tiles see the most keys: launch them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    kvh = (h // group).to(tl.int64)
    return start_m, bh, b, h.to(tl.int64), kvh


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, STATS,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    o_sb, o_sh, o_st, o_sd,
    num_heads, group, seq_q, seq_k, qk_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, bh, b, h, kvh = _query_tile_program(num_heads, group, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = offs_m < seq_q
    d_in = offs_d < HEAD_DIM

    q_ptrs = Q + b * q_sb + h * q_sh + offs_m[:, None] * q_st + offs_d[None, :] * q_sd
    q = _load_tile(q_ptrs, rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    # Tile offsets stay 32-bit; the per-head base and the tile start are 64-bit.
    k_base = K + b * k_sb + kvh * k_sh
    v_base = V + b * v_sb + kvh * v_sh
    k_offs = offs_n[:, None] * k_st + offs_d[None, :] * k_sd
    v_offs = offs_n[:, None] * v_st + offs_d[None, :] * v_sd

    # m starts finite so that a row whose keys are all masked so far computes 2^(-inf) = 0, never
    # 2^(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    full_hi, hi = _causal_key_bounds(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    # Key tiles every row of this query tile sees in full need no mask; the rest hold the diagonal.
    acc, l_i, m_i = _fwd_key_range(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, 0, full_hi, offs_n, offs_m,
        offs_d, seq_q, seq_k, qk_scale,
        False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_key_range(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, full_hi, hi, offs_n, offs_m,
        offs_d, seq_q, seq_k, qk_scale,
        True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
    )

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc * (1.0 / l_safe)[:, None]
    o_ptrs = O + b * o_sb + h * o_sh + offs_m[:, None] * o_st + offs_d[None, :] * o_sd
    _store_tile(o_ptrs, o, rows_in, d_in, PAD_D)
    # Row statistics for the backward: m (+inf where no key is visible) and log2(l), apart.
    stats_ptrs = STATS + bh.to(tl.int64) * seq_q + offs_m
    tl.store(stats_ptrs, tl.where(seen, m_i, float("inf")), mask=rows_in)
    tl.store(stats_ptrs + stats_plane, tl.log2(l_safe), mask=rows_in)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    o_sb, o_sh, o_st, o_sd,
    do_sb, do_sh, do_st, do_sd,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * o_sb + h * o_sh + offs_m[:, None] * o_st + offs_d[None, :] * o_sd,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * do_sb + h * do_sh + offs_m[:, None] * do_st + offs_d[None, :] * do_sd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _dkdv_query_range(dk, dv, k, v, q_base, do_base, stats_base, delta_base, q_offs, do_offs,
                      q_st, do_st, lo, hi, offs_m, keys, offs_d, seq_q, seq_k, qk_scale,
                      stats_plane,
                      MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PAD_D: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      PRECISION: tl.constexpr, RAW_MAX: tl.constexpr, BLOCK_M: tl.constexpr):
    # Accumulate the query tiles [lo, hi) of one query head into this key tile's dK, dV.
    # Transposed form: rows are keys, columns are queries, so the row stats broadcast along rows.
    d_in = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        tile = start_m.to(tl.int64)
        queries = start_m + offs_m
        rows_in = queries < seq_q
        q = _load_tile(q_base + tile * q_st + q_offs, rows_in, d_in, MASK, PAD_D, DOT_IN_FP32)
        do = _load_tile(do_base + tile * do_st + do_offs, rows_in, d_in, MASK, PAD_D, DOT_IN_FP32)
        stats_ptrs = stats_base + queries
        if MASK:
            # Queries past the end get m = +inf, hence P = 0 (their q and dO are zeros anyway).
            m = tl.load(stats_ptrs, mask=rows_in, other=float("inf"))
            log2_l = tl.load(stats_ptrs + stats_plane, mask=rows_in, other=0.0)
            delta = tl.load(delta_base + queries, mask=rows_in, other=0.0)
        else:
            m = tl.load(stats_ptrs)
            log2_l = tl.load(stats_ptrs + stats_plane)
            delta = tl.load(delta_base + queries)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        x_t = softmax_log_prob(s_t, m[None, :], log2_l[None, :], qk_scale, RAW_MAX)
        # Mask the exponent, not P: a hidden score may exceed m and overflow 2^x.  Causal, the
        # diagonal also hides the padding keys of a ragged key tile (j >= Tk > i + Tk - Tq);
        # non-causal, those padding keys (zero scores, above the max of a row whose scores are all
        # negative) are the only thing to hide.  Padding queries have m = +inf, hence P = 0.
        if MASK:
            if CAUSAL:
                x_t = tl.where(keys[:, None] <= queries[None, :] + (seq_k - seq_q), x_t,
                               float("-inf"))
            else:
                x_t = tl.where(keys[:, None] < seq_k, x_t, float("-inf"))
        p_t = tl.exp2(x_t)
        dv = tl.dot(_dot_operand(p_t, DTYPE, DOT_IN_FP32), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_dot_operand(ds_t, DTYPE, DOT_IN_FP32), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd,
    dk_sb, dk_sh, dk_st, dk_sd,
    dv_sb, dv_sh, dv_st, dv_sd,
    num_kv_heads, group, seq_q, seq_k, qk_scale, sm_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key tile, batch, KV head).  Causal: key tile 0 is seen by every query, so
    # launch order (axis 0 fastest, ascending) starts with the longest programs.
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // num_kv_heads).to(tl.int64)
    kvh = bkv % num_kv_heads
    num_heads = num_kv_heads * group

    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys_in = keys < seq_k
    d_in = offs_d < HEAD_DIM
    kvh64 = kvh.to(tl.int64)
    k = _load_tile(K + b * k_sb + kvh64 * k_sh + keys[:, None] * k_st + offs_d[None, :] * k_sd,
                   keys_in, d_in, True, PAD_D, DOT_IN_FP32)
    v = _load_tile(V + b * v_sb + kvh64 * v_sh + keys[:, None] * v_st + offs_d[None, :] * v_sd,
                   keys_in, d_in, True, PAD_D, DOT_IN_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    # Query tiles, by what they need:
    #   [lo, mid)           straddle the causal diagonal: masked
    #   [full_lo, full_hi)  every row sees every key of this tile and lies inside Tq: no mask
    #   [tail, seq_q)       the ragged last query tile: masked
    whole = (seq_q // BLOCK_M) * BLOCK_M
    full_hi = whole
    if CAUSAL:
        offset = seq_k - seq_q
        # Query i sees key j iff i >= j - offset: rows below start_n - offset see none of the tile,
        # rows from start_n + BLOCK_N - 1 - offset on see all of it.
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(full_lo, tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
        tail = tl.maximum(full_lo, whole)
    else:
        lo = 0
        mid = 0
        full_lo = 0
        # The ragged last key tile: its padding keys must be masked against every query (see
        # _dkdv_query_range), so all its query tiles take the masked loop.
        whole_key_tile = start_n + BLOCK_N <= seq_k
        full_hi = tl.where(whole_key_tile, whole, 0)
        tail = tl.where(whole_key_tile, whole, 0)
    q_offs = offs_m[:, None] * q_st + offs_d[None, :] * q_sd
    do_offs = offs_m[:, None] * do_st + offs_d[None, :] * do_sd

    # The group's query heads are summed here, inside the program: deterministic, no atomics.
    for g in range(0, group):
        h = kvh * group + g
        bh = b * num_heads + h
        h64 = h.to(tl.int64)
        q_base = Q + b * q_sb + h64 * q_sh
        do_base = DO + b * do_sb + h64 * do_sh
        stats_base = STATS + bh * seq_q
        delta_base = DELTA + bh * seq_q
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, stats_base, delta_base, q_offs, do_offs, q_st, do_st,
            lo, mid, offs_m, keys, offs_d, seq_q, seq_k, qk_scale, stats_plane,
            True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_M,
        )
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, stats_base, delta_base, q_offs, do_offs, q_st, do_st,
            full_lo, full_hi, offs_m, keys, offs_d, seq_q, seq_k, qk_scale, stats_plane,
            False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_M,
        )
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, stats_base, delta_base, q_offs, do_offs, q_st, do_st,
            tail, seq_q, offs_m, keys, offs_d, seq_q, seq_k, qk_scale, stats_plane,
            True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_M,
        )

    dk_ptrs = DK + b * dk_sb + kvh64 * dk_sh + keys[:, None] * dk_st + offs_d[None, :] * dk_sd
    dv_ptrs = DV + b * dv_sb + kvh64 * dv_sh + keys[:, None] * dv_st + offs_d[None, :] * dv_sd
    _store_tile(dk_ptrs, dk * sm_scale, keys_in, d_in, PAD_D)
    _store_tile(dv_ptrs, dv, keys_in, d_in, PAD_D)


@triton.jit
def _dq_key_range(dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, hi,
                  offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, DELTA_PASS: tl.constexpr,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PAD_D: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, RAW_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    # Over the key tiles [lo, hi): accumulate dQ, or (DELTA_PASS) Delta = rowsum(P * dP).
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = _key_tile_scores(
            q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in, seq_q,
            seq_k, MASK, CAUSAL, PAD_D, DOT_IN_FP32, PRECISION,
        )
        x = softmax_log_prob(s, m[:, None], log2_l[:, None], qk_scale, RAW_MAX)
        if MASK:
            x = tl.where(visible, x, float("-inf"))
        p = tl.exp2(x)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DELTA_PASS:
            delta += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(_dot_operand(ds, DTYPE, DOT_IN_FP32), k, dq, input_precision=PRECISION)
    return dq, delta


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, DQ,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd,
    dq_sb, dq_sh, dq_st, dq_sd,
    num_heads, group, seq_q, seq_k, qk_scale, sm_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, bh, b, h, kvh = _query_tile_program(num_heads, group, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = offs_m < seq_q
    d_in = offs_d < HEAD_DIM
    q = _load_tile(Q + b * q_sb + h * q_sh + offs_m[:, None] * q_st + offs_d[None, :] * q_sd,
                   rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    do = _load_tile(DO + b * do_sb + h * do_sh + offs_m[:, None] * do_st + offs_d[None, :] * do_sd,
                    rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    row_base = bh.to(tl.int64) * seq_q
    m = tl.load(STATS + row_base + offs_m, mask=rows_in, other=float("inf"))
    log2_l = tl.load(STATS + stats_plane + row_base + offs_m, mask=rows_in, other=0.0)
    k_base = K + b * k_sb + kvh * k_sh
    v_base = V + b * v_sb + kvh * v_sh
    k_offs = offs_n[:, None] * k_st + offs_d[None, :] * k_sd
    v_offs = offs_n[:, None] * v_st + offs_d[None, :] * v_sd
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    full_hi, hi = _causal_key_bounds(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    if EXACT_DELTA:
        # A first pass sums Delta = rowsum(P * dP) from the very P and dP that the dQ and dK/dV
        # kernels use, so dP - Delta cancels exactly where P is one-hot (as in eager autograd);
        # rowsum(dO * O) differs from it by roundings that large logits magnify.  It costs two
        # more matmuls per tile, so only float32 (the accuracy reference, not the fast path) pays.
        delta = tl.zeros([BLOCK_M], tl.float32)
        dq, delta = _dq_key_range(
            dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, 0, full_hi,
            offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, True,
            False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        )
        dq, delta = _dq_key_range(
            dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, full_hi, hi,
            offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, True,
            True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        )
        tl.store(DELTA + row_base + offs_m, delta, mask=rows_in)  # for the dK/dV kernel
    else:
        delta = tl.load(DELTA + row_base + offs_m, mask=rows_in, other=0.0)
    dq, delta = _dq_key_range(
        dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, 0, full_hi,
        offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, False,
        False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
    )
    dq, delta = _dq_key_range(
        dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, full_hi, hi,
        offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, False,
        True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
    )

    dq_ptrs = DQ + b * dq_sb + h * dq_sh + offs_m[:, None] * dq_st + offs_d[None, :] * dq_sd
    _store_tile(dq_ptrs, dq * sm_scale, rows_in, d_in, PAD_D)


# ------------------------------------------------------------------------------------------------
# Launch configurations
# ------------------------------------------------------------------------------------------------


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages)


# Candidate configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, dtype width and
# padded head dim.  Forward and dQ: BLOCK_M resident query rows, BLOCK_N streamed keys.  dK/dV:
# BLOCK_N resident keys, BLOCK_M streamed queries.  The first of each list is the fixed choice
# for small problems; the rest are autotuned on large ones.  They were checked by compiling for
# sm_90 (shared memory within the H100's 227 KiB; few or no register spills).  float32 runs
# IEEE FMA dots, which need small tiles and 8 warps to stay out of local memory.
_HALF, _FP32 = 2, 4
CONFIGS = {
    ("fwd", _HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
                          (64, 128, 8, 2), (64, 64, 4, 3)],
    ("fwd", _HALF, 256): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2)],
    ("fwd", _FP32, 128): [(32, 32, 8, 2)],
    ("fwd", _FP32, 256): [(32, 32, 8, 1)],
    ("dkdv", _HALF, 64): [(32, 64, 4, 2), (32, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2),
                          (32, 64, 4, 3)],
    ("dkdv", _HALF, 128): [(16, 64, 8, 2), (16, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 3),
                           (16, 64, 8, 3)],
    ("dkdv", _HALF, 256): [(16, 64, 8, 2), (16, 32, 4, 2)],
    ("dkdv", _FP32, 128): [(16, 32, 8, 2)],
    ("dkdv", _FP32, 256): [(16, 32, 8, 1)],
    ("dq", _HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
                         (64, 32, 4, 3), (128, 128, 8, 2)],
    ("dq", _HALF, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", _FP32, 128): [(32, 32, 8, 2)],
    ("dq", _FP32, 256): [(32, 32, 8, 1)],
}


def _candidates(kind, block_d, elt):
    """Configurations for ``kind`` at padded head dim ``block_d`` and element size ``elt``."""
    width = _FP32 if elt == 4 else _HALF
    for bound in (64, 128, 256):
        if block_d <= bound and (kind, width, bound) in CONFIGS:
            return CONFIGS[(kind, width, bound)]
    raise AssertionError(f"no {kind} configuration for head dim {block_d}")


def _autotuned(kernel, kind):
    """``kernel`` wrapped in ``triton.autotune`` over every candidate of ``kind``, pruned at launch
    to the candidates of the call's head dim and dtype.  Built only with a GPU: under the
    interpreter a multi-config autotuner cannot benchmark."""
    if INTERPRET:
        return None
    every = sorted({c for (k, _, _), cs in CONFIGS.items() if k == kind for c in cs})

    def prune(configs, named_args, **kwargs):
        wanted = set(_candidates(kind, kwargs["BLOCK_D"], named_args["Q"].element_size()))
        return [c for c, t in zip(configs, every) if t in wanted]

    return triton.autotune(
        configs=[_config(*c) for c in every],
        key=["HEAD_DIM", "CAUSAL", "TQ_BUCKET", "TK_BUCKET"],
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_TUNED = {
    "fwd": _autotuned(attention_fwd_kernel, "fwd"),
    "dkdv": _autotuned(attention_bwd_dkdv_kernel, "dkdv"),
    "dq": _autotuned(attention_bwd_dq_kernel, "dq"),
}


def _launch(kernel, kind, grid, args, consts, seq_q, seq_k):
    """Launch ``kernel``: autotuned for large problems on the GPU, else with a fixed config."""
    candidates = _candidates(kind, consts["BLOCK_D"], args[0].element_size())
    if INTERPRET:
        block_m, block_n, num_warps, num_stages = (*INTERPRET_BLOCKS[kind], 4, 1)
    elif len(candidates) > 1 and seq_q * seq_k >= AUTOTUNE_MIN_PAIRS:
        _TUNED[kind][grid](*args, **consts)
        count_launch(kernel)
        return
    else:
        block_m, block_n, num_warps, num_stages = candidates[0]
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    kernel[grid(meta)](*args, **consts, **meta, num_warps=num_warps, num_stages=num_stages)
    count_launch(kernel)


def dot_mode(dtype):
    """``(DOT_IN_FP32, PRECISION)`` for the kernels' dots: the GPU multiplies half-precision
    operands as they are and float32 in IEEE precision (never TF32); the interpreter multiplies
    everything in float32 (its bfloat16 dots are wrong).  Tests patch this to run the GPU's
    half-precision operand path under the interpreter (float16 only)."""
    return INTERPRET, ("ieee" if (dtype == torch.float32 or INTERPRET) else "tf32")


def _common_consts(q, causal):
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_in_fp32, precision = dot_mode(q.dtype)
    return dict(
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, PAD_D=block_d != head_dim,
        DOT_IN_FP32=dot_in_fp32, PRECISION=precision, RAW_MAX=q.dtype == torch.float32,
    )


def _bucket(n):
    return triton.next_power_of_2(max(int(n), 1))


# ------------------------------------------------------------------------------------------------
# Launchers (custom ops for torch.compile)
# ------------------------------------------------------------------------------------------------


def _fwd_fake(q, k, v, causal, sm_scale):
    o = torch.empty_like(q)
    return o, q.new_empty((2, *q.shape[:3]), dtype=torch.float32)


@compilable("flash_attention_fwd", _fwd_fake)
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: returns ``(o, stats)``; ``stats (2, B, Hq, Tq)`` float32 holds each row's
    softmax max ``m`` (base 2 of the scaled scores; ``+inf`` for a row that sees no key) and
    ``log2`` of its sum, for the backward."""
    batch, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    o = torch.empty_like(q)  # q's memory layout when dense (e.g. (B, T, H, D) transposed)
    stats = torch.empty((2, batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, stats
    args = (
        q, k, v, o, stats, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        heads, heads // kv_heads, seq_q, seq_k, sm_scale * LOG2E, stats[0].numel(),
        _bucket(seq_q), _bucket(seq_k),
    )

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    _launch(attention_fwd_kernel, "fwd", grid, args, _common_consts(q, causal),
            seq_q, seq_k)
    return o, stats


def _bwd_fake(do, q, k, v, o, stats, causal, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@compilable("flash_attention_bwd", _bwd_fake)
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    stats: torch.Tensor, causal: bool, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: returns ``(dq, dk, dv)``.

    Half precision: preprocess (``Delta = rowsum(dO * O)``), dQ, dK/dV.  float32: the dQ kernel
    sums ``Delta = rowsum(P * dP)`` itself in a first pass (exact cancellation where the softmax
    is one-hot, as eager gets), then dK/dV reads it.
    """
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    consts = _common_consts(q, causal)
    group = heads // kv_heads
    qk_scale = sm_scale * LOG2E
    exact_delta = q.dtype == torch.float32

    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if not exact_delta:
        # Two float32 tiles of block_m x BLOCK_D: about 4k elements each keeps them in registers.
        block_m = 16 if INTERPRET else max(16, min(64, 4096 // consts["BLOCK_D"]))
        attention_bwd_preprocess_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
            o, do, delta, *o.stride(), *do.stride(), heads, seq_q,
            HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_M=block_m, num_warps=4,
        )
        count_launch(attention_bwd_preprocess_kernel)

    buckets = (_bucket(seq_q), _bucket(seq_k))
    dq_args = (
        q, k, v, do, stats, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        heads, group, seq_q, seq_k, qk_scale, sm_scale, stats[0].numel(), *buckets,
    )

    def dq_grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    _launch(attention_bwd_dq_kernel, "dq", dq_grid, dq_args,
            {**consts, "EXACT_DELTA": exact_delta}, seq_q, seq_k)

    dkdv_args = (
        q, k, v, do, stats, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        kv_heads, group, seq_q, seq_k, qk_scale, sm_scale, stats[0].numel(), *buckets,
    )

    def dkdv_grid(meta):
        return (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * kv_heads)

    _launch(attention_bwd_dkdv_kernel, "dkdv", dkdv_grid, dkdv_args, consts, seq_q, seq_k)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd of ``flash_attention``: saves q, k, v, o and the float32 softmax row stats."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, stats = attention_fwd(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, stats, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def _validate(q, k, v, causal, sm_scale, names=("q", "k", "v")):
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, ndim=4)
    check_same("dtype", **{qn: q, kn: k, vn: v})
    check_same("device", **{qn: q, kn: k, vn: v})
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{vn} must have the shape of {kn} {tuple(k.shape)}, got {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{kn} must have {qn}'s batch size {batch}, got shape {tuple(k.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"{kn} must have {qn}'s head dim {head_dim}, got shape {tuple(k.shape)}")
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(
            f"{kn}'s number of heads must divide {qn}'s ({heads}) for grouped-query attention; "
            f"got {k.shape[1]}"
        )
    if not supports_head_dim(head_dim):
        raise ValueError(
            f"{qn}'s head dim must be a multiple of 16 between 16 and {MAX_HEAD_DIM}, got {head_dim}"
        )
    if k.shape[2] < 1:
        raise ValueError(f"{kn} must hold at least one key (Tk >= 1), got shape {tuple(k.shape)}")
    if sm_scale is None:
        return head_dim ** -0.5
    return check_float_arg("sm_scale", sm_scale, positive=True)


def flash_attention(q, k, v, causal=True, sm_scale=None):
    """Scaled dot-product attention with grouped-query heads, in O(T) memory.

    ``q (B, Hq, Tq, D)``, ``k, v (B, Hk, Tk, D)`` with ``Hq % Hk == 0`` (query head ``h`` reads KV
    head ``h // (Hq // Hk)``; K/V are never repeated in memory), any strides (e.g. transposed views
    of ``(B, T, H, D)`` projections, or ``cache[:, :, :L]`` slices of a KV cache).  ``D`` is a
    multiple of 16 up to 256.  Returns ``o (B, Hq, Tq, D)`` in ``q.dtype``.

    ``causal`` masks bottom-right: query ``i`` sees key ``j <= i + Tk - Tq`` (one decode step sees
    the whole cache); a query that sees no key outputs zeros.  ``sm_scale`` defaults to
    ``D ** -0.5``.  Differentiable in ``q``, ``k`` and ``v``.

    When no gradient is needed and the queries of one KV group are few
    (``Tq * Hq / Hk <= decode.DECODE_MAX_ROWS``, i.e. generation), the split-KV decode kernels of
    ``decode.py`` run instead of the training kernels.

    Under ``torch.autocast`` (float16/bfloat16, for the inputs' device type) q, k and v are first
    cast to the autocast dtype, as eager SDPA and matmul cast them, so that mixed inputs (float32
    q, k after RoPE with float32 tables, a half-precision v) work and the output has the dtype
    eager attention gives; outside autocast they must share one dtype (TypeError otherwise).
    """
    q, k, v = autocast_inputs(q, k, v)
    sm_scale = _validate(q, k, v, causal, sm_scale)
    if not use_triton("flash_attention", q.device):
        return reference.attention(q, k, v, causal, sm_scale)
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
        # Nothing to launch; the eager op returns the (differentiable) empty result.
        return reference.attention(q, k, v, causal, sm_scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if decode.use_decode(q.shape[2], q.shape[1] // k.shape[1], needs_grad):
        return decode.attention_decode(q, k, v, causal, sm_scale)
    return FlashAttentionFunction.apply(q, k, v, causal, sm_scale)


# decode.py reuses the softmax helpers above, so it is imported once they exist.
from . import decode  # noqa: E402
