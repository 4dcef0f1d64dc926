"""``apply_kernels``: swap a model's eager ops for the Triton kernels, in place, from one table.

Each row of the table names a flag (the keyword of :func:`apply_kernels`), the module class it
applies to, and the class attributes to override.  A module whose class appears in the table is
given a *patched subclass* of its class (``module.__class__ = ...``) carrying the overrides of its
enabled rows.  Parameters, buffers, hooks and state-dict names are untouched, ``print(model)``
shows ``kernels=[...]`` on each patched module, and calling ``apply_kernels`` again recomputes the
subclass from the original class, so it is idempotent and can turn kernels off again.  Patched
classes are named in this module (``RMSNorm__patched__rms_norm``), so a patched model pickles.

A row may also say which modules its kernel cannot take (``Replacement.unsupported``: a head dim
the attention kernel has no tiles for, an MLP whose activation is not SiLU): those keep their eager
code, decided at patch time, so nothing fails later inside a forward.  ``apply_kernels`` warns once
about them and about modules on a device where no kernel runs, and :func:`kernel_summary` counts
only the modules that really run a kernel.

* The reference model (:mod:`llama_kernels.model`) exposes its ops as class attributes (*op slots*),
  so its rows just point the slots at the kernels (``Llama.cross_entropy``, the LM head and loss of
  ``Llama.loss``, included: the top-level ``Llama`` gets a patched subclass too).
* transformers' ``LlamaForCausalLM``/``LlamaModel`` (5.x) rows override ``forward`` of
  ``LlamaRMSNorm`` and ``LlamaMLP``.  Attention goes through transformers' own extension points
  rather than a copied forward: :mod:`llama_kernels.hf_attention` registers an attention function
  and a mask function as the implementation ``"llama_kernels"`` (padded batches, dynamic and static
  KV caches, packed sequences run the kernels; dropout, ``output_attentions`` and masks the kernels
  cannot express go to transformers' SDPA function with SDPA's own mask), the attention row
  switches the model to it, and ``apply_rotary_pos_emb`` is routed to the RoPE kernel while a
  patched ``LlamaAttention`` runs.
* The cross-entropy row overrides ``LlamaForCausalLM.forward`` with one function written for every
  ``*ForCausalLM`` of the family (:mod:`llama_kernels.hf_loss`): in training mode, with ``labels``
  and transformers' standard loss, it runs the base model with the arguments the original forward
  would give it and computes the loss with ``fused_linear_cross_entropy`` from the last hidden
  states (``logits=None``); every other call runs the original forward.
"""
from __future__ import annotations

import collections
import contextvars
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import model as reference_model
from .ops.common import KernelFallbackWarning, triton_runs_on
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


def _attention_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if attention_kernels.supports_head_dim(d):
        return None
    return f"head_dim {d} (the attention kernel takes multiples of 16 up to {attention_kernels.MAX_HEAD_DIM})"


def _rope_head_dim_unsupported(module) -> Optional[str]:
    d = module.head_dim
    if rope_kernel.supports_head_dim(d):
        return None
    return f"head_dim {d} (the RoPE kernel takes even head dims up to {rope_kernel.MAX_HEAD_DIM})"


def _rms_norm_size_unsupported(module) -> Optional[str]:
    n = module.weight.shape[0]
    return f"hidden size {n} (the RMSNorm kernel takes up to {RMS_NORM_MAX_HIDDEN})" if n > RMS_NORM_MAX_HIDDEN else None


