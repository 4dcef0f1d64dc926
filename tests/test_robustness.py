"""Robustness across every public op: numerical edge cases, determinism, empty inputs, the eager
fallback without a kernel runtime, and property-based fuzzing of shapes, strides and dtypes."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.attention import flash_decode
from helpers import DTYPES, as_tuple, assert_like_eager, check_against_oracle, grads, leaf

settings.register_profile(
    "llama_kernels", max_examples=8, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("llama_kernels")


@pytest.fixture(autouse=True)
def seeded():
    """Every test here draws its inputs from seed 0: what ran before on this xdist worker (which
    depends on how files are spread over workers) must not choose them."""
    torch.manual_seed(0)


def _rope_tables(t, d, device, dtype, start=0):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    return reference.rotary_cos_sin(torch.arange(start, start + t, device=device), inv_freq, dtype)


def _op_inputs(device, dtype=torch.float16):
    """One small, valid call of every public op: name -> (kernel fn, reference fn, inputs)."""
    x = torch.randn(5, 96, device=device, dtype=dtype)
    q = torch.randn(2, 4, 9, 32, device=device, dtype=dtype)
    k, v = torch.randn(2, 2, 2, 9, 32, device=device, dtype=dtype).unbind(0)
    cos, sin = _rope_tables(9, 32, device, dtype)
    return {
        "rms_norm": (lk.rms_norm, reference.rms_norm, [x, torch.randn(96, device=device, dtype=dtype)]),
        "swiglu": (lk.swiglu, reference.swiglu, [x, torch.randn_like(x)]),
        "apply_rotary": (lambda q, k: lk.apply_rotary(q, k, cos, sin),
                         lambda q, k: reference.apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype)), [q, k]),
        "flash_attention": (lk.flash_attention, reference.flash_attention, [q, k, v]),
    }


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "apply_rotary", "flash_attention"])
def test_bitwise_deterministic_forward_and_backward(op, device):
    kernel, _, inputs = _op_inputs(device)[op]
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outs = kernel(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.manual_seed(1)
        sum((o.float() * torch.randn_like(o.float())).sum() for o in outs).backward()
        runs.append([*outs, *(t.grad for t in leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b), f"{op}: two identical runs differ"


def test_fp16_rms_norm_near_fp16_max(device):
    """Squares of 6e4 overflow fp16: the statistics must be float32."""
    x = torch.full((3, 1000), 6e4, device=device, dtype=torch.float16)
    x[1] = -6e4
    x[2, ::2] = 1.0
    w = torch.ones(1000, device=device, dtype=torch.float16)
    check_against_oracle("rms_norm 6e4", lk.rms_norm, reference.rms_norm, [x, w])


def test_attention_large_logits_finite_and_accurate(device):
    q = torch.randn(1, 2, 20, 64, device=device) * 12.0  # scores ~ 1e4 after scaling
    k = torch.randn(1, 2, 20, 64, device=device) * 12.0
    v = torch.randn(1, 2, 20, 64, device=device)
    check_against_oracle("attention large logits", lk.flash_attention, reference.flash_attention, [q, k, v])


def test_attention_rows_without_keys_are_zero(device):
    q, k, v = (torch.randn(1, 2, t, 32, device=device, requires_grad=True) for t in (9, 4, 4))
    o = lk.flash_attention(q, k, v, causal=True)  # query i sees keys j <= i - 5
    assert torch.isfinite(o).all() and (o[:, :, :5] == 0).all()
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "apply_rotary", "flash_attention"])
def test_empty_inputs_give_empty_outputs(op, device):
    dtype = torch.float16
    if op == "rms_norm":
        out = lk.rms_norm(torch.randn(0, 64, device=device, dtype=dtype), torch.ones(64, device=device, dtype=dtype))
        assert out.shape == (0, 64)
    elif op == "swiglu":
        assert lk.swiglu(*torch.randn(2, 0, 7, 64, device=device, dtype=dtype)).shape == (0, 7, 64)
    elif op == "apply_rotary":
        cos, sin = _rope_tables(0, 32, device, dtype)
        q, k = lk.apply_rotary(torch.randn(1, 4, 0, 32, device=device, dtype=dtype),
                               torch.randn(1, 2, 0, 32, device=device, dtype=dtype), cos, sin)
        assert q.shape == (1, 4, 0, 32) and k.shape == (1, 2, 0, 32)
    else:
        q = torch.randn(0, 4, 3, 32, device=device, dtype=dtype)
        k = torch.randn(0, 2, 3, 32, device=device, dtype=dtype)
        assert lk.flash_attention(q, k, k).shape == (0, 4, 3, 32)


def test_cpu_without_interpreter_falls_back_with_one_warning():
    """No GPU and no TRITON_INTERPRET: each op warns once (per op, however often it is called),
    launches nothing and returns exactly the reference result; apply_kernels says so too."""
    script = textwrap.dedent("""
        import warnings, torch
        import llama_kernels as lk
        from llama_kernels import reference
        from llama_kernels.ops.common import KernelFallbackWarning, LAUNCHES
        x, w = torch.randn(3, 64), torch.randn(64)
        q, k, cos = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(3, 16)
        calls = {
            "rms_norm": ((x, w), reference.rms_norm),
            "swiglu": ((x, x), reference.swiglu),
            "apply_rotary": ((q, k, cos, cos), reference.apply_rotary),
            "flash_attention": ((q, k, k), reference.flash_attention),
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for _ in range(3):
                for name, (args, ref) in calls.items():
                    out, expected = getattr(lk, name)(*args), ref(*args)
                    out, expected = (o if isinstance(o, tuple) else (o,) for o in (out, expected))
                    assert all(torch.equal(a, b) for a, b in zip(out, expected)), name
        fallbacks = [str(c.message) for c in caught if issubclass(c.category, KernelFallbackWarning)]
        assert len(fallbacks) == 4 and all(any(n in m for m in fallbacks) for n in calls), fallbacks
        assert not LAUNCHES
        from llama_kernels.model import Llama, LlamaConfig
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lk.apply_kernels(Llama(LlamaConfig(50, 32, 64, 1, 2, 1)))
        assert any("eager PyTorch reference" in str(c.message) for c in caught)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --- property-based fuzzing ------------------------------------------------------------------

dtypes = st.sampled_from(DTYPES)


def _maybe_strided(t, draw_flag):
    """``t`` itself, or the same values in a non-contiguous view (a slice of a wider buffer)."""
    if not draw_flag:
        return t
    wide = torch.empty(*t.shape[:-1], t.shape[-1] + 3, device=t.device, dtype=t.dtype)
    wide[..., 1:-2] = t
    return wide[..., 1:-2]


@given(rows=st.integers(1, 6), hidden=st.integers(1, 700), dtype=dtypes, strided=st.booleans(),
       fused=st.booleans())
def test_fuzz_rms_norm(rows, hidden, dtype, strided, fused, device):
    x = _maybe_strided(torch.randn(rows, hidden, device=device, dtype=dtype), strided)
    w = torch.randn(hidden, device=device, dtype=dtype)
    if fused:
        check_against_oracle("rms_norm", lambda x, w, r: lk.rms_norm(x, w, residual=r),
                             lambda x, w, r: reference.rms_norm(x, w, residual=r), [x, w, torch.randn_like(x)])
    else:
        check_against_oracle("rms_norm", lk.rms_norm, reference.rms_norm, [x, w])


@given(rows=st.integers(1, 5), width=st.integers(1, 900), dtype=dtypes, fused_halves=st.booleans())
def test_fuzz_swiglu(rows, width, dtype, fused_halves, device):
    if fused_halves:
        gate, up = torch.randn(rows, 2 * width, device=device, dtype=dtype).chunk(2, -1)
    else:
        gate, up = torch.randn(2, rows, width, device=device, dtype=dtype).unbind(0)
    check_against_oracle("swiglu", lk.swiglu, reference.swiglu, [gate, up])


@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.integers(1, 3), t=st.integers(1, 12),
       half_d=st.integers(1, 64), dtype=dtypes, start=st.integers(0, 50), transposed=st.booleans())
