"""flash_attention, training path (forward + dQ/dK/dV kernels), against the float64 oracle."""
import warnings

import numpy as np
import pytest
import torch

from llama_kernels import reference
from llama_kernels.ops.attention import backward as attention_backward, forward as attention_forward
from llama_kernels.ops.attention import flash_attention
from llama_kernels.ops.common import INTERPRET, LAUNCHES
from helpers import DTYPES, check_against_oracle, leaf

@pytest.fixture(autouse=True)
def _seed():
    # Reproducible data: the 2x-of-eager rule compares two max errors, a statistic that varies
    # from draw to draw (kernel/eager ratios measured over 20-30 seeds: mean 0.6-1.1, max ~1.6).
    torch.manual_seed(0)


FORWARD_KERNELS = ("attention_fwd_kernel", "attention_fwd_tma_kernel")
BACKWARD_KERNELS = (
    "attention_bwd_preprocess_kernel", "attention_bwd_fused_kernel", "attention_bwd_dkdv_kernel",
    "attention_bwd_dq_kernel", "attention_bwd_reduce_kernel",
)


def expected_backward_launches(q, k):
    """Launches of one backward: preprocess (half precision), then either the fused kernel plus
    the dQ reduce, or (float32, deterministic mode) the dQ and dK/dV kernels; two more reduces
    when the KV group's heads are split over programs."""
    batch, heads, _, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    fused = attention_backward.fused_backward(q.dtype)
    splits = attention_backward.head_splits(batch, kv_heads, seq_k, heads // kv_heads, q.device)
    launches = {
        "attention_bwd_preprocess_kernel": int(q.dtype != torch.float32),
        "attention_bwd_fused_kernel": int(fused),
        "attention_bwd_dkdv_kernel": int(not fused),
        "attention_bwd_dq_kernel": int(not fused),
        "attention_bwd_reduce_kernel": int(fused) + 2 * (splits > 1),
    }
    return launches


def make_qkv(b, hq, hk, tq, tk, d, dtype, device, layout="bhtd", scale=1.0):
    """q, k, v with the given logical shapes; ``layout="bthd"`` gives transposed views of
    ``(B, T, H, D)`` projections, as a LLaMA attention block produces them."""
    def rand(h, t):
        if layout == "bthd":
            return (torch.randn(b, t, h, d, device=device) * scale).to(dtype).transpose(1, 2)
        return (torch.randn(b, h, t, d, device=device) * scale).to(dtype)

    return rand(hq, tq), rand(hk, tk), rand(hk, tk)


def check(name, q, k, v, causal=True, sm_scale=None, backward=True):
    """Forward and (with ``backward``) the three gradients against the oracle by the 2x rule."""
    LAUNCHES.clear()
    out = check_against_oracle(
        name,
        lambda q, k, v: flash_attention(q, k, v, causal, sm_scale),
        lambda q, k, v: reference.flash_attention(q, k, v, causal, sm_scale),
        [q, k, v],
        backward=backward,
    )
    # check_against_oracle's inputs require grad, so the training kernels (not decode) ran.
    assert sum(LAUNCHES[name] for name in FORWARD_KERNELS) == 1, dict(LAUNCHES)
    if backward:
        launched = {name: LAUNCHES[name] for name in BACKWARD_KERNELS}
        assert launched == expected_backward_launches(q, k), dict(LAUNCHES)
    return out


# (B, Hq, Hk, Tq, Tk, D, causal): GQA groups 3, 4, 4 (MQA) and 1; ragged lengths; chunked
# prefill, single decode steps with gradients, Tq > Tk, a longer sequence over many tiles; head
# dims 64, 96 (padded to 128), 128.
SHAPES = [
    (2, 9, 3, 37, 37, 64, True),
    (1, 8, 2, 50, 50, 128, True),
    (2, 4, 1, 70, 70, 96, False),
    (1, 2, 2, 70, 70, 64, True),
    (1, 4, 2, 16, 80, 128, True),
    (2, 4, 4, 1, 77, 64, True),
    (1, 6, 2, 1, 130, 96, False),
    (1, 4, 2, 50, 37, 64, False),
    (3, 2, 1, 200, 200, 64, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_h{}-{}_t{}-{}_d{}_{}".format(
    *s[:6], "causal" if s[6] else "full"))
def test_matches_oracle(shape, dtype, device):
    b, hq, hk, tq, tk, d, causal = shape
    q, k, v = make_qkv(b, hq, hk, tq, tk, d, dtype, device)
    check(f"attention {shape} {dtype}", q, k, v, causal)


@pytest.mark.parametrize("head_dim", [16, 48, 256])
def test_other_head_dims(head_dim, device):
    dtype = torch.bfloat16 if head_dim == 256 else torch.float16
    q, k, v = make_qkv(1, 4, 2, 33, 33, head_dim, dtype, device)
    check(f"attention D={head_dim}", q, k, v, causal=True)


def test_custom_sm_scale_float32(device):
    q, k, v = make_qkv(2, 4, 2, 24, 40, 64, torch.float32, device)
    check("attention sm_scale=0.3", q, k, v, causal=True, sm_scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_inputs_without_copies(dtype, device):
    b, hq, hk, t, d = 2, 4, 2, 45, 64
    # Transposed views of (B, T, H, D) projections.
    q, k, v = make_qkv(b, hq, hk, t, t, d, dtype, device, layout="bthd")
    assert not q.is_contiguous() and not k.is_contiguous()
    check("attention (B,T,H,D) views", q, k, v)
    # q, k, v as slices of one fused projection output (B, T, (Hq + 2 Hk) * D).
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
    v = qkv[..., (hq + hk) * d:].view(b, t, hk, d).transpose(1, 2)
    check("attention fused-qkv views", q, k, v)
    # A KV-cache slice: cache[:, :, :L] of a (B, Hk, Lmax, D) buffer, 16 new queries.
    cache_k = torch.randn(b, hk, 96, d, device=device).to(dtype)
    cache_v = torch.randn(b, hk, 96, d, device=device).to(dtype)
    q = torch.randn(b, hq, 16, d, device=device).to(dtype)
    check("attention KV-cache view", q, cache_k[:, :, :61], cache_v[:, :, :61])


def test_non_unit_head_dim_stride(device):
    base = torch.randn(1, 4, 30, 128, device=device, dtype=torch.float16)
    q = base[..., ::2]  # head-dim stride 2
    k, v = base[:, :2, :, 1::2], base[:, 2:, :, ::2]
    check("attention head-dim stride 2", q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_keys_are_zero(dtype, device):
    """Causal with Tq > Tk: the first Tq - Tk queries see no key; zeros out, finite zero grads."""
    q, k, v = make_qkv(2, 4, 2, 40, 20, 64, dtype, device)
    (o,) = check("attention Tq > Tk", q, k, v, causal=True)
    assert torch.equal(o[:, :, :20], torch.zeros_like(o[:, :, :20]))
    qg, kg, vg = leaf(q), leaf(k), leaf(v)
    flash_attention(qg, kg, vg, causal=True).float().square().sum().backward()
    for g in (qg.grad, kg.grad, vg.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(qg.grad[:, :, :20], torch.zeros_like(qg.grad[:, :, :20]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits(dtype, device):
    """Scores around 1e4 stay finite and accurate (the online softmax subtracts the running max).

    A large common component (head-dim coordinate 0 of every q and k) adds ~1e4 to every score
    of a row, which leaves the softmax itself ordinary, so the gradients are a meaningful check.
    """
    q, k, v = make_qkv(1, 4, 2, 40, 40, 64, torch.float32, device)
    q[..., 0], k[..., 0] = 283.0, 283.0  # 283**2 / sqrt(64) ~ 1e4
    (o,) = check("attention large logits", q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert torch.isfinite(o).all()


def test_huge_logits_one_hot(device):
    """q, k scaled by 100: scores ~1e4 with gaps of hundreds, so the softmax is one-hot in float32.

    The forward is checked by the 2x rule.  The gradients are ~0 in exact arithmetic, and eager
    float32 happens to get them exactly (``P * (dP - sum(P dP))`` cancels bit for bit when ``P`` is
    exactly one-hot), so the 2x rule would demand exact zeros.  Any flash backward computes
    ``Delta = rowsum(dO * O)`` with a different summation order than ``dP = dO V^T`` and leaves one
    float32 rounding of ``dP`` in ``dS``; the check bounds the error by that rounding carried
    through ``dS K``: ``eps * D * |dO| |V| * |K| * sm_scale``.
    """
    d = 64
    q, k, v = make_qkv(1, 4, 2, 40, 40, d, torch.float32, device)
    q, k = q * 100, k * 100
    check("attention one-hot logits", q, k, v, causal=True, backward=False)
    kernel_in = [leaf(t) for t in (q, k, v)]
    oracle_in = [leaf(t, torch.float64) for t in (q, k, v)]
    flash_attention(*kernel_in, causal=True).sum().backward()
    reference.flash_attention(*oracle_in, causal=True).sum().backward()
    bound = torch.finfo(torch.float32).eps * d * v.abs().max() * k.abs().max() * d ** -0.5
    for name, kt, ot in zip("qkv", kernel_in, oracle_in):
        assert torch.isfinite(kt.grad).all()
        err = (kt.grad.double() - ot.grad).abs().max()
        assert err <= bound, f"d{name}: error {err:.3g} > {bound:.3g}"


@pytest.fixture
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic(device, deterministic_algorithms):
    """With deterministic algorithms on, two backwards give the same bits (no atomics)."""
    q, k, v = make_qkv(2, 8, 2, 45, 45, 64, torch.bfloat16, device)
    results = []
    for _ in range(2):
        LAUNCHES.clear()
        qg, kg, vg = leaf(q), leaf(k), leaf(v)
        o = flash_attention(qg, kg, vg, causal=True)
        o.backward(torch.ones_like(o))
        results.append((o, qg.grad, kg.grad, vg.grad))
        assert LAUNCHES["attention_bwd_fused_kernel"] == 0 and LAUNCHES["attention_bwd_dkdv_kernel"] == 1
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[7]],
                         ids=["gqa3_ragged", "full_d96", "chunk", "full_tq_gt_tk"])
def test_deterministic_schedule_matches_oracle(shape, dtype, device, deterministic_algorithms):
    """Half precision in deterministic mode: separate dQ and dK/dV kernels, by the 2x rule too."""
    b, hq, hk, tq, tk, d, causal = shape
    q, k, v = make_qkv(b, hq, hk, tq, tk, d, dtype, device)
    check(f"attention deterministic {shape} {dtype}", q, k, v, causal)


@pytest.mark.parametrize("min_programs", [0, 1000], ids=["one_program_per_kv_head", "heads_split"])
def test_head_splits(min_programs, kernel_opts, device):
    """dK/dV with the KV group's query heads in one program, or split over programs (float32
    partials summed by the reduce kernel): both schedules, both by the 2x rule."""
    kernel_opts(min_programs_per_sm=min_programs)
    q, k, v = make_qkv(2, 8, 2, 40, 40, 64, torch.float16, device)
    assert attention_backward.head_splits(2, 2, 40, 4, q.device) == (1 if min_programs == 0 else 4)
    check(f"attention head splits {min_programs}", q, k, v, causal=True)
    torch.use_deterministic_algorithms(True)
    try:
        check(f"attention head splits {min_programs} deterministic", q, k, v, causal=True)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs TMA descriptors without a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4], (1, 4, 2, 40, 20, 64, True), SHAPES[7]],
                         ids=["gqa3_ragged", "full_d96", "chunk", "tq_gt_tk", "full_tq_gt_tk"])
def test_tma_forward(shape, dtype, kernel_opts, device):
    """The Hopper forward (TMA descriptors, warp-specialised loop) on (B, T, H, D) views: ragged
    T and padded D come from the descriptors' zero fill; by the 2x rule, gradients included."""
    kernel_opts(tma_forward=True)
    b, hq, hk, tq, tk, d, causal = shape
    q, k, v = make_qkv(b, hq, hk, tq, tk, d, dtype, device, layout="bthd")
    LAUNCHES.clear()
    (o, *_) = check(f"attention TMA forward {shape} {dtype}", q, k, v, causal)
    assert LAUNCHES["attention_fwd_tma_kernel"] == 1 and LAUNCHES["attention_fwd_kernel"] == 0
    if causal and tq > tk:
        assert torch.equal(o[:, :, : tq - tk], torch.zeros_like(o[:, :, : tq - tk]))


def test_tma_forward_only_where_it_applies(kernel_opts, device):
    """Layouts a descriptor cannot take (head-dim stride 2, float32) run the portable kernel."""
    kernel_opts(tma_forward=True)
    base = torch.randn(1, 4, 30, 128, device=device, dtype=torch.float16)
    q, k, v = base[..., ::2], base[:, :2, :, 1::2], base[:, 2:, :, ::2]
    assert not attention_forward.uses_tma(q, k, v)
    assert not attention_forward.uses_tma(*(t.float() for t in (q, k, v)))
    dense = base[..., :64].contiguous()
    assert attention_forward.uses_tma(dense, dense[:, :2], dense[:, 2:])
    if INTERPRET:  # by default only an sm_90 GPU takes it
        kernel_opts(tma_forward=None)
        assert not attention_forward.uses_tma(dense, dense[:, :2], dense[:, 2:])


@pytest.mark.skipif(not INTERPRET, reason="interpreter tilings only")
@pytest.mark.parametrize("shape", [(1, 4, 2, 50, 50), (1, 2, 1, 16, 80), (1, 2, 2, 40, 20)])
def test_other_tilings(shape, kernel_opts, device):
    """Swap the tile orientation around the causal diagonal (and use equal 64-wide tiles)."""
    b, hq, hk, tq, tk = shape
    q, k, v = make_qkv(b, hq, hk, tq, tk, 64, torch.float16, device)
    for fwd, bwd in (((16, 32), (32, 16)), ((64, 64), (64, 64))):
        blocks = {"fwd": fwd, "fwd_tma": fwd, "dq": fwd, "dkdv": bwd, "bwd_fused": bwd}
        kernel_opts(interpreter_tiles=blocks)
        check(f"attention tiles {fwd} {shape}", q, k, v, causal=True)


@pytest.mark.skipif(not INTERPRET, reason="on the GPU this is the default path")
def test_gpu_operand_path_float16(kernel_opts, device):
    """Run the GPU's dot path (float16 operands straight into tl.dot, P and dS cast to float16)
    under the interpreter, whose float16 dots are sound (its bfloat16 ones are not)."""
    kernel_opts(interpreter_half_dots=True)
    for shape in [(2, 4, 2, 37, 37, 64), (1, 4, 1, 16, 80, 96), (1, 2, 2, 40, 20, 64)]:
        q, k, v = make_qkv(*shape, torch.float16, device)
        check(f"attention half operands {shape}", q, k, v, causal=True)


def test_torch_compile_fullgraph(device):
    """The launchers are opaque custom ops: torch.compile traces flash_attention without a graph
    break, forward and backward, and gets the eager call's bits."""
    q, k, v = make_qkv(1, 4, 2, 20, 20, 64, torch.float32, device)
    compiled = torch.compile(flash_attention, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (flash_attention, compiled):
        qg, kg, vg = leaf(q), leaf(k), leaf(v)
        o = fn(qg, kg, vg)
        o.backward(torch.ones_like(o))
        results.append((o, qg.grad, kg.grad, vg.grad))
    for eager_result, compiled_result in zip(*results):
        assert torch.equal(eager_result, compiled_result)


def test_empty_inputs(device):
    LAUNCHES.clear()
    for shape_q, shape_kv in [((0, 4, 8, 64), (0, 2, 8, 64)), ((2, 4, 0, 64), (2, 2, 8, 64))]:
        q = torch.randn(shape_q, device=device, requires_grad=True)
        k = torch.randn(shape_kv, device=device, requires_grad=True)
        v = torch.randn(shape_kv, device=device, requires_grad=True)
        o = flash_attention(q, k, v)
        assert o.shape == shape_q
        o.sum().backward()
        assert q.grad.shape == q.shape
    assert sum(LAUNCHES.values()) == 0  # nothing to launch
    q = torch.randn(1, 2, 3, 64, device=device)
    no_keys = torch.randn(1, 2, 0, 64, device=device)
    with pytest.raises(ValueError, match="k must hold at least one key"):
        flash_attention(q, no_keys, no_keys)


def test_validation(device):
    q = torch.randn(1, 4, 8, 64, device=device)
    k = torch.randn(1, 2, 8, 64, device=device)
    v = torch.randn(1, 2, 8, 64, device=device)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flash_attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="k must have dtype"):
        flash_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="v must have the same dtype as q"):
        flash_attention(q, k, v.half())
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have q's batch size"):
        flash_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="k must have q's head dim"):
        flash_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="v must have the shape of k"):
        flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="k's number of heads must divide"):
        flash_attention(q, k[:, :1].expand(1, 3, 8, 64), v[:, :1].expand(1, 3, 8, 64))
    with pytest.raises(ValueError, match="head dim must be a multiple of 16"):
        flash_attention(q[..., :40], k[..., :40], v[..., :40])
    big = torch.randn(1, 1, 2, 272, device=device)
    with pytest.raises(ValueError, match="head dim must be a multiple of 16"):
        flash_attention(big, big, big)
    with pytest.raises(TypeError, match="sm_scale must be a float"):
        flash_attention(q, k, v, sm_scale="0.1")
    with pytest.raises(ValueError, match="sm_scale must be > 0"):
        flash_attention(q, k, v, sm_scale=0.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attention(q, k, v, causal=1)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="k must have the same device as q"):
            flash_attention(q, k.cpu(), v)
    else:
        with pytest.raises(ValueError, match="k must have the same device as q"):
            flash_attention(q, k.to("meta"), v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuned configurations need a GPU")
def test_autotuned_long_sequence_gpu(device):
    q, k, v = make_qkv(1, 8, 2, 1024, 1024, 128, torch.bfloat16, device, layout="bthd")
    check("attention autotuned T=1024", q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(37, 29), (29, 37), (37, 37)])
