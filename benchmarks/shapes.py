"""The sizes every benchmark runs at, each written once: real models' configs and packed batches.

The configs are transformers config fields (the package's reference ``LlamaConfig`` takes the
same names), with the real model's layer count; a benchmark that runs fewer layers sets its own.
Their keys keep one order (the memory benchmark lists them in that order), and each benchmark
that needs a variant (another context length, no RoPE scaling, a few fields only) derives it here
or in its own module from these, so that no benchmark holds a second copy of a model.
"""
from __future__ import annotations

import torch

# LLaMA-3-8B with LLaMA-3.1's context length (131072 positions; Meta-Llama-3-8B's config.json has
# 8192), without 3.1's RoPE scaling.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=131072)
# LLaMA-2-7B: the op benchmark takes its MLP width and vocabulary (multi-head attention, Hk = Hq).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
# meta-llama/Llama-3.2-1B's config.json: head dim 64, tied embeddings, LLaMA-3's RoPE scaling.
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  max_position_embeddings=131072, tie_word_embeddings=True)
# SmolLM2-135M: the small model the project's demos run.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3)
# Qwen/Qwen3-8B's config.json (q/k RMSNorm per head; head dim 128 given, as hidden / heads).
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=40960, tie_word_embeddings=False)
# google/gemma-2-9b's config.json: alternating local (sliding-window 4096) and global attention,
# soft-capped attention (50) and final (30) logits, head dim 256 (not hidden / heads = 224), tied
# LM head.
GEMMA2_9B = dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True)
# A tiny LLaMA for CPU (smoke) runs of the model benchmark; the op benchmark's smoke shape is its
# dims with an odd vocabulary.
SMOKE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096)


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


def varlen_lengths(total: int) -> list[int]:
    """Uneven sequence lengths that sum to ``total`` (a packed batch of ``total`` tokens): drawn
    uniformly from ``[total // 32, total // 4]`` with the seed ``total`` (the same every run and
    every provider), the last one cut to fit.  8192 tokens give about 7 sequences of 256 to 2048."""
    lo = max(1, total // 32)
    hi = max(lo, total // 4)
    gen = torch.Generator().manual_seed(total)
    lengths, left = [], total
    while left > 0:
        lengths.append(min(left, int(torch.randint(lo, hi + 1, (1,), generator=gen))))
        left -= lengths[-1]
    return lengths
