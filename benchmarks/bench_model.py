"""End-to-end benchmarks: a LLaMA-3-8B-shaped model (fewer layers) trained, prefilled and decoded.

Providers: the reference model eager (``eager``), patched with ``apply_kernels`` (``ours``) and
``torch.compile``d (``torch.compile``); transformers' ``LlamaForCausalLM`` with SDPA attention
(``hf``), patched with ``apply_kernels`` (``hf+ours``) and with Liger-Kernel (``hf+liger``, Liger's
defaults: RoPE, RMSNorm, SwiGLU and its fused linear cross-entropy).  Each model is built from the
same seed in bf16, measured, and freed before the next.

Figures, for ``T`` tokens (batch 1), ``P`` = parameters of the linear layers (LM head included,
embedding excluded: a lookup), ``L`` layers, ``Hq`` query heads of dim ``D``:

* train step (forward, loss, backward, AdamW step): tokens/s = T / step time; peak memory of one
  step; model FLOP utilisation = (6 P T + 3.5 L * 2 Hq T^2 D) / time / measured matmul peak (matmuls
  forward 2 P T, backward twice that; causal attention forward 4 Hq T^2 D / 2, backward 2.5x).  Every
  provider takes its model's own loss path, so that like is compared with like: the reference
  model's ``model.loss(ids)`` (the LM head and the next-token cross-entropy in its
  ``cross_entropy`` op slot: eager materialises the logits, ``apply_kernels`` makes it our fused
  ``fused_linear_cross_entropy``, ``torch.compile`` compiles ``model.loss``), transformers'
  ``model(input_ids=ids, labels=ids).loss`` (fused under ``apply_kernels`` in training mode, which
  returns no logits; Liger's fused linear cross-entropy under ``hf+liger``).  Before the timing, the
  training-mode loss (the fused path) is checked against the family's unpatched model, as the
  eval-mode loss is before anything is timed.
* prefill (forward of T tokens, no grad): tokens/s; FLOP = 2 P T + L * 2 Hq T^2 D.
* decode (batch 1, greedy, the model's own ``generate`` and KV cache), two figures side by side:

  - ``decode``: our decode figure.  For the reference model (``eager``, ``ours``) the CUDA-graph
    step, ``generate(..., cuda_graphs=True)`` (:class:`llama_kernels.model.StaticDecodeStep`: one
    graph replay per token, no per-kernel launch cost).  ``generate(2)`` (prompt, capture, one
    replay) and ``generate(N)`` are timed: their difference is N - 2 replays, the capture
    excluded.  Without CUDA it is ``skipped`` (graphs need a GPU), never faked.  transformers'
    models (``hf``, ``hf+ours``, ``hf+liger``) and ``torch.compile`` run their plain ``generate``
    here (not graph-captured; their record's note says so): ``generate(1)`` and ``generate(N)``,
    N - 1 steps.
  - ``decode-no-graph`` (``eager``, ``ours`` only): the same model's ``generate(...,
    cuda_graphs=False)``, one launch per kernel per step, timed like the plain ``generate`` above:
    the launch-bound figure, to show what the graph saves.

  tokens/s = steps / difference.  Bytes a step must move: every weight read once (the embedding:
  one row) plus the K and V cache of every layer up to the current position (2 L Hk pos D s), plus
  the new K/V row; their sum over the timed steps / difference is compared with the measured copy
  bandwidth (the roofline fraction of decode: the target is >= 0.75 of the copy bandwidth).

``--family NAME`` (:data:`FAMILIES`; default ``llama``, all of the above) benchmarks another
transformers family at a real model's shapes instead, with the sweep's layer count: ``qwen3``
(Qwen3-8B) or ``gemma2`` (Gemma-2-9B).  Its providers are transformers' model only: ``hf`` (SDPA
attention, or eager where SDPA cannot run the model: Gemma 2's soft-capped logits), ``hf+ours``
(``apply_kernels``), ``hf+compile`` (``model.compile()``, when the compile providers are on; decode
in full mode only, as ``torch.compile``'s) and ``hf+liger`` (the family's
``apply_liger_kernel_to_<family>``); the reference model is LLaMA's only.  Its records' shape is
the model's (``qwen3-8b``, ``gemma2-9b``; ``qwen3-smoke``... in smoke runs) and their ``dims``
name the family and head dim.  The work counts above take the family's head dim ``D`` (Gemma 2:
256, not hidden / heads), and a local (sliding-window) layer of Gemma 2 counts only the causal
query-key pairs inside its window (T^2 / 2 - (T - W)^2 / 2 for T > W); soft-capping's tanh and the
norms are not counted (the records' note says so).

``--quantize FORMATS`` (``settings.quantize``) replaces the providers by the quantised comparison of
:mod:`benchmarks.bench_quantized`: the reference model at its real depth with ``apply_kernels`` in
bf16 (``ours``) and quantised (``ours+int8``, ``ours+int4-g128``...), measured by the same
:func:`_measure` without its training step (records' shape ``<model>-<layers>layers``); a decode
step's bytes count a quantised layer's ``qweight`` + ``scales`` + ``zeros``.

The compiled providers (:data:`COMPILED`: ``torch.compile``, ``hf+compile``) are each measured in a
fresh process of their own (:mod:`benchmarks.isolated`), never in this one: ``hf+ours`` and
``hf+liger`` change transformers' modeling modules for every later model of their process, which
would break a compiled unpatched model's graphs (and flatter ours).  Their records' ``extra`` has
the graph breaks Dynamo counted over the provider's figures (``graph_breaks``, ``graphs``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama_kernels.integrations.transformers import families as transformers_families
from llama_kernels.ops.registry import MODEL_SHAPES

from . import shapes
from .common import (Missing, Record, Settings, Skipped, Timing, Unreliable, building, classify, elapsed_s,
                     free_memory, peak_memory, say, settings_json, time_calls)
from .shapes import head_dim, linear_params


# The families --family takes: the package's transformers families that name a real model to
# measure (registry.MODEL_SHAPES: llama3-8b, qwen3-8b, gemma2-9b).  llama also has the
# reference-model providers (eager, ours, torch.compile); the others run transformers' model only
# (hf, hf+ours, hf+compile, hf+liger).
FAMILIES = {key: family for key, family in transformers_families.FAMILIES.items() if family.model_shape}
# Smoke runs: the family's real config at the registry smoke shape's sizes, with a vocabulary of
# 256 (the odd vocabulary of the op benchmark's smoke shape is there for the kernels' tails) ...
SMOKE_SIZES = dict(shapes.fields(shapes.config("smoke"), "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "max_position_embeddings"), vocab_size=256)
# ... and what keeps the family's own kind at that size: Qwen3 gives its head dim, as its config
# does; Gemma 2's differs from hidden / heads, as the real one's (256 vs 224) does, and its window
# (8) is shorter than the smoke sweep's 16 tokens, so its local layers slide.
SMOKE_KIND = {"qwen3": dict(head_dim=32), "gemma2": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8)}
# The benchmark's notes by family: what the FLOP counts leave out (the records' note) and what
# apply_kernels leaves to transformers (hf+ours' note).
FLOP_NOTES = {"gemma2": "the soft-capping (tanh) of attention scores and final logits not counted"}
OURS_NOTES = {"gemma2": "the LM head and loss stay transformers' (apply_kernels does not fuse the final-logit "
                        "soft-capping)"}


def real_config(family: str) -> dict:
    """The transformers config of the family's real model (a copy of the registry's; no layer count)."""
    return shapes.config(FAMILIES[family].model_shape)


def smoke_config(family: str) -> dict:
    """The family's tiny config of smoke runs: its real config at :data:`SMOKE_SIZES`."""
    return dict(real_config(family), **SMOKE_SIZES, **SMOKE_KIND.get(family, {}))


