"""SwiGLU (silu(gate) * up) against the float64 oracle, on LLaMA MLP widths and real layouts."""

import pytest
import torch

from llama_kernels import reference, swiglu
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.swiglu import swiglu_bwd, swiglu_fwd
from helpers import DTYPES, check_against_oracle

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
    assert LAUNCHES["swiglu_fwd_kernel"] == 1 and LAUNCHES["swiglu_bwd_kernel"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_projection_halves(dtype, device):
    """``gate, up = gu.chunk(2, -1)``: strided halves of one buffer, gradients flow back into ``gu``."""
    gu = torch.randn(2, 3, 2 * 1536, device=device).to(dtype) * 2

    def halves(fn):
        return lambda gu: fn(*gu.chunk(2, -1))

    check_against_oracle("swiglu halves", halves(swiglu), halves(reference.swiglu), [gu])


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
    assert LAUNCHES["swiglu_fwd_kernel"] == 1 and LAUNCHES["swiglu_bwd_kernel"] == 1


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
    assert LAUNCHES["swiglu_fwd_kernel"] == 1 and LAUNCHES["swiglu_bwd_kernel"] == 1
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
