"""flash_attention's ``window`` (sliding-window attention) and ``softcap`` (Gemma 2's score cap)
on every path (forward, TMA forward, fused and deterministic backwards, packed sequences, the
split-KV decode path, ``flash_decode``) against the float64 oracle by the 2x rule; a key tile left
of every window is never read (NaN there changes nothing); bad arguments are refused by name."""
import itertools

import pytest
import torch

from llama_kernels import reference
from llama_kernels.ops.attention import backward as attention_backward
from llama_kernels.ops.attention import flash_attention, flash_decode
from llama_kernels.ops.common import INTERPRET, LAUNCHES
from helpers import DTYPES, assert_like_eager, check_against_oracle, leaf


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(b, hq, hk, tq, tk, d, dtype, device, layout="bhtd"):
    def rand(h, t):
        if layout == "bthd":  # transposed views of (B, T, H, D) projections
            return torch.randn(b, t, h, d, device=device).to(dtype).transpose(1, 2)
        return torch.randn(b, h, t, d, device=device).to(dtype)

    return rand(hq, tq), rand(hk, tk), rand(hk, tk)


def check(name, q, k, v, window, softcap, backward=True, **kwargs):
    return check_against_oracle(
        name,
        lambda q, k, v: flash_attention(q, k, v, True, window=window, softcap=softcap, **kwargs),
        lambda q, k, v: reference.flash_attention(q, k, v, True, None, window, softcap),
        [q, k, v], backward=backward,
    )


# (B, Hq, Hk, Tq, Tk, D, window, softcap).  Interpreter tiles: forward/dQ 32 x 16 keys, dK/dV 16
# queries x 32 keys.  A window narrower than a key tile, a chunk (Tq < Tk) with GQA 4 and batch 2,
# Tq > Tk with window 1 (rows without keys), a window spanning several tiles, a window longer
# than Tk (compiled out), softcap alone.  The windows put tile bounds exactly on an edge (each
# found by a mutant that moved one bound by one and passed otherwise): window 2 makes the last
# query a dK/dV program visits the first row of a query tile, window 8 with Tk - Tq = 25 makes a
# query tile start exactly where the dK/dV window-edge masking starts, and window 40 over 70 rows
# hides keys 16..23 from the last row of query tile [32, 64), inside a key tile that straddles.
CASES = [
    (1, 4, 2, 37, 37, 32, 2, None),
    (2, 4, 1, 20, 45, 16, 8, 3.0),
    (1, 2, 2, 45, 20, 32, 1, None),
    (1, 2, 1, 70, 70, 16, 40, 1.5),
    (1, 4, 2, 30, 30, 32, 100, 2.0),
    (1, 4, 2, 37, 37, 32, None, 2.0),
]
IDS = ["w2", "chunk_w8_cap3", "tq_gt_tk_w1", "w40_cap1.5", "w_gt_tk_cap2", "cap2"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_oracle(case, dtype, device):
    b, hq, hk, tq, tk, d, window, softcap = case
    q, k, v = make(b, hq, hk, tq, tk, d, dtype, device)
    LAUNCHES.clear()
    (o,) = check(f"window {case} {dtype}", q, k, v, window, softcap)
    assert LAUNCHES["attention_fwd_kernel"] == 1
    if tq > tk:  # rows that see no key output zeros
        assert torch.equal(o[:, :, : tq - tk], torch.zeros_like(o[:, :, : tq - tk]))


@pytest.mark.parametrize("dtype,case", [(torch.float16, CASES[1]), (torch.bfloat16, CASES[3])],
                         ids=["float16_" + IDS[1], "bfloat16_" + IDS[3]])
def test_deterministic_backward(case, dtype, device):
    """Deterministic mode (separate dQ and dK/dV kernels) by the 2x rule, bitwise reproducible."""
    b, hq, hk, tq, tk, d, window, softcap = case
    q, k, v = make(b, hq, hk, tq, tk, d, dtype, device)
    torch.use_deterministic_algorithms(True)
    try:
        LAUNCHES.clear()
        check(f"window deterministic {case} {dtype}", q, k, v, window, softcap)
        assert LAUNCHES["attention_bwd_dkdv_kernel"] == 1 and LAUNCHES["attention_bwd_fused_kernel"] == 0
        runs = []
        for _ in range(2):
            qg, kg, vg = leaf(q), leaf(k), leaf(v)
            o = flash_attention(qg, kg, vg, window=window, softcap=softcap)
            o.backward(torch.ones_like(o))
            runs.append((o, qg.grad, kg.grad, vg.grad))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(False)


def test_transposed_inputs_and_head_splits(kernel_opts, device):
    """(B, T, H, D) views read through their strides, and dK/dV with the KV group's heads split
    over programs (float32 partials + reduce)."""
    kernel_opts(min_programs_per_sm=1000)
    q, k, v = make(1, 4, 2, 29, 41, 32, torch.float16, device, layout="bthd")
    assert not q.is_contiguous()
    LAUNCHES.clear()
    check("window (B,T,H,D) views, head splits", q, k, v, 11, 4.0)
    assert LAUNCHES["attention_bwd_reduce_kernel"] == 3


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs TMA descriptors without a Hopper GPU")
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=IDS[:3])
def test_tma_forward(case, kernel_opts, device):
    kernel_opts(tma_forward=True)
    b, hq, hk, tq, tk, d, window, _ = case
    q, k, v = make(b, hq, hk, tq, tk, d, torch.bfloat16, device, layout="bthd")
    LAUNCHES.clear()
    check(f"window TMA {case}", q, k, v, window, 2.5)
    assert LAUNCHES["attention_fwd_tma_kernel"] == 1 and LAUNCHES["attention_fwd_kernel"] == 0


