"""The op benchmarks' harness: how an op is declared (:class:`OpSpec`), and the one loop that checks
and times every op (:func:`run_case`, :func:`run`).

An op file (``rms_norm.py``, ``glu.py``, ``rope.py``, ``attention.py``, ``cross_entropy.py``,
``quantized.py``) declares its :class:`OpSpec`: the sample of the op registry
(``llama_kernels.ops.registry.SAMPLES``) its inputs come from (:func:`build_inputs`: a
:class:`Case`'s :class:`Inputs`; an op whose cases are not model shapes times token counts, such
as one weight format at every projection of a model, gives its own ``case_list`` and ``inputs``,
and names the sample for its kernel and eager twin only), how many bytes (or
FLOP) one call must move (or do), which providers exist besides the three most ops have (``ours``,
the sample's kernel; ``eager``, its eager twin; ``torch.compile`` of that twin; an op's ``base``
may name fewer, see :func:`providers`) and what they are (``provider_notes``, assembled by
:func:`provider_notes`).  Every provider is called as the sample says, ``fn(*args, **kwargs)``.
For every op and shape the loop checks each provider's outputs and gradients against the
reference (ours, or eager where ours cannot run), then times each mode with rotated inputs and
records the peak memory.

A provider function may carry a ``context`` attribute (a context-manager factory): every step of it
that the loop checks or times (forward, backward, both) runs inside that context (see
:func:`_steps_in`), e.g. ``ours-deterministic``'s deterministic algorithms, which its backward reads.
A provider may also carry a ``layout`` (``varlen_attention``'s padded batches):
``layout(*args, **kwargs) -> (its args, its kwargs, restore)``; its inputs are converted to it
before any timing, and its outputs and gradients are checked back in the op's own layout (see
:func:`_in_own_layout`, :func:`_check_run`).  A provider that computes in another number format (a
third party's quantised weights) may carry a ``tolerance``, the largest relative difference from
the reference its check accepts instead of :data:`TOLERANCE`.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama_kernels.ops.registry import MODEL_SHAPES, SAMPLES, SampleCase, dtype_name
from llama_kernels.oracle import as_tuple, leaf

from ..common import (Missing, Record, Settings, Skipped, bench, classify, cycling, free_memory, nbytes,
                      peak_memory, rotation, say)

TRAIN_MODES = ("forward", "backward", "forward+backward")

# The model shapes op sizes come from: the registry's (their transformers configs), as the short
# dims op inputs are built from (hidden, intermediate, hq, hk, d, vocab, rope_theta, eps).  "smoke"
# is for CPU runs (its vocabulary is odd, a multiple of no block size, so the tails run too).
MODELS = {name: shape.dims() for name, shape in MODEL_SHAPES.items()}

# Token counts (batch 1) per run mode; decode's are KV-cache lengths.  fp16 runs once per op, at
# `fp16_at` tokens on the op's first shape: it takes the same kernels as bf16, so one point shows
# whether it differs.  varlen's are the tokens of a packed batch (see registry.varlen_lengths); lce's
# those of the LM head and its loss (linear_cross_entropy: a training batch's 4k to 16k tokens).
SWEEPS = {
    "full": dict(tokens=(1024, 2048, 4096, 8192, 16384, 32768), decode=(1024, 4096, 16384, 32768),
                 varlen=(4096, 8192, 16384, 32768), lce=(4096, 8192, 16384), fp16_at=4096),
    "quick": dict(tokens=(2048, 8192), decode=(4096, 32768), varlen=(8192, 16384), lce=(4096, 8192),
                  fp16_at=None),
    "smoke": dict(tokens=(16, 32), decode=(32, 64), varlen=(40,), lce=(16, 40), fp16_at=16),
}
# Largest max|a - b| / max|ref| accepted between two providers: a few roundings of the dtype (bf16
# keeps 8 bits, fp16 11), loose enough for eager attention's bf16 scores, far below a wrong result.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


@dataclass
class Case:
    """One shape an op runs at: the model's dims, the token count, the dtype and the device."""

    shape: str
    dims: dict
    tokens: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class Inputs:
    """What one call of every provider takes, ``fn(*args, **kwargs)``, and the tensors whose
    gradients the check compares."""

    args: tuple  # what every provider is called with, positionally
    leaves: tuple = ()  # the tensors gradients are taken for (autograd leaves among args)
    kwargs: dict = field(default_factory=dict)  # and by keyword


