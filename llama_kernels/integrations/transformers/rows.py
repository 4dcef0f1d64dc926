"""The transformers rows of ``apply_kernels``' table: the decoder modules of the LLaMA family.

LLaMA, Mistral, Qwen2, Qwen3, Gemma 1/2/3 and Phi-3 build their decoders from the same four
modules, named ``<Prefix>RMSNorm``, ``<Prefix>MLP``, ``<Prefix>Attention`` and (the LM head and
loss) ``<Prefix>ForCausalLM``.  They differ in a handful of places, each a row option here rather
than a copied forward:

* RMSNorm: LLaMA's rounds the normalised row to the input dtype before scaling by the weight;
  Gemma's scales by ``1 + weight`` in float32 and rounds once (``rms_norm(offset=1.0,
  casting="gemma")``).  Qwen3 and Gemma 3 also normalise q and k per head with the same modules
  (``q_norm``, ``k_norm``), so those run the kernel too.
* MLP: the activation of the gated unit is read off the module (``act_fn``): SiLU runs
  ``swiglu``, GELU-tanh (Gemma's ``gelu_pytorch_tanh``) runs ``geglu``, any other stays eager.
  Phi-3 projects gate and up in one matmul (``gate_up_proj``); its halves go to the kernel as views.
* Attention: transformers' own extension points (:mod:`.attention`, :mod:`.mask_plan`) see each
  layer's sliding window in its mask and its ``softcap`` in the call, so Mistral's and Qwen2's
  windows, Gemma 2/3's alternating local and global layers and Gemma 2's soft-capping need no row
  option.  RoPE: a patched attention module runs its class's own forward with the kernel as
  ``apply_rotary_pos_emb`` (Phi-3's partial rotary: the kernel on the rotated slice); transformers'
  modules themselves are never changed, so other models in the process are untouched.
* ``*ForCausalLM``: the fused loss of :mod:`.loss`; Gemma 2's final-logit soft-capping is refused
  at patch time (that model keeps transformers' loss).

The families themselves (names, prefixes, the two row options above) are declared in
:mod:`.families`.  Rows apply to a model's modules whatever the model around them (``*ForCausalLM``, ``*Model``,
``*ForSequenceClassification``, a user's wrapper or subclass).
"""
from __future__ import annotations

import functools
import types
from typing import Optional

import torch

from ...ops import rope as rope_ops
from ...ops.rms_norm import rms_norm
from ...ops.rope import apply_rotary
from ...ops.glu import geglu, swiglu
from ...replacements import (Replacement, attention_head_dim_unsupported, gated_down_projection, original_class,
                             outermost_pretrained, rms_norm_size_unsupported, rope_head_dim_unsupported)
from .families import Family, modeling_modules

SUPPORTED_TRANSFORMERS = (5,)  # major versions whose modules the rows below were checked on


# ---------------------------------------------------------------------------------------------
# forwards of the patched modules
# ---------------------------------------------------------------------------------------------
def _llama_rms_norm_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:  # transformers returns the promoted dtype here
        return original_class(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gemma_rms_norm_forward(self, x):
    return rms_norm(x, self.weight, self.eps, offset=1.0, casting="gemma")


@functools.cache
def _gated_units() -> dict:
    """Activation module class -> the kernel computing ``activation(gate) * up``."""
    from transformers.activations import GELUTanh, SiLUActivation

    return {SiLUActivation: swiglu, torch.nn.SiLU: swiglu, GELUTanh: geglu}


def _gated_unit(activation):
    """The kernel for ``activation(gate) * up``, or None if ``activation`` is not one of ours."""
    return _gated_units().get(type(activation))


def _mlp_forward(self, x):
    gelu = _gated_unit(self.act_fn) is geglu
    return gated_down_projection(self.down_proj, self.gate_proj(x), self.up_proj(x), gelu=gelu)


def _fused_mlp_forward(self, hidden_states):
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)  # views: no copy
    return gated_down_projection(self.down_proj, gate, up, gelu=_gated_unit(self.activation_fn) is geglu)


def _mlp_activation_unsupported(module) -> Optional[str]:
    activation = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    if _gated_unit(activation) is not None:
        return None
    return (f"activation {type(activation).__name__} (the kernels are SiLU (SwiGLU) and GELU-tanh "
            "(GeGLU, 'gelu_pytorch_tanh'))")


