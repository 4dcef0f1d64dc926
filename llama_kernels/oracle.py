"""The accuracy rule every op is held to, shared by the tests and ``llama-kernels check``.

An op is compared with its eager twin (:mod:`llama_kernels.reference`) run twice: in float64, the
*oracle*, and at the op's own precision, *eager*, whose error against the oracle is what a user
already accepts.  The op's error may be at most twice eager's, plus a floor of 1e-6 of the
output's scale that only matters where eager is exact to the last bit (FlashAttention's rule)::

    max |out - oracle|  <=  2 * max |eager - oracle|  +  1e-6 * max(1, max |oracle|)

Gradients are compared the same way, each side differentiating ``sum(out * cotangent)`` (the sum
in float64) for one shared cotangent.

:func:`check_forward` and :func:`check_backward` are the one loop that runs an op, its eager twin
and the oracle on the same inputs and compares them (:class:`Comparison`); the tests assert on it,
``llama-kernels check`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

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


@dataclass(frozen=True)
class Comparison:
    """The rule applied to one result (an output, or the gradient of one input): ``problem`` is
    set when the result cannot be compared (wrong shape or dtype, non-finite values, a missing
    output), else ``error <= bound`` decides."""

    label: str
    error: float = 0.0
    eager_error: float = 0.0
    bound: float = 0.0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= self.bound

    @property
    def margin(self) -> float:
        """``error / bound``: at most 1 passes (infinite for a problem)."""
        return float("inf") if self.problem else self.error / self.bound

    def describe(self) -> str:
        if self.problem:
            return f"{self.label}: {self.problem}"
        verdict = "within" if self.ok else "exceeds"
        return (f"{self.label}: error {self.error:.3g} vs float64 {verdict} 2 x eager's {self.eager_error:.3g} "
                f"+ {self.bound - 2 * self.eager_error:.2g}")


def compare(label: str, out: torch.Tensor, oracle: torch.Tensor, eager: torch.Tensor,
            floor: float | None = None) -> Comparison:
    """The rule on one (kernel, float64 oracle, eager) triple; the kernel's result must also have
    the oracle's shape, eager's dtype and only finite values."""
    if out.shape != oracle.shape or out.dtype != eager.dtype:
        return Comparison(label, problem=f"{out.dtype} {tuple(out.shape)}, expected {eager.dtype} "
                                         f"{tuple(oracle.shape)}")
    if not torch.isfinite(out).all():
        return Comparison(label, problem="non-finite values")
    return Comparison(label, max_error(out, oracle), max_error(eager, oracle), error_bound(oracle, eager, floor))


@dataclass(frozen=True)
class CheckResult:
    """What one check found: a :class:`Comparison` per result, and the kernel's outputs."""

    comparisons: list
    outputs: tuple

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def worst(self) -> Comparison:
        """The comparison closest to failing (or failing most)."""
        return max(self.comparisons, key=lambda c: c.margin)


def _compare_all(labels, outs, oracles, eagers) -> list[Comparison]:
    if len(outs) != len(oracles):
        return [Comparison(labels[0] if labels else "outputs",
                           problem=f"{len(outs)} results, the reference has {len(oracles)}")]
    return [compare(label, o.detach(), r.detach(), e.detach()) for label, o, r, e in zip(labels, outs, oracles, eagers)]


def _at(args, kwargs, dtype=None, grad=()):
    """``args``/``kwargs`` for one side of a check: the floating tensors at positions ``grad`` become
    fresh leaves requiring grad (strides kept), the other floating tensors stay constants; all of
    them cast to ``dtype`` when given (the oracle's float64), else at their own precision."""
    def convert(i, a):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            return a
        return leaf(a, dtype) if i in grad else a.to(dtype or a.dtype)

    return (tuple(convert(i, a) for i, a in enumerate(args)),
            {name: convert(None, a) for name, a in kwargs.items()})


def check_forward(kernel: Callable, eager: Callable, args: Sequence, kwargs: dict | None = None) -> CheckResult:
    """The outputs of ``kernel(*args, **kwargs)`` without autograd (what inference runs) against
    ``eager`` at the inputs' precision and in float64."""
    kwargs = kwargs or {}
    with torch.no_grad():
        outs, eagers = as_tuple(kernel(*args, **kwargs)), as_tuple(eager(*args, **kwargs))
        o_args, o_kwargs = _at(args, kwargs, torch.float64)
        oracles = as_tuple(eager(*o_args, **o_kwargs))
    return CheckResult(_compare_all([f"output {i}" for i in range(len(oracles))], outs, oracles, eagers), outs)


def check_backward(kernel: Callable, eager: Callable, args: Sequence, kwargs: dict | None = None,
                   grad: Sequence[int] | None = None, names: Sequence[str] | None = None,
                   generator: torch.Generator | None = None, gradients: bool = True) -> CheckResult:
    """The training forward's outputs (inputs requiring grad), then, unless ``gradients`` is false,
    the gradients of ``args[i]`` for ``i`` in ``grad`` (default: every argument), for one random
    cotangent per output (drawn from ``generator``, or torch's global one), against ``eager``'s and
    the float64 oracle's.  The gradients are left out when an output already fails."""
    kwargs = kwargs or {}
    grad = tuple(range(len(args))) if grad is None else tuple(grad)
    names = names or [f"input {i}" for i in range(len(args))]
    sides = [_at(args, kwargs, dtype, grad) for dtype in (None, None, torch.float64)]
    results = [as_tuple(fn(*a, **kw)) for fn, (a, kw) in zip((kernel, eager, eager), sides)]
    k_out, e_out, o_out = results
    outputs = _compare_all([f"training output {i}" for i in range(len(o_out))], k_out, o_out, e_out)
    if not gradients or not all(c.ok for c in outputs):
        return CheckResult(outputs, k_out)
    device = args[grad[0]].device if grad else o_out[0].device
    cots = [torch.randn(o.shape, generator=generator, device=device).to(e.dtype) for o, e in zip(o_out, e_out)]
    k_g, e_g, o_g = (grads(out, [side[0][i] for i in grad], cots) for out, side in zip(results, sides))
    return CheckResult(outputs + _compare_all([f"grad of {names[i]}" for i in grad], k_g, o_g, e_g), k_out)
