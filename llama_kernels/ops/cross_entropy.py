"""Fused linear + cross-entropy: the LM head and its loss without the ``(tokens, vocab)`` logits.

Math, for hidden rows ``h_i`` (``N x H``), ``weight`` ``W (V x H)``, ``bias`` ``b``, targets ``t_i``
and label smoothing ``e``::

    z_ij   = h_i . W_j + b_j                         (products exact, sums in float32, kept in float32)
    lse_i  = log sum_j exp(z_ij)
    loss_i = lse_i - (1 - e) z_{i,t_i} - (e / V) sum_j z_ij        (0 where t_i == ignore_index)

which is ``F.cross_entropy``'s per-row loss, ``(1 - e) * nll + e * mean_j(-log p_ij)``.  ``sum``
adds the rows, ``mean`` divides that by the number of rows not ignored (0 / 0 = NaN when every
target is ignored, as eager gives).  For the upstream gradient ``g_i`` of row ``i`` (1, 1 / count,
or the caller's own with ``reduction="none"``)::

    dz_ij = g_i (p_ij - (1 - e) [j == t_i] - e / V),     p_ij = exp(z_ij - lse_i)
    dh = dz W,   dW = dz^T h,   db = sum_i dz_i

Schedule.  The vocabulary is cut into chunks of ``Vc`` columns, so that at most ``N x Vc`` logits
(the ``cross_entropy_chunk`` kernel option, 64M by default) exist at a time.  The matrix products
are cuBLAS's (``torch.mm``); the kernels here do what lies between them:

* forward: per chunk, ``Z = h W_c^T`` with a float32 result, then :func:`cross_entropy_fwd_kernel`
  folds the chunk into each row's running max and sum of exponentials (an online log-sum-exp), its
  target logit and its logit sum.  One matrix product; only ``lse`` (``N`` floats) is saved.
* backward: per chunk, ``Z`` again, then :func:`cross_entropy_bwd_kernel` writes ``dZ`` rounded to
  the input dtype (where eager's ``.float()`` backward rounds it too), then ``dW_c = dZ^T h`` goes
  straight into its rows of ``dW`` (one rounding, as eager), ``dh += dZ W_c`` accumulates in float32
  and is rounded once at the end, ``db_c = sum_i dZ_i``.  Three matrix products.

Chunking the vocabulary rather than the tokens is what keeps every gradient exact: each row of
``dW`` is one product over all tokens, and only ``dh`` (``N x H``, small) sums across chunks, in
float32.  Chunking the tokens instead (computing the gradients during the forward, Liger's way)
saves the recomputation of ``Z``, but then ``dW`` sums across chunks: in float32 that costs a
weight-sized buffer (2 GB at LLaMA-3-8B's 128256 x 4096), in bfloat16 a rounding per chunk.

Targets outside ``[0, V)`` other than ``ignore_index`` raise a ``ValueError`` (one host read of a
flag); under ``torch.compile`` or CUDA-graph capture, where nothing may be read back, their rows get
a NaN loss and NaN gradients instead of a plausible wrong number.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .common import (
    INTERPRET,
    autocast_inputs,
    cast_rne,
    check_float_arg,
    check_same,
    check_tensor,
    compilable,
    count_launch,
    use_triton,
    values_readable,
)
from .options import current as current_options

REDUCTIONS = ("mean", "sum", "none")

# Logits held at once (N x Vc) are the ``cross_entropy_chunk`` option (``ops/options.py``): by
# default 64M float32 = 256 MB, plus their gradient in the input dtype.  At 8k tokens that is 8192
# columns per chunk, products of 8192 x 8192 x H, large enough for cuBLAS to run at full rate;
# fewer, larger chunks also mean fewer float32 additions into dh.
CHUNK_ALIGN = 128  # chunk widths are multiples of this (whole tiles for the matrix products)


@triton.jit
def cross_entropy_fwd_kernel(
    Z, BIAS, TARGET, STATS,
    N, VC, V0, stride_z, stride_b,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # STATS (4, N) float32, carried from chunk to chunk: running max, sum of exp(z - max), target
    # logit (NaN until the target's column is seen), sum of logits (label smoothing only).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    target_col = tl.load(TARGET + rows, mask=row_ok, other=-1) - V0  # column within this chunk
    m = tl.load(STATS + rows, mask=row_ok, other=0.0)
    s = tl.load(STATS + N + rows, mask=row_ok, other=0.0)
    z_target = tl.load(STATS + 2 * N + rows, mask=row_ok, other=0.0)
    z_sum = tl.load(STATS + 3 * N + rows, mask=row_ok, other=0.0)
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_z
    for c0 in range(0, VC, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < VC
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_rows + cols[None, :], mask=ok, other=float("-inf"))
        if HAS_BIAS:
            z += tl.load(BIAS + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        m_new = tl.maximum(m, tl.max(z, 1))
        # A row with nothing finite yet (only padding rows) would give exp(-inf - -inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
        m = m_new
        hit = (cols[None, :] == target_col[:, None]) & col_ok[None, :]
        found = tl.sum(hit.to(tl.int32), 1) > 0
        z_target = tl.where(found, tl.sum(tl.where(hit, z, 0.0), 1), z_target)
        if SMOOTH:
            z_sum += tl.sum(tl.where(ok, z, 0.0), 1)
    tl.store(STATS + rows, m, mask=row_ok)
    tl.store(STATS + N + rows, s, mask=row_ok)
    tl.store(STATS + 2 * N + rows, z_target, mask=row_ok)
    tl.store(STATS + 3 * N + rows, z_sum, mask=row_ok)


@triton.jit
def cross_entropy_bwd_kernel(
    Z, BIAS, TARGET, LSE, GRAD, DZ,
    N, VC, V0, V, stride_z, stride_b, ignore_index, target_weight, smooth_weight,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # dZ = g (softmax(z) - target_weight [col == t] - smooth_weight), 0 on ignored rows; DZ is
    # contiguous (N, VC) in the input dtype.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < VC
    ok = row_ok[:, None] & col_ok[None, :]
    target = tl.load(TARGET + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(GRAD + rows, mask=row_ok, other=0.0)
    rows64 = rows.to(tl.int64)
    z = tl.load(Z + rows64[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(BIAS + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    hit = (cols[None, :] + V0) == target[:, None]
    dz = tl.exp(z - lse[:, None]) - tl.where(hit, target_weight, 0.0) - smooth_weight
    counted = target != ignore_index
    # A target outside the vocabulary (reachable only where its check could not run) poisons its row.
    bad = counted & ((target < 0) | (target >= V))
    dz = tl.where(bad[:, None], float("nan"), g[:, None] * dz)
    # `where`, not a product: with reduction="mean" and every target ignored, g is 1 / 0 = inf.
    dz = tl.where(counted[:, None], dz, 0.0)
    tl.store(DZ + rows64[:, None] * VC + cols[None, :], cast_rne(dz, DZ.dtype.element_ty), mask=ok)


def chunk_columns(n_rows: int, vocab: int) -> int:
    """Columns of the vocabulary per chunk for ``n_rows`` tokens: the ``cross_entropy_chunk``
    option's elements over ``n_rows``, a multiple of :data:`CHUNK_ALIGN` (at least one), at most
    ``vocab``."""
    columns = current_options().cross_entropy_chunk // max(n_rows, 1) // CHUNK_ALIGN * CHUNK_ALIGN
    return min(vocab, max(CHUNK_ALIGN, columns))


def _chunks(n_rows: int, vocab: int):
    width = chunk_columns(n_rows, vocab)
    return [(v0, min(v0 + width, vocab)) for v0 in range(0, vocab, width)]


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result: products of the inputs exact, sums in float32, never rounded
    to a half-precision dtype.  cuBLAS does that for bfloat16/float16 inputs with ``out_dtype``;
    elsewhere (the CPU interpreter) the inputs are widened first, which computes the same."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _matmul_operand(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as :func:`_matmul_f32` will widen it anyway: float32 on the CPU, once per call
    rather than once per chunk; unchanged on CUDA, where cuBLAS takes the half-precision input."""
    return hidden.float() if not hidden.is_cuda and hidden.dtype != torch.float32 else hidden


