"""The model families of transformers that the kernels patch: the one declaration of them.

The patch rows (:mod:`.rows`), the tests (a tiny random model of every family) and the benchmarks
read the families from :data:`FAMILIES`, so a family is added or changed here alone.  Nothing here
imports torch or transformers: :func:`modeling_modules` imports transformers' modules when asked.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

# The sliding window of the tiny test models' sliding-window layers: shorter than every input the
# tests give them, so that those layers really slide (a window longer than the input is plain causal
# attention, which would hide a kernel that ignores the window).
TINY_SLIDING_WINDOW = 5


@dataclass(frozen=True)
class Family:
    """One model family: ``transformers.models.<module>.modeling_<module>`` and its classes, named
    ``<prefix>RMSNorm``, ``<prefix>MLP``, ``<prefix>Attention`` and ``<prefix>ForCausalLM``."""

    key: str  # the short name tests and benchmarks use ("gemma2")
    name: str  # as the README names it ("Gemma 2")
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # of the modeling module's class names
    gemma_norm: bool = False  # RMSNorm scales by (1 + weight) in float32 and rounds once
    fused_mlp: bool = False  # one gate_up_proj matmul, chunked (Phi-3)
    config_override: Optional[str] = None  # transformers' config class, where it is not <prefix>Config
    # The config options that switch the family's own features on in a tiny model (sliding windows,
    # soft-capping, partial rotary, layer types): what the tests build every family with.
    features: dict = field(default_factory=dict, hash=False)
    model_shape: Optional[str] = None  # the real model the benchmarks measure (its shape lives there)
    liger: Optional[str] = None  # liger_kernel.transformers' function patching this family

    @property
    def config_class(self) -> str:
        """The name of the family's config class in ``transformers`` (Gemma 3's text model has its own)."""
        return self.config_override or f"{self.prefix}Config"

    @property
    def causal_lm_class(self) -> str:
        """The name of the family's causal LM class in ``transformers``."""
        return f"{self.prefix}ForCausalLM"

    @property
    def modeling_module(self) -> str:
        """The dotted name of transformers' modeling module of the family."""
        return f"transformers.models.{self.module}.modeling_{self.module}"


def _local_then_global() -> list:
    """Gemma 2/3's layer types in a tiny model of two layers: one sliding-window, one global."""
    return ["sliding_attention", "full_attention"]


# Qwen2/3 slide from layer max_window_layers on: with 1, the tiny model's second layer.
_QWEN_WINDOW = {"use_sliding_window": True, "sliding_window": TINY_SLIDING_WINDOW, "max_window_layers": 1}

FAMILIES: dict[str, Family] = {family.key: family for family in (
    Family("llama", "LLaMA", "llama", "Llama", model_shape="llama3-8b", liger="apply_liger_kernel_to_llama"),
    Family("mistral", "Mistral", "mistral", "Mistral", features={"sliding_window": TINY_SLIDING_WINDOW},
           liger="apply_liger_kernel_to_mistral"),
    Family("qwen2", "Qwen2", "qwen2", "Qwen2", features=dict(_QWEN_WINDOW), liger="apply_liger_kernel_to_qwen2"),
    Family("qwen3", "Qwen3", "qwen3", "Qwen3", features=dict(_QWEN_WINDOW), model_shape="qwen3-8b",
           liger="apply_liger_kernel_to_qwen3"),
    Family("gemma", "Gemma", "gemma", "Gemma", gemma_norm=True, liger="apply_liger_kernel_to_gemma"),
    Family("gemma2", "Gemma 2", "gemma2", "Gemma2", gemma_norm=True,
           features={"sliding_window": TINY_SLIDING_WINDOW, "attn_logit_softcapping": 2.0,
                     "final_logit_softcapping": None, "query_pre_attn_scalar": 16,
                     "layer_types": _local_then_global()},
           model_shape="gemma2-9b", liger="apply_liger_kernel_to_gemma2"),
    Family("gemma3", "Gemma 3", "gemma3", "Gemma3", gemma_norm=True, config_override="Gemma3TextConfig",
           features={"sliding_window": TINY_SLIDING_WINDOW, "query_pre_attn_scalar": 16,
                     "layer_types": _local_then_global()},
           liger="apply_liger_kernel_to_gemma3_text"),
    Family("phi3", "Phi-3", "phi3", "Phi3", fused_mlp=True, features={"partial_rotary_factor": 0.5},
           liger="apply_liger_kernel_to_phi3"),
)}


def modeling_modules() -> dict:
    """``{family: transformers' modeling module}`` for the families this transformers has."""
    modules = {}
    for family in FAMILIES.values():
        try:
            modules[family] = importlib.import_module(family.modeling_module)
        except ImportError:
            continue
    return modules


def family_names() -> str:
    """The families' names, as error messages list them: ``"LLaMA, Mistral, ..., Phi-3"``."""
    return ", ".join(family.name for family in FAMILIES.values())
