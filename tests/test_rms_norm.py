"""RMSNorm (plain and fused with the residual add) against the float64 oracle."""
import numpy as np
import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.ops.common import LAUNCHES
from helpers import DTYPES, assert_like_eager, check_against_oracle

HIDDEN = [576, 1000, 4096, 5120, 16384]


def _weight(n, dtype, device):
    return 1 + 0.1 * torch.randn(n, device=device).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_matches_oracle(dtype, hidden, fused, device):
    rows = 3 if hidden > 5000 else 9
    x = torch.randn(rows, hidden, device=device, dtype=dtype) * 3
    w = _weight(hidden, dtype, device)
    if fused:
        r = torch.randn_like(x)
        check_against_oracle(
            "rms_norm+residual",
            lambda x, w, r: lk.rms_norm(x, w, 1e-5, residual=r),
            lambda x, w, r: reference.rms_norm(x, w, 1e-5, residual=r),
            [x, w, r],
        )
    else:
        check_against_oracle("rms_norm", lambda x, w: lk.rms_norm(x, w, 1e-5), reference.rms_norm, [x, w])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_and_batched_3d(dtype, device):
    for shape in [(1, 4096), (1, 1, 576), (2, 5, 1000)]:
        x = torch.randn(shape, device=device, dtype=dtype)
        w = _weight(shape[-1], dtype, device)
        check_against_oracle(f"rms_norm {shape}", lk.rms_norm, reference.rms_norm, [x, w])


@pytest.mark.parametrize("fused", [False, True])
def test_non_contiguous_inputs_without_copies(fused, device):
    base = torch.randn(6, 4, 1100, device=device, dtype=torch.float16)
    views = {
        "column slice": base[:, :, :1000],          # row stride 1100
        "transposed": base[..., :1000].transpose(0, 1),  # leading dims swapped
        "strided rows": base[::2, 1:, :1000],       # gaps between rows and batches
    }
    w = _weight(1000, torch.float16, device)
    for name, x in views.items():
        assert not x.is_contiguous()
        residual = torch.randn(*x.shape[:-1], 1200, device=device, dtype=x.dtype)[..., 200:]
        inputs = [x, w, residual] if fused else [x, w]
        fn = (lambda x, w, r: lk.rms_norm(x, w, residual=r)) if fused else lk.rms_norm
        ref = (lambda x, w, r: reference.rms_norm(x, w, residual=r)) if fused else reference.rms_norm
        check_against_oracle(f"rms_norm {name}", fn, ref, inputs)


def test_float32_weight_with_half_activations(device):
    """AMP keeps weights in float32: the output stays in the activation dtype."""
    x = torch.randn(7, 576, device=device, dtype=torch.bfloat16)
    w = _weight(576, torch.float32, device)
    (y,) = check_against_oracle("rms_norm mixed", lk.rms_norm, reference.rms_norm, [x, w])
    assert y.dtype == torch.bfloat16


def test_same_cast_order_as_transformers(device):
    """Same cast order as transformers' LlamaRMSNorm: in fp16/bf16 the outputs differ from eager by
    at most one rounding step (only float32 summation order differs), never by a cast-order error."""
    for dtype, unit_roundoff in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        x = torch.randn(33, 1000, device=device, dtype=dtype)
        w = _weight(1000, dtype, device)
        y, ref = lk.rms_norm(x, w, 1e-6).float(), reference.rms_norm(x, w, 1e-6).float()
        assert ((y - ref).abs() <= unit_roundoff * ref.abs()).all()
        assert (y == ref).float().mean() > 0.99


def test_kernels_launch(device):
    LAUNCHES.clear()
    x = torch.randn(4, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    lk.rms_norm(x, w).sum().backward()
    # The weight gradient's partials are reduced and cast by one kernel (no PyTorch sum + cast).
    assert dict(LAUNCHES) == {"rms_norm_fwd_kernel": 1, "rms_norm_bwd_kernel": 1, "rms_norm_dw_kernel": 1}


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradient_reduction(dtype, device):
    """The partial reduction (more partials than one step of its loop, ragged columns) equals the
    float64 sum by the 2x rule against the float32 sum + cast it replaced."""
    from llama_kernels.ops.rms_norm import _reduce_dw

    partial = torch.randn(70, 4100, device=device) * 10
    dw = _reduce_dw(partial, dtype)
    expected = partial.double().sum(0)
    assert dw.dtype == dtype and dw.shape == (4100,)
    assert_like_eager("dw", dw, expected, partial.sum(0).to(dtype))  # eager: what the kernel replaced


def test_only_residual_output_used(device):
    """The gradient reaches x and residual when only the returned sum h is used downstream."""
    x, r = torch.randn(2, 3, 64, device=device, requires_grad=True), torch.randn(2, 3, 64, device=device, requires_grad=True)
    _, h = lk.rms_norm(x, torch.ones(64, device=device), residual=r)
    (h * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 2.0))