def _logits(hidden, weight, v0, v1):
    """Columns ``v0:v1`` of ``hidden @ weight.T`` in float32 (``N x (v1 - v0)``, contiguous)."""
    return _matmul_f32(hidden, weight[v0:v1].t())


def _bias_args(bias, v0):
    if bias is None:
        return None, 0
    return bias[v0:], bias.stride(0)


def _fwd_config(n: int, columns: int):
    """(BLOCK_M, BLOCK_V, num_warps) of the forward kernel: a program reads BLOCK_M whole rows of a
    chunk, BLOCK_V columns at a time.  The interpreter's cost is per program: there, large tiles."""
    if INTERPRET:
        block_v = min(triton.next_power_of_2(columns), 4096)
        return min(triton.next_power_of_2(n), max(1, 16384 // block_v)), block_v, 4
    return 1, min(triton.next_power_of_2(columns), 2048), 8


def _bwd_config(n: int, columns: int):
    """(BLOCK_M, BLOCK_V, num_warps) of the elementwise backward kernel (about 4k elements a
    program on the GPU, whole rows under the interpreter)."""
    if INTERPRET:
        block_v = min(triton.next_power_of_2(columns), 16384)
        return min(triton.next_power_of_2(n), max(1, 16384 // block_v)), block_v, 4
    block_v = min(triton.next_power_of_2(columns), 1024)
    return max(1, 4096 // block_v), block_v, 8


def _fwd_fake(hidden, weight, bias, target, ignore_index, label_smoothing):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@compilable("linear_cross_entropy_fwd", _fwd_fake)
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             target: torch.Tensor, ignore_index: int,
                             label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and log-sum-exps ``(loss (N,), lse (N,))``, float32, of ``hidden (N, H)``
    against ``weight (V, H)`` (+ ``bias``) and ``target (N,)`` int64 (contiguous)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    loss, lse = _fwd_fake(hidden, weight, bias, target, ignore_index, label_smoothing)
    if n == 0:
        return loss, lse
    stats = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
    stats[0].fill_(float("-inf"))
    stats[1].zero_()
    stats[2].fill_(float("nan"))  # stays NaN for a target no chunk holds
    stats[3].zero_()
    hidden_mm = _matmul_operand(hidden)
    for v0, v1 in _chunks(n, vocab):
        z = _logits(hidden_mm, weight, v0, v1)
        block_m, block_v, num_warps = _fwd_config(n, v1 - v0)
        b, stride_b = _bias_args(bias, v0)
        cross_entropy_fwd_kernel[(triton.cdiv(n, block_m),)](
            z, b, target, stats, n, v1 - v0, v0, z.stride(0), stride_b,
            HAS_BIAS=bias is not None, SMOOTH=label_smoothing > 0, BLOCK_M=block_m, BLOCK_V=block_v,
            num_warps=num_warps,
        )
        count_launch(cross_entropy_fwd_kernel)
    m, s, z_target, z_sum = stats
    torch.add(m, s.log(), out=lse)
    row_loss = lse - (1.0 - label_smoothing) * z_target
    if label_smoothing > 0:
        row_loss = row_loss - (label_smoothing / vocab) * z_sum
    # `where` keeps ignored rows at 0 although their target logit is NaN.
    loss.copy_(torch.where(target != ignore_index, row_loss, 0.0))
    return loss, lse


def _bwd_fake(grad, hidden, weight, bias, target, lse, ignore_index, label_smoothing, need_hidden,
              need_weight, need_bias):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return grad_like(hidden, need_hidden), grad_like(weight, need_weight), grad_like(
        bias if bias is not None else weight.new_empty(0), need_bias and bias is not None)


@compilable("linear_cross_entropy_bwd", _bwd_fake)
def linear_cross_entropy_bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], target: torch.Tensor, lse: torch.Tensor,
                             ignore_index: int, label_smoothing: float, need_hidden: bool, need_weight: bool,
                             need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dhidden, dweight, dbias)`` for the per-row upstream gradient ``grad (N,)``
    (float32, contiguous); a gradient not asked for comes back empty (``numel() == 0``)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    d_hidden, d_weight, d_bias = _bwd_fake(grad, hidden, weight, bias, target, lse, ignore_index,
                                           label_smoothing, need_hidden, need_weight, need_bias)
    need_bias = need_bias and bias is not None
    if n == 0:
        d_hidden.zero_(), d_weight.zero_(), d_bias.zero_()
        return d_hidden, d_weight, d_bias
    hidden_mm = _matmul_operand(hidden)
    d_hidden_f32 = None
    for v0, v1 in _chunks(n, vocab):
        z = _logits(hidden_mm, weight, v0, v1)
        dz = torch.empty(n, v1 - v0, dtype=hidden.dtype, device=hidden.device)
        block_m, block_v, num_warps = _bwd_config(n, v1 - v0)
        b, stride_b = _bias_args(bias, v0)
        cross_entropy_bwd_kernel[(triton.cdiv(n, block_m), triton.cdiv(v1 - v0, block_v))](
            z, b, target, lse, grad, dz, n, v1 - v0, v0, vocab, z.stride(0), stride_b, ignore_index,
            1.0 - label_smoothing, label_smoothing / vocab,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
        )
        count_launch(cross_entropy_bwd_kernel)
        del z
        if need_weight:
            if hidden_mm is not hidden:  # widened on the CPU: round the float32 product once
                d_weight[v0:v1] = _matmul_f32(dz.t(), hidden_mm)  # as cuBLAS rounds
            else:
                torch.mm(dz.t(), hidden, out=d_weight[v0:v1])
        if need_hidden:
            partial = _matmul_f32(dz, weight[v0:v1])
            d_hidden_f32 = partial if d_hidden_f32 is None else d_hidden_f32.add_(partial)
        if need_bias:
            d_bias[v0:v1] = dz.sum(0, dtype=torch.float32)
    if need_hidden:
        d_hidden.copy_(d_hidden_f32)
    return d_hidden, d_weight, d_bias


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd of the per-row losses: saves the inputs and ``lse`` (``N`` floats), nothing of size
    ``N x V``; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, label_smoothing):
        loss, lse = linear_cross_entropy_fwd(hidden, weight, bias, target, ignore_index, label_smoothing)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.options = (ignore_index, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = linear_cross_entropy_bwd(
            grad.float().contiguous(), hidden, weight, bias, target, lse, *ctx.options,
            need_hidden, need_weight, need_bias,
        )
        return (d_hidden if need_hidden else None, d_weight if need_weight else None,
                d_bias if need_bias else None, None, None, None)


def _check_arguments(hidden, weight, target, bias, ignore_index, reduction, label_smoothing) -> float:
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[-1]}) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (a vocabulary of at least one token)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must have dtype int64 (class indices, as F.cross_entropy takes), "
                        f"got {str(target.dtype).replace('torch.', '')}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    tensors = dict(hidden=hidden, weight=weight)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    check_same("device", **tensors, target=target)
    check_same("dtype", **tensors)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    label_smoothing = check_float_arg("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return label_smoothing


def _check_target_values(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError for a target outside ``[0, vocab)`` that is not ``ignore_index`` (one host read).

    Skipped where nothing may be read back (torch.compile, CUDA-graph capture, meta and fake
    tensors): the kernels then give that row a NaN loss and NaN gradients.
    """
    if not values_readable(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(f"target holds {value}, outside the vocabulary [0, {vocab}) and not "
                         f"ignore_index ({ignore_index})")


def fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0):
    """``F.cross_entropy((hidden @ weight.T + bias).float(), target, ...)`` without the logits.

    ``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)`` or None, all of one float dtype;
    ``target`` int64 of ``hidden``'s leading shape, entries in ``[0, V)`` or ``ignore_index``.
    ``reduction``: ``"mean"`` over the targets not ignored (NaN if there are none, as eager),
    ``"sum"``, or ``"none"`` (a float32 loss of ``target``'s shape, 0 at ignored targets).
    ``label_smoothing`` in ``[0, 1]`` as in ``F.cross_entropy``.  The loss is float32.

    The logits are computed ``N x Vc`` at a time (the ``cross_entropy_chunk`` option: 64M of them by
    default) in float32, never rounded to the input dtype, and the backward recomputes them:
    besides its inputs and outputs the op holds one chunk of logits and, in the backward, ``dh`` in
    float32.  Differentiable in
    ``hidden``, ``weight`` and ``bias`` (each gradient in its dtype, ``weight``'s rows rounded once,
    as eager's).  Under ``torch.autocast`` the inputs are cast as ``F.linear``'s are.  ``hidden``
    may be any strided view; one whose leading dims cannot be flattened without a copy is copied.
    """
    if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
        hidden, weight = autocast_inputs(hidden, weight)
        if isinstance(bias, torch.Tensor):
            (bias,) = autocast_inputs(bias)
    label_smoothing = _check_arguments(hidden, weight, target, bias, ignore_index, reduction, label_smoothing)
    if not use_triton("fused_linear_cross_entropy", hidden.device):
        return reference.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index,
                                                    reduction=reduction, label_smoothing=label_smoothing)
    flat_target = target.reshape(-1).contiguous()
    _check_target_values(flat_target, weight.shape[0], ignore_index)
    loss = LinearCrossEntropyFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_target,
                                            ignore_index, label_smoothing)
    if reduction == "none":
        return loss.view(target.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (flat_target != ignore_index).sum()
