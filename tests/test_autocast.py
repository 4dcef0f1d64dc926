"""Mixed precision: under ``torch.autocast`` a patched model gives what the eager model gives.

The usual training setup keeps float32 weights and runs the matmuls in bfloat16 under autocast,
so the ops see mixed dtypes (a bfloat16 attention output added to the float32 residual stream,
float32 RoPE tables with bfloat16 q/k, a float32 KV cache with bfloat16 queries).  Each patched
model must run there, return eager's dtypes, and stay within the 2x rule against a float64 model
(the error eager itself makes under the same autocast), forward and backward, also compiled.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels.model import Llama, LlamaConfig
from llama_kernels.ops.common import LAUNCHES
from helpers import assert_like_eager, launched_flags

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
FAMILIES = ("rms_norm", "swiglu", "rope", "attention")  # the flags whose kernels run in a forward


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def logits_and_grads(model, ids, device, mixed=True, call=None):
    """Logits and parameter gradients of the next-token loss, under bf16 autocast when ``mixed``."""
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
        logits = (model if call is None else call)(ids)
        logits = getattr(logits, "logits", logits)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_patched_like_eager(model, patched, ids, device, call=None):
    """``patched`` under autocast: eager's dtypes, and logits and gradients within 2x of eager's
    error against the float64 model."""
    oracle_logits, oracle_grads = logits_and_grads(copy.deepcopy(model).double(), ids, device, mixed=False)
    eager_logits, eager_grads = logits_and_grads(model, ids, device)
    LAUNCHES.clear()
    logits, grads = logits_and_grads(patched, ids, device, call=call)
    assert_like_eager("logits", logits, oracle_logits, eager_logits)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert_like_eager(f"grad of {name}", grads[name], oracle_grads[name], eager_grads[name])
    assert launched_flags() >= set(FAMILIES), dict(LAUNCHES)


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    return Llama(CONFIG).to(device)


def test_reference_model_under_autocast(model, device):
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 21), device=device)
    assert_patched_like_eager(model, patched, ids, device)


def test_reference_model_decodes_under_autocast(model, device):
    """A cached decode step reads the float32 KV cache with bfloat16 queries; generate runs."""
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), device=device)

    def last_step(m):
        cache = m.new_cache(2, 12)
        with torch.no_grad(), autocast(device):
            m(ids[:, :-1], cache, 0)
            return m(ids[:, -1:], cache, 11)

    oracle = last_step(copy.deepcopy(model).double())
    eager, out = last_step(model), last_step(patched)
    assert_like_eager("decode-step logits", out, oracle, eager)
    with autocast(device):
        assert patched.generate(ids[:, :4], 5).shape == (2, 9)


def test_reference_model_compiled_under_autocast(model, device):
    torch._dynamo.reset()
    patched = lk.apply_kernels(copy.deepcopy(model))
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), device=device)
    try:
        assert_patched_like_eager(model, patched, ids, device, call=compiled)
    finally:
        torch._dynamo.reset()


def test_transformers_model_under_autocast(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=120, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(1, 120, (2, 19), device=device)
    assert_patched_like_eager(model, patched, ids, device)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with autocast(device):
        assert patched.generate(ids[:, :5], **greedy).shape == (2, 9)
