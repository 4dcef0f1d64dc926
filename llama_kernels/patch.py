"""``apply_kernels``: swap a model's eager ops for the Triton kernels, in place, from one table.

Each row of the table names a flag (the keyword of :func:`apply_kernels`), the module class it
applies to, and the class attributes to override.  A module whose class appears in the table is
given a *patched subclass* of its class (``module.__class__ = ...``) carrying the overrides of its
enabled rows.  Parameters, buffers, hooks and state-dict names are untouched, ``print(model)``
shows ``kernels=[...]`` on each patched module, and calling ``apply_kernels`` again recomputes the
subclass from the original class, so it is idempotent and can turn kernels off again.  Patched
classes are named in this module (``RMSNorm__patched__rms_norm``), so a patched model pickles.

* The reference model (:mod:`llama_kernels.model`) exposes its ops as class attributes (*op slots*),
  so its rows just point the slots at the kernels.
* transformers' ``LlamaForCausalLM``/``LlamaModel`` (5.x) rows override ``forward`` of
  ``LlamaRMSNorm`` and ``LlamaMLP``.  Attention goes through transformers' own extension points
  rather than a copied forward: the kernel is registered as the attention implementation
  ``"llama_kernels"`` (calls with a padding mask or dropout go to transformers' SDPA path, so
  padded batches stay exact), and ``apply_rotary_pos_emb`` is routed to the RoPE kernel while a
  patched ``LlamaAttention`` runs.
"""
from __future__ import annotations

import contextvars
import warnings
from dataclasses import dataclass, field

import torch

from . import model as reference_model
from .ops.common import INTERPRET, KernelFallbackWarning
from .ops.attention import flash_attention
from .ops.decode import flash_decode
from .ops.rms_norm import rms_norm
from .ops.rope import apply_rotary
from .ops.swiglu import swiglu

FLAGS = ("rms_norm", "swiglu", "rope", "attention")


@dataclass(frozen=True)
class Replacement:
    """One row of a patch table: with ``flag`` on, instances of ``target`` get ``overrides``."""

    flag: str
    target: type
    overrides: dict = field(hash=False)


def reference_model_table() -> list[Replacement]:
    """Rows for :class:`llama_kernels.model.Llama`: point each op slot at its kernel."""
    return [
        Replacement("rms_norm", reference_model.RMSNorm, {"rms_norm": staticmethod(rms_norm)}),
        Replacement("swiglu", reference_model.MLP, {"swiglu": staticmethod(swiglu)}),
        Replacement("rope", reference_model.Attention, {"apply_rotary": staticmethod(apply_rotary)}),
        Replacement("attention", reference_model.Attention, {"attention": staticmethod(flash_attention),
                                                             "decode_attention": staticmethod(flash_decode)}),
    ]


_patched_classes: dict = {}


def _patched_class(base: type, rows: list[Replacement]) -> type:
    """The subclass of ``base`` carrying the overrides of ``rows`` (one class per combination)."""
    kernels = tuple(sorted({r.flag for r in rows}))
    key = (base, kernels)
    if key not in _patched_classes:
        # Named in this module (see __getattr__ below) so that pickle can find it again.
        attrs = {"__module__": __name__, "__qualname__": "__".join((base.__name__, "patched", *kernels)),
                 "_lk_base": base, "_lk_kernels": kernels, "extra_repr": _extra_repr}
        for row in rows:
            attrs.update(row.overrides)
        _patched_classes[key] = type(base.__name__, (base,), attrs)
    return _patched_classes[key]


def __getattr__(name: str):
    """Patched classes by their qualified name (``RMSNorm__patched__rms_norm``), for unpickling."""
    base_name, marker, *kernels = name.split("__")
    if marker == "patched":
        rows = reference_model_table()
        if base_name.startswith("Llama"):
            rows += hf_table()[0]
        rows = [r for r in rows if r.target.__name__ == base_name and r.flag in kernels]
        if rows and {r.flag for r in rows} == set(kernels):
            return _patched_class(rows[0].target, rows)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _extra_repr(self) -> str:
    base_repr = type(self)._lk_base.extra_repr(self)
    return ", ".join(filter(None, [base_repr, f"kernels=[{', '.join(self._lk_kernels)}]"]))


