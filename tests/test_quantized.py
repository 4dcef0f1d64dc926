"""The quantised linear op (``lk.quantized_linear``): int8 and int4 (groups of 32/64/128/256)
against the float64 matmul of the dequantised weight by the 2x rule, forward and backward to the
activations (and bias), at odd shapes (N odd, K not a multiple of the K-tile, 1, 16 and 37 rows),
in every dtype, through strided views, forced splits of the reduction, and bad arguments."""
import pytest
import torch

import llama_kernels as lk
from llama_kernels import oracle, reference
from llama_kernels.ops import quantized
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.quantize import quantize_weight
from helpers import assert_all_pass

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]


def quantized_inputs(n, k, bits, group_size, dtype, device, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
    qw = quantize_weight(weight, bits, group_size)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return qw, b


def check(x, qw, bias, backward=True):
    """The 2x rule on the outputs and the gradients of x (and bias)."""
    args = (x, qw.qweight, qw.scales, qw.zeros, bias)
    kwargs = dict(bits=qw.bits, group_size=qw.group_size)
    grad = (0, 4) if bias is not None else (0,)
    result = oracle.check_backward(lk.quantized_linear, reference.quantized_linear, args, kwargs, grad=grad,
                                   names=("x", "qweight", "scales", "zeros", "bias"), gradients=backward,
                                   generator=torch.Generator().manual_seed(1))
    return assert_all_pass(f"int{qw.bits}", result)


@pytest.mark.parametrize("bits, group_size", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_quantized_linear_matches_the_dequantised_matmul(bits, group_size, dtype, rows, device):
    # N odd; K = 3 groups (int4) or 200 (int8): neither a multiple of the kernels' K-tiles.
    k = 200 if bits == 8 else 3 * group_size
    qw, bias = quantized_inputs(37, k, bits, group_size, dtype, device, bias=rows == 16)
    x = torch.randn(rows, k, device=device).to(dtype)
    LAUNCHES.clear()
    (y,) = check(x, qw, bias)
    assert y.shape == (rows, 37) and y.dtype == dtype and y.is_contiguous()
    assert LAUNCHES["quantized_linear_fwd_kernel"] >= 1 and LAUNCHES["quantized_linear_bwd_kernel"] == 1


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 256)])
def test_three_dimensional_strided_inputs(bits, group_size, device):
    # A (B, T, K) view of every other row of a wider buffer, and a transposed (T, B) layout.
    qw, bias = quantized_inputs(64, 256, bits, group_size, torch.bfloat16, device, bias=True)
    wide = torch.randn(2, 10, 2 * 256, device=device).to(torch.bfloat16)
    check(wide[..., :256], qw, bias)
    check(torch.randn(5, 2, 256, device=device).to(torch.bfloat16).transpose(0, 1), qw, None)
    check(torch.randn(1, 1, 256, device=device).to(torch.bfloat16), qw, bias)  # one token


@pytest.mark.parametrize("split", [1, 2, 3, 8])
def test_every_split_of_the_reduction_agrees(split, device, kernel_opts):
    # K = 6 tiles of 32 (int4, groups of 32): 3 splits of 2 tiles, 8 capped at 6; 1: no partials.
    qw, bias = quantized_inputs(48, 192, 4, 32, torch.float16, device, bias=True)
    x = torch.randn(3, 192, device=device).to(torch.float16)
    kernel_opts(quantized_split_k=split)
    LAUNCHES.clear()
    with torch.no_grad():
        first = lk.quantized_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits=4, group_size=32)
        again = lk.quantized_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits=4, group_size=32)
    assert torch.equal(first, again)  # a fixed order of the partial sums: deterministic
    assert LAUNCHES["quantized_linear_reduce_kernel"] == (0 if split == 1 else 2)
    check(x, qw, bias, backward=False)


def test_split_k_sizes_from_the_device():
    # Two programs per multiprocessor, each split at least two K-tiles on a GPU: whole tiles.
    cpu = torch.device("cpu")
    split, k_per_split = quantized._split_k(1, 1, 4096, 128, cpu)
    assert split >= 2 and k_per_split % 128 == 0 and split * k_per_split >= 4096
    assert quantized._split_k(64, 64, 4096, 128, cpu) == (1, 4096)  # a full grid: no split


