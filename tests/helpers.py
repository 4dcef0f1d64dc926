"""Shared test helpers: the float64-oracle comparison every op test uses (the rule itself, and the
small helpers re-exported here, live in llama_kernels.oracle, which `llama-kernels check` uses too)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_kernels.oracle import as_tuple, error_bound, grads, leaf, max_error  # noqa: F401 (re-exported)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_like_eager(name, out, oracle, eager, floor=None):
    """``out``'s error against the float64 ``oracle`` must be at most 2x ``eager``'s plus a floor.

    ``eager`` is the reference op run at ``out``'s precision: the error a user already accepts.
    The floor (1e-6 of the output's scale) only matters where eager is exact to the last bit.
    """
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != eager's {eager.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, eager_err, bound = max_error(out, oracle), max_error(eager, oracle), error_bound(oracle, eager, floor)
    assert err <= bound, (
        f"{name}: error {err:.3g} vs float64 exceeds 2 x eager's {eager_err:.3g} + {bound - 2 * eager_err:.2g}"
    )


def check_against_oracle(name, kernel_fn, reference_fn, inputs, backward=True):
    """Check ``kernel_fn(*inputs)`` and its gradients against ``reference_fn`` by the 2x rule.

    ``reference_fn`` runs twice: on copies of ``inputs`` at their own precision (eager) and on
    float64 copies (the oracle).  Every input is differentiated; strides are kept, so a
    non-contiguous input stays non-contiguous for the kernel.
    """
    k_in = [leaf(t) for t in inputs]
    e_in = [leaf(t) for t in inputs]
    o_in = [leaf(t, torch.float64) for t in inputs]
    k_out, e_out, o_out = as_tuple(kernel_fn(*k_in)), as_tuple(reference_fn(*e_in)), as_tuple(reference_fn(*o_in))
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


class OpOutputs(TorchDispatchMode):
    """Records ``(op name, shape, dtype)`` of every tensor each op returns while it is active (on
    fake tensors too: the shapes of what a step makes, with nothing computed)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out
