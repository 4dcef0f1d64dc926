"""The accuracy rule every op is held to, shared by the tests and ``llama-kernels check``.

An op is compared with its eager twin (:mod:`llama_kernels.reference`) run twice: in float64, the
*oracle*, and at the op's own precision, *eager*, whose error against the oracle is what a user
already accepts.  The op's error may be at most twice eager's, plus a floor of 1e-6 of the
output's scale that only matters where eager is exact to the last bit (FlashAttention's rule)::

    max |out - oracle|  <=  2 * max |eager - oracle|  +  1e-6 * max(1, max |oracle|)

Gradients are compared the same way, each side differentiating ``sum(out * cotangent)`` (the sum
in float64) for one shared cotangent.
"""
from __future__ import annotations

import torch


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def error_bound(oracle: torch.Tensor, eager: torch.Tensor, floor: float | None = None) -> float:
    """The largest error against ``oracle`` that the rule allows: twice ``eager``'s plus the floor
    (default 1e-6 of the oracle's scale)."""
    if floor is None:
        floor = 1e-6 * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    return 2 * max_error(eager, oracle) + floor


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy of ``t`` (optionally cast) that requires grad, keeping ``t``'s strides, so
    a non-contiguous input stays non-contiguous for the kernel."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t).requires_grad_()


def as_tuple(x) -> tuple:
    """An op's result as a tuple (ops return one tensor or several)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def grads(outputs, inputs, cotangents) -> tuple:
    """Gradients of ``sum(out * cot)``, the sum in float64, with respect to ``inputs``."""
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)
