"""fused_linear_cross_entropy: the LM head + loss against the float64 oracle by the 2x rule, forward
and every gradient, for each reduction, label smoothing, bias, dtype, odd vocabularies, ignored and
all-ignored targets, strided inputs; the chunking (no tensor of tokens x vocab ever exists); bad
arguments; autocast; torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DTYPES, check_against_oracle
from llama_kernels import reference
from llama_kernels.ops import cross_entropy as ce
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.cross_entropy import (fused_linear_cross_entropy, linear_cross_entropy_bwd,
                                             linear_cross_entropy_fwd)


@pytest.fixture
def small_chunks(kernel_opts):
    """Chunks of 1024 columns for 37 tokens, so a 4099-token vocabulary takes five (the last
    ragged) and the online log-sum-exp and the dh accumulation across chunks are exercised."""
    kernel_opts(cross_entropy_chunk=37 * 1024)


def _inputs(n, hidden, vocab, dtype, device, bias=False, ignored_every=5, seed=0):
    """Hidden rows, weight and bias scaled so the logits spread over several units (a realistic
    softmax, neither uniform nor one-hot), targets with every ``ignored_every``-th one ignored."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden ** 0.5)
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    if ignored_every:
        target[::ignored_every] = -100

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cast(h), cast(w), cast(b), target.to(device)