def reference_model_table() -> list[Replacement]:
    """Rows for :class:`llama_kernels.model.Llama`: point each op slot at its kernel."""
    return [
        Replacement("rms_norm", reference_model.RMSNorm, {"rms_norm": staticmethod(rms_norm)},
                    _rms_norm_size_unsupported),
        Replacement("swiglu", reference_model.MLP, {"swiglu": staticmethod(swiglu)}),
        Replacement("rope", reference_model.Attention, {"apply_rotary": staticmethod(apply_rotary)},
                    _rope_head_dim_unsupported),
        Replacement("attention", reference_model.Attention, {"attention": staticmethod(flash_attention),
                                                             "decode_attention": staticmethod(flash_decode)},
                    _attention_head_dim_unsupported),
        Replacement("cross_entropy", reference_model.Llama,
                    {"cross_entropy": staticmethod(fused_linear_cross_entropy)}),
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
    base_name, *rest = name.split("__")
    if len(rest) >= 2 and rest[0] == "patched":
        kernels = set(rest[1:])
        tables = [reference_model_table]
        if base_name.startswith("Llama"):
            # transformers' classes (LlamaRMSNorm, ...), imported only when the reference model's
            # own (Llama itself) do not match: unpickling the reference model needs no transformers.
            tables.append(lambda: hf_table()[0])
        for table in tables:
            rows = [r for r in table() if r.target.__name__ == base_name and r.flag in kernels]
            if rows and {r.flag for r in rows} == kernels:
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
SUPPORTED_TRANSFORMERS = (5,)  # major versions whose LLaMA modules the rows below were checked on

# Kernel families active in the LlamaAttention.forward now running (rope is read by the global
# `apply_rotary_pos_emb` dispatcher, which transformers calls without the module).
_active_kernels: contextvars.ContextVar = contextvars.ContextVar("llama_kernels_active", default=())


def _hf_rms_norm_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:  # transformers returns the promoted dtype here
        return original_class(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _hf_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _hf_mlp_activation_unsupported(module) -> Optional[str]:
    act = module.config.hidden_act
    return None if act in ("silu", "swish") else f"hidden_act {act!r} (the kernel is SwiGLU: 'silu')"


def _hf_attention_forward(self, *args, **kwargs):
    token = _active_kernels.set(self._lk_kernels)
    try:
        return original_class(self).forward(self, *args, **kwargs)
    finally:
        _active_kernels.reset(token)


def _hf_rotary_dispatch(q, k, cos, sin, unsqueeze_dim=1):
    """Stands in for ``modeling_llama.apply_rotary_pos_emb``: the kernel inside patched attention."""
    # Under autocast q, k are half and cos, sin float32: the kernel promotes as eager does.
    if "rope" in _active_kernels.get() and unsqueeze_dim == 1 and q.dtype == k.dtype:
        return apply_rotary(q, k, cos, sin)
    return _hf_rotary_dispatch.original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def hf_table() -> tuple[list[Replacement], callable]:
    """Rows for transformers' LLaMA modules, and the function that finishes patching a model."""
    import transformers
    from transformers.models.llama import modeling_llama as llama

    from . import hf_loss

    major = int(transformers.__version__.split(".")[0])
    if major not in SUPPORTED_TRANSFORMERS:
        raise RuntimeError(
            f"apply_kernels supports transformers 5.x LLaMA models; transformers {transformers.__version__} "
            "is installed (pip install 'transformers>=5,<6')"
        )
    _install_hf_hooks()
    rows = [
        Replacement("rms_norm", llama.LlamaRMSNorm, {"forward": _hf_rms_norm_forward}, _rms_norm_size_unsupported),
        Replacement("swiglu", llama.LlamaMLP, {"forward": _hf_mlp_forward}, _hf_mlp_activation_unsupported),
        Replacement("rope", llama.LlamaAttention, {"forward": _hf_attention_forward}, _rope_head_dim_unsupported),
        Replacement("attention", llama.LlamaAttention, {"forward": _hf_attention_forward},
                    _attention_head_dim_unsupported),
        Replacement("cross_entropy", llama.LlamaForCausalLM,
                    {"forward": hf_loss.causal_lm_forward(llama.LlamaForCausalLM)}, hf_loss.lm_head_unsupported),
    ]
    return rows, _hf_finish


def _install_hf_hooks() -> None:
    """Register the attention and mask functions with transformers and route
    ``apply_rotary_pos_emb`` through the dispatcher.  Both are inert for models nobody patched;
    idempotent."""
    from transformers.models.llama import modeling_llama as llama

    from . import hf_attention

    hf_attention.register()
    if llama.apply_rotary_pos_emb is not _hf_rotary_dispatch:
        _hf_rotary_dispatch.original = llama.apply_rotary_pos_emb
        llama.apply_rotary_pos_emb = _hf_rotary_dispatch


def _hf_finish(model, enabled: dict) -> None:
    from .hf_attention import HF_ATTENTION

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
    base = original_class(model)  # the model itself is patched (cross_entropy) from a first call
    if base.__module__.startswith("transformers.") and base.__name__ in ("LlamaForCausalLM", "LlamaModel"):
        return hf_table()
    raise TypeError(
        f"model must be a llama_kernels.model.Llama or a transformers LlamaForCausalLM/LlamaModel, "
        f"got {type(model).__name__}"
    )


def apply_kernels(model, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
                  attention: bool = True, cross_entropy: bool = True):
    """Patch ``model`` in place to run the Triton kernels; returns ``model``.

    Works on :class:`llama_kernels.model.Llama` and on transformers ``LlamaForCausalLM`` /
    ``LlamaModel`` instances (weights kept).  Each flag turns one kernel family on or off; calling
    again with other flags re-patches from the original classes (``apply_kernels(m, rms_norm=False,
    swiglu=False, rope=False, attention=False, cross_entropy=False)`` restores the eager model).

    ``cross_entropy`` fuses the LM head with the loss: ``Llama.loss`` of the reference model, and a
    transformers ``LlamaForCausalLM`` called with ``labels`` in training mode, which then returns
    the loss with ``logits=None`` (eval mode, and calls without labels, keep the logits).

    A module the kernels cannot take (e.g. an attention head dim that is not a multiple of 16, an
    MLP whose activation is not SiLU) keeps its eager code for that family, and one warning lists
    them; so does a module on a device where no Triton kernel runs (see :func:`kernel_summary`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "attention": attention,
               "cross_entropy": cross_entropy}
    for name, value in enabled.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    table, finish = _table_for(model)
    targets = {row.target for row in table}
    unsupported = collections.defaultdict(collections.Counter)  # flag -> {"MLP with ...": count}
    for module in model.modules():
        base = original_class(module)
        if base not in targets:
            continue
        rows = []
        for row in table:
            if row.target is not base or not enabled[row.flag]:
                continue
            reason = row.unsupported(module) if row.unsupported is not None else None
            if reason is None:
                rows.append(row)
            else:
                unsupported[row.flag][f"{base.__name__} with {reason}"] += 1
        module.__class__ = _patched_class(base, rows) if rows else base
        _rebind_instance_forward(module, base)
    if finish is not None:
        finish(model, enabled)
    off_device = collections.defaultdict(collections.Counter)  # flag -> {"cpu": count}
    for module, device in _compute_devices(model).items():
        if not triton_runs_on(device):
            for flag in type(module)._lk_kernels:
                off_device[flag][str(device)] += 1
    if unsupported or off_device:
        warnings.warn(_eager_modules_message(unsupported, off_device), KernelFallbackWarning, stacklevel=2)
    return model


def _rebind_instance_forward(module: torch.nn.Module, base: type) -> None:
    """Point a ``forward`` bound on the instance at the (patched) class's ``forward``.

    accelerate's hooks (``device_map`` dispatch, offloading) keep the forward they wrap as
    ``module._old_forward``, a method bound when the hook was added, and removing a hook leaves it
    as ``module.forward``: either would bypass a ``forward`` override of the patched class.
    """
    ours = {base.forward} | {cls.forward for (b, _), cls in _patched_classes.items() if b is base}
    for attr in ("_old_forward", "forward"):
        bound = vars(module).get(attr)
        if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ in ours:
            setattr(module, attr, types.MethodType(type(module).forward, module))


def _eager_modules_message(unsupported: dict, off_device: dict) -> str:
    lines = ["apply_kernels: some modules run eager PyTorch instead of the kernels:"]
    for flag, reasons in sorted(unsupported.items()):
        lines.append(f"  {flag}: " + "; ".join(f"{n} x {reason}" for reason, n in reasons.items()))
    for flag, devices in sorted(off_device.items()):
        lines.append(f"  {flag}: " + "; ".join(f"{n} module(s) on {device}" for device, n in devices.items()))
    if off_device:
        lines.append("  (no Triton kernel runs on those devices: their patched ops run the eager PyTorch "
                     "reference until the model moves to a CUDA device; on the CPU, set "
                     "TRITON_INTERPRET=1 before triton is imported to run the kernels interpreted)")
    return "\n".join(lines)


def _compute_devices(model: torch.nn.Module) -> dict:
    """The device each patched module of ``model`` computes on.

    accelerate's hooks (``device_map`` dispatch, CPU/disk offloading) keep weights elsewhere, often
    on the ``meta`` device, and move them to the hook's ``execution_device`` for each call: that
    device counts, from a hook on the module, an ancestor or the submodule holding its first
    parameter; without hooks, the device of that parameter.
    """
    devices = {}

    def visit(module, hook_device):
        hook_device = _hook_execution_device(module) or hook_device
        if hasattr(type(module), "_lk_kernels"):
            devices[module] = hook_device or _first_parameter_device(module)
        for child in module.children():
            visit(child, hook_device)

    visit(model, None)
    return devices


def _hook_execution_device(module) -> Optional[torch.device]:
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    return None


def _first_parameter_device(module) -> Optional[torch.device]:
    for sub in module.modules():
        device = _hook_execution_device(sub)
        param = next(sub.parameters(recurse=False), None)
        if device is not None or param is not None:
            return device or param.device
    return None


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run each kernel family now, e.g. ``{"rms_norm": 61, ...}``.

    Counts only modules that are patched for the family and compute on a device where the
    kernels run (a module offloaded by accelerate counts on its execution device).
    """
    counts = dict.fromkeys(FLAGS, 0)
    for module, device in _compute_devices(model).items():
        if triton_runs_on(device):
            for flag in type(module)._lk_kernels:
                counts[flag] += 1
    return counts