@functools.cache
def _forward_with_rope_kernel(forward):
    """``forward`` (an attention module's, decorators included) reading ``apply_rotary_pos_emb`` as
    the kernel: the same code objects, run with a copy of their modeling module's globals.

    transformers' attention forwards call their module's global ``apply_rotary_pos_emb``; changing
    that global would change every model of the family in the process, patched or not (and a
    dispatcher reading which model runs is a context variable, which Dynamo cannot trace)."""
    inner = getattr(forward, "__wrapped__", None)
    closure = forward.__closure__ or ()
    if inner is not None and any(_cell_holds(cell, inner) for cell in closure):
        # A decorator's wrapper (deprecate_kwarg): rebuild it around the rebuilt inner function.
        rebuilt = _forward_with_rope_kernel(inner)
        closure = tuple(types.CellType(rebuilt) if _cell_holds(cell, inner) else cell for cell in closure)
        function = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__,
                                      forward.__defaults__, closure)
        function.__dict__.update(vars(forward), __wrapped__=rebuilt)
    else:
        original = forward.__globals__.get("apply_rotary_pos_emb")
        if original is None:
            return forward  # not a forward of the family's shape: eager RoPE
        scope = {**forward.__globals__, "apply_rotary_pos_emb": _rotary_with_kernel(original)}
        # Without ``__name__`` Dynamo guards on this dict itself; with it, Dynamo would read (and
        # guard) the names through the modeling module, whose apply_rotary_pos_emb is the
        # original (a hub-kernel nn.Module in transformers >= 5.25, which has no __defaults__).
        scope.pop("__name__", None)
        function = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, closure)
        function.__dict__.update(vars(forward))
    function.__kwdefaults__, function.__qualname__ = forward.__kwdefaults__, forward.__qualname__
    function.__doc__, function.__module__ = forward.__doc__, forward.__module__
    return function


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _rotary_with_kernel(original):
    """A modeling module's ``apply_rotary_pos_emb`` computed by the kernel (``original`` for calls
    it does not take)."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Under autocast q, k are half and cos, sin float32: the kernel promotes as eager does.
        if unsqueeze_dim == 1 and q.dtype == k.dtype:
            rotary_dim = cos.shape[-1]
            if rotary_dim == q.shape[-1]:
                return apply_rotary(q, k, cos, sin)
            if rotary_dim < q.shape[-1] and rope_ops.supports_rotary_dim(rotary_dim):
                # Phi-3's partial rotary: the first rotary_dim features turn, the rest pass through.
                q_rot, k_rot = apply_rotary(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
                return (torch.cat([q_rot, q[..., rotary_dim:]], dim=-1),
                        torch.cat([k_rot, k[..., rotary_dim:]], dim=-1))
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def _family_rows(family: Family, modeling) -> list[Replacement]:
    """The rows of ``family``'s modules in its modeling module ``modeling``."""
    from . import loss  # (imports transformers: only once there is a transformers model to patch)

    classes = {kind: getattr(modeling, family.prefix + kind)
               for kind in ("RMSNorm", "MLP", "Attention", "ForCausalLM")}
    norm_forward = _gemma_rms_norm_forward if family.gemma_norm else _llama_rms_norm_forward
    mlp_forward = _fused_mlp_forward if family.fused_mlp else _mlp_forward
    causal_lm, attention_class = classes["ForCausalLM"], classes["Attention"]
    return [
        Replacement("rms_norm", classes["RMSNorm"], {"forward": norm_forward}, rms_norm_size_unsupported),
        Replacement("swiglu", classes["MLP"], {"forward": mlp_forward}, _mlp_activation_unsupported),
        # Attention runs through transformers' attention interface (switched in `_finish`): its row
        # keeps the class's own forward, which also keeps it off subclasses with another forward.
        # The RoPE row comes after it, so that with both on the forward is RoPE's.
        Replacement("attention", attention_class, {"forward": attention_class.forward},
                    attention_head_dim_unsupported),
        Replacement("rope", attention_class, {"forward": _forward_with_rope_kernel(attention_class.forward)},
                    rope_head_dim_unsupported),
        Replacement("cross_entropy", causal_lm, {"forward": loss.causal_lm_forward(causal_lm)},
                    loss.lm_head_unsupported),
    ]


def hf_table() -> tuple[list[Replacement], callable]:
    """Rows for every family's modules, and the function that finishes patching a model."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major not in SUPPORTED_TRANSFORMERS:
        raise RuntimeError(
            f"apply_kernels supports transformers 5.x models; transformers {transformers.__version__} "
            "is installed (pip install 'transformers>=5,<6')"
        )
    from . import attention

    attention.register()  # inert for models that were not switched to it
    modules = modeling_modules()
    rows = [row for family, modeling in modules.items() for row in _family_rows(family, modeling)]
    return rows, _finish


def _finish(model, enabled: dict) -> None:
    """Switch every outermost transformers model inside ``model`` to the kernels' attention (or
    back to the implementation it had)."""
    from .attention import HF_ATTENTION

    for pretrained in outermost_pretrained(model):
        current = pretrained.config._attn_implementation
        if enabled["attention"] and current != HF_ATTENTION:
            pretrained._lk_previous_attention = current
            pretrained.set_attn_implementation(HF_ATTENTION)
        elif not enabled["attention"] and current == HF_ATTENTION:
            pretrained.set_attn_implementation(getattr(pretrained, "_lk_previous_attention", "sdpa"))
        # What the model computed before patching is the rule wherever the kernels step aside, and
        # for corner cases (query rows that see no key, packed batches): each attention module
        # keeps the name of that implementation.
        unpatched = getattr(pretrained, "_lk_previous_attention", "sdpa")
        for module in pretrained.modules():
            if hasattr(type(module), "_lk_kernels"):  # (also those whose rows stayed eager)
                module._lk_unpatched_attention = unpatched

