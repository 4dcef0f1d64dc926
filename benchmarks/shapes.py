"""The model configs every benchmark takes its sizes from: the op registry's, read in one place.

The real models' configs are ``llama_kernels.ops.registry.MODEL_SHAPES``' (transformers config
fields, which the package's reference ``LlamaConfig`` takes too, all but the layer count, which each
benchmark chooses).  Each name below is a copy of one, so that no benchmark can change another's;
a benchmark that needs a variant (its layer count, another context length, a few fields only)
derives it from these.  LLaMA-3.2-1B, which only the benchmarks run, is declared here.
"""
from __future__ import annotations

from llama_kernels.ops.registry import MODEL_SHAPES


def config(name: str) -> dict:
    """A copy of the transformers config of ``registry.MODEL_SHAPES[name]``."""
    return dict(MODEL_SHAPES[name].config)


# LLaMA-3-8B with LLaMA-3.1's context length (131072 positions; Meta-Llama-3-8B's config.json has
# 8192), without 3.1's RoPE scaling.
LLAMA3_8B = config("llama3-8b")
QWEN3_8B = config("qwen3-8b")
GEMMA2_9B = config("gemma2-9b")
# meta-llama/Llama-3.2-1B's config.json: head dim 64, tied embeddings, LLaMA-3's RoPE scaling (not
# in the registry: only the benchmarks run it).
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  max_position_embeddings=131072, tie_word_embeddings=True)


def fields(config: dict, *names: str) -> dict:
    """The fields ``names`` of ``config``, in that order (a benchmark that sets only a few)."""
    return {name: config[name] for name in names}


def head_dim(config: dict) -> int:
    """The attention head dim: the config's ``head_dim`` if it has one, else hidden / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def linear_params(config: dict) -> int:
    """Parameters of the linear layers, the LM head included, the embedding excluded (a lookup):
    q, o (Hq D each way), k, v (Hk D), gate, up and down per layer, then H x vocab."""
    h, i, d = config["hidden_size"], config["intermediate_size"], head_dim(config)
    attn = h * d * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])  # q, o and k, v
    return config["num_hidden_layers"] * (attn + 3 * h * i) + h * config["vocab_size"]
