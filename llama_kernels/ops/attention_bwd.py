"""Flash attention backward: dQ, dK, dV from q, k, v, dO and the forward's row stats.

Math in ``attention.py``'s docstring.  Two schedules:

* **Fused** (half precision, ``torch.are_deterministic_algorithms_enabled()`` False, the default):
  ``attention_bwd_fused_kernel``, one program per (key tile, batch, KV head[, head split]), walks
  the query tiles that see its keys and does the 5 matmuls of a tile pair once: ``S = q k^T``,
  ``dP = dO v^T``, ``dV += P^T dO``, ``dK += dS^T q`` and ``dQ += dS k``; the dQ tile is added
  into a float32 accumulator with atomics, which the reduce kernel scales and rounds once.
  Atomics make the float32 sum order, hence dQ's last bits, vary from run to run (as in PyTorch's
  own flash backward).
* **Deterministic** (float32 inputs, or deterministic algorithms on): ``attention_bwd_dq_kernel``
  (one program per query tile, like the forward) and ``attention_bwd_dkdv_kernel``: 7 matmuls
  per tile pair (dQ recomputes S and dP) but no atomics, bitwise reproducible.

Sliding window (``WINDOW``, causal): the dQ kernel visits the key tiles of the forward's range
(``window_key_bounds``); a dK/dV program for the key tile ``[n0, n0 + BLOCK_N)`` visits only the
query tiles below ``n0 + BLOCK_N - 1 - (Tk - Tq) + window`` (the last query whose window reaches
the tile), and masks those that straddle the window's edge (from ``n0 - BLOCK_M + 1 - (Tk - Tq) +
window`` on) as well as the diagonal ones.  Softcap (``SOFTCAP``): ``S`` is recomputed capped,
``u = cap tanh(s / cap)``, and ``dS`` is multiplied by ``du/ds = 1 - tanh^2`` before it meets
``K`` or ``Q``.

Half precision first runs ``attention_bwd_preprocess_kernel`` (``Delta = rowsum(dO * O)``).
float32 sums ``Delta = rowsum(P * dP)`` in a first pass of the dQ kernel instead, over the very
``P`` and ``dP`` tiles the gradients use, so ``dP - Delta`` cancels exactly where a row's softmax
is one-hot (large logits), as in eager autograd; ``rowsum(dO * O)`` differs from it by roundings
that large logits magnify.  That pass costs two matmuls per tile: only float32 pays for it.

The dK/dV programs keep their key tile's ``k, v`` and float32 ``dK, dV`` on chip and loop over the
query heads of the GQA group (the group sum happens in the program: no atomics) and, in one loop,
over the query tiles that see the key tile; only tiles that straddle the causal diagonal or the
ragged end of the keys mask their exponents (a runtime branch).  Padding rows are masked in the
exponent, never left to produce inf/NaN that is merely not stored.  Causal key tile 0 is seen by
every query: key tiles run in ascending order (the longest programs first), heads fastest.

When there would be fewer than ``MIN_PROGRAMS_PER_SM`` programs per multiprocessor (short
sequences, few KV heads), the query heads of each group are split over several programs
(``head_splits``); each writes float32 partial dK/dV for its heads, and the reduce kernel sums the
splits in a fixed order, scales and rounds them: still deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_launch import autotuned, bucket, grid_tiles, launch
from .attention_tiles import (
    LOG2E,
    capped_scores,
    causal_key_bounds,
    common_consts,
    dot_operand,
    key_tile_scores,
    load_tile,
    query_tile_program,
    score_dot,
    sequence_rows,
    softcap_arg,
    softmax_log_prob,
    store_tile,
    varlen_tile,
    window_key_bounds,
)
from .common import INTERPRET, compilable, count_launch
from .device import num_sms

# Split a KV group's query heads over programs while the dK/dV grid has fewer programs than this
# many per multiprocessor (tests patch it).  Judged with a nominal key tile of SPLIT_KEY_TILE.
MIN_PROGRAMS_PER_SM = 2
SPLIT_KEY_TILE = 128


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    o_sb, o_sh, o_st, o_sd,
    do_sb, do_sh, do_st, do_sd,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * o_sb + h * o_sh + offs_m[:, None] * o_st + offs_d[None, :] * o_sd,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * do_sb + h * do_sh + offs_m[:, None] * do_st + offs_d[None, :] * do_sd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


# ------------------------------------------------------------------------------------------------
# dK/dV (and, fused, dQ): one program per (key tile, batch, KV head, head split)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile_program(
    Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd,
    dk_sb, dk_sh, dk_st, dk_sd,
    dv_sb, dv_sh, dv_st, dv_sd,
    num_kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale, stats_plane,
    window, softcap,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    FUSED_DQ: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (B * Hk * splits, key tiles).  DK/DV have Hk * splits "heads": head kvh * splits + split
    # (float32 partials when splits > 1, the gradients themselves when splits == 1).  Packed
    # sequences (VARLEN, B = 1): axis 1 enumerates the key tiles of every sequence; q0, k0 are
    # the sequence's first rows and seq_q, seq_k become its lengths.
    pid = tl.program_id(0)
    split = pid % splits
    bkv = pid // splits
    b = (bkv // num_kv_heads).to(tl.int64)
    kvh = bkv % num_kv_heads
    total_q = seq_q
    if VARLEN:
        seq, start_n = varlen_tile(CU_K, num_seqs, tl.program_id(1), BLOCK_N)
        q0, seq_q = sequence_rows(CU_Q, seq, num_seqs, seq_q)
        k0, seq_k = sequence_rows(CU_K, seq, num_seqs, seq_k)
        q0, k0 = q0.to(tl.int64), k0.to(tl.int64)
    else:
        start_n = tl.program_id(1) * BLOCK_N
        q0 = 0
        k0 = 0
    num_heads = num_kv_heads * group
    heads_per_split = group // splits

    keys = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys_in = keys < seq_k
    d_in = offs_d < HEAD_DIM
    kvh64 = kvh.to(tl.int64)
    k = load_tile(K + b * k_sb + kvh64 * k_sh + k0 * k_st + keys[:, None] * k_st
                  + offs_d[None, :] * k_sd, keys_in, d_in, True, PAD_D, DOT_IN_FP32)
    v = load_tile(V + b * v_sb + kvh64 * v_sh + k0 * v_st + keys[:, None] * v_st
                  + offs_d[None, :] * v_sd, keys_in, d_in, True, PAD_D, DOT_IN_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    # Query tiles from `lo` see some key of this tile; those below `diag_end` straddle the causal
    # diagonal.  Non-causal, a ragged key tile masks its padding keys against every query.
    # Padding queries (past Tq) load m = +inf, hence P = 0, without a mask.
    if CAUSAL:
        offset = seq_k - seq_q
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        diag_end = tl.where(start_n + BLOCK_N <= seq_k, 0, seq_q)
    hi = seq_q
    window_start = 0
    if WINDOW:
        # Query i sees key j only if i < j - offset + window: past the tile's last key's last
        # query nothing sees this tile; from window_start on a query tile's last row may have
        # some key of this tile left of its window (masked).
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset + window, 0), seq_q)
        window_start = start_n - BLOCK_M + 1 - offset + window
    q_offs = offs_m[:, None] * q_st + offs_d[None, :] * q_sd
    do_offs = offs_m[:, None] * do_st + offs_d[None, :] * do_sd

    for g in range(split * heads_per_split, (split + 1) * heads_per_split):
        h64 = (kvh * group + g).to(tl.int64)
        row_base = (b * num_heads + h64) * total_q + q0
        q_base = Q + b * q_sb + h64 * q_sh + q0 * q_st
        do_base = DO + b * do_sb + h64 * do_sh + q0 * do_st
        dq_base = DQ_ACC + row_base * BLOCK_D  # dense (B, Hq, Tq, BLOCK_D) float32
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            queries = start_m + offs_m
            rows_in = queries < seq_q
            tile = start_m.to(tl.int64)
            q = load_tile(q_base + tile * q_st + q_offs, rows_in, d_in, True, PAD_D, DOT_IN_FP32)
            do = load_tile(do_base + tile * do_st + do_offs, rows_in, d_in, True, PAD_D,
                           DOT_IN_FP32)
            m = tl.load(STATS + row_base + queries, mask=rows_in, other=float("inf"))
            log2_l = tl.load(STATS + stats_plane + row_base + queries, mask=rows_in, other=0.0)
            delta = tl.load(DELTA + row_base + queries, mask=rows_in, other=0.0)
            # Transposed tiles: rows are keys, columns queries; the row stats broadcast along rows.
            s_t = score_dot(k, q, PRECISION)
            s_t, tanh_t = capped_scores(s_t, softcap, SOFTCAP)
            x_t = softmax_log_prob(s_t, m[None, :], log2_l[None, :], qk_scale, RAW_MAX)
            needs_mask = start_m < diag_end
            if WINDOW:
                needs_mask = needs_mask | (start_m >= window_start)
            if needs_mask:
                # Mask the exponent, not P: a hidden score may exceed m and overflow 2^x.  Causal,
                # the diagonal also hides the padding keys of a ragged key tile.
                if CAUSAL:
                    visible = keys[:, None] <= queries[None, :] + (seq_k - seq_q)
                    if WINDOW:
                        visible = visible & (keys[:, None] > queries[None, :] + (seq_k - seq_q - window))
                else:
                    visible = keys_in[:, None]
                x_t = tl.where(visible, x_t, float("-inf"))
            p_t = tl.exp2(x_t)
            p_op = dot_operand(p_t, DTYPE, DOT_IN_FP32)
            if SOFTCAP:
                # Chain through the cap (du/ds = 1 - tanh^2), folded into P now so that one
                # float32 tile, not P and tanh, stays live across the dP matmul.
                p_t = p_t * (1.0 - tanh_t * tanh_t)
            dv = tl.dot(p_op, do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = dot_operand(p_t * (dp_t - delta[None, :]), DTYPE, DOT_IN_FP32)
            dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
            if FUSED_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
                dq_ptrs = dq_base + queries[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=rows_in[:, None], sem="relaxed")

    out_h = kvh64 * splits + split
    dk_ptrs = (DK + b * dk_sb + out_h * dk_sh + k0 * dk_st + keys[:, None] * dk_st
               + offs_d[None, :] * dk_sd)
    dv_ptrs = (DV + b * dv_sb + out_h * dv_sh + k0 * dv_st + keys[:, None] * dv_st
               + offs_d[None, :] * dv_sd)
    store_tile(dk_ptrs, dk * dk_scale, keys_in, d_in, PAD_D)
    store_tile(dv_ptrs, dv, keys_in, d_in, PAD_D)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K,
    q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd, dk_sb, dk_sh, dk_st, dk_sd, dv_sb, dv_sh, dv_st, dv_sd,
    num_kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale, stats_plane,
    window, softcap,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _key_tile_program(
        Q, K, V, DO, STATS, DELTA, DK, DV, DK, CU_Q, CU_K,  # DK: no dQ accumulator
        q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
        do_sb, do_sh, do_st, do_sd, dk_sb, dk_sh, dk_st, dk_sd, dv_sb, dv_sh, dv_st, dv_sd,
        num_kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale, stats_plane,
        window, softcap,
        CAUSAL, HEAD_DIM, BLOCK_D, PAD_D, DOT_IN_FP32, PRECISION, RAW_MAX, WINDOW, SOFTCAP, False,
        VARLEN, BLOCK_M, BLOCK_N,
    )


@triton.jit
def attention_bwd_fused_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd, dk_sb, dk_sh, dk_st, dk_sd, dv_sb, dv_sh, dv_st, dv_sd,
    num_kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale, stats_plane,
    window, softcap,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _key_tile_program(
        Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
        q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, v_sb, v_sh, v_st, v_sd,
        do_sb, do_sh, do_st, do_sd, dk_sb, dk_sh, dk_st, dk_sd, dv_sb, dv_sh, dv_st, dv_sd,
        num_kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale, stats_plane,
        window, softcap,
        CAUSAL, HEAD_DIM, BLOCK_D, PAD_D, DOT_IN_FP32, PRECISION, RAW_MAX, WINDOW, SOFTCAP, True,
        VARLEN, BLOCK_M, BLOCK_N,
    )


@triton.jit
def attention_bwd_reduce_kernel(
    PARTS, OUT, num_heads, splits, seq, scale,
    o_sb, o_sh, o_st, o_sd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # OUT[b, h, t] = scale * sum over s (in order) of PARTS[b, h * splits + s, t], PARTS a dense
    # float32 (B, H * splits, T, BLOCK_D) whose columns past HEAD_DIM are never written: one
    # rounding to OUT's dtype, deterministic.
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = rows < seq
    d_in = offs_d < HEAD_DIM
    part_offs = rows[:, None].to(tl.int64) * BLOCK_D + offs_d[None, :]
    total = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for s in range(0, splits):
        base = PARTS + ((b * num_heads + h) * splits + s) * seq * BLOCK_D
        total += tl.load(base + part_offs, mask=rows_in[:, None] & d_in[None, :], other=0.0)
    out_ptrs = OUT + b * o_sb + h * o_sh + rows[:, None] * o_st + offs_d[None, :] * o_sd
    store_tile(out_ptrs, total * scale, rows_in, d_in, True)


# ------------------------------------------------------------------------------------------------
# dQ (deterministic schedule): one program per query tile, like the forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dq_key_range(dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, hi,
                  offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap,
                  DELTA_PASS: tl.constexpr,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PAD_D: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, RAW_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    # Over the key tiles [lo, hi): accumulate dQ, or (DELTA_PASS) Delta = rowsum(P * dP).
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = key_tile_scores(
            q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in, seq_q,
            seq_k, window, MASK, CAUSAL, PAD_D, DOT_IN_FP32, PRECISION, WINDOW,
        )
        s, tanh_s = capped_scores(s, softcap, SOFTCAP)
        x = softmax_log_prob(s, m[:, None], log2_l[:, None], qk_scale, RAW_MAX)
        if MASK:
            x = tl.where(visible, x, float("-inf"))
        p = tl.exp2(x)
        if SOFTCAP and not DELTA_PASS:
            # Chain through the cap (du/ds = 1 - tanh^2), folded into P before the dP matmul
            # (one float32 tile live across it, as without the cap).
            p = p * (1.0 - tanh_s * tanh_s)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DELTA_PASS:
            delta += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(dot_operand(ds, DTYPE, DOT_IN_FP32), k, dq, input_precision=PRECISION)
    return dq, delta


@triton.jit
def _dq_key_ranges(dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo,
                   full_lo, full_hi, hi, offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window,
                   softcap, DELTA_PASS: tl.constexpr, CAUSAL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, DTYPE: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
                   BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    # The three key ranges of a query tile (see attention_bwd_dq_kernel), masked where needed.
    if WINDOW:
        dq, delta = _dq_key_range(
            dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, full_lo,
            offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap, DELTA_PASS,
            True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
            WINDOW, SOFTCAP,
        )
    dq, delta = _dq_key_range(
        dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, full_lo, full_hi,
        offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap, DELTA_PASS,
        False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        WINDOW, SOFTCAP,
    )
    dq, delta = _dq_key_range(
        dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, full_hi, hi,
        offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap, DELTA_PASS,
        True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        WINDOW, SOFTCAP,
    )
    return dq, delta


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    do_sb, do_sh, do_st, do_sd,
    dq_sb, dq_sh, dq_st, dq_sd,
    num_heads, group, seq_q, seq_k, num_seqs, qk_scale, sm_scale, stats_plane, window, softcap,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    EXACT_DELTA: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    total_q = seq_q  # seq_q, seq_k become this program's sequence lengths (packed: VARLEN)
    start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k = query_tile_program(
        num_heads, group, seq_q, seq_k, CU_Q, CU_K, num_seqs, BLOCK_M, VARLEN)
    b, h, kvh = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    q0, k0 = tl.cast(q0, tl.int64), tl.cast(k0, tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = offs_m < seq_q
    d_in = offs_d < HEAD_DIM
    q = load_tile(Q + b * q_sb + h * q_sh + q0 * q_st + offs_m[:, None] * q_st
                  + offs_d[None, :] * q_sd, rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    do = load_tile(DO + b * do_sb + h * do_sh + q0 * do_st + offs_m[:, None] * do_st
                   + offs_d[None, :] * do_sd, rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    row_base = bh.to(tl.int64) * total_q + q0
    m = tl.load(STATS + row_base + offs_m, mask=rows_in, other=float("inf"))
    log2_l = tl.load(STATS + stats_plane + row_base + offs_m, mask=rows_in, other=0.0)
    k_base = K + b * k_sb + kvh * k_sh + k0 * k_st
    v_base = V + b * v_sb + kvh * v_sh + k0 * v_st
    k_offs = offs_n[:, None] * k_st + offs_d[None, :] * k_sd
    v_offs = offs_n[:, None] * v_st + offs_d[None, :] * v_sd
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    full_hi, hi = causal_key_bounds(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    # Key ranges as in the forward: [lo, full_lo) across the window's edge (masked, WINDOW only),
    # [full_lo, full_hi) unmasked, [full_hi, hi) across the diagonal or the ragged end (masked).
    lo = 0
    full_lo = 0
    if WINDOW:
        lo, full_lo = window_key_bounds(start_m, seq_q, seq_k, window, BLOCK_M, BLOCK_N)
        full_lo = tl.maximum(tl.minimum(full_lo, full_hi), lo)
        full_hi = tl.maximum(full_hi, full_lo)
    if EXACT_DELTA:
        # Delta = rowsum(P * dP) from the very P and dP the gradients use (module docstring).
        delta = tl.zeros([BLOCK_M], tl.float32)
        dq, delta = _dq_key_ranges(
            dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, full_lo,
            full_hi, hi, offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap, True,
            CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N, WINDOW,
            SOFTCAP,
        )
        tl.store(DELTA + row_base + offs_m, delta, mask=rows_in)  # for the dK/dV kernel
    else:
        delta = tl.load(DELTA + row_base + offs_m, mask=rows_in, other=0.0)
    dq, delta = _dq_key_ranges(
        dq, delta, q, do, m, log2_l, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, full_lo,
        full_hi, hi, offs_n, offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap, False,
        CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N, WINDOW, SOFTCAP,
    )

    dq_ptrs = (DQ + b * dq_sb + h * dq_sh + q0 * dq_st + offs_m[:, None] * dq_st
               + offs_d[None, :] * dq_sd)
    store_tile(dq_ptrs, dq * sm_scale, rows_in, d_in, PAD_D)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


_TUNED = {
    "dkdv": autotuned(attention_bwd_dkdv_kernel, "dkdv", "Q"),
    "bwd_fused": autotuned(attention_bwd_fused_kernel, "bwd_fused", "Q", reset_to_zero=["DQ_ACC"]),
    "dq": autotuned(attention_bwd_dq_kernel, "dq", "Q"),
}


def head_splits(batch: int, kv_heads: int, seq_k: int, group: int, device) -> int:
    """Programs per KV head of the dK/dV grid: the largest divisor of ``group`` that brings the
    grid to ``MIN_PROGRAMS_PER_SM`` programs per multiprocessor, or 1 when it has that many."""
    programs = batch * kv_heads * triton.cdiv(seq_k, SPLIT_KEY_TILE)
    wanted = max(1, triton.cdiv(MIN_PROGRAMS_PER_SM * num_sms(device), programs))
    return max(d for d in range(1, min(wanted, group) + 1) if group % d == 0)


def fused_backward(dtype) -> bool:
    """Whether the backward takes the fused (atomic dQ) schedule: half precision, and
    ``torch.are_deterministic_algorithms_enabled()`` False."""
    return dtype != torch.float32 and not torch.are_deterministic_algorithms_enabled()


def _reduce(parts, out, splits, scale, head_dim):
    # out = scale * (sum of parts over the splits), one rounding; see attention_bwd_reduce_kernel.
    batch, heads, seq, _ = out.shape
    block_d = parts.shape[-1]
    block_t = 16 if INTERPRET else max(8, 8192 // block_d)
    attention_bwd_reduce_kernel[(batch * heads, triton.cdiv(seq, block_t))](
        parts, out, heads, splits, seq, scale, *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=8,
    )  # 8 warps: 32 float32 sums a thread (4 warps spill 8 bytes of 64 on sm_80 with Triton 3.9)
    count_launch(attention_bwd_reduce_kernel)


def _bwd_fake(do, q, k, v, o, stats, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0, window=0, softcap=0.0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@compilable("flash_attention_bwd", _bwd_fake)
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    stats: torch.Tensor, causal: bool, sm_scale: float,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, window: int = 0, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (fused or deterministic schedule, see the module docstring):
    returns ``(dq, dk, dv)`` in the dtypes and layouts of ``q, k, v``.  Packed sequences
    (``cu_seqlens_q``...), ``window`` and ``softcap`` as in ``attention_fwd`` (the forward's
    values); rows outside every sequence get zero gradients."""
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    # The kernels write the rows of packed sequences only: the others must read zero.
    new = torch.zeros_like if varlen else torch.empty_like
    dq, dk, dv = new(q), new(k), new(v)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    consts = {**common_consts(q, causal, window, softcap), "VARLEN": varlen}
    cap = softcap_arg(softcap, sm_scale)
    block_d = consts["BLOCK_D"]
    group = heads // kv_heads
    qk_scale = sm_scale * LOG2E
    exact_delta = q.dtype == torch.float32
    fused = fused_backward(q.dtype)
    if varlen:
        tuning, cu_args, num_seqs = (max_seqlen_q, max_seqlen_k), (cu_seqlens_q, cu_seqlens_k), cu_seqlens_q.shape[0] - 1
    else:
        tuning, cu_args, num_seqs = (seq_q, seq_k), (q, q), 0
    buckets = (bucket(tuning[0]), bucket(tuning[1]))

    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if not exact_delta:
        # Two float32 tiles of block_m x BLOCK_D: about 4k elements each, 16 a thread over 8 warps
        # (over 4, sm_100's ptxas in Triton 3.9 gives it 48 registers and spills 32 bytes).
        # Every row (packed or not) is one row here.
        block_m = 16 if INTERPRET else max(16, min(64, 4096 // block_d))
        attention_bwd_preprocess_kernel[(batch * heads, triton.cdiv(seq_q, block_m))](
            o, do, delta, *o.stride(), *do.stride(), heads, seq_q,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=8,
        )
        count_launch(attention_bwd_preprocess_kernel)

    if not fused:
        dq_args = (
            q, k, v, do, stats, delta, dq, *cu_args,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            heads, group, seq_q, seq_k, num_seqs, qk_scale, sm_scale, stats[0].numel(), window, cap,
            *buckets,
        )
        launch(attention_bwd_dq_kernel, _TUNED["dq"], "dq",
               lambda meta: (batch * heads, grid_tiles(seq_q, meta["BLOCK_M"], cu_seqlens_q, max_seqlen_q)),
               dq_args, {**consts, "EXACT_DELTA": exact_delta}, *tuning, q.element_size(), q.device)

    splits = head_splits(batch, kv_heads, seq_k, group, q.device)
    if splits == 1:
        dk_out, dv_out, dk_scale = dk, dv, sm_scale
    else:  # float32 partials (B, Hk * splits, Tk, BLOCK_D), summed by the reduce kernel
        alloc = torch.zeros if varlen else torch.empty
        dk_out, dv_out = (alloc((batch, kv_heads * splits, seq_k, block_d), dtype=torch.float32,
                                device=q.device) for _ in range(2))
        dk_scale = 1.0
    args = [q, k, v, do, stats, delta, dk_out, dv_out]
    if fused:
        dq_acc = torch.zeros((batch, heads, seq_q, block_d), dtype=torch.float32, device=q.device)
        args.append(dq_acc)
    args += [*cu_args, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_out.stride(),
             *dv_out.stride(), kv_heads, group, splits, seq_q, seq_k, num_seqs, qk_scale, dk_scale,
             stats[0].numel(), window, cap, *buckets]
    kind = "bwd_fused" if fused else "dkdv"
    kernel = attention_bwd_fused_kernel if fused else attention_bwd_dkdv_kernel
    launch(kernel, _TUNED[kind], kind,
           lambda meta: (batch * kv_heads * splits,
                         grid_tiles(seq_k, meta["BLOCK_N"], cu_seqlens_k, max_seqlen_k)),
           tuple(args), consts, *tuning, q.element_size(), q.device)
    if splits > 1:
        _reduce(dk_out, dk, splits, sm_scale, head_dim)
        _reduce(dv_out, dv, splits, 1.0, head_dim)
    if fused:
        _reduce(dq_acc, dq, 1, sm_scale, head_dim)
    return dq, dk, dv
