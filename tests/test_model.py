"""The eager reference LLaMA: shapes, KV-cache generation, configs, loading transformers weights."""
import pytest
import torch

from llama_kernels.model import Llama, LlamaConfig, rope_inv_freq, sample

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**TINY, **overrides})).eval()


def test_forward_shape_and_dtype():
    model = tiny_model()
    ids = torch.randint(0, 101, (3, 9))
    logits = model(ids)
    assert logits.shape == (3, 9, 101) and logits.dtype == torch.float32
    assert model.to(torch.bfloat16)(ids).dtype == torch.bfloat16


def test_kv_cache_generation_equals_recomputing_everything():
    model = tiny_model()
    ids = torch.randint(0, 101, (2, 7))
    generated = model.generate(ids, max_new_tokens=6)
    x = ids
    for _ in range(6):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, x)


def test_sampling_is_reproducible_and_top_k_restricts():
    model = tiny_model()
    ids = torch.randint(0, 101, (1, 5))
    runs = [model.generate(ids, 5, temperature=0.8, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    logits = torch.randn(4, 101)
    top1 = sample(logits, temperature=1.0, top_k=1)
    assert torch.equal(top1, logits.argmax(-1, keepdim=True))


def test_tied_embeddings_share_the_weight():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_config_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model()(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache"):
        model = tiny_model()
        model(torch.zeros(1, 4, dtype=torch.long), model.new_cache(1, 3))


def test_rotary_frequencies_stay_float32_after_casting():
    model = tiny_model().to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(model.config), rtol=0, atol=0)


transformers = pytest.importorskip("transformers")


def tiny_hf_model(**overrides):
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
])
def test_from_hf_matches_transformers_logits(overrides, tmp_path):
    hf = tiny_hf_model(**overrides)
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(Llama.from_hf(hf)(ids), expected, rtol=1e-5, atol=1e-5)
        hf.save_pretrained(tmp_path)  # config.json + model.safetensors
        torch.testing.assert_close(Llama.from_hf(tmp_path)(ids), expected, rtol=1e-5, atol=1e-5)


def test_from_hf_rejects_unknown_rope_scaling():
    hf = tiny_hf_model(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        Llama.from_hf(hf)


# Checkpoints whose parameter names match LLaMA's but whose math differs: each must be refused,
# naming what differs, rather than load and silently compute something else.
OTHER_MATH = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}, "model_type is 'gemma'"),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {"embedding_multiplier": 12.0, "residual_multiplier": 0.2, "logits_scaling": 4.0}, "multiplier"),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, "sliding_window is 4"),
    "llama_gelu": ("LlamaConfig", "LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    "llama_attention_bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True}, "attention_bias"),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}, "model_type is 'helium'"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                {"num_hidden_layers": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                "no_rope_layers"),
}


@pytest.mark.parametrize("family", OTHER_MATH)
def test_from_hf_refuses_other_math(family, tmp_path):
    config_class, model_class, overrides, reason = OTHER_MATH[family]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(config).eval()
    with pytest.raises(ValueError, match=reason):
        Llama.from_hf(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=reason):
        Llama.from_hf(tmp_path)


def test_from_hf_loads_mistral_without_sliding_window():
    """Mistral without a sliding window is LLaMA's math: it loads and gives transformers' logits."""
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=None)).eval()
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_hf(hf)(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, error, match", [
    ({"num_attention_heads": 0}, ValueError, "num_attention_heads must be >= 1"),
    ({"num_key_value_heads": 0}, ValueError, "num_key_value_heads must be >= 1"),
    ({"hidden_size": 62}, ValueError, "hidden_size \\(62\\) must be a multiple of num_attention_heads"),
    ({"vocab_size": 10.5}, TypeError, "vocab_size must be an int"),
    ({"rms_norm_eps": float("nan")}, ValueError, "rms_norm_eps"),
    ({"rope_theta": 0.0}, ValueError, "rope_theta"),
    ({"head_dim": 15}, ValueError, "head_dim must be even"),
])
def test_config_refuses_bad_values(overrides, error, match):
    with pytest.raises(error, match=match):
        LlamaConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("prompt, kwargs, error, match", [
    (torch.zeros(5, dtype=torch.long), {}, ValueError, "input_ids must have shape \\(batch, seq_len\\)"),
    (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "input_ids must hold at least one"),
    (torch.zeros(0, 4, dtype=torch.long), {}, ValueError, "input_ids must hold at least one"),
    (torch.zeros(1, 4), {}, TypeError, "input_ids must be an integer tensor"),
    (torch.zeros(1, 4, dtype=torch.long), {"temperature": 1.0, "top_k": 0}, ValueError, "top_k must be >= 1"),
    (torch.zeros(1, 4, dtype=torch.long), {"temperature": float("inf")}, ValueError, "temperature"),
    (torch.zeros(1, 4, dtype=torch.long), {"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int"),
])
def test_generate_refuses_bad_arguments(prompt, kwargs, error, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        tiny_model().generate(prompt, **kwargs)
