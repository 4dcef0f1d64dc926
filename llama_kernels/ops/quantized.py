"""Weight-only quantised linear: ``y = x @ W.T + b`` with ``W`` stored in 8 or 4 bits and
dequantised inside the matmul's loop, never in memory.

Formats (``W`` is ``(N, K)``: ``N`` output features, ``K`` input features)::

    int8:  W[n, k] = q[n, k] * s[n]                    q int8 in [-127, 127], one scale per row
    int4:  W[n, k] = (q[n, k] - z[n, g]) * s[n, g]     q, z in [0, 15], g = k // G (groups of G
                                                       input features), two q per byte:
                                                       byte[n, j] = q[n, 2j] | q[n, 2j + 1] << 4

Scales are floating point (the model's dtype, as quantised), zero points ``uint8``.

Forward.  ``q`` and ``q - z`` are integers of at most 8 bits, exact in bfloat16 and float16, so
the kernel multiplies the activations by them on the tensor cores with exact products and float32
sums, and applies the scale afterwards, once per output column and group::

    int8:  y[m, n] = s[n] * sum_k x[m, k] q[n, k]
    int4:  y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] (q[n, k] - z[n, g])

then adds the bias in float32 and rounds once to ``x``'s dtype.  Eager PyTorch rounds the
dequantised weight to ``x``'s dtype first (a second rounding): this is closer to the float64 matmul
of the dequantised weight.  A K-tile never spans two groups (``BLOCK_K`` divides ``G``).

Schedules.  Decode (at most 16 rows) reads every weight once per token: a 16-row tile (the
smallest a tensor-core dot takes) against narrow column blocks, and split-K, so that the
``N / BLOCK_N`` column blocks times ``SPLIT`` programs fill every multiprocessor; each split writes
float32 partial sums and a second kernel adds them (in a fixed order: deterministic), the bias, and
rounds.  Prefill and training take 64- or 128-row tiles, split only while the grid is too small to
fill the device.

Backward to the activations (the weights are frozen): ``dx = dy @ W``, the sum over ``n``, along
which scales change, so the weight tile is dequantised in float32 and split into two half-precision
terms, ``W = hi + lo`` (``hi`` = W rounded, ``lo`` = the rest rounded: 16 significant bits)::

    dx[m, k] = sum_n dy[m, n] hi[n, k] + sum_n dy[m, n] lo[n, k]

two tensor-core dots with exact products, float32 sums and one rounding, where eager's
``dy @ W.to(dtype)`` rounds the weight first.  Float32 inputs take IEEE float32 dots (never TF32);
under Triton's interpreter every dot is in float32 (``device.dot_mode``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    FLOAT_DTYPES,
    INTERPRET,
    autocast_inputs,
    cast_rne,
    check_same,
    check_tensor,
    compilable,
    count_launch,
    row_layout,
    row_tile_ptrs,
    use_triton,
    values_readable,
)
from .device import NoFittingConfig, config_fits, device_limits, dot_mode, first_fit
from .options import current as current_options

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups of input features (powers of two: BLOCK_K divides them)
INT8_MAX = 127
INT4_MAX = 15
DEFAULT_GROUP_SIZE = 128  # int4 (gpt-fast's and torchao's default)
# The decode schedule's rows: at most one tensor-core tile of 16.
DECODE_ROWS = 16


@triton.jit
def _weight_tile(Q, Z, cols, ks, group, col_mask, k_mask, stride_qn, stride_qk, stride_zn, BITS: tl.constexpr):
    """The ``[len(ks), len(cols)]`` tile of ``q`` (int8) or ``q - z`` (int4, the K-tile inside
    ``group``) as float32 integers; masked entries of ``q`` are 0 (their ``x`` is 0 too)."""
    mask = k_mask[:, None] & col_mask[None, :]
    cols64 = cols.to(tl.int64)
    if BITS == 8:
        q = tl.load(Q + cols64[None, :] * stride_qn + ks[:, None] * stride_qk, mask=mask, other=0)
        return q.to(tl.float32)
    packed = tl.load(Q + cols64[None, :] * stride_qn + (ks // 2)[:, None] * stride_qk, mask=mask, other=0)
    q = (packed.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 0xF
    z = tl.load(Z + cols64 * stride_zn + group, mask=col_mask, other=0).to(tl.int32)
    return (q - z[None, :]).to(tl.float32)


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, HALF: tl.constexpr):
    # a @ b with float32 sums: float32 operands (IEEE) or operands in HALF (exact here: see above).
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a.to(HALF), b.to(HALF), input_precision=PRECISION)


@triton.jit
def quantized_linear_fwd_kernel(
    X, Q, S, Z, BIAS, OUT,
    M, N, K, k_per_split,
    x_inner, x_so, x_si, x_sk,
    stride_qn, stride_qk, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One [BLOCK_M, BLOCK_N] output tile over the input features [k_begin, k_begin + k_per_split).
    # OUT: the output (SPLIT == 1), else float32 partial sums (SPLIT, M, N).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    k_begin = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x = tl.load(row_tile_ptrs(X, rows, ks, x_inner, x_so, x_si, x_sk),
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        group = k0 // GROUP
        w = _weight_tile(Q, Z, cols, ks, group, col_mask, k_mask, stride_qn, stride_qk, stride_zn, BITS)
        part = _dot(x, w, DOT_IN_FP32, PRECISION, X.dtype.element_ty)
        if BITS == 4:  # this tile's group scale, per output column
            s = tl.load(S + cols.to(tl.int64) * stride_sn + group, mask=col_mask, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
        else:
            acc += part
    if BITS == 8:
        acc *= tl.load(S + cols * stride_sn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + offsets, cast_rne(acc, OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + tl.program_id(2).to(tl.int64) * M * N + offsets, acc, mask=mask)


@triton.jit
def quantized_linear_reduce_kernel(PARTIAL, BIAS, OUT, M, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # OUT = round(sum over the splits of PARTIAL (SPLIT, M, N), in order, + bias).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    partial = PARTIAL + offsets
    for _ in range(SPLIT):  # pointer steps of M * N: 64-bit, whatever the split's size
        acc += tl.load(partial, mask=mask, other=0.0)
        partial += M * N
    if HAS_BIAS:
        acc += tl.load(BIAS + offsets % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, cast_rne(acc, OUT.dtype.element_ty), mask=mask)


@triton.jit
def quantized_linear_bwd_kernel(
    DY, Q, S, Z, DX,
    M, N, K,
    dy_inner, dy_so, dy_si, dy_sn,
    stride_qn, stride_qk, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One [BLOCK_M, BLOCK_K] tile of dx = dy @ W, summing over the N output features.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask, k_mask = rows < M, ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        dy = tl.load(row_tile_ptrs(DY, rows, ns, dy_inner, dy_so, dy_si, dy_sn),
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        # The dequantised [BLOCK_N, BLOCK_K] tile of W in float32: scales along both axes.
        mask = n_mask[:, None] & k_mask[None, :]
        ns64 = ns.to(tl.int64)
        if BITS == 8:
            q = tl.load(Q + ns64[:, None] * stride_qn + ks[None, :] * stride_qk, mask=mask, other=0)
            s = tl.load(S + ns * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s[:, None]
        else:
            packed = tl.load(Q + ns64[:, None] * stride_qn + (ks // 2)[None, :] * stride_qk, mask=mask, other=0)
            q = (packed.to(tl.int32) >> ((ks % 2) * 4)[None, :]) & 0xF
            groups = ns64[:, None] * stride_sn + (ks // GROUP)[None, :]
            s = tl.load(S + groups, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(Z + ns64[:, None] * stride_zn + (ks // GROUP)[None, :], mask=mask, other=0)
            w = (q - z.to(tl.int32)).to(tl.float32) * s
        if DOT_IN_FP32:
            acc += tl.dot(dy.to(tl.float32), w, input_precision=PRECISION)
        else:  # W = hi + lo, each exact as an operand in dy's dtype: two dots, exact products
            hi = w.to(DY.dtype.element_ty)
            lo = (w - hi.to(tl.float32)).to(DY.dtype.element_ty)
            acc += tl.dot(dy, hi, input_precision=PRECISION)
            acc += tl.dot(dy, lo, input_precision=PRECISION)
    offsets = rows.to(tl.int64)[:, None] * K + ks[None, :]  # DX is contiguous
    tl.store(DX + offsets, cast_rne(acc, DX.dtype.element_ty), mask=row_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------------
class QuantizedWeight(NamedTuple):
    """A quantised ``(N, K)`` weight: the arguments :func:`~llama_kernels.ops.quantized.quantized_linear`
    takes (``zeros`` None and ``group_size`` None for int8)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int]


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")