def offsets(lengths, device):
    return torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device)


def packed(total, heads, d, dtype, device):
    return torch.randn(total, heads, d, device=device).to(dtype).unsqueeze(0).transpose(1, 2)


def check_varlen(name, lens_q, lens_k, dtype, device, window, softcap, backward=True):
    cu_q, cu_k = offsets(lens_q, device), offsets(lens_k, device)
    q = packed(sum(lens_q), 4, 32, dtype, device)
    k, v = packed(sum(lens_k), 2, 32, dtype, device), packed(sum(lens_k), 2, 32, dtype, device)

    def kernel(q, k, v):
        with torch.set_grad_enabled(backward):
            return flash_attention(q, k, v, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window=window,
                                   softcap=softcap)

    LAUNCHES.clear()
    check_against_oracle(name, kernel,
                         lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, True, None, window, softcap),
                         [q, k, v], backward=backward)
    return LAUNCHES.copy()


@pytest.mark.parametrize("dtype,deterministic", [(torch.float32, False), (torch.bfloat16, False),
                                                 (torch.bfloat16, True)],
                         ids=["float32", "bfloat16_fused", "bfloat16_deterministic"])
def test_varlen(dtype, deterministic, device):
    """Packed sequences: window and causality within each pair (keys longer, shorter, empty)."""
    torch.use_deterministic_algorithms(deterministic)
    try:
        launched = check_varlen(f"varlen window {dtype}", [1, 7, 40, 23, 5], [1, 19, 40, 9, 0], dtype, device,
                                6, 2.0)
    finally:
        torch.use_deterministic_algorithms(False)
    fused = attention_backward.fused_backward(dtype) and not deterministic
    assert launched["attention_fwd_kernel"] == 1 and launched["attention_bwd_fused_kernel"] == int(fused)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_decode_path(dtype, device):
    launched = check_varlen(f"varlen decode window {dtype}", [1, 3, 2], [150, 7, 260], dtype, device, 37, 3.0,
                            backward=False)
    assert launched["attention_decode_split_kernel"] == 1 and launched["attention_fwd_kernel"] == 0
    assert launched["attention_decode_combine_kernel"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,window,softcap", [(1, 50, 2.0), (3, 7, None), (4, 300, 5.0)],
                         ids=["step_w50_cap2", "chunk_w7", "chunk_w300_cap5"])
def test_decode_path(tq, window, softcap, dtype, device):
    """No gradient, few queries: the split-KV kernels, several splits (some wholly left of the
    window, which visit nothing)."""
    q, k, v = make(2, 8, 2, tq, 300, 32, dtype, device)
    LAUNCHES.clear()
    with torch.no_grad():
        out = flash_attention(q, k, v, window=window, softcap=softcap)
    assert LAUNCHES["attention_decode_split_kernel"] == 1 and LAUNCHES["attention_decode_combine_kernel"] == 1
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), True, None, window, softcap)
    assert_like_eager(f"decode window {tq} {window} {softcap} {dtype}", out, oracle,
                      reference.flash_attention(q, k, v, True, None, window, softcap))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_decode(dtype, device):
    """Device lengths + left padding + window + softcap: query i of row b sees
    [max(pad_b, L_b - Tq + i - window + 1), L_b - Tq + i]."""
    b, hq, hk, tq, tmax, d = 4, 4, 2, 2, 320, 32
    q = torch.randn(b, hq, tq, d, device=device).to(dtype)
    k = torch.randn(b, hk, tmax, d, device=device).to(dtype)
    v = torch.randn(b, hk, tmax, d, device=device).to(dtype)
    lengths = torch.tensor([300, 20, 130, 2], dtype=torch.int32, device=device)
    # Row 0: the window starts past the padding; row 1: the padding cuts into the window;
    # row 2: window and padding meet; row 3: every key is padding for query 0.
    leftpad = torch.tensor([5, 15, 100, 1], dtype=torch.int32, device=device)
    for window, softcap in ((31, 1.5), (2, None), (1000, 4.0)):
        with torch.no_grad():
            out = flash_decode(q, k, v, lengths, cache_leftpad=leftpad, window=window, softcap=softcap)
        args = (lengths, None, leftpad, window, softcap)
        oracle = reference.flash_decode(q.double(), k.double(), v.double(), *args)
        assert_like_eager(f"flash_decode window {window} softcap {softcap} {dtype}", out, oracle,
                          reference.flash_decode(q, k, v, *args))
        assert torch.equal(out[3, :, 0], torch.zeros_like(out[3, :, 0]))


