"""Weight-only quantisation of a model's projections: ``quantize_weights(model, bits=8 | 4)``.

Every ``nn.Linear`` of the attention and MLP blocks becomes a :class:`QuantizedLinear` that keeps
8-bit or 4-bit weights (formats: :mod:`llama_kernels.ops.quantized`) and runs the dequantising
matmul kernel; the embedding and, by default, the LM head stay as they are.  Quantisation is
round-to-nearest (:func:`~llama_kernels.ops.quantized.quantize_weight`, re-exported here), the
scales in the weight's dtype.  The quantised weights are buffers (frozen: no gradients;
``state_dict`` holds them), the bias stays a parameter.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from . import reference
from .ops.quantized import (  # noqa: F401  (QuantizedWeight, quantize_weight: part of this module's API)
    GROUP_SIZES,
    QuantizedWeight,
    check_format,
    check_quantized_weight,
    quantize_weight,
    quantized_linear,
)


class NoFloatWeight(torch.Tensor):
    """A :class:`QuantizedLinear`'s ``weight``: the float weight's shape, dtype and device, no
    values.  Code that only inspects an ``nn.Linear``'s weight (PEFT: its type, device and dtype)
    works; every operation on it raises, so that nothing reads it or merges into it silently (PEFT's
    ``merge_and_unload`` would add LoRA's update to a copy and drop it)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"a QuantizedLinear keeps no float weight, so {func} cannot run on its .weight "
                           "(QuantizedLinear.dequantized_weight() makes one)")

    def __repr__(self):
        return f"NoFloatWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` with 8-bit or 4-bit weights: ``y = x @ W.T + bias`` by the
    dequantising matmul (:func:`~llama_kernels.ops.quantized.quantized_linear`).

    Buffers ``qweight``, ``scales`` and (int4) ``zeros``; ``bias`` a parameter or None.  It is an
    ``nn.Linear`` (``in_features``, ``out_features``) so that PEFT wraps it in LoRA layers; its
    ``weight`` is a :class:`NoFloatWeight` (every operation on it raises):
    :meth:`dequantized_weight` makes a real one.  Gradients reach the input and the bias.
    """

    # op slot: (x, qweight, scales, zeros, bias, *, bits, group_size) -> y; the kernel (which runs
    # the eager reference where no Triton kernel can run), or reference.quantized_linear
    quantized_linear = staticmethod(quantized_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: Optional[int] = None, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight to allocate
        group_size = check_format(bits, group_size)
        if bits == 4 and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", None)
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: Optional[int] = None) -> "QuantizedLinear":
        """A quantised copy of ``linear`` (its bias shared, not copied; ``requires_grad`` kept)."""
        quantized = quantize_weight(linear.weight, bits, group_size)
        module = cls(linear.in_features, linear.out_features, bias=False, bits=bits,
                     group_size=quantized.group_size, device="meta")
        module.qweight, module.scales, module.zeros = quantized.qweight, quantized.scales, quantized.zeros
        module.bias = linear.bias
        return module

    @property
    def weight(self) -> NoFloatWeight:
        return NoFloatWeight((self.out_features, self.in_features), self.scales.dtype, self.qweight.device)

    @weight.setter
    def weight(self, value):
        raise AttributeError("a QuantizedLinear's weight cannot be set: quantise a new layer "
                             "(QuantizedLinear.from_linear) instead")

    def forward(self, x):
        return self.quantized_linear(x, self.qweight, self.scales, self.zeros, self.bias, bits=self.bits,
                                     group_size=self.group_size)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer multiplies by, in ``dtype``
        (default: the scales')."""
        return reference.dequantize_weight(self.qweight, self.scales, self.zeros, bits=self.bits,
                                           group_size=self.group_size, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another format (or an unquantised one) must not load by shape alone.
        qweight = state_dict.get(prefix + "qweight")
        if qweight is not None:
            zeros = state_dict.get(prefix + "zeros")
            check_quantized_weight(qweight, state_dict.get(prefix + "scales", self.scales), zeros,
                                   bits=self.bits, group_size=self.group_size, in_features=self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}{group}")


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        return get()
    return getattr(model, "lm_head", None)


def _tuner_layer_class():
    # PEFT's adapter layers, if PEFT is imported (it is not a dependency).
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(tuners, "BaseTunerLayer", None) if tuners is not None else None


def _group_hint(model, bits, head, include_lm_head) -> str:
    # The group sizes every projection's input features divide, if any: what to ask for instead.
    if bits != 4:
        return ""
    widths = {m.in_features for m in model.modules()
              if type(m) is nn.Linear and (m is not head or include_lm_head)}
    fitting = [g for g in GROUP_SIZES if widths and all(w % g == 0 for w in widths)]
    return f"; group_size {' or '.join(map(str, fitting))} would fit" if fitting else ""


def quantize_weights(model: nn.Module, bits: int = 8, group_size: Optional[int] = None, *,
                     include_lm_head: bool = False) -> nn.Module:
    """Replace ``model``'s attention and MLP projections by :class:`QuantizedLinear` s, in place;
    returns ``model``.

    ``bits=8``: int8 weights, one scale per output feature.  ``bits=4``: int4 weights in groups of
    ``group_size`` input features (32, 64, 128 or 256; default 128) with a scale and zero point
    each.  Every plain ``nn.Linear`` is replaced except the LM head (``get_output_embeddings()``,
    or ``lm_head``), unless ``include_lm_head`` (a head tied to the embedding is then untied: the
    embedding keeps its weight).  Works on ``llama_kernels.model.Llama`` and on transformers models
    of every family; call it before ``apply_kernels`` or after, and before adding PEFT adapters
    (LoRA then trains on the frozen quantised base).

    Refused, before anything is replaced: other bit widths and group sizes, layers whose input
    features are not a multiple of the group (naming them), other ``nn.Linear`` subclasses (already
    quantised or wrapped: bitsandbytes, PEFT adapters), and a model that is already quantised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    group_size = check_format(bits, group_size)
    if not isinstance(include_lm_head, bool):
        raise TypeError(f"include_lm_head must be True or False, got {include_lm_head!r}")
    head = _output_embedding(model)
    tuner = _tuner_layer_class()
    targets, problems = [], {}  # problems: reason -> the layers it concerns
    for name, module in model.named_modules():
        if tuner is not None and isinstance(module, tuner):
            raise ValueError(f"{name} is a PEFT adapter layer: quantise the model before adding adapters")
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantised ({module.bits}-bit)")
        if not isinstance(module, nn.Linear) or (module is head and not include_lm_head):
            continue
        if type(module) is not nn.Linear:
            problems.setdefault(f"{type(module).__name__}, not a plain nn.Linear", []).append(name)
        elif bits == 4 and module.in_features % group_size:
            problems.setdefault(f"{module.in_features} input features, not a multiple of {group_size}", []).append(name)
        else:
            targets.append(name)
    if problems:
        raise ValueError(f"cannot quantise to {bits} bits: " + "; ".join(
            f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} ({reason})"
            for reason, names in problems.items()) + _group_hint(model, bits, head, include_lm_head))
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), bits, group_size))
    return model
