"""Flash attention forward: the portable kernel and the Hopper (TMA, warp-specialised) kernel.

Both run the online softmax of the package's docstring over the key tiles a query tile sees,
in base 2 with float32 statistics, and write ``o`` (one rounding) and the row stats ``m`` and
``log2(l)`` for the backward.  With ``SOFTCAP`` every raw score ``s`` becomes
``cap * tanh(s / cap)`` (``cap = softcap / sm_scale``) before the softmax; with ``WINDOW`` the
key range of a query tile starts at the first tile its window reaches
(``tiles.query_tile_key_ranges``): tiles left of every row's window are never loaded, tiles
straddling the window's edge are masked.  One program per (batch, query head, query tile); heads
are the fastest launch axis (``tiles.query_tile_program``).

* ``attention_fwd_kernel`` (every GPU, the interpreter, float32, any strides): pointer loads
  that the compiler pipelines with cp.async.
* ``attention_fwd_tma_kernel`` (Hopper, float16/bfloat16, unit head-dim stride, 16-byte aligned
  strides): q, k and v arrive through TMA tensor descriptors, one 4-D descriptor per tensor
  ``(B, H, T, D)``, so the copy engine zero-fills the ragged ends of T and D (o leaves through
  ordinary stores);
  with ``WARP_SPECIALIZE`` the key loop is split by Triton into a producer warpgroup issuing the
  TMA loads and consumer warpgroups doing the matmuls and the softmax, so the softmax of one
  tile overlaps the loads (and, across consumers, the matmuls) of others.

The ``tma_forward`` option (``llama_kernels.kernel_options``) chooses: ``None`` (default) takes
the TMA kernel wherever it applies on an sm_90 GPU; ``True``/``False`` force it on (where it
applies; the interpreter runs it too) or off.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import INTERPRET, compilable
from ..device import device_limits
from ..options import current as current_options
from .configs import autotuned, launch
from .problem import AttentionProblem
from .tiles import (
    capped_scores,
    head_rows,
    key_tile_scores,
    key_value_tiles,
    load_tile,
    online_softmax_step,
    pointer_query_tile,
    query_tile_key_ranges,
    query_tile_program,
    score_dot,
    store_tile,
    tile_ptrs,
    visible_pairs,
)


@triton.jit
def _fwd_key_range(acc, l_i, m_i, q, kv, lo, hi, offs_m, seq_q, seq_k, scoring,
                   MASK: tl.constexpr, SPEC: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax over the key tiles [lo, hi); MASK compiles the causal/window/ragged masks in.
    qk_scale, window, cap = scoring
    DTYPE: tl.constexpr = kv[0].dtype.element_ty
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, visible = key_tile_scores(q, kv, start_n, offs_m, seq_q, seq_k, window, MASK, SPEC,
                                           BLOCK_N)
        s, _tanh = capped_scores(s, cap, SPEC.SOFTCAP)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, MASK, DTYPE, SPEC)
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
    Q, K, V, O, STATS, CU_Q, CU_K, q_strides, k_strides, v_strides, o_strides,
    dims, scoring, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dims = (Hq, group, Tq, Tk, num_seqs) with the tensors' lengths; from here on seq_q, seq_k
    # are those of this program's sequence.  scoring = (qk_scale, window, cap).
    total_q = dims[2]
    (start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k,
     offs_m, offs_d, rows_in, d_in) = pointer_query_tile(dims, CU_Q, CU_K, SPEC, BLOCK_M)
    q = load_tile(tile_ptrs(head_rows(Q, q_strides, b, h, q0), q_strides, offs_m, offs_d), rows_in,
                  d_in, True, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    kv = key_value_tiles(K, V, k_strides, v_strides, b, kvh, k0, SPEC, BLOCK_N)

    # m starts finite so that a row whose keys are all masked so far computes 2^(-inf) = 0, never
    # 2^(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, SPEC.BLOCK_D], tl.float32)

    lo, full_lo, full_hi, hi = query_tile_key_ranges(start_m, seq_q, seq_k, scoring[1], SPEC.CAUSAL,
                                                     SPEC.WINDOW, BLOCK_M, BLOCK_N)
    if SPEC.WINDOW:  # the tiles across the window's left edge
        acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, kv, lo, full_lo, offs_m, seq_q, seq_k,
                                       scoring, True, SPEC, BLOCK_N)
    # Key tiles every row of this query tile sees in full need no mask; the rest hold the diagonal.
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, kv, full_lo, full_hi, offs_m, seq_q, seq_k,
                                   scoring, False, SPEC, BLOCK_N)
    acc, l_i, m_i = _fwd_key_range(acc, l_i, m_i, q, kv, full_hi, hi, offs_m, seq_q, seq_k,
                                   scoring, True, SPEC, BLOCK_N)

    stats_row0 = bh.to(tl.int64) * total_q + q0
    o = _finish_rows(acc, l_i, m_i, STATS, stats_row0, offs_m, rows_in, stats_plane)
    store_tile(tile_ptrs(head_rows(O, o_strides, b, h, q0), o_strides, offs_m, offs_d), o, rows_in,
               d_in, SPEC.PAD_D)


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
    desc_q, desc_k, desc_v, O, STATS, o_strides, dims, scoring, stats_plane,
    TQ_BUCKET, TK_BUCKET,  # autotuning keys only
    SPEC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Half precision only (RAW_MAX is False): the exponents are s * c - m, one FMA per score.
    # Dense sequences only (VARLEN is False): dims = (Hq, group, Tq, Tk, 0).
    qk_scale, window, cap = scoring
    seq_q, seq_k = dims[2], dims[3]
    start_m, bh, b, h, kvh, _, _, _, _ = query_tile_program(dims, O, O, BLOCK_M, False)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _tma_tile(desc_q, b, h, start_m, BLOCK_M, SPEC.BLOCK_D, SPEC.DOT_IN_FP32)
    DTYPE: tl.constexpr = desc_q.dtype

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, SPEC.BLOCK_D], tl.float32)
    # One loop over every visible key tile, each masked: Triton 3.6 does not warp-specialise a
    # loop that holds a branch (an unmasked loop plus a masked one fails to compile), and the
    # mask's compare and select cost little beside the exp2 of every score.
    lo, _full_lo, _full_hi, hi = query_tile_key_ranges(start_m, seq_q, seq_k, window, SPEC.CAUSAL,
                                                       SPEC.WINDOW, BLOCK_M, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _tma_tile(desc_k, b, kvh, start_n, BLOCK_N, SPEC.BLOCK_D, SPEC.DOT_IN_FP32)
        v = _tma_tile(desc_v, b, kvh, start_n, BLOCK_N, SPEC.BLOCK_D, SPEC.DOT_IN_FP32)
        s = score_dot(q, k, SPEC.PRECISION)
        s, _tanh = capped_scores(s, cap, SPEC.SOFTCAP)
        keys = start_n + tl.arange(0, BLOCK_N)
        visible = visible_pairs(keys[None, :], offs_m[:, None], seq_k - seq_q, seq_k, window, True,
                                SPEC.CAUSAL, SPEC.WINDOW)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, True, DTYPE, SPEC)

    # o leaves through plain stores: Triton 3.6's warp specialisation fails to compile a
    # descriptor store after the specialised loop (its data partitioning rejects it).
    rows_in = offs_m < seq_q
    o = _finish_rows(acc, l_i, m_i, STATS, bh.to(tl.int64) * seq_q, offs_m, rows_in, stats_plane)
    offs_d = tl.arange(0, SPEC.BLOCK_D)
    o_ptrs = tile_ptrs(head_rows(O, o_strides, b.to(tl.int64), h.to(tl.int64), 0), o_strides, offs_m,
                       offs_d)
    store_tile(o_ptrs, o, rows_in, offs_d < SPEC.HEAD_DIM, SPEC.PAD_D)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def _tma_block_shapes(nargs):
    # Descriptors take their tile shape from the launch config (an autotuner pre-hook).
    m, n, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["SPEC"].BLOCK_D
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
    """Whether the forward of these tensors runs ``attention_fwd_tma_kernel`` (the ``tma_forward``
    option: by default on an sm_90 GPU only); packed sequences (``varlen``) take the portable
    kernel."""
    choice = current_options().tma_forward
    if varlen or choice is False or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if choice is None and not device_limits(q.device).is_hopper:
        return False  # Hopper only (NVIDIA sm_90; never ROCm, whose MI300X reports 9.4)
    return all(_tma_compatible(t) for t in (q, k, v))


def _fwd_fake(q, k, v, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
              max_seqlen_k=0, window=0, softcap=0.0):
    o = torch.empty_like(q)
    return o, q.new_empty((2, *q.shape[:3]), dtype=torch.float32)


@compilable("flash_attention_fwd", _fwd_fake)
def flash_attention_fwd(
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
    problem = AttentionProblem.build(q, k, causal, sm_scale, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, window, softcap)
    # q's memory layout when dense (e.g. (B, T, H, D) transposed); packed sequences need not
    # cover every row, and the rows they leave out are zeros.
    o = torch.zeros_like(q) if problem.varlen else torch.empty_like(q)
    stats = torch.empty((2, *q.shape[:3]), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, stats
    scalars = (problem.query_dims(), problem.scoring, problem.stats_plane, *problem.buckets)
    if uses_tma(q, k, v, problem.varlen):
        # Block shapes are placeholders until _tma_block_shapes sets them for the chosen config.
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, problem.spec.BLOCK_D])
                 for t in (q, k, v)]
        launch(attention_fwd_tma_kernel, _TUNED_TMA, "fwd_tma", problem.query_grid,
               (*descs, o, stats, o.stride(), *scalars),
               {"SPEC": problem.spec, "WARP_SPECIALIZE": not INTERPRET}, problem,
               pre_hook=_tma_block_shapes)
    else:
        args = (q, k, v, o, stats, *problem.offsets(q), q.stride(), k.stride(), v.stride(),
                o.stride(), *scalars)
        launch(attention_fwd_kernel, _TUNED, "fwd", problem.query_grid, args, {"SPEC": problem.spec},
               problem)
    return o, stats
