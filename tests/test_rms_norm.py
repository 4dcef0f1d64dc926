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


def _within_roundings(y, ref, dtype, roundings=1):
    """|y - ref| is at most ``roundings`` rounding steps of ``dtype`` at ref's magnitude: unit
    roundoff x |ref|, and the fixed spacing of the subnormals (tiny x eps) below the normal range."""
    finfo = torch.finfo(dtype)
    step = torch.clamp(finfo.eps * ref.abs(), min=finfo.tiny * finfo.eps)
    return ((y - ref).abs() <= roundings * step).all()


def test_same_cast_order_as_transformers(device):
    """Same cast order as transformers' LlamaRMSNorm: in fp16/bf16 the outputs differ from eager by
    at most one rounding step (only float32 summation order differs), never by a cast-order error.
    Seeded: a float32 difference can flip the intermediate rounding of the normalised row, and the
    final rounding then lands two steps away (a few percent of random draws, on this kernel as on
    the one before the offset/casting options, which computes the same bits)."""
    torch.manual_seed(0)
    for dtype, unit_roundoff in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        x = torch.randn(33, 1000, device=device, dtype=dtype)
        w = _weight(1000, dtype, device)
        y, ref = lk.rms_norm(x, w, 1e-6).float(), reference.rms_norm(x, w, 1e-6).float()
        assert unit_roundoff == torch.finfo(dtype).eps
        assert _within_roundings(y, ref, dtype)
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
    x, r = (torch.randn(2, 3, 64, device=device, requires_grad=True) for _ in range(2))
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


# ---- Options for the rest of the LLaMA family: offset (Gemma's 1 + w), casting, per-head q/k norms.

