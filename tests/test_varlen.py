"""flash_attention on packed (varlen) sequences: forward, both backward schedules and the decode
path, against the float64 oracle run sequence by sequence (``reference.varlen_attention``)."""
import itertools

import pytest
import torch

from llama_kernels import reference
from llama_kernels.ops.attention import backward as attention_backward, decode, tiles
from llama_kernels.ops.attention import flash_attention
from llama_kernels.ops.common import LAUNCHES
from helpers import DTYPES, check_against_oracle, leaf


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def offsets(lengths, device, start=0):
    return torch.tensor(list(itertools.accumulate(lengths, initial=start)), dtype=torch.int32,
                        device=device)


def packed(total, heads, d, dtype, device):
    """A transposed view ``(1, H, total, D)`` of a ``(total, H, D)`` projection, as a model
    packs its tokens."""
    return torch.randn(total, heads, d, device=device).to(dtype).unsqueeze(0).transpose(1, 2)


def check_varlen(name, lens_q, lens_k, hq, hk, d, dtype, device, causal=True, backward=True,
                 pad=(0, 0), **max_seqlens):
    """Packed q, k, v with ``pad`` rows before and after the sequences (in no sequence); the
    kernel by the 2x rule against the oracle, forward and gradients."""
    before, after = pad
    cu_q, cu_k = offsets(lens_q, device, before), offsets(lens_k, device, before)
    q = packed(before + sum(lens_q) + after, hq, d, dtype, device)
    k = packed(before + sum(lens_k) + after, hk, d, dtype, device)
    v = packed(before + sum(lens_k) + after, hk, d, dtype, device)
    def kernel(q, k, v):
        # Forward only: no gradient needed, so few queries per KV group take the decode path.
        with torch.set_grad_enabled(backward):
            return flash_attention(q, k, v, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   **max_seqlens)

    LAUNCHES.clear()
    out = check_against_oracle(
        name,
        kernel,
        lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, causal),
        [q, k, v], backward=backward,
    )[0]
    return out, LAUNCHES.copy()


