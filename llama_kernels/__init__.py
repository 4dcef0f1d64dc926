"""llama_kernels: fused Triton kernels for LLaMA-family models.

Public API::

    rms_norm(x, weight, eps=1e-6, residual=None, *, offset=0.0, casting="llama")
                                                    (Gemma: offset=1.0, casting="gemma")
    swiglu(gate, up)
    geglu(gate, up)                                  (gelu_tanh(gate) * up: Gemma's MLP)
    apply_rotary(q, k, cos, sin, interleaved=False)
    flash_attention(q, k, v, causal=True, sm_scale=None, *, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None)             (packed sequences: varlen)
    flash_decode(q, k_cache, v_cache, cache_seqlens, sm_scale=None, *, cache_leftpad=None)
                                                                      (CUDA-graph-safe decode)
    fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0)   (LM head + loss, no logits)
    apply_kernels(model, *, rms_norm=True, swiglu=True, rope=True, attention=True, cross_entropy=True)
    chunked_mlp(model, chunk_tokens=4096)     (long context: MLPs over chunks of tokens, recomputed)
    checkpoint_layers(model, *, offload=True, offload_device="cpu", enabled=True)
                                         (activation checkpointing, inputs kept in host memory)
    offloaded_checkpoint(function, *args, offload_device="cpu", params=None, **kwargs)
    kernel_options(**overrides)          (a context manager: the launchers' runtime switches, e.g.
                                          tma_forward=False; KernelOptions lists them)
    model.Llama, model.LlamaConfig       (the eager reference LLaMA)
    reference                            (the eager twin of every op)

Names load on first use, so ``llama_kernels.cli`` can set ``TRITON_INTERPRET`` on a machine without
a GPU before anything imports triton.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "rms_norm": ".ops.rms_norm",
    "swiglu": ".ops.swiglu",
    "geglu": ".ops.swiglu",
    "apply_rotary": ".ops.rope",
    "flash_attention": ".ops.attention",
    "flash_decode": ".ops.attention",
    "fused_linear_cross_entropy": ".ops.cross_entropy",
    "apply_kernels": ".patch",
    "chunked_mlp": ".long_context",
    "checkpoint_layers": ".long_context",
    "offloaded_checkpoint": ".long_context",
    "kernel_options": ".ops.options",
    "KernelOptions": ".ops.options",
}
_SUBMODULES = ("model", "reference", "patch", "ops", "cli", "long_context")
__all__ = [*_EXPORTS, "model", "reference", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'llama_kernels' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
