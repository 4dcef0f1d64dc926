"""Memory of one training step at real model sizes, exact, without a GPU (``--only memory``).

The bytes a training step keeps alive are fixed by the shapes and by what each op saves for its
backward, not by the values, so they are counted on *fake tensors*: the model is built and run
inside ``torch._subclasses.fake_tensor.FakeTensorMode`` (tensors with shapes, dtypes and devices,
no storage, nothing computed) under ``torch.distributed._tools.mem_tracker.MemTracker``, which
sees every allocation and free through the dispatcher and keeps the peak, split by category:

    PARAM   parameters                        GRAD  gradients of the parameters
    BUFFER  module buffers (rotary tables)    OPT   optimizer states (+ what the step allocates)
    ACT     tensors made in the forward (what autograd saves, recomputed ones included)
    TEMP    tensors made in the backward (activation gradients, the loss's backward)
    OTH     the input ids and labels (registered by hand)

One step = forward + loss + ``loss.backward()`` + ``AdamW.step()`` + ``zero_grad(set_to_none=True)``
with the optimizer states already there (one step on zero gradients first, outside the count: the
steady state of training, not the first step, which has no states yet).  bf16 everywhere (weights,
activations, AdamW's states, which follow the parameters' dtype; LoRA adapters as PEFT makes them),
batch 1, one sequence of T tokens whose labels are its ids.  Each record has two peaks: the whole
step's (what a card must hold; in full fine-tuning often the AdamW step's, gradients and states
whole) and forward + backward's alone less the parameters and optimizer states (the activations,
gradients and temporaries: what the kernels change, "AdamW states reported apart").

Fake tensors stand for CPU tensors here (fake CUDA tensors need a CUDA build of torch: on a GPU
machine the fake device is ``cuda``).  SDPA on fake CPU tensors takes torch's CPU flash backend,
which saves what the CUDA flash backend saves (the output and a float32 logsumexp).  Our Triton
kernels take their fake implementations on fake tensors (``llama_kernels.ops.common.is_abstract``);
on the CPU they are chosen at all only under ``TRITON_INTERPRET=1`` (set by ``python -m benchmarks``
before triton loads): nothing is launched, nothing is interpreted.

Memory is a polynomial of degree <= 2 in T (eager attention's T x T scores; everything else is
linear, with steps where a chunk count changes), so the longest sequence that fits a card is found
by fitting the measured points, predicting the crossing, and verifying by measuring there and one
step (1024 tokens) above (:func:`longest_fitting`).  Every figure in the tables is measured; the
predictions are kept beside the verified lengths.

Quantised models (``hf+ours+int8``, ``hf+ours+int4``: ``llama_kernels.quantize.quantize_weights``
after ``apply_kernels``) keep their weights in buffers (``qweight``, ``scales``, ``zeros``), which
are counted as ``PARAM`` here: the model's weights, as the other providers' parameters are.  Their
weights are frozen, so full fine-tuning does not apply (``skipped``); LoRA trains adapters on the
quantised base (QLoRA's way).  The ``decode`` mode is inference, for every provider: a prefill of T
tokens without grad (a KV cache, the last position's logits only, as ``generate`` computes them)
and one decode step after it; its peak is the prefill's or the step's (weights, the KV cache of T
+ 1 positions, the prefill's activations), and its second peak (``fwd_bwd_*``) the prefill's alone.

Records are written as ``<out>/<cpu|gpu>-fake-memory[-smoke]-<date>.{json,md,png}``; a second run
into the same folder on the same day keeps the first run's records for the (model, mode,
provider) combinations it does not measure, so a sweep can be run in parts.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import shapes
from .common import Missing, Skipped, classify, say
from .report import json_safe, write_text

CATEGORIES = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")
CATEGORY_NOTES = {
    "PARAM": "parameters", "BUFFER": "module buffers", "GRAD": "parameter gradients",
    "ACT": "forward activations (saved for backward, recomputed ones included)",
    "TEMP": "backward temporaries (activation gradients, the loss's backward)",
    "OPT": "optimizer states and the step's temporaries", "OTH": "input ids and labels",
}
GB = 1e9  # the card limits are decimal gigabytes of tensors
GIB = 2 ** 30
LIMITS_GB = (24, 80, 141)
SWEEP = (2048, 4096, 8192, 16384)  # then doubling while the largest limit still fits, up to MAX_TOKENS
MAX_TOKENS = 1 << 20
STEP = 1024
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 16
CHUNK_TOKENS = 4096  # long_context.chunked_mlp's chunk


@dataclass(frozen=True)
class ModelSpec:
    label: str
    family: str  # llama | qwen3 | gemma2 (transformers' model type)
    config: dict  # transformers config fields (the reference LlamaConfig takes the same names)
    ref: bool  # the package's reference model can build it (LLaMA shapes only)
    source: str = ""


# The real models at their full depth (their configs: benchmarks/shapes.py, the op registry's;
# the layer counts are the models' config.json's).  LLaMA-3-8B as Meta-Llama-3-8B's config.json
# has it: 8192 positions (the shared config takes 3.1's 131072), untied LM head.
MODELS = {
    "llama3-8b": ModelSpec("LLaMA-3-8B", "llama", dict(
        shapes.LLAMA3_8B, max_position_embeddings=8192, tie_word_embeddings=False, num_hidden_layers=32), ref=True,
        source="meta-llama/Meta-Llama-3-8B config.json"),
    "llama3.2-1b": ModelSpec("LLaMA-3.2-1B", "llama", dict(shapes.LLAMA32_1B, num_hidden_layers=16), ref=True,
                             source="meta-llama/Llama-3.2-1B config.json"),
    "qwen3-8b": ModelSpec("Qwen3-8B", "qwen3", dict(shapes.QWEN3_8B, num_hidden_layers=36), ref=False,
                          source="Qwen/Qwen3-8B config.json (q/k RMSNorm per head)"),
    "gemma2-9b": ModelSpec("Gemma-2-9B", "gemma2", dict(shapes.GEMMA2_9B, num_hidden_layers=42), ref=False,
                           source="google/gemma-2-9b config.json (sliding window 4096 on alternate layers, "
                                  "softcaps 50/30)"),
}
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
SMOKE_MODELS = {
    "smoke-llama": ModelSpec("tiny LLaMA", "llama", dict(_TINY, num_hidden_layers=1, rope_theta=500000.0), ref=True),
    "smoke-qwen3": ModelSpec("tiny Qwen3", "qwen3", dict(_TINY, rms_norm_eps=1e-6), ref=False),
    "smoke-gemma2": ModelSpec("tiny Gemma-2", "gemma2", dict(
        _TINY, sliding_window=128, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True), ref=False),
}
ALL_MODELS = {**MODELS, **SMOKE_MODELS}

MODES = {
    "full": "full fine-tuning: every parameter trained, AdamW",
    "full+ckpt": "full fine-tuning with gradient checkpointing of every decoder layer",
    "lora": f"LoRA r={LORA_RANK} on {', '.join(LORA_TARGETS)}, base frozen, AdamW on the adapters",
    "lora+ckpt": "LoRA with gradient checkpointing",
    "decode": "inference: prefill of T tokens (no grad, KV cache, the last position's logits only, as generate "
              "does), then one decode step; no optimizer (its fwd+bwd figures are the prefill's peak alone)",
}
TRAINING_MODES = ("full", "full+ckpt", "lora", "lora+ckpt")
QUANTIZED = {"hf+ours+int8": 8, "hf+ours+int4": 4}  # provider -> quantize_weights' bits
INT4_GROUP = 128  # int4's group (quantize_weights' default), or the largest of 64, 32 that tiles a smaller model
PROVIDERS = {
    "hf-eager": "transformers, attn_implementation='eager' (T x T scores materialised)",
    "hf-sdpa": "transformers, attn_implementation='sdpa' (the baseline of the ratios)",
    "hf+ours": "the sdpa model after llama_kernels.apply_kernels(model): our RMSNorm, SwiGLU/GeGLU, RoPE, "
               "attention and, in training, the fused linear cross-entropy (no logits)",
    "hf+ours+long": f"hf+ours plus llama_kernels.long_context.chunked_mlp(model, chunk_tokens={CHUNK_TOKENS}) "
                    "and, with checkpointing, checkpoint_layers(model, offload=True, offload_device='meta') "
                    "instead of transformers' checkpointing ('meta' stands in for host memory under fake "
                    "tensors; 'cpu' on a real GPU)",
    "ref-eager": "llama_kernels.model.Llama (the package's eager reference; LLaMA shapes only; loss = "
                 "model.loss(input_ids), logits materialised)",
    "ref+ours": "the reference model after apply_kernels (fused LM head + loss)",
    "hf+ours+int8": "hf+ours, then llama_kernels.quantize.quantize_weights(model, bits=8): every attention and MLP "
                    "projection int8 (one scale per output row; frozen buffers, counted as PARAM), embedding and "
                    "LM head bf16; full fine-tuning skipped (frozen weights), LoRA on the quantised base",
    "hf+ours+int4": "hf+ours, then quantize_weights(model, bits=4, group_size=128): projections int4 in groups of "
                    "128 (a bf16 scale and a uint8 zero point each), as hf+ours+int8 otherwise",
}
DEFAULT_SMOKE_MODELS = ("smoke-llama",)
SMOKE_MODES = ("full", "lora+ckpt")  # the smoke run's default: both kinds of training, checkpointing
DEFAULT_MODELS = ("llama3-8b", "llama3.2-1b", "qwen3-8b", "gemma2-9b")


@dataclass
class Settings:
    smoke: bool
    models: tuple
    modes: tuple
    providers: tuple
    sweep: tuple
    limits_gb: tuple
    step: int
    max_tokens: int
    search: bool
    fake_device: str  # "cpu", or "cuda" on a CUDA build with a GPU
    real_cuda: bool  # measure beside it with torch.cuda.max_memory_allocated
    real_max_tokens: int = 4096


def settings_for(args, on_gpu: bool) -> Settings:
    smoke = bool(getattr(args, "smoke", False))
    models = args.memory_models or (DEFAULT_SMOKE_MODELS if smoke else ("llama3-8b",))
    if smoke:  # tiny: sequences of 128 ..., one limit of 2 MB, steps of 64 tokens; two modes
        sweep, limits, step, cap, modes = (128, 256), (0.002,), 64, 4096, SMOKE_MODES
    else:
        sweep, limits, step, cap, modes = SWEEP, LIMITS_GB, STEP, MAX_TOKENS, tuple(MODES)
    return Settings(
        smoke=smoke, models=tuple(models), modes=tuple(args.memory_modes or modes),
        providers=tuple(args.memory_providers or PROVIDERS), sweep=tuple(args.memory_tokens or sweep),
        limits_gb=tuple(limits), step=step, max_tokens=args.memory_max_tokens[0] if args.memory_max_tokens else cap,
        search=not args.memory_no_search,
        fake_device="cuda" if on_gpu else "cpu", real_cuda=on_gpu,
        real_max_tokens=512 if smoke else 4096,
    )


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass
class MemRecord:
    """The peak of one training step: one model, mode, provider and sequence length."""

    model: str
    mode: str
    provider: str
    tokens: int
    status: str = "ok"  # ok | failed | missing | skipped
    reason: str | None = None
    source: str = "sweep"  # sweep (the fixed lengths) | search (measured by the longest-fit search)
    peak_bytes: int | None = None  # MemTracker's peak total on the fake device
    categories: dict = field(default_factory=dict)  # MemTracker's split of that peak, bytes
    peak_minus_params_bytes: int | None = None
    ratio_to_hf_sdpa: float | None = None  # (peak - params) / hf-sdpa's, same model, mode, tokens
    opt_state_bytes: int | None = None  # AdamW's exp_avg + exp_avg_sq, as allocated
    # The peak of forward + loss + backward alone (before the AdamW step), its split, and that
    # peak less the parameters and the optimizer's states (OPT): what the activations, gradients
    # and temporaries add, the part the kernels change.
    fwd_bwd_peak_bytes: int | None = None
    fwd_bwd_categories: dict = field(default_factory=dict)
    fwd_bwd_minus_params_states_bytes: int | None = None
    fwd_bwd_ratio_to_hf_sdpa: float | None = None
    trainable_params: int | None = None
    offloaded_peak_bytes: int | None = None  # peak on 'meta' (host memory stand-in), hf+ours+long
    cuda_max_allocated_bytes: int | None = None  # the same step for real on a GPU
    cuda_note: str | None = None  # "no GPU", or why the real step was not run
    seconds: float | None = None
    note: str | None = None


# ---------------------------------------------------------------------------------------------
# Building one provider's model
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype):
    # Built in bf16 directly: `.to(bfloat16)` and meta + `to_empty` cannot swap parameters of fake
    # modules ("Couldn't swap Embedding.weight").
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _hf_model(spec: ModelSpec, attn: str):
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[spec.family]
    cfg = cfg_cls(**spec.config, attn_implementation=attn)
    cfg.use_cache = False
    return model_cls(cfg)


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from llama_kernels.ops import common as ops_common

    return bool(getattr(ops_common, "INTERPRET", True))


def build(spec: ModelSpec, mode: str, provider: str, device: str, offload_device: str):
    """``(model, loss_fn, notes)`` for one provider and mode, built on ``device`` (inside the
    caller's fake mode, or for real); ``loss_fn(model, ids)`` returns the scalar loss."""
    lora, ckpt = mode.startswith("lora"), mode.endswith("+ckpt")
    ours = "ours" in provider
    notes = []
    if provider.startswith("ref") and not spec.ref:
        raise Skipped(f"the reference model builds LLaMA shapes only, not {spec.family}")
    if ours and device == "cpu" and not _interpreting():
        raise Skipped("TRITON_INTERPRET was not 1 when triton was imported: on CPU tensors (fake or not) our "
                      "kernels would fall back to eager, so the figure would be eager's")
    if provider in QUANTIZED and mode.startswith("full"):
        raise Skipped("quantised weights are frozen: full fine-tuning does not apply (the lora modes train "
                      "adapters on the quantised base)")
    if mode == "decode" and provider == "hf+ours+long":
        raise Skipped("the long-context options act in training only: at inference this is hf+ours")
    long_context = None
    if provider == "hf+ours+long":
        try:
            from llama_kernels import long_context
        except ImportError as exc:
            raise Missing(f"llama_kernels.long_context is not importable ({exc})") from exc
    with torch.device(device), _default_dtype(torch.bfloat16):
        if provider.startswith("ref"):
            from llama_kernels.model import Llama, LlamaConfig

            model = Llama(LlamaConfig(**spec.config))

            def loss_fn(m, ids):
                return m.loss(ids)
        else:
            # transformers refuses SDPA for soft-capped attention (Gemma 2): its model runs eager.
            softcapped = spec.config.get("attn_logit_softcapping") is not None
            if provider == "hf-sdpa" and softcapped:
                raise Skipped("transformers refuses SDPA for soft-capped attention: this model runs eager "
                              "attention (hf-eager), and hf+ours patches that")
            if ours and softcapped:
                notes.append("patched model built with attn_implementation='eager' (transformers refuses SDPA "
                             "with a softcap)")
            model = _hf_model(spec, "eager" if provider == "hf-eager" or softcapped else "sdpa")

            def loss_fn(m, ids):
                return m(input_ids=ids, labels=ids).loss
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if ours:
                import llama_kernels
                from llama_kernels.patch import kernel_summary

                llama_kernels.apply_kernels(model)
            if provider in QUANTIZED:  # after apply_kernels (either order gives the same model)
                from llama_kernels.quantize import quantize_weights

                bits = QUANTIZED[provider]
                group = _int4_group(spec.config) if bits == 4 else None
                quantize_weights(model, bits=bits, group_size=group)
                if group not in (None, INT4_GROUP):
                    notes.append(f"int4 in groups of {group} (this model's widths are not multiples of {INT4_GROUP})")
            if long_context is not None:
                long_context.chunked_mlp(model, chunk_tokens=CHUNK_TOKENS)
            if ckpt:
                if provider.startswith("ref"):  # the reference model's own hook, non-reentrant
                    model.layer_checkpoint = functools.partial(torch.utils.checkpoint.checkpoint,
                                                               use_reentrant=False)
                elif long_context is not None:
                    long_context.checkpoint_layers(model, offload=True, offload_device=offload_device)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    if lora:
                        model.enable_input_require_grads()  # as PEFT's prepare_model_for_kbit_training
            if lora:
                model = _with_lora(model)
        for w in caught:
            text = str(w.message).strip().splitlines()[0][:200] if str(w.message).strip() else ""
            if "kernel" in text.lower() or "eager" in text.lower():
                notes.append(text)
        if ours:
            summary = kernel_summary(model)
            notes.append("kernels: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return model, loss_fn, notes


def _int4_group(config: dict) -> int:
    """:data:`INT4_GROUP`, or the largest group of 64 and 32 dividing every projection's input width
    (the hidden size, the query heads' width, the MLP's): the tiny smoke models' 64."""
    widths = (config["hidden_size"], config["intermediate_size"],
              config["num_attention_heads"] * shapes.head_dim(config))
    return next((g for g in (INT4_GROUP, 64, 32) if all(w % g == 0 for w in widths)), 32)


def _with_lora(model):
    """``peft.get_peft_model`` with the LoRA of :data:`MODES`, on real or fake modules.

    PEFT moves each new adapter (and each wrapped layer) to its base layer's device and dtype with
    ``Module.to``, which on fake parameters swaps tensors that the fake mode holds weak references
    to and fails ("Couldn't swap Linear.weight") even when nothing would change: while PEFT builds
    the model, a ``Module.to`` that changes nothing returns the module untouched, as it would
    leave it anyway.
    """
    import peft

    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if memory_format is None and all(
                (device is None or t.device == device)
                and (dtype is None or not (t.is_floating_point() or t.is_complex()) or t.dtype == dtype)
                for t in tensors):
            return self
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        return peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, target_modules=list(LORA_TARGETS)))
    finally:
        torch.nn.Module.to = original


