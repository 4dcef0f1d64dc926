"""SwiGLU (silu(gate) * up) against the float64 oracle, on LLaMA MLP widths and real layouts."""

import pytest
import torch

from llama_kernels import geglu, reference, swiglu
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.glu import geglu_bwd, geglu_fwd, swiglu_bwd, swiglu_fwd
from helpers import DTYPES, assert_like_eager, check_against_oracle

# LLaMA intermediate sizes (small model, odd width, 7B, 8B); few rows: the interpreter is slow.
WIDTHS = {1000: 7, 1536: 5, 11008: 3, 14336: 2}


def _inputs(shape, dtype, device, scale=3.0):
    gate = (torch.randn(shape, device=device) * scale).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    return gate, up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", list(WIDTHS))
def test_swiglu_matches_oracle(dtype, width, device):
    LAUNCHES.clear()
    gate, up = _inputs((WIDTHS[width], width), dtype, device)
    check_against_oracle("swiglu", swiglu, reference.swiglu, [gate, up])
    assert LAUNCHES["glu_fwd_kernel"] == 1 and LAUNCHES["glu_bwd_kernel"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_fused_projection_halves(name, dtype, device):
    """``gate, up = gu.chunk(2, -1)``: strided halves of one buffer, gradients flow back into ``gu``."""
    gu = torch.randn(2, 3, 2 * 1536, device=device).to(dtype) * 2
    op, twin = {"swiglu": (swiglu, reference.swiglu), "geglu": (geglu, reference.geglu)}[name]

    def halves(fn):
        return lambda gu: fn(*gu.chunk(2, -1))

    check_against_oracle(f"{name} halves", halves(op), halves(twin), [gu])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype, device):
    for shape in [(1, 11008), (1, 1, 1000)]:
        gate, up = _inputs(shape, dtype, device)
        check_against_oracle(f"swiglu {shape}", swiglu, reference.swiglu, [gate, up])


def test_strided_and_transposed_inputs(device):
    base = torch.randn(6, 4, 2200, device=device, dtype=torch.bfloat16) * 3
    views = {
        "transposed": (base[..., :1000].transpose(0, 1), base[..., 1100:2100].transpose(0, 1)),
        "strided rows": (base[::2, 1:, :1000], base[1::2, :3, 1000:2000]),
        "strided columns": (base[:2, :, 0:2000:2], base[2:4, :, 1:2001:2]),
        "1-D": (base[0, 0, :1000], base[1, 1, :1000]),
    }
    for name, (gate, up) in views.items():
        check_against_oracle(f"swiglu {name}", swiglu, reference.swiglu, [gate, up])


def test_saturated_gate_stays_finite(device):
    """|gate| up to 100 (10^4 in fp16: exp(-gate) overflows float32): sigmoid saturates, no NaN."""
    for dtype, high in [(torch.float32, 100.0), (torch.bfloat16, 100.0), (torch.float16, 10000.0)]:
        gate = torch.linspace(-high, high, 1000, device=device).to(dtype)[None]
        up = torch.rand(gate.shape, device=device).to(dtype) * 2 - 1  # keeps the products finite
        check_against_oracle(f"swiglu saturated {dtype}", swiglu, reference.swiglu, [gate, up])


def test_layout_and_no_copies(device, monkeypatch):
    gu = torch.randn(4, 2 * 1000, device=device, dtype=torch.float16, requires_grad=True)
    gate, up = gu.chunk(2, -1)
    assert not gate.is_contiguous()
    # The kernels read the halves through their strides: any copy of them is a bug.
    for method in ("contiguous", "clone"):
        monkeypatch.setattr(torch.Tensor, method, lambda *a, **k: pytest.fail(f"swiglu called {method}"))
    y = swiglu(gate, up)
    d_gate, d_up = torch.autograd.grad(y, (gate, up), torch.ones_like(y))
    monkeypatch.undo()
    assert y.is_contiguous() and y.shape == gate.shape and y.dtype == gate.dtype
    assert d_gate.is_contiguous() and d_up.is_contiguous()
    assert y.data_ptr() != gu.data_ptr()