@dataclass
class OpSpec:
    """One op of the benchmark: its registry sample, its work per call, its providers and what they are."""

    name: str  # the records' op label
    sample: str  # the registry sample (registry.SAMPLES) that builds its inputs and names its kernel and twin
    work: Callable  # (case, mode) -> (amount, "B" | "FLOP") per call
    dims: Callable  # model dims -> the ones this op depends on (for the record)
    shapes: tuple  # model shapes of the full sweep (quick runs the first only)
    extra: dict = field(default_factory=dict)  # more providers: name -> factory() -> function
    modes: tuple = TRAIN_MODES
    note: str = ""
    sweep: str = "tokens"  # which token counts of SWEEPS[mode] the op runs at
    base: tuple = ("ours", "eager", "torch.compile")  # the providers every op has, unless it says otherwise
    case_dims: Callable | None = None  # case -> more dims for its records (e.g. varlen's lengths)
    memory_vs: str | None = None  # a provider whose peak memory ours' is given as a ratio of (see run_case)
    provider_notes: dict = field(default_factory=dict)  # what this op's `extra` providers are, for the report
    # Cases and inputs of an op that is not swept over model shapes x token counts (quantized.py):
    # case_list(settings) -> its Cases (instead of cases()); inputs(case, seed, grad) -> Inputs
    # (instead of the registry sample's build).  The sample still names the kernel and the twin.
    case_list: Callable | None = None
    inputs: Callable | None = None
    finish: Callable | None = None  # (one case's records, limits) -> None: derived figures into their extra


# ---------------------------------------------------------------------------------------------
# Inputs, and helpers of the op files
# ---------------------------------------------------------------------------------------------
def build_inputs(spec: OpSpec, case: Case, seed: int, grad: bool) -> Inputs:
    """The inputs of one call of ``spec`` at ``case``: its registry sample built at the case's shape
    (batch 1) from ``seed``; with ``grad``, the arguments the sample differentiates made leaves that
    keep their strides (``llama_kernels.oracle.leaf``: q/k/v stay transposed views' layouts).
    An op with its own ``inputs`` builds them there."""
    if spec.inputs is not None:
        return spec.inputs(case, seed, grad)
    generator = torch.Generator(device=case.device).manual_seed(seed)
    sample = SAMPLES[spec.sample].build(SampleCase(case.dims, 1, case.tokens, case.dtype, case.device, generator))
    args = list(sample.args)
    if grad:
        for i in sample.grad:
            args[i] = leaf(args[i])
    leaves = tuple(args[i] for i in sample.grad) if grad else ()
    return Inputs(tuple(args), leaves, dict(sample.kwargs))


def head_dims(model: dict) -> dict:
    """The dims of an attention-shaped op's records: query and key/value heads and the head dim."""
    return {k: model[k] for k in ("hq", "hk", "d")}


def by_mode(mode: str, fwd, bwd):
    """The work of ``mode`` from the forward's and the backward's."""
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def element_size(case: Case) -> int:
    """Bytes per element of the case's dtype."""
    return torch.finfo(case.dtype).bits // 8


def liger_provider(attr: str, adapt: Callable, note: str = ""):
    """Factory of a Liger-Kernel provider: ``adapt(liger_kernel.<module>.<name>)``, ``attr`` the
    dotted path of that function.  The factory's ``liger_function`` (the name) goes into the
    report's note of the ``liger`` provider (:func:`provider_notes`)."""

    def factory():
        module_name, name = attr.rsplit(".", 1)
        try:
            fn = adapt(getattr(importlib.import_module(module_name), name))
        except Exception as exc:
            raise Missing(f"liger_kernel not importable ({type(exc).__name__}: {exc}); "
                          "benchmarks/README.md says how to carry its wheel") from None
        fn.note = note or None
        return fn

    factory.liger_function = attr.rsplit(".", 1)[1]
    return factory