def _optimizer(model):
    """AdamW on the trainable parameters, its states made by one step on zero gradients.

    ``foreach=False``: the per-parameter loop (the default on the CPU; CUDA's default foreach
    kernels add temporaries the size of the whole parameter group to the step's peak)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    states = sum(v.numel() * v.element_size() for s in opt.state.values()
                 for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return opt, states, sum(p.numel() for p in params)


def _train_step(model, loss_fn, opt, ids, after_backward=None) -> None:
    loss = loss_fn(model, ids)
    loss.backward()
    if after_backward is not None:
        after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def kernel_workspace(func, args) -> list:
    """Bytes of the working buffers that one of our kernels' launchers allocates beside what it
    returns, for the ops that have any (``llama_kernels::<name>`` custom ops, positional args).

    Fake implementations allocate the outputs only, so MemTracker would miss these transient
    buffers (read from the launchers, llama_kernels/ops/attention/backward.py and cross_entropy.py):

    * ``flash_attention_bwd``: ``delta (B, H, Tq)`` float32 and, in the fused (atomic dQ) schedule
      of half-precision inputs, ``dq_acc (B, H, Tq, BLOCK_D)`` float32. (Not modelled: the float32
      dK/dV partials of ``head_splits > 1``, which depends on the GPU's SM count and happens only
      for grids too small to fill it, i.e. short sequences.)
    * ``linear_cross_entropy_fwd``: ``stats (4, N)`` float32 and one chunk of logits
      ``z (N, Vc)`` float32.
    * ``linear_cross_entropy_bwd``: per chunk ``z`` (float32) and ``dz (N, Vc)`` (the inputs' dtype),
      the previous chunk's ``dz`` until the next is made, and for ``dhidden`` its float32 sum and
      one float32 partial ``(N, H)``: the largest of those moments.
    """
    schema = getattr(func, "_schema", None)
    name = getattr(schema, "name", "")
    if not name.startswith("llama_kernels::"):
        return []
    op = name.split("::", 1)[1]
    if op == "flash_attention_bwd":
        q = args[1]
        b, h, t, d = q.shape
        sizes = [4 * b * h * t]
        if q.dtype != torch.float32 and not torch.are_deterministic_algorithms_enabled():
            block_d = max(16, 1 << (d - 1).bit_length())
            sizes.append(4 * b * h * t * block_d)
        return sizes
    if op in ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd"):
        from llama_kernels.ops.cross_entropy import chunk_columns

        hidden, weight = (args[0], args[1]) if op.endswith("fwd") else (args[1], args[2])
        n, hdim, vocab = hidden.shape[0], hidden.shape[-1], weight.shape[0]
        if n == 0:
            return []
        vc = chunk_columns(n, vocab)
        chunks = -(-vocab // vc)
        z, dz = 4 * n * vc, hidden.element_size() * n * vc
        if op.endswith("fwd"):
            return [16 * n, z]
        need_hidden = bool(args[8])
        nh = 4 * n * hdim if need_hidden else 0
        if chunks == 1:
            return [max(z + dz, dz + nh)]
        return [max(nh + z + 2 * dz, 2 * nh + dz)]
    return []


def _peak_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    from torch.distributed._tools.mem_tracker import _MemRefType

    class PeakTracker(MemTracker):
        """MemTracker keeping the global peak only: its per-module peaks loop over every module at
        every op (most of the time at 32 layers: 27 s against 4 s a step); the global peak and its
        split are computed exactly as MemTracker's own code does.  Frozen parameters (LoRA's base)
        get no gradient hook: MemTracker would register one and fail ("cannot register a hook on a
        tensor that doesn't require gradient"); they never have a gradient to count."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Our kernels' fakes allocate what the launchers return; the launchers' working
            # buffers (kernel_workspace) are allocated here, around the op, and freed after it.
            sizes = kernel_workspace(func, args)
            if not sizes:
                return super().__torch_dispatch__(func, types, args, kwargs)
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            reftype = (_MemRefType.OPT if self._in_opt else _MemRefType.TEMP
                       if self._mod_tracker.is_bw and not self._in_ac else _MemRefType.ACT)
            workspace = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes if n > 0]
            for t in workspace:
                self._track(reftype, t)
            self.workspace_bytes = max(getattr(self, "workspace_bytes", 0), sum(sizes))
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                del workspace

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # A quantised layer's weights are buffers; they are the model's weights: PARAM.
            weights = _quantized_weight_ids(module)

            def grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = buffer_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if (install_grad_hooks and param.requires_grad
                        and self._param_to_grad_hook_handles.get(param, None) is None):
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            for buffer in module.buffers():
                if id(buffer) in weights:
                    winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.PARAM)
                    param_memory += sum(w.mem_consumed for w in winfos)
                else:
                    winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                    buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker()