def _gemma_weight(n, dtype, device):
    """Gemma stores ``w - 1`` (zeros at init): small values around 0, scaled by ``1 + w``."""
    return (0.1 * torch.randn(n, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("fused", [False, True])
def test_offset_and_casting_match_oracle(dtype, casting, offset, fused, device):
    x = torch.randn(9, 1000, device=device, dtype=dtype) * 3
    w = (_gemma_weight if offset else _weight)(1000, dtype, device)
    options = dict(offset=offset, casting=casting)
    name = f"rms_norm {options}"
    if fused:
        r = torch.randn_like(x)
        check_against_oracle(
            name + " +residual",
            lambda x, w, r: lk.rms_norm(x, w, 1e-6, residual=r, **options),
            lambda x, w, r: reference.rms_norm(x, w, 1e-6, residual=r, **options),
            [x, w, r],
        )
    else:
        check_against_oracle(name, lambda x, w: lk.rms_norm(x, w, 1e-6, **options),
                             lambda x, w: reference.rms_norm(x, w, 1e-6, **options), [x, w])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_gemma_casting_float32_weight_with_half_activations(x_dtype, fused, device):
    """Gemma under AMP: float32 weights, half-precision activations; y in x's dtype, dw in float32."""
    x = torch.randn(7, 576, device=device).to(x_dtype) * 3
    w = _gemma_weight(576, torch.float32, device)
    options = dict(offset=1.0, casting="gemma")
    inputs = [x, w, torch.randn_like(x)] if fused else [x, w]
    outs = check_against_oracle(
        "rms_norm gemma mixed",
        lambda x, w, *r: lk.rms_norm(x, w, 1e-6, *r, **options),
        lambda x, w, *r: reference.rms_norm(x, w, 1e-6, *r, **options),
        inputs,
    )
    assert all(o.dtype == x_dtype for o in outs)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    lk.rms_norm(xl, wl, 1e-6, **options).sum().backward()
    assert xl.grad.dtype == x_dtype and wl.grad.dtype == torch.float32


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_options_on_odd_sizes_one_row_and_strided_inputs(casting, device):
    base = torch.randn(5, 3, 1100, device=device, dtype=torch.bfloat16) * 2
    cases = {
        "one row of 7": base[0, :1, :7],
        "1-D row": base[0, 0, :1000],
        "one token 3-D": base[:1, :1, :1000],
        "strided rows, odd hidden": base[::2, 1:, :999],
        "transposed": base[..., :33].transpose(0, 1),
    }
    for name, x in cases.items():
        w = _gemma_weight(x.shape[-1], torch.bfloat16, device)
        check_against_oracle(
            f"rms_norm {casting} {name}",
            lambda x, w: lk.rms_norm(x, w, 1e-6, offset=1.0, casting=casting),
            lambda x, w: reference.rms_norm(x, w, 1e-6, offset=1.0, casting=casting),
            [x, w],
        )


def _hf_norm(cls_name, module_path, dim, eps, weight):
    import importlib

    module = getattr(importlib.import_module(module_path), cls_name)(dim, eps=eps)
    with torch.no_grad():
        module.weight = torch.nn.Parameter(weight.clone())
    return module


HF_NORMS = {  # name -> (module, lk options, weight maker)
    "GemmaRMSNorm": ("transformers.models.gemma.modeling_gemma", dict(offset=1.0, casting="gemma"), _gemma_weight),
    "Gemma3RMSNorm": ("transformers.models.gemma3.modeling_gemma3", dict(offset=1.0, casting="gemma"), _gemma_weight),
    "Qwen3RMSNorm": ("transformers.models.qwen3.modeling_qwen3", {}, _weight),
}


@pytest.mark.parametrize("cls_name", list(HF_NORMS))
@pytest.mark.parametrize("x_dtype,w_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
])
def test_equals_transformers_modules(cls_name, x_dtype, w_dtype, device):
    """transformers' own modules: equal to them almost everywhere in the forward (a cast-order error
    would differ on a large fraction), elsewhere a rounding step away in each rounding (Gemma: one;
    Qwen3, LLaMA's order: two, the normalised row and the product), gradients by the 2x rule with
    the module as the eager twin."""
    module_path, options, make_weight = HF_NORMS[cls_name]
    x = torch.randn(2, 5, 3, 256, device=device).to(x_dtype) * 3
    w = make_weight(256, w_dtype, device)
    module = _hf_norm(cls_name, module_path, 256, 1e-6, w).to(device)
    x_k, x_e, x_o = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    w_k, w_o = w.clone().requires_grad_(), w.double().requires_grad_()
    y_k, y_e = lk.rms_norm(x_k, w_k, 1e-6, **options), module(x_e)
    y_o = reference.rms_norm(x_o, w_o, 1e-6, **options)
    y_e_cast = y_e.to(x_dtype)  # Qwen3RMSNorm with float32 weights returns float32 (w * half row)
    assert y_k.dtype == x_dtype
    assert _within_roundings(y_k.float(), y_e_cast.float(), x_dtype, 1 if options else 2)
    assert (y_k.float() == y_e_cast.float()).float().mean() > 0.99
    cot = torch.randn(y_o.shape, device=device).to(x_dtype)
    (y_k.double() * cot.double()).sum().backward()
    (y_e.double() * cot.double()).sum().backward()
    (y_o * cot.double()).sum().backward()
    assert_like_eager(f"{cls_name} dx", x_k.grad, x_o.grad, x_e.grad)
    assert_like_eager(f"{cls_name} dw", w_k.grad, w_o.grad, module.weight.grad)


def _projection_heads(batch, seq, heads, head_dim, dtype, device, transposed):
    """``q_proj(x).view(B, T, H, D)`` (Qwen3's q_norm input) or its ``(B, H, T, D)`` transpose (Gemma 3's)."""
    q = (torch.randn(batch, seq, heads * head_dim, device=device) * 2).to(dtype).view(batch, seq, heads, head_dim)
    return q.transpose(1, 2) if transposed else q


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("model", ["qwen3", "gemma3"])
def test_per_head_qk_norm(head_dim, model, device):
    """q/k norms over the head dim: Qwen3 on the (B, T, H, D) view, Gemma 3 on the transposed
    (B, H, T, D) view (three strided levels: read in place); forward and backward."""
    transposed = model == "gemma3"
    options = dict(offset=1.0, casting="gemma") if transposed else {}
    q = _projection_heads(2, 5, 3, head_dim, torch.bfloat16, device, transposed)
    assert q.is_contiguous() != transposed
    w = (_gemma_weight if transposed else _weight)(head_dim, torch.bfloat16, device)
    check_against_oracle(
        f"{model} q_norm D={head_dim}",
        lambda q, w: lk.rms_norm(q, w, 1e-6, **options),
        lambda q, w: reference.rms_norm(q, w, 1e-6, **options),
        [q, w],
    )


def test_per_head_views_read_in_place(device, monkeypatch):
    """The transposed (B, H, T, D) view and a residual of another 3-level layout: no copy in the
    forward or the backward (any call of contiguous/clone is a bug); the output keeps x's logical
    shape and is contiguous."""
    from llama_kernels.ops.rms_norm import _row_layout

    q = _projection_heads(2, 6, 4, 64, torch.float32, device, transposed=True).requires_grad_()
    r = torch.randn(4, 2, 6, 64, device=device).permute(1, 0, 2, 3).requires_grad_()  # (B, H, T, D) of (H, B, T, D)
    w = _gemma_weight(64, torch.float32, device).requires_grad_()
    assert _row_layout(q)[1:] == (4, 6, 6 * 4 * 64, 64, 4 * 64, 1)
    for method in ("contiguous", "clone"):
        monkeypatch.setattr(torch.Tensor, method, lambda *a, **k: pytest.fail(f"rms_norm called {method}"))
    y, h = lk.rms_norm(q, w, 1e-6, r, offset=1.0, casting="gemma")
    grads = torch.autograd.grad((y, h), (q, w, r), (torch.ones_like(y), torch.ones_like(h)))
    monkeypatch.undo()
    assert y.shape == q.shape and y.is_contiguous()
    y_ref, h_ref = reference.rms_norm(q, w, 1e-6, r, offset=1.0, casting="gemma")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    expected = torch.autograd.grad((y_ref, h_ref), (q, w, r), (torch.ones_like(y), torch.ones_like(h)))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_more_than_three_row_levels_is_copied_and_correct(device):
    """A 5-D tensor whose leading dims need four strided levels falls back to a contiguous copy."""
    from llama_kernels.ops.rms_norm import _row_layout

    x = torch.randn(2, 3, 2, 3, 48, device=device).permute(1, 0, 3, 2, 4)
    assert _row_layout(x)[0].data_ptr() != x.data_ptr()
    w = _gemma_weight(48, torch.float32, device)
    check_against_oracle("rms_norm 4 levels", lambda x, w: lk.rms_norm(x, w, offset=1.0, casting="gemma"),
                         lambda x, w: reference.rms_norm(x, w, offset=1.0, casting="gemma"), [x, w])


def test_bad_options_raise_before_launch(device):
    x, w = torch.randn(3, 64, device=device), torch.ones(64, device=device)
    LAUNCHES.clear()
    for bad in ("1", True, None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="offset must be a float"):
            lk.rms_norm(x, w, offset=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="offset must be a finite number"):
            lk.rms_norm(x, w, offset=bad)
    for bad in (None, 1, True):
        with pytest.raises(TypeError, match="casting must be a str"):
            lk.rms_norm(x, w, casting=bad)
    for bad in ("Gemma", "", "float32"):
        with pytest.raises(ValueError, match="casting must be one of"):
            lk.rms_norm(x, w, casting=bad)
    with pytest.raises(TypeError):  # keyword-only
        lk.rms_norm(x, w, 1e-6, None, 1.0)
    assert not LAUNCHES
    torch.testing.assert_close(lk.rms_norm(x, w, offset=np.float32(1.0)), lk.rms_norm(x, w * 2))


def test_eager_fallback_takes_the_options(device, monkeypatch):
    from llama_kernels.ops import rms_norm as module

    x, w = torch.randn(3, 64, device=device), _gemma_weight(64, torch.float32, device)
    r = torch.randn(3, 64, device=device)
    monkeypatch.setattr(module, "use_triton", lambda op, device: False)
    LAUNCHES.clear()
    out = lk.rms_norm(x, w, 1e-5, r, offset=1.0, casting="gemma")
    assert not LAUNCHES
    for o, e in zip(out, reference.rms_norm(x, w, 1e-5, r, offset=1.0, casting="gemma")):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_options_through_custom_ops_and_torch_compile(device):
    from llama_kernels.ops.rms_norm import rms_norm_bwd, rms_norm_fwd

    x = torch.randn(3, 2, 64, device=device).to(torch.bfloat16)
    w = _gemma_weight(64, torch.float32, device)
    torch.library.opcheck(rms_norm_fwd.op, (x, w, None, 1e-6, 1.0, "gemma"))
    torch.library.opcheck(rms_norm_fwd.op, (x, w, torch.randn_like(x), 1e-6, 0.5, "llama"))
    rstd = torch.rand(3, 2, device=device) + 0.5
    torch.library.opcheck(rms_norm_bwd.op, (torch.randn_like(x), x, w, rstd, None, 1.0))

    def block(x, w, r):
        y, h = lk.rms_norm(x, w, 1e-6, r, offset=1.0, casting="gemma")
        return y * 2, h

    x, r = torch.randn(5, 96, device=device, requires_grad=True), torch.randn(5, 96, device=device, requires_grad=True)
    w = _gemma_weight(96, torch.float32, device).requires_grad_()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    outs_c, outs_e = compiled(x, w, r), block(x, w, r)
    for c, e in zip(outs_c, outs_e):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    cots = [torch.randn_like(o) for o in outs_e]
    for c, e in zip(torch.autograd.grad(outs_c, (x, w, r), cots), torch.autograd.grad(outs_e, (x, w, r), cots)):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