def provider_notes(specs) -> dict:
    """What each provider of ``specs`` is, for the report's provider list: ours and its variants,
    eager and torch.compile, Liger (the functions the op files name), then the others, in op order."""
    contributed: dict = {}
    for spec in specs:
        contributed.update(spec.provider_notes)
    liger = [f.liger_function for spec in specs for f in spec.extra.values()
             if hasattr(f, "liger_function")]
    notes = {"ours": "llama_kernels (Triton)"}
    notes.update({name: note for name, note in contributed.items() if name.startswith("ours-")})
    notes.update({
        "eager": "llama_kernels.reference: the eager PyTorch twin of each op",
        "torch.compile": "torch.compile (default mode) of the eager op; compile time is not timed; op runs "
                         "compile backwards with torch._functorch.config.donated_buffer=False so that a "
                         "backward can be timed alone (retain_graph)",
    })
    if liger:
        notes["liger"] = f"Liger-Kernel's Triton ops ({', '.join(dict.fromkeys(liger))})"
    notes.update({name: note for name, note in contributed.items() if name not in notes})
    return notes


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def providers(spec: OpSpec, settings: Settings) -> dict:
    """name -> factory of the function every provider of ``spec`` is called through."""

    sample = SAMPLES[spec.sample]

    def ours():
        try:
            return sample.kernel()
        except Exception as exc:  # an op module not written yet, or broken
            raise Missing(f"llama_kernels.{sample.op} not importable: {type(exc).__name__}: {exc}") from None

    def compiled():
        if not settings.compile:
            raise Skipped("torch.compile providers are off (--no-compile, or --smoke where inductor's CPU "
                          "compile takes ~20 s per graph; --compile turns them on)")
        if spec.name not in _COMPILED:  # one per op, so dynamo's cache serves every shape of it
            _COMPILED[spec.name] = torch.compile(_own_code(sample.eager(), spec.name))
        return _COMPILED[spec.name]

    def eager():
        return sample.eager()

    base = {"ours": ours, "eager": eager, "torch.compile": compiled}
    return {**{name: base[name] for name in spec.base}, **spec.extra}