def test_tiles_left_of_the_window_are_never_read(device):
    """NaN keys and values in key tiles left of every window (a visited tile, even masked, turns
    P @ V, dS and dQ into NaN): the kernels give exactly the results of clean keys, and zero
    gradients there.  Queries sit at keys 64..79 (Tq = 16, Tk = 80); window 10 reaches back to key
    55, so the forward (key tiles of 16) never reads keys [0, 48), the dK/dV programs (key tiles of
    32) none of [0, 32), the decode kernel (tiles of 32) none of [0, 32)."""
    q, k, v = make(1, 4, 2, 16, 80, 16, torch.float16, device)

    def run(poisoned_keys, backward):
        kk, vv = k.clone(), v.clone()
        kk[:, :, :poisoned_keys], vv[:, :, :poisoned_keys] = float("nan"), float("nan")
        qg, kg, vg = leaf(q), leaf(kk), leaf(vv)  # requiring grad: the training kernels run
        o = flash_attention(qg, kg, vg, window=10, softcap=3.0)
        if not backward:
            return (o,)
        o.backward(torch.ones_like(o))
        return o, qg.grad, kg.grad, vg.grad

    LAUNCHES.clear()
    assert torch.equal(run(48, False)[0], run(0, False)[0])
    assert LAUNCHES["attention_fwd_kernel"] == 2
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            clean, poisoned = run(0, True), run(32, True)
        finally:
            torch.use_deterministic_algorithms(False)
        for a, b in zip(clean, poisoned):
            assert torch.equal(a, b)
        assert not poisoned[2][:, :, :32].any() and not poisoned[3][:, :, :32].any()
    with torch.no_grad():
        LAUNCHES.clear()
        clean = flash_attention(q, k, v, window=10, softcap=3.0)
        kk, vv = k.clone(), v.clone()
        kk[:, :, :32], vv[:, :, :32] = float("nan"), float("nan")
        assert torch.equal(flash_attention(q, kk, vv, window=10, softcap=3.0), clean)
        assert LAUNCHES["attention_decode_split_kernel"] == 2
        # One step over 300 keys, window 40: keys [0, 256) (whole splits among them) are unread.
        q1, k1, v1 = make(1, 4, 2, 1, 300, 16, torch.float16, device)
        clean = flash_attention(q1, k1, v1, window=40)
        k1[:, :, :256], v1[:, :, :256] = float("nan"), float("nan")
        assert torch.equal(flash_attention(q1, k1, v1, window=40), clean)
        lengths = torch.tensor([300], dtype=torch.int32, device=device)
        assert torch.equal(flash_decode(q1, k1, v1, lengths, window=40), clean)


def test_bad_arguments(device):
    q, k, v = make(1, 2, 1, 8, 8, 16, torch.float32, device)
    lengths = torch.tensor([8], dtype=torch.int32, device=device)
    for fn in (lambda **kw: flash_attention(q, k, v, **kw), lambda **kw: flash_decode(q, k, v, lengths, **kw)):
        for bad in (True, 2.5, "3", torch.tensor(3)):
            with pytest.raises(TypeError, match="window must be an int"):
                fn(window=bad)
        for bad in (0, -4):
            with pytest.raises(ValueError, match="window must be >= 1"):
                fn(window=bad)
        for bad in (True, "1.0"):
            with pytest.raises(TypeError, match="softcap must be a float"):
                fn(softcap=bad)
        for bad, message in ((0.0, "softcap must be > 0"), (-1.0, "softcap must be > 0"),
                             (float("nan"), "softcap must be a finite"), (float("inf"), "softcap must be a finite")):
            with pytest.raises(ValueError, match=message):
                fn(softcap=bad)
    with pytest.raises(ValueError, match="window .* needs causal=True"):
        flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window .* needs causal=True"):
        reference.flash_attention(q, k, v, False, None, 4)
    # numpy-style integers are ints; the defaults cost nothing (same bits as before).
    torch.testing.assert_close(flash_attention(q, k, v, window=torch.tensor(3).numpy()[()]),
                               flash_attention(q, k, v, window=3), rtol=0, atol=0)
    torch.testing.assert_close(flash_attention(q, k, v, window=None, softcap=None), flash_attention(q, k, v),
                               rtol=0, atol=0)


def test_torch_compile_fullgraph(device):
    """The custom ops take the new arguments: torch.compile traces them without a graph break."""
    q, k, v = make(1, 4, 2, 20, 20, 16, torch.float32, device)
    fn = lambda q, k, v: flash_attention(q, k, v, window=6, softcap=2.0)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        qg, kg, vg = leaf(q), leaf(k), leaf(v)
        o = f(qg, kg, vg)
        o.backward(torch.ones_like(o))
        results.append((o, qg.grad, kg.grad, vg.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