# (lengths of q, lengths of k, Hq, Hk, D, causal): self-attention of uneven sequences (1 token
# to many tiles), chunked prefill (keys longer than queries), queries longer than keys (their
# first rows see nothing), an empty sequence and a sequence without keys, MQA and head dim 96.
CASES = [
    ([1, 3, 17, 40, 113], [1, 3, 17, 40, 113], 4, 2, 64, True),
    ([1, 3, 17, 40, 113], [5, 3, 30, 40, 120], 6, 2, 32, True),
    ([20, 7, 33], [9, 7, 12], 4, 1, 96, True),
    ([5, 0, 38, 9], [5, 3, 0, 30], 2, 2, 64, True),
    ([1, 3, 17, 40, 113], [5, 3, 30, 40, 120], 4, 2, 64, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["self", "chunked", "tq_gt_tk", "empty", "full"])
def test_varlen_matches_oracle(case, dtype, device):
    lens_q, lens_k, hq, hk, d, causal = case
    _, launched = check_varlen(f"varlen {case} {dtype}", lens_q, lens_k, hq, hk, d, dtype, device,
                               causal)
    assert launched["attention_fwd_kernel"] == 1
    fused = attention_backward.fused_backward(dtype)
    assert launched["attention_bwd_fused_kernel"] == int(fused)
    assert launched["attention_bwd_dkdv_kernel"] == launched["attention_bwd_dq_kernel"] == int(not fused)


def test_varlen_rows_outside_every_sequence_are_zero(device):
    """Rows before the first offset and after the last get zeros and zero gradients."""
    out, _ = check_varlen("varlen padded rows", [3, 17], [3, 20], 4, 2, 32, torch.float32, device,
                          pad=(5, 7), max_seqlen_q=17, max_seqlen_k=20)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.equal(out[:, :, -7:], torch.zeros_like(out[:, :, -7:]))


@pytest.mark.parametrize("min_programs", [0, 1000], ids=["one_program_per_kv_head", "heads_split"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_varlen_backward_schedules(min_programs, deterministic, kernel_opts, device):
    """Both backward schedules, with and without head splits, on packed sequences."""
    kernel_opts(min_programs_per_sm=min_programs)
    torch.use_deterministic_algorithms(deterministic)
    try:
        _, launched = check_varlen("varlen schedules", [1, 17, 40], [6, 17, 45], 8, 2, 64,
                                   torch.float16, device)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launched["attention_bwd_dkdv_kernel"] == int(deterministic)
    assert launched["attention_bwd_reduce_kernel"] == int(not deterministic) + 2 * (min_programs > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens_q", [[1, 1, 1], [1, 4, 2]], ids=["one_token", "chunks"])
def test_varlen_decode_path(lens_q, dtype, device):
    """Without gradients, few queries per sequence take the split-KV decode kernels (several
    splits over the longest keys): one query per sequence over long caches, or short chunks."""
    lens_k = [150, 7, 260]
    out, launched = check_varlen(f"varlen decode {lens_q} {dtype}", lens_q, lens_k, 4, 2, 64, dtype,
                                 device, backward=False, pad=(0, 3))
    assert launched["attention_decode_split_kernel"] == 1 and launched["attention_fwd_kernel"] == 0
    assert launched["attention_decode_combine_kernel"] == 1  # the keys were split
    assert torch.equal(out[:, :, -3:], torch.zeros_like(out[:, :, -3:]))


def test_varlen_decode_path_single_split(device):
    out, launched = check_varlen("varlen decode one split", [1, 2], [20, 9], 4, 4, 32, torch.float32,
                                 device, backward=False)
    assert launched["attention_decode_split_kernel"] == 1
    assert launched["attention_decode_combine_kernel"] == 0


def test_varlen_equals_separate_calls(device):
    """Packing changes nothing: each sequence's rows equal a call on that sequence alone."""
    lens = [3, 40, 17]
    cu = offsets(lens, device)
    q, k, v = (packed(sum(lens), h, 64, torch.float32, device) for h in (4, 2, 2))
    out = flash_attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=40, max_seqlen_k=40)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = flash_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        torch.testing.assert_close(out[:, :, a:b], alone, rtol=0, atol=1e-6)


def test_varlen_torch_compile_fullgraph(device):
    """With the max lengths given nothing is read on the host, so torch.compile traces the
    packed call without a graph break, forward and backward, and gets the eager bits."""
    cu = offsets([5, 20], device)
    q, k, v = (packed(25, h, 32, torch.float32, device) for h in (4, 2, 2))

    def fn(q, k, v):
        return flash_attention(q, k, v, cu_seqlens_q=cu, max_seqlen_q=20, max_seqlen_k=20)

    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        qg, kg, vg = leaf(q), leaf(k), leaf(v)
        o = f(qg, kg, vg)
        o.backward(torch.ones_like(o))
        results.append((o, qg.grad, kg.grad, vg.grad))
    for eager_result, compiled_result in zip(*results):
        assert torch.equal(eager_result, compiled_result)


def test_varlen_schedule_covers_every_tile(device):
    """The device-side tile lookup: every tile of every sequence once, in order, then past the end
    (``seq == N``), across several chunks of offsets and with empty sequences."""
    import triton
    import triton.language as tl

    @triton.jit
    def lookup(CU, OUT, num_seqs, BLOCK: tl.constexpr):
        tile = tl.program_id(0)
        seq, start = tiles.varlen_tile(CU, num_seqs, tile, BLOCK)
        tl.store(OUT + 2 * tile, seq)
        tl.store(OUT + 2 * tile + 1, start)

    lens = [0, 5, 16, 17, 0, 1] * 25  # 150 sequences: more than two chunks of offsets
    block = 16
    expected = [(i, t * block) for i, n in enumerate(lens) for t in range(triton.cdiv(n, block))]
    grid = len(expected) + 3
    out = torch.empty((grid, 2), dtype=torch.int32, device=device)
    lookup[(grid,)](offsets(lens, device), out, len(lens), BLOCK=block)
    got = [tuple(r) for r in out.tolist()]
    assert got[:len(expected)] == expected
    assert all(seq == len(lens) for seq, _ in got[len(expected):])


def test_varlen_validation(device):
    q, k, v = (packed(10, h, 32, torch.float32, device) for h in (4, 2, 2))
    cu = offsets([4, 6], device)
    cases = [
        (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q must have dtype int32"),
        (dict(cu_seqlens_q=cu[:1]), ValueError, "N \\+ 1 >= 2"),
        (dict(cu_seqlens_q=cu, cu_seqlens_k=cu[:2]), ValueError, "cu_seqlens_k must have the shape"),
        (dict(cu_seqlens_k=cu), ValueError, "need cu_seqlens_q"),
        (dict(max_seqlen_q=4), ValueError, "need cu_seqlens_q"),
        (dict(cu_seqlens_q=cu, max_seqlen_q=True), TypeError, "max_seqlen_q must be an int"),
        (dict(cu_seqlens_q=cu, max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
        (dict(cu_seqlens_q=offsets([6, -2], device)), ValueError, "non-decreasing"),
        (dict(cu_seqlens_q=offsets([6, 5], device)), ValueError, "at most 10"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            flash_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="packed sequences"):
        flash_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                        cu_seqlens_q=cu)


def test_flash_decode_left_padding(device):
    """flash_decode with ``cache_leftpad``: each row's padding slots stay invisible."""
    from llama_kernels.ops.attention import flash_decode

    q = torch.randn(3, 4, 2, 32, device=device)
    k, v = (torch.randn(3, 2, 150, 32, device=device) for _ in range(2))
    lengths = torch.tensor([150, 97, 40], dtype=torch.int32, device=device)
    pad = torch.tensor([0, 35, 39], dtype=torch.int32, device=device)
    LAUNCHES.clear()
    out = flash_decode(q, k, v, lengths, cache_leftpad=pad)
    assert LAUNCHES["attention_decode_split_kernel"] == 1
    expected = reference.flash_decode(q.double(), k.double(), v.double(), lengths,
                                                      cache_leftpad=pad)
    eager = reference.flash_decode(q, k, v, lengths, cache_leftpad=pad)
    err, eager_err = (out.double() - expected).abs().max(), (eager.double() - expected).abs().max()
    assert err <= 2 * eager_err + 1e-6
    with pytest.raises(ValueError, match="cache_leftpad must have shape"):
        flash_decode(q, k, v, lengths, cache_leftpad=pad[:2])
    assert decode.DECODE_MAX_ROWS >= 8
