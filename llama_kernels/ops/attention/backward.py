"""Flash attention backward: dQ, dK, dV from q, k, v, dO and the forward's row stats.

Math in the package's docstring (``__init__.py``).  Two schedules:

* **Fused** (half precision, ``torch.are_deterministic_algorithms_enabled()`` False, the default;
  the ``deterministic`` option overrides it):
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
(``tiles.query_tile_key_ranges``); a dK/dV program for the key tile ``[n0, n0 + BLOCK_N)`` visits only the
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

When there would be fewer than ``min_programs_per_sm`` (a ``kernel_options`` option, 2 by
default) programs per multiprocessor (short sequences, few KV heads), the query heads of each
group are split over several programs (``head_splits``); each writes float32 partial dK/dV for
its heads, and the reduce kernel sums the splits in a fixed order, scales and rounds them: still
deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, compilable, count_launch
from ..device import num_sms
from ..options import current as current_options
from .configs import autotuned, launch
from .problem import AttentionProblem
from .tiles import (
    capped_scores,
    dot_operand,
    head_rows,
    key_tile_scores,
    key_value_tiles,
    load_tile,
    pointer_query_tile,
    query_tile_key_ranges,
    score_dot,
    sequence_rows,
    softmax_log_prob,
    store_tile,
    tile_offsets,
    tile_ptrs,
    varlen_tile,
    visible_pairs,
)

# The dK/dV grid's programs are judged with a nominal key tile of this many keys when deciding
# whether to split a KV group's query heads (``head_splits``).
SPLIT_KEY_TILE = 128


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DELTA, o_strides, do_strides, num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(tile_ptrs(head_rows(O, o_strides, b, h, 0), o_strides, offs_m, offs_d),
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(tile_ptrs(head_rows(DO, do_strides, b, h, 0), do_strides, offs_m, offs_d),
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


# ------------------------------------------------------------------------------------------------
# dK/dV (and, fused, dQ): one program per (key tile, batch, KV head, head split)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile_program(
    Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    dims, scoring, dk_scale, stats_plane,
    SPEC: tl.constexpr, FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (B * Hk * splits, key tiles), dims = (Hk, group, splits, Tq, Tk, num_seqs).  DK/DV have
    # Hk * splits "heads": head kvh * splits + split (float32 partials when splits > 1, the
    # gradients themselves when splits == 1).  Packed sequences (VARLEN, B = 1): axis 1
    # enumerates the key tiles of every sequence; q0, k0 are the sequence's first rows and
    # seq_q, seq_k become its lengths.
    num_kv_heads, group, splits, seq_q, seq_k, num_seqs = dims
    qk_scale, window, softcap = scoring
    pid = tl.program_id(0)
    split = pid % splits
    bkv = pid // splits
    b = (bkv // num_kv_heads).to(tl.int64)
    kvh = bkv % num_kv_heads
    total_q = seq_q
    if SPEC.VARLEN:
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
    offs_d = tl.arange(0, SPEC.BLOCK_D)
    keys_in = keys < seq_k
    d_in = offs_d < SPEC.HEAD_DIM
    kvh64 = kvh.to(tl.int64)
    k = load_tile(tile_ptrs(head_rows(K, k_strides, b, kvh64, k0), k_strides, keys, offs_d), keys_in,
                  d_in, True, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    v = load_tile(tile_ptrs(head_rows(V, v_strides, b, kvh64, k0), v_strides, keys, offs_d), keys_in,
                  d_in, True, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    dk = tl.zeros([BLOCK_N, SPEC.BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, SPEC.BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    # Query tiles from `lo` see some key of this tile; those below `diag_end` straddle the causal
    # diagonal.  Non-causal, a ragged key tile masks its padding keys against every query.
    # Padding queries (past Tq) load m = +inf, hence P = 0, without a mask.
    offset = seq_k - seq_q
    if SPEC.CAUSAL:
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        diag_end = tl.where(start_n + BLOCK_N <= seq_k, 0, seq_q)
    hi = seq_q
    window_start = 0
    if SPEC.WINDOW:
        # Query i sees key j only if i < j - offset + window: past the tile's last key's last
        # query nothing sees this tile; from window_start on a query tile's last row may have
        # some key of this tile left of its window (masked).
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset + window, 0), seq_q)
        window_start = start_n - BLOCK_M + 1 - offset + window
    q_offs = tile_offsets(q_strides, offs_m, offs_d)
    do_offs = tile_offsets(do_strides, offs_m, offs_d)

    for g in range(split * heads_per_split, (split + 1) * heads_per_split):
        h64 = (kvh * group + g).to(tl.int64)
        row_base = (b * num_heads + h64) * total_q + q0
        q_base = head_rows(Q, q_strides, b, h64, q0)
        do_base = head_rows(DO, do_strides, b, h64, q0)
        dq_base = DQ_ACC + row_base * SPEC.BLOCK_D  # dense (B, Hq, Tq, BLOCK_D) float32
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            queries = start_m + offs_m
            rows_in = queries < seq_q
            tile = start_m.to(tl.int64)
            q = load_tile(q_base + tile * q_strides[2] + q_offs, rows_in, d_in, True, SPEC.PAD_D,
                          SPEC.DOT_IN_FP32)
            do = load_tile(do_base + tile * do_strides[2] + do_offs, rows_in, d_in, True, SPEC.PAD_D,
                           SPEC.DOT_IN_FP32)
            m = tl.load(STATS + row_base + queries, mask=rows_in, other=float("inf"))
            log2_l = tl.load(STATS + stats_plane + row_base + queries, mask=rows_in, other=0.0)
            delta = tl.load(DELTA + row_base + queries, mask=rows_in, other=0.0)
            # Transposed tiles: rows are keys, columns queries; the row stats broadcast along rows.
            s_t = score_dot(k, q, SPEC.PRECISION)
            s_t, tanh_t = capped_scores(s_t, softcap, SPEC.SOFTCAP)
            x_t = softmax_log_prob(s_t, m[None, :], log2_l[None, :], qk_scale, SPEC.RAW_MAX)
            needs_mask = start_m < diag_end
            if SPEC.WINDOW:
                needs_mask = needs_mask | (start_m >= window_start)
            if needs_mask:
                # Mask the exponent, not P: a hidden score may exceed m and overflow 2^x.  Causal,
                # the diagonal also hides the padding keys of a ragged key tile.
                visible = visible_pairs(keys[:, None], queries[None, :], offset, seq_k, window, False,
                                        SPEC.CAUSAL, SPEC.WINDOW)
                x_t = tl.where(visible, x_t, float("-inf"))
            p_t = tl.exp2(x_t)
            p_op = dot_operand(p_t, DTYPE, SPEC.DOT_IN_FP32)
            if SPEC.SOFTCAP:
                # Chain through the cap (du/ds = 1 - tanh^2), folded into P now so that one
                # float32 tile, not P and tanh, stays live across the dP matmul.
                p_t = p_t * (1.0 - tanh_t * tanh_t)
            dv = tl.dot(p_op, do, dv, input_precision=SPEC.PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=SPEC.PRECISION)
            ds_t = dot_operand(p_t * (dp_t - delta[None, :]), DTYPE, SPEC.DOT_IN_FP32)
            dk = tl.dot(ds_t, q, dk, input_precision=SPEC.PRECISION)
            if FUSED_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=SPEC.PRECISION)
                dq_ptrs = dq_base + queries[:, None].to(tl.int64) * SPEC.BLOCK_D + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=rows_in[:, None], sem="relaxed")

    out_h = kvh64 * splits + split
    dk_ptrs = tile_ptrs(head_rows(DK, dk_strides, b, out_h, k0), dk_strides, keys, offs_d)
    dv_ptrs = tile_ptrs(head_rows(DV, dv_strides, b, out_h, k0), dv_strides, keys, offs_d)
    store_tile(dk_ptrs, dk * dk_scale, keys_in, d_in, SPEC.PAD_D)
    store_tile(dv_ptrs, dv, keys_in, d_in, SPEC.PAD_D)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    dims, scoring, dk_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _key_tile_program(Q, K, V, DO, STATS, DELTA, DK, DV, DK, CU_Q, CU_K,  # DK: no dQ accumulator
                      q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                      dims, scoring, dk_scale, stats_plane, SPEC, False, BLOCK_M, BLOCK_N)


@triton.jit
def attention_bwd_fused_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    dims, scoring, dk_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _key_tile_program(Q, K, V, DO, STATS, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
                      q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
                      dims, scoring, dk_scale, stats_plane, SPEC, True, BLOCK_M, BLOCK_N)


@triton.jit
def attention_bwd_reduce_kernel(
    PARTS, OUT, num_heads, splits, seq, scale, out_strides,
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
    out_ptrs = tile_ptrs(head_rows(OUT, out_strides, b, h, 0), out_strides, rows, offs_d)
    store_tile(out_ptrs, total * scale, rows_in, d_in, True)


# ------------------------------------------------------------------------------------------------
# dQ (deterministic schedule): one program per query tile, like the forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dq_key_range(dq, delta, rows, kv, lo, hi, offs_m, seq_q, seq_k, scoring,
                  DELTA_PASS: tl.constexpr, MASK: tl.constexpr, SPEC: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    # Over the key tiles [lo, hi): accumulate dQ, or (DELTA_PASS) Delta = rowsum(P * dP).
    # rows = (q, dO, m, log2 l) of the query tile.
    q, do, m, log2_l = rows
    qk_scale, window, softcap = scoring
    DTYPE: tl.constexpr = kv[0].dtype.element_ty
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = key_tile_scores(q, kv, start_n, offs_m, seq_q, seq_k, window, MASK, SPEC,
                                           BLOCK_N)
        s, tanh_s = capped_scores(s, softcap, SPEC.SOFTCAP)
        x = softmax_log_prob(s, m[:, None], log2_l[:, None], qk_scale, SPEC.RAW_MAX)
        if MASK:
            x = tl.where(visible, x, float("-inf"))
        p = tl.exp2(x)
        if SPEC.SOFTCAP and not DELTA_PASS:
            # Chain through the cap (du/ds = 1 - tanh^2), folded into P before the dP matmul
            # (one float32 tile live across it, as without the cap).
            p = p * (1.0 - tanh_s * tanh_s)
        dp = tl.dot(do, tl.trans(v), input_precision=SPEC.PRECISION)
        if DELTA_PASS:
            delta += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(dot_operand(ds, DTYPE, SPEC.DOT_IN_FP32), k, dq, input_precision=SPEC.PRECISION)
    return dq, delta


@triton.jit
def _dq_key_ranges(dq, delta, rows, kv, ranges, offs_m, seq_q, seq_k, scoring,
                   DELTA_PASS: tl.constexpr, SPEC: tl.constexpr, BLOCK_N: tl.constexpr):
    # The three key ranges of a query tile (tiles.query_tile_key_ranges), masked where needed.
    lo, full_lo, full_hi, hi = ranges
    if SPEC.WINDOW:
        dq, delta = _dq_key_range(dq, delta, rows, kv, lo, full_lo, offs_m, seq_q, seq_k, scoring,
                                  DELTA_PASS, True, SPEC, BLOCK_N)
    dq, delta = _dq_key_range(dq, delta, rows, kv, full_lo, full_hi, offs_m, seq_q, seq_k, scoring,
                              DELTA_PASS, False, SPEC, BLOCK_N)
    dq, delta = _dq_key_range(dq, delta, rows, kv, full_hi, hi, offs_m, seq_q, seq_k, scoring,
                              DELTA_PASS, True, SPEC, BLOCK_N)
    return dq, delta


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    dims, scoring, sm_scale, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    SPEC: tl.constexpr, EXACT_DELTA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dims = (Hq, group, Tq, Tk, num_seqs); seq_q, seq_k become this program's sequence lengths
    # (packed: VARLEN).
    total_q = dims[2]
    (start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k,
     offs_m, offs_d, rows_in, d_in) = pointer_query_tile(dims, CU_Q, CU_K, SPEC, BLOCK_M)
    q = load_tile(tile_ptrs(head_rows(Q, q_strides, b, h, q0), q_strides, offs_m, offs_d), rows_in,
                  d_in, True, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    do = load_tile(tile_ptrs(head_rows(DO, do_strides, b, h, q0), do_strides, offs_m, offs_d),
                   rows_in, d_in, True, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    row_base = bh.to(tl.int64) * total_q + q0
    m = tl.load(STATS + row_base + offs_m, mask=rows_in, other=float("inf"))
    log2_l = tl.load(STATS + stats_plane + row_base + offs_m, mask=rows_in, other=0.0)
    kv = key_value_tiles(K, V, k_strides, v_strides, b, kvh, k0, SPEC, BLOCK_N)
    dq = tl.zeros([BLOCK_M, SPEC.BLOCK_D], tl.float32)

    # Key ranges as in the forward: [lo, full_lo) across the window's edge (masked, WINDOW only),
    # [full_lo, full_hi) unmasked, [full_hi, hi) across the diagonal or the ragged end (masked).
    ranges = query_tile_key_ranges(start_m, seq_q, seq_k, scoring[1], SPEC.CAUSAL, SPEC.WINDOW,
                                   BLOCK_M, BLOCK_N)
    if EXACT_DELTA:
        # Delta = rowsum(P * dP) from the very P and dP the gradients use (module docstring).
        delta = tl.zeros([BLOCK_M], tl.float32)
        dq, delta = _dq_key_ranges(dq, delta, (q, do, m, log2_l), kv, ranges, offs_m, seq_q, seq_k,
                                   scoring, True, SPEC, BLOCK_N)
        tl.store(DELTA + row_base + offs_m, delta, mask=rows_in)  # for the dK/dV kernel
    else:
        delta = tl.load(DELTA + row_base + offs_m, mask=rows_in, other=0.0)
    dq, delta = _dq_key_ranges(dq, delta, (q, do, m, log2_l), kv, ranges, offs_m, seq_q, seq_k,
                               scoring, False, SPEC, BLOCK_N)

    dq_ptrs = tile_ptrs(head_rows(DQ, dq_strides, b, h, q0), dq_strides, offs_m, offs_d)
    store_tile(dq_ptrs, dq * sm_scale, rows_in, d_in, SPEC.PAD_D)


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
    grid to ``min_programs_per_sm`` (a ``kernel_options`` option) programs per multiprocessor, or
    1 when it has that many."""
    programs = batch * kv_heads * triton.cdiv(seq_k, SPLIT_KEY_TILE)
    wanted = max(1, triton.cdiv(current_options().min_programs_per_sm * num_sms(device), programs))
    return max(d for d in range(1, min(wanted, group) + 1) if group % d == 0)


