"""Shared test helpers: the float64-oracle comparison every op test uses (the rule itself, and the
small helpers re-exported here, live in llama_kernels.oracle, which `llama-kernels check` uses too)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_kernels.ops import registry
from llama_kernels.oracle import (as_tuple, check_backward, check_forward, compare, error_bound, grads,  # noqa: F401
                                  leaf, max_error)

DTYPES = list(registry.DTYPES.values())
# apply_kernels(..., **ALL_OFF) restores the eager model.
ALL_OFF = dict.fromkeys(registry.FLAGS, False)


def launched_flags(among=registry.FLAGS) -> set:
    """The ``apply_kernels`` flags (of ``among``) whose kernels ``LAUNCHES`` has counted."""
    from llama_kernels.ops.common import LAUNCHES

    return {flag for flag in map(registry.flag_of_kernel, LAUNCHES) if flag in among}


def assert_like_eager(name, out, oracle, eager, floor=None):
    """``out``'s error against the float64 ``oracle`` must be at most 2x ``eager``'s plus a floor.

    ``eager`` is the reference op run at ``out``'s precision: the error a user already accepts.
    The floor (1e-6 of the output's scale) only matters where eager is exact to the last bit.
    """
    comparison = compare(name, out, oracle, eager, floor)
    assert comparison.ok, comparison.describe()


def assert_all_pass(name, result):
    """Every comparison of one oracle check (:class:`~llama_kernels.oracle.CheckResult`) passes
    (the message names the first that does not); returns the kernel's outputs."""
    for comparison in result.comparisons:
        assert comparison.ok, f"{name} {comparison.describe()}"
    return result.outputs


def check_against_oracle(name, kernel_fn, reference_fn, inputs, backward=True):
    """Check ``kernel_fn(*inputs)`` and its gradients against ``reference_fn`` by the 2x rule.

    ``reference_fn`` runs twice: on copies of ``inputs`` at their own precision (eager) and on
    float64 copies (the oracle).  Every input is differentiated (with ``backward=False``, only
    the training forward's outputs are compared); strides are kept, so a
    non-contiguous input stays non-contiguous for the kernel.  The loop is the oracle's
    (:func:`llama_kernels.oracle.check_backward`), the one ``llama-kernels check`` runs.
    """
    return assert_all_pass(name, check_backward(kernel_fn, reference_fn, inputs, gradients=backward))


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
