"""Rotary position embedding of q and k, both in one launch.

Each head vector ``x`` of length ``D`` is split into ``D / 2`` pairs ``(x1, x2)``: ``(x[i], x[i + D/2])``
in transformers' rotate-half layout, ``(x[2i], x[2i + 1])`` in Meta's interleaved layout.  With
``(c1, s1)`` and ``(c2, s2)`` the cos/sin entries at the positions of ``x1`` and ``x2``, the forward
``x * cos + rotate(x) * sin`` is, per pair (math in float32, one rounding to the output dtype)::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

The backward is the transposed map, which for real cos/sin tables (``c1 == c2``, ``s1 == s2``) is
the rotation by ``-theta``::

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

Outputs are in ``promote_types(q.dtype, cos.dtype, sin.dtype)`` (eager's promotion: under autocast
transformers passes float32 tables with half-precision q and gets float32); the gradients of q and k
in their own dtype.

cos/sin get gradients only when they require grad (trainable or rescaled tables, rare): then the
backward also saves q and k and computes, in eager PyTorch (float32, one rounding to each table's
dtype), summing over the heads of q and k (and over the batch for a table the batch shares)::

    dcos = sum dy * x,    dsin = sum dy * rotate(x)     (rotate: rotate_half or rotate_pairs)

Otherwise nothing but cos/sin is saved and no such work is done.

One program takes ``BLOCK_T`` tokens ``(b, t)``, loads their cos/sin once and rotates all ``Hq``
query heads and ``Hk`` key heads of those tokens, ``BLOCK_H`` heads at a time; every tensor is
addressed through its own strides, so the usual transposed views of ``(B, T, H, D)`` projections
are read in place.  Rotate-half rows are read as two contiguous
halves; interleaved rows as one contiguous row whose pairs are split in registers, so both layouts
load wide vectors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .common import INTERPRET, cast_rne, check_same, check_tensor, compilable, count_launch, use_triton

MAX_ROTARY_DIM = 256


def supports_rotary_dim(head_dim: int) -> bool:
    """Whether the kernel rotates ``head_dim``: even (pairs), from 2 to ``MAX_ROTARY_DIM``."""
    return head_dim % 2 == 0 and 0 < head_dim <= MAX_ROTARY_DIM


@triton.jit
def _load_pairs(ptrs, stride_d, mask, half, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # The two members of every pair of the rows at ``ptrs`` (any leading shape), as float32.
    pairs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        # One contiguous load of the whole row (wide vectors), then pairs (2i, 2i + 1) are split
        # in registers: two stride-2 loads would move the same bytes two at a time.
        dims = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.load(ptrs + dims * stride_d, mask=mask & (dims < 2 * half), other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, x.shape[:-1] + [BLOCK_HALF, 2]))
    else:
        pair_mask = mask & (pairs < half)  # D / 2 need not be a power of two
        x1 = tl.load(ptrs + pairs * stride_d, mask=pair_mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + (pairs + half) * stride_d, mask=pair_mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_pairs(ptrs, stride_d, mask, half, y1, y2, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    dtype = ptrs.dtype.element_ty
    pairs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        dims = tl.arange(0, 2 * BLOCK_HALF)
        y = tl.reshape(tl.join(cast_rne(y1, dtype), cast_rne(y2, dtype)), y1.shape[:-1] + [2 * BLOCK_HALF])
        tl.store(ptrs + dims * stride_d, y, mask=mask & (dims < 2 * half))
    else:
        pair_mask = mask & (pairs < half)
        tl.store(ptrs + pairs * stride_d, cast_rne(y1, dtype), mask=pair_mask)
        tl.store(ptrs + (pairs + half) * stride_d, cast_rne(y2, dtype), mask=pair_mask)


@triton.jit
def _rotate_heads(
    X, OUT, n_heads, half, b, t, token_mask, c1, c2, s1, s2,
    sx_b, sx_h, sx_t, sx_d, so_b, so_h, so_t, so_d,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Tiles are [tokens, heads, pairs]; c1..s2 arrive as [tokens, 1, pairs] and broadcast over heads.
    x_token = (b * sx_b + t * sx_t)[:, None, None]
    o_token = (b * so_b + t * so_t)[:, None, None]
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = token_mask[:, None, None] & (heads < n_heads)[None, :, None]
        x_ptrs = X + x_token + (heads * sx_h)[None, :, None]
        x1, x2 = _load_pairs(x_ptrs, sx_d, mask, half, INTERLEAVED, BLOCK_HALF)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        o_ptrs = OUT + o_token + (heads * so_h)[None, :, None]
        _store_pairs(o_ptrs, so_d, mask, half, y1, y2, INTERLEAVED, BLOCK_HALF)


@triton.jit
def rope_kernel(
    Q, K, COS, SIN, QO, KO,
    n_tokens, T, Hq, Hk,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sqo_b, sqo_h, sqo_t, sqo_d,
    sko_b, sko_h, sko_t, sko_d,
    sc_b, sc_t, sc_d,
    ss_b, ss_t, ss_d,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # HALF = D / 2 is a constant so that masks and second-half offsets keep 16-byte alignment when
    # D / 2 is not a multiple of 16 (e.g. D = 80): as a runtime value it made every load scalar.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    b, t = tokens // T, tokens % T
    # This token block's cos/sin, loaded once for all q and k heads: [tokens, 1, pairs].
    cos_ptrs = (COS + b * sc_b + t * sc_t)[:, None]
    sin_ptrs = (SIN + b * ss_b + t * ss_t)[:, None]
    c1, c2 = _load_pairs(cos_ptrs, sc_d, token_mask[:, None], HALF, INTERLEAVED, BLOCK_HALF)
    s1, s2 = _load_pairs(sin_ptrs, ss_d, token_mask[:, None], HALF, INTERLEAVED, BLOCK_HALF)
    c1, c2, s1, s2 = c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :]
    _rotate_heads(
        Q, QO, Hq, HALF, b, t, token_mask, c1, c2, s1, s2,
        sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d, INTERLEAVED, BACKWARD, BLOCK_HALF, BLOCK_H,
    )
    _rotate_heads(
        K, KO, Hk, HALF, b, t, token_mask, c1, c2, s1, s2,
        sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d, INTERLEAVED, BACKWARD, BLOCK_HALF, BLOCK_H,
    )


def _launch_config(n_tokens: int, hq: int, hk: int, half: int):
    """(BLOCK_T, BLOCK_HALF, BLOCK_H, num_warps): tiles of ``[BLOCK_T tokens, BLOCK_H heads, pairs]``.

    A load is a 16-byte vector only if each thread holds 8 contiguous half-precision elements of
    its tile, so q and k use tiles of one size, about 2k pairs for 8 warps: ``BLOCK_H`` covers the
    smaller head count (k's 8 heads at LLaMA-3-8B), q's heads take several steps, and a program
    takes as many tokens as fill the tile (4 at D = 128), loading their cos/sin once for all heads.
    Sizing each tile to its own head count instead gave q 32 heads x 64 pairs and k a quarter of
    that, i.e. 4-byte loads of k.  Warps follow the tile (8 elements per thread), so a decode step's
    small tiles still load wide.  Under the interpreter, whose cost is per program and per loop
    step, tiles grow to about 8k pairs.
    """
    block_half = triton.next_power_of_2(half)
    target = 8192 if INTERPRET else 2048
    heads_per_tile = max(1, target // block_half)
    block_h = min(triton.next_power_of_2(max(min(hq, hk), 1)), heads_per_tile)
    block_t = max(1, min(64, heads_per_tile // block_h, triton.next_power_of_2(n_tokens)))
    num_warps = min(8, max(1, block_t * block_h * block_half // (8 * 32)))
    return block_t, block_half, block_h, num_warps


def _cos_sin_strides(x: torch.Tensor):
    # (batch, token, dim) strides; a (T, D) table or a batch of one is shared by every batch.
    if x.dim() == 2 or x.shape[0] == 1:
        return 0, x.stride(-2), x.stride(-1)
    return x.stride(0), x.stride(1), x.stride(2)


def _fake(q, k, cos, sin, interleaved, backward, out_dtype):
    return torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)


@compilable("rope", _fake)
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
    backward: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation (``backward=True``: its transpose) of ``q`` and ``k``: one kernel for both.

    The outputs are new tensors laid out like ``q`` and ``k``, in ``out_dtype`` (the math is float32
    whatever the input dtypes, with one rounding to it)."""
    q_out, k_out = _fake(q, k, cos, sin, interleaved, backward, out_dtype)
    batch, hq, seq, dim = q.shape
    hk = k.shape[1]
    n_tokens = batch * seq
    if n_tokens == 0 or hq + hk == 0:
        return q_out, k_out
    block_t, block_half, block_h, num_warps = _launch_config(n_tokens, hq, hk, dim // 2)
    rope_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, cos, sin, q_out, k_out,
        n_tokens, seq, hq, hk,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *_cos_sin_strides(cos), *_cos_sin_strides(sin),
        INTERLEAVED=interleaved, BACKWARD=backward, HALF=dim // 2,
        BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    count_launch(rope_kernel)
    return q_out, k_out


def _table_grads(dq, dk, q, k, cos, sin, interleaved):
    """Gradients of ``cos`` and ``sin``, in eager PyTorch (float32, one rounding to each table's dtype).

    ``dcos = sum over heads of dy * x`` and ``dsin = sum over heads of dy * rotate(x)``, over q and k,
    then over the batch where the table is shared by it ((T, D) or (1, T, D)).  Only trainable
    tables (learned or scaled RoPE) need this, so it is not worth a kernel.
    """
    rotate = reference.rotate_pairs if interleaved else reference.rotate_half
    dq, dk, q, k = dq.float(), dk.float(), q.float(), k.float()
    grads = []
    for table, contributions in ((cos, (dq * q, dk * k)), (sin, (dq * rotate(q), dk * rotate(k)))):
        g = contributions[0].sum(1) + contributions[1].sum(1)  # (B, T, D)
        if table.dim() == 2:
            g = g.sum(0)
        elif table.shape[0] != g.shape[0]:  # a batch of one, broadcast
            g = g.sum(0, keepdim=True)
        grads.append(g.to(table.dtype))
    return grads


class RotaryFunction(torch.autograd.Function):
    """Autograd of ``apply_rotary``: the backward of q and k is the transposed rotation, for which
    cos/sin suffice; q and k are saved too only when cos or sin needs a gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved):
        table_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(cos, sin, q if table_grad else None, k if table_grad else None)
        ctx.interleaved, ctx.in_dtype = interleaved, q.dtype
        return rope(q, k, cos, sin, interleaved, False, _out_dtype(q, cos, sin))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, q, k = ctx.saved_tensors
        dcos = dsin = dq_in = dk_in = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = _table_grads(dq, dk, q, k, cos, sin, ctx.interleaved)
            dcos = dcos if ctx.needs_input_grad[2] else None
            dsin = dsin if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # q and k get their gradients in their own dtype (eager casts them back the same way).
            dq_in, dk_in = rope(dq, dk, cos, sin, ctx.interleaved, True, ctx.in_dtype)
        return dq_in, dk_in, dcos, dsin, None


def _out_dtype(q, cos, sin):
    # x * cos + rotate(x) * sin promotes as eager does: float32 tables (transformers computes them
    # in float32 under autocast) with half-precision q give float32 outputs.
    return torch.promote_types(q.dtype, torch.promote_types(cos.dtype, sin.dtype))


def _check_cos_sin(name, t, q):
    batch, _, seq, dim = q.shape
    check_tensor(name, t)
    allowed = [(seq, dim), (batch, seq, dim), (1, seq, dim)]
    if tuple(t.shape) not in allowed:
        raise ValueError(
            f"{name} must have shape (B, T, D) = {(batch, seq, dim)} or (T, D) = {(seq, dim)} to "
            f"match q {tuple(q.shape)} (B = 1 broadcasts over the batch); got {tuple(t.shape)}"
        )
    check_same("device", q=q, **{name: t})


def apply_rotary(q, k, cos, sin, interleaved=False):
    """Rotary embedding of ``q (B, Hq, T, D)`` and ``k (B, Hk, T, D)``: returns ``(q_rot, k_rot)``.

    ``x_rot = x * cos + rotate_half(x) * sin`` (transformers' convention) or, with
    ``interleaved=True``, with ``rotate_pairs`` (pairs ``2i, 2i + 1``: Meta's checkpoints).  ``q``
    and ``k`` may have any strides (typically transposed views of ``(B, T, H, D)`` projections) and
    different head counts (grouped-query attention); ``D`` is even and at most 256.  ``cos, sin``
    are ``(B, T, D)`` or ``(T, D)`` (a batch of one broadcasts), already sliced for the positions
    of these tokens, of any float dtype: the outputs are in ``torch.promote_types(q.dtype,
    cos.dtype, sin.dtype)``, as eager ``q * cos + rotate_half(q) * sin`` promotes (float32 tables
    with half-precision q, as transformers gives under autocast, give float32 outputs).  The math
    is float32 with one rounding; both outputs come from one kernel launch and are new tensors laid
    out like ``q`` and ``k``.  Differentiable in ``q`` and ``k`` (gradients in their own dtype) and
    in ``cos`` and ``sin`` when they require grad (computed in eager PyTorch: a rare, slow path).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    batch, _, seq, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, dim):
        raise ValueError(
            f"k must have shape (B, Hk, T, D) with q's B = {batch}, T = {seq}, D = {dim}; "
            f"got {tuple(k.shape)}"
        )
    if dim % 2 or dim == 0:
        raise ValueError(f"q's head dim D must be even and positive for the rotation, got {dim}")
    if dim > MAX_ROTARY_DIM:
        raise ValueError(f"q's head dim D must be <= {MAX_ROTARY_DIM}, got {dim}")
    check_same("dtype", q=q, k=k)
    check_same("device", q=q, k=k)
    _check_cos_sin("cos", cos, q)
    _check_cos_sin("sin", sin, q)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if not use_triton("apply_rotary", q.device):
        return reference.apply_rotary(q, k, cos, sin, interleaved)
    return RotaryFunction.apply(q, k, cos, sin, interleaved)
