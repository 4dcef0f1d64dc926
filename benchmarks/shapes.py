"""The model configs every benchmark takes its sizes from: the op registry's, read in one place.

The real models' configs are ``llama_kernels.ops.registry.MODEL_SHAPES``' (transformers config
fields, which the package's reference ``LlamaConfig`` takes too, all but the layer count, which each
benchmark chooses).  Each name below is a copy of one, so that no benchmark can change another's;
a benchmark that needs a variant (its layer count, another context length, a few fields only)
derives it from these.
"""
from __future__ import annotations

from llama_kernels.ops.registry import MODEL_SHAPES, head_dim  # noqa: F401 (the benchmarks' head_dim)


def config(name: str) -> dict:
    """A copy of the transformers config of ``registry.MODEL_SHAPES[name]``."""
    return dict(MODEL_SHAPES[name].config)


# LLaMA-3-8B with LLaMA-3.1's context length (131072 positions; Meta-Llama-3-8B's config.json has
# 8192), without 3.1's RoPE scaling.
LLAMA3_8B = config("llama3-8b")
QWEN3_8B = config("qwen3-8b")
GEMMA2_9B = config("gemma2-9b")
LLAMA32_1B = config("llama3.2-1b")


def fields(config: dict, *names: str) -> dict:
    """The fields ``names`` of ``config``, in that order (a benchmark that sets only a few)."""
    return {name: config[name] for name in names}


def linear_params(config: dict) -> int:
    """Parameters of the linear layers, the LM head included, the embedding excluded (a lookup):
    q, o (Hq D each way), k, v (Hk D), gate, up and down per layer, then H x vocab."""
    h, i, d = config["hidden_size"], config["intermediate_size"], head_dim(config)
    attn = h * d * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])  # q, o and k, v
    return config["num_hidden_layers"] * (attn + 3 * h * i) + h * config["vocab_size"]