def test_bad_arguments_raise_before_launch(device):
    x, w = torch.randn(3, 64, device=device), torch.ones(64, device=device)
    cases = [
        (TypeError, "x must be a torch.Tensor", ([[1.0]], w)),
        (TypeError, "x must have dtype.*float64", (x.double(), w)),
        (TypeError, "x must have dtype.*int64", (x.long(), w)),
        (TypeError, "weight must have dtype.*int32", (x, w.int())),
        (ValueError, r"weight must have shape \(hidden,\) = \(64,\).*\(63,\)", (x, w[:63])),
        (ValueError, "weight must have 1 dimensions", (x, w[None])),
        (ValueError, "x must have at least 1 dimension", (torch.tensor(1.0, device=device), w)),
        (ValueError, "weight must have the same device as x", (x, w.to("meta"))),
    ]
    LAUNCHES.clear()
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            lk.rms_norm(*args)
    with pytest.raises(TypeError, match="eps must be a float"):
        lk.rms_norm(x, w, eps="1e-6")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        lk.rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        lk.rms_norm(x, w, residual=x[:2])
    with pytest.raises(TypeError, match="residual must have dtype.*int64"):
        lk.rms_norm(x, w, residual=x.long())
    with pytest.raises(ValueError, match="hidden size must be <= 65536"):
        lk.rms_norm(torch.empty(1, 65537, device=device), torch.empty(65537, device=device))
    assert not LAUNCHES


@pytest.mark.parametrize("fused", [False, True])
def test_hidden_size_zero(fused, device):
    """A hidden size of 0 gives what the reference gives (empty outputs, empty gradients), no error."""
    x = torch.randn(3, 0, device=device, requires_grad=True)
    w = torch.ones(0, device=device, requires_grad=True)
    r = torch.randn(3, 0, device=device, requires_grad=True)
    out = lk.rms_norm(x, w, residual=r) if fused else lk.rms_norm(x, w)
    expected = reference.rms_norm(x, w, residual=r) if fused else reference.rms_norm(x, w)
    out, expected = (out, expected) if fused else ((out,), (expected,))
    for o, e in zip(out, expected):
        assert o.shape == e.shape == (3, 0) and o.dtype == e.dtype
    grads = torch.autograd.grad(sum(o.sum() for o in out), (x, w, r) if fused else (x, w), allow_unused=True)
    assert [g.shape for g in grads] == [(3, 0), (0,), (3, 0)][: len(grads)]


def test_eps_is_any_finite_real_number(device):
    """eps: numpy scalars are numbers too (a config read with numpy); NaN/inf are refused by name."""
    x, w = torch.randn(3, 64, device=device), _weight(64, torch.float32, device)
    eps = np.float32(1e-3)
    torch.testing.assert_close(lk.rms_norm(x, w, eps), reference.rms_norm(x, w, float(eps)))
    torch.testing.assert_close(lk.rms_norm(x, w, np.float64(0.0)), reference.rms_norm(x, w, 0.0))
    torch.testing.assert_close(lk.rms_norm(x, w, 0), reference.rms_norm(x, w, 0.0))
    for bad in (float("nan"), float("inf"), np.float32("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            lk.rms_norm(x, w, bad)
    for bad in (True, "1e-6", torch.tensor(1e-6), None):
        with pytest.raises(TypeError, match="eps must be a float"):
            lk.rms_norm(x, w, bad)


@pytest.mark.parametrize("x_dtype,r_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
])
def test_residual_of_another_dtype_promotes(x_dtype, r_dtype, device):
    """Autocast feeds a half-precision block output and a float32 residual stream: h and y come out
    in the promoted dtype, as eager ``x + residual`` gives, and each gradient in its input's dtype."""
    x = torch.randn(5, 576, device=device).to(x_dtype) * 3
    r = torch.randn(5, 576, device=device).to(r_dtype)
    w = _weight(576, torch.float32, device)
    y, h = check_against_oracle(
        "rms_norm mixed residual",
        lambda x, w, r: lk.rms_norm(x, w, 1e-5, residual=r),
        lambda x, w, r: reference.rms_norm(x, w, 1e-5, residual=r),
        [x, w, r],
    )
    assert y.dtype == h.dtype == torch.promote_types(x_dtype, r_dtype)