def check_format(bits, group_size) -> Optional[int]:
    """``group_size`` as used for ``bits`` (int4's default filled in); errors name the argument."""
    _check_bits(bits)
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"group_size must be None for bits=8 (one scale per output row), got {group_size!r}")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for bits=4, got {group_size!r}")
    return group_size


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: Optional[int] = None) -> QuantizedWeight:
    """Round-to-nearest quantisation of a ``(N, K)`` floating-point weight::

        int8:  s[n] = max_k |W[n, k]| / 127,          q = clamp(round(W / s), -127, 127)
        int4:  per group of G input features, lo = min(W, 0), hi = max(W, 0):
               s = (hi - lo) / 15,  z = clamp(round(-lo / s), 0, 15),  q = clamp(round(W / s) + z, 0, 15)

    with ``q`` computed from the stored (rounded) scale.

    ``bits=4`` needs ``K`` divisible by ``group_size`` (32, 64, 128 or 256; default 128).  Scales
    keep ``weight``'s dtype.  Refuses non-finite weights.  Works on meta and fake tensors (shapes
    only), so quantised models can be planned and measured at any size.
    """
    group_size = check_format(bits, group_size)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    n, k = weight.shape
    if bits == 4 and k % group_size:
        raise ValueError(f"weight has {k} input features, not a multiple of group_size {group_size}")
    if values_readable(weight) and weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values (inf or NaN): they cannot be quantised")
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(compute)
    if bits == 8:
        scales = (w.abs().amax(dim=1) / INT8_MAX).to(weight.dtype)
        s = _nonzero(scales.to(compute))
        q = torch.round(w / s[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedWeight(q, scales, None, 8, None)
    w = w.view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / INT4_MAX).to(weight.dtype)
    s = _nonzero(scales.to(compute))
    zeros = torch.round(-lo / s).clamp(0, INT4_MAX)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, INT4_MAX).to(torch.uint8).view(n, k // 2, 2)
    packed = q[..., 0] | (q[..., 1] << 4)
    return QuantizedWeight(packed, scales, zeros.to(torch.uint8), 4, group_size)


def _nonzero(scale):
    # A row or group of zeros gets scale 0 (it dequantises to zeros); divide by 1 there instead.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------
def _cap(size: int) -> int:
    # The largest useful block along a dimension of ``size``: its power of two, at least a dot's 16.
    return max(16, triton.next_power_of_2(size))


def _tile(caps, block_m, block_n, block_k, num_warps, num_stages) -> dict:
    """A launch configuration, its blocks capped at ``caps`` (M, N, K)."""
    cap_m, cap_n, cap_k = caps
    return dict(BLOCK_M=min(block_m, cap_m), BLOCK_N=min(block_n, cap_n), BLOCK_K=min(block_k, cap_k),
                num_warps=num_warps, num_stages=num_stages)


def _fwd_candidates(m: int, n: int, k: int, bits: int, group: int) -> list:
    """Tiles of the forward in order of preference (``first_fit`` keeps the first that fits).

    Decode (``m <= 16``): 16 rows, narrow column blocks, 8 warps; int8 long K-tiles (a weight tile
    of 16 KB per pipeline stage), int4 K-tiles of 64 (2 KB): ``_weight_tile`` loads packed int4
    weights with a scalar byte load per element (two under Triton 3.6), and more than 16 elements
    per thread spill (16 x 64 x 128 on 4 warps spilled ~1.9 KB on sm_90 and sm_120 under 3.6).
    Prefill: int8 128 x 128 x 64, int4 128 x 64 x 32 in 2 stages (its per-group ``acc += part * s``
    keeps two float32 tiles live: 128 x 128 spilled on sm_100 and sm_120, 128 x 64 x 64 on sm_100
    under 3.6, 3 stages 8 bytes on sm_86 and sm_89 under 3.9).
    int4 K-tiles divide the group.  The first choices compile spill-free in half precision on every
    target of ``tools/compile_matrix.py`` under Triton 3.6 and 3.9.  Under the interpreter, whose
    cost is per program, tiles are large.
    """
    tile = functools.partial(_tile, (_cap(m), _cap(n), group if bits == 4 else _cap(k)))
    if INTERPRET:
        return [tile(64, 64, 128, 4, 1)]
    if m <= DECODE_ROWS:
        if bits == 4:
            return [tile(16, 64, 64, 8, 3), tile(16, 32, 32, 4, 1)]
        return [tile(16, 64, 256, 8, 3), tile(16, 64, 128, 4, 3), tile(16, 32, 128, 4, 2), tile(16, 32, 64, 4, 1)]
    if bits == 4:
        return [tile(128, 64, 32, 8, 2), tile(64, 64, 32, 4, 2), tile(32, 32, 32, 4, 1)]
    return [tile(128, 128, 64, 8, 3), tile(64, 128, 64, 4, 3), tile(64, 64, 64, 4, 2), tile(32, 32, 32, 4, 1)]


def _bwd_candidates(m: int, n: int, k: int) -> list:
    """Tiles of the backward (``[BLOCK_M, BLOCK_K]`` of dx, ``BLOCK_N`` of the reduction), in order.

    The dequantised float32 weight tile and its ``hi``/``lo`` halves are live with the accumulator:
    128 x 64 x 128 spilled (int8) on sm_80, sm_86, sm_89 and sm_120, so prefill takes 128 rows x 64
    features with 32-wide steps of the reduction; at most 16 rows, 16 x 128 with 64-wide steps."""
    tile = functools.partial(_tile, (_cap(m), _cap(n), _cap(k)))
    if INTERPRET:
        return [tile(64, 64, 64, 4, 1)]
    if m <= DECODE_ROWS:
        return [tile(16, 64, 128, 8, 3), tile(16, 32, 64, 4, 2)]
    return [tile(128, 32, 64, 8, 3), tile(64, 32, 64, 4, 2), tile(32, 32, 32, 4, 1)]


def _split_k(m_blocks: int, n_blocks: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """``(SPLIT, k_per_split)``: programs per output tile and the input features each reduces.

    The ``quantized_split_k`` option, else enough splits that the grid holds two programs per
    multiprocessor, each split at least two K-tiles long (one on the interpreter); ``k_per_split``
    is a whole number of K-tiles, so that int4 tiles stay inside their groups."""
    k_blocks = triton.cdiv(k, block_k)
    forced = current_options().quantized_split_k
    if forced is not None:
        split = min(forced, k_blocks)
    else:
        programs = m_blocks * n_blocks
        wanted = triton.cdiv(2 * device_limits(device).multiprocessors, programs)
        split = max(1, min(wanted, k_blocks if INTERPRET else k_blocks // 2))
    blocks_per_split = triton.cdiv(k_blocks, split)
    return triton.cdiv(k_blocks, blocks_per_split), blocks_per_split * block_k


def _fwd_fake(x, qweight, scales, zeros, bias, bits, group_size):
    return torch.empty((*x.shape[:-1], qweight.shape[0]), dtype=x.dtype, device=x.device)


def _fwd_launch(args_for, m, n, k, x, y, bits, group_size, has_bias: bool):
    """``(grid, constexprs, config, k_per_split)`` of the forward: the first tile of
    :func:`_fwd_candidates` that fits the device, compiled with its own split (the split changes the
    epilogue: float32 partial sums instead of the rounded output).  ``args_for(out, k_per_split)``:
    the kernel's arguments."""
    dot_in_fp32, precision = dot_mode(x.dtype, x.device)
    consts = dict(BITS=bits, GROUP=max(group_size, 1), HAS_BIAS=has_bias, PRECISION=precision,
                  DOT_IN_FP32=dot_in_fp32 or x.dtype == torch.float32)
    limits = device_limits(x.device)
    configs = _fwd_candidates(m, n, k, bits, group_size)
    for config in configs:
        split, k_per_split = _split_k(triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), k,
                                      config["BLOCK_K"], x.device)
        out = y if split == 1 else y.new_empty(0, dtype=torch.float32)  # only its dtype is compiled
        if config_fits(quantized_linear_fwd_kernel, args_for(out, k_per_split), {**consts, "SPLIT": split},
                       config, limits):
            grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), split)
            return grid, {**consts, "SPLIT": split}, config, k_per_split
    raise NoFittingConfig(f"llama_kernels: no launch configuration of quantized_linear (int{bits}, {m}x{k} @ "
                          f"{k}x{n}) fits {limits.arch} ({limits.shared_memory} bytes of shared memory per block); "
                          f"tried {configs}")


@compilable("quantized_linear_fwd", _fwd_fake)
def quantized_linear_fwd(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """Launch the forward (arguments checked by :func:`quantized_linear`; ``group_size`` 0 for
    int8): returns ``x @ W.T + bias``, a new contiguous tensor in ``x``'s dtype."""
    y = _fwd_fake(x, qweight, scales, zeros, bias, bits, group_size)
    if y.numel() == 0:
        return y
    m, n, k = y.numel() // y.shape[-1], y.shape[-1], x.shape[-1]
    zeros = scales if zeros is None else zeros  # int8: never read
    bias_arg = y if bias is None else bias
    x, *x_strides = row_layout(x)
    weight_strides = (qweight.stride(0), qweight.stride(1), scales.stride(0), zeros.stride(0))

    def args_for(out, k_per_split):
        return (x, qweight, scales, zeros, bias_arg, out, m, n, k, k_per_split, *x_strides, *weight_strides)

    grid, consts, config, k_per_split = _fwd_launch(args_for, m, n, k, x, y, bits, group_size, bias is not None)
    split = consts["SPLIT"]
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    quantized_linear_fwd_kernel[grid](*args_for(out, k_per_split), **consts, **config)
    count_launch(quantized_linear_fwd_kernel)
    if split > 1:
        block = 1024
        quantized_linear_reduce_kernel[(triton.cdiv(m * n, block),)](
            out, bias_arg, y, m, n, split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
        count_launch(quantized_linear_reduce_kernel)
    return y


def _bwd_fake(dy, qweight, scales, zeros, bits, group_size, in_features):
    return torch.empty((*dy.shape[:-1], in_features), dtype=dy.dtype, device=dy.device)


@compilable("quantized_linear_bwd", _bwd_fake)
def quantized_linear_bwd(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Launch the backward to the activations: returns ``dy @ W`` (``W`` dequantised), a new
    contiguous tensor in ``dy``'s dtype."""
    dx = _bwd_fake(dy, qweight, scales, zeros, bits, group_size, in_features)
    n, k = dy.shape[-1], in_features
    m = dx.numel() // max(k, 1)
    if dx.numel() == 0:
        return dx
    if n == 0:
        return dx.zero_()
    dy2, *dy_strides = row_layout(dy)
    dot_in_fp32, precision = dot_mode(dy.dtype, dy.device)
    zeros_arg = scales if zeros is None else zeros
    consts = dict(BITS=bits, GROUP=max(group_size, 1), DOT_IN_FP32=dot_in_fp32 or dy.dtype == torch.float32,
                  PRECISION=precision)
    args = (dy2, qweight, scales, zeros_arg, dx, m, n, k, *dy_strides,
            qweight.stride(0), qweight.stride(1), scales.stride(0), zeros_arg.stride(0))
    config = first_fit(quantized_linear_bwd_kernel, args, consts, _bwd_candidates(m, n, k), device_limits(dy.device),
                       f"quantized_linear backward (int{bits}, {m}x{n} @ {n}x{k})")
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(k, config["BLOCK_K"]))
    quantized_linear_bwd_kernel[grid](*args, **consts, **config)
    count_launch(quantized_linear_bwd_kernel)
    return dx


class QuantizedLinearFunction(torch.autograd.Function):
    """Autograd of :func:`quantized_linear`: the weights are frozen buffers (saved as they are, no
    copies); gradients go to ``x`` (the backward kernel) and ``bias`` (eager's ``dy.sum``)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, bias, bits, group_size):
        ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, x.shape[-1]
        ctx.save_for_backward(qweight, scales, zeros)
        return quantized_linear_fwd(x, qweight, scales, zeros, bias, bits, group_size)

    @staticmethod
    def backward(ctx, dy):
        qweight, scales, zeros = ctx.saved_tensors
        dx = d_bias = None
        if ctx.needs_input_grad[0]:
            dx = quantized_linear_bwd(dy, qweight, scales, zeros, ctx.bits, ctx.group_size, ctx.in_features)
        if ctx.needs_input_grad[4]:
            d_bias = dy.reshape(-1, dy.shape[-1]).sum(0)  # what linear's backward computes
        return dx, None, None, None, d_bias, None, None


def check_quantized_weight(qweight, scales, zeros, *, bits, group_size, in_features=None) -> int:
    """Validate a quantised weight (see :func:`quantized_linear`); returns its input features ``K``.
    Errors name the argument."""
    _check_bits(bits)
    if bits == 8:
        check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int8,))
        if group_size is not None:
            raise ValueError("group_size must be None for 8-bit weights (one scale per output row), "
                             f"got {group_size!r}")
        if zeros is not None:
            raise ValueError("zeros must be None for 8-bit weights (they are symmetric)")
        n, k = qweight.shape
        check_tensor("scales", scales, ndim=1)
        if scales.shape[0] != n:
            raise ValueError(f"scales must have shape ({n},) (one per output row of qweight), "
                             f"got {tuple(scales.shape)}")
    else:
        check_tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,))
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} for 4-bit weights, got {group_size!r}")
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        if k % group_size:
            raise ValueError(f"4-bit qweight holds {k} input features, not a multiple of group_size {group_size}")
        groups = (n, k // group_size)
        check_tensor("scales", scales, ndim=2)
        check_tensor("zeros", zeros, ndim=2, dtypes=(torch.uint8,))
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != groups:
                raise ValueError(f"{name} must have shape {groups} (output rows x groups of {group_size}), "
                                 f"got {tuple(t.shape)}")
    if in_features is not None and in_features != k:
        raise ValueError(f"x has {in_features} features, but the quantised weight takes {k}")
    if torch.is_grad_enabled() and (scales.requires_grad or qweight.requires_grad):
        raise ValueError("the quantised weight is frozen: scales must not require grad")
    check_same("device", qweight=qweight, scales=scales, **({} if zeros is None else {"zeros": zeros}))
    return k


def quantized_linear(x, qweight, scales, zeros=None, bias=None, *, bits=8, group_size=None):
    """``x @ W.T + bias`` for ``x (..., K)`` with a weight-only quantised ``W (N, K)``.

    ``bits=8``: ``qweight`` int8 ``(N, K)``, ``scales (N,)``: ``W = qweight * scales[:, None]``.
    ``bits=4``: ``qweight`` uint8 ``(N, K // 2)`` (input features ``2j`` and ``2j + 1`` in the low
    and high nibble of byte ``j``), ``scales`` and ``zeros`` (uint8) ``(N, K // group_size)``:
    ``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``, ``group_size`` one of 32, 64,
    128, 256.  :func:`quantize_weight` makes both.

    Returns a new contiguous ``(..., N)`` tensor in ``x``'s dtype (float32, float16, bfloat16),
    summed in float32 from exact products and rounded once (module docstring).  ``x`` may be any
    strided view; ``bias (N,)`` must have ``x``'s dtype.  Differentiable in ``x`` and ``bias``; the
    weight is frozen.  Under ``torch.autocast`` ``x`` and ``bias`` are cast as ``F.linear``'s are.
    """
    check_tensor("x", x, min_ndim=1)
    k = check_quantized_weight(qweight, scales, zeros, bits=bits, group_size=group_size, in_features=x.shape[-1])
    x, bias = autocast_inputs(x, bias) if bias is not None else (autocast_inputs(x)[0], None)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != qweight.shape[0]:
            raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    check_same("device", x=x, qweight=qweight, **({} if bias is None else {"bias": bias}))
    if not use_triton("quantized_linear", x.device) or k == 0:
        return reference.quantized_linear(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size)
    return QuantizedLinearFunction.apply(x, qweight, scales, zeros, bias, bits, group_size or 0)
