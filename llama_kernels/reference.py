"""Eager PyTorch version of every op: the oracle of the tests, the baseline of the benchmarks and
the fallback where no Triton kernel can run.

Each function follows the math (and cast order) of Hugging Face transformers' LLaMA, so a model
built from these ops gives transformers' answers.  Called with float64 tensors they are the
float64 oracle the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6, residual=None, *, offset=0.0, casting="llama"):
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))``, statistics in float32, output in ``x.dtype``.

    With ``residual``: ``h = x + residual`` (rounded to ``x.dtype``) and returns ``(rms_norm(h), h)``.
    ``offset``: scale by ``offset + weight``, formed in float32 (Gemma: 1).  ``casting="llama"``
    rounds the normalised row to ``x.dtype`` before scaling (``LlamaRMSNorm``); ``"gemma"`` scales in
    float32 and rounds once (``GemmaRMSNorm``, ``Gemma3RMSNorm``).
    """
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps, offset=offset, casting=casting), h
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(stats_dtype)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (normed * (offset + weight.to(stats_dtype))).to(x.dtype)
    scale = weight if offset == 0 else offset + weight.to(stats_dtype)
    return (scale * normed.to(x.dtype)).to(x.dtype)


def swiglu(gate, up):
    """``silu(gate) * up`` (the LLaMA MLP activation), in the input dtype."""
    return F.silu(gate) * up


def geglu(gate, up):
    """``gelu_tanh(gate) * up`` (Gemma's MLP activation: transformers' ``gelu_pytorch_tanh``, i.e.
    ``F.gelu(gate, approximate="tanh")``), in the input dtype."""
    return F.gelu(gate, approximate="tanh") * up


def rotate_half(x):
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x):
    """``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])``: ``rotate_half`` for interleaved (Meta) layouts."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(q, k, cos, sin, interleaved=False):
    """Rotary embedding of ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)``: ``x * cos + rotate(x) * sin``.

    ``cos, sin`` are ``(B, T, D)`` or ``(T, D)``.  ``rotate`` is ``rotate_half`` (transformers'
    convention) or, with ``interleaved=True``, ``rotate_pairs`` (Meta's checkpoints).
    """
    rotate = rotate_pairs if interleaved else rotate_half
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def rotary_cos_sin(positions, inv_freq, dtype, attention_scaling=1.0):
    """``cos, sin`` of shape ``positions.shape + (D,)`` for the rotate-half layout, as transformers
    computes them (angles in float32, one cast to ``dtype``)."""
    freqs = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


def causal_mask(tq, tk, device, window=None):
    """Boolean ``(tq, tk)`` mask, True where query ``i`` may see key ``j``: ``j <= i + tk - tq``,
    and with ``window`` (sliding-window attention, transformers' ``kv_idx > q_idx - window`` with
    bottom-right positions) also ``j > i + tk - tq - window``: the ``window`` most recent keys."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    visible = j <= i + (tk - tq)
    if window is not None:
        visible = visible & (j > i + (tk - tq) - window)
    return visible


def _masked_attention(q, k, v, visible, sm_scale, rows_may_be_empty, softcap=None):
    """GQA softmax attention; ``visible`` (broadcastable to the scores, or None) marks the keys each
    query sees.  Scores and ``p @ v`` in the input dtype, the softmax in float32; with
    ``rows_may_be_empty`` a query that sees no key gets zeros (softmax over no key is NaN).
    ``softcap`` squashes the scaled scores to ``softcap * tanh(scores / softcap)`` before the mask
    and the softmax, in the input dtype (transformers' Gemma 2 eager attention)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(scores.to(softmax_dtype), dim=-1)
    if rows_may_be_empty:
        p = p.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return torch.matmul(p.to(q.dtype), v)


def flash_attention(q, k, v, causal=True, sm_scale=None, window=None, softcap=None, *, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Softmax attention with grouped-query heads, the math of transformers' eager attention: the
    eager twin of ``ops.attention.flash_attention`` (same arguments).

    ``q (B, Hq, Tq, D)``, ``k, v (B, Hk, Tk, D)``, ``Hq % Hk == 0``; query head ``h`` reads KV head
    ``h // (Hq // Hk)``.  Causal masking is aligned bottom-right (``j <= i + Tk - Tq``).  Scores and
    ``p @ v`` are computed in the input dtype, the softmax in float32.  A query row that sees no key
    (``Tq > Tk``, causal) gets zeros.  ``window`` (causal only) keeps the ``window`` most recent
    visible keys, ``j > i + Tk - Tq - window``; ``softcap`` turns the scaled scores into
    ``softcap * tanh(scores / softcap)`` (Gemma 2).  With ``cu_seqlens_q``: packed sequences, as
    :func:`varlen_attention`.
    """
    if cu_seqlens_q is not None:  # packed sequences (the maximum lengths only spare the kernel a sync)
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sm_scale, window, softcap)
    if window is not None and not causal:
        raise ValueError("window (sliding-window attention) needs causal=True")
    visible = causal_mask(q.shape[2], k.shape[2], q.device, window) if causal else None
    return _masked_attention(q, k, v, visible, sm_scale, rows_may_be_empty=causal and q.shape[2] > k.shape[2],
                             softcap=softcap)


