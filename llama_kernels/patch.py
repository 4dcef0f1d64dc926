"""``apply_kernels``: swap a model's eager ops for the Triton kernels, in place, from one table.

Each row of the table (:class:`~llama_kernels.replacements.Replacement`) names a flag (the keyword
of :func:`apply_kernels`), the module class it applies to, and the class attributes to override.
Every module of the model whose class a row applies to (the row's class, or a subclass that keeps
the overridden attributes) is given a *patched subclass* of its class (``module.__class__ = ...``)
carrying the overrides of its enabled rows.  Parameters, buffers, hooks and state-dict names are
untouched, ``print(model)`` shows ``kernels=[...]`` on each patched module, and calling
``apply_kernels`` again recomputes the subclass from the original class, so it is idempotent and can
turn kernels off again.  Patched classes are named in this module (``RMSNorm__patched__rms_norm``),
so a patched model pickles.

A row may also say which modules its kernel cannot take (``Replacement.unsupported``: a head dim
the attention kernel has no tiles for, an MLP whose activation has no kernel): those keep their
eager code, decided at patch time, so nothing fails later inside a forward; ``print(model)`` shows
``eager=[flag: why]`` on them.  ``apply_kernels`` warns once about them and about modules on a
device where no kernel runs, and :func:`kernel_summary` counts only the modules that really run a
kernel.

* The reference model (:mod:`llama_kernels.model`) exposes its ops as class attributes (*op slots*),
  so its rows (:func:`~llama_kernels.replacements.llama_model_table`) just point the slots at
  the kernels (``Llama.cross_entropy``, the LM head and loss of ``Llama.loss``, included: the
  top-level ``Llama`` gets a patched subclass too).
* transformers (5.x): :mod:`llama_kernels.integrations.transformers` (imported only for a model
  built from transformers' modules).  Its ``rows`` module has the rows for the decoder modules of
  every family (LLaMA, Mistral, Qwen2, Qwen3, Gemma 1/2/3, Phi-3, declared in its ``families``):
  ``forward`` of the RMSNorm and MLP modules, a thin ``forward`` of the attention modules that turns
  on the RoPE kernel inside, and the fused loss of its ``loss`` module on ``*ForCausalLM``.
  Attention itself goes through transformers' own extension points (its ``attention`` and
  ``mask_plan`` modules, registered as the implementation ``"llama_kernels"``, which each patched
  model is switched to).
"""
from __future__ import annotations

import collections
import inspect
import itertools
import sys
import types
import warnings
from typing import Optional

import torch

from .ops.common import FLOAT_DTYPES, KernelFallbackWarning, triton_runs_on
from .replacements import FLAGS, Replacement, llama_model_table, original_class  # noqa: F401 (API)
from . import model as llama_model


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
    if rest and rest[0] == "patched":
        kernels = set(rest[1:])
        # transformers' classes (LlamaRMSNorm, ...) are looked up only when the reference model's
        # own do not match: unpickling the reference model needs no transformers.
        for table in (llama_model_table, _hf_rows):
            named = [r for r in table() if r.target.__name__ == base_name]
            rows = [r for r in named if r.flag in kernels]
            if named and {r.flag for r in rows} == kernels:
                return _patched_class(named[0].target, rows)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf_rows() -> list[Replacement]:
    try:
        from .integrations.transformers.rows import hf_table
    except ImportError:  # no transformers
        return []
    return hf_table()[0]


def _extra_repr(self) -> str:
    """The module's own repr, then ``kernels=[...]`` and, for rows it could not take, ``eager=[...]``."""
    base_repr = type(self)._lk_base.extra_repr(self)
    eager = getattr(self, "_lk_eager", {})
    return ", ".join(filter(None, [
        base_repr, f"kernels=[{', '.join(self._lk_kernels)}]",
        eager and f"eager=[{'; '.join(f'{flag}: {reason}' for flag, reason in eager.items())}]"]))


def _table_for(model: torch.nn.Module):
    """``(rows, finish)`` for the modules inside ``model``; ``finish(model, enabled)`` may be None."""
    if any(isinstance(m, llama_model.Llama) for m in model.modules()):
        return llama_model_table(), None
    classes = {original_class(m) for m in model.modules()}
    transformers_inside = any(cls.__module__.startswith("transformers.") for cls in classes)
    if transformers_inside:
        from .integrations.transformers.rows import hf_table

        rows, finish = hf_table()
        if any(row.applies_to(cls) for row in rows for cls in classes):
            return rows, finish
    from .integrations.transformers.families import family_names

    raise TypeError(
        f"model must be a llama_kernels.model.Llama or a transformers model built from the decoder modules "
        f"of a supported family ({family_names()}); {type(model).__name__} has none"
    )