def original_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before any ``apply_kernels``."""
    return vars(type(module)).get("_lk_base", type(module))


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
HF_ATTENTION = "llama_kernels"  # the name the attention kernel is registered under
SUPPORTED_TRANSFORMERS = (5,)  # major versions whose LLaMA modules the rows below were checked on

# Kernel families active in the LlamaAttention.forward now running (rope is read by the global
# `apply_rotary_pos_emb` dispatcher, which transformers calls without the module).
_active_kernels: contextvars.ContextVar = contextvars.ContextVar("llama_kernels_active", default=())


def _hf_rms_norm_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:  # transformers returns the promoted dtype here
        return original_class(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _hf_mlp_forward(self, x):
    if self.config.hidden_act not in ("silu", "swish"):
        return original_class(self).forward(self, x)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _hf_attention_forward(self, *args, **kwargs):
    token = _active_kernels.set(self._lk_kernels)
    try:
        return original_class(self).forward(self, *args, **kwargs)
    finally:
        _active_kernels.reset(token)


def _hf_rotary_dispatch(q, k, cos, sin, unsqueeze_dim=1):
    """Stands in for ``modeling_llama.apply_rotary_pos_emb``: the kernel inside patched attention."""
    # Mixed dtypes (autocast: float32 cos with half q) keep transformers' own promotion.
    if "rope" in _active_kernels.get() and unsqueeze_dim == 1 and q.dtype == k.dtype == cos.dtype:
        return apply_rotary(q, k, cos, sin)
    return _hf_rotary_dispatch.original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: the flash kernel, or SDPA where a mask/dropout is needed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is not None or dropout > 0 or kwargs.get("output_attentions")
            or "attention" not in getattr(module, "_lk_kernels", ())):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = q_len > 1 and getattr(module, "is_causal", True)
    if causal and kv_len > q_len:
        # transformers drops the mask only for a prefill into an empty static cache, whose unused
        # tail must stay invisible (it relies on SDPA's top-left causal alignment here).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = flash_attention(query, key, value, causal=causal, sm_scale=scaling)
    return out.transpose(1, 2), None


def hf_table() -> tuple[list[Replacement], callable]:
    """Rows for transformers' LLaMA modules, and the function that finishes patching a model."""
    import transformers
    from transformers.models.llama import modeling_llama as llama

    major = int(transformers.__version__.split(".")[0])
    if major not in SUPPORTED_TRANSFORMERS:
        raise RuntimeError(
            f"apply_kernels supports transformers 5.x LLaMA models; transformers {transformers.__version__} "
            "is installed (pip install 'transformers>=5,<6')"
        )
    _install_hf_hooks()
    rows = [
        Replacement("rms_norm", llama.LlamaRMSNorm, {"forward": _hf_rms_norm_forward}),
        Replacement("swiglu", llama.LlamaMLP, {"forward": _hf_mlp_forward}),
        Replacement("rope", llama.LlamaAttention, {"forward": _hf_attention_forward}),
        Replacement("attention", llama.LlamaAttention, {"forward": _hf_attention_forward}),
    ]
    return rows, _hf_finish


def _install_hf_hooks() -> None:
    """Register the attention kernel with transformers and route ``apply_rotary_pos_emb`` through
    the dispatcher.  Both are inert for models nobody patched; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.llama import modeling_llama as llama

    AttentionInterface.register(HF_ATTENTION, _hf_attention)
    AttentionMaskInterface.register(HF_ATTENTION, sdpa_mask)
    if llama.apply_rotary_pos_emb is not _hf_rotary_dispatch:
        _hf_rotary_dispatch.original = llama.apply_rotary_pos_emb
        llama.apply_rotary_pos_emb = _hf_rotary_dispatch


def _hf_finish(model, enabled: dict) -> None:
    current = model.config._attn_implementation
    if enabled["attention"] and current != HF_ATTENTION:
        model._lk_previous_attention = current
        model.set_attn_implementation(HF_ATTENTION)
    elif not enabled["attention"] and current == HF_ATTENTION:
        model.set_attn_implementation(getattr(model, "_lk_previous_attention", "sdpa"))


def _table_for(model: torch.nn.Module):
    """``(rows, finish)`` for ``model``'s kind; ``finish(model, enabled)`` may be None."""
    if any(isinstance(m, reference_model.Llama) for m in model.modules()):
        return reference_model_table(), None
    if type(model).__module__.startswith("transformers.") and type(model).__name__ in (
        "LlamaForCausalLM", "LlamaModel"
    ):
        return hf_table()
    raise TypeError(
        f"model must be a llama_kernels.model.Llama or a transformers LlamaForCausalLM/LlamaModel, "
        f"got {type(model).__name__}"
    )


def apply_kernels(model, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
                  attention: bool = True):
    """Patch ``model`` in place to run the Triton kernels; returns ``model``.

    Works on :class:`llama_kernels.model.Llama` and on transformers ``LlamaForCausalLM`` /
    ``LlamaModel`` instances (weights kept).  Each flag turns one kernel family on or off; calling
    again with other flags re-patches from the original classes (``apply_kernels(m, rms_norm=False,
    swiglu=False, rope=False, attention=False)`` restores the eager model).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "attention": attention}
    for name, value in enabled.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    table, finish = _table_for(model)
    targets = {row.target for row in table}
    for module in model.modules():
        base = original_class(module)
        if base not in targets:
            continue
        rows = [row for row in table if row.target is base and enabled[row.flag]]
        module.__class__ = _patched_class(base, rows) if rows else base
    if finish is not None:
        finish(model, enabled)
    device = next(model.parameters(), torch.empty(0)).device
    if any(enabled.values()) and device.type == "cpu" and not INTERPRET:
        warnings.warn(
            "apply_kernels: the model is on the CPU and TRITON_INTERPRET is not set, so the patched "
            "ops will run their eager PyTorch reference; move the model to a CUDA device to use the "
            "Triton kernels",
            KernelFallbackWarning,
            stacklevel=2,
        )
    return model


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run each kernel family, e.g. ``{"rms_norm": 61, ...}``."""
    counts = dict.fromkeys(FLAGS, 0)
    for module in model.modules():
        for flag in getattr(type(module), "_lk_kernels", ()):
            counts[flag] += 1
    return counts
