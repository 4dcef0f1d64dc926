"""The rows of ``apply_kernels``' table: what a row is, the checks rows share, the reference model's rows.

A :class:`Replacement` names a flag (a keyword of ``apply_kernels``), the module class it applies to
and the class attributes to override.  The transformers rows live in
:mod:`llama_kernels.integrations.transformers.rows`; both import from here, and
:mod:`llama_kernels.patch` applies them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import model as llama_model
from .ops import attention as attention_ops, registry, rope as rope_ops
from .ops.attention import flash_attention, flash_decode
from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.glu import gated_linear, geglu, swiglu
from .ops.rms_norm import MAX_HIDDEN as RMS_NORM_MAX_HIDDEN, rms_norm
from .ops.rope import apply_rotary

FLAGS = registry.FLAGS  # apply_kernels' keywords: one per op family of the registry


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


def outermost_pretrained(model: torch.nn.Module) -> list:
    """The outermost transformers ``PreTrainedModel`` modules inside ``model`` (``model`` itself,
    if it is one): none when transformers was never imported (nothing in the model comes from it)."""
    if "transformers" not in sys.modules:
        return []
    from transformers import PreTrainedModel

    def outermost(module):
        if isinstance(module, PreTrainedModel):
            yield module
        else:
            for child in module.children():
                yield from outermost(child)

    return list(outermost(model))


def attention_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if attention_ops.supports_head_dim(d):
        return None
    return f"head_dim {d} (the attention kernel takes multiples of 16 up to {attention_ops.MAX_HEAD_DIM})"


def rope_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if rope_ops.supports_rotary_dim(d):
        return None
    return f"head_dim {d} (the RoPE kernel takes even head dims up to {rope_ops.MAX_ROTARY_DIM})"


def rms_norm_size_unsupported(module) -> Optional[str]:
    n = module.weight.shape[0]
    if n <= RMS_NORM_MAX_HIDDEN:
        return None
    return f"hidden size {n} (the RMSNorm kernel takes up to {RMS_NORM_MAX_HIDDEN})"


def gated_down_projection(down_proj: torch.nn.Module, gate, up, *, gelu: bool = False):
    """``down_proj(act(gate) * up)``, the end of every patched gated MLP: through
    :func:`~llama_kernels.ops.glu.gated_linear` where ``down_proj`` is a plain ``nn.Linear``
    without hooks of its own (its ``tokens x intermediate`` input is then recomputed in the
    backward instead of kept: the same gradients, bit for bit); any other module (a LoRA layer, a
    quantised linear, one with hooks or with a forward of its own: accelerate's offloading binds one
    on the instance, which moves the weight in) is called on the gated unit's output as it is."""
    hooked = (down_proj._forward_hooks or down_proj._forward_pre_hooks or down_proj._backward_hooks
              or down_proj._backward_pre_hooks or "forward" in vars(down_proj))
    if type(down_proj) is torch.nn.Linear and not hooked:
        return gated_linear(gate, up, down_proj.weight, down_proj.bias, gelu=gelu)
    return down_proj((geglu if gelu else swiglu)(gate, up))


def _llama_mlp_forward(self, x):
    return gated_down_projection(self.down_proj, self.gate_proj(x), self.up_proj(x))


def llama_model_table() -> list[Replacement]:
    """Rows for :class:`llama_kernels.model.Llama`: point each op slot at its kernel (the MLP's
    forward also ends in :func:`gated_down_projection`, which keeps less for the backward)."""
    return [
        Replacement("rms_norm", llama_model.RMSNorm, {"rms_norm": staticmethod(rms_norm)},
                    rms_norm_size_unsupported),
        Replacement("swiglu", llama_model.MLP, {"swiglu": staticmethod(swiglu), "forward": _llama_mlp_forward}),
        Replacement("rope", llama_model.Attention, {"apply_rotary": staticmethod(apply_rotary)},
                    rope_head_dim_unsupported),
        Replacement("attention", llama_model.Attention, {"attention": staticmethod(flash_attention),
                                                             "decode_attention": staticmethod(flash_decode)},
                    attention_head_dim_unsupported),
        Replacement("cross_entropy", llama_model.Llama,
                    {"cross_entropy": staticmethod(fused_linear_cross_entropy)}),
    ]