def _quantized_weight_ids(module) -> set:
    """``id`` of every quantised weight buffer (``qweight``, ``scales``, ``zeros``) under ``module``."""
    from llama_kernels.quantize import QuantizedLinear

    return {id(t) for m in module.modules() if isinstance(m, QuantizedLinear)
            for t in (m.qweight, m.scales, m.zeros) if t is not None}


def _decode_step(model, ids, after_prefill=None) -> None:
    """Inference as ``generate`` runs it, one new token: a prefill of ``ids`` into a KV cache without
    grad, the last position's logits only, then one decode step; ``after_prefill()`` between."""
    with torch.no_grad():
        if hasattr(model, "new_cache"):  # the reference model: its own preallocated cache
            t = ids.shape[1]
            cache = model.new_cache(ids.shape[0], t + 1)
            logits = model(ids, cache, 0)[:, -1]
            if after_prefill is not None:
                after_prefill()
            model(logits.argmax(-1, keepdim=True), cache, t)
            return
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        if after_prefill is not None:
            after_prefill()
        # transformers 5.x renamed the cache `past_key_values` -> `cache` (argument and output).
        key = "cache" if "cache" in out else "past_key_values"
        model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), use_cache=True, logits_to_keep=1,
              **{key: out[key]})


@contextlib.contextmanager
def _one_sequence_masks():
    """transformers' mask code as it runs on the real inputs: one unpadded sequence, positions
    0 .. T-1.

    ``masking_utils.find_packed_sequence_indices`` reads the position ids to tell packed sequences
    from one; on fake tensors it cannot (it treats them as traced), keeps a "packed" mask and so
    builds a (1, 1, T, T) attention mask that the real step never makes (SDPA gets ``is_causal``):
    here it returns None, its answer on these inputs, for fake position ids.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    from torch._subclasses.fake_tensor import FakeTensor

    def find(position_ids):
        return None if isinstance(position_ids, FakeTensor) else original(position_ids)

    masking_utils.find_packed_sequence_indices = find
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def measure_fake(spec: ModelSpec, mode: str, provider: str, tokens: int, device: str = "cpu") -> dict:
    """One training step (``decode``: prefill and one decode step) on fake tensors: MemTracker's
    peak split (bytes per category) on ``device``, the peak on 'meta' (offloaded), the AdamW state
    bytes and notes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), _one_sequence_masks():
        model, loss_fn, notes = build(spec, mode, provider, device, offload_device="meta")
        inference = mode == "decode"
        opt, states, trainable = (None, 0, 0) if inference else _optimizer(model)
        ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        tracker = _peak_tracker()
        tracker.track_external(model, *([] if inference else [opt]), ids)
        snapshots = []

        def snapshot():
            snapshots.append(tracker.get_tracker_snapshot("peak"))
            if inference:  # the decode step calls the model again: MemTracker's per-module stats allow one call
                tracker.reset_mod_stats()

        with tracker:
            if inference:
                model.eval()
                _decode_step(model, ids, after_prefill=snapshot)
            else:
                _train_step(model, loss_fn, opt, ids, after_backward=snapshot)
        peak = tracker.get_tracker_snapshot("peak")
    total, cats, meta = _split(peak, device)
    fwd_bwd_total, fwd_bwd_cats, _ = _split(snapshots[0], device)
    workspace = getattr(tracker, "workspace_bytes", 0)
    if workspace:
        notes.append(f"kernel workspace modelled: up to {workspace / GIB:.2f} GiB in one op")
    return {"total": total, "categories": cats, "offloaded": meta, "opt_states": states,
            "fwd_bwd_total": fwd_bwd_total, "fwd_bwd_categories": fwd_bwd_cats,
            "trainable": trainable, "notes": notes, "workspace": workspace}