def test_fuzz_rope(b, hk, group, t, half_d, dtype, start, transposed, device):
    d, hq = 2 * half_d, hk * group
    cos, sin = _rope_tables(t, d, device, dtype, start)
    if transposed:
        q = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, t, hk, d, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, t, d, device=device, dtype=dtype)
        k = torch.randn(b, hk, t, d, device=device, dtype=dtype)
    check_against_oracle("apply_rotary", lambda q, k: lk.apply_rotary(q, k, cos, sin),
                         lambda q, k: reference.apply_rotary(q, k, cos.to(q.dtype), sin.to(q.dtype)), [q, k])


@given(b=st.integers(1, 2), hk=st.integers(1, 2), group=st.integers(1, 3), tq=st.integers(1, 40),
       extra=st.integers(0, 40), d=st.sampled_from([16, 32, 48, 64]), dtype=dtypes, causal=st.booleans())
def test_fuzz_attention(b, hk, group, tq, extra, d, dtype, causal, device):
    tk = tq + extra
    q = torch.randn(b, tq, hk * group, d, device=device, dtype=dtype).transpose(1, 2)
    k, v = torch.randn(2, b, tk, hk, d, device=device, dtype=dtype).transpose(2, 3).unbind(0)
    check_against_oracle("flash_attention", lambda q, k, v: lk.flash_attention(q, k, v, causal=causal),
                         lambda q, k, v: reference.flash_attention(q, k, v, causal=causal), [q, k, v])