def test_kernels_launch(device):
    LAUNCHES.clear()
    gate, up = _inputs((3, 64), torch.float32, device)
    gate.requires_grad_()
    swiglu(gate, up).sum().backward()
    assert LAUNCHES["glu_fwd_kernel"] == 1 and LAUNCHES["glu_bwd_kernel"] == 1


@pytest.mark.parametrize("shape", [(0, 1000), (2, 0, 64), (3, 0)])
def test_empty_inputs(shape, device):
    LAUNCHES.clear()
    gate = torch.randn(shape, device=device, requires_grad=True)
    up = torch.randn(shape, device=device, requires_grad=True)
    y = swiglu(gate, up)
    assert y.shape == shape
    y.sum().backward()
    assert gate.grad.shape == shape and up.grad.shape == shape
    assert sum(LAUNCHES.values()) == 0


def test_bad_arguments(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        swiglu([1.0], x)
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        swiglu(x, 1.0)
    with pytest.raises(TypeError, match="gate must have dtype.*float64"):
        swiglu(x.double(), x.double())
    with pytest.raises(TypeError, match="up must have dtype.*int32"):
        swiglu(x, x.int())
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(2, 8\), got \(2, 4\)"):
        swiglu(x, x[:, :4])
    with pytest.raises(ValueError, match="gate must have at least 1 dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="up must have the same device as gate"):
        swiglu(x, torch.empty(2, 8, device="meta"))


def test_custom_ops_and_torch_compile(device):
    """The launchers are opaque custom ops: fake shapes agree, and a compiled graph has no break."""
    gate, up = _inputs((3, 2, 64), torch.float16, device)
    torch.library.opcheck(swiglu_fwd.op, (gate, up))
    torch.library.opcheck(swiglu_fwd.op, (gate, up.float()))  # promoted output dtype
    torch.library.opcheck(swiglu_bwd.op, (torch.randn_like(gate), gate, up))

    def mlp_activation(gu):
        return swiglu(*gu.chunk(2, -1)) * 2

    gu = torch.randn(5, 2 * 96, device=device, requires_grad=True)
    LAUNCHES.clear()
    compiled = torch.compile(mlp_activation, backend="aot_eager", fullgraph=True)
    (d_compiled,) = torch.autograd.grad(compiled(gu).sum(), gu)
    assert LAUNCHES["glu_fwd_kernel"] == 1 and LAUNCHES["glu_bwd_kernel"] == 1
    (d_eager,) = torch.autograd.grad(mlp_activation(gu).sum(), gu)
    torch.testing.assert_close(compiled(gu), mlp_activation(gu), rtol=0, atol=0)
    torch.testing.assert_close(d_compiled, d_eager, rtol=0, atol=0)


@pytest.mark.parametrize("gate_dtype,up_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16),
])
def test_inputs_of_different_dtypes_promote(gate_dtype, up_dtype, device):
    """gate and up of different dtypes: the output is in the promoted dtype, as eager gives (silu
    rounded to gate's dtype first), each gradient in its input's dtype."""
    gate = (torch.randn(7, 300, device=device) * 3).to(gate_dtype)
    up = torch.randn(7, 300, device=device).to(up_dtype)
    (y,) = check_against_oracle("swiglu mixed dtypes", swiglu, reference.swiglu, [gate, up])
    assert y.dtype == torch.promote_types(gate_dtype, up_dtype)


# ---- GeGLU: gelu_tanh(gate) * up (Gemma's MLP), the same kernels with the activation switched.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1000), (3, 777), (2, 1, 16384)])
def test_geglu_matches_oracle(dtype, shape, device):
    LAUNCHES.clear()
    gate, up = _inputs(shape, dtype, device)
    check_against_oracle("geglu", geglu, reference.geglu, [gate, up])
    assert LAUNCHES["glu_fwd_kernel"] == 1 and LAUNCHES["glu_bwd_kernel"] == 1


def test_geglu_odd_sizes_and_strided_inputs(device):
    base = torch.randn(6, 4, 2200, device=device, dtype=torch.float16) * 3
    cases = {
        "one element": (base[0, 0, :1], base[0, 1, :1]),
        "one token, odd width": (base[:1, 0, :13], base[1:2, 0, 100:113]),
        "1-D odd": (base[0, 0, :999], base[1, 1, 1:1000]),
        "transposed": (base[..., :1000].transpose(0, 1), base[..., 1100:2100].transpose(0, 1)),
        "strided columns": (base[:2, :, 0:2000:2], base[2:4, :, 1:2001:2]),
    }
    for name, (gate, up) in cases.items():
        check_against_oracle(f"geglu {name}", geglu, reference.geglu, [gate, up])


def test_geglu_whole_range_and_saturated_gate(device):
    """Every regime of gelu_tanh: the left tail (where 1 + tanh cancels in the textbook form),
    around 0, and |gate| up to 100 (10^4 in fp16, 1e30 in float32: g^3 overflows): finite, no NaN."""
    for dtype, high in [(torch.float32, 100.0), (torch.bfloat16, 100.0), (torch.float16, 10000.0)]:
        gate = torch.linspace(-high, high, 1001, device=device).to(dtype)[None]
        up = torch.rand(gate.shape, device=device).to(dtype) * 2 - 1
        check_against_oracle(f"geglu saturated {dtype}", geglu, reference.geglu, [gate, up])
    gate = torch.linspace(-8, 8, 1001, device=device)[None]
    up = torch.rand(gate.shape, device=device) * 2 - 1
    check_against_oracle("geglu [-8, 8]", geglu, reference.geglu, [gate, up])
    huge = torch.tensor([[-1e30, -1e20, 1e20, 1e30]], device=device, requires_grad=True)
    y = geglu(huge, torch.ones_like(huge))
    (d_gate,) = torch.autograd.grad(y.sum(), huge)
    assert torch.equal(y.detach(), torch.tensor([[0.0, 0.0, 1e20, 1e30]], device=device))
    assert torch.equal(d_gate, torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_geglu_equals_transformers_activation(dtype, device):
    """``ACT2FN["gelu_pytorch_tanh"](g) * u``, Gemma's MLP: by the 2x rule with it as the eager twin,
    forward and backward, and in half precision equal to it almost everywhere outside the left tail
    (the activation is rounded to gate's dtype first, as there, and only float32 rounding differs;
    below gate = -2 its ``1 + tanh`` cancels, ours does not: the float64 oracle judges there)."""
    from transformers.activations import ACT2FN

    act = ACT2FN["gelu_pytorch_tanh"]

    def hf(gate, up):
        return act(gate) * up

    gate, up = _inputs((9, 1000), dtype, device)
    if dtype != torch.float32:
        assert (geglu(gate, up) == hf(gate, up))[gate > -2].float().mean() > 0.99
    check_against_oracle("geglu vs transformers", geglu, hf, [gate, up])


@pytest.mark.parametrize("gate_dtype,up_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_geglu_inputs_of_different_dtypes_promote(gate_dtype, up_dtype, device):
    gate = (torch.randn(7, 300, device=device) * 3).to(gate_dtype)
    up = torch.randn(7, 300, device=device).to(up_dtype)
    (y,) = check_against_oracle("geglu mixed dtypes", geglu, reference.geglu, [gate, up])
    assert y.dtype == torch.promote_types(gate_dtype, up_dtype)


def test_geglu_under_autocast(device):
    """The MLP under autocast: bfloat16 projections in, the dtype eager gives out, the 2x rule."""
    x = torch.randn(5, 64, device=device)
    proj = torch.nn.Linear(64, 2 * 200, bias=False).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        gate, up = proj(x).chunk(2, -1)
        y, eager = geglu(gate, up), reference.geglu(gate, up)
    oracle = reference.geglu(*(t.double() for t in (gate, up)))
    assert y.dtype == eager.dtype == torch.bfloat16
    assert_like_eager("geglu autocast", y, oracle, eager)


def test_geglu_layout_no_copies_and_launches(device, monkeypatch):
    gu = torch.randn(4, 2 * 1000, device=device, dtype=torch.bfloat16, requires_grad=True)
    gate, up = gu.chunk(2, -1)
    for method in ("contiguous", "clone"):
        monkeypatch.setattr(torch.Tensor, method, lambda *a, **k: pytest.fail(f"geglu called {method}"))
    LAUNCHES.clear()
    y = geglu(gate, up)
    d_gate, d_up = torch.autograd.grad(y, (gate, up), torch.ones_like(y))
    monkeypatch.undo()
    assert dict(LAUNCHES) == {"glu_fwd_kernel": 1, "glu_bwd_kernel": 1}
    assert y.is_contiguous() and y.shape == gate.shape and y.dtype == gate.dtype
    assert d_gate.is_contiguous() and d_up.is_contiguous()


@pytest.mark.parametrize("shape", [(0, 1000), (3, 0)])
def test_geglu_empty_inputs(shape, device):
    LAUNCHES.clear()
    gate = torch.randn(shape, device=device, requires_grad=True)
    up = torch.randn(shape, device=device, requires_grad=True)
    y = geglu(gate, up)
    y.sum().backward()
    assert y.shape == gate.grad.shape == up.grad.shape == shape
    assert sum(LAUNCHES.values()) == 0


def test_geglu_bad_arguments(device):
    x = torch.randn(2, 8, device=device)
    LAUNCHES.clear()
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        geglu([1.0], x)
    with pytest.raises(TypeError, match="up must have dtype.*int32"):
        geglu(x, x.int())
    with pytest.raises(TypeError, match="gate must have dtype.*float64"):
        geglu(x.double(), x.double())
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(2, 8\), got \(2, 4\)"):
        geglu(x, x[:, :4])
    with pytest.raises(ValueError, match="up must have the same device as gate"):
        geglu(x, torch.empty(2, 8, device="meta"))
    assert not LAUNCHES


def test_geglu_eager_fallback(device, monkeypatch):
    from llama_kernels.ops import glu as module

    gate, up = _inputs((3, 64), torch.float32, device)
    monkeypatch.setattr(module, "use_triton", lambda op, device: False)
    LAUNCHES.clear()
    torch.testing.assert_close(geglu(gate, up), reference.geglu(gate, up), rtol=0, atol=0)
    assert not LAUNCHES


def test_geglu_custom_ops_and_torch_compile(device):
    gate, up = _inputs((3, 2, 64), torch.bfloat16, device)
    torch.library.opcheck(geglu_fwd.op, (gate, up))
    torch.library.opcheck(geglu_fwd.op, (gate, up.float()))
    torch.library.opcheck(geglu_bwd.op, (torch.randn_like(gate), gate, up))

    def mlp_activation(gu):
        return geglu(*gu.chunk(2, -1)) * 2

    gu = torch.randn(5, 2 * 96, device=device, requires_grad=True)
    compiled = torch.compile(mlp_activation, backend="aot_eager", fullgraph=True)
    (d_compiled,) = torch.autograd.grad(compiled(gu).sum(), gu)
    (d_eager,) = torch.autograd.grad(mlp_activation(gu).sum(), gu)
    torch.testing.assert_close(compiled(gu), mlp_activation(gu), rtol=0, atol=0)
    torch.testing.assert_close(d_compiled, d_eager, rtol=0, atol=0)


# ---- The backward rounds as eager autograd of ``act(gate) * up`` does (SiLU and GeGLU alike).
#
# Eager materialises ``dy * up`` (mul's backward) in half precision before SiluBackward or
# GeluBackward multiplies it by act'(gate), and ``d_up = dy * act`` takes the activation rounded
# to gate's dtype.  A kernel that keeps those products in float32 is no less accurate (the float64
# oracle cannot tell them apart), but it moves d_gate and d_up by an ulp on ~10-25% of the
# elements, and the gate projection's weight gradient, their sum over tokens, visibly (GeGLU,
# bfloat16, x (2, 256, 2048), unit weights: up to 16 off eager's, 4% of it outside atol = rtol =
# 1e-2): a kernel-vs-eager comparison of a training step fails.

OPS = {"swiglu": (swiglu, reference.swiglu), "geglu": (geglu, reference.geglu)}


def _ulps(a, b):
    """Elementwise distance between ``a`` and ``b`` (one dtype) in units in the last place: the
    difference of their bit patterns (exact for same-signed values; equal values, +-0 too, give 0)."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.where(a == b, 0, (a.view(bits).long() - b.view(bits).long()).abs())


def _grads(fn, gate, up, dy):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    return torch.autograd.grad(fn(gate, up), (gate, up), dy)


@pytest.mark.parametrize("gate_dtype,up_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),  # dy * up in float32, then to gate's dtype
])
@pytest.mark.parametrize("name", list(OPS))
def test_backward_rounds_like_eager(name, gate_dtype, up_dtype, device):
    """d_gate and d_up equal eager autograd's to the bit on all but 0.1% of the elements: they
    may differ only where the float32 values before the last rounding do, on near-ties.  SiLU's
    act and act' are eager's float32 formulas (only ``exp`` and, in half precision on the GPU, the
    division may differ by an ulp or two); GeGLU's are other float32 formulas than eager's tanh
    ones, and also differ at gelu's minimum (gate = -0.752, where act' ~ 1e-5 cancels in both; a
    few float16 ulps).  How far such an element may be off is the float64 oracle's to judge
    (test_swiglu_matches_oracle, test_geglu_matches_oracle), as is GeGLU's left tail, gate < -2,
    where eager's ``1 + tanh`` cancels and ours does not: not compared."""
    op, twin = OPS[name]
    gen = torch.Generator(device).manual_seed(0)
    gate = (torch.randn(64, 512, generator=gen, device=device) * 3).to(gate_dtype)
    up = (torch.randn(64, 512, generator=gen, device=device) * 3).to(up_dtype)
    y_dtype = torch.promote_types(gate_dtype, up_dtype)  # autograd hands dy over in y's dtype
    dy = torch.randn(64, 512, generator=gen, device=device).to(y_dtype)
    compared = gate > -2 if name == "geglu" else torch.ones_like(gate, dtype=torch.bool)
    for grad, k, e in zip(("d_gate", "d_up"), _grads(op, gate, up, dy), _grads(twin, gate, up, dy)):
        assert k.dtype == e.dtype
        ulps = _ulps(k, e)[compared]
        differ = (ulps > 0).float().mean().item()
        # With dy * up and act kept in float32, d_gate and d_up were 1 ulp off eager on 22-27%
        # of these elements (d_up in float32 for a bfloat16 gate: on 94-100%).
        assert differ <= 1e-3, (
            f"{name} {grad}: {differ:.2%} of elements differ from eager, by up to {ulps.max().item()} ulp"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPS))
def test_mlp_weight_gradients_match_eager(name, dtype, device):
    """The MLP's input side, ``act(x @ Wg.T, x @ Wu.T)`` (LLaMA's swiglu, Gemma's geglu): the
    weight gradients equal eager's within atol = rtol = 1e-2 (the tolerance a kernel-vs-eager
    training comparison uses) everywhere.  Unit-variance weights, as in the measurements that
    found it (gate ~ N(0, K)); with dy * up kept in float32, dWg was up to 2 away from eager's
    here in bfloat16, 5.6% of it outside the tolerance for geglu, 10.1% for swiglu (float16: 0.25,
    0.3% and 0.7%); now at most 0.0625, none."""
    op, twin = OPS[name]
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(64, 128, generator=gen, device=device).to(dtype)
    w_gate, w_up = (torch.randn(512, 128, generator=gen, device=device).to(dtype) for _ in range(2))
    dy = torch.randn(64, 512, generator=gen, device=device).to(dtype)

    def weight_grads(fn):
        wg, wu = w_gate.clone().requires_grad_(), w_up.clone().requires_grad_()
        return torch.autograd.grad(fn(x @ wg.T, x @ wu.T), (wg, wu), dy)

    LAUNCHES.clear()
    kernel = weight_grads(op)
    assert LAUNCHES["glu_bwd_kernel"] == 1
    for grad, k, e in zip(("dWg", "dWu"), kernel, weight_grads(twin)):
        torch.testing.assert_close(k, e, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name} {grad} vs eager: {m}")


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for the backward while ``fn()`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, bias", [((2, 9, 40), False), ((1, 1, 40), True), ((13, 40), False)])
def test_gated_linear_is_the_unfused_pair_bit_for_bit(gelu, dtype, shape, bias):
    """gated_linear = F.linear(act(gate) * up, W, b): the output and every gradient bitwise equal
    to the two ops' (gate and up the halves of one fused projection: views), while nothing of the
    gated unit's output size is saved beyond gate and up."""
    from llama_kernels.ops.glu import gated_linear

    torch.manual_seed(0)
    gu = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)
    weight = torch.randn(24, shape[-1], dtype=dtype) / shape[-1] ** 0.5
    b = torch.randn(24, dtype=dtype) if bias else None
    d_out = torch.randn(*shape[:-1], 24, dtype=dtype)
    unit = geglu if gelu else swiglu
    results = []
    for fused in (False, True):
        leaves = [t.clone().requires_grad_() for t in (gu, weight) + ((b,) if bias else ())]
        gate, up = leaves[0].chunk(2, -1)
        bias_leaf = leaves[2] if bias else None
        if fused:
            out, saved = _saved_bytes(lambda: gated_linear(gate, up, leaves[1], bias_leaf, gelu=gelu))
        else:
            out, saved = _saved_bytes(lambda: torch.nn.functional.linear(unit(gate, up), leaves[1], bias_leaf))
        out.backward(d_out)
        results.append((out, [t.grad for t in leaves], saved))
    (out, grads, saved), (fused_out, fused_grads, fused_saved) = results
    assert torch.equal(fused_out, out)
    for g, fg in zip(grads, fused_grads):
        assert torch.equal(fg, g)
    product = gu.numel() // 2 * gu.element_size()
    assert fused_saved == saved - product  # gate/up (one buffer) and the weight; not act(gate) * up


def test_gated_linear_steps_aside_for_what_it_cannot_fuse():
    """Under autocast, or with a weight of another dtype than the product, gated_linear is the
    unfused pair (what F.linear would do: cast, or refuse); patched MLPs call a down projection
    that is not a plain nn.Linear (LoRA, hooks) as it is."""
    from llama_kernels.ops.glu import GatedLinearFunction, gated_linear
    from llama_kernels.replacements import gated_down_projection

    gate, up = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16)
    weight = torch.randn(8, 16)
    applied = []
    original = GatedLinearFunction.apply
    try:
        GatedLinearFunction.apply = lambda *a: applied.append(1) or original(*a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gated_linear(gate, up, weight)
        assert out.dtype == torch.bfloat16 and not applied
        with pytest.raises(RuntimeError):
            gated_linear(gate, up, weight.half())  # F.linear's own dtype error
        assert not applied
        down = torch.nn.Linear(16, 8, bias=False)
        gated_down_projection(down, gate, up)
        assert applied == [1]
        down.register_forward_hook(lambda *a: None)
        torch.testing.assert_close(gated_down_projection(down, gate, up), down(swiglu(gate, up)), rtol=0, atol=0)
        assert applied == [1]
    finally:
        GatedLinearFunction.apply = original
    with pytest.raises(ValueError, match="weight"):
        gated_linear(gate, up, torch.randn(8, 15))
    with pytest.raises(TypeError, match="weight"):
        gated_linear(gate, up, weight.double())
