"""Gated MLP activations: SwiGLU ``silu(gate) * up`` (LLaMA) and GeGLU ``gelu_tanh(gate) * up``
(Gemma), one pair of kernels with a constexpr ``ACTIVATION`` switch.

Both activations are ``act(g) = g * sigmoid(a(g))``:

    silu:       a(g) = g
    gelu_tanh:  a(g) = 2k (g + c g^3),   k = sqrt(2 / pi), c = 0.044715

The second is transformers' ``gelu_pytorch_tanh`` (``F.gelu(g, approximate="tanh")``),
``0.5 g (1 + tanh(k (g + c g^3)))``, rewritten with ``1 + tanh(z) = 2 sigmoid(2z)``: no
cancellation in ``1 + tanh`` for negative ``g``, and the silu kernel's form.

Forward, elementwise (math in float32)::

    y = cast(cast(g / (1 + exp(-a(g)))) * u)    (act rounded to gate's dtype first, as eager does)

Backward, recomputing ``s = sigmoid(a(g))`` and ``act`` from the saved inputs (only ``gate`` and
``up`` are saved), with ``act'(g) = s + g s (1 - s) a'(g)``::

    d_act  = cast_g(cast_y(dy * u))           (mul's backward, in y's dtype, cast to the
                                               activation's output dtype)
    silu:       d_gate = cast_g(d_act * s * (1 + g * (1 - s)))
                         (SiluBackward, float32 inside, in aten's order)
    gelu_tanh:  d_gate = cast_g(d_act * (s + act * (1 - s) * a'(g))),   a'(g) = 2k (1 + 3c g^2)
                         (= 0.5 (1 + tanh z) + 0.5 g (1 - tanh^2 z) k (1 + 3c g^2), z = a / 2:
                         the derivative of the tanh form; GeluBackward, float32 inside)
    d_up   = cast_u(cast_y(dy * cast_g(act)))  (mul's backward of the saved, rounded activation)

where ``cast_g``, ``cast_u``, ``cast_y`` round to nearest even to gate's, up's and ``dy``'s (= y's)
dtype and everything else is float32.  That is eager autograd's sequence for ``F.silu(gate) * up``
and ``F.gelu(gate, approximate="tanh") * up``, rounding for rounding, so in half precision the
gradients equal eager's bit for bit except where the float32 values before the last rounding
differ.  SiLU's are eager's own float32 formulas (``g / (1 + exp(-g))``, ``1 / (1 + exp(-g))``):
they differ only by ``exp``'s last bit (and, on the GPU, the approximate division below), so only
on near-ties.  GeGLU's ``act`` and ``act'`` are other float32 formulas than eager's tanh ones: they
differ on near-ties, near gelu's minimum (``g = -0.752``, where ``act'`` cancels in both: a few
float16 ulps) and in the left tail (``g < -2``), where eager's ``1 + tanh`` cancels.  The backward
recomputes ``act`` with the forward's expression exactly (``_silu``, ``_gelu_tanh``), so ``d_up``
multiplies the activation the forward returned.  Keeping ``dy * u`` and ``act`` in float32 instead
is no less accurate, but moved ~25% of the half-precision gradients by an ulp off eager's, and the
gate projection's weight gradient (their sum over tokens) visibly.

GELU's sigmoid is evaluated stably from ``e = exp(-|a|)`` (never overflows: ``a`` is cubic in
``g``, so ``exp(-a)`` would overflow from ``g < -4.7`` on)::

    s = 1 / (1 + e),  1 - s = e / (1 + e)      (a >= 0; the other way round for a < 0)
    act = g / (1 + e)  or  g * e / (1 + e)

so neither ``s`` nor ``1 - s`` cancels, and ``g^2`` is capped at 1e4 in ``a`` and ``a'`` (where
``|g| >= 100`` the sigmoid is exactly 0 or 1 in float32 already), so a huge gate gives a
gradient of 0, not 0 * inf.  SiLU keeps ``act = g / (1 + exp(-g))``: its ``exp`` overflows only
for ``g < -88``, where ``g / inf = -0`` is the right answer.

``gate`` and ``up`` may differ in dtype: ``y`` is then in ``promote_types(gate.dtype, up.dtype)``,
as eager ``silu(gate) * up`` promotes.

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

import math

import torch
import torch.nn.functional as F
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

# The kernels' ACTIVATION: "silu" (swiglu) or "gelu_tanh" (geglu).
GELU_2K: tl.constexpr = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))  # a(g) = g * (2k + 2kc g^2)
GELU_2KC: tl.constexpr = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi) * 0.044715)
GELU_3X2KC: tl.constexpr = tl.constexpr(3.0 * 2.0 * math.sqrt(2.0 / math.pi) * 0.044715)  # a'(g) - 2k over g^2
GELU_MAX_ABS_G: tl.constexpr = tl.constexpr(100.0)  # |g| >= 100 saturates the sigmoid exactly in float32


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
def _capped_square(g):
    # min(g^2, 1e4) without overflowing g * g for |g| > 1.8e19.
    g_abs = tl.minimum(tl.abs(g), GELU_MAX_ABS_G)
    return g_abs * g_abs


@triton.jit
def _sigmoid_arg(g, ACTIVATION: tl.constexpr):
    # a(g): act(g) = g * sigmoid(a(g)) (see the module docstring); g^2 capped where s saturates.
    if ACTIVATION == "gelu_tanh":
        return g * (GELU_2K + GELU_2KC * _capped_square(g))
    return g


@triton.jit
def _silu_denominator(g):
    # 1 + exp(-g): silu(g) = g / it, sigmoid(g) = 1 / it (eager's float32 formulas, forward and
    # SiluBackward).  exp(-g) = inf for g < -88: silu = -0, sigmoid = 0, as they should be.
    return 1.0 + tl.exp(-g)


@triton.jit
def _silu(g, denominator, EXACT_DIV: tl.constexpr):
    # g / (1 + exp(-g)): rounds twice where g * sigmoid(g) rounds three times, and is what eager
    # computes.  The forward's activation and the backward's recomputation of it (as _gelu_tanh).
    return _divide(g, denominator, EXACT_DIV)


@triton.jit
def _gelu_tanh(g, a, e, EXACT_DIV: tl.constexpr):
    # g * sigmoid(a) from e = exp(-|a|), stably (module docstring).  The forward's activation, and
    # the backward's recomputation of it: the same expression, so the backward's d_up multiplies
    # exactly the act the forward rounded and returned (what eager saves for mul's backward).
    return _divide(tl.where(a >= 0, g, g * e), 1.0 + e, EXACT_DIV)


@triton.jit
def glu_fwd_kernel(
    G, U, Y,
    M, N,
    g_inner, g_so, g_si, g_sn,
    u_inner, u_so, u_si, u_sn,
    ACTIVATION: tl.constexpr, EXACT_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g_ptrs = row_tile_ptrs(G, rows, cols, g_inner, g_so, g_si, g_sn)
    u_ptrs = row_tile_ptrs(U, rows, cols, u_inner, u_so, u_si, u_sn)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    # Eager stores act(g) in gate's dtype before multiplying (in the promoted dtype): round it the
    # same way.
    if ACTIVATION == "gelu_tanh":  # g * sigmoid(a), stably (see the module docstring)
        a = _sigmoid_arg(g, ACTIVATION)
        e = tl.exp(-tl.abs(a))
        act = _gelu_tanh(g, a, e, EXACT_DIV)
    else:
        act = _silu(g, _silu_denominator(g), EXACT_DIV)
    act = cast_rne(act, G.dtype.element_ty).to(tl.float32)
    y_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # Y is contiguous
    tl.store(Y + y_offsets, cast_rne(act * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(
    DY, G, U, DG, DU,
    M, N,
    dy_inner, dy_so, dy_si, dy_sn,
    g_inner, g_so, g_si, g_sn,
    u_inner, u_so, u_si, u_sn,
    ACTIVATION: tl.constexpr, EXACT_DIV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    # Eager autograd's roundings, in its order (module docstring).  mul's backward materialises
    # dy * u in dy's dtype (y's) and the engine casts it to the activation's output dtype (gate's);
    # SiluBackward / GeluBackward multiplies that rounded value by act'(g) in float32 and rounds
    # once.  Keeping dy * u in float32 instead moved d_gate by an ulp on 22-26% of elements (bf16,
    # fp16), and the gate projection's weight gradient, their sum over tokens, with it.
    d_act = cast_rne(dy * u, DY.dtype.element_ty).to(tl.float32)
    d_act = cast_rne(d_act, G.dtype.element_ty).to(tl.float32)
    if ACTIVATION == "gelu_tanh":
        a = _sigmoid_arg(g, ACTIVATION)
        e = tl.exp(-tl.abs(a))
        r = _divide(1.0, 1.0 + e, EXACT_DIV)
        s = tl.where(a >= 0, r, e * r)
        one_minus_s = tl.where(a >= 0, e * r, r)
        act = _gelu_tanh(g, a, e, EXACT_DIV)
        da = GELU_2K + GELU_3X2KC * _capped_square(g)
        d_gate = d_act * (s + act * one_minus_s * da)
    else:
        denominator = _silu_denominator(g)
        s = _divide(1.0, denominator, EXACT_DIV)
        act = _silu(g, denominator, EXACT_DIV)
        # SiluBackward's float32 expression, in aten's order: grad * s * (1 + x * (1 - s)).
        d_gate = d_act * s * (1.0 + g * (1.0 - s))
    # d_up: mul's backward of the saved activation (act rounded to gate's dtype, as the forward
    # rounds it), a product in dy's dtype, cast to up's dtype at the store.
    d_up = cast_rne(dy * cast_rne(act, G.dtype.element_ty).to(tl.float32), DY.dtype.element_ty)
    d_up = d_up.to(tl.float32)
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
    return _launch_fwd(gate, up, "silu")


@compilable("geglu_fwd", _fwd_fake)
def geglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward: returns ``gelu_tanh(gate) * up``, a new contiguous tensor in the promoted dtype."""
    return _launch_fwd(gate, up, "gelu_tanh")