def _own_code(fn: Callable, name: str) -> Callable:
    """A function calling ``fn``, with a code object of its own (named ``name``).  Dynamo caches the
    graphs of a compiled function on the code object it traces: two op benchmarks of one eager
    function (prefill and decode both call the eager attention; the quantised formats all call
    ``reference.quantized_linear``) get separate caches, as separate functions would."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, name, call.__defaults__, call.__closure__)


def cases(spec: OpSpec, settings: Settings):
    """Every :class:`Case` ``spec`` runs at in this run: its shapes (or ``--shapes``) times the
    mode's token counts (or ``--tokens``), in bf16, plus fp16 at one point (``SWEEPS[mode]["fp16_at"]``)."""
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
        args, kwargs, _ = layout(*inputs.args, **inputs.kwargs)
    args = tuple(a.detach().requires_grad_(grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    leaves = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
    return Inputs(args, leaves, kwargs)


def _check_run(fn, build, trains: bool):
    """Outputs and (for training ops) input gradients of one call on input set 0.  A provider with
    a ``layout`` is called through it, and its output restored, under autograd: outputs and
    gradients come in the layout of ``build``'s inputs, comparable with every other provider's."""
    inputs = build(0, trains)
    layout = getattr(fn, "layout", None)
    with _steps_in(fn)():
        with torch.set_grad_enabled(trains):
            if layout is None:
                outs = as_tuple(fn(*inputs.args, **inputs.kwargs))
            else:
                args, kwargs, restore = layout(*inputs.args, **inputs.kwargs)
                outs = as_tuple(restore(fn(*args, **kwargs)))
        grads = list(torch.autograd.grad(outs, inputs.leaves, _cotangents(outs, 7))) if trains else []
    return [o.detach() for o in outs] + grads


def _max_rel_err(got: list, want: list) -> float:
    """max over tensors of max|got - want| / max|want|: inf on a shape mismatch or a non-finite value."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or not torch.isfinite(g).all():
            return float("inf")
        scale = w.float().abs().max().clamp_min(1e-6)
        worst = max(worst, ((g.float() - w.float()).abs().max() / scale).item())
    return worst


def _input_bytes(*values) -> int:
    """Bytes of the tensors among ``values`` and of the parameters and buffers of the modules among
    them (a provider's layout may hand over a built layer: a third party's quantised weight).  A
    tensor subclass counts its logical size (``numel * element_size``), which may exceed its storage:
    then fewer sets are rotated, and ``do_bench``'s L2 flush before each call still holds."""
    tensors = []
    for v in values:
        if isinstance(v, torch.nn.Module):
            tensors += [*v.parameters(), *v.buffers()]
        else:
            tensors.append(v)
    return nbytes(*tensors)


def _timed_call(fn, build, mode: str, trains: bool, settings: Settings):
    """(call, sets): a no-argument function doing one ``mode`` step on the next of several input
    sets, rotated so that the sets together exceed the L2.  Each step (and the forward that records
    a backward's graph) runs in the provider's context (:func:`_steps_in`)."""
    steps_in = _steps_in(fn)
    own_build = build

    def build(i, grad):  # in the provider's own layout, converted outside the timing
        return _in_own_layout(fn, own_build(i, grad), grad)

    probe = build(0, trains)
    set_bytes = _input_bytes(*probe.args, *probe.kwargs.values()) * (2 if mode != "forward" else 1)  # + cotangents
    del probe
    if mode == "forward":
        grad_mode = torch.enable_grad if trains else torch.no_grad  # a training forward records the graph

        def call(inp):
            with grad_mode(), steps_in():
                return fn(*inp.args, **inp.kwargs)

        return cycling(rotation(lambda i: build(i, trains), set_bytes, settings), call), None

    def make(i):
        inp = build(i, True)
        with steps_in():
            outs = as_tuple(fn(*inp.args, **inp.kwargs))  # the graph is recorded once per set, kept for `backward`
        cots = _cotangents(outs, 100 + i)  # laid out like this provider's outputs
        return inp, (outs if mode == "backward" else None), cots

    def backward(s):
        with steps_in():
            return torch.autograd.grad(s[1], s[0].leaves, s[2], retain_graph=True)

    def forward_backward(s):
        with steps_in():
            return torch.autograd.grad(as_tuple(fn(*s[0].args, **s[0].kwargs)), s[0].leaves, s[2])

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
    """Check, then time, every provider of ``spec`` at ``case``; one record per provider and mode
    into ``records`` (a provider that failed or disagrees is recorded with why, and not timed)."""
    trains = spec.modes != ("forward",)
    first = len(records)  # this case's records are records[first:]
    dtype = dtype_name(case.dtype)

    def build(i, grad):
        return build_inputs(spec, case, 1000 + i, grad)

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
        tolerance = getattr(fn, "tolerance", None) or TOLERANCE[case.dtype]
        if err is not None and not err <= tolerance:
            reason = f"max|out - {reference_name}| / max|{reference_name}| = {err:.3g} > {tolerance}"
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
    if spec.finish is not None:
        spec.finish(records[first:], limits)


def run(specs, settings: Settings, limits: dict, records: list, progress=None) -> None:
    """Measure every op of ``specs`` (those of ``settings.ops``, when given) at every case into ``records``.

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
        for spec in specs:
            if settings.ops and spec.name not in settings.ops:
                continue
            for case in (spec.case_list(settings) if spec.case_list else cases(spec, settings)):
                run_case(spec, case, settings, limits, records)
            if progress is not None:
                progress(f"ops {spec.name}")
