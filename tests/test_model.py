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