def test_non_causal_ragged_tiles_compute_no_inf_or_nan(tq, tk, dtype, device):
    """Non-causal, lengths that are not multiples of the tiles, every score of a row negative (a
    common component -1600 / 8 = -200): the zero scores of a ragged key tile's padding rows would
    exceed the row max and overflow 2^x in the backward.  Those values are never stored, but the
    padding must be masked (as the causal path does) so that no inf/NaN is computed at all: such
    noise (the interpreter's "overflow encountered", "invalid value encountered in matmul") would
    hide a real NaN.  Every RuntimeWarning is an error here, pytest.ini's filters notwithstanding."""
    q, k, v = make_qkv(1, 4, 2, tq, tk, 64, torch.float32, device)
    q[..., 0], k[..., 0] = 40.0, -40.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check(f"attention non-causal ragged {tq}x{tk}", q.to(dtype), k.to(dtype), v.to(dtype), causal=False)


def test_sm_scale_is_any_finite_positive_real_number(device):
    """sm_scale: numpy scalars are numbers too; NaN, inf, bools and strings are refused by name."""
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, torch.float32, device)
    torch.testing.assert_close(flash_attention(q, k, v, sm_scale=np.float32(0.3)),
                               flash_attention(q, k, v, sm_scale=float(np.float32(0.3))), rtol=0, atol=0)
    for bad in (float("nan"), float("inf"), np.float64("inf")):
        with pytest.raises(ValueError, match="sm_scale must be a finite number"):
            flash_attention(q, k, v, sm_scale=bad)
    with pytest.raises(ValueError, match="sm_scale must be > 0"):
        flash_attention(q, k, v, sm_scale=np.float32(-1.0))
    with pytest.raises(TypeError, match="sm_scale must be a float"):
        flash_attention(q, k, v, sm_scale=True)