def title(family: str) -> str:
    """The family's real model as the log and the notes name it, e.g. ``Qwen3-8B``."""
    return MODEL_SHAPES[FAMILIES[family].model_shape].title


def shape_label(family: str, settings: Settings) -> str:
    """The records' shape: the real model's (``qwen3-8b``), in smoke runs ``<family>-smoke`` (LLaMA's: ``smoke``)."""
    if settings.mode != "smoke":
        return FAMILIES[family].model_shape
    return "smoke" if family == "llama" else f"{family}-smoke"


def attention_implementation(family: str) -> str:
    """transformers' attn_implementation of the hf providers: SDPA, or eager where SDPA cannot run
    the model (soft-capped attention logits: Gemma 2)."""
    return "eager" if real_config(family).get("attn_logit_softcapping") is not None else "sdpa"


SMOKE = smoke_config("llama")  # the LLaMA smoke model's config (no layer count)

# layers: as many as leave room for eager's activations at the largest T on an 80 GB card.
SWEEPS = {
    "full": dict(layers=4, train=(2048, 8192), prefill=(2048, 8192), decode=((1024, 128), (8192, 128)),
                 warmup=3, reps=10),
    "quick": dict(layers=2, train=(4096,), prefill=(4096,), decode=((1024, 64),), warmup=2, reps=3),
    "smoke": dict(layers=2, train=(16,), prefill=(16,), decode=((8, 4),), warmup=0, reps=2),
}
LOSS_TOLERANCE = 1e-2  # relative difference of the first loss from the family's unpatched model
# Providers whose ``decode`` figure is the CUDA-graph step, and who get the ``decode-no-graph`` one
# too: the reference model, eager and patched (and, in the quantised comparison, patched and
# quantised: ``ours+int8``...; see graph_decode).  transformers' generate has no such step here,
# and a compiled model keeps its plain generate (its decode runs in full mode only).
GRAPH_DECODE = ("eager", "ours")
# Compiled models: more warm-up, decode in full mode only, and each measured in a fresh process of
# its own (benchmarks/isolated.py), never in the one where other providers patched transformers.
COMPILED = ("torch.compile", "hf+compile")
# torch.compile's backend for COMPILED (inductor: torch.compile's default); handed to their process.
# Tests set "eager" (Dynamo's tracing, graph breaks included, without inductor's CPU compile time).
COMPILE_BACKEND = "inductor"
ISOLATED_NOTE = "measured in a fresh process, where nothing was patched"
CHILD_STOP_S = 10  # how long a fresh process stopped with SIGTERM gets to exit before SIGKILL
DECODE_NOTES = {True: "decode: generate(cuda_graphs=True), one CUDA-graph replay per step",
                False: "decode: plain generate, not graph-captured (one launch per kernel per step)"}


