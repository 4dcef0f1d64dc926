"""The rows of ``apply_kernels``' table: what a row is, the checks rows share, the reference model's rows.

A :class:`Replacement` names a flag (a keyword of ``apply_kernels``), the module class it applies to
and the class attributes to override.  The transformers rows live in :mod:`llama_kernels.hf_family`;
both import from here, and :mod:`llama_kernels.patch` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import model as reference_model
from .ops import attention as attention_kernels, rope as rope_kernel
from .ops.attention import flash_attention
from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.decode import flash_decode
from .ops.rms_norm import MAX_HIDDEN as RMS_NORM_MAX_HIDDEN, rms_norm
from .ops.rope import apply_rotary
from .ops.swiglu import swiglu

FLAGS = ("rms_norm", "swiglu", "rope", "attention", "cross_entropy")


@dataclass(frozen=True)
class Replacement:
    """One row of a patch table: with ``flag`` on, instances of ``target`` get ``overrides``.

    ``unsupported(module)``, when given, says why that module's shapes or settings are beyond the
    kernel (a short phrase), or returns None: such a module keeps its eager code for this row, so
    it can never fail later inside a forward, and ``apply_kernels`` warns once.
    """

    flag: str
    target: type
    overrides: dict = field(hash=False)
    unsupported: Optional[Callable[[torch.nn.Module], Optional[str]]] = field(default=None, hash=False)

    def applies_to(self, cls: type) -> bool:
        """Whether modules of class ``cls`` take this row: ``target`` itself, or a subclass that
        keeps every attribute the row overrides (a subclass with its own ``forward`` does other
        math, which the row knows nothing of)."""
        if cls is self.target:
            return True
        return (isinstance(cls, type) and issubclass(cls, self.target)
                and all(getattr(cls, name) is getattr(self.target, name) for name in self.overrides))


def original_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before any ``apply_kernels``."""
    return vars(type(module)).get("_lk_base", type(module))


def attention_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if attention_kernels.supports_head_dim(d):
        return None
    return f"head_dim {d} (the attention kernel takes multiples of 16 up to {attention_kernels.MAX_HEAD_DIM})"


def rope_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if rope_kernel.supports_head_dim(d):
        return None
    return f"head_dim {d} (the RoPE kernel takes even head dims up to {rope_kernel.MAX_HEAD_DIM})"


def rms_norm_size_unsupported(module) -> Optional[str]:
    n = module.weight.shape[0]
    return f"hidden size {n} (the RMSNorm kernel takes up to {RMS_NORM_MAX_HIDDEN})" if n > RMS_NORM_MAX_HIDDEN else None


def reference_model_table() -> list[Replacement]:
    """Rows for :class:`llama_kernels.model.Llama`: point each op slot at its kernel."""
    return [
        Replacement("rms_norm", reference_model.RMSNorm, {"rms_norm": staticmethod(rms_norm)},
                    rms_norm_size_unsupported),
        Replacement("swiglu", reference_model.MLP, {"swiglu": staticmethod(swiglu)}),
        Replacement("rope", reference_model.Attention, {"apply_rotary": staticmethod(apply_rotary)},
                    rope_head_dim_unsupported),
        Replacement("attention", reference_model.Attention, {"attention": staticmethod(flash_attention),
                                                             "decode_attention": staticmethod(flash_decode)},
                    attention_head_dim_unsupported),
        Replacement("cross_entropy", reference_model.Llama,
                    {"cross_entropy": staticmethod(fused_linear_cross_entropy)}),
    ]