def _split(peak: dict, device: str) -> tuple:
    """``(total, {category: bytes}, total on 'meta')`` of a MemTracker peak snapshot on ``device``."""
    by_dev = {str(d): {(k.name if hasattr(k, "name") else str(k)): int(v) for k, v in snap.items()}
              for d, snap in peak.items()}
    main = next((v for d, v in by_dev.items() if d.split(":")[0] == device), None)
    if main is None:
        raise RuntimeError(f"MemTracker saw nothing on {device}: {sorted(by_dev)}")
    cats = {c: main.get(c, 0) for c in CATEGORIES}
    if sum(cats.values()) != main["Total"]:
        raise RuntimeError(f"MemTracker's categories {cats} do not sum to its total {main['Total']}")
    return main["Total"], cats, by_dev.get("meta", {}).get("Total")


def measure_cuda(spec: ModelSpec, mode: str, provider: str, tokens: int) -> int:
    """The same step for real on the GPU: ``torch.cuda.max_memory_allocated`` over the step,
    the weights, optimizer states and inputs included (the offload goes to host memory)."""
    torch.cuda.empty_cache()
    model, loss_fn, _ = build(spec, mode, provider, "cuda", offload_device="cpu")
    opt = None if mode == "decode" else _optimizer(model)[0]
    ids = torch.randint(0, spec.config["vocab_size"], (1, tokens), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if opt is None:
        model.eval()
        _decode_step(model, ids)
    else:
        _train_step(model, loss_fn, opt, ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, ids
    torch.cuda.empty_cache()
    return peak


# ---------------------------------------------------------------------------------------------
# The longest sequence that fits
# ---------------------------------------------------------------------------------------------
def _fit_crossing(points: list, limit: float, lo: int, hi: int) -> float:
    """Where the polynomial through the (up to 3) measured points nearest to the crossing reaches
    ``limit``: degree 2 with three points, 1 with two. A root outside ``(lo, hi)`` gives the midpoint."""
    pts = sorted(points)
    i = next((k for k, (t, _) in enumerate(pts) if t >= hi), len(pts) - 1)
    near = pts[max(0, i - 2): i + 1] if i >= 2 else pts[: 3]
    xs = [float(t) for t, _ in near]
    ys = [float(b) for _, b in near]
    roots = []
    if len(near) >= 3:
        (x0, x1, x2), (y0, y1, y2) = xs, ys
        # Newton's divided differences: y = y0 + a (x - x0) + c (x - x0)(x - x1)
        a = (y1 - y0) / (x1 - x0)
        c = ((y2 - y1) / (x2 - x1) - a) / (x2 - x0)
        # c x^2 + (a - c (x0 + x1)) x + (y0 - a x0 + c x0 x1 - limit) = 0
        qa, qb, qc = c, a - c * (x0 + x1), y0 - a * x0 + c * x0 * x1 - limit
        if abs(qa) > 1e-30:
            disc = qb * qb - 4 * qa * qc
            if disc >= 0:
                roots = [(-qb + s * math.sqrt(disc)) / (2 * qa) for s in (1, -1)]
        elif qb:
            roots = [-qc / qb]
    elif len(near) == 2 and xs[1] != xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        if slope:
            roots = [xs[0] + (limit - ys[0]) / slope]
    inside = [r for r in roots if lo < r < hi]
    return max(inside) if inside else (lo + hi) / 2


def longest_fitting(measure, limit: float, known: dict, step: int, cap: int, max_rounds: int = 8) -> dict:
    """The longest multiple of ``step`` tokens whose step peak ``measure(tokens)`` is <= ``limit``.

    ``known`` maps tokens to measured bytes (the sweep; extended in place by what this measures;
    ``measure`` may raise, which the caller reports).  Memory grows with tokens, so the answer lies
    between the longest measured length that fits (``lo``) and the shortest that does not (``hi``):
    the crossing predicted by :func:`_fit_crossing` is rounded down to a multiple of ``step`` and
    verified by measuring there and one step above; a wrong prediction narrows ``(lo, hi)`` and is
    made again from the nearer points.  Returns ``{"tokens", "status", "predicted", "measured"}``:
    status ``verified`` (measured to fit, and one step more measured not to), ``none`` (not even
    ``step`` tokens fit), ``beyond-cap`` (``cap`` tokens still fit: at least that many) or
    ``bracketed`` (rounds ran out: ``tokens`` measured to fit, the next step not measured).
    """
    measured = []

    def get(t):
        if t not in known:
            known[t] = measure(t)
            measured.append(t)
        return known[t]

    fits = [t for t, b in known.items() if b <= limit]
    lo = max(fits, default=0)
    over = [t for t, b in known.items() if b > limit and t > lo]
    if not over:
        if lo >= cap:
            return {"tokens": lo, "status": "beyond-cap", "predicted": None, "measured": measured}
        get(cap)
        if known[cap] <= limit:
            return {"tokens": cap, "status": "beyond-cap", "predicted": None, "measured": measured}
        over = [cap]
    hi = min(over)
    predicted = None
    for _ in range(max_rounds):
        if hi - lo <= step:
            break
        points = [(t, b) for t, b in known.items()]
        guess = _fit_crossing(points, limit, lo, hi)
        # lo and hi are multiples of step (the sweep's lengths are), hi - lo >= 2 steps here.
        cand = min(max(int(guess // step) * step, lo + step), hi - step)
        if predicted is None:
            predicted = cand
        if get(cand) <= limit:
            lo = cand
            if cand + step < hi and get(cand + step) > limit:
                hi = cand + step
            elif cand + step < hi:
                lo = cand + step
        else:
            hi = cand
    if hi - lo > step:
        return {"tokens": lo, "status": "bracketed", "predicted": predicted, "measured": measured}
    if lo == 0:
        return {"tokens": 0, "status": "none", "predicted": predicted, "measured": measured}
    return {"tokens": lo, "status": "verified", "predicted": predicted if predicted is not None else lo,
            "measured": measured}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _measure_record(s: Settings, name: str, mode: str, provider: str, tokens: int, source: str) -> MemRecord:
    spec = ALL_MODELS[name]
    rec = MemRecord(name, mode, provider, tokens, source=source)
    start = time.perf_counter()
    try:
        m = measure_fake(spec, mode, provider, tokens, s.fake_device)
    except Exception as exc:  # reported, never fatal: the run goes on with the next provider
        rec.status, rec.reason = classify(exc)
    else:
        rec.peak_bytes = m["total"]
        rec.categories = m["categories"]
        rec.peak_minus_params_bytes = m["total"] - m["categories"]["PARAM"]
        rec.opt_state_bytes = m["opt_states"]
        rec.fwd_bwd_peak_bytes = m["fwd_bwd_total"]
        rec.fwd_bwd_categories = m["fwd_bwd_categories"]
        rec.fwd_bwd_minus_params_states_bytes = (
            m["fwd_bwd_total"] - m["fwd_bwd_categories"]["PARAM"] - m["fwd_bwd_categories"]["OPT"])
        rec.trainable_params = m["trainable"]
        rec.offloaded_peak_bytes = m["offloaded"]
        rec.note = "; ".join(dict.fromkeys(m["notes"])) or None
    rec.seconds = time.perf_counter() - start
    if not s.real_cuda:
        rec.cuda_note = "no GPU"
    elif rec.status != "ok":
        rec.cuda_note = "not run: the fake-tensor step failed"
    elif tokens > s.real_max_tokens or source != "sweep":
        rec.cuda_note = f"not run: only sweep lengths <= {s.real_max_tokens} tokens are run for real"
    elif rec.peak_bytes > 0.85 * torch.cuda.get_device_properties(0).total_memory:
        rec.cuda_note = "not run: the fake-tensor peak exceeds 85% of this GPU"
    else:
        try:
            rec.cuda_max_allocated_bytes = measure_cuda(spec, mode, provider, tokens)
        except Exception as exc:
            rec.cuda_note = "failed: " + classify(exc)[1]
            torch.cuda.empty_cache()
    return rec


def run_combo(s: Settings, name: str, mode: str, provider: str, records: list, fits: list) -> None:
    """The sweep of one (model, mode, provider), then the longest length per card limit."""
    known: dict = {}
    limit_top = max(s.limits_gb) * GB
    lengths = list(s.sweep)
    i = 0
    while i < len(lengths):
        t = lengths[i]
        rec = _measure_record(s, name, mode, provider, t, "sweep")
        records.append(rec)
        say(describe(rec))
        if rec.status != "ok":
            for limit in s.limits_gb:
                fits.append({"model": name, "mode": mode, "provider": provider, "limit_gb": limit,
                             "tokens": None, "status": rec.status, "reason": rec.reason})
            return
        known[t] = rec.peak_bytes
        if i == len(lengths) - 1 and rec.peak_bytes <= limit_top and t * 2 <= s.max_tokens:
            lengths.append(t * 2)
        i += 1
    if not s.search:
        return

    def measure(t):
        r = _measure_record(s, name, mode, provider, t, "search")
        records.append(r)
        say(describe(r))
        if r.status != "ok":
            raise RuntimeError(f"at {t} tokens: {r.status}: {r.reason}")
        return r.peak_bytes

    known = {t: b for t, b in known.items() if t % s.step == 0}  # the answer is a multiple of step
    for limit in s.limits_gb:
        entry = {"model": name, "mode": mode, "provider": provider, "limit_gb": limit}
        try:
            entry.update(longest_fitting(measure, limit * GB, known, s.step, s.max_tokens))
        except Exception as exc:
            entry.update(tokens=None, status="failed", reason=str(exc)[:300])
        if entry.get("status") == "beyond-cap":
            entry["extrapolated"] = extrapolate(known, limit * GB, s.step)
        t = entry.get("tokens")
        if t and t in known:
            entry["bytes_at"] = known[t]
        if t is not None and t + s.step in known:
            entry["bytes_one_step_above"] = known[t + s.step]
        fits.append(entry)
        say(f"memory {name} [{mode}] {provider}: longest in {limit} GB: {_fit_text(entry)}")


def extrapolate(known: dict, limit: float, step: int) -> int | None:
    """Where the line through the two longest measured lengths reaches ``limit`` (a multiple of
    ``step``): the length a card would hold past the cap if memory stays linear there.  Labelled
    as extrapolated, never as measured."""
    pts = sorted(known.items())[-2:]
    if len(pts) < 2 or pts[1][1] <= pts[0][1]:
        return None
    (t0, b0), (t1, b1) = pts
    return int((t1 + (limit - b1) * (t1 - t0) / (b1 - b0)) // step * step)


def add_ratios(records: list) -> None:
    base = {(r.model, r.mode, r.tokens): r for r in records if r.provider == "hf-sdpa" and r.status == "ok"}
    for r in records:
        b = base.get((r.model, r.mode, r.tokens))
        if r.status != "ok" or b is None:
            continue
        if b.peak_minus_params_bytes:
            r.ratio_to_hf_sdpa = r.peak_minus_params_bytes / b.peak_minus_params_bytes
        if b.fwd_bwd_minus_params_states_bytes and r.fwd_bwd_minus_params_states_bytes is not None:
            r.fwd_bwd_ratio_to_hf_sdpa = r.fwd_bwd_minus_params_states_bytes / b.fwd_bwd_minus_params_states_bytes


def describe(r: MemRecord) -> str:
    head = f"memory {r.model} [{r.mode}] {r.provider} T={r.tokens}"
    if r.status != "ok":
        return f"{head}: {r.status.upper()} ({r.reason})"
    cats = ", ".join(f"{c} {r.categories[c] / GIB:.2f}" for c in CATEGORIES if r.categories.get(c))
    return (f"{head}: peak {r.peak_bytes / GIB:.2f} GiB ({cats}), minus params "
            f"{r.peak_minus_params_bytes / GIB:.2f} GiB [{r.seconds:.1f} s]")


def _fit_text(e: dict) -> str:
    status, t = e.get("status"), e.get("tokens")
    if t is None:
        return f"{status}" if status in ("skipped", "missing") else f"{status} ({e.get('reason')})"
    if status == "verified":
        pred = e.get("predicted")
        extra = "" if pred in (None, t) else f"; predicted {pred:,}"
        return f"{t:,} (verified{extra})"
    if status == "beyond-cap":
        ext = e.get("extrapolated")
        return f">= {t:,} (cap)" + (f"; ~{ext:,} extrapolated" if ext and ext > t else "")
    if status == "none":
        return "none"
    return f"{t:,} ({status})"


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def stem_for(s: Settings, date: str) -> str:
    if s.fake_device == "cpu":
        slug = "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"{slug}-fake-memory{'-smoke' if s.smoke else ''}-{date}"


def _environment(s: Settings) -> dict:
    import importlib.metadata as md
    import platform

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    dev = {"type": s.fake_device, "fake": True}
    if s.real_cuda:
        dev["gpu"] = torch.cuda.get_device_name(0)
    return {"device": dev, "python": platform.python_version(),
            "versions": {d: version(d) for d in ("torch", "triton", "transformers", "peft", "llama-kernels")},
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def _gib(b) -> str:
    return "" if b is None else f"{b / GIB:.2f}"


def _step_cell(r: MemRecord) -> str:
    ratio = f", {r.ratio_to_hf_sdpa:.2f}x" if r.ratio_to_hf_sdpa is not None else ""
    return f"{r.peak_bytes / GIB:.2f} ({r.peak_minus_params_bytes / GIB:.2f}{ratio})"


def _decode_cell(r: MemRecord) -> str:
    ratio = f", {r.ratio_to_hf_sdpa:.2f}x" if r.ratio_to_hf_sdpa is not None else ""
    return (f"{r.peak_bytes / GIB:.2f} (weights {r.categories.get('PARAM', 0) / GIB:.2f}; rest "
            f"{r.peak_minus_params_bytes / GIB:.2f}{ratio})")


def _fwd_bwd_cell(r: MemRecord) -> str:
    if r.fwd_bwd_minus_params_states_bytes is None:
        return ""
    ratio = f" ({r.fwd_bwd_ratio_to_hf_sdpa:.2f}x)" if r.fwd_bwd_ratio_to_hf_sdpa is not None else ""
    return f"{r.fwd_bwd_minus_params_states_bytes / GIB:.2f}{ratio}"


def _mode_table(title: str, records: list, cell) -> list:
    """Markdown lines: one row per sweep length, one column per provider, ``cell(record)`` each."""
    providers = list(dict.fromkeys(r.provider for r in records))
    header = ["tokens", *providers]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    footnotes: dict = {}
    for t in sorted(dict.fromkeys(r.tokens for r in records)):
        cells = [f"{t:,}"]
        for p in providers:
            r = next((x for x in records if x.provider == p and x.tokens == t), None)
            if r is None:
                cells.append("")
            elif r.status != "ok":
                n = footnotes.setdefault((r.status, r.reason), len(footnotes) + 1)
                cells.append(f"{r.status} [{n}]")
            else:
                cells.append(cell(r))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + [f"[{n}] {st}: {why}  " for (st, why), n in footnotes.items()]


def write_markdown(report: dict, records: list, fits: list, path: Path) -> None:
    what = "Training-step" if all(r.mode in TRAINING_MODES for r in records) else "Training-step and inference"
    lines = [f"# {what} memory at real model sizes (fake tensors, {report['fake_device']}), "
             f"{report['date']}", ""]
    if report.get("warning"):
        lines += [f"> **{report['warning']}**", ""]
    if report.get("interrupted"):
        lines += [f"> **Incomplete: {report['interrupted']}.**", ""]
    v = report["environment"]["versions"]
    lines += [
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; wall time "
        f"{report['wall_s']:.0f} s.",
        "",
        "Exact bytes of tensors alive at the peak of one training step (forward, loss, backward, AdamW step, "
        "optimizer states already there), counted by `MemTracker` on fake tensors (nothing computed). bf16, "
        "batch 1, one sequence. **GiB** (2^30 bytes) in the tables of peaks; the card limits are **decimal GB** "
        "(1e9 bytes) of tensors: the CUDA context (~0.5-1 GB), cuBLAS/NCCL workspaces and the caching allocator's "
        "fragmentation are not counted, so leave a margin. SDPA on fake CPU tensors takes torch's CPU flash "
        "backend, which saves what the CUDA flash backend saves (output + float32 logsumexp). Every peak below "
        "was measured; the longest lengths were predicted from a fit and then verified by measuring there and "
        "one step above (see benchmarks/README.md). The `decode` mode is inference instead: a prefill of T tokens "
        "into a KV cache (no grad, the last position's logits) and one decode step. Quantised providers' weights "
        "(`qweight`, `scales`, `zeros` buffers) are counted as PARAM.",
        "",
        "Categories (MemTracker's): " + "; ".join(f"**{c}** {n}" for c, n in CATEGORY_NOTES.items()) + ".",
        "",
        "## Providers", "",
    ]
    lines += [f"- **{p}**: {t}" for p, t in report["providers"].items()]
    lines += ["", "## Modes", ""] + [f"- **{m}**: {t}" for m, t in report["modes"].items()]
    lines += ["", "## Models", ""]
    for name in dict.fromkeys(r.model for r in records):
        spec = ALL_MODELS.get(name)
        if spec:
            fields = ", ".join(f"{k}={v}" for k, v in spec.config.items() if k != "rope_scaling")
            lines.append(f"- **{name}** ({spec.label}; {spec.source or 'tiny test shape'}): {fields}")
    for name in dict.fromkeys(r.model for r in records):
        rs = [r for r in records if r.model == name]
        fs = [f for f in fits if f["model"] == name]
        lines += ["", f"## {name}", ""]
        if fs:
            limits = list(dict.fromkeys(f["limit_gb"] for f in fs))
            lines += ["### Longest sequence that fits (tokens; decimal GB of tensors)", ""]
            header = ["mode", "provider", *(f"{g} GB" for g in limits)]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            combos = dict.fromkeys((f["mode"], f["provider"]) for f in fs)
            rank = {m: i for i, m in enumerate([*MODES, *PROVIDERS])}
            for mode, provider in sorted(combos, key=lambda c: (rank.get(c[0], 99), rank.get(c[1], 99))):
                by = {f["limit_gb"]: f for f in fs if (f["mode"], f["provider"]) == (mode, provider)}
                lines.append("| " + " | ".join([mode, provider, *(_fit_text(by[g]) if g in by else "" for g in limits)])
                             + " |")
            lines += ["", "`verified`: measured to fit, and 1024 tokens more measured not to fit; `predicted` "
                      "is the fit's first guess when it was off; `>= N (cap)`: still fits at the longest length "
                      "tried (`~M extrapolated`: where the line through the two longest measured lengths "
                      "reaches the limit; not measured); `skipped`: see the tables below.", ""]
        for mode in dict.fromkeys(r.mode for r in rs):
            mr = [r for r in rs if r.mode == mode and r.source == "sweep"]
            if mode == "decode":  # inference: no backward, no optimizer
                lines += _mode_table(f"### {mode}: peak of the prefill and one decode step GiB (weights GiB, "
                                     "then the rest: KV cache and activations, GiB and its ratio to hf-sdpa's)",
                                     mr, _decode_cell)
                continue
            lines += _mode_table(f"### {mode}: peak of the whole step GiB (peak minus parameters GiB, ratio of "
                                 "that to hf-sdpa's)", mr, _step_cell)
            lines += _mode_table(f"### {mode}: forward + backward alone, peak minus parameters and optimizer "
                                 "states GiB (ratio to hf-sdpa's)", mr, _fwd_bwd_cell)
    lines += ["", "## Every measurement (GiB)", "",
              "`source`: sweep (the fixed lengths) or search (measured by the longest-fit search). "
              "`opt states`: AdamW's exp_avg + exp_avg_sq as allocated (inside OPT). `fwd+bwd`: the peak of "
              "forward, loss and backward alone (before the AdamW step) less the parameters and OPT. "
              "`offloaded`: peak on the host-memory stand-in ('meta'), not in the total. `CUDA real`: "
              "torch.cuda.max_memory_allocated of the same step on a GPU.", ""]
    header = ["model", "mode", "provider", "tokens", "source", *CATEGORIES, "total", "total - PARAM",
              "vs hf-sdpa", "opt states", "fwd+bwd", "vs hf-sdpa", "offloaded", "CUDA real", "s", "note"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def order(r):
        return (r.model, list(MODES).index(r.mode) if r.mode in MODES else 9,
                list(PROVIDERS).index(r.provider) if r.provider in PROVIDERS else 9, r.tokens)

    for r in sorted(records, key=order):
        if r.status != "ok":
            cells = [r.model, r.mode, r.provider, f"{r.tokens:,}", r.source, *([""] * len(CATEGORIES)),
                     r.status, "", "", "", "", "", "", r.cuda_note or "", f"{r.seconds or 0:.1f}", r.reason or ""]
        else:
            real = _gib(r.cuda_max_allocated_bytes) if r.cuda_max_allocated_bytes is not None else (r.cuda_note or "")
            cells = [r.model, r.mode, r.provider, f"{r.tokens:,}", r.source,
                     *(_gib(r.categories.get(c, 0)) for c in CATEGORIES), _gib(r.peak_bytes),
                     _gib(r.peak_minus_params_bytes),
                     f"{r.ratio_to_hf_sdpa:.2f}x" if r.ratio_to_hf_sdpa is not None else "",
                     _gib(r.opt_state_bytes), _gib(r.fwd_bwd_minus_params_states_bytes),
                     f"{r.fwd_bwd_ratio_to_hf_sdpa:.2f}x" if r.fwd_bwd_ratio_to_hf_sdpa is not None else "",
                     _gib(r.offloaded_peak_bytes), real, f"{r.seconds:.1f}",
                     (r.note or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    write_text(path, "\n".join(lines) + "\n")


def write_plot(report: dict, records: list, path: Path) -> Path | None:
    """Peak GiB against tokens, one line per provider, one panel per (model, mode); the card limits
    dotted.  Skipped with a message without matplotlib (as benchmarks/plots.py does)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        say(f"plot skipped: matplotlib is not importable ({exc})")
        return None
    ok = [r for r in records if r.status == "ok"]
    panels = list(dict.fromkeys((r.model, r.mode) for r in ok))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (model, mode) in zip(axes.flat, panels, strict=False):  # the grid's spare panels are hidden
        rs = [r for r in ok if (r.model, r.mode) == (model, mode)]
        present = {r.provider for r in rs}
        for k, provider in enumerate(PROVIDERS):  # fixed order and colour per provider
            if provider not in present:
                continue
            pts = sorted((r.tokens, r.peak_bytes / GIB) for r in rs if r.provider == provider)
            xs, ys = zip(*pts, strict=True)
            style = dict(linewidth=2.2, color="black") if provider == "hf+ours+long" else dict(
                linewidth=1.2, color=f"C{k}", linestyle="--" if provider.startswith("ref") else "-")
            ax.plot(xs, ys, marker="o", markersize=3, label=provider, **style)
        for g in report["limits_gb"]:
            ax.axhline(g * GB / GIB, linestyle=":", color="grey", linewidth=1)
            ax.text(0.99, g * GB / GIB, f"{g} GB", transform=ax.get_yaxis_transform(), fontsize=7,
                    color="grey", ha="right", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("tokens (one sequence)")
        ax.set_ylabel("peak GiB")
        ax.set_title(f"{model}, {mode}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    what = "training-step" if all(r.mode in TRAINING_MODES for r in ok) else "training-step and inference"
    title = f"{what} peak memory, fake tensors ({report['fake_device']}), {report['date']}"
    if report.get("warning"):
        title += "\nSMOKE RUN: TINY MODELS"
    fig.suptitle(title, fontsize=10, color="red" if report.get("warning") else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_previous(path: Path, s: Settings) -> tuple[list, list]:
    """Records and fits of an earlier run into the same file, for the combinations this run does
    not measure (a sweep run in parts)."""
    if not path.exists():
        return [], []
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], []
    ours = {(m, mo, p) for m in s.models for mo in s.modes for p in s.providers}
    names = {f.name for f in dataclasses.fields(MemRecord)}
    recs = [MemRecord(**{k: v for k, v in r.items() if k in names}) for r in doc.get("records", [])
            if (r["model"], r["mode"], r["provider"]) not in ours]
    fits = [f for f in doc.get("fits", []) if (f["model"], f["mode"], f["provider"]) not in ours]
    return recs, fits


def run(args, on_gpu: bool, results_dir: Path) -> int:
    """``--only memory``: run the sweep chosen by ``args``; returns the exit status (0 every figure
    measured or reported missing/skipped with a reason, 1 a provider failed, 130 interrupted)."""
    start = time.perf_counter()
    s = settings_for(args, on_gpu)
    date = datetime.date.today().isoformat()
    if args.out is not None:
        out_dir = args.out
    elif not s.smoke:
        out_dir = results_dir
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="llama-kernels-memory-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem_for(s, date)
    json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    previous, previous_fits = _load_previous(json_path, s)
    if previous:
        say(f"memory: keeping {len(previous)} records of an earlier run in {json_path} (other combinations)")
    records: list = list(previous)
    fits: list = list(previous_fits)
    warning = ("SMOKE RUN: tiny models and limits of a few MB; the figures are exact for those tiny models "
               "but say nothing about real ones") if s.smoke else None
    env = _environment(s)
    say(f"memory: fake {s.fake_device} tensors; models {', '.join(s.models)}; modes {', '.join(s.modes)}; "
        f"providers {', '.join(s.providers)}; output {out_dir / stem}.*")

    def report(interrupted, complete):
        add_ratios(records)
        return {"title": "llama_kernels training-step memory (fake tensors)", "suite": "memory",
                "smoke": s.smoke, "warning": warning, "complete": complete, "interrupted": interrupted,
                "date": date, "fake_device": s.fake_device, "environment": env,
                "limits_gb": list(s.limits_gb), "step_tokens": s.step, "max_tokens": s.max_tokens,
                "sweep": list(s.sweep), "categories": CATEGORY_NOTES, "providers": PROVIDERS, "modes": MODES,
                "models": {n: dataclasses.asdict(ALL_MODELS[n]) for n in dict.fromkeys(r.model for r in records)
                           if n in ALL_MODELS},
                "wall_s": time.perf_counter() - start}

    def write(interrupted, complete, plot):
        doc = report(interrupted, complete)
        doc["records"] = [dataclasses.asdict(r) for r in records]
        doc["fits"] = fits
        write_text(json_path, json.dumps(json_safe(doc), indent=1) + "\n")
        write_markdown(doc, records, fits, md_path)
        written = [json_path, md_path]
        if plot and (p := write_plot(doc, records, png_path)):
            written.append(p)
        return written

    def _stop(signum, frame):
        raise KeyboardInterrupt()

    import threading

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _stop) if in_main else None
    interrupted = None
    try:
        for name in s.models:
            for mode in s.modes:
                for provider in s.providers:
                    run_combo(s, name, mode, provider, records, fits)
                    write(f"partial: written after {name} {mode} {provider}; the run had not finished",
                          complete=False, plot=False)
    except KeyboardInterrupt:
        interrupted = "stopped early: only the figures measured before are reported"
        say(interrupted)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    for p in write(interrupted, complete=interrupted is None, plot=True):
        say(f"wrote {p}")
    mine = records[len(previous):]
    bad = [r for r in mine if r.status == "failed"]
    counts: dict = {}
    for r in mine:
        counts[r.status] = counts.get(r.status, 0) + 1
    say(f"memory done in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{n} {st}" for st, n in sorted(counts.items())))
    for r in bad:
        say(f"PROBLEM: {describe(r)}")
    return 130 if interrupted else 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# Arguments (added to python -m benchmarks' parser)
# ---------------------------------------------------------------------------------------------
def _names(known, what):
    def parse(text):
        names = tuple(n.strip() for n in text.split(","))
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad))}; known: {', '.join(known)}")
        return names
    return parse


def _counts(text):
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory part (--only memory: training-step memory on fake tensors, exact, no GPU needed)")
    g.add_argument("--memory-models", type=_names(tuple(ALL_MODELS), "model"), metavar="NAMES",
                   help=f"models (default llama3-8b; smoke: smoke-llama): {', '.join(ALL_MODELS)}")
    g.add_argument("--memory-modes", type=_names(tuple(MODES), "mode"), metavar="NAMES",
                   help=f"modes (default all): {', '.join(MODES)}")
    g.add_argument("--memory-providers", type=_names(tuple(PROVIDERS), "provider"), metavar="NAMES",
                   help=f"providers (default all): {', '.join(PROVIDERS)}")
    g.add_argument("--memory-tokens", type=_counts, metavar="COUNTS",
                   help="sweep lengths replacing 2048,4096,8192,16384 (doubling continues past the last while it "
                        "fits the largest card)")
    g.add_argument("--memory-max-tokens", type=_counts, metavar="N",
                   help=f"the longest length tried (default {MAX_TOKENS:,}; smoke 4096): a card that still fits "
                        "there is reported as '>= N (cap)'")
    g.add_argument("--memory-no-search", action="store_true",
                   help="measure the sweep only, not the longest length that fits each card")
