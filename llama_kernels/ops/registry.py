"""One declaration per op, and the model shapes ops are measured at.

Each public op is an :class:`Op`: its name (the function in ``llama_kernels`` and its eager twin of
the same name in :mod:`llama_kernels.reference`), the module defining it, the ``apply_kernels``
flag that patches it into models, and its :class:`OpSample` s, the named ways of calling it with
inputs built at a model shape (OpInfo's idea, in PyTorch).  Everything that lists ops reads this
table: the package's exports and API docstring, ``apply_kernels``' flags, ``llama-kernels check``,
the parametrised oracle test (``tests/test_registry.py``) and the op benchmarks.

A sample's inputs are positional arguments plus keyword arguments; ``grad`` names the positions
that are differentiated (floating tensors elsewhere are constants, such as RoPE's cos/sin tables:
they follow the inputs' precision, float64 for the oracle).  Nothing here imports Triton: the
command line reads this table before it decides whether Triton's interpreter is needed.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

# The dtype names of the command line and the benchmarks' records.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` for ``torch.bfloat16``: the short name of one of :data:`DTYPES`."""
    return next(name for name, d in DTYPES.items() if d == dtype)


# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A real model's dimensions: transformers config keywords (all but the layer count, which each
    benchmark chooses) and the short names the ops read (:meth:`dims`)."""

    name: str  # the records' shape label, e.g. "llama3-8b"
    title: str  # the model, e.g. "LLaMA-3-8B"
    config: dict = field(hash=False)

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    def dims(self) -> dict:
        """``hidden, intermediate, hq, hk, d, vocab, rope_theta, eps``: what op inputs are built from."""
        c = self.config
        return dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"], hq=c["num_attention_heads"],
                    hk=c["num_key_value_heads"], d=self.head_dim, vocab=c["vocab_size"],
                    rope_theta=c["rope_theta"], eps=c["rms_norm_eps"])


def head_dim(config: dict) -> int:
    """The attention head dim of a transformers config: its ``head_dim``, else hidden / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _shapes(*shapes: ModelShape) -> dict:
    return {shape.name: shape for shape in shapes}


# From the models' transformers configs.  LLaMA-2-7B serves its MLP width and vocabulary (and MHA);
# SmolLM2-135M is the small model the demo and `llama-kernels check` run; "smoke" is for CPU runs,
# its vocabulary a multiple of no block size, so that the kernels' tails run too.
MODEL_SHAPES = _shapes(
    ModelShape("llama3-8b", "LLaMA-3-8B", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)),
    ModelShape("llama2-7b", "LLaMA-2-7B", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)),
    ModelShape("smollm2-135m", "SmolLM2-135M", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)),
    ModelShape("qwen3-8b", "Qwen3-8B", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=False)),
    # Alternating local (sliding-window) and global layers, soft-capped scores and logits, tied head.
    ModelShape("gemma2-9b", "Gemma-2-9B", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True)),
    # meta-llama/Llama-3.2-1B's config.json: head dim 64, tied embeddings, LLaMA-3's RoPE scaling.
    ModelShape("llama3.2-1b", "LLaMA-3.2-1B", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True)),
    ModelShape("smoke", "a smoke-test model", dict(
        vocab_size=1031, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096)),
)


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleCase:
    """Where a sample is built: a model's :meth:`ModelShape.dims`, ``batch`` sequences of ``tokens``."""

    dims: dict = field(hash=False)
    batch: int
    tokens: int
    dtype: torch.dtype
    device: torch.device
    generator: torch.Generator = field(hash=False)

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return (t * scale).to(self.dtype)

    def heads(self, n_heads: int, tokens: int | None = None) -> torch.Tensor:
        """``(B, H, T, D)`` as the model makes it: a transposed view of a ``(B, T, H, D)`` projection."""
        return self.randn(self.batch, tokens or self.tokens, n_heads, self.dims["d"]).transpose(1, 2)


@dataclass
class Sample:
    """One call's inputs: ``op(*args, **kwargs)``; ``grad`` the positions of ``args`` differentiated,
    ``names`` what each argument is (for messages)."""

    args: tuple
    kwargs: dict
    grad: tuple
    names: tuple


@dataclass(frozen=True)
class OpSample:
    """A named way of calling an op: ``build(case) -> Sample``.  ``training``: differentiated (a
    decode step is not); ``check``: one of ``llama-kernels check``'s cases."""

    name: str
    build: Callable[[SampleCase], Sample]
    training: bool = True
    check: bool = True
    op: str = ""  # set by Op: the op it calls

    def kernel(self) -> Callable:
        """The public kernel function (looked up at each call, so a test may replace it)."""
        return getattr(importlib.import_module("llama_kernels"), self.op)

    def eager(self) -> Callable:
        """The op's eager twin in :mod:`llama_kernels.reference`."""
        return getattr(importlib.import_module("llama_kernels.reference"), self.op)