def _config(settings: Settings, family: str = "llama") -> dict:
    base = smoke_config(family) if settings.mode == "smoke" else real_config(family)
    layers = SWEEPS[settings.mode]["layers"]
    cfg = dict(base, num_hidden_layers=layers)
    if "sliding_window" in base:  # Gemma 2: local layers first, then alternating (transformers' default)
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return cfg


# ---------------------------------------------------------------------------------------------
# Runners: one interface over the reference model and transformers' model
# ---------------------------------------------------------------------------------------------
class LlamaRunner:
    family = "eager"

    def __init__(self, model, note=None, loss=None):
        self.model, self.note = model, note
        # Llama.loss: LM head + next-token cross-entropy in the cross_entropy op slot (fused when
        # patched); torch.compile passes its compiled version (model.compile() covers __call__ only).
        self._loss = loss or model.loss

    def logits(self, ids):
        return self.model(ids)

    def loss(self, ids):
        return self._loss(ids)

    def generate(self, ids, n, cuda_graphs=False):
        return self.model.generate(ids, max_new_tokens=n, cuda_graphs=cuda_graphs)


class HFRunner:
    family = "hf"

    def __init__(self, model, note=None):
        self.model, self.note = model, note
        # Random weights: never stop early at an end-of-sequence token.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    def logits(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits

    def loss(self, ids):  # transformers shifts the labels itself (Liger: fused linear cross-entropy)
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def generate(self, ids, n, cuda_graphs=False):
        if cuda_graphs:  # never asked (GRAPH_DECODE): a graph figure must not silently time without one
            raise ValueError("transformers' generate is not graph-captured by this benchmark")
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False)


def _llama(cfg, settings):
    from llama_kernels.model import Llama, LlamaConfig

    with building(settings.device):
        return Llama(LlamaConfig(**cfg))


def _hf(cfg, settings, family: str = "llama"):
    fam = FAMILIES[family]
    try:
        import transformers

        config_class, model_class = getattr(transformers, fam.config_class), getattr(transformers, fam.causal_lm_class)
    except Exception as exc:
        raise Missing(f"transformers' {fam.causal_lm_class} not importable ({type(exc).__name__}: {exc})") from None
    config = config_class(**dict(cfg, head_dim=head_dim(cfg)), attn_implementation=attention_implementation(family))
    with building(settings.device):
        return model_class._from_config(config, dtype=torch.bfloat16)


def _patched(model):
    try:
        import llama_kernels as lk

        return lk.apply_kernels(model)
    except Exception as exc:
        raise Missing(f"llama_kernels.apply_kernels unavailable: {type(exc).__name__}: {exc}") from None


