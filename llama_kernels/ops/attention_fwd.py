"""Flash attention forward: the portable kernel and the Hopper (TMA, warp-specialised) kernel.

Both run the online softmax of ``attention.py``'s docstring over the key tiles a query tile sees,
in base 2 with float32 statistics, and write ``o`` (one rounding) and the row stats ``m`` and
``log2(l)`` for the backward.  With ``SOFTCAP`` every raw score ``s`` becomes
``cap * tanh(s / cap)`` (``cap = softcap / sm_scale``) before the softmax; with ``WINDOW`` the key
range of a query tile starts at the first tile its window reaches (``window_key_bounds``): tiles
left of every row's window are never loaded, tiles straddling the window's edge are masked.  One program per (batch, query head, query tile); heads are the
fastest launch axis (``attention_tiles.query_tile_program``).

* ``attention_fwd_kernel`` (every GPU, the interpreter, float32, any strides): pointer loads
  that the compiler pipelines with cp.async.
* ``attention_fwd_tma_kernel`` (Hopper, float16/bfloat16, unit head-dim stride, 16-byte aligned
  strides): q, k and v arrive through TMA tensor descriptors, one 4-D descriptor per tensor
  ``(B, H, T, D)``, so the copy engine zero-fills the ragged ends of T and D (o leaves through
  ordinary stores);
  with ``WARP_SPECIALIZE`` the key loop is split by Triton into a producer warpgroup issuing the
  TMA loads and consumer warpgroups doing the matmuls and the softmax, so the softmax of one
  tile overlaps the loads (and, across consumers, the matmuls) of others.

``USE_TMA`` chooses: ``None`` (default) takes the TMA kernel wherever it applies on an sm_90 GPU;
``True``/``False`` force it on (where it applies; the interpreter runs it too) or off, for tests and
benchmarks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention_launch import autotuned, bucket, grid_tiles, launch
from .attention_tiles import (
    LOG2E,
    capped_scores,
    causal_key_bounds,
    common_consts,
    key_tile_scores,
    load_tile,
    online_softmax_step,
    query_tile_program,
    score_dot,
    softcap_arg,
    store_tile,
    visible_keys,
    window_key_bounds,
)
from .common import INTERPRET, compilable
from .device import device_limits

USE_TMA: Optional[bool] = None


@triton.jit
def _fwd_key_range(acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, hi, offs_n,
                   offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAD_D: tl.constexpr, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, RAW_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
                   WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    # Online softmax over the key tiles [lo, hi); MASK compiles the causal/window/ragged masks in.
    d_in = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = key_tile_scores(
            q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in, seq_q,
            seq_k, window, MASK, CAUSAL, PAD_D, DOT_IN_FP32, PRECISION, WINDOW,
        )
        s, _tanh = capped_scores(s, softcap, SOFTCAP)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, MASK, DTYPE,
                                            DOT_IN_FP32, PRECISION, RAW_MAX)
    return acc, l_i, m_i


@triton.jit
def _finish_rows(acc, l_i, m_i, STATS, stats_row0, offs_m, rows_in, stats_plane):
    # o = acc / l, and the row statistics for the backward: m (+inf where no key is visible, so
    # that the backward's probabilities are 2^(s - inf) = 0) and log2(l), stored apart.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    stats_ptrs = STATS + stats_row0 + offs_m
    tl.store(stats_ptrs, tl.where(seen, m_i, float("inf")), mask=rows_in)
    tl.store(stats_ptrs + stats_plane, tl.log2(l_safe), mask=rows_in)
    return acc * (1.0 / l_safe)[:, None]


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, STATS, CU_Q, CU_K,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    v_sb, v_sh, v_st, v_sd,
    o_sb, o_sh, o_st, o_sd,
    num_heads, group, seq_q, seq_k, num_seqs, qk_scale, stats_plane, window, softcap,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # seq_q, seq_k: the lengths of the tensors; from here on, those of this program's sequence.
    total_q = seq_q
    start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k = query_tile_program(
        num_heads, group, seq_q, seq_k, CU_Q, CU_K, num_seqs, BLOCK_M, VARLEN)
    b, h, kvh = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    q0, k0 = tl.cast(q0, tl.int64), tl.cast(k0, tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = offs_m < seq_q
    d_in = offs_d < HEAD_DIM

    q_ptrs = (Q + b * q_sb + h * q_sh + q0 * q_st + offs_m[:, None] * q_st
              + offs_d[None, :] * q_sd)
    q = load_tile(q_ptrs, rows_in, d_in, True, PAD_D, DOT_IN_FP32)
    # Tile offsets stay 32-bit; the per-head base and the tile start are 64-bit.
    k_base = K + b * k_sb + kvh * k_sh + k0 * k_st
    v_base = V + b * v_sb + kvh * v_sh + k0 * v_st
    k_offs = offs_n[:, None] * k_st + offs_d[None, :] * k_sd
    v_offs = offs_n[:, None] * v_st + offs_d[None, :] * v_sd

    # m starts finite so that a row whose keys are all masked so far computes 2^(-inf) = 0, never
    # 2^(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    full_hi, hi = causal_key_bounds(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    full_lo = 0
    if WINDOW:
        # Tiles left of every row's window are skipped; those across its left edge are masked.
        lo, full_lo = window_key_bounds(start_m, seq_q, seq_k, window, BLOCK_M, BLOCK_N)
        full_lo = tl.minimum(full_lo, full_hi)
        acc, l_i, m_i = _fwd_key_range(
            acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, lo, full_lo, offs_n,
            offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap,
            True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
            WINDOW, SOFTCAP,
        )
        full_lo = tl.maximum(full_lo, lo)
        full_hi = tl.maximum(full_hi, full_lo)
    # Key tiles every row of this query tile sees in full need no mask; the rest hold the diagonal.
    acc, l_i, m_i = _fwd_key_range(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, full_lo, full_hi, offs_n,
        offs_m, offs_d, seq_q, seq_k, qk_scale, window, softcap,
        False, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        WINDOW, SOFTCAP,
    )
    acc, l_i, m_i = _fwd_key_range(
        acc, l_i, m_i, q, k_base, v_base, k_offs, v_offs, k_st, v_st, full_hi, hi, offs_n, offs_m,
        offs_d, seq_q, seq_k, qk_scale, window, softcap,
        True, CAUSAL, HEAD_DIM, PAD_D, DTYPE, DOT_IN_FP32, PRECISION, RAW_MAX, BLOCK_N,
        WINDOW, SOFTCAP,
    )

    stats_row0 = bh.to(tl.int64) * total_q + q0
    o = _finish_rows(acc, l_i, m_i, STATS, stats_row0, offs_m, rows_in, stats_plane)
    o_ptrs = (O + b * o_sb + h * o_sh + q0 * o_st + offs_m[:, None] * o_st
              + offs_d[None, :] * o_sd)
    store_tile(o_ptrs, o, rows_in, d_in, PAD_D)


@triton.jit
def _tma_tile(desc, b, h, start, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_IN_FP32: tl.constexpr):
    # A (ROWS, BLOCK_D) tile of a (B, H, T, D) descriptor; the copy engine zero-fills rows past T
    # and columns past D.
    x = desc.load([b, h, start, 0]).reshape(ROWS, BLOCK_D)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def attention_fwd_tma_kernel(
    desc_q, desc_k, desc_v, O, STATS,
    o_sb, o_sh, o_st, o_sd,
    num_heads, group, seq_q, seq_k, qk_scale, stats_plane, window, softcap,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Half precision only (RAW_MAX is False): the exponents are s * c - m, one FMA per score.
    start_m, bh, b, h, kvh, _, _, _, _ = query_tile_program(
        num_heads, group, seq_q, seq_k, O, O, 0, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _tma_tile(desc_q, b, h, start_m, BLOCK_M, BLOCK_D, DOT_IN_FP32)
    DTYPE: tl.constexpr = desc_q.dtype

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # One loop over every visible key tile, each masked: Triton 3.6 does not warp-specialise a
    # loop that holds a branch (an unmasked loop plus a masked one fails to compile), and the
    # mask's compare and select cost little beside the exp2 of every score.
    _, hi = causal_key_bounds(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)
    lo = 0
    if WINDOW:  # start at the first key tile the window reaches
        lo, _full_lo = window_key_bounds(start_m, seq_q, seq_k, window, BLOCK_M, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _tma_tile(desc_k, b, kvh, start_n, BLOCK_N, BLOCK_D, DOT_IN_FP32)
        v = _tma_tile(desc_v, b, kvh, start_n, BLOCK_N, BLOCK_D, DOT_IN_FP32)
        s = score_dot(q, k, PRECISION)
        s, _tanh = capped_scores(s, softcap, SOFTCAP)
        visible = visible_keys(start_n + tl.arange(0, BLOCK_N), offs_m, seq_q, seq_k, window,
                               CAUSAL, WINDOW)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, True, DTYPE,
                                            DOT_IN_FP32, PRECISION, False)

    # o leaves through plain stores: Triton 3.6's warp specialisation fails to compile a
    # descriptor store after the specialised loop (its data partitioning rejects it).
    rows_in = offs_m < seq_q
    o = _finish_rows(acc, l_i, m_i, STATS, bh.to(tl.int64) * seq_q, offs_m, rows_in, stats_plane)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = (O + b.to(tl.int64) * o_sb + h.to(tl.int64) * o_sh + offs_m[:, None] * o_st
              + offs_d[None, :] * o_sd)
    store_tile(o_ptrs, o, rows_in, offs_d < HEAD_DIM, PAD_D)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def _tma_block_shapes(nargs):
    # Descriptors take their tile shape from the launch config (an autotuner pre-hook).
    m, n, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    nargs["desc_q"].block_shape = [1, 1, m, d]
    nargs["desc_k"].block_shape = nargs["desc_v"].block_shape = [1, 1, n, d]


_TUNED = autotuned(attention_fwd_kernel, "fwd", "Q")
_TUNED_TMA = autotuned(attention_fwd_tma_kernel, "fwd_tma", "desc_q", pre_hook=_tma_block_shapes)


def _tma_compatible(t: torch.Tensor) -> bool:
    # What a TMA descriptor needs: unit stride along D, 16-byte aligned base and other strides.
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * size % 16 == 0 for s in t.stride()[:-1]))


def uses_tma(q, k, v, varlen=False) -> bool:
    """Whether the forward of these tensors runs ``attention_fwd_tma_kernel`` (see ``USE_TMA``);
    packed sequences (``varlen``) take the portable kernel."""
    if varlen or USE_TMA is False or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if USE_TMA is None and not device_limits(q.device).is_hopper:
        return False  # Hopper only (NVIDIA sm_90; never ROCm, whose MI300X reports 9.4)
    return all(_tma_compatible(t) for t in (q, k, v))


def _fwd_fake(q, k, v, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
              max_seqlen_k=0, window=0, softcap=0.0):
    o = torch.empty_like(q)
    return o, q.new_empty((2, *q.shape[:3]), dtype=torch.float32)


@compilable("flash_attention_fwd", _fwd_fake)
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0, window: int = 0, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: returns ``(o, stats)``; ``stats (2, B, Hq, Tq)`` float32 holds each row's
    softmax max ``m`` (base 2 of the scaled scores; ``+inf`` for a row that sees no key) and
    ``log2`` of its sum, for the backward.  With ``cu_seqlens_q`` the sequences are packed
    (``flash_attention``'s varlen arguments, already validated); rows outside every sequence
    are zeros.  ``window`` (sliding window, causal) and ``softcap`` (> 0: Gemma 2's score cap)
    are ``flash_attention``'s, validated; 0 means off."""
    batch, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    # q's memory layout when dense (e.g. (B, T, H, D) transposed); packed sequences need not
    # cover every row, and the rows they leave out are zeros.
    o = torch.zeros_like(q) if varlen else torch.empty_like(q)
    stats = torch.empty((2, batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, stats
    consts = {**common_consts(q, causal, window, softcap), "VARLEN": varlen}
    if varlen:
        tuning = (max_seqlen_q, max_seqlen_k)
        cu_args = (cu_seqlens_q, cu_seqlens_k)
        num_seqs = cu_seqlens_q.shape[0] - 1
    else:
        tuning, cu_args, num_seqs = (seq_q, seq_k), (q, q), 0
    shape = (heads, heads // kv_heads, seq_q, seq_k, num_seqs, sm_scale * LOG2E, stats[0].numel(),
             window, softcap_arg(softcap, sm_scale), bucket(tuning[0]), bucket(tuning[1]))

    def grid(meta):
        return (batch * heads, grid_tiles(seq_q, meta["BLOCK_M"], cu_seqlens_q, max_seqlen_q))

    if uses_tma(q, k, v, varlen):
        # Block shapes are placeholders until _tma_block_shapes sets them for the chosen config.
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, consts["BLOCK_D"]])
                 for t in (q, k, v)]
        del consts["VARLEN"]
        launch(attention_fwd_tma_kernel, _TUNED_TMA, "fwd_tma", grid,
               (*descs, o, stats, *o.stride(), *shape[:4], *shape[5:]),
               {**consts, "WARP_SPECIALIZE": not INTERPRET}, seq_q, seq_k, q.element_size(), q.device,
               pre_hook=_tma_block_shapes)
    else:
        args = (q, k, v, o, stats, *cu_args, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                *shape)
        launch(attention_fwd_kernel, _TUNED, "fwd", grid, args, consts, *tuning,
               q.element_size(), q.device)
    return o, stats