@dataclass(frozen=True)
class Op:
    """A public op: ``llama_kernels.<name>`` (defined in ``module``) and ``reference.<name>``."""

    name: str
    module: str  # relative to llama_kernels
    flag: str | None  # the apply_kernels flag that patches it into models (None: not patched)
    kernels: str  # the prefix of its Triton kernels' names (as LAUNCHES and the compile report name them)
    samples: tuple = ()
    # Inputs are whole sequences (attention): `llama-kernels check` builds one sequence, of its
    # attention length, since the interpreter's time grows with the programs a batch launches.
    sequence: bool = False

    def __post_init__(self):
        object.__setattr__(self, "samples", tuple(dataclasses.replace(s, op=self.name) for s in self.samples))


def _rms_norm(case):
    x, w = case.randn(case.batch, case.tokens, case.dims["hidden"]), case.randn(case.dims["hidden"])
    return Sample((x, w, case.dims["eps"]), {}, (0, 1), ("x", "weight", "eps"))


def _rms_norm_residual(case):
    x, w, eps = _rms_norm(case).args
    residual = case.randn(*x.shape)
    return Sample((x, w, eps, residual), {}, (0, 1, 3), ("x", "weight", "eps", "residual"))


def _gemma_rms_norm(case):
    sample = _rms_norm(case)
    sample.kwargs.update(offset=1.0, casting="gemma")
    return sample


def _gated_unit(case):
    gate, up = (case.randn(case.batch, case.tokens, case.dims["intermediate"]) for _ in range(2))
    return Sample((gate, up), {}, (0, 1), ("gate", "up"))


def _apply_rotary(case):
    from ..reference import rotary_cos_sin

    d = case.dims["d"]
    q, k = case.heads(case.dims["hq"]), case.heads(case.dims["hk"])
    inv_freq = 1.0 / case.dims["rope_theta"] ** (torch.arange(0, d, 2, device=case.device).float() / d)
    cos, sin = rotary_cos_sin(torch.arange(case.tokens, device=case.device), inv_freq, case.dtype)
    return Sample((q, k, cos, sin), {}, (0, 1), ("q", "k", "cos", "sin"))


def _attention(case, **options):
    q, k, v = case.heads(case.dims["hq"]), case.heads(case.dims["hk"]), case.heads(case.dims["hk"])
    return Sample((q, k, v), {"causal": True, **options}, (0, 1, 2), ("q", "k", "v"))


# Gemma 2's options at the check: a window of a quarter of the tokens, and a soft cap low enough to
# bend random scores (the models' own, 50, barely would).  At least two keys: with a window of one
# every query sees only itself, eager's gradients of q and k are exactly zero (a softmax over one
# key), and the rule's floor (1e-6) is then all a kernel's float32 rounding of FlashAttention's
# ``dP - rowsum(dO * O)`` may show, which it sometimes exceeds by a little.
WINDOW_FRACTION, SOFTCAP = 4, 10.0


def _window_softcap_attention(case):
    return _attention(case, window=max(2, case.tokens // WINDOW_FRACTION), softcap=SOFTCAP)


def _decode(case):
    """One new token's query over a KV cache of ``tokens`` positions, laid out as the cache is."""
    q = case.heads(case.dims["hq"], tokens=1)
    k, v = (case.randn(case.batch, case.dims["hk"], case.tokens, case.dims["d"]) for _ in range(2))
    return Sample((q, k, v), {"causal": True}, (), ("q", "k", "v"))


def _flash_decode(case):
    """One new token per row over a preallocated cache of ``tokens + 3`` slots, row ``b`` holding
    ``tokens - b`` keys (at least one): per-row lengths on the device, as a CUDA graph replays them."""
    q = case.heads(case.dims["hq"], tokens=1)
    k, v = (case.randn(case.batch, case.dims["hk"], case.tokens + 3, case.dims["d"]) for _ in range(2))
    lengths = (case.tokens - torch.arange(case.batch, device=case.device)).clamp_min(1).to(torch.int32)
    return Sample((q, k, v, lengths), {}, (), ("q", "k_cache", "v_cache", "cache_seqlens"))


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


def _varlen_attention(case):
    """A packed batch of ``tokens`` (:func:`varlen_lengths`; ``batch`` is unused: packed is one row):
    ``cu_seqlens`` int32 on the device, the longest length as an int (no host sync in the kernel)."""
    packed = SampleCase(case.dims, 1, case.tokens, case.dtype, case.device, case.generator)
    lengths = varlen_lengths(case.tokens)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=case.device)
    return _attention(packed, cu_seqlens_q=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))


