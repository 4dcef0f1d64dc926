"""Rotary embedding of q and k (one launch) against the float64 oracle, on real layouts."""

import pytest
import torch

from llama_kernels import apply_rotary, reference
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.rope import rope
from helpers import DTYPES, check_against_oracle


def cos_sin(positions, dim, dtype, interleaved=False, theta=10000.0):
    """transformers' tables for ``positions`` (any shape); Meta's pairwise layout when interleaved."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    if not interleaved:
        return reference.rotary_cos_sin(positions, inv_freq, dtype)
    angles = (positions[..., None].float() * inv_freq).repeat_interleave(2, dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def projections(batch, seq, hq, hk, dim, dtype, device):
    """q, k as the model makes them: ``(B, T, H, D)`` projections viewed as ``(B, H, T, D)``."""
    q = torch.randn(batch, seq, hq, dim, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, hk, dim, device=device).to(dtype).transpose(1, 2)
    return q, k


def check_rope(name, q, k, cos, sin, interleaved=False):
    """The 2x rule on both outputs and both gradients; cos/sin are constants (no gradient)."""

    def kernel(q, k):
        return apply_rotary(q, k, cos, sin, interleaved)

    def eager(q, k):  # at q's precision, or float64 (the oracle) on the same cos/sin values
        return reference.apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype), interleaved)

    LAUNCHES.clear()
    out = check_against_oracle(name, kernel, eager, [q, k])
    assert dict(LAUNCHES) == {"rope_kernel": 2}, f"{name}: one launch forward, one backward"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 32, 80, 96, 256])
def test_rope_matches_oracle(dtype, dim, device):
    batch, seq = 2, 5
    q, k = projections(batch, seq, 4, 2, dim, dtype, device)
    positions = torch.arange(37, 37 + seq, device=device).expand(batch, seq)  # a KV-cache offset
    cos, sin = cos_sin(positions, dim, dtype)
    check_rope(f"rope D={dim}", q, k, cos, sin)


@pytest.mark.parametrize("heads", [(9, 3), (8, 2), (4, 1), (4, 4)])
def test_grouped_query_heads(heads, device):
    hq, hk = heads
    q, k = projections(1, 6, hq, hk, 64, torch.bfloat16, device)
    cos, sin = cos_sin(torch.arange(6, device=device), 64, torch.bfloat16)
    check_rope(f"rope heads={heads}", q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [128, 80])
def test_interleaved_pairs(dtype, dim, device):
    q, k = projections(2, 4, 4, 2, dim, dtype, device)
    cos, sin = cos_sin(torch.arange(100, 104, device=device), dim, dtype, interleaved=True)
    check_rope(f"rope interleaved D={dim}", q, k, cos, sin, interleaved=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_one_token(dtype, device):
    """T = 1 at position 37 (after a prompt in the KV cache), batch 1 and 3, D = 128."""
    for batch in (1, 3):
        q, k = projections(batch, 1, 8, 2, 128, dtype, device)
        cos, sin = cos_sin(torch.tensor([37], device=device), 128, dtype)
        check_rope(f"rope decode B={batch}", q, k, cos, sin)


def test_cos_sin_layouts(device):
    """(T, D), (1, T, D) broadcast over the batch, (B, T, D) expanded (stride 0) and non-contiguous."""
    dtype, batch, seq, dim = torch.float16, 2, 5, 64
    q, k = projections(batch, seq, 4, 2, dim, dtype, device)
    cos, sin = cos_sin(torch.arange(seq, device=device), dim, dtype)
    transposed_cos = cos.t().contiguous().t()
    layouts = {
        "(T, D)": (cos, sin),
        "(1, T, D)": (cos[None], sin[None]),
        "(B, T, D) expanded": (cos.expand(batch, seq, dim), sin.expand(batch, seq, dim)),
        "(T, D) transposed storage": (transposed_cos, sin),
        "(B, T, D) sliced table": (
            torch.cat([cos, cos], -1)[None].expand(batch, -1, -1)[..., ::2],
            sin[None].expand(batch, -1, -1),
        ),
    }
    for name, (c, s) in layouts.items():
        check_rope(f"rope cos/sin {name}", q, k, c, s)


def test_contiguous_and_strided_q_k(device):
    dtype, dim = torch.bfloat16, 64
    cos, sin = cos_sin(torch.arange(3, device=device), dim, dtype)
    q = torch.randn(2, 4, 3, dim, device=device).to(dtype)                      # contiguous (B, H, T, D)
    fused = torch.randn(2, 3, 6, dim, device=device).to(dtype).transpose(1, 2)  # q and k of one buffer
    check_rope("rope contiguous q", q, fused[:, 4:], cos, sin)
    check_rope("rope fused qk views", fused[:, :4], fused[:, 4:], cos, sin)


def test_backward_is_the_transpose_for_any_cos_sin(device):
    """Random cos/sin (halves differ): the backward is the exact transpose, not just rotation by -theta."""
    q, k = projections(2, 3, 2, 1, 32, torch.float32, device)
    cos, sin = torch.randn(2, 3, 32, device=device), torch.randn(2, 3, 32, device=device)
    check_rope("rope random cos/sin", q, k, cos, sin)
    check_rope("rope random cos/sin interleaved", q, k, cos, sin, interleaved=True)


def test_one_launch_for_q_and_k(device):
    LAUNCHES.clear()
    q, k = projections(2, 3, 4, 2, 64, torch.float32, device)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = cos_sin(torch.arange(3, device=device), 64, torch.float32)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert dict(LAUNCHES) == {"rope_kernel": 1}
    (q_rot.sum() + k_rot.sum()).backward()
    assert dict(LAUNCHES) == {"rope_kernel": 2}


def test_layout_and_no_copies(device, monkeypatch):
    q, k = projections(2, 5, 4, 2, 64, torch.float16, device)
    q.requires_grad_()
    cos, sin = cos_sin(torch.arange(5, device=device), 64, torch.float16)
    q_in, k_in = q.detach().clone(), k.clone()
    for method in ("contiguous", "clone"):
        monkeypatch.setattr(torch.Tensor, method, lambda *a, **kw: pytest.fail(f"apply_rotary called {method}"))
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    (dq,) = torch.autograd.grad(q_rot, q, torch.ones_like(q_rot))
    monkeypatch.undo()
    # New tensors in the layout of the inputs (the transposed (B, T, H, D) buffer), inputs untouched.
    assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()
    assert q_rot.data_ptr() != q.data_ptr() and k_rot.data_ptr() != k.data_ptr()
    assert torch.equal(q.detach(), q_in) and torch.equal(k, k_in)
    assert dq.shape == q.shape


@pytest.mark.parametrize("shape", [(2, 4, 0, 64), (0, 4, 3, 64)])
def test_empty_inputs(shape, device):
    LAUNCHES.clear()
    batch, hq, seq, dim = shape
    q = torch.randn(shape, device=device, requires_grad=True)
    k = torch.randn(batch, 2, seq, dim, device=device, requires_grad=True)
    cos, sin = torch.randn(seq, dim, device=device), torch.randn(seq, dim, device=device)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    (q_rot.sum() + k_rot.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert sum(LAUNCHES.values()) == 0


def test_bad_arguments(device):
    q, k = projections(2, 3, 4, 2, 64, torch.float32, device)
    cos, sin = cos_sin(torch.arange(3, device=device), 64, torch.float32)
    cases = [
        (TypeError, "q must be a torch.Tensor", ([1.0], k, cos, sin)),
        (TypeError, "k must have dtype.*float64", (q, k.double(), cos, sin)),
        (TypeError, "q must have dtype.*int64", (q.long(), k, cos, sin)),
        (ValueError, "q must have 4 dimensions", (q[0], k, cos, sin)),
        (ValueError, "k must have 4 dimensions", (q, k[0], cos, sin)),
        (ValueError, "k must have shape .*T = 3", (q, k[:, :, :2], cos, sin)),
        (ValueError, "k must have shape .*B = 2", (q, k[:1], cos, sin)),
        (ValueError, "k must have shape .*D = 64", (q, k[..., :32], cos, sin)),
        (ValueError, "head dim D must be even.*63", (q[..., :63], k[..., :63], cos[:, :63], sin[:, :63])),
        (ValueError, "cos must have shape", (q, k, cos[:2], sin)),
        (ValueError, "sin must have shape", (q, k, cos, sin[None, None])),
        (ValueError, "cos must have shape", (q, k, cos[None].expand(3, 3, 64), sin)),
        (TypeError, "cos must have dtype.*int64", (q, k, cos.long(), sin)),
        (TypeError, "k must have the same dtype as q", (q, k.half(), cos, sin)),
        (ValueError, "sin must have the same device as q", (q, k, cos, torch.empty(3, 64, device="meta"))),
        (ValueError, "k must have the same device as q", (q, torch.empty(2, 2, 3, 64, device="meta"), cos, sin)),
    ]
    for error, match, args in cases:
        with pytest.raises(error, match=match):
            apply_rotary(*args)
    big = torch.randn(1, 1, 1, 258, device=device)
    with pytest.raises(ValueError, match="head dim D must be <= 256"):
        apply_rotary(big, big, big[0, 0], big[0, 0])
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        apply_rotary(q, k, cos, sin, interleaved="yes")


def test_custom_op_and_torch_compile(device):
    """The launcher is an opaque custom op: fake shapes/strides agree, and a compiled graph has no break."""
    q, k = projections(2, 3, 4, 2, 32, torch.float16, device)
    cos, sin = cos_sin(torch.arange(3, device=device), 32, torch.float16)
    for interleaved, backward, out_dtype in [(False, False, torch.float16), (True, True, torch.float32)]:
        torch.library.opcheck(rope.op, (q, k, cos, sin, interleaved, backward, out_dtype))

    def attention_inputs(q, k):
        q_rot, k_rot = apply_rotary(q, k, cos, sin)
        return q_rot * 2, k_rot

    q = q.float().requires_grad_()
    k = k.float()
    cos, sin = cos.float(), sin.float()
    LAUNCHES.clear()
    compiled = torch.compile(attention_inputs, backend="aot_eager", fullgraph=True)
    q_rot, k_rot = compiled(q, k)
    (dq,) = torch.autograd.grad(q_rot.sum() + k_rot.sum(), q)
    assert dict(LAUNCHES) == {"rope_kernel": 2}
    expected = attention_inputs(q, k)
    torch.testing.assert_close((q_rot, k_rot), expected, rtol=0, atol=0)
    torch.testing.assert_close(dq, torch.autograd.grad(expected[0].sum(), q)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("table_shape", ["BTD", "TD", "1TD"])
def test_cos_sin_gradients(dtype, interleaved, table_shape, device):
    """cos/sin that require grad get gradients (trainable or rescaled tables), by the 2x rule: summed
    over heads, and over the batch for a (T, D) or (1, T, D) table shared by every batch."""
    batch, seq, dim = 2, 5, 64
    q, k = projections(batch, seq, 4, 2, dim, dtype, device)
    positions = torch.arange(seq, device=device)
    if table_shape == "BTD":
        positions = positions + torch.tensor([[0], [7]], device=device)
    cos, sin = cos_sin(positions, dim, dtype, interleaved)
    if table_shape == "1TD":
        cos, sin = cos[None], sin[None]
    LAUNCHES.clear()
    check_against_oracle(
        f"rope cos/sin grads {table_shape} interleaved={interleaved}",
        lambda q, k, c, s: apply_rotary(q, k, c, s, interleaved),
        lambda q, k, c, s: reference.apply_rotary(q, k, c, s, interleaved),
        [q, k, cos, sin],
    )
    assert dict(LAUNCHES) == {"rope_kernel": 2}


def test_cos_sin_gradients_only(device):
    """Only the tables require grad: they get theirs, no backward kernel runs for q and k."""
    q, k = projections(1, 4, 2, 1, 32, torch.float32, device)
    cos, sin = (t.requires_grad_() for t in cos_sin(torch.arange(4, device=device), 32, torch.float32))
    LAUNCHES.clear()
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    dcos, dsin = torch.autograd.grad(q_rot.sum() + k_rot.sum(), (cos, sin))
    assert dict(LAUNCHES) == {"rope_kernel": 1}
    e_cos, e_sin = (t.detach().requires_grad_() for t in (cos, sin))
    eq, ek = reference.apply_rotary(q, k, e_cos, e_sin)
    torch.testing.assert_close((dcos, dsin), torch.autograd.grad(eq.sum() + ek.sum(), (e_cos, e_sin)))


@pytest.mark.parametrize("q_dtype,table_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("interleaved", [False, True])
def test_tables_of_another_dtype_promote(q_dtype, table_dtype, interleaved, device):
    """float32 cos/sin with half-precision q and k (transformers under autocast): outputs in the
    promoted dtype, as eager gives, gradients of q and k in their own dtype (and of the tables)."""
    q, k = projections(2, 5, 4, 2, 64, q_dtype, device)
    cos, sin = cos_sin(torch.arange(3, 8, device=device), 64, table_dtype, interleaved)
    q_rot, k_rot = check_against_oracle(
        f"rope {q_dtype} with {table_dtype} tables",
        lambda q, k, c, s: apply_rotary(q, k, c, s, interleaved),
        lambda q, k, c, s: reference.apply_rotary(q, k, c, s, interleaved),
        [q, k, cos, sin],
    )
    assert q_rot.dtype == k_rot.dtype == torch.promote_types(q_dtype, table_dtype)
