"""torch.compile(fullgraph=True): the patched model and every public op trace into one graph.

Each kernel launcher is a ``torch.library`` custom op (``common.compilable``), so Dynamo sees one
opaque node per launch and AOTAutograd traces the backward through the ops' autograd.Functions.
``aot_eager`` runs those graphs op by op (the backward included); ``inductor`` also fuses the ops
around the kernels.  A compiled call must launch the same kernels and give what the uncompiled
patched model gives.
"""
import copy
import shutil

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import llama_kernels as lk
from llama_kernels.model import Llama, LlamaConfig
from llama_kernels.ops import common
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.ops.attention import flash_decode
from llama_kernels.quantize import quantize_weight
from helpers import leaf, max_error

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def compiled(fn, backend):
    """``fn`` under ``torch.compile(fullgraph=True)`` (any graph break raises), and its counter."""
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def assert_graphs(counter, expected=1):
    assert counter.frame_count == expected, f"{counter.frame_count} graphs, expected {expected}"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def _relative(a, b):
    return max_error(a, b) / b.abs().max().item()


def loss_and_grads(model, ids, call=None):
    """Logits and parameter gradients of ``model``'s next-token loss, run through ``call``
    (``model`` itself, or its compiled wrapper)."""
    model.zero_grad()
    logits = (model if call is None else call)(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        not torch.cuda.is_available() and not HAS_CXX, reason="inductor on the CPU needs a C++ compiler")),
])
def test_patched_model_compiles_to_one_graph(backend, device):
    """Forward and backward of the patched model in one graph each; the same logits and gradients
    as the uncompiled patched model (inductor may reorder the float32 ops around the kernels)."""
    model = lk.apply_kernels(Llama(CONFIG).to(device))
    twin = copy.deepcopy(model)
    compiled_model, counter = compiled(twin, backend)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), device=device)
    LAUNCHES.clear()
    logits, grads = loss_and_grads(twin, ids, compiled_model)
    launched = dict(LAUNCHES)
    assert_graphs(counter)
    for kernel in ("rms_norm_fwd", "rms_norm_bwd", "glu_fwd", "glu_bwd", "rope",
                   "attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"):
        assert launched.get(f"{kernel}_kernel"), f"{kernel} did not launch: {launched}"
    expected_logits, expected_grads = loss_and_grads(model, ids)
    assert _relative(logits, expected_logits) <= 1e-5
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert _relative(grads[name], expected_grads[name]) <= 1e-5, name
    if backend == "aot_eager":  # a new length recompiles once, with dynamic shapes, still whole
        ids = torch.randint(0, CONFIG.vocab_size, (2, 7), device=device)
        logits, _ = loss_and_grads(twin, ids, compiled_model)
        assert_graphs(counter, expected=2)
        assert _relative(logits, loss_and_grads(model, ids)[0]) <= 1e-5


def _op_cases(device):
    """name -> (public op call, inputs, differentiable)."""
    def randn(*shape):
        return torch.randn(*shape, device=device)

    x, residual, weight = randn(2, 5, 64), randn(2, 5, 64), randn(64)
    gate_up = randn(2, 5, 128)
    q, k, v = randn(2, 4, 5, 32), randn(2, 2, 5, 32), randn(2, 2, 5, 32)
    cos, sin = randn(5, 32), randn(5, 32)
    k_cache, v_cache = randn(2, 2, 40, 32), randn(2, 2, 40, 32)
    lengths = torch.tensor([3, 40], dtype=torch.int32, device=device)
    int4 = quantize_weight(randn(48, 64), bits=4, group_size=32)
    return {
        "rms_norm": (lambda x, w: lk.rms_norm(x, w, 1e-5), [x, weight], True),
        "rms_norm_residual": (lambda x, w, r: lk.rms_norm(x, w, 1e-5, residual=r), [x, weight, residual], True),
        "swiglu_halves": (lambda gu: lk.swiglu(*gu.chunk(2, -1)), [gate_up], True),
        "apply_rotary": (lambda q, k: lk.apply_rotary(q, k, cos, sin), [q, k], True),
        "apply_rotary_interleaved": (lambda q, k: lk.apply_rotary(q, k, cos, sin, interleaved=True), [q, k], True),
        "flash_attention": (lambda q, k, v: lk.flash_attention(q, k, v), [q, k, v], True),
        "flash_attention_decode_path": (lambda q, k, v: lk.flash_attention(q[:, :, -1:], k, v), [q, k, v], False),
        "flash_decode": (lambda q: flash_decode(q[:, :, -1:], k_cache, v_cache, lengths), [q], False),
        "quantized_linear": (lambda x: lk.quantized_linear(x, int4.qweight, int4.scales, int4.zeros, bits=4,
                                                           group_size=32), [x], True),
    }


OPS = list(_op_cases("cpu"))


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", OPS)
def test_public_op_compiles_to_one_graph(name, device):
    """Each public op alone: one graph, its kernels launched, the eager op's values bit for bit
    (the compiled graph calls the very same launchers), and its gradients too."""
    fn, inputs, differentiable = _op_cases(device)[name]
    compiled_fn, counter = compiled(fn, "aot_eager")
    eager_in = [leaf(t) if differentiable else t for t in inputs]
    compiled_in = [leaf(t) if differentiable else t for t in inputs]
    with torch.set_grad_enabled(differentiable):
        LAUNCHES.clear()
        out = _outputs(compiled_fn(*compiled_in))
        assert LAUNCHES, "no kernel launched"
        expected = _outputs(fn(*eager_in))
    assert_graphs(counter)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    if differentiable:
        cotangents = [torch.randn_like(o) for o in out]
        grads = torch.autograd.grad(out, compiled_in, cotangents)
        expected_grads = torch.autograd.grad(expected, eager_in, cotangents)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.filterwarnings("ignore::llama_kernels.ops.common.KernelFallbackWarning")
def test_fallback_compiles_to_one_graph(monkeypatch):
    """Where no Triton kernel can run (CPU without the interpreter) the ops fall back to their
    eager twins; that must not break the graph either."""
    monkeypatch.setattr(common, "INTERPRET", False)
    model = lk.apply_kernels(Llama(CONFIG))
    ids = torch.randint(0, CONFIG.vocab_size, (1, 6))
    compiled_model, counter = compiled(model, "aot_eager")
    with torch.no_grad():
        out = compiled_model(ids)
    assert_graphs(counter)
    assert _relative(out, model(ids)) <= 1e-5