# Share of the LM head's targets set to the ignore index (-100), at random positions: prompt tokens
# and sequence boundaries carry no loss in a real batch, and the kernels must skip them.
LOSS_IGNORED = 1 / 16


def _fused_linear_cross_entropy(case):
    """hidden ~ N(0, 1) as the final RMSNorm leaves it, weight ~ N(0, 1/H), so that the logits
    spread over about one unit (a softmax neither flat nor one-hot); targets uniform, a sixteenth
    (at least one) ignored; the mean loss."""
    n, h, v = case.batch * case.tokens, case.dims["hidden"], case.dims["vocab"]
    hidden, weight = case.randn(case.batch, case.tokens, h), case.randn(v, h, scale=h ** -0.5)
    target = torch.randint(0, v, (n,), generator=case.generator, device=case.device)
    ignored = torch.randperm(n, generator=case.generator, device=case.device)[: max(1, round(n * LOSS_IGNORED))]
    target[ignored] = -100
    return Sample((hidden, weight, target.view(case.batch, case.tokens)), {}, (0, 1), ("hidden", "weight", "target"))


def _quantized_linear(case, bits, group_size=None, bias=False, tokens=None):
    """An MLP up projection (hidden -> intermediate) with its weight ~ N(0, 1/hidden) quantised
    (``ops.quantized.quantize_weight``); ``bias`` ~ N(0, 1) as Qwen2's q/k/v have one."""
    from .quantized import quantize_weight

    h, n = case.dims["hidden"], case.dims["intermediate"]
    x = case.randn(case.batch, tokens or case.tokens, h)
    weight = quantize_weight(case.randn(n, h, scale=h ** -0.5), bits, group_size)
    args = (x, weight.qweight, weight.scales, weight.zeros, case.randn(n) if bias else None)
    grad = (0, 4) if bias else (0,)
    names = ("x", "qweight", "scales", "zeros", "bias")
    return Sample(args, {"bits": bits, "group_size": weight.group_size}, grad, names)


OPS = (
    Op("rms_norm", ".ops.rms_norm", "rms_norm", "rms_norm_", (
        OpSample("rms_norm", _rms_norm), OpSample("rms_norm+residual", _rms_norm_residual),
        OpSample("gemma_rms_norm", _gemma_rms_norm))),
    Op("swiglu", ".ops.glu", "swiglu", "glu_", (OpSample("swiglu", _gated_unit),)),
    Op("geglu", ".ops.glu", "swiglu", "glu_", (OpSample("geglu", _gated_unit),)),
    Op("apply_rotary", ".ops.rope", "rope", "rope_", (OpSample("apply_rotary", _apply_rotary),)),
    Op("flash_attention", ".ops.attention", "attention", "attention_", (
        OpSample("flash_attention", _attention), OpSample("window_softcap_attention", _window_softcap_attention),
        OpSample("decode", _decode, training=False, check=False),
        OpSample("varlen_attention", _varlen_attention, check=False)), sequence=True),
    Op("flash_decode", ".ops.attention", "attention", "attention_decode_",
       (OpSample("flash_decode", _flash_decode, training=False, check=False),), sequence=True),
    Op("fused_linear_cross_entropy", ".ops.cross_entropy", "cross_entropy", "cross_entropy_",
       (OpSample("fused_linear_cross_entropy", _fused_linear_cross_entropy),)),
    # Not patched by apply_kernels: llama_kernels.quantize_weights puts it into models.
    Op("quantized_linear", ".ops.quantized", None, "quantized_linear_", (
        OpSample("int8_linear", functools.partial(_quantized_linear, bits=8)),
        OpSample("int4_linear", functools.partial(_quantized_linear, bits=4, group_size=32, bias=True)),
        OpSample("int4_decode", functools.partial(_quantized_linear, bits=4, group_size=64, tokens=1),
                 training=False, check=False))),
)
SAMPLES = {sample.name: sample for op in OPS for sample in op.samples}
OP_OF_SAMPLE = {sample.name: op for op in OPS for sample in op.samples}
# apply_kernels' keywords, in its signature's order.
FLAGS = tuple(dict.fromkeys(op.flag for op in OPS if op.flag))
KERNEL_PREFIXES = tuple(dict.fromkeys(op.kernels for op in OPS))


def flag_of_kernel(kernel_name: str) -> str | None:
    """The ``apply_kernels`` flag whose op launches the Triton kernel ``kernel_name``, or None."""
    return next((op.flag for op in OPS if kernel_name.startswith(op.kernels)), None)