def _liger_patched(stack: contextlib.ExitStack, model, family: str = "llama"):
    fam = FAMILIES[family]
    try:
        import liger_kernel.transformers as liger

        modeling = importlib.import_module(fam.modeling_module)
    except Exception as exc:
        raise Missing(f"liger_kernel not importable ({type(exc).__name__}: {exc}); "
                      "benchmarks/README.md says how to carry its wheel") from None
    apply = getattr(liger, fam.liger, None)
    if apply is None:
        raise Missing(f"this liger_kernel has no {fam.liger}")
    # Liger also swaps module-level names of transformers' modeling module for every later model:
    # undo that when this provider is done, so it cannot leak into other providers (or other tests).
    saved = {n: getattr(modeling, n) for n in ("apply_rotary_pos_emb", f"{fam.prefix}RMSNorm", f"{fam.prefix}MLP")}
    causal_lm = getattr(modeling, fam.causal_lm_class)
    saved_forward = causal_lm.forward
    stack.callback(lambda: [setattr(modeling, n, v) for n, v in saved.items()])
    stack.callback(setattr, causal_lm, "forward", saved_forward)
    apply(model=model)
    return model


def _compiled(model, settings):
    if not settings.compile:
        raise Skipped("torch.compile providers are off (--no-compile, or --smoke; --compile turns them on)")
    # compiles the module's __call__, so generate() runs the compiled forward too
    model.compile(backend=COMPILE_BACKEND)
    return model


def _compiled_runner(cfg, settings) -> LlamaRunner:
    # Llama.loss does not go through __call__ (it stops at the hidden states): compiled on its own.
    model = _compiled(_llama(cfg, settings), settings)
    return LlamaRunner(model, "model.compile() and torch.compile(model.loss), default mode; compile time not "
                              f"timed; {ISOLATED_NOTE}", loss=torch.compile(model.loss, backend=COMPILE_BACKEND))


def provider_notes(family: str = "llama") -> dict:
    """What each provider of the model benchmark is, for the report's provider list."""
    if family != "llama":
        fam, real = FAMILIES[family], real_config(family)
        work = "; ".join(filter(None, (
            f"work counts as LLaMA's, with its head dim {real['head_dim']}",
            "the attention FLOP of local (sliding-window) layers count only the query-key pairs inside the window"
            if "sliding_window" in real else None,
            FLOP_NOTES.get(family))))
        return {
            f"model ({title(family)} shapes)": f"transformers {fam.causal_lm_class} only (the reference model is "
                                               f"LLaMA's); {work}",
            "model hf / hf+ours / hf+compile / hf+liger": f"transformers {fam.causal_lm_class} "
                                                          f"(attn_implementation={attention_implementation(family)}): "
                                                          "plain, "
                                                          f"apply_kernels, model.compile(), {fam.liger} (defaults, "
                                                          "incl. fused linear cross-entropy)",
            "model train": "transformers' model(input_ids=ids, labels=ids).loss (hf+ours: fused in training mode "
                           "where apply_kernels patches the loss; hf+liger: Liger's fused linear cross-entropy); "
                           "the training-mode loss is checked against the unpatched model (hf) first",
            "model decode": "plain generate, not graph-captured, generate(N) - generate(1) (hf+compile: full "
                            "mode only). Bytes per step / time over the copy bandwidth is the roofline fraction",
        }
    return {
        "model eager / ours / torch.compile": "llama_kernels.model.Llama: eager, apply_kernels, model.compile()",
        "model hf / hf+ours / hf+liger": "transformers LlamaForCausalLM (sdpa): plain, apply_kernels, "
                                         "apply_liger_kernel_to_llama (defaults, incl. fused linear cross-entropy)",
        "model train": "each provider's own loss path: the reference model's model.loss(ids) (LM head + "
                       "cross-entropy in its cross_entropy op slot: eager materialises the logits, ours is "
                       "fused_linear_cross_entropy), transformers' model(input_ids=ids, labels=ids).loss (hf+ours: "
                       "fused in training mode, no logits; hf+liger: Liger's fused linear cross-entropy); the "
                       "training-mode loss is checked against the family's unpatched model first",
        "model decode": "eager and ours: the CUDA-graph decode step, generate(cuda_graphs=True), timed as "
                        "generate(N) - generate(2) (capture excluded); skipped without CUDA. hf, hf+ours, "
                        "hf+liger and torch.compile: their plain generate, not graph-captured, "
                        "generate(N) - generate(1). Bytes per step / time over the copy bandwidth is the "
                        "roofline fraction (target >= 0.75)",
        "model decode-no-graph": "eager and ours: generate(cuda_graphs=False), one kernel launch per op "
                                 "per step (launch-bound at batch 1), generate(N) - generate(1)",
    }


