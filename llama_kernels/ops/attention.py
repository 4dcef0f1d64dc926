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

Packed (varlen) sequences: with ``cu_seqlens_q/k`` the batch is one row of concatenated sequences
and pair ``i`` is the ``(q, k)`` above restricted to rows ``[cu_q[i], cu_q[i+1])`` and
``[cu_k[i], cu_k[i+1])`` (causal bottom-right within the pair).  The launch grid enumerates the
tiles of every sequence (``attention_tiles.varlen_tile`` finds a program's sequence on the
device), so uneven lengths cost what their tiles cost; the kernels are the same, with the
sequence's first rows added to the pointers and its lengths in place of ``Tq, Tk``.

Sliding window (``window = W``, causal only, transformers' ``kv_idx > q_idx - W``): query ``i``
sees key ``j`` iff ``i + (Tk - Tq) - W < j <= i + (Tk - Tq)``, the ``W`` most recent keys it may
see causally.  For the query tile ``[m0, m0 + BLOCK_M)`` the key range starts at the tile holding
``max(0, m0 + (Tk - Tq) - W + 1)`` (its first row's first key; tiles further left are never
visited), and key tiles below ``m0 + BLOCK_M + (Tk - Tq) - W`` (its last row's first key) straddle
the window's edge and are masked like the diagonal ones.  For the key tile ``[n0, n0 + BLOCK_N)``
(dK/dV) the query range ends before ``n0 + BLOCK_N - 1 - (Tk - Tq) + W``.  A window ``>= Tk``
hides nothing and compiles out.

Softcap (``softcap = C``, Gemma 2): the scaled scores become ``C tanh(sm_scale s / C)`` before the
softmax.  The kernels apply it to the raw scores with ``cap = C / sm_scale``,
``u = cap tanh(s / cap)``, and then run the softmax of ``sm_scale u`` as above (same ``c``, so
the row stats stay in the same units).  Backward: ``du/ds = 1 - tanh^2(s / cap) = 1 - (u /
cap)^2``, so ``dS`` below is multiplied by it, elementwise, before ``dQ`` and ``dK``.

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

Every kernel only visits tiles that the causal mask leaves visible, and only tiles that straddle
the diagonal (or a ragged edge) pay for masking (except the warp-specialised forward, which masks
every tile: see ``attention_fwd.py``).  Padding rows of a ragged tile are masked in the
exponent, never left to produce inf/NaN that is merely not stored: a padding key's zero score can
exceed the max of a row whose scores are all negative, and ``2^(0 - m)`` would overflow
(non-causal; causal masking hides those keys anyway).

Precision: scores, softmax statistics and all accumulators are float32.  With float32 inputs the
dots run in IEEE float32 (the GPU's default TF32 would lose accuracy); with float16/bfloat16 the
operands of every dot are in the input dtype.  Under the Triton interpreter, which computes
bfloat16 dots and arithmetic wrongly, the operands are rounded to the input dtype (``cast_rne``) and
then multiplied in float32, which gives the same values as the GPU's tensor cores; the scores
``q k^T`` are summed in float64 there and rounded once (``attention_tiles.score_dot``), so that the
backward's recomputed scores equal the forward's to the bit, as the GPU's float32 dots give them.

Where the code lives (imports run one way: ``attention_tiles`` and ``attention_launch`` at the
bottom, then ``attention_fwd``, ``attention_bwd`` and ``decode``, then this module):

* ``attention_tiles.py``: argument checks, dot precision, tile loads/stores, the online-softmax
  arithmetic, the causal key range and the launch order of query tiles (heads fastest, longest
  tiles first).
* ``attention_launch.py``: tile configurations per kernel, dtype and head dim; autotuning.
* ``attention_fwd.py``: the portable forward and the Hopper one (TMA descriptors, warp-specialised).
* ``attention_bwd.py``: the fused backward (5 matmuls per tile pair, atomic float32 dQ) and the
  deterministic one (separate dQ and dK/dV kernels), chosen by
  ``torch.are_deterministic_algorithms_enabled()``; float32 always takes the deterministic one.
* ``decode.py``: split-KV kernels for generation.  Calls that need no gradient and have few
  queries per KV group (``Tq * Hq / Hk <= 64``) go there instead.
"""
from __future__ import annotations

import torch

from .. import reference
from . import decode
from .attention_bwd import attention_bwd
from .attention_fwd import attention_fwd
from .attention_tiles import (
    MAX_HEAD_DIM,
    effective_window,
    supports_head_dim,
    validate_attention,
    validate_varlen,
    validate_window_softcap,
)
from .common import autocast_inputs, use_triton

__all__ = ["flash_attention", "FlashAttentionFunction", "supports_head_dim", "MAX_HEAD_DIM"]


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd of ``flash_attention``: saves q, k, v, o and the float32 softmax row stats (and
    the offsets of packed sequences, the window and the softcap: 0 is off)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=0, max_seqlen_k=0, window=0, softcap=0.0):
        if cu_seqlens_k is None:  # the same offsets (passed once: Dynamo refuses duplicates)
            cu_seqlens_k = cu_seqlens_q
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        o, stats = attention_fwd(q, k, v, causal, sm_scale, *varlen, window, softcap)
        ctx.save_for_backward(q, k, v, o, stats, cu_seqlens_q, cu_seqlens_k)
        ctx.causal, ctx.sm_scale, ctx.max_seqlens = causal, sm_scale, (max_seqlen_q, max_seqlen_k)
        ctx.window, ctx.softcap = window, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, stats, ctx.causal, ctx.sm_scale, cu_seqlens_q,
                                   cu_seqlens_k, *ctx.max_seqlens, ctx.window, ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention(q, k, v, causal=True, sm_scale=None, *, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, window=None, softcap=None):
    """Scaled dot-product attention with grouped-query heads, in O(T) memory.

    ``q (B, Hq, Tq, D)``, ``k, v (B, Hk, Tk, D)`` with ``Hq % Hk == 0`` (query head ``h`` reads KV
    head ``h // (Hq // Hk)``; K/V are never repeated in memory), any strides (e.g. transposed views
    of ``(B, T, H, D)`` projections, or ``cache[:, :, :L]`` slices of a KV cache).  ``D`` is a
    multiple of 16 up to 256.  Returns ``o (B, Hq, Tq, D)`` in ``q.dtype``.

    ``causal`` masks bottom-right: query ``i`` sees key ``j <= i + Tk - Tq`` (one decode step sees
    the whole cache); a query that sees no key outputs zeros.  ``sm_scale`` defaults to
    ``D ** -0.5``.  Differentiable in ``q``, ``k`` and ``v``.

    Packed sequences (FlashAttention-2's varlen semantics): with ``cu_seqlens_q`` (int32
    ``(N + 1,)`` offsets on ``q``'s device) ``q`` is ``(1, Hq, total_q, D)`` and ``k, v`` are
    ``(1, Hk, total_k, D)`` (any strides, e.g. transposed views of ``(total, H, D)``); pair ``i``
    attends ``q[:, :, cu_q[i]:cu_q[i+1]]`` to ``k, v[:, :, cu_k[i]:cu_k[i+1]]`` only, causal
    bottom-right within the pair.  ``cu_seqlens_k`` defaults to ``cu_seqlens_q``.  Rows outside
    every sequence get zeros.  ``max_seqlen_q`` and ``max_seqlen_k`` (ints, at least the longest
    sequence) avoid a host synchronisation; without them the offsets are read once on the host
    and checked (non-decreasing, within the tensors).  Sequences may be empty or have no keys.

    ``window`` (int >= 1, ``causal=True`` only): sliding-window attention as transformers defines
    it (Mistral, Gemma 2/3 local layers): query ``i`` sees only the ``window`` most recent keys it
    may see causally, itself included: ``i + Tk - Tq - window < j <= i + Tk - Tq`` (within each
    pair when packed).  Key tiles left of a query tile's window are never read.  ``softcap``
    (float > 0, Gemma 2): the scores ``sm_scale * q k^T`` become ``softcap * tanh(scores /
    softcap)`` before the softmax (differentiated through).  Both default to ``None``: off, and
    the kernels compile without them.  Every path (forward, both backwards, packed sequences,
    decode) honours them.

    When no gradient is needed and the queries of one KV group are few
    (``Tq * Hq / Hk <= decode.DECODE_MAX_ROWS``, or ``max_seqlen_q * Hq / Hk`` packed, i.e.
    generation), the split-KV decode kernels of ``decode.py`` run instead of the training kernels.

    Under ``torch.autocast`` (float16/bfloat16, for the inputs' device type) q, k and v are first
    cast to the autocast dtype, as eager SDPA and matmul cast them, so that mixed inputs (float32
    q, k after RoPE with float32 tables, a half-precision v) work and the output has the dtype
    eager attention gives; outside autocast they must share one dtype (TypeError otherwise).

    The backward is bitwise reproducible when ``torch.are_deterministic_algorithms_enabled()``;
    otherwise half precision accumulates dQ with float32 atomics (faster; the last bits of dQ
    may differ from run to run, as with PyTorch's flash backend).
    """
    q, k, v = autocast_inputs(q, k, v)
    varlen = cu_seqlens_q is not None
    sm_scale = validate_attention(q, k, v, causal, sm_scale, allow_empty_keys=varlen)
    window, softcap = validate_window_softcap(window, softcap, causal)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = validate_varlen(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not use_triton("flash_attention", q.device) or (
            q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0 or k.shape[2] == 0):
        # No Triton here (the warning was given), or nothing to launch: the eager op returns the
        # (differentiable) result.
        eager_options = (window or None, softcap or None)
        if varlen:
            return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale,
                                              *eager_options)
        return reference.attention(q, k, v, causal, sm_scale, *eager_options)
    # A window at least as long as the longest key range hides nothing: compile it out.
    window = effective_window(window, max_seqlen_k if varlen else k.shape[2])
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    group = q.shape[1] // k.shape[1]
    if decode.use_decode(max_seqlen_q if varlen else q.shape[2], group, needs_grad):
        if varlen:
            return decode.attention_decode_varlen(q, k, v, causal, sm_scale, cu_seqlens_q,
                                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  window, softcap)
        return decode.attention_decode(q, k, v, causal, sm_scale, None, None, window, softcap)
    if varlen:
        return FlashAttentionFunction.apply(
            q, k, v, causal, sm_scale, cu_seqlens_q,
            None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            window, softcap)
    if window or softcap:
        return FlashAttentionFunction.apply(q, k, v, causal, sm_scale, None, None, 0, 0, window,
                                            softcap)
    return FlashAttentionFunction.apply(q, k, v, causal, sm_scale)