def test_empty_inputs_and_no_rows(device):
    qw, bias = quantized_inputs(8, 64, 4, 32, torch.float32, device, bias=True)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    y = lk.quantized_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits=4, group_size=32)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 64)


def test_autocast_casts_like_linear(device):
    # Under bfloat16 autocast F.linear casts x and bias to bfloat16: so does the op.
    qw, bias = quantized_inputs(40, 128, 8, None, torch.float32, device, bias=True)
    x = torch.randn(4, 128, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = lk.quantized_linear(x, qw.qweight, qw.scales, None, bias, bits=8)
        eager = reference.quantized_linear(x, qw.qweight, qw.scales, None, bias, bits=8)
    assert out.dtype == eager.dtype == torch.bfloat16
    exact = reference.quantized_linear(x.double(), qw.qweight, qw.scales.double(), None, bias.double(), bits=8)
    assert oracle.compare("autocast", out, exact, eager).ok


def test_bad_arguments_are_refused_by_name(device):
    qw, bias = quantized_inputs(16, 64, 4, 32, torch.float16, device)
    x = torch.randn(2, 64, device=device).to(torch.float16)
    q8, _ = quantized_inputs(16, 64, 8, None, torch.float16, device)

    def call(*args, **kwargs):
        return lk.quantized_linear(*args, **kwargs)

    cases = [
        (ValueError, "bits", lambda: call(x, qw.qweight, qw.scales, qw.zeros, bits=3, group_size=32)),
        (ValueError, "group_size", lambda: call(x, qw.qweight, qw.scales, qw.zeros, bits=4, group_size=48)),
        (ValueError, "groups of 64", lambda: call(x, qw.qweight, qw.scales, qw.zeros, bits=4, group_size=64)),
        (TypeError, "qweight", lambda: call(x, qw.qweight, qw.scales, qw.zeros, bits=8)),
        (TypeError, "qweight", lambda: call(x, q8.qweight, qw.scales, qw.zeros, bits=4, group_size=32)),
        (ValueError, "zeros", lambda: call(x, q8.qweight, q8.scales, qw.zeros, bits=8)),
        (ValueError, "group_size", lambda: call(x, q8.qweight, q8.scales, bits=8, group_size=32)),
        (ValueError, "x has 63", lambda: call(x[:, :63], qw.qweight, qw.scales, qw.zeros, bits=4, group_size=32)),
        (ValueError, "scales", lambda: call(x, q8.qweight, q8.scales[:8], bits=8)),
        (TypeError, "zeros", lambda: call(x, qw.qweight, qw.scales, qw.scales, bits=4, group_size=32)),
        (TypeError, "bias", lambda: call(x, q8.qweight, q8.scales, None, torch.zeros(16, device=device), bits=8)),
        (ValueError, "bias", lambda: call(x, q8.qweight, q8.scales, None, torch.zeros(8, device=device).half(),
                                          bits=8)),
        (TypeError, "x", lambda: call(x.int(), q8.qweight, q8.scales, bits=8)),
        (ValueError, "frozen", lambda: call(x, q8.qweight, q8.scales.clone().requires_grad_(), bits=8)),
    ]
    LAUNCHES.clear()
    for error, name, fn in cases:
        with pytest.raises(error, match=name):
            fn()
    assert not LAUNCHES


def test_fake_tensors_take_the_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qw = quantize_weight(torch.randn(4096, 14336, dtype=torch.bfloat16), 4, 128)
        x = torch.randn(2, 7, 14336, dtype=torch.bfloat16, requires_grad=True)
        y = lk.quantized_linear(x, qw.qweight, qw.scales, qw.zeros, bits=4, group_size=128)
        y.sum().backward()
    assert y.shape == (2, 7, 4096) and y.dtype == torch.bfloat16 and x.grad.shape == x.shape
    assert qw.qweight.shape == (4096, 7168) and qw.scales.shape == qw.zeros.shape == (4096, 112)