def _check(name, h, w, b, target, **options):
    """The op vs its eager twin by the 2x rule: loss and the gradients of hidden, weight (and bias)."""
    if b is None:
        def call(fn):
            return lambda h, w: fn(h, w, target, **options)
        inputs = [h, w]
    else:
        def call(fn):
            return lambda h, w, b: fn(h, w, target, b, **options)
        inputs = [h, w, b]
    return check_against_oracle(name, call(fused_linear_cross_entropy),
                                call(reference.fused_linear_cross_entropy), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle(dtype, reduction, device, small_chunks):
    h, w, _, target = _inputs(37, 48, 4099, dtype, device)
    (loss,) = _check(f"{reduction} {dtype}", h, w, None, target, reduction=reduction)
    assert loss.dtype == torch.float32
    assert loss.shape == (() if reduction != "none" else target.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_and_label_smoothing(dtype, reduction, device, small_chunks):
    h, w, b, target = _inputs(37, 32, 4099, dtype, device, bias=True, seed=1)
    _check(f"bias + smoothing {reduction} {dtype}", h, w, b, target, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("vocab", [49152, 128256])
def test_large_odd_vocabularies(vocab, device):
    """LLaMA-3's and SmolLM2's vocabularies, in the default chunking (bfloat16, few tokens)."""
    h, w, _, target = _inputs(5, 16, vocab, torch.bfloat16, device, ignored_every=0, seed=2)
    target[0] = vocab - 1  # the last column of the last chunk
    _check(f"vocab {vocab}", h, w, None, target)


def test_batched_strided_inputs(device, small_chunks):
    """hidden (B, T, H) as a transposed view, weight as a column slice of a wider matrix, bias
    strided, target (B, T): nothing needs to be contiguous, and the loss keeps target's shape."""
    h, w, b, target = _inputs(37, 40, 3001, torch.float16, device, bias=True, seed=3)
    h_t = h[:36].reshape(6, 6, 40).transpose(0, 1)  # (6, 6, 40), not contiguous
    wide = torch.randn(3001, 80, device=device).to(torch.float16)
    wide[:, 20:60] = w
    w_view = wide[:, 20:60]
    b_view = torch.stack([b, b], 1)[:, 0]
    t_view = target[:36].reshape(6, 6).transpose(0, 1)
    assert not (h_t.is_contiguous() or w_view.is_contiguous() or b_view.is_contiguous())
    (loss,) = _check("strided", h_t, w_view, b_view, t_view, reduction="none")
    assert loss.shape == (6, 6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_every_target_ignored_gives_eagers_result(reduction, label_smoothing, device):
    """mean over no target is 0 / 0 = NaN in eager too; sum is 0; the gradients are zeros."""
    h, w, _, target = _inputs(6, 16, 130, torch.float32, device)
    target[:] = -100
    results = []
    for fn in (fused_linear_cross_entropy, reference.fused_linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww, target, reduction=reduction, label_smoothing=label_smoothing)
        loss.sum().backward()
        results.append((loss.detach(), hh.grad, ww.grad))
    for ours, eager in zip(*results):
        torch.testing.assert_close(ours, eager, equal_nan=True, rtol=0, atol=0)
    assert results[0][0].isnan().all() == (reduction == "mean")


def test_custom_ignore_index_inside_the_vocabulary(device, small_chunks):
    """ignore_index may be a real class (padding token 0): its rows are skipped, others use it."""
    h, w, _, target = _inputs(37, 32, 2000, torch.float32, device, ignored_every=0, seed=4)
    target[::3] = 0
    _check("ignore_index=0", h, w, None, target, ignore_index=0)


def test_one_token_and_no_tokens(device):
    h, w, _, target = _inputs(1, 32, 257, torch.bfloat16, device, ignored_every=0)
    _check("one token", h, w, None, target)
    empty = torch.empty(0, 32, device=device, requires_grad=True)
    weight = torch.randn(257, 32, device=device, requires_grad=True)
    no_target = torch.empty(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        ours = fused_linear_cross_entropy(empty, weight, no_target, reduction=reduction)
        eager = reference.fused_linear_cross_entropy(empty, weight, no_target, reduction=reduction)
        torch.testing.assert_close(ours, eager, equal_nan=True)
    fused_linear_cross_entropy(empty, weight, no_target, reduction="sum").backward()
    assert empty.grad.shape == (0, 32) and weight.grad.abs().sum() == 0


def test_frozen_weight_skips_its_gradient(device, small_chunks):
    """A frozen head (LoRA, probing): only dh is computed, and it equals the full backward's."""
    h, w, _, target = _inputs(37, 32, 3000, torch.bfloat16, device, seed=5)
    h1, h2, w2 = h.clone().requires_grad_(), h.clone().requires_grad_(), w.clone().requires_grad_()
    fused_linear_cross_entropy(h1, w, target).backward()
    fused_linear_cross_entropy(h2, w2, target).backward()
    assert w.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of a floating-point tensor any aten op returned while the mode was
    on (the interpreter's own byte copies of kernel arguments are uint8)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_by_the_chunk_not_tokens_times_vocab(device, kernel_opts):
    """No tensor of tokens x vocab is ever made: the largest one of the forward and backward is a
    chunk of logits (or the weight's gradient), and the kernels run once per chunk."""
    n, hidden, vocab = 64, 16, 5000
    kernel_opts(cross_entropy_chunk=n * 512)
    h, w, _, target = _inputs(n, hidden, vocab, torch.float32, device, seed=6)
    h.requires_grad_(), w.requires_grad_()
    LAUNCHES.clear()
    with _LargestTensor() as mode:
        fused_linear_cross_entropy(h, w, target).backward()
    assert mode.largest == max(n * 512, vocab * hidden)  # a chunk's logits / dweight; n x vocab = 320000
    chunks = -(-vocab // 512)
    assert LAUNCHES["cross_entropy_fwd_kernel"] == chunks and LAUNCHES["cross_entropy_bwd_kernel"] == chunks


def test_chunk_widths():
    assert ce.chunk_columns(8192, 128256) == 8192  # 256 MB of float32 logits at a time
    assert ce.chunk_columns(10, 100) == 100  # few tokens: the whole vocabulary at once
    assert ce.chunk_columns(10**7, 128256) == ce.CHUNK_ALIGN  # never narrower than one tile


def test_bad_arguments(device):
    h, w, b, target = _inputs(4, 8, 11, torch.float32, device, bias=True)
    op = fused_linear_cross_entropy
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        op(h.tolist(), w, target)
    with pytest.raises(ValueError, match=r"weight must have shape \(vocab, 8\)"):
        op(h, w[:, :4], target)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        op(h, w[0], target)
    with pytest.raises(TypeError, match="target must have dtype int64"):
        op(h, w, target.int())
    with pytest.raises(ValueError, match=r"target must have hidden's leading shape \(4,\)"):
        op(h, w, target[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \(11,\)"):
        op(h, w, target, b[:5])
    with pytest.raises(TypeError, match="weight must have the same dtype as hidden"):
        op(h, w.half(), target)
    with pytest.raises(TypeError, match="bias must have the same dtype as hidden"):
        op(h, w, target, b.half())
    with pytest.raises(ValueError, match="reduction must be one of"):
        op(h, w, target, reduction="batchmean")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        op(h, w, target, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        op(h, w, target, ignore_index=-100.0)
    with pytest.raises(ValueError, match="target must have the same device as hidden"):
        op(h, w, target.to("meta"))
    bad = target.clone()
    bad[2] = 11
    with pytest.raises(ValueError, match=r"target holds 11, outside the vocabulary \[0, 11\)"):
        op(h, w, bad)
    bad[2] = -1
    with pytest.raises(ValueError, match="target holds -1"):
        op(h, w, bad)


def test_unchecked_bad_target_gives_nan_not_a_number(device):
    """Where the target check cannot run (compile, graph capture) a bad target's row is NaN, loss
    and gradient, and the other rows are untouched."""
    h, w, _, target = _inputs(4, 8, 11, torch.float32, device, ignored_every=0)
    target[1] = 11
    loss, lse = linear_cross_entropy_fwd(h, w, None, target, -100, 0.0)
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all()
    d_hidden, d_weight, _ = linear_cross_entropy_bwd(torch.ones(4, device=device), h, w, None, target, lse,
                                                     -100, 0.0, True, True, False)
    assert d_hidden[1].isnan().all() and d_hidden[[0, 2, 3]].isfinite().all()
    assert d_weight.isnan().any()


def test_autocast_gives_eagers_dtypes_and_accuracy(device):
    """Under bf16 autocast with float32 weights (mixed-precision training) the op takes what
    F.linear takes: a float32 loss, float32 gradients, within 2x of eager's error.  The oracle
    runs in float64 on the bfloat16-rounded inputs, what autocast hands both sides."""
    h, w, b, target = _inputs(37, 32, 1000, torch.float32, device, bias=True, seed=7)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    results = []
    for fn, dtype in ((reference.fused_linear_cross_entropy, torch.float64),
                      (reference.fused_linear_cross_entropy, torch.float32),
                      (fused_linear_cross_entropy, torch.float32)):
        leaves = [t.to(torch.bfloat16).to(dtype).requires_grad_() if dtype == torch.float64
                  else t.clone().requires_grad_() for t in (h, w, b)]
        with autocast if dtype == torch.float32 else torch.autocast(device.type, enabled=False):
            loss = fn(leaves[0], leaves[1], target, leaves[2])
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    from helpers import assert_like_eager
    oracle, eager, ours = results
    for name, o, e, k in zip(("loss", "dh", "dw", "db"), oracle, eager, ours):
        assert k.dtype == e.dtype
        assert_like_eager(f"autocast {name}", k, o, e)


def test_custom_ops_and_torch_compile(device):
    """The launchers are custom ops: opcheck passes, and a compiled training step has no graph
    break and gives the eager op's loss and gradients."""
    h, w, b, target = _inputs(9, 16, 300, torch.float32, device, bias=True)
    torch.library.opcheck(linear_cross_entropy_fwd.op, (h, w, b, target, -100, 0.1))
    _, lse = linear_cross_entropy_fwd(h, w, b, target, -100, 0.1)
    torch.library.opcheck(linear_cross_entropy_bwd.op,
                          (torch.rand(9, device=device), h, w, b, target, lse, -100, 0.1, True, True, True))

    def step(h, w, b):
        return fused_linear_cross_entropy(h, w, target, b, label_smoothing=0.1) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for ours, eager in zip(*results):
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-7)


def test_matches_f_cross_entropy_on_materialised_logits(device):
    """The contract itself, spelled out: F.cross_entropy on (h @ W.T + b).float()."""
    h, w, b, target = _inputs(37, 32, 777, torch.float32, device, bias=True, seed=8)
    expected = F.cross_entropy((h @ w.T + b).float(), target, label_smoothing=0.05)
    got = fused_linear_cross_entropy(h, w, target, b, label_smoothing=0.05)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
