"""Per-op benchmarks: every llama_kernels op against eager, torch.compile, Liger-Kernel, SDPA, flash-attn.

One table, :data:`OPS`, says for each op which model shapes it runs at, how its inputs are built,
how many bytes (or FLOP) one call must move (or do), and which providers exist besides the three
most ops have (``ours``, ``eager``, ``torch.compile``; an op's ``base`` may name fewer).  One loop
(:func:`run_case`) does the same for every op and shape: check each provider's outputs and gradients
against the reference (ours, or eager where ours cannot run), then time each mode with rotated
inputs and record the peak memory.
A provider function may carry a ``context`` attribute (a context-manager factory): every step of it
that the loop checks or times (forward, backward, both) runs inside that context (see
:func:`_steps_in`), e.g. ``ours-deterministic``'s deterministic algorithms, which its backward reads.
A provider may also carry a ``layout`` (``varlen_attention``'s padded batches): its inputs are
converted to it before any timing, and its outputs and gradients are checked back in the op's own
layout (see :func:`_in_own_layout`, :func:`_check_run`).

Work per call (each op's ``note`` below, the README and the ``_work_*`` functions say the same):
the bytes that must move, each input read once and each output written once, the least any
implementation moves, for memory-bound ops (compared with the measured copy bandwidth); the FLOP of
the two matrix products for attention (compared with the measured bf16 matmul rate); for packed
``varlen_attention``, the real per-sequence work only, so a padded provider's rate shows its waste;
for ``linear_cross_entropy`` (the LM head and its loss), the FLOP of its matrix products (logits
forward; dhidden and dweight backward), with ours' peak memory also given as a ratio of eager's.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from llama_kernels import reference

from .common import (Missing, Record, Settings, Skipped, bench, classify, cycling, free_memory, nbytes,
                     peak_memory, rotation, say)

EPS = 1e-5  # LLaMA-3's rms_norm_eps
TRAIN_MODES = ("forward", "backward", "forward+backward")

# The model shapes op sizes come from (their transformers configs).  LLaMA-2-7B is used for its
# MLP width and vocabulary only; SmolLM2-135M is the small model the project's demos run; "smoke"
# is for CPU runs (its vocabulary is odd, a multiple of no block size, so the tails run too).
MODELS = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, hq=32, hk=8, d=128, vocab=128256),
    "llama2-7b": dict(hidden=4096, intermediate=11008, hq=32, hk=32, d=128, vocab=32000),
    "smollm2-135m": dict(hidden=576, intermediate=1536, hq=9, hk=3, d=64, vocab=49152),
    "smoke": dict(hidden=128, intermediate=256, hq=4, hk=2, d=32, vocab=1031),
}

# Token counts (batch 1) per run mode; decode's are KV-cache lengths.  fp16 runs once per op, at
# `fp16_at` tokens on the op's first shape: it takes the same kernels as bf16, so one point shows
# whether it differs.  varlen's are the tokens of a packed batch (see varlen_lengths); lce's those
# of the LM head and its loss (linear_cross_entropy: a training batch's 4k to 16k tokens).
SWEEPS = {
    "full": dict(tokens=(1024, 2048, 4096, 8192, 16384, 32768), decode=(1024, 4096, 16384, 32768),
                 varlen=(4096, 8192, 16384, 32768), lce=(4096, 8192, 16384), fp16_at=4096),
    "quick": dict(tokens=(2048, 8192), decode=(4096, 32768), varlen=(8192, 16384), lce=(4096, 8192),
                  fp16_at=None),
    "smoke": dict(tokens=(16, 32), decode=(32, 64), varlen=(40,), lce=(16, 40), fp16_at=16),
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Largest max|a - b| / max|ref| accepted between two providers: a few roundings of the dtype (bf16
# keeps 8 bits, fp16 11), loose enough for eager attention's bf16 scores, far below a wrong result.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


@dataclass
class Case:
    shape: str
    dims: dict
    tokens: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Inputs:
    args: tuple  # what every provider is called with
    leaves: tuple = ()  # the tensors gradients are taken for (autograd leaves under args)


@dataclass
class OpSpec:
    name: str
    lk_name: str  # the public function in llama_kernels
    ref_name: str  # its eager twin in llama_kernels.reference
    adapt: Callable  # f -> the provider function of Inputs.args (adds eps, causal, ...)
    build: Callable  # (case, generator, requires_grad) -> Inputs
    work: Callable  # (case, mode) -> (amount, "B" | "FLOP") per call
    dims: Callable  # model dims -> the ones this op depends on (for the record)
    shapes: tuple  # model shapes of the full sweep (quick runs the first only)
    extra: dict = field(default_factory=dict)  # more providers: name -> factory(spec) -> function
    modes: tuple = TRAIN_MODES
    note: str = ""
    sweep: str = "tokens"  # which token counts of SWEEPS[mode] the op runs at
    base: tuple = ("ours", "eager", "torch.compile")  # the providers every op has, unless it says otherwise
    case_dims: Callable | None = None  # case -> more dims for its records (e.g. varlen's lengths)
    memory_vs: str | None = None  # a provider whose peak memory ours' is given as a ratio of (see run_case)


# ---------------------------------------------------------------------------------------------
# Inputs.  Projections come as (B, T, H, D) buffers seen as (B, H, T, D) views, as in the model.
# ---------------------------------------------------------------------------------------------
def _randn(case, gen, *shape, grad=False):
    t = torch.randn(*shape, generator=gen, device=case.device, dtype=case.dtype)
    return t.requires_grad_(grad)


def _build_rms_norm(case, gen, grad):
    x = _randn(case, gen, case.tokens, case.dims["hidden"], grad=grad)
    w = _randn(case, gen, case.dims["hidden"], grad=grad)
    return Inputs((x, w), (x, w))


def _build_rms_norm_residual(case, gen, grad):
    x, w = _build_rms_norm(case, gen, grad).args
    r = _randn(case, gen, case.tokens, case.dims["hidden"], grad=grad)
    return Inputs((x, r, w), (x, r, w))


def _build_swiglu(case, gen, grad):
    g = _randn(case, gen, case.tokens, case.dims["intermediate"], grad=grad)
    u = _randn(case, gen, case.tokens, case.dims["intermediate"], grad=grad)
    return Inputs((g, u), (g, u))


def _heads(case, gen, n_heads, tokens, grad):
    buf = _randn(case, gen, 1, tokens, n_heads, case.dims["d"], grad=grad)
    return buf, buf.transpose(1, 2)


def _build_rope(case, gen, grad):
    (qb, q), (kb, k) = (_heads(case, gen, case.dims[h], case.tokens, grad) for h in ("hq", "hk"))
    d = case.dims["d"]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=case.device).float() / d))
    cos, sin = reference.rotary_cos_sin(torch.arange(case.tokens, device=case.device), inv_freq, case.dtype)
    return Inputs((q, k, cos, sin), (qb, kb))


def _build_attention(case, gen, grad):
    (qb, q), (kb, k), (vb, v) = (_heads(case, gen, case.dims[h], case.tokens, grad) for h in ("hq", "hk", "hk"))
    return Inputs((q, k, v), (qb, kb, vb))


def _build_decode(case, gen, grad):
    # One new token's query against a KV cache of `tokens` positions, laid out as the cache is.
    _, q = _heads(case, gen, case.dims["hq"], 1, False)
    k = _randn(case, gen, 1, case.dims["hk"], case.tokens, case.dims["d"])
    v = _randn(case, gen, 1, case.dims["hk"], case.tokens, case.dims["d"])
    return Inputs((q, k, v))


# Share of the targets set to the ignore index (-100), at random positions: prompt tokens and
# sequence boundaries carry no loss in a real batch, and the kernels must skip them.
LCE_IGNORED = 1 / 16


def _build_lce(case, gen, grad):
    # hidden (N, H) ~ N(0, 1), as the final RMSNorm leaves it; weight (V, H) ~ N(0, 1/H), so the
    # logits have a standard deviation of about 1 (a realistic spread: a softmax neither flat nor
    # one-hot); targets uniform over the vocabulary, N/16 of them (at least one) ignored.  One set
    # holds the whole weight (1 GiB at LLaMA-3-8B's shape in bf16), more than twice the L2, so the
    # rotation (sets until their total passes 2x the L2) builds a single set: no pile of weights.
    n, h, v = case.tokens, case.dims["hidden"], case.dims["vocab"]
    x = torch.randn(n, h, generator=gen, device=case.device, dtype=case.dtype).requires_grad_(grad)
    w = torch.randn(v, h, generator=gen, device=case.device, dtype=case.dtype).mul_(h ** -0.5).requires_grad_(grad)
    target = torch.randint(0, v, (n,), generator=gen, device=case.device)
    ignored = torch.randperm(n, generator=gen, device=case.device)[: max(1, round(n * LCE_IGNORED))]
    target[ignored] = -100
    return Inputs((x, w, target), (x, w))


def varlen_lengths(total: int) -> list[int]:
    """Uneven sequence lengths that sum to ``total`` (a packed batch of ``total`` tokens): drawn
    uniformly from ``[total // 32, total // 4]`` with the seed ``total`` (the same every run and
    every provider), the last one cut to fit.  8192 tokens give about 7 sequences of 256 to 2048."""
    lo = max(1, total // 32)
    hi = max(lo, total // 4)
    gen = torch.Generator().manual_seed(total)
    lengths, left = [], total
    while left > 0:
        lengths.append(min(left, int(torch.randint(lo, hi + 1, (1,), generator=gen))))
        left -= lengths[-1]
    return lengths


def _build_varlen(case, gen, grad):
    # Packed: q (1, Hq, total, D), k, v (1, Hk, total, D) as transposed views of (1, total, H, D),
    # cu_seqlens int32 on the device, and the longest length as an int (no host sync in ours).
    (qb, q), (kb, k), (vb, v) = (_heads(case, gen, case.dims[h], case.tokens, grad) for h in ("hq", "hk", "hk"))
    lengths = varlen_lengths(case.tokens)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=case.device)
    return Inputs((q, k, v, cu, max(lengths)), (qb, kb, vb))


def _varlen_case_dims(case):
    lengths = varlen_lengths(case.tokens)
    return {"sequences": len(lengths), "max_len": max(lengths), "padded_tokens": len(lengths) * max(lengths),
            "lengths": lengths}


# ---------------------------------------------------------------------------------------------
# Work per call (see the module docstring)
# ---------------------------------------------------------------------------------------------
def _by_mode(mode, fwd, bwd):
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def _size(case):
    return torch.finfo(case.dtype).bits // 8


def _work_rms_norm(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], _size(case)
    return _by_mode(mode, (2 * n * h + h) * s, (3 * n * h + 2 * h) * s), "B"


def _work_rms_norm_residual(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], _size(case)
    return _by_mode(mode, (4 * n * h + h) * s, (4 * n * h + 2 * h) * s), "B"


def _work_swiglu(case, mode):
    n, i, s = case.tokens, case.dims["intermediate"], _size(case)
    return _by_mode(mode, 3 * n * i * s, 5 * n * i * s), "B"


def _work_rope(case, mode):
    n, d, s = case.tokens, case.dims["d"], _size(case)
    one_way = (2 * n * (case.dims["hq"] + case.dims["hk"]) * d + 2 * n * d) * s
    return _by_mode(mode, one_way, one_way), "B"


def _work_attention(case, mode):
    n, d = case.tokens, case.dims["d"]
    fwd = 4 * case.dims["hq"] * n * n * d / 2  # QK^T and PV, 2 FLOP per multiply-add, causal half
    return _by_mode(mode, fwd, 2.5 * fwd), "FLOP"


def _work_varlen(case, mode):
    # Only the real work: each sequence's own causal attention, none of a padded batch's waste.
    d = case.dims["d"]
    fwd = sum(4 * case.dims["hq"] * n * n * d / 2 for n in varlen_lengths(case.tokens))
    return _by_mode(mode, fwd, 2.5 * fwd), "FLOP"


def _work_lce(case, mode):
    # The matrix products a minimal implementation does: logits = x W^T (2NVH), then dx = dlogits W
    # and dW = dlogits^T x (4NVH); every token counted, ignored ones included.  The softmax is O(NV).
    fwd = 2 * case.tokens * case.dims["vocab"] * case.dims["hidden"]
    return _by_mode(mode, fwd, 2 * fwd), "FLOP"


def _work_decode(case, mode):
    hq, hk, d, s = case.dims["hq"], case.dims["hk"], case.dims["d"], _size(case)
    return (2 * hq * d + 2 * hk * case.tokens * d) * s, "B"


# ---------------------------------------------------------------------------------------------
# Providers beyond ours / eager / torch.compile
# ---------------------------------------------------------------------------------------------
def _liger(attr: str, adapt: Callable, note: str = ""):
    """Factory of a Liger-Kernel provider: ``adapt(liger_kernel.<module>.<name>)``."""

    def factory():
        module_name, name = attr.rsplit(".", 1)
        try:
            import importlib

            fn = adapt(getattr(importlib.import_module(module_name), name))
        except Exception as exc:
            raise Missing(f"liger_kernel not importable ({type(exc).__name__}: {exc}); "
                          "benchmarks/README.md says how to carry its wheel") from None
        fn.note = note or None
        return fn

    return factory


class Sdpa:
    """``F.scaled_dot_product_attention`` pinned to one backend with ``sdpa_kernel``.

    Grouped-query heads: ``enable_gqa=True`` when the backend accepts it; otherwise K/V are expanded
    to the query heads (``repeat_interleave``) inside the timed call, since a caller of that backend
    has to pay for it.  Which of the two ran is the provider's note.
    """

    def __init__(self, backend: str, causal: bool, what: str | None = None):
        self.backend_name, self.causal, self.what = backend, causal, what
        self.expand = None  # decided by the first call
        self.note = what  # completed by the first call with how GQA ran

    def _call(self, q, k, v, expand):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if expand and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with sdpa_kernel(getattr(SDPBackend, self.backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=not expand)

    def __call__(self, q, k, v):
        if self.expand is not None:
            return self._call(q, k, v, self.expand)
        try:
            out, self.expand = self._call(q, k, v, False), False
            self.note = "; ".join(filter(None, (self.what, "enable_gqa=True")))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as gqa_error:
            try:
                out = self._call(q, k, v, True)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                raise Missing(f"SDPA {self.backend_name} backend refuses these inputs: "
                              f"{str(exc).strip().splitlines()[0][:200]}") from None
            self.expand = True
            self.note = "; ".join(filter(None, (
                self.what, "K/V expanded to the query heads inside the timed call (enable_gqa refused: "
                           f"{str(gqa_error).strip().splitlines()[0][:120]})")))
        return out


def _flash_attn(causal: bool):
    def factory():
        try:
            from flash_attn import flash_attn_func
        except Exception as exc:
            raise Missing(f"flash_attn not importable ({type(exc).__name__}: {exc})") from None

        def run(q, k, v):  # flash-attn takes (B, T, H, D): our views transposed back, no copy
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)

        run.note = "flash_attn_func, native GQA"
        return run

    return factory


def _ours_with_options():
    """``llama_kernels``; Missing when it, or its ``kernel_options``, is not importable."""
    try:
        import llama_kernels as lk

        lk.kernel_options  # noqa: B018  (the switch ours-portable-fwd sets)
    except Exception as exc:
        raise Missing(f"llama_kernels.kernel_options not importable: {type(exc).__name__}: {exc}") from None
    return lk


def _ours_portable_fwd():
    """Ours with the ``tma_forward=False`` kernel option during each call: the portable forward
    kernel where ours would take the Hopper TMA one.  The backward does not read the option, so
    it is ours'."""
    lk = _ours_with_options()
    options = lk.kernel_options
    call = _attention_call(lk.flash_attention)

    def run(q, k, v):
        with options(tma_forward=False):
            return call(q, k, v)

    run.note = "kernel_options(tma_forward=False): the portable forward kernel; backward as ours"
    return run


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside, the previous setting (and its
    ``warn_only``) restored after.  ``torch.utils.deterministic.fill_uninitialized_memory`` is off
    inside (restored too), so that the timings hold the deterministic kernels and not the NaN
    filling of every ``torch.empty`` that deterministic mode adds by default."""
    import torch.utils.deterministic as det

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = getattr(det, "fill_uninitialized_memory", None)
    torch.use_deterministic_algorithms(True)
    if fill is not None:
        det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if fill is not None:
            det.fill_uninitialized_memory = fill


def _ours_deterministic():
    """Ours with deterministic algorithms on for each checked or timed step, its backward included
    (the ``context`` attribute, honoured by :func:`_steps_in`): the two-kernel backward schedule
    instead of the fused one with float32 atomic dQ."""
    lk = _ours_with_options()
    run = _attention_call(lk.flash_attention)
    run.context = deterministic_algorithms
    run.note = ("torch.use_deterministic_algorithms(True) around each step, backward included: "
                "the deterministic backward (separate dQ and dK/dV kernels)")
    return run


def _attention_extras(causal: bool) -> dict:
    # Decode (one query over the whole cache) is non-causal for SDPA, whose causal mask is aligned
    # top-left; ours and eager align bottom-right, which for Tq = 1 is the same thing.
    return {
        "sdpa-flash": lambda: Sdpa("FLASH_ATTENTION", causal),
        "sdpa-cudnn": lambda: Sdpa("CUDNN_ATTENTION", causal),
        "flash-attn": _flash_attn(causal),
    }


# Packed (varlen) attention.  Providers that want another layout (a padded batch, a list of
# slices) carry a ``layout`` attribute: ``layout(*packed_args) -> (their args, restore)``, where
# ``restore`` maps their output back to the packed layout.  The check runs layout -> call ->
# restore under autograd, so outputs and input gradients are compared in the packed layout with
# the same cotangents; the timed calls get inputs converted beforehand (:func:`_in_own_layout`),
# so a conversion is never timed: a padded batch is what its user already has.
def _bounds(cu) -> list:
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _pad(x, bounds, width):
    """Packed ``x (1, H, total, D)`` -> right-padded ``(B, H, width, D)``, a transposed view of a
    ``(B, width, H, D)`` buffer (the model's layout); differentiable."""
    rows = x[0].transpose(0, 1)  # (total, H, D)
    return torch.stack([F.pad(rows[a:b], (0, 0, 0, 0, 0, width - (b - a))) for a, b in bounds]).transpose(1, 2)


def _unpad(out, bounds):
    """Right-padded ``(B, H, width, D)`` -> packed ``(1, H, total, D)``: the real rows, in order."""
    return torch.cat([out[i, :, : b - a] for i, (a, b) in enumerate(bounds)], dim=1).unsqueeze(0)


def _padded_layout(masked: bool):
    def layout(q, k, v, cu, max_len):
        bounds = _bounds(cu)
        width = max(b - a for a, b in bounds)
        args = tuple(_pad(t, bounds, width) for t in (q, k, v))
        if masked:  # as transformers builds it for a padded batch: causal, and no padding key
            lengths = torch.tensor([b - a for a, b in bounds], device=q.device)
            keys = torch.arange(width, device=q.device)
            mask = reference.causal_mask(width, width, q.device)[None] & (keys < lengths[:, None])[:, None, :]
            args += (mask[:, None],)  # (B, 1, width, width)
        return args, lambda out: _unpad(out, bounds)

    return layout


def _sdpa_padded():
    """SDPA flash on a right-padded batch with ``is_causal=True`` and no mask: causal masking alone
    hides every padding key from the real queries, whose rows are all that is kept (the padding
    rows get zero cotangents in the check), so this is exact, and it pays only for the padding."""
    fn = Sdpa("FLASH_ATTENTION", causal=True, what="right-padded batch, SDPA flash, is_causal=True, no mask")
    fn.layout = _padded_layout(masked=False)
    return fn


def _sdpa_padded_mask():
    """SDPA on a right-padded batch with the boolean mask transformers builds for it (causal and key
    padding, ``(B, 1, L, L)``), K/V expanded to the query heads as transformers' ``repeat_kv`` does
    when there is a mask; SDPA picks the backend (flash takes no mask)."""

    def run(q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run.layout = _padded_layout(masked=True)
    run.note = ("right-padded batch, attn_mask (B, 1, L, L) causal & key padding, K/V expanded "
                "(transformers' sdpa path); SDPA chooses the backend")
    return run


class _SdpaLoop:
    """One SDPA flash call per sequence on slices of the packed tensors (no padding, no mask), a
    Python loop, the outputs concatenated (a copy a caller needs too)."""

    def __init__(self):
        self.inner = Sdpa("FLASH_ATTENTION", causal=True, what="one SDPA flash call per sequence, outputs "
                                                               "concatenated")

    def layout(self, q, k, v, cu, max_len):
        return (q, k, v, _bounds(cu)), (lambda out: out)

    def __call__(self, q, k, v, bounds):
        return torch.cat([self.inner(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds], dim=2)

    @property
    def note(self):
        return self.inner.note


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:
        raise Missing(f"flash_attn not importable ({type(exc).__name__}: {exc})") from None

    def run(q, k, v, cu, max_len):  # (total, H, D): our views transposed back, no copy
        out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                     cu, cu, max_len, max_len, causal=True)
        return out.unsqueeze(0).transpose(1, 2)

    run.note = "flash_attn_varlen_func, native GQA"
    return run


def _varlen_eager():
    def run(q, k, v, cu, max_len):
        return reference.varlen_attention(q, k, v, cu, None, True)

    run.note = "reference.varlen_attention: eager attention per sequence (a Python loop, scores materialised)"
    return run


# How each op calls a function of its family: ours and eager share one adapter, and the eager one
# is what torch.compile compiles.  (decode has its own lambda so that torch.compile caches its
# graphs apart from prefill's.)
def _rms_norm_call(f):
    return lambda x, w: f(x, w, EPS)


def _rms_norm_residual_call(f):
    return lambda x, r, w: f(x, w, EPS, residual=r)


def _swiglu_call(f):
    return lambda g, u: f(g, u)


def _rope_call(f):
    return lambda q, k, cos, sin: f(q, k, cos, sin)


def _attention_call(f):
    return lambda q, k, v: f(q, k, v, causal=True)


def _decode_call(f):
    return lambda q, k, v: f(q, k, v, True)


def _lce_call(f):
    return lambda x, w, target: f(x, w, target)  # ignore_index -100, mean over the targets kept


def _varlen_call(f):
    return lambda q, k, v, cu, max_len: f(q, k, v, causal=True, cu_seqlens_q=cu, max_seqlen_q=max_len,
                                          max_seqlen_k=max_len)


# Liger's functions, called with LLaMA's casting ("llama": statistics in float32, as ours).
_LIGER_NORM = "in_place=False, so the cotangent we pass is not overwritten between timed calls"
_LIGER = {
    "rms_norm": _liger("liger_kernel.ops.LigerRMSNormFunction",
                       lambda fn: lambda x, w: fn.apply(x, w, EPS, 0.0, "llama", False), _LIGER_NORM),
    "rms_norm+residual": _liger("liger_kernel.ops.LigerFusedAddRMSNormFunction",
                                lambda fn: lambda x, r, w: fn.apply(x, r, w, EPS, 0.0, "llama", False), _LIGER_NORM),
    "swiglu": _liger("liger_kernel.ops.LigerSiLUMulFunction", lambda fn: lambda g, u: fn.apply(g, u),
                     "LigerSiLUMulFunction; its backward writes the gradients into the saved inputs, so repeated "
                     "timed backwards see drifting values (the same bytes move)"),
    "apply_rotary": _liger("liger_kernel.transformers.rope.liger_rotary_pos_emb", _rope_call,
                           "liger_rotary_pos_emb rotates q and k in place"),
    # liger_fused_linear_cross_entropy(input, weight, target, bias=None, ..., ignore_index=-100,
    # ..., reduction="mean") returns the loss alone unless z-loss or accuracy are asked for.
    "linear_cross_entropy": _liger("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy",
                                   lambda fn: lambda x, w, target: fn(x, w, target, ignore_index=-100,
                                                                      reduction="mean"),
                                   "liger_fused_linear_cross_entropy: computes the input and weight gradients in "
                                   "its forward (chunks of tokens) and only scales them in its backward (a repeated "
                                   "backward, as the backward mode times, recomputes them once, then reuses them), "
                                   "so compare forward+backward"),
}

_HEADS = lambda m: {k: m[k] for k in ("hq", "hk", "d")}  # noqa: E731
OPS = [
    OpSpec("rms_norm", "rms_norm", "rms_norm", _rms_norm_call, _build_rms_norm, _work_rms_norm,
           lambda m: {"hidden": m["hidden"]}, ("llama3-8b", "smollm2-135m"), {"liger": _LIGER["rms_norm"]},
           note="N tokens x H hidden, s bytes each: forward (2NH + H)s: read x, w; write y. "
                "Backward (3NH + 2H)s: read dy, x, w; write dx, dw."),
    OpSpec("rms_norm+residual", "rms_norm", "rms_norm", _rms_norm_residual_call, _build_rms_norm_residual,
           _work_rms_norm_residual, lambda m: {"hidden": m["hidden"]}, ("llama3-8b", "smollm2-135m"),
           {"liger": _LIGER["rms_norm+residual"]},
           note="h = x + r, y = rms_norm(h): forward (4NH + H)s: read x, r, w; write y, h. Backward "
                "(4NH + 2H)s: read dy, dh, h, w; write dx (= dr, one tensor), dw."),
    OpSpec("swiglu", "swiglu", "swiglu", _swiglu_call, _build_swiglu, _work_swiglu,
           lambda m: {"intermediate": m["intermediate"]}, ("llama3-8b", "llama2-7b", "smollm2-135m"),
           {"liger": _LIGER["swiglu"]},
           note="N tokens x I intermediate: forward 3NIs: read g, u; write y. Backward 5NIs: read dy, g, u; "
                "write dg, du."),
    OpSpec("apply_rotary", "apply_rotary", "apply_rotary", _rope_call, _build_rope, _work_rope, _HEADS,
           ("llama3-8b", "smollm2-135m"), {"liger": _LIGER["apply_rotary"]},
           note="q (1, Hq, N, D), k (1, Hk, N, D) as transposed views of (1, N, H, D), cos/sin (N, D): each "
                "direction (2N(Hq + Hk)D + 2ND)s: read q, k (or their gradients), cos, sin; write two outputs."),
    OpSpec("flash_attention", "flash_attention", "attention", _attention_call, _build_attention, _work_attention,
           _HEADS, ("llama3-8b", "smollm2-135m"),
           {"ours-portable-fwd": _ours_portable_fwd, "ours-deterministic": _ours_deterministic,
            **_attention_extras(causal=True)},
           note="causal prefill, Tq = Tk = N, GQA: forward 4 Hq N^2 D / 2 FLOP (two matrix products, causal "
                "half); backward 2.5x that (FlashAttention's count); compared with the bf16 matmul rate."),
    OpSpec("decode", "flash_attention", "attention", _decode_call, _build_decode, _work_decode, _HEADS,
           ("llama3-8b", "smollm2-135m"), _attention_extras(causal=False), modes=("forward",), sweep="decode",
           note="one query token over a KV cache of L positions (the tokens column), inference: "
                "(2 Hq D + 2 Hk L D)s bytes: read q, K, V; write o; compared with the copy bandwidth."),
    OpSpec("linear_cross_entropy", "fused_linear_cross_entropy", "fused_linear_cross_entropy", _lce_call,
           _build_lce, _work_lce, lambda m: {"hidden": m["hidden"], "vocab": m["vocab"]},
           ("llama3-8b", "llama2-7b", "smollm2-135m"), {"liger": _LIGER["linear_cross_entropy"]}, sweep="lce",
           memory_vs="eager",
           note="LM head and loss: mean cross-entropy of x (N, H) W^T (V, H) over N targets (N/16 ignored, -100), "
                "in float32 from half-precision inputs; gradients of x and W. Work: the matrix products, "
                "forward 2NVH FLOP (the logits), backward 4NVH (dx and dW), compared with the bf16 matmul "
                "rate. Eager materialises the (N, V) logits (bf16 and float32); a fused provider may compute "
                "the gradients in its forward, so forward+backward is the figure to compare. Peak memory "
                "(the last figure of each cell) is the target: ours <= 1/4 of eager's at 8k tokens "
                "(ours' ratio listed under the table)."),
    OpSpec("varlen_attention", "flash_attention", "varlen_attention", _varlen_call, _build_varlen, _work_varlen,
           _HEADS, ("llama3-8b", "smollm2-135m"),
           {"eager": _varlen_eager, "flash-attn": _flash_attn_varlen, "sdpa-padded": _sdpa_padded,
            "sdpa-padded-mask": _sdpa_padded_mask, "sdpa-loop": _SdpaLoop},
           modes=("forward", "forward+backward"), sweep="varlen", base=("ours",), case_dims=_varlen_case_dims,
           note="packed causal attention of uneven sequences (lengths drawn uniformly from [N/32, N/4], fixed "
                "seed, the last cut so that they total N, the tokens column; listed below the table), GQA. "
                "Work counts only the real work, each sequence's own causal attention: forward "
                "sum_i 4 Hq L_i^2 D / 2 FLOP, backward 2.5x that; padded providers are charged the same, so "
                "their rate shows the padding's waste. Padded providers get their batch built before the "
                "timing; every output and gradient is compared in the packed layout."),
]


def provider_notes() -> dict:
    """What each provider is, for the report's provider list."""
    return {
        "ours": "llama_kernels (Triton)",
        "ours-portable-fwd": "flash_attention only: ours inside llama_kernels.kernel_options(tma_forward=False) "
                             "during each call (restored after), i.e. the portable forward kernel instead of "
                             "the Hopper TMA / warp-specialised one that ours takes on sm_90 in fp16/bf16; "
                             "the backward is ours'",
        "ours-deterministic": "flash_attention only: ours with torch.use_deterministic_algorithms(True) around "
                              "each checked or timed step, its backward included (the previous setting and "
                              "warn_only restored after; torch.utils.deterministic.fill_uninitialized_memory "
                              "off inside): the deterministic two-kernel backward instead of the fused one "
                              "with float32 atomic dQ; the forward is ours'",
        "eager": "llama_kernels.reference: the eager PyTorch twin of each op",
        "torch.compile": "torch.compile (default mode) of the eager op; compile time is not timed; op runs "
                         "compile backwards with torch._functorch.config.donated_buffer=False so that a "
                         "backward can be timed alone (retain_graph)",
        "liger": "Liger-Kernel's Triton ops (LigerRMSNormFunction, LigerFusedAddRMSNormFunction, "
                 "LigerSiLUMulFunction, liger_rotary_pos_emb, liger_fused_linear_cross_entropy)",
        "sdpa-flash": "torch SDPA under sdpa_kernel(SDPBackend.FLASH_ATTENTION)",
        "sdpa-cudnn": "torch SDPA under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)",
        "flash-attn": "flash_attn.flash_attn_func (varlen_attention: flash_attn_varlen_func)",
        "sdpa-padded": "varlen_attention only: the sequences right-padded to the longest into a (B, H, L, D) "
                       "batch (built before the timing), SDPA flash with is_causal=True and no mask (causal "
                       "masking hides the padding keys from every real query; padding rows are discarded): "
                       "the fastest padded baseline, paying only for the padding",
        "sdpa-padded-mask": "varlen_attention only: the same padded batch with the boolean (B, 1, L, L) causal "
                            "and key-padding mask transformers builds, K/V expanded to the query heads as "
                            "transformers does with a mask; SDPA chooses its backend",
        "sdpa-loop": "varlen_attention only: one SDPA flash call per sequence on slices of the packed tensors "
                     "(a Python loop, no padding), outputs concatenated",
    }


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def providers(spec: OpSpec, settings: Settings) -> dict:
    """name -> factory of the function every provider of ``spec`` is called through."""

    def ours():
        try:
            import llama_kernels as lk

            fn = getattr(lk, spec.lk_name)
        except Exception as exc:  # an op module not written yet, or broken
            raise Missing(f"llama_kernels.{spec.lk_name} not importable: {type(exc).__name__}: {exc}") from None
        return spec.adapt(fn)

    def compiled():
        if not settings.compile:
            raise Skipped("torch.compile providers are off (--no-compile, or --smoke where inductor's CPU "
                          "compile takes ~20 s per graph; --compile turns them on)")
        if spec.name not in _COMPILED:  # one per op, so dynamo's cache serves every shape
            _COMPILED[spec.name] = torch.compile(spec.adapt(getattr(reference, spec.ref_name)))
        return _COMPILED[spec.name]

    base = {"ours": ours, "eager": lambda: spec.adapt(getattr(reference, spec.ref_name)),
            "torch.compile": compiled}
    return {**{name: base[name] for name in spec.base}, **spec.extra}


def cases(spec: OpSpec, settings: Settings):
    sweep = SWEEPS[settings.mode]
    if settings.shapes:  # --shapes: the same for every op
        shapes = settings.shapes
    elif settings.mode == "smoke":
        shapes = ("smoke",)
    else:
        shapes = spec.shapes[:1] if settings.mode == "quick" else spec.shapes
    tokens = settings.tokens or sweep[spec.sweep]
    for i, shape in enumerate(shapes):
        for n in tokens:
            yield Case(shape, MODELS[shape], n, torch.bfloat16, settings.device)
            if i == 0 and n == sweep["fp16_at"]:
                yield Case(shape, MODELS[shape], n, torch.float16, settings.device)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cotangents(outs, seed: int):
    """Random output gradients, laid out like the outputs (a provider may return strided views)."""
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    cots = []
    for o in outs:
        values = torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
        cots.append(torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device).copy_(values))
    return cots


def _steps_in(fn):
    """The context every checked or timed step of provider ``fn`` runs in: its ``context``
    attribute (a context-manager factory), else none.  A backward step enters it too, so that a
    setting the backward reads (deterministic algorithms) holds when autograd runs it."""
    return getattr(fn, "context", None) or contextlib.nullcontext


def _in_own_layout(fn, inputs: Inputs, grad: bool) -> Inputs:
    """``inputs`` converted to provider ``fn``'s own layout (its ``layout`` attribute; see the
    varlen providers), without autograd: its floating tensors become the new leaves.  Unchanged
    for a provider without one."""
    layout = getattr(fn, "layout", None)
    if layout is None:
        return inputs
    with torch.no_grad():
        args, _ = layout(*inputs.args)
    args = tuple(a.detach().requires_grad_(grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    leaves = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
    return Inputs(args, leaves)


def _check_run(fn, build, trains: bool):
    """Outputs and (for training ops) input gradients of one call on input set 0.  A provider with
    a ``layout`` is called through it, and its output restored, under autograd: outputs and
    gradients come in the layout of ``build``'s inputs, comparable with every other provider's."""
    inputs = build(0, trains)
    layout = getattr(fn, "layout", None)
    with _steps_in(fn)():
        with torch.set_grad_enabled(trains):
            if layout is None:
                outs = _as_tuple(fn(*inputs.args))
            else:
                args, restore = layout(*inputs.args)
                outs = _as_tuple(restore(fn(*args)))
        grads = list(torch.autograd.grad(outs, inputs.leaves, _cotangents(outs, 7))) if trains else []
    return [o.detach() for o in outs] + grads


def _max_rel_err(got: list, want: list) -> float:
    """max over tensors of max|got - want| / max|want|: inf on a shape mismatch or a non-finite value."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape or not torch.isfinite(g).all():
            return float("inf")
        scale = w.float().abs().max().clamp_min(1e-6)
        worst = max(worst, ((g.float() - w.float()).abs().max() / scale).item())
    return worst


def _timed_call(fn, build, mode: str, trains: bool, settings: Settings):
    """(call, sets): a no-argument function doing one ``mode`` step on the next of several input
    sets, rotated so that the sets together exceed the L2.  Each step (and the forward that records
    a backward's graph) runs in the provider's context (:func:`_steps_in`)."""
    steps_in = _steps_in(fn)
    own_build = build
    build = lambda i, grad: _in_own_layout(fn, own_build(i, grad), grad)  # noqa: E731 (outside the timing)
    probe = build(0, trains)
    set_bytes = nbytes(*probe.args) * (2 if mode != "forward" else 1)  # + cotangents, about as large
    del probe
    if mode == "forward":
        grad_mode = torch.enable_grad if trains else torch.no_grad  # a training forward records the graph

        def call(inp):
            with grad_mode(), steps_in():
                return fn(*inp.args)

        return cycling(rotation(lambda i: build(i, trains), set_bytes, settings), call), None

    def make(i):
        inp = build(i, True)
        with steps_in():
            outs = _as_tuple(fn(*inp.args))  # the graph is recorded once per set, kept for `backward`
        cots = _cotangents(outs, 100 + i)  # laid out like this provider's outputs
        return inp, (outs if mode == "backward" else None), cots

    def backward(s):
        with steps_in():
            return torch.autograd.grad(s[1], s[0].leaves, s[2], retain_graph=True)

    def forward_backward(s):
        with steps_in():
            return torch.autograd.grad(_as_tuple(fn(*s[0].args)), s[0].leaves, s[2])

    sets = rotation(make, set_bytes, settings)
    return cycling(sets, backward if mode == "backward" else forward_backward), sets


def _memory_ratios(rs: list, other: str) -> None:
    """Ours' peak memory over ``other``'s, mode by mode, in ``extra["peak_mem_vs_<other>"]`` and the
    note of ours' records (so the markdown lists it under the table) and in the log: the figure a
    fused op is judged by.  Nothing where either has no peak (the CPU allocator keeps none)."""
    by = {(r.provider, r.mode): r for r in rs if r.status == "ok"}
    for mode in dict.fromkeys(r.mode for r in rs):
        ours, base = by.get(("ours", mode)), by.get((other, mode))
        if ours is None or base is None or not ours.peak_mem_delta_bytes or not base.peak_mem_delta_bytes:
            continue
        ratio = ours.peak_mem_delta_bytes / base.peak_mem_delta_bytes
        ours.extra[f"peak_mem_vs_{other}"] = ratio
        line = f"peak memory {ratio:.2f}x {other}'s at {ours.shape} T={ours.tokens} {ours.dtype}"
        ours.note = "; ".join(filter(None, (ours.note, line)))
        say(f"ops {ours.op} [{mode}] ours: {line}")


def run_case(spec: OpSpec, case: Case, settings: Settings, limits: dict, records: list) -> None:
    trains = spec.modes != ("forward",)
    first = len(records)  # this case's records are records[first:]
    dtype = DTYPE_NAMES[case.dtype]

    def build(i, grad):
        return spec.build(case, torch.Generator(device=case.device).manual_seed(1000 + i), grad)

    def record(provider, mode, **kw):
        work, unit = spec.work(case, mode)
        dims = {**spec.dims(case.dims), "batch": 1, **(spec.case_dims(case) if spec.case_dims else {})}
        r = Record("ops", spec.name, mode, provider, case.shape, dims, case.tokens, dtype, work=work,
                   work_unit=unit, **kw)
        records.append(r)
        return r

    say(f"ops {spec.name} {case.shape} T={case.tokens} {dtype}")
    reference_out, reference_name = None, None
    for name, factory in providers(spec, settings).items():
        # 1. Check: outputs (and gradients) against the reference, the first provider that ran.
        fn = err = None
        try:
            fn = factory()
            out = _check_run(fn, build, trains)
            if reference_out is None:
                reference_out, reference_name = out, name
            else:
                err = _max_rel_err(out, reference_out)
            del out
        except Exception as exc:
            status, reason = classify(exc)
            for mode in spec.modes:
                say(record(name, mode, status=status, reason=reason).describe())
            free_memory()
            continue
        note = getattr(fn, "note", None)
        if err is not None and not err <= TOLERANCE[case.dtype]:
            reason = f"max|out - {reference_name}| / max|{reference_name}| = {err:.3g} > {TOLERANCE[case.dtype]}"
            for mode in spec.modes:
                say(record(name, mode, status="mismatch", reason=reason, note=note, max_rel_err=err).describe())
            continue
        # 2. Time every mode, then one more call for its peak memory.
        for mode in spec.modes:
            r = record(name, mode, note=note, max_rel_err=err)
            call = sets = None
            try:
                call, sets = _timed_call(fn, build, mode, trains, settings)
                r.set_timing(bench(call, settings), limits)
                r.peak_mem_bytes, r.peak_mem_delta_bytes = peak_memory(call, settings.device)
            except Exception as exc:
                r.status, r.reason = classify(exc)
            del call, sets  # the input sets and recorded graphs: free before the next mode
            free_memory()
            say(r.describe())
    del reference_out
    free_memory()
    if spec.memory_vs:
        _memory_ratios(records[first:], spec.memory_vs)


def run(settings: Settings, limits: dict, records: list, progress=None) -> None:
    """Measure every op of :data:`OPS` (or ``settings.ops``) at every case into ``records``.

    ``progress(label)``, when given, is called after each op's figures are in ``records``
    (``__main__`` rewrites the report then, so a run killed later keeps them).
    """
    import torch._functorch.config as functorch_config

    # AOTAutograd lets a compiled backward reuse ("donate") its saved tensors by default, which
    # forbids retain_graph=True, and the backward mode times torch.autograd.grad(retain_graph=True)
    # on one recorded graph.  The choice is made when the backward compiles (its first call), so it
    # is switched off for the whole op run.
    no_donation = functorch_config.patch(donated_buffer=False) if hasattr(
        functorch_config, "donated_buffer") else contextlib.nullcontext()
    with no_donation:
        for spec in OPS:
            if settings.ops and spec.name not in settings.ops:
                continue
            for case in cases(spec, settings):
                run_case(spec, case, settings, limits, records)
            if progress is not None:
                progress(f"ops {spec.name}")
