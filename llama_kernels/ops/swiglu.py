"""SwiGLU, the activation of the LLaMA MLP: ``silu(gate) * up``.

Forward, elementwise with ``s = sigmoid(g)`` (math in float32)::

    y = cast(cast(g / (1 + exp(-g))) * u)    (silu rounded to gate's dtype first, as eager does)

Backward, recomputing ``s`` from the saved inputs (only ``gate`` and ``up`` are saved)::

    d_gate = dy * u * s * (1 + g * (1 - s))
    d_up   = dy * g * s                     (g * s computed as g / (1 + exp(-g)))

each rounded once to its input's dtype.  ``gate`` and ``up`` may differ in dtype: ``y`` is then in
``promote_types(gate.dtype, up.dtype)``, as eager ``silu(gate) * up`` promotes.

Division: an IEEE-rounded float32 division (``div_rn``) costs about 15 instructions on the GPU, the
approximate one (``/``: ``div.full.f32``, at most 2 ulp off) a few.  When every result is rounded
to float16/bfloat16 (10 or 7 mantissa bits) a 2-ulp float32 error (23 bits) can change a rounded
result only on a near-tie, far inside the 2x accuracy rule, so half-precision kernels divide
approximately and float32 ones exactly (``EXACT_DIV``).

``gate`` and ``up`` are usually the two halves of one fused projection (``gu.chunk(2, -1)``), so
rows are read through two strided levels (:func:`~.common.row_layout`) and nothing is copied.  One
program covers a ``[BLOCK_M rows, BLOCK_N columns]`` tile of a 2-D grid: each element is read once
and written once, and wide rows (14336) are split across programs instead of being held whole in
registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    INTERPRET,
    cast_rne,
    check_same,
    check_tensor,
    compilable,
    count_launch,
    row_layout,
    row_tile_ptrs,
    use_triton,
)


@triton.jit
def _divide(a, b, EXACT: tl.constexpr):
    # a / b: IEEE-rounded when EXACT (float32 results), else the approximate division (see above).
    if EXACT:
        return tl.div_rn(a, b)
    return a / b


def _exact_div(*tensors) -> bool:
    """Whether a kernel producing ``tensors`` must divide exactly: any result in float32."""
    return any(t.dtype == torch.float32 for t in tensors)


@triton.jit
def swiglu_fwd_kernel(
    G, U, Y,
    M, N,
    g_inner, g_so, g_si, g_sn,
    u_inner, u_so, u_si, u_sn,
    EXACT_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g_ptrs = row_tile_ptrs(G, rows, cols, g_inner, g_so, g_si, g_sn)
    u_ptrs = row_tile_ptrs(U, rows, cols, u_inner, u_so, u_si, u_sn)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    # g / (1 + exp(-g)) rounds twice where g * sigmoid(g) rounds three times (and is what eager
    # computes); exp(-g) = inf for g < -88 gives silu = -0, as it should.  Eager stores silu(g) in
    # gate's dtype before multiplying (in the promoted dtype): round it the same way.
    silu = cast_rne(_divide(g, 1.0 + tl.exp(-g), EXACT_DIV), G.dtype.element_ty).to(tl.float32)
    y_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # Y is contiguous
    tl.store(Y + y_offsets, cast_rne(silu * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    M, N,
    dy_inner, dy_so, dy_si, dy_sn,
    g_inner, g_so, g_si, g_sn,
    u_inner, u_so, u_si, u_sn,
    EXACT_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy_ptrs = row_tile_ptrs(DY, rows, cols, dy_inner, dy_so, dy_si, dy_sn)
    g_ptrs = row_tile_ptrs(G, rows, cols, g_inner, g_so, g_si, g_sn)
    u_ptrs = row_tile_ptrs(U, rows, cols, u_inner, u_so, u_si, u_sn)
    dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    denom = 1.0 + tl.exp(-g)
    s = _divide(1.0, denom, EXACT_DIV)
    d_gate = dy * u * s * (1.0 + g * (1.0 - s))
    d_up = dy * _divide(g, denom, EXACT_DIV)
    out_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # DG and DU are contiguous
    tl.store(DG + out_offsets, cast_rne(d_gate, DG.dtype.element_ty), mask=mask)
    tl.store(DU + out_offsets, cast_rne(d_up, DU.dtype.element_ty), mask=mask)


def _launch_config(m: int, n: int):
    """(grid, BLOCK_M, BLOCK_N, num_warps) for ``m`` rows of ``n`` elements.

    On the GPU a program moves about 4k elements per tensor: up to 1024 columns (16-byte vectors
    per thread; a ragged last column block wastes little: 11008 = 10.75 x 1024) times enough rows.
    Under the interpreter, whose cost is per program, one program takes whole rows, up to 16k
    elements.
    """
    if INTERPRET:
        block_n = min(triton.next_power_of_2(n), 16384)
        block_m = max(1, min(64, 16384 // block_n))
    else:
        block_n = min(triton.next_power_of_2(n), 1024)
        block_m = max(1, min(64, 4096 // block_n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    num_warps = 4 if block_m * block_n <= 2048 else 8
    return grid, block_m, block_n, num_warps


def _fwd_fake(gate, up):
    dtype = torch.promote_types(gate.dtype, up.dtype)  # eager's silu(gate) * up promotes
    return torch.empty(gate.shape, dtype=dtype, device=gate.device)


@compilable("swiglu_fwd", _fwd_fake)
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward: returns ``silu(gate) * up``, a new contiguous tensor in the promoted dtype."""
    y = _fwd_fake(gate, up)
    if y.numel() == 0:
        return y
    n = gate.shape[-1]
    m = y.numel() // n
    grid, block_m, block_n, num_warps = _launch_config(m, n)
    gate, *g_strides = row_layout(gate)
    up, *u_strides = row_layout(up)
    swiglu_fwd_kernel[grid](
        gate, up, y, m, n, *g_strides, *u_strides,
        EXACT_DIV=_exact_div(y), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    count_launch(swiglu_fwd_kernel)
    return y


def _bwd_fake(dy, gate, up):
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


@compilable("swiglu_bwd", _bwd_fake)
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: returns ``(d_gate, d_up)``, new contiguous tensors."""
    d_gate, d_up = _bwd_fake(dy, gate, up)
    if d_gate.numel() == 0:
        return d_gate, d_up
    n = gate.shape[-1]
    m = d_gate.numel() // n
    grid, block_m, block_n, num_warps = _launch_config(m, n)
    dy, *dy_strides = row_layout(dy)
    gate, *g_strides = row_layout(gate)
    up, *u_strides = row_layout(up)
    swiglu_bwd_kernel[grid](
        dy, gate, up, d_gate, d_up, m, n, *dy_strides, *g_strides, *u_strides,
        EXACT_DIV=_exact_div(d_gate, d_up), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    count_launch(swiglu_bwd_kernel)
    return d_gate, d_up


class SwiGLUFunction(torch.autograd.Function):
    """Autograd of ``swiglu``: saves ``gate`` and ``up`` (views, no copies) and recomputes the rest."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu(gate, up):
    """``silu(gate) * up`` for ``gate, up (..., N)`` of the same shape.

    ``gate`` and ``up`` may be any strided views, in particular the two halves of one fused
    projection (``gate, up = gu.chunk(2, -1)``): they are read in place, not copied.  Returns a
    new contiguous tensor of ``gate``'s shape and dtype, rounded as eager PyTorch rounds
    (``silu(gate)`` to the input dtype, then the product).  ``gate`` and ``up`` may also differ in
    dtype: the output is then in ``torch.promote_types(gate.dtype, up.dtype)`` (eager's promotion,
    ``silu(gate)`` still rounded to gate's dtype first).  Differentiable in ``gate`` and ``up``
    (each gradient in its input's dtype).
    """
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up, min_ndim=1)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same("device", gate=gate, up=up)
    if not use_triton("swiglu", gate.device):
        return reference.swiglu(gate, up)
    return SwiGLUFunction.apply(gate, up)