def fused_backward(dtype) -> bool:
    """Whether the backward takes the fused (atomic dQ) schedule: half precision, and the
    ``deterministic`` option off (by default: ``torch.are_deterministic_algorithms_enabled()``
    False)."""
    return dtype != torch.float32 and not current_options().deterministic_backward()


def _reduce(parts, out, splits, scale, head_dim):
    # out = scale * (sum of parts over the splits), one rounding; see attention_bwd_reduce_kernel.
    batch, heads, seq, _ = out.shape
    block_d = parts.shape[-1]
    block_t = 16 if INTERPRET else max(8, 8192 // block_d)
    attention_bwd_reduce_kernel[(batch * heads, triton.cdiv(seq, block_t))](
        parts, out, heads, splits, seq, scale, out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=8,
    )  # 8 warps: 32 float32 sums a thread (4 warps spill 8 bytes of 64 on sm_80 with Triton 3.9)
    count_launch(attention_bwd_reduce_kernel)


def _bwd_fake(do, q, k, v, o, stats, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0, window=0, softcap=0.0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@compilable("flash_attention_bwd", _bwd_fake)
def flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    stats: torch.Tensor, causal: bool, sm_scale: float,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, window: int = 0, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (fused or deterministic schedule, see the module docstring):
    returns ``(dq, dk, dv)`` in the dtypes and layouts of ``q, k, v``.  Packed sequences
    (``cu_seqlens_q``...), ``window`` and ``softcap`` as in ``flash_attention_fwd`` (the
    forward's values); rows outside every sequence get zero gradients."""
    problem = AttentionProblem.build(q, k, causal, sm_scale, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, window, softcap)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = problem.kv_heads, problem.seq_k
    # The kernels write the rows of packed sequences only: the others must read zero.
    new = torch.zeros_like if problem.varlen else torch.empty_like
    dq, dk, dv = new(q), new(k), new(v)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    spec = problem.spec
    exact_delta = q.dtype == torch.float32
    fused = fused_backward(q.dtype)
    offsets = problem.offsets(q)

    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if not exact_delta:
        # Two float32 tiles of block_m x BLOCK_D: about 4k elements each, 16 a thread over 8 warps
        # (over 4, sm_100's ptxas in Triton 3.9 gives it 48 registers and spills 32 bytes).
        # Every row (packed or not) is one row here.
        block_m = 16 if INTERPRET else max(16, min(64, 4096 // spec.BLOCK_D))
        attention_bwd_preprocess_kernel[(batch * heads, triton.cdiv(seq_q, block_m))](
            o, do, delta, o.stride(), do.stride(), heads, seq_q,
            HEAD_DIM=head_dim, BLOCK_D=spec.BLOCK_D, BLOCK_M=block_m, num_warps=8,
        )
        count_launch(attention_bwd_preprocess_kernel)

    if not fused:
        dq_args = (q, k, v, do, stats, delta, dq, *offsets, q.stride(), k.stride(), v.stride(),
                   do.stride(), dq.stride(), problem.query_dims(), problem.scoring, sm_scale,
                   problem.stats_plane, *problem.buckets)
        launch(attention_bwd_dq_kernel, _TUNED["dq"], "dq", problem.query_grid, dq_args,
               {"SPEC": spec, "EXACT_DELTA": exact_delta}, problem)

    splits = head_splits(batch, kv_heads, seq_k, problem.group, q.device)
    if splits == 1:
        dk_out, dv_out, dk_scale = dk, dv, sm_scale
    else:  # float32 partials (B, Hk * splits, Tk, BLOCK_D), summed by the reduce kernel
        alloc = torch.zeros if problem.varlen else torch.empty
        dk_out, dv_out = (alloc((batch, kv_heads * splits, seq_k, spec.BLOCK_D), dtype=torch.float32,
                                device=q.device) for _ in range(2))
        dk_scale = 1.0
    args = [q, k, v, do, stats, delta, dk_out, dv_out]
    if fused:
        dq_acc = torch.zeros((batch, heads, seq_q, spec.BLOCK_D), dtype=torch.float32, device=q.device)
        args.append(dq_acc)
    args += [*offsets, q.stride(), k.stride(), v.stride(), do.stride(), dk_out.stride(),
             dv_out.stride(), problem.key_dims(splits), problem.scoring, dk_scale,
             problem.stats_plane, *problem.buckets]
    kind = "bwd_fused" if fused else "dkdv"
    kernel = attention_bwd_fused_kernel if fused else attention_bwd_dkdv_kernel
    launch(kernel, _TUNED[kind], kind, problem.key_grid(splits), tuple(args), {"SPEC": spec}, problem)
    if splits > 1:
        _reduce(dk_out, dk, splits, sm_scale, head_dim)
        _reduce(dv_out, dv, splits, 1.0, head_dim)
    if fused:
        _reduce(dq_acc, dq, 1, sm_scale, head_dim)
    return dq, dk, dv
