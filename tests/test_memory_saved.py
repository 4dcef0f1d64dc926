"""The memory the patched model keeps, guarded on fake tensors (exact, no compute, any size).

* the bytes per token one patched decoder layer keeps for the backward equal a count by hand (its
  norms' inputs and ``rstd``, q/k/v/o, the attention's float32 row stats, the RoPE tables, the
  MLP's input, gate and up) and are below transformers' SDPA layer's;
* with the long-context options no whole ``tokens x intermediate`` tensor, and with the fused
  loss no ``tokens x vocab`` tensor, is ever made in a training step at LLaMA-3-8B's shapes (the
  unpatched and the plain patched models, which make them, are the controls).
"""
import dataclasses
import inspect
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import bench_memory as bm
from benchmarks.memory_saved import saved_bytes
from helpers import OpOutputs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

TOKENS = 512
SHAPE = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_attention_heads=6,
             num_key_value_heads=2, num_hidden_layers=1)


def layer_bytes_per_token(family, patched, **overrides):
    """Bytes per token one bf16 decoder layer saves for its backward (parameters excluded)."""
    import llama_kernels as lk

    config_name, model_name = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[family]
    with FakeTensorMode(allow_non_fake_inputs=True), bm._default_dtype(torch.bfloat16):
        config = getattr(transformers, config_name)(**{**SHAPE, **overrides})
        config._attn_implementation = "sdpa"
        model = getattr(transformers, model_name)(config).train()
        if patched:
            lk.apply_kernels(model)
        layer, positions = model.model.layers[0], torch.arange(TOKENS)[None]

        def x():
            return torch.randn(1, TOKENS, config.hidden_size, requires_grad=True)
        rotary = model.model.rotary_emb(x(), positions)
        saved = saved_bytes(lambda: layer(x(), position_embeddings=rotary, attention_mask=None,
                                          position_ids=positions), list(model.parameters()))
    assert saved % TOKENS == 0
    return saved // TOKENS


@pytest.mark.parametrize("family,head_dim", [("llama", 16), ("qwen3", 32)])
def test_a_patched_decoder_layer_keeps_what_its_backward_needs_and_no_more(family, head_dim):
    h, i, hq, hk, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], 6, 2, head_dim
    bf16, f32 = 2, 4
    norm = bf16 * h + f32  # an RMSNorm: its input and rstd
    attention = (bf16 * h  # the normed input of the q/k/v projections
                 + bf16 * (hq * d + 2 * hk * d)  # q, k, v after RoPE (RoPE itself keeps nothing more)
                 + bf16 * hq * d  # o (the o projection's input too)
                 + 2 * f32 * hq  # the attention's row max and row sum, float32
                 + 2 * bf16 * d)  # the RoPE tables (shared by every layer)
    if family == "qwen3":  # q_norm and k_norm: their inputs and rstd, per head
        attention += bf16 * (hq + hk) * d + f32 * (hq + hk)
    mlp = bf16 * h + 2 * bf16 * i  # its input, gate and up (act(gate) * up is recomputed)
    overrides = {"head_dim": d}
    ours = layer_bytes_per_token(family, True, **overrides)
    assert ours == 2 * norm + attention + mlp
    assert ours < layer_bytes_per_token(family, False, **overrides)


def most_rows(outputs, width):
    """The most rows (elements / ``width``) of any recorded output whose first or last dimension
    is ``width``."""
    return max((math.prod(shape) // width for _, shape, _ in outputs
                if shape and width in (shape[0], shape[-1])), default=0)


@pytest.mark.parametrize("mode", ["full", "full+ckpt", "lora+ckpt"])
def test_long_context_options_make_no_tokens_by_intermediate_or_vocab_tensor(mode):
    spec = bm.MODELS["llama3-8b"]
    spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": 1})
    tokens = 2 * bm.CHUNK_TOKENS
    inter, vocab = spec.config["intermediate_size"], spec.config["vocab_size"]
    rows = {}
    for provider in ("hf-sdpa", "hf+ours", "hf+ours+long"):
        with FakeTensorMode(allow_non_fake_inputs=True), bm._one_sequence_masks():
            model, loss_fn, _ = bm.build(spec, mode, provider, "cpu", offload_device="meta")
            ids = torch.zeros((1, tokens), dtype=torch.long)
            with OpOutputs() as outputs:
                loss_fn(model, ids).backward()
        rows[provider] = {w: most_rows(outputs.seen, w) for w in (inter, 2 * inter, vocab)}
    # The controls make them: transformers the logits, the plain patched model gate and up.
    assert rows["hf-sdpa"][vocab] >= tokens and rows["hf+ours"][inter] >= tokens
    # The fused loss never makes logits of every token; the chunked MLP at most a chunk of rows
    # (the weights' gradients, hidden x intermediate, are below `tokens` rows: hidden < tokens).
    assert rows["hf+ours"][vocab] < tokens and rows["hf+ours+long"][vocab] < tokens
    assert max(rows["hf+ours+long"][inter], rows["hf+ours+long"][2 * inter]) <= max(
        bm.CHUNK_TOKENS, spec.config["hidden_size"])


@pytest.mark.parametrize("cache_len", [1000, 3000])
def test_a_decode_step_grows_nothing_but_the_kv_cache(cache_len):
    """One generated token after ``cache_len`` cached ones: the only tensors with a dimension of
    ``cache_len`` or more are the cache's own keys and values, one more slot each, in the model's dtype (no
    float32 scores, no key/value heads repeated to the query heads).  Eager attention, which
    makes both, is the control."""
    import llama_kernels as lk

    seen = {}
    for provider in ("eager", "ours"):
        with FakeTensorMode(allow_non_fake_inputs=True), bm._default_dtype(torch.bfloat16):
            config = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": 2, "head_dim": 16},
                                              max_position_embeddings=8192)
            config._attn_implementation = "eager" if provider == "eager" else "sdpa"
            model = transformers.LlamaForCausalLM(config).eval()
            if provider == "ours":
                lk.apply_kernels(model)
            ids = torch.zeros((1, cache_len), dtype=torch.long)
            # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            with torch.no_grad():
                cache = model(ids, use_cache=True).past_key_values
                with OpOutputs() as outputs:
                    model(ids[:, -1:], use_cache=True, **{name: cache})
        seen[provider] = [o for o in outputs.seen if o[1] and max(o[1]) >= cache_len]
    cache_slots = (1, SHAPE["num_key_value_heads"], cache_len + 1, 16)
    assert seen["ours"] and all(shape == cache_slots and dtype == torch.bfloat16 and op == "aten.cat.default"
                                for op, shape, dtype in seen["ours"]), seen["ours"]
    assert len(seen["ours"]) == 2 * 2  # keys and values of both layers
    assert any(dtype == torch.float32 or shape[1:2] == (SHAPE["num_attention_heads"],)
               for _, shape, dtype in seen["eager"]), seen["eager"]