def apply_kernels(model, **flags):
    """Patch ``model`` in place to run the Triton kernels; returns ``model``.

    Works on :class:`llama_kernels.model.Llama` and on transformers models of the LLaMA family
    (LLaMA, Mistral, Qwen2, Qwen3, Gemma 1/2/3, Phi-3; see
    :mod:`llama_kernels.integrations.transformers.families`): the decoder modules inside ``model``
    are patched whatever its head (``*ForCausalLM``, ``*Model``, ``*ForSequenceClassification``, a
    wrapper of one), weights kept.  Each flag (keyword-only, default True; the op registry's
    ``FLAGS``) turns one kernel family on or off (``swiglu`` covers the gated MLP, SwiGLU or
    Gemma's GeGLU); calling again with
    other flags re-patches from the original classes (``apply_kernels(m, rms_norm=False,
    swiglu=False, rope=False, attention=False, cross_entropy=False)`` restores the eager model).

    ``cross_entropy`` fuses the LM head with the loss: ``Llama.loss`` of the reference model, and a
    transformers ``*ForCausalLM`` called with ``labels`` in training mode, which then returns
    the loss with ``logits=None`` (eval mode, and calls without labels, keep the logits).

    A module the kernels cannot take (e.g. an attention head dim that is not a multiple of 16, an
    MLP whose activation is neither SiLU nor GELU-tanh, float64 weights) keeps its eager code for that family,
    ``print(model)`` says ``eager=[flag: why]`` on it, and one warning lists them; so does a module
    on a device where no Triton kernel runs (see :func:`kernel_summary`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    unknown = [name for name in flags if name not in FLAGS]
    if unknown:
        raise TypeError(f"apply_kernels() got an unexpected keyword argument {unknown[0]!r} "
                        f"(its flags: {', '.join(FLAGS)})")
    enabled = {flag: flags.get(flag, True) for flag in FLAGS}
    for name, value in enabled.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    table, finish = _table_for(model)
    unsupported = collections.defaultdict(collections.Counter)  # flag -> {"MLP with ...": count}
    for module in model.modules():
        base = original_class(module)
        matching = [row for row in table if row.applies_to(base)]
        if not matching:
            continue
        rows, eager = [], {}
        for row in matching:
            if not enabled[row.flag]:
                continue
            reason = _dtype_unsupported(module)
            if reason is None and row.unsupported is not None:
                reason = row.unsupported(module)
            if reason is None:
                rows.append(row)
            else:
                eager[row.flag] = reason
                unsupported[row.flag][f"{base.__name__} with {reason}"] += 1
        module.__class__ = _patched_class(base, rows) if rows or eager else base
        if eager:
            module._lk_eager = eager
        elif "_lk_eager" in vars(module):
            del module._lk_eager
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



# The flags are the op registry's (``registry.FLAGS``): the signature says so to help() and IDEs.
apply_kernels.__signature__ = inspect.Signature(
    [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, default=True) for flag in FLAGS])


def _dtype_unsupported(module: torch.nn.Module) -> Optional[str]:
    """Why ``module``'s floating-point weights are beyond the kernels (float64: they take float32,
    float16 and bfloat16), or None.  Such a module keeps its eager code, which runs."""
    beyond = {p.dtype for p in module.parameters() if p.is_floating_point()} - set(FLOAT_DTYPES)
    if not beyond:
        return None
    names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in beyond))
    return f"{names} weights (the kernels take float32, float16 and bfloat16)"


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
    # Buffers count too: a quantised projection (llama_kernels.quantize) keeps its weight in them.
    for sub in module.modules():
        device = _hook_execution_device(sub)
        param = next(itertools.chain(sub.parameters(recurse=False), sub.buffers(recurse=False)), None)
        if device is not None or param is not None:
            return device or param.device
    return None


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run each kernel family now, e.g. ``{"rms_norm": 61, ...}``.

    Counts only modules that are patched for the family, compute on a device where the kernels
    run (a module offloaded by accelerate counts on its execution device), would run the kernel
    if called now (a transformers ``*ForCausalLM``'s fused loss by the test its forward makes at
    each call: not while PEFT's ``modules_to_save`` or a LoRA wraps its ``lm_head``, see
    ``integrations.transformers.loss._fused_loss_applies``), and are reached by the model's forward
    (of the copies a PEFT ``ModulesToSaveWrapper`` holds, only the one it calls).
    """
    counts = dict.fromkeys(FLAGS, 0)
    idle = _idle_modules(model)
    for module, device in _compute_devices(model).items():
        if module not in idle and triton_runs_on(device):
            for flag in type(module)._lk_kernels:
                counts[flag] += _runs_kernel(module, flag)
    return counts


def _runs_kernel(module: torch.nn.Module, flag: str) -> bool:
    """Whether ``module``, patched for ``flag``, runs that kernel when called now.

    Every row decides at patch time except the fused loss of a transformers ``*ForCausalLM``,
    whose forward checks its LM head at each call
    (:func:`llama_kernels.integrations.transformers.loss._fused_loss_applies`, asked here too); the
    reference model's ``Llama.loss`` always runs it.
    """
    if flag == "cross_entropy" and not isinstance(module, llama_model.Llama):
        from .integrations.transformers.loss import _fused_loss_applies

        return _fused_loss_applies(module)
    return True


def _idle_modules(model: torch.nn.Module) -> set:
    """The modules inside ``model`` that its forward does not reach now: PEFT's
    ``ModulesToSaveWrapper`` (``modules_to_save=[...]``) holds the original module and a copy per
    adapter and calls one of them, as its ``forward`` decides (the active adapter's copy; the
    original while adapters are disabled or the active adapter has no copy)."""
    other = sys.modules.get("peft.utils.other")  # no PEFT imported: no wrappers
    wrapper_class = getattr(other, "ModulesToSaveWrapper", None)
    if wrapper_class is None:
        return set()
    idle = set()
    for wrapper in model.modules():
        if not isinstance(wrapper, wrapper_class):
            continue
        copies = wrapper.modules_to_save
        active = getattr(wrapper, "active_adapters", None)  # older PEFT: only active_adapter
        if active is None:
            active = wrapper.active_adapter
        if isinstance(active, str):
            active = [active]
        if wrapper.disable_adapters or not active or any(name not in copies for name in active):
            called = wrapper.original_module
        else:
            called = copies[active[0]]
        for branch in (wrapper.original_module, *copies.values()):
            if branch is not called:
                idle.update(branch.modules())
    return idle