def flash_decode(q, k_cache, v_cache, cache_seqlens, sm_scale=None, cache_leftpad=None, window=None,
                 softcap=None):
    """``flash_attention`` of ``q (B, Hq, Tq, D)`` over the first ``cache_seqlens[b]`` keys of each row of
    a preallocated cache ``k_cache, v_cache (B, Hk, Tmax, D)``: the eager twin of
    ``ops.attention.flash_decode``.

    Row ``b`` holds ``L_b`` keys (clamped to ``[0, Tmax]``) and its queries are the last ``Tq`` of
    them: query ``i`` sees key ``j <= i + L_b - Tq`` (causal, bottom-right relative to ``L_b``); a
    query that sees no key gets zeros.  With ``cache_leftpad (B,)`` row ``b``'s first
    ``cache_leftpad[b]`` keys are padding (a left-padded batch) and stay invisible too.  With
    ``window`` query ``i`` (at slot ``L_b - Tq + i``) sees only keys ``j > L_b - Tq + i - window``;
    ``softcap`` as in ``flash_attention``.  The mask is built on the device from the lengths (no host
    synchronisation), so a CUDA graph can capture this op too.  Precision as in ``flash_attention``.
    """
    seq_q, seq_k = q.shape[2], k_cache.shape[2]
    lengths = cache_seqlens.to(torch.long).clamp(0, seq_k).view(-1, 1, 1, 1)
    i = torch.arange(seq_q, device=q.device)[:, None]
    j = torch.arange(seq_k, device=q.device)[None, :]
    visible = j <= i + (lengths - seq_q)  # (B, 1, Tq, Tmax); implies j < L_b since i < Tq
    if cache_leftpad is not None:
        visible = visible & (j >= cache_leftpad.to(torch.long).view(-1, 1, 1, 1))
    if window is not None:
        visible = visible & (j > i + (lengths - seq_q) - window)
    return _masked_attention(q, k_cache, v_cache, visible, sm_scale, rows_may_be_empty=True, softcap=softcap)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, causal=True, sm_scale=None, window=None,
                     softcap=None):
    """``flash_attention`` of packed sequences (``flash_attention(..., cu_seqlens_q=...)`` calls it).

    ``q (1, Hq, total_q, D)``, ``k, v (1, Hk, total_k, D)``; pair ``i`` attends
    ``q[:, :, cu_q[i]:cu_q[i+1]]`` to ``k, v[:, :, cu_k[i]:cu_k[i+1]]`` only (``cu_seqlens_k``
    defaults to ``cu_seqlens_q``), causal bottom-right within the pair (``window`` and ``softcap``
    as in ``flash_attention``, within the pair too).  Query rows outside every sequence, and queries that
    see no key, get zeros.  Reads the offsets on the host.
    """
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    pieces, row = [], 0

    def zeros(n):
        return q.new_zeros((*q.shape[:2], n, q.shape[3])) + 0 * q.sum()  # keeps the graph

    for i in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1])
        if q0 > row:
            pieces.append(zeros(q0 - row))
        if q1 > q0:
            if k1 > k0:
                pieces.append(flash_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal, sm_scale,
                                        window, softcap))
            else:
                pieces.append(zeros(q1 - q0))
        row = max(row, q1)
    if q.shape[2] > row:
        pieces.append(zeros(q.shape[2] - row))
    return torch.cat(pieces, dim=2) if pieces else zeros(0)


def next_token_labels(labels, ignore_index=-100):
    """transformers' causal-LM label shift: position ``t`` is scored against ``labels[..., t + 1]``,
    the last position (no next token) gets ``ignore_index``; same shape as ``labels``."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0):
    """``F.cross_entropy((hidden @ weight.T + bias).float(), target, ...)``: the LM head and its loss
    with the logits materialised, the eager twin of ``ops.cross_entropy.fused_linear_cross_entropy``.

    ``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)`` or None, ``target`` (int64) of
    ``hidden``'s leading shape.  The logits are computed in the input dtype (float64 in, float64
    out: the oracle) and the loss in float32 (float64 for float64 inputs).  ``reduction="none"``
    returns a loss of ``target``'s shape.
    """
    logits = F.linear(hidden, weight, bias)
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = F.cross_entropy(logits.to(loss_dtype).reshape(-1, weight.shape[0]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss


def unpack_int4(packed):
    """``(N, K // 2)`` uint8 -> ``(N, K)`` uint8 values in [0, 15]: input feature ``2j`` from byte
    ``j``'s low nibble, ``2j + 1`` from its high one."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_weight(qweight, scales, zeros=None, *, bits=8, group_size=None, dtype=None):
    """The ``(N, K)`` weight a quantised one stands for (formats: ``ops.quantized``), computed in
    float32 (float64 for float64 scales or ``dtype``: the oracle) and returned in ``dtype``
    (default: the scales')::

        bits=8:  qweight * scales[:, None]
        bits=4:  (q - zeros[:, k // group_size]) * scales[:, k // group_size]
    """
    dtype = scales.dtype if dtype is None else dtype
    compute = torch.float64 if torch.float64 in (dtype, scales.dtype) else torch.float32
    if bits == 8:
        return (qweight.to(compute) * scales.to(compute)[:, None]).to(dtype)
    q = unpack_int4(qweight).to(compute)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = (q - zeros.to(compute)[..., None]) * scales.to(compute)[..., None]
    return w.view(n, k).to(dtype)


def quantized_linear(x, qweight, scales, zeros=None, bias=None, *, bits=8, group_size=None):
    """``F.linear(x, W, bias)`` with ``W`` the dequantised weight rounded to ``x``'s dtype
    (:func:`dequantize_weight`): the eager twin of ``ops.quantized.quantized_linear``."""
    return F.linear(x, dequantize_weight(qweight, scales, zeros, bits=bits, group_size=group_size, dtype=x.dtype),
                    bias)


# The names these twins had before they were named after their ops.
attention = flash_attention
attention_with_cache_lengths = flash_decode