def providers(cfg: dict, settings: Settings, family: str = "llama") -> dict:
    """name -> builder(stack) of a runner; each runs alone and is freed (stack closed) after."""
    if family != "llama":  # transformers' model of the family only: one builder, the family its argument
        fam = FAMILIES[family]
        def hf():
            return _hf(cfg, settings, family)

        return {
            "hf": lambda stack: HFRunner(hf(), f"transformers {fam.causal_lm_class}, "
                                               f"attn_implementation={attention_implementation(family)}"),
            "hf+ours": lambda stack: HFRunner(_patched(hf()), "; ".join(filter(None, (
                "apply_kernels on transformers' model", OURS_NOTES.get(family))))),
            "hf+compile": lambda stack: HFRunner(_compiled(hf(), settings),
                                                 "model.compile() of transformers' model, default mode; compile "
                                                 f"time not timed; {ISOLATED_NOTE}"),
            "hf+liger": lambda stack: HFRunner(_liger_patched(stack, hf(), family),
                                               f"{fam.liger} defaults (fused linear cross-entropy: no logits in "
                                               "training)"),
        }
    return {
        "eager": lambda stack: LlamaRunner(_llama(cfg, settings)),
        "ours": lambda stack: LlamaRunner(_patched(_llama(cfg, settings))),
        "torch.compile": lambda stack: _compiled_runner(cfg, settings),
        "hf": lambda stack: HFRunner(_hf(cfg, settings), "transformers LlamaForCausalLM, attn_implementation=sdpa"),
        "hf+ours": lambda stack: HFRunner(_patched(_hf(cfg, settings)), "apply_kernels on transformers' model"),
        "hf+liger": lambda stack: HFRunner(_liger_patched(stack, _hf(cfg, settings)),
                                           "apply_liger_kernel_to_llama defaults (rope, rms_norm, swiglu, "
                                           "fused linear cross-entropy: no logits in training)"),
    }


# ---------------------------------------------------------------------------------------------
# Work counts
# ---------------------------------------------------------------------------------------------
def _causal_pairs(t: int, window: int | None) -> float:
    """Query-key pairs of causal attention over ``t`` tokens, counted as t^2 / 2; with a sliding
    ``window`` (each query sees its last ``window`` keys) the pairs past it drop out: t^2 / 2 -
    (t - window)^2 / 2 when t > window."""
    pairs = t * t / 2
    if window is not None and t > window:
        pairs -= (t - window) ** 2 / 2
    return pairs


def _attention_fwd_flop(cfg, t: int) -> float:
    """4 Hq D per query-key pair, summed over the layers: a local layer (``layer_types``, Gemma 2)
    counts its window's pairs only."""
    per_pair = 4 * cfg["num_attention_heads"] * head_dim(cfg)
    types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    return sum(per_pair * _causal_pairs(t, cfg["sliding_window"] if kind == "sliding_attention" else None)
               for kind in types[:cfg["num_hidden_layers"]])


def _flop_note(cfg, family: str) -> str | None:
    parts = []
    if "sliding_attention" in cfg.get("layer_types", ()):
        parts.append(f"attention FLOP of the local (sliding-window) layers count only the query-key pairs inside "
                     f"their {cfg['sliding_window']}-token window")
    return "; ".join(filter(None, (*parts, FLOP_NOTES.get(family)))) or None


def _weight_bytes_per_token(model, cfg) -> int:
    """Bytes of the weights one decode step reads: all, but one row of an untied embedding; a
    quantised layer's weights are its buffers (``qweight``, ``scales``, ``zeros``)."""
    from llama_kernels.quantize import QuantizedLinear

    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not cfg.get("tie_word_embeddings", False):
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros)
                         if t is not None)
    return total


def _decode_bytes(cfg, weight_bytes: int, prompt: int, first: int, last: int, elem: int) -> int:
    """Bytes decode steps ``first..last`` (1-based, inclusive) of a generation after a ``prompt``-token
    prefill must move (see the module docstring): step j writes the K/V row of position
    prompt + j - 1 and reads the prompt + j rows up to it."""
    d = head_dim(cfg)
    kv_row = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * d * elem  # K and V, all layers
    steps = last - first + 1
    positions_read = sum(prompt + j for j in range(first, last + 1))
    return steps * (weight_bytes + kv_row) + kv_row * positions_read


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _ids(cfg, t: int, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (1, t), generator=gen, device=device)


