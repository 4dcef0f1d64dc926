"""SwiGLU, the gated MLP's activation: ``silu(g) * u`` (``swiglu``)."""
from __future__ import annotations

from .harness import Inputs, OpSpec, by_mode, element_size, liger_provider, randn


def _build_swiglu(case, gen, grad):
    g = randn(case, gen, case.tokens, case.dims["intermediate"], grad=grad)
    u = randn(case, gen, case.tokens, case.dims["intermediate"], grad=grad)
    return Inputs((g, u), (g, u))


def _work_swiglu(case, mode):
    n, i, s = case.tokens, case.dims["intermediate"], element_size(case)
    return by_mode(mode, 3 * n * i * s, 5 * n * i * s), "B"


def _swiglu_call(f):  # ours and eager (and what torch.compile compiles) alike
    return lambda g, u: f(g, u)


SWIGLU = OpSpec(
    "swiglu", "swiglu", "swiglu", _swiglu_call, _build_swiglu, _work_swiglu,
    lambda m: {"intermediate": m["intermediate"]}, ("llama3-8b", "llama2-7b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerSiLUMulFunction", lambda fn: lambda g, u: fn.apply(g, u),
                             "LigerSiLUMulFunction; its backward writes the gradients into the saved inputs, so "
                             "repeated timed backwards see drifting values (the same bytes move)")},
    note="N tokens x I intermediate: forward 3NIs: read g, u; write y. Backward 5NIs: read dy, g, u; "
         "write dg, du.")
