"""Weight-only quantisation of a model's projections: ``quantize_weights(model, bits=8 | 4)``.

Every ``nn.Linear`` of the attention and MLP blocks becomes a :class:`QuantizedLinear` that keeps
8-bit or 4-bit weights (formats: :mod:`llama_kernels.ops.quantized`) and runs the dequantising
matmul kernel; the embedding and, by default, the LM head stay as they are.  Quantisation is
round-to-nearest::

    int8:  s[n] = max_k |W[n, k]| / 127,          q = clamp(round(W / s), -127, 127)
    int4:  per group of G input features, lo = min(W, 0), hi = max(W, 0):
           s = (hi - lo) / 15,  z = clamp(round(-lo / s), 0, 15),  q = clamp(round(W / s) + z, 0, 15)

with the scales stored in the weight's dtype and ``q`` computed from the stored scale (so that
``(q - z) * s`` is within half a step of ``W`` except where clamped).  The quantised weights are
buffers (frozen: no gradients; ``state_dict`` holds them), the bias stays a parameter.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import reference
from .ops.common import FLOAT_DTYPES, check_tensor, values_readable
from .ops.quantized import BITS, GROUP_SIZES, INT4_MAX, INT8_MAX, check_quantized_weight, quantized_linear

DEFAULT_GROUP_SIZE = 128  # int4 (gpt-fast's and torchao's default)


class QuantizedWeight(NamedTuple):
    """A quantised ``(N, K)`` weight: the arguments :func:`~llama_kernels.ops.quantized.quantized_linear`
    takes (``zeros`` None and ``group_size`` None for int8)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: Optional[int]


def _check_format(bits, group_size) -> Optional[int]:
    """``group_size`` as used for ``bits`` (int4's default filled in); errors name the argument."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"group_size must be None for bits=8 (one scale per output row), got {group_size!r}")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for bits=4, got {group_size!r}")
    return group_size


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: Optional[int] = None) -> QuantizedWeight:
    """Round-to-nearest quantisation of a ``(N, K)`` floating-point weight (module docstring).

    ``bits=4`` needs ``K`` divisible by ``group_size`` (32, 64, 128 or 256; default 128).  Scales
    keep ``weight``'s dtype.  Refuses non-finite weights.  Works on meta and fake tensors (shapes
    only), so quantised models can be planned and measured at any size.
    """
    group_size = _check_format(bits, group_size)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    n, k = weight.shape
    if bits == 4 and k % group_size:
        raise ValueError(f"weight has {k} input features, not a multiple of group_size {group_size}")
    if values_readable(weight) and weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values (inf or NaN): they cannot be quantised")
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(compute)
    if bits == 8:
        scales = (w.abs().amax(dim=1) / INT8_MAX).to(weight.dtype)
        s = _nonzero(scales.to(compute))
        q = torch.round(w / s[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedWeight(q, scales, None, 8, None)
    w = w.view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / INT4_MAX).to(weight.dtype)
    s = _nonzero(scales.to(compute))
    zeros = torch.round(-lo / s).clamp(0, INT4_MAX)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, INT4_MAX).to(torch.uint8).view(n, k // 2, 2)
    packed = q[..., 0] | (q[..., 1] << 4)
    return QuantizedWeight(packed, scales, zeros.to(torch.uint8), 4, group_size)


def _nonzero(scale):
    # A row or group of zeros gets scale 0 (it dequantises to zeros); divide by 1 there instead.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` with 8-bit or 4-bit weights: ``y = x @ W.T + bias`` by the
    dequantising matmul (:func:`~llama_kernels.ops.quantized.quantized_linear`).

    Buffers ``qweight``, ``scales`` and (int4) ``zeros``; ``bias`` a parameter or None.  It is an
    ``nn.Linear`` (``in_features``, ``out_features``) so that PEFT wraps it in LoRA layers, but has
    no ``weight``: :meth:`dequantized_weight` makes one.  Gradients reach the input and the bias.
    """

    # op slot: (x, qweight, scales, zeros, bias, *, bits, group_size) -> y; the kernel (which runs
    # the eager reference where no Triton kernel can run), or reference.quantized_linear
    quantized_linear = staticmethod(quantized_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: Optional[int] = None, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight to allocate
        group_size = _check_format(bits, group_size)
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
    group_size = _check_format(bits, group_size)
    if not isinstance(include_lm_head, bool):
        raise TypeError(f"include_lm_head must be True or False, got {include_lm_head!r}")
    head = _output_embedding(model)
    tuner = _tuner_layer_class()
    targets, problems = [], []
    for name, module in model.named_modules():
        if tuner is not None and isinstance(module, tuner):
            raise ValueError(f"{name} is a PEFT adapter layer: quantise the model before adding adapters")
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantised ({module.bits}-bit)")
        if not isinstance(module, nn.Linear) or (module is head and not include_lm_head):
            continue
        if type(module) is not nn.Linear:
            problems.append(f"{name} ({type(module).__name__}: not a plain nn.Linear)")
        elif bits == 4 and module.in_features % group_size:
            problems.append(f"{name} ({module.in_features} input features, not a multiple of {group_size})")
        else:
            targets.append(name)
    if problems:
        raise ValueError(f"cannot quantise to {bits} bits: " + "; ".join(problems))
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), bits, group_size))
    return model
