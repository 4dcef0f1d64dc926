"""SwiGLU, the gated MLP's activation: ``silu(g) * u`` (``swiglu``; the registry's sample of that
name, gate and up ``(1, N, I)``)."""
from __future__ import annotations

from .harness import OpSpec, by_mode, element_size, liger_provider


def _work_swiglu(case, mode):
    n, i, s = case.tokens, case.dims["intermediate"], element_size(case)
    return by_mode(mode, 3 * n * i * s, 5 * n * i * s), "B"


SWIGLU = OpSpec(
    "swiglu", "swiglu", _work_swiglu, lambda m: {"intermediate": m["intermediate"]},
    ("llama3-8b", "llama2-7b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerSiLUMulFunction", lambda fn: lambda g, u: fn.apply(g, u),
                             "LigerSiLUMulFunction; its backward writes the gradients into the saved inputs, so "
                             "repeated timed backwards see drifting values (the same bytes move)")},
    note="N tokens x I intermediate: forward 3NIs: read g, u; write y. Backward 5NIs: read dy, g, u; "
         "write dg, du.")
