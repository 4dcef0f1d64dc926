"""RMSNorm, optionally fused with the residual add that precedes it in every LLaMA block.

Forward, for each row ``x`` of length ``N`` (statistics in float32)::

    h    = x + residual                    (fused variant only; rounded to h's dtype, as eager does)
    rstd = 1 / sqrt(mean(h**2) + eps)
    s    = offset + w                      (in float32; offset = 0 by default, 1 for Gemma)
    y    = cast(cast(h * rstd) * s)        casting="llama": transformers' LlamaRMSNorm cast order
                                           (normalised row rounded to h's dtype, then scaled)
    y    = cast(h * rstd * s)              casting="gemma": GemmaRMSNorm / Gemma3RMSNorm, all in
                                           float32 and one rounding at the end

``h`` and ``y`` are in ``x.dtype``, or with a residual of another float dtype (autocast: bfloat16
``x``, float32 residual stream) in ``promote_types(x.dtype, residual.dtype)``, as eager's
``x + residual`` promotes.

Backward, with ``n = h * rstd`` and ``g = dy * s`` (``s = offset + w``; the same for both castings:
the intermediate rounding of "llama" casting passes gradients through unchanged, and ``n`` is never
rounded here)::

    dh = rstd * (g - n * mean(g * n)) (+ the gradient flowing into the returned ``h``)
    dw = sum over rows of dy * n

``dx`` and ``dresidual`` both equal ``dh`` (computed in h's dtype, then each cast to its input's dtype,
as eager autograd does after a promoting add).  ``dw`` is reduced without atomics: each program of the
backward keeps a float32 partial sum over the rows it visits (a persistent loop whose next rows are
fetched while the current ones are reduced: ``tl.range(..., num_stages=3)``, cp.async on Hopper), and
one small kernel sums the few partials per column and rounds once to the weight's dtype
(deterministic run to run).

One program normalises ``BLOCK_M`` whole rows held in registers (``BLOCK_N`` = the hidden size
rounded up to a power of two), so each element is read once and written once; small hidden sizes
pack several rows per program to keep the loads wide.

Rows are addressed through up to three strided levels (:func:`_row_layout`), so per-head q/k norms
read their inputs in place: Qwen3's ``q_proj(x).view(B, T, H, D)`` and Gemma 3's transposed
``(B, H, T, D)`` view of it (three levels: batch, head, token) are normalised over ``D`` without
a copy.  Outputs are contiguous in the input's logical order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    INTERPRET,
    cast_rne,
    check_float_arg,
    check_same,
    check_tensor,
    compilable,
    count_launch,
    merged_row_dims,
    use_triton,
)
from .device import device_limits, first_fit, num_sms

MAX_HIDDEN = 65536  # one row must fit in a program's registers
CASTINGS = ("llama", "gemma")


def _row_layout(x: torch.Tensor):
    """Describe the rows of ``x (..., N)`` by three strided levels, without copying.

    Returns ``(x, n1, n2, s0, s1, s2, s_col)``: row ``r`` of the flattened ``(-1, N)`` view starts
    at ``(r // (n1 * n2)) * s0 + ((r // n2) % n1) * s1 + (r % n2) * s2``.  Leading dims merge where
    their strides allow (as :func:`~.common.row_layout` merges them, one level more), so every
    tensor of up to 4 dims, e.g. the transposed ``(B, H, T, D)`` view of a ``(B, T, H, D)``
    projection, qualifies; anything needing more levels is copied to contiguous first.  Two levels
    put ``n1 = 1`` in the middle, which Triton specialises away: the 2-level address arithmetic.
    """
    merged = merged_row_dims(x)
    if len(merged) > 3:
        return _row_layout(x.contiguous())
    if len(merged) == 3:
        (_, s0), (n1, s1), (n2, s2) = merged
    else:
        merged = [(1, 0)] * (2 - len(merged)) + merged
        (_, s0), (n2, s2) = merged
        n1, s1 = 1, 0
    return x, n1, n2, s0, s1, s2, x.stride(-1)


@triton.jit
def _row_ptrs(base, rows, cols, n1, n2, s0, s1, s2, s_col):
    """Pointers to the ``rows x cols`` tile of a tensor that :func:`_row_layout` described (int64
    offsets: rows x row stride passes 2**31 at training sizes)."""
    rows = rows.to(tl.int64)
    outer = rows // n2
    starts = (outer // n1) * s0 + (outer % n1) * s1 + (rows % n2) * s2
    return base + starts[:, None] + cols[None, :] * s_col


@triton.jit
def rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    M, N, eps, offset,
    x_n1, x_n2, x_s0, x_s1, x_s2, x_sn,
    r_n1, r_n2, r_s0, r_s1, r_s2, r_sn,
    w_sn,
    HAS_RESIDUAL: tl.constexpr, GEMMA_CASTING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x_ptrs = _row_ptrs(X, rows, cols, x_n1, x_n2, x_s0, x_s1, x_s2, x_sn)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # Y and H are contiguous
    if HAS_RESIDUAL:
        r_ptrs = _row_ptrs(R, rows, cols, r_n1, r_n2, r_s0, r_s1, r_s2, r_sn)
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        h = cast_rne(x + r, H.dtype.element_ty)  # the sum eager would store, normalised below
        tl.store(H + out_offsets, h, mask=mask)
        x = h.to(tl.float32)
    mean_square = tl.sum(x * x, axis=1) / N
    # Padding rows (past M) would compute 1 / sqrt(0) = inf with eps = 0, then 0 * inf = NaN: never
    # stored, but noise (interpreter warnings) that would hide a real NaN.  Give them 1.
    mean_square = tl.where(rows < M, mean_square + tl.cast(eps, tl.float32), 1.0)
    rstd = 1.0 / tl.sqrt(mean_square)
    normed = x * rstd[:, None]
    if not GEMMA_CASTING:  # transformers' LlamaRMSNorm rounds the normalised row first
        normed = cast_rne(normed, Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols * w_sn, mask=cols < N, other=0.0).to(tl.float32) + offset
    tl.store(Y + out_offsets, cast_rne(normed * w[None, :], Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def rms_norm_bwd_kernel(
    DY, X, W, RSTD, DH_OUT, DX, DW_PARTIAL,
    M, N, offset,
    dy_n1, dy_n2, dy_s0, dy_s1, dy_s2, dy_sn,
    x_n1, x_n2, x_s0, x_s1, x_s2, x_sn,
    dh_n1, dh_n2, dh_s0, dh_s1, dh_s2, dh_sn,
    w_sn,
    HAS_DH_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols * w_sn, mask=col_mask, other=0.0).to(tl.float32) + offset  # the scale s
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Persistent loop: each program walks every num_programs-th block of rows, so the weight
    # gradient needs one partial per program rather than one per row block.  With NUM_STAGES = 3
    # the next two row blocks' loads are in flight (cp.async into two shared-memory buffers) while
    # this one is reduced; with 2 Triton keeps one buffer and waits for each load before using it.
    for start in tl.range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        dy_ptrs = _row_ptrs(DY, rows, cols, dy_n1, dy_n2, dy_s0, dy_s1, dy_s2, dy_sn)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        x_ptrs = _row_ptrs(X, rows, cols, x_n1, x_n2, x_s0, x_s1, x_s2, x_sn)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        normed = x * rstd[:, None]
        dw += tl.sum(dy * normed, axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - normed * (tl.sum(g * normed, axis=1) / N)[:, None])
        if HAS_DH_OUT:
            dh_ptrs = _row_ptrs(DH_OUT, rows, cols, dh_n1, dh_n2, dh_s0, dh_s1, dh_s2, dh_sn)
            dx += tl.load(dh_ptrs, mask=mask, other=0.0).to(tl.float32)
        dx_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(DX + dx_offsets, cast_rne(dx, DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_mask)


@triton.jit
def rms_norm_dw_kernel(DW_PARTIAL, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # dw[cols] = sum of the P float32 partials (P x N, contiguous), rounded once to DW's dtype.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_mask[None, :]
        total += tl.sum(tl.load(DW_PARTIAL + parts[:, None] * N + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(DW + cols, cast_rne(total, DW.dtype.element_ty), mask=col_mask)


def _launch_config(n: int, element_size: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps): whole rows per program, at least 4k elements per program;
    the warps are counted in threads, so that 64-wide AMD waves halve them (a block holds at most
    1024 threads)."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    if INTERPRET:  # the interpreter's cost is per program: give each one more rows
        block_m = max(1, min(64, 16384 // block_n))
    # The backward holds ~7 float32 values per element in registers (x, dy, w, normed, g, dx, the
    # dw partial): 16 elements per thread fit without spilling (sm_90 compile: <= 210 registers),
    # except for float32 rows of 8k, whose 16 warps cap registers at 128: those get 32 warps.
    per_thread = 8 if element_size == 4 and block_m * block_n >= 8192 else 16
    limits = device_limits(device)
    threads = max(4 * 32, block_m * block_n // per_thread)
    num_warps = limits.warps(min(32, triton.next_power_of_2(max(1, threads // limits.warp_size))))
    return block_m, block_n, num_warps


# The backward's pipelined loads keep 2 buffers x (dy, x, dh) rows in shared memory; a row block
# whose buffers would take more than half the device's shared memory (float32 rows of 8k on an
# H100) would leave one program per SM, better served by a plain loop (NUM_STAGES = 1).
PIPELINE_SHARE = 2


def _out_dtype(x, residual):
    # h = x + residual promotes as eager does (a bfloat16 autocast output plus a float32 stream is
    # float32); y is in h's dtype.
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _fwd_fake(x, weight, residual, eps, offset, casting):
    out = torch.empty(x.shape, dtype=_out_dtype(x, residual), device=x.device)
    h = torch.empty_like(out) if residual is not None else out.new_empty(0)
    return out, h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@compilable("rms_norm_fwd", _fwd_fake)
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float, offset: float,
    casting: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward: returns ``(y, h, rstd)`` (``h`` empty without ``residual``); ``y`` and
    ``h`` are in ``x.dtype`` promoted with ``residual.dtype``; ``offset`` and ``casting`` ("llama"
    or "gemma", validated by :func:`rms_norm`) as there."""
    n = x.shape[-1]
    y = torch.empty(x.shape, dtype=_out_dtype(x, residual), device=x.device)
    h = torch.empty_like(y) if residual is not None else y.new_empty(0)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    m = rstd.numel()
    if m == 0 or n == 0:  # nothing to normalise (rstd of an empty row is never read)
        return y, h, rstd
    block_m, block_n, num_warps = _launch_config(n, y.element_size(), x.device)
    has_residual = residual is not None
    x, *x_strides = _row_layout(x)
    residual, *r_strides = _row_layout(residual) if has_residual else (x, *x_strides)
    rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, residual, weight, y, h, rstd, m, n, eps, offset, *x_strides, *r_strides, weight.stride(0),
        HAS_RESIDUAL=has_residual, GEMMA_CASTING=casting == "gemma", BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    count_launch(rms_norm_fwd_kernel)
    return y, h, rstd


def _bwd_fake(dy, x, weight, rstd, dh_out, offset):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


@compilable("rms_norm_bwd", _bwd_fake)
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    dh_out: Optional[torch.Tensor], offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: returns ``(dx, dweight)``; ``x`` is the normalised input (``h``), the
    scale is ``offset + weight`` (either casting: see the module docstring)."""
    n = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = rstd.numel()
    if m == 0 or n == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_n, num_warps = _launch_config(n, x.element_size(), x.device)
    programs = min(triton.cdiv(m, block_m), 2 * num_sms(x.device))
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    has_dh_out = dh_out is not None
    buffered = 2 * (2 + has_dh_out) * block_m * block_n * x.element_size()
    limits = device_limits(x.device)
    dy, *dy_strides = _row_layout(dy)
    x, *x_strides = _row_layout(x)
    dh_out, *dh_strides = _row_layout(dh_out) if has_dh_out else (dy, *dy_strides)
    args = (dy, x, weight, rstd, dh_out, dx, dw_partial, m, n, offset,
            *dy_strides, *x_strides, *dh_strides, weight.stride(0))
    consts = dict(HAS_DH_OUT=has_dh_out, BLOCK_M=block_m, BLOCK_N=block_n)
    # Pipelined where its buffers fit (the compiled kernel's shared memory), else a plain loop.
    stages = [3, 1] if buffered * PIPELINE_SHARE <= limits.shared_memory else [1]
    config = first_fit(rms_norm_bwd_kernel, args, consts,
                       [{"NUM_STAGES": s, "num_warps": num_warps} for s in stages], limits,
                       f"rms_norm backward (hidden {n})")
    rms_norm_bwd_kernel[(programs,)](*args, **consts, **config)
    count_launch(rms_norm_bwd_kernel)
    return dx, _reduce_dw(dw_partial, weight.dtype)


def _reduce_dw(dw_partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum the ``(programs, N)`` float32 partials over programs, in ``dtype``: one launch."""
    programs, n = dw_partial.shape
    # 64 columns (256 contiguous bytes per partial row) per program: N / 64 programs for a
    # reduction of ~1 MB; the interpreter takes whole rows at once.
    block_n = min(triton.next_power_of_2(n), 4096 if INTERPRET else 64)
    block_p = min(triton.next_power_of_2(programs), 32)
    dw = torch.empty(n, dtype=dtype, device=dw_partial.device)
    rms_norm_dw_kernel[(triton.cdiv(n, block_n),)](dw_partial, dw, programs, n, BLOCK_P=block_p, BLOCK_N=block_n,
                                                   num_warps=4)
    count_launch(rms_norm_dw_kernel)
    return dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd of ``rms_norm``: saves the normalised input and ``rstd``, nothing else."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, casting):
        y, h, rstd = rms_norm_fwd(x, weight, residual, eps, offset, casting)
        has_residual = residual is not None
        ctx.offset = offset
        ctx.has_residual = has_residual
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype if has_residual else None
        ctx.save_for_backward(h if has_residual else x, weight, rstd)
        ctx.set_materialize_grads(False)
        if has_residual:
            ctx.mark_non_differentiable(rstd)
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        x, weight, rstd = ctx.saved_tensors
        if dy is None:  # only h was used downstream
            dy = torch.zeros_like(x)
        dh, dw = rms_norm_bwd(dy, x, weight, rstd, dh_out, ctx.offset)  # in h's (the promoted) dtype
        if not ctx.has_residual:
            return dh, dw, None, None, None, None
        # Each input gets its gradient in its own dtype, as eager autograd casts it after the add.
        return dh.to(ctx.x_dtype), dw, dh.to(ctx.residual_dtype), None, None, None


def rms_norm(x, weight, eps=1e-6, residual=None, *, offset=0.0, casting="llama"):
    """RMSNorm of ``x (..., hidden)`` with ``weight (hidden,)``, statistics in float32.

    Returns ``weight * cast(x * rsqrt(mean(x**2, -1) + eps))`` in ``x.dtype`` (the math and cast order
    of transformers' ``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...; ``weight`` may have any float dtype,
    e.g. float32 with half-precision ``x``: the output stays in ``x.dtype``).

    Keyword options for the rest of the LLaMA family:

    - ``offset`` (float, default 0): scale by ``offset + weight`` (formed in float32) instead of
      ``weight``.  Gemma stores its norm weights as ``w - 1`` (zeros at init) and uses ``offset=1``.
    - ``casting``: ``"llama"`` (default) rounds the normalised row to ``x.dtype`` before scaling it,
      ``cast((offset + weight) * cast(normed))``, as ``LlamaRMSNorm`` does; ``"gemma"`` computes
      ``normed * (offset + weight)`` wholly in float32 and rounds once at the end, as
      ``GemmaRMSNorm`` and ``Gemma3RMSNorm`` do (``rms_norm(x, w, eps, offset=1.0, casting="gemma")``
      is their forward).  In both the output is in ``x.dtype`` and ``weight``'s gradient in
      ``weight``'s dtype, whatever float dtype ``weight`` has.

    Per-head q/k norms (Qwen3, Gemma 3) are this op over the head dim: ``x`` may be the
    ``(B, T, H, D)`` view of a projection or its transposed ``(B, H, T, D)`` view, read in place
    (any tensor whose leading dims merge into three strided levels is; others are copied).  With
    ``residual`` (same shape as ``x``) returns ``(rms_norm(x + residual), x + residual)`` from one
    pass over memory.  ``residual`` may have another float dtype than ``x`` (under autocast ``x`` is
    a bfloat16 linear output and the residual stream float32): the sum promotes as eager ``x +
    residual`` does, and both outputs are in ``torch.promote_types(x.dtype, residual.dtype)``.
    Differentiable in ``x``, ``weight`` and ``residual`` (each gradient in its input's dtype).
    ``eps`` is any finite real number >= 0 and ``offset`` any finite real number (numpy scalars
    included).
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=1)
    eps = check_float_arg("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    offset = check_float_arg("offset", offset)
    if not isinstance(casting, str):
        raise TypeError(f"casting must be a str, one of {CASTINGS}; got {type(casting).__name__}")
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (hidden,) = ({x.shape[-1]},) to match x's last dim; "
            f"got {tuple(weight.shape)}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"x's hidden size must be <= {MAX_HIDDEN}, got {x.shape[-1]}")
    check_same("device", x=x, weight=weight)
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        check_same("device", x=x, residual=residual)
    if not use_triton("rms_norm", x.device):
        return reference.rms_norm(x, weight, eps, residual, offset=offset, casting=casting)
    return RMSNormFunction.apply(x, weight, residual, eps, offset, casting)