# --- autocast and mixed dtypes -----------------------------------------------------------------


def _heads(qk):
    """(B, T, 64) -> q (B, 2, T, 16), k (B, 2, T, 16): transposed head views of one projection."""
    return qk.view(*qk.shape[:2], 4, 16).transpose(1, 2).chunk(2, 1)


def _autocast_cases(device):
    """name -> (kernel fn, eager fn, inputs, differentiable): each op as a model calls it under
    autocast, where linear outputs are half precision while the residual stream, the RoPE tables
    and what came through them stay float32."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    x, proj, weight, stream = randn(2, 5, 64), randn(64, 64) / 8, 1 + 0.1 * randn(64), randn(2, 5, 64)
    cos, sin = reference.rotary_cos_sin(torch.arange(7, device=device), torch.rand(8, device=device), torch.float32)
    qk = randn(2, 6, 7, 32) * 3  # q (4 heads) and k (2 heads), float32 after float32 RoPE
    k_cache, v_cache = randn(2, 2, 40, 32), randn(2, 2, 40, 32, dtype=torch.bfloat16)
    lengths = torch.tensor([3, 40], dtype=torch.int32, device=device)

    def split(op):
        return lambda qk, v: op(qk[:, :4], qk[:, 4:], v)

    return {
        # half block output + float32 residual stream: h and y promote to float32
        "rms_norm_residual": (
            lambda x, p, w, r: lk.rms_norm(F.linear(x, p), w, 1e-5, residual=r),
            lambda x, p, w, r: reference.rms_norm(F.linear(x, p), w, 1e-5, residual=r),
            [x, proj, weight, stream], True),
        # half gate from a projection, float32 up: promotes
        "swiglu": (lambda x, p, u: lk.swiglu(F.linear(x, p), u),
                   lambda x, p, u: reference.swiglu(F.linear(x, p), u), [x, proj, stream], True),
        # half q, k from one projection, float32 tables (here trainable too): float32 outputs
        "apply_rotary": (lambda x, p, c, s: lk.apply_rotary(*_heads(F.linear(x, p)), c, s),
                         lambda x, p, c, s: reference.apply_rotary(*_heads(F.linear(x, p)), c, s),
                         [randn(2, 7, 64), proj, cos, sin], True),
        # float32 q, k with a half v: all cast to the autocast dtype, as SDPA / matmul cast them
        "flash_attention": (split(lk.flash_attention), split(reference.flash_attention),
                            [qk, randn(2, 2, 7, 32, dtype=torch.bfloat16)], True),
        "flash_attention_decode_path": (lk.flash_attention, reference.flash_attention,
                                        [randn(2, 4, 1, 32), k_cache, v_cache], False),
        "flash_decode": (lambda q, k, v: flash_decode(q, k, v, lengths),
                         lambda q, k, v: reference.flash_decode(q, k, v, lengths),
                         [randn(2, 4, 1, 32), k_cache, v_cache], False),
    }


AUTOCAST_OPS = list(_autocast_cases("cpu"))


def _autocast_dtypes(device):
    return [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.bfloat16]


@pytest.mark.parametrize("op", AUTOCAST_OPS)
def test_under_autocast_like_eager(op, device):
    """Under torch.autocast each op takes what its eager twin takes (mixed dtypes included) and
    gives what the twin gives under the same autocast: the same output dtype, errors against the
    float64 oracle (run without autocast) by the 2x rule, gradients in each input's own dtype."""
    kernel_fn, eager_fn, inputs, differentiable = _autocast_cases(device)[op]
    for dtype in _autocast_dtypes(device):
        k_in, e_in = ([leaf(t) if differentiable else t for t in inputs] for _ in range(2))
        o_in = [leaf(t, torch.float64) if differentiable else t.double() for t in inputs]
        LAUNCHES.clear()
        with torch.autocast(device.type, dtype=dtype), torch.set_grad_enabled(differentiable):
            k_out, e_out = as_tuple(kernel_fn(*k_in)), as_tuple(eager_fn(*e_in))
        assert LAUNCHES, f"{op}: no kernel ran"
        o_out = as_tuple(eager_fn(*o_in))
        for i, (k, e, o) in enumerate(zip(k_out, e_out, o_out)):
            assert_like_eager(f"{op} {dtype} output {i}", k, o, e)
        if differentiable:
            cots = [torch.randn(o.shape, device=device).to(e.dtype) for o, e in zip(o_out, e_out)]
            k_g, e_g, o_g = grads(k_out, k_in, cots), grads(e_out, e_in, cots), grads(o_out, o_in, cots)
            for i, (k, e, o) in enumerate(zip(k_g, e_g, o_g)):
                assert k.dtype == inputs[i].dtype, f"{op} grad of input {i}: {k.dtype}"
                assert_like_eager(f"{op} {dtype} grad of input {i}", k, o, e)


@pytest.mark.parametrize("op", AUTOCAST_OPS)
def test_under_autocast_compiles_to_one_graph(op, device):
    """The same calls under torch.compile(fullgraph=True) inside autocast: one graph, the kernels
    launched, and bit for bit what the uncompiled ops give (outputs and gradients)."""
    kernel_fn, _, inputs, differentiable = _autocast_cases(device)[op]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(kernel_fn, backend=counter, fullgraph=True)
    c_in, k_in = ([leaf(t) if differentiable else t for t in inputs] for _ in range(2))
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(differentiable):
        LAUNCHES.clear()
        c_out = as_tuple(compiled(*c_in))
        assert LAUNCHES, f"{op}: no kernel ran"
        k_out = as_tuple(kernel_fn(*k_in))
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(c_out, k_out))
    if differentiable:
        cots = [torch.randn_like(o) for o in k_out]
        c_g = torch.autograd.grad(c_out, c_in, cots)
        k_g = torch.autograd.grad(k_out, k_in, cots)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(c_g, k_g))
    torch._dynamo.reset()