def _launch_fwd(gate, up, activation):
    y = _fwd_fake(gate, up)
    if y.numel() == 0:
        return y
    n = gate.shape[-1]
    m = y.numel() // n
    grid, block_m, block_n, num_warps = _launch_config(m, n)
    gate, *g_strides = row_layout(gate)
    up, *u_strides = row_layout(up)
    glu_fwd_kernel[grid](
        gate, up, y, m, n, *g_strides, *u_strides,
        ACTIVATION=activation, EXACT_DIV=_exact_div(y), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    count_launch(glu_fwd_kernel)
    return y


def _bwd_fake(dy, gate, up):
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


@compilable("swiglu_bwd", _bwd_fake)
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward of ``swiglu``: returns ``(d_gate, d_up)``, new contiguous tensors."""
    return _launch_bwd(dy, gate, up, "silu")


@compilable("geglu_bwd", _bwd_fake)
def geglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward of ``geglu``: returns ``(d_gate, d_up)``, new contiguous tensors."""
    return _launch_bwd(dy, gate, up, "gelu_tanh")


def _launch_bwd(dy, gate, up, activation):
    d_gate, d_up = _bwd_fake(dy, gate, up)
    if d_gate.numel() == 0:
        return d_gate, d_up
    n = gate.shape[-1]
    m = d_gate.numel() // n
    grid, block_m, block_n, num_warps = _launch_config(m, n)
    dy, *dy_strides = row_layout(dy)
    gate, *g_strides = row_layout(gate)
    up, *u_strides = row_layout(up)
    glu_bwd_kernel[grid](
        dy, gate, up, d_gate, d_up, m, n, *dy_strides, *g_strides, *u_strides,
        ACTIVATION=activation, EXACT_DIV=_exact_div(d_gate, d_up), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    count_launch(glu_bwd_kernel)
    return d_gate, d_up


class GLUFunction(torch.autograd.Function):
    """Autograd of ``swiglu`` (``gelu=False``) and ``geglu`` (``gelu=True``): saves ``gate`` and
    ``up`` (views, no copies) and recomputes the rest."""

    @staticmethod
    def forward(ctx, gate, up, gelu):
        ctx.gelu = gelu
        ctx.save_for_backward(gate, up)
        return geglu_fwd(gate, up) if gelu else swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate, d_up = geglu_bwd(dy, gate, up) if ctx.gelu else swiglu_bwd(dy, gate, up)
        return d_gate, d_up, None


class GatedLinearFunction(torch.autograd.Function):
    """Autograd of ``F.linear(act(gate) * up, weight, bias)`` (an MLP's down projection of its
    gated unit) that saves ``gate``, ``up`` and ``weight`` only: the product, the projection's
    ``tokens x intermediate`` input that ``nn.Linear`` would keep for its weight gradient, is
    recomputed in the backward by one more elementwise pass.  The backward runs the ops eager
    autograd runs (``MmBackward``'s two products, the gated unit's backward kernel), so every
    gradient is the unfused pair's, bit for bit."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, gelu):
        ctx.gelu = gelu
        ctx.save_for_backward(gate, up, weight)
        return F.linear(geglu_fwd(gate, up) if gelu else swiglu_fwd(gate, up), weight, bias)

    @staticmethod
    def backward(ctx, d_out):
        gate, up, weight = ctx.saved_tensors
        y = geglu_fwd(gate, up) if ctx.gelu else swiglu_fwd(gate, up)
        d_out = d_out.reshape(-1, d_out.shape[-1])
        # What linear's MmBackward computes for the folded (tokens, intermediate) input: dW from
        # the input's transpose (then transposed back), d_y against the weight.
        d_weight = y.reshape(-1, y.shape[-1]).t().mm(d_out).t() if ctx.needs_input_grad[2] else None
        d_bias = d_out.sum(0) if ctx.needs_input_grad[3] else None
        d_y = d_out.mm(weight).reshape(y.shape)
        del y
        d_gate, d_up = geglu_bwd(d_y, gate, up) if ctx.gelu else swiglu_bwd(d_y, gate, up)
        return d_gate, d_up, d_weight, d_bias, None


def _autocasting(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def gated_linear(gate, up, weight, bias=None, *, gelu=False):
    """``F.linear(swiglu(gate, up), weight, bias)`` (``geglu`` with ``gelu=True``): the down
    projection of a gated MLP, equal to the two ops bit for bit, forward and backward, but saving
    for the backward only ``gate`` and ``up`` (which the gated unit keeps anyway) and not the
    ``(..., intermediate)`` product: that is recomputed (:class:`GatedLinearFunction`).

    ``weight (hidden, intermediate)`` and ``bias (hidden,)`` (or None) must have the dtype of the
    gated unit's output, as ``F.linear`` requires; under ``torch.autocast`` (which would cast the
    product for the matmul) the unfused pair runs.
    """
    _check_inputs(gate, up)
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {gate.shape[-1]}) to take the gated unit's "
                         f"output; got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    unit = geglu if gelu else swiglu
    y_dtype = torch.promote_types(gate.dtype, up.dtype)
    if (not use_triton("geglu" if gelu else "swiglu", gate.device) or weight.dtype != y_dtype
            or (bias is not None and bias.dtype != y_dtype) or _autocasting(gate.device)):
        return F.linear(unit(gate, up), weight, bias)
    return GatedLinearFunction.apply(gate, up, weight, bias, gelu)


def _check_inputs(gate, up):
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up, min_ndim=1)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same("device", gate=gate, up=up)


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
    _check_inputs(gate, up)
    if not use_triton("swiglu", gate.device):
        return reference.swiglu(gate, up)
    return GLUFunction.apply(gate, up, False)


def geglu(gate, up):
    """``gelu_tanh(gate) * up`` for ``gate, up (..., N)`` of the same shape: Gemma's GeGLU MLP
    activation, with transformers' ``gelu_pytorch_tanh`` (``F.gelu(gate, approximate="tanh")``,
    ``0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))``).

    Everything else as :func:`swiglu`: strided views (the halves of ``gu.chunk(2, -1)``) read in
    place, the activation rounded to gate's dtype before the product, dtype promotion between
    ``gate`` and ``up``, gradients for both in their inputs' dtypes.  The same kernels run, with
    their activation switched at compile time.
    """
    _check_inputs(gate, up)
    if not use_triton("geglu", gate.device):
        return reference.geglu(gate, up)
    return GLUFunction.apply(gate, up, True)
