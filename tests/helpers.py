"""Shared test helpers: the float64-oracle comparison every op test uses."""
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_like_eager(name, out, oracle, eager, floor=None):
    """``out``'s error against the float64 ``oracle`` must be at most 2x ``eager``'s plus a floor.

    ``eager`` is the reference op run at ``out``'s precision: the error a user already accepts.
    The floor (1e-6 of the output's scale) only matters where eager is exact to the last bit.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != eager's {eager.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, eager_err = max_error(out, oracle), max_error(eager, oracle)
    if floor is None:
        floor = 1e-6 * max(1.0, oracle.abs().max().item() if oracle.numel() else 1.0)
    assert err <= 2 * eager_err + floor, (
        f"{name}: error {err:.3g} vs float64 exceeds 2 x eager's {eager_err:.3g} + {floor:.2g}"
    )


def grads(outputs, inputs, cotangents):
    """Gradients of ``sum(out * cot)`` (in float64 when the outputs are float64) w.r.t. ``inputs``."""
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def leaf(t, dtype=None):
    """A fresh leaf copy of ``t`` (optionally cast) that requires grad, keeping ``t``'s strides."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t).requires_grad_()


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_against_oracle(name, kernel_fn, reference_fn, inputs, backward=True):
    """Check ``kernel_fn(*inputs)`` and its gradients against ``reference_fn`` by the 2x rule.

    ``reference_fn`` runs twice: on copies of ``inputs`` at their own precision (eager) and on
    float64 copies (the oracle).  Every input is differentiated; strides are kept, so a
    non-contiguous input stays non-contiguous for the kernel.
    """
    k_in = [leaf(t) for t in inputs]
    e_in = [leaf(t) for t in inputs]
    o_in = [leaf(t, torch.float64) for t in inputs]
    k_out, e_out, o_out = _tuple(kernel_fn(*k_in)), _tuple(reference_fn(*e_in)), _tuple(reference_fn(*o_in))
    assert len(k_out) == len(o_out), f"{name}: {len(k_out)} outputs, reference has {len(o_out)}"
    for i, (k, e, o) in enumerate(zip(k_out, e_out, o_out)):
        assert_like_eager(f"{name} output {i}", k, o, e)
    if not backward:
        return k_out
    cots = [torch.randn(o.shape, device=o.device).to(e.dtype) for o, e in zip(o_out, e_out)]
    k_g, e_g, o_g = grads(k_out, k_in, cots), grads(e_out, e_in, cots), grads(o_out, o_in, cots)
    for i, (k, e, o) in enumerate(zip(k_g, e_g, o_g)):
        assert_like_eager(f"{name} grad of input {i}", k, o, e)
    return k_out
