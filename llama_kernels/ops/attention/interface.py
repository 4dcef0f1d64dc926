"""The public attention ops: ``flash_attention`` (with its autograd function) and
``flash_decode``.  Each validates its arguments, falls back to the eager reference where no Triton
kernel can run, and sends the call to the training kernels (``forward.py``, ``backward.py``) or to
the split-KV decode kernels (``decode.py``); the math is in the package's docstring."""
from __future__ import annotations

import torch

from ... import reference
from ..common import autocast_inputs, use_triton
from . import decode
from .backward import flash_attention_bwd
from .forward import flash_attention_fwd
from .validation import (
    validate_attention,
    validate_cache_lengths,
    validate_varlen,
    validate_window_softcap,
)

__all__ = ["flash_attention", "flash_decode", "FlashAttentionFunction"]


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd of ``flash_attention``: saves q, k, v, o and the float32 softmax row stats (and
    the offsets of packed sequences, the window and the softcap: 0 is off)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=0, max_seqlen_k=0, window=0, softcap=0.0):
        if cu_seqlens_k is None:  # the same offsets (passed once: Dynamo refuses duplicates)
            cu_seqlens_k = cu_seqlens_q
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        o, stats = flash_attention_fwd(q, k, v, causal, sm_scale, *varlen, window, softcap)
        ctx.save_for_backward(q, k, v, o, stats, cu_seqlens_q, cu_seqlens_k)
        ctx.causal, ctx.sm_scale, ctx.max_seqlens = causal, sm_scale, (max_seqlen_q, max_seqlen_k)
        ctx.window, ctx.softcap = window, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, stats, ctx.causal, ctx.sm_scale, cu_seqlens_q,
                                         cu_seqlens_k, *ctx.max_seqlens, ctx.window,
                                         ctx.softcap)
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
        return reference.flash_attention(q, k, v, causal, sm_scale, *eager_options)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    group = q.shape[1] // k.shape[1]
    if decode.use_decode(max_seqlen_q if varlen else q.shape[2], group, needs_grad):
        if varlen:
            return decode.attention_decode_varlen(q, k, v, causal, sm_scale, cu_seqlens_q,
                                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  window, softcap)
        return decode.attention_decode(q, k, v, causal, sm_scale, None, None, window, softcap)
    # One call for every variant.  Unused arguments are None / 0; the same offsets for queries
    # and keys are passed once (cu_seqlens_k None): Dynamo refuses a tensor passed twice.
    return FlashAttentionFunction.apply(
        q, k, v, causal, sm_scale, cu_seqlens_q,
        None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k, max_seqlen_q or 0, max_seqlen_k or 0,
        window, softcap)


def flash_decode(q, k_cache, v_cache, cache_seqlens, sm_scale=None, *, cache_leftpad=None, window=None,
                 softcap=None):
    """Attention of a few new queries over a preallocated KV cache whose lengths live on the device.

    ``q (B, Hq, Tq, D)``; ``k_cache, v_cache (B, Hk, Tmax, D)`` the whole cache buffers (any
    strides); ``cache_seqlens`` an int32 tensor ``(B,)`` on ``q``'s device (any stride, e.g. one
    length expanded over the batch): row ``b`` holds ``L_b = cache_seqlens[b]`` keys, the new
    tokens' included, and its queries are the last ``Tq`` of them.  Query ``i`` of row ``b`` sees
    keys ``j <= i + L_b - Tq`` (causal, bottom-right relative to ``L_b``); a query that sees no
    key outputs zeros.  Lengths are clamped to ``[0, Tmax]``; they are never read on the host.
    ``cache_leftpad`` (int32 ``(B,)``, optional) serves left-padded batches: row ``b``'s first
    ``cache_leftpad[b]`` slots are padding, so it sees keys ``[cache_leftpad[b], L_b)`` only.
    ``sm_scale`` defaults to ``D ** -0.5``.  ``window`` (int >= 1, sliding-window attention):
    query ``i`` of row ``b`` sits at slot ``L_b - Tq + i`` and sees only the ``window`` most
    recent keys, ``[max(cache_leftpad[b], L_b - Tq + i - window + 1), L_b - Tq + i]``; whole key
    tiles (and splits) left of the window are skipped.  ``softcap`` (float > 0): scores become
    ``softcap * tanh(scores / softcap)`` before the softmax, ``scores = sm_scale * q k^T`` (Gemma 2).

    Shapes, head dims and grouped-query heads as in ``flash_attention``, with ``Tq * Hq / Hk <=
    DECODE_MAX_ROWS`` (64).  The launch depends on the shapes only, so one decode step can be
    captured in a CUDA graph and replayed with new lengths.  Forward only: the inputs must not
    need gradients.  Returns ``o (B, Hq, Tq, D)`` in ``q.dtype``.  Under ``torch.autocast`` q and
    the caches are first cast to the autocast dtype, as eager attention casts them (a float32 cache
    is then copied each call: keep the cache in the autocast dtype).
    """
    q, k_cache, v_cache = autocast_inputs(q, k_cache, v_cache)
    sm_scale = validate_attention(q, k_cache, v_cache, True, sm_scale, names=("q", "k_cache", "v_cache"))
    window, softcap = validate_window_softcap(window, softcap, True)
    validate_cache_lengths(q, k_cache, v_cache, cache_seqlens, cache_leftpad, decode.DECODE_MAX_ROWS)
    if not use_triton("flash_decode", q.device):
        return reference.flash_decode(q, k_cache, v_cache, cache_seqlens, sm_scale, cache_leftpad,
                                      window or None, softcap or None)
    return decode.attention_decode(q, k_cache, v_cache, True, sm_scale, cache_seqlens, cache_leftpad,
                                   window, softcap)