_OPS = (("prefill", "forward"), ("decode", "generate"), ("decode-no-graph", "generate"),
        ("train", "forward+backward+AdamW"))


def graph_decode(name: str) -> bool:
    """Whether provider ``name``'s decode figure is the CUDA-graph step (:data:`GRAPH_DECODE`, and the
    quantised reference models ``ours+<format>`` of :mod:`benchmarks.bench_quantized`)."""
    return name in GRAPH_DECODE or name.startswith("ours+")


def _record(name, op, tokens, cfg, settings, family="llama", shape=None, **kw) -> Record:
    dims = {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")}
    dims.update(head_dim=head_dim(cfg), family=family)
    if kw.get("work_unit") == "FLOP":  # what the FLOP count of this family approximates
        kw["note"] = "; ".join(filter(None, (kw.get("note"), _flop_note(cfg, family)))) or None
    return Record("model", op, dict(_OPS)[op], name, shape or shape_label(family, settings), {**dims, "batch": 1},
                  tokens, "bf16", **kw)


def _decode_ops(name: str) -> tuple:
    """The decode figures of provider ``name``: see :func:`graph_decode`."""
    return ("decode", "decode-no-graph") if graph_decode(name) else ("decode",)


def _plan(settings: Settings, name: str, training: bool = True):
    """(op, tokens) of every figure of provider ``name``; decode's tokens are the prompt length.
    ``training=False``: no training step (a quantised model's weights are frozen)."""
    sweep = SWEEPS[settings.mode]
    return ([("prefill", t) for t in sweep["prefill"]]
            + [(op, p) for p, _ in sweep["decode"] for op in _decode_ops(name)]
            + ([("train", t) for t in sweep["train"]] if training else []))


def _measure(name, runner, cfg, settings, limits, records, ref_losses, family="llama", shape=None,
             training=True):
    sweep = dict(SWEEPS[settings.mode])
    dev = settings.device
    if name in COMPILED:  # the first calls compile (and may recompile): never time them
        sweep["warmup"] += 2

    # Check first: the first loss must agree with the same family's unpatched model.  In eval mode
    # and without grad, like the prefill after it (a compiled model reuses that graph).
    runner.model.eval()
    try:
        with torch.no_grad():
            loss = runner.loss(_ids(cfg, sweep["train"][0], dev, 0)).item()
    except Exception as exc:
        status, reason = classify(exc)
        for op, tokens in _plan(settings, name, training):
            records.append(_record(name, op, tokens, cfg, settings, family, shape, status=status, reason=reason,
                                   note=runner.note))
            say(records[-1].describe())
        return
    ref = ref_losses.setdefault(runner.family, loss)
    mismatch = not abs(loss - ref) <= LOSS_TOLERANCE * abs(ref)
    say(f"model {name}: first loss {loss:.4f} ({runner.family} reference {ref:.4f})")

    def attempt(op, tokens, body, note=runner.note, **kw):
        r = _record(name, op, tokens, cfg, settings, family, shape, note=note, **kw)
        if mismatch:
            r.status, r.reason = "mismatch", f"first loss {loss:.4f} vs {runner.family}'s {ref:.4f}"
        else:
            try:
                body(r)
            except Exception as exc:
                r.status, r.reason = classify(exc)
        r.extra["loss"] = loss
        records.append(r)
        free_memory()
        say(r.describe())

    def prefill(r, t):
        ids = _ids(cfg, t, dev, 1)

        def call():
            with torch.no_grad():
                return runner.logits(ids)

        r.set_timing(time_calls(call, dev, sweep["warmup"], sweep["reps"]), limits)
        r.tokens_per_s = t / r.ms * 1e3
        r.peak_mem_bytes, r.peak_mem_delta_bytes = peak_memory(call, dev)

    def decode(r, prompt, new, graphs):
        if name in COMPILED and settings.mode != "full":
            raise Skipped("compiled decode recompiles for new cache lengths: full mode only")
        if graphs and dev.type != "cuda":
            raise Skipped("the CUDA-graph decode step (generate(cuda_graphs=True)) needs a CUDA device; "
                          "decode-no-graph is this model's figure without graphs")
        # A graph generation captures its step at the first decode token: generate(2) holds the
        # prompt, the capture and one replay, so the difference from generate(N) is replays only.
        base = 2 if graphs else 1
        if new <= base:
            raise ValueError(f"decode needs more than {base} new tokens to time a step, got {new}")
        ids = _ids(cfg, prompt, dev, 2)

        def gen(n):
            return runner.generate(ids, n, cuda_graphs=graphs)

        # A step is the difference of two timings: a first call's one-off costs in the shorter one
        # (smoke runs warm nothing up) would make it negative, so each is warmed and repeated.
        warmup, reps = max(sweep["warmup"], 1), max(sweep["reps"], 3)
        short = time_calls(lambda: gen(base), dev, warmup, reps)
        long = time_calls(lambda: gen(new), dev, warmup, reps)
        steps = new - base
        step_ms = (long.ms - short.ms) / steps
        if step_ms <= 0:
            raise Unreliable(f"generate({new}) took no longer than generate({base}): {long.ms:.3f} ms")
        elem = next(runner.model.parameters()).element_size()
        weights = _weight_bytes_per_token(runner.model, cfg)
        r.work = _decode_bytes(cfg, weights, prompt, base, new - 1, elem) / steps
        r.work_unit = "B"  # per decode step, on average
        r.set_timing(Timing(step_ms, step_ms, step_ms), limits)
        r.ms_p20 = r.ms_p80 = None  # a difference of two medians: no spread to report
        r.tokens_per_s = 1e3 / step_ms
        r.extra.update(new_tokens=new, base_tokens=base, timed_steps=steps, cuda_graphs=graphs,
                       generate_base_ms=short.ms, generate_n_ms=long.ms)
        r.peak_mem_bytes, r.peak_mem_delta_bytes = peak_memory(lambda: gen(new), dev)

    def train(r, t):
        ids = _ids(cfg, t, dev, 3)
        # Check the training-mode loss first: the path timed below (a patched model's fused LM head
        # and loss run in training mode only), against the family's unpatched model on the same ids.
        train_loss = runner.loss(ids).item()
        train_ref = ref_losses.setdefault((runner.family, "train", t), train_loss)
        r.extra["train_loss"] = train_loss
        if not abs(train_loss - train_ref) <= LOSS_TOLERANCE * abs(train_ref):
            r.status, r.reason = "mismatch", (f"training-mode loss {train_loss:.4f} vs {runner.family}'s "
                                              f"{train_ref:.4f}")
            return
        opt = torch.optim.AdamW(runner.model.parameters(), lr=1e-6, **({"fused": True} if dev.type == "cuda" else {}))

        def step():
            loss = runner.loss(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        r.set_timing(time_calls(step, dev, sweep["warmup"], sweep["reps"]), limits)
        r.tokens_per_s = t / r.ms * 1e3
        r.peak_mem_bytes, r.peak_mem_delta_bytes = peak_memory(step, dev)

    # Each figure's body gets its loop values bound (functools.partial), not looked up when it runs.
    for t in sweep["prefill"]:
        attempt("prefill", t, functools.partial(prefill, t=t),
                work=2 * linear_params(cfg) * t + _attention_fwd_flop(cfg, t), work_unit="FLOP")
    for prompt, new in sweep["decode"]:
        for op in _decode_ops(name):
            graphs = op == "decode" and graph_decode(name)
            note = "; ".join(filter(None, (runner.note, DECODE_NOTES[graphs])))
            attempt(op, prompt, functools.partial(decode, prompt=prompt, new=new, graphs=graphs), note=note)
    if not training:
        return
    runner.model.train()
    for t in sweep["train"]:
        attempt("train", t, functools.partial(train, t=t),
                work=6 * linear_params(cfg) * t + 3.5 * _attention_fwd_flop(cfg, t), work_unit="FLOP")


def run(settings: Settings, limits: dict, records: list, progress=None, family: str = "llama") -> None:
    """Measure every provider of :func:`providers` into ``records``, one model at a time.

    ``progress(label)``, when given, is called after each provider's figures are in ``records``
    (``__main__`` rewrites the report then, so a run killed later keeps them).  ``family`` (a key
    of :data:`FAMILIES`) picks the model: LLaMA-3-8B's shapes and the reference model too, or
    another transformers family's (its ``hf`` providers only).  (With ``--quantize`` the model part
    is :func:`benchmarks.bench_quantized.run` instead.)
    """
    cfg = _config(settings, family)
    say(f"model: {cfg['num_hidden_layers']} layers of {title(family)} shape" if settings.mode != "smoke"
        else f"model: tiny smoke config ({family})")
    ref_losses: dict = {}
    for name, build in providers(cfg, settings, family).items():
        if name in COMPILED and settings.compile:
            # Never in this process: an earlier provider may have patched transformers' modules
            # (apply_kernels, Liger) or compiled something; see benchmarks/isolated.py.
            run_isolated(name, cfg, settings, limits, records, ref_losses, family)
        else:
            run_provider(name, build, cfg, settings, limits, records, ref_losses, family)
        if progress is not None:
            progress(f"model {name}")


def run_provider(name, build, cfg, settings, limits, records, ref_losses, family="llama", shape=None,
                 training=True) -> None:
    """Build provider ``name`` (``build(stack)``), measure its figures into ``records``, free it.

    ``ref_losses`` holds the first losses of each family's unpatched model (set by the first
    provider of a family to get there).  :func:`run` calls this in its own process for every
    provider but the compiled ones, which :func:`run_isolated` has :mod:`benchmarks.isolated` run
    through this same function in a fresh process.  ``shape`` replaces the records' shape label,
    ``training=False`` leaves the training step out (:mod:`benchmarks.bench_quantized`).
    """
    say(f"model {name}: building")
    with contextlib.ExitStack() as stack:
        try:
            runner = build(stack)
        except Exception as exc:
            status, reason = classify(exc)
            for op, tokens in _plan(settings, name, training):
                records.append(_record(name, op, tokens, cfg, settings, family, shape, status=status, reason=reason))
                say(records[-1].describe())
        else:
            try:
                _measure(name, runner, cfg, settings, limits, records, ref_losses, family, shape, training)
            finally:
                del runner
                if name in COMPILED:
                    torch._dynamo.reset()
                free_memory()


# ---------------------------------------------------------------------------------------------
# Compiled providers: measured in a fresh process (benchmarks/isolated.py is the child's side)
# ---------------------------------------------------------------------------------------------
def losses_json(ref_losses: dict) -> list:
    """``ref_losses``' keys are family names or (family, "train", tokens) tuples: as pairs, for JSON."""
    return [[list(k) if isinstance(k, tuple) else k, v] for k, v in ref_losses.items()]


def losses_from_json(pairs: list) -> dict:
    """The ``ref_losses`` that :func:`losses_json` wrote."""
    return {tuple(k) if isinstance(k, list) else k: v for k, v in pairs}


def run_isolated(name, cfg, settings, limits, records, ref_losses, family="llama") -> None:
    """Measure provider ``name`` of :func:`providers` in a fresh process (``python -m
    benchmarks.isolated``, which runs :func:`run_provider` there).

    Its records are appended to ``records`` and the reference losses it set (if its family's
    unpatched model had none yet) to ``ref_losses``.  Its log lines go to this process's stdout and
    stderr.  A child that dies before writing its result leaves every figure of the provider
    ``failed`` with its exit status; a SIGTERM or Ctrl-C here stops the child too.
    """
    request = {
        "name": name, "family": family, "cfg": cfg, "settings": settings_json(settings), "limits": limits,
        "ref_losses": losses_json(ref_losses), "compile_backend": COMPILE_BACKEND,
        "started_at": time.time() - elapsed_s(),  # its log's clock continues this one
        "num_threads": torch.get_num_threads(),  # the CPU threads this run chose (tests: 1)
    }
    root = str(Path(__file__).resolve().parents[1])  # the child imports these benchmarks and llama_kernels
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    with tempfile.TemporaryDirectory(prefix="llama-kernels-isolated-") as tmp:
        request_path, result_path = Path(tmp, "request.json"), Path(tmp, "result.json")
        request_path.write_text(json.dumps(request))
        sys.stdout.flush(), sys.stderr.flush()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.isolated", str(request_path), str(result_path)],
                                env=env)
        say(f"model {name}: measured in a fresh process (pid {proc.pid}), where nothing has been patched")
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here (SIGTERM, Ctrl-C): stop the child too
                proc.terminate()
                try:
                    proc.wait(CHILD_STOP_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result is None or "error" in result:
        reason = (result["error"] if result is not None else
                  f"its process (python -m benchmarks.isolated) exited with status {rc} without a result; "
                  "its log is above")
        for op, tokens in _plan(settings, name):
            records.append(_record(name, op, tokens, cfg, settings, family, status="failed", reason=reason))
            say(records[-1].describe())
        return
    records.extend(Record(**r) for r in result["records"])
    for key, value in losses_from_json(result["ref_losses"]).items():
        ref_losses.setdefault(key, value)
