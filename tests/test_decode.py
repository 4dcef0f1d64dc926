"""flash_attention's split-KV decode path (few queries, long KV cache) vs the float64 oracle."""
import pytest
import torch

from llama_kernels import reference
from llama_kernels.ops.attention import decode
from llama_kernels.ops.attention import flash_attention
from llama_kernels.ops.attention.configs import tile_family
from llama_kernels.ops.common import INTERPRET, LAUNCHES
from llama_kernels.ops.device import device_limits
from helpers import DTYPES, assert_like_eager, check_against_oracle

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # reproducible data for the 2x-of-eager comparisons


SPLIT, COMBINE = "attention_decode_split_kernel", "attention_decode_combine_kernel"


def check_decode(name, q, k, v, causal=True):
    """Run the decode path (no gradient needed), prove it ran, compare by the 2x rule."""
    LAUNCHES.clear()
    with torch.no_grad():
        out = flash_attention(q, k, v, causal)
    assert LAUNCHES[SPLIT] == 1 and LAUNCHES["attention_fwd_kernel"] == 0, dict(LAUNCHES)
    rows = q.shape[2] * q.shape[1] // k.shape[1]
    block_n = decode.decode_configs(q.shape[-1], q.dtype, rows, tile_family(device_limits(q.device)))[0][0]
    splits, _ = decode.decode_splits(q.shape[0], k.shape[1], k.shape[2], block_n, q.device)
    assert LAUNCHES[COMBINE] == (1 if splits > 1 else 0)
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), causal)
    assert_like_eager(name, out, oracle, reference.flash_attention(q, k, v, causal))
    return out, splits


# (B, Hq, Hk, Tq, Tk, D, causal): one decode step over short and long caches (several splits),
# GQA groups 4, 4, 3 and 1, a causal chunk of 4 new tokens, head dims 64, 96 (padded), 128.
CASES = [
    (2, 4, 1, 1, 77, 64, True),
    (1, 8, 2, 1, 130, 128, True),
    (1, 6, 2, 1, 600, 96, True),
    (2, 8, 2, 4, 300, 64, True),
    (1, 3, 3, 2, 520, 128, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_t{}-{}_d{}_{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_decode_matches_oracle(case, dtype, device):
    b, hq, hk, tq, tk, d, causal = case
    q = torch.randn(b, hq, tq, d, device=device).to(dtype)
    k = torch.randn(b, hk, tk, d, device=device).to(dtype)
    v = torch.randn(b, hk, tk, d, device=device).to(dtype)
    check_decode(f"decode {case} {dtype}", q, k, v, causal)


def test_long_cache_merges_several_splits(device):
    q = torch.randn(1, 4, 1, 64, device=device, dtype=torch.float16)
    k = torch.randn(1, 2, 600, 64, device=device, dtype=torch.float16)
    v = torch.randn(1, 2, 600, 64, device=device, dtype=torch.float16)
    _, splits = check_decode("decode 600 keys", q, k, v)
    assert splits > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv_cache_views(dtype, device):
    """K/V are cache[:, :, :L] slices of a preallocated (B, Hk, Lmax, D) buffer, q a transposed
    view of a (B, 1, Hq, D) projection: read through their strides."""
    b, hq, hk, d, lmax = 2, 8, 2, 128, 400
    cache_k = torch.randn(b, hk, lmax, d, device=device).to(dtype)
    cache_v = torch.randn(b, hk, lmax, d, device=device).to(dtype)
    q = torch.randn(b, 1, hq, d, device=device).to(dtype).transpose(1, 2)
    for length in (1, 37, 333):
        check_decode(f"decode cache[:{length}]", q, cache_k[:, :, :length], cache_v[:, :, :length])


def test_rows_without_keys_are_zero(device):
    q = torch.randn(1, 4, 8, 64, device=device)
    k = torch.randn(1, 2, 5, 64, device=device)
    v = torch.randn(1, 2, 5, 64, device=device)
    out, _ = check_decode("decode Tq > Tk", q, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))


def test_large_logits(device):
    q = torch.randn(1, 4, 2, 64, device=device)
    k = torch.randn(1, 1, 300, 64, device=device)
    v = torch.randn(1, 1, 300, 64, device=device)
    q[..., 0], k[..., 0] = 283.0, 283.0  # every score ~1e4
    check_decode("decode large logits", q, k, v)
    check_decode("decode one-hot logits", q * 100, k * 100, v)


def test_deterministic(device):
    q = torch.randn(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 600, 64, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 600, 64, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v), flash_attention(q, k, v))


def test_gradients_use_training_kernels(device):
    """With autograd needed the decode shape falls back to the differentiable training kernels."""
    q = torch.randn(1, 4, 1, 64, device=device)
    k = torch.randn(1, 2, 130, 64, device=device)
    v = torch.randn(1, 2, 130, 64, device=device)
    LAUNCHES.clear()
    check_against_oracle("decode shape with grads", flash_attention, reference.flash_attention, [q, k, v])
    assert LAUNCHES[SPLIT] == 0 and LAUNCHES["attention_fwd_kernel"] == 1
    assert LAUNCHES["attention_bwd_dq_kernel"] == 1


@pytest.mark.skipif(not INTERPRET, reason="on the GPU this is the default path")
def test_gpu_operand_path_float16(kernel_opts, device):
    """The GPU's float16 dot operands under the interpreter (sound for float16)."""
    kernel_opts(interpreter_half_dots=True)
    q = torch.randn(1, 8, 3, 96, device=device, dtype=torch.float16)
    k = torch.randn(1, 2, 600, 96, device=device, dtype=torch.float16)
    v = torch.randn(1, 2, 600, 96, device=device, dtype=torch.float16)
    check_decode("decode half operands", q, k, v)


def test_rule_and_split_count():
    assert decode.use_decode(1, 8, needs_grad=False)
    assert decode.use_decode(8, 8, needs_grad=False)
    assert not decode.use_decode(1, 8, needs_grad=True)
    assert not decode.use_decode(16, 8, needs_grad=False)
    for seq_k in (1, 63, 64, 600, 5000, 32768):
        for batch, heads in ((1, 1), (1, 8), (4, 8), (64, 8)):
            args = (batch, heads, seq_k, 32, torch.device("cpu"))
            splits, per_split = decode.decode_splits(*args)
            assert per_split % 32 == 0 and splits >= 1
            assert (splits - 1) * per_split < seq_k <= splits * per_split  # none empty
            assert (splits, per_split) == decode.decode_splits(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture(device):
    """A decode step is capturable: no host synchronisation, no data-dependent allocation."""
    q = torch.randn(1, 32, 1, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = flash_attention(q, k, v)  # warm-up: compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_attention(q, k, v)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flash_attention(q, k, v))
        assert not torch.equal(out, expected)
