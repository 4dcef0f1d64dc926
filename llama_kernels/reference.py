"""Eager PyTorch version of every op: the oracle of the tests, the baseline of the benchmarks and
the fallback where no Triton kernel can run.

Each function follows the math (and cast order) of Hugging Face transformers' LLaMA, so a model
built from these ops gives transformers' answers.  Called with float64 tensors they are the
float64 oracle the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6, residual=None):
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))``, statistics in float32, output in ``x.dtype``.

    With ``residual``: ``h = x + residual`` (rounded to ``x.dtype``) and returns ``(rms_norm(h), h)``.
    """
    if residual is not None:
        h = x + residual
        return rms_norm(h, weight, eps), h
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(stats_dtype)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def swiglu(gate, up):
    """``silu(gate) * up`` (the LLaMA MLP activation), in the input dtype."""
    return F.silu(gate) * up


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


def causal_mask(tq, tk, device):
    """Boolean ``(tq, tk)`` mask, True where query ``i`` may see key ``j``: ``j <= i + tk - tq``."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def attention(q, k, v, causal=True, sm_scale=None):
    """Softmax attention with grouped-query heads, the math of transformers' eager attention.

    ``q (B, Hq, Tq, D)``, ``k, v (B, Hk, Tk, D)``, ``Hq % Hk == 0``; query head ``h`` reads KV head
    ``h // (Hq // Hk)``.  Causal masking is aligned bottom-right (``j <= i + Tk - Tq``).  Scores and
    ``p @ v`` are computed in the input dtype, the softmax in float32.  A query row that sees no key
    (``Tq > Tk``, causal) gets zeros.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(scores.to(softmax_dtype), dim=-1)
    if causal and q.shape[2] > k.shape[2]:
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(p.to(q.dtype), v)
