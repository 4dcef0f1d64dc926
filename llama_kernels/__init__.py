"""llama_kernels: fused Triton kernels for LLaMA-family models.

Public API (see the README): ``rms_norm``, ``swiglu``, ``apply_rotary``, ``flash_attention``,
``apply_kernels``, and the reference model in ``llama_kernels.model``.
"""
from . import model, reference
from .ops.rms_norm import rms_norm
from .patch import apply_kernels

__version__ = "0.1.0"
__all__ = ["rms_norm", "apply_kernels", "model", "reference", "__version__"]
