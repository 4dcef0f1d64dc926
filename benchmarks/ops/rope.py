"""Rotary position embeddings of q and k (``apply_rotary``; the registry's sample of that name:
q, k transposed views' layouts, cos/sin tables of the model's ``rope_theta``)."""
from __future__ import annotations

from .harness import OpSpec, by_mode, element_size, head_dims, liger_provider


def _work_rope(case, mode):
    n, d, s = case.tokens, case.dims["d"], element_size(case)
    one_way = (2 * n * (case.dims["hq"] + case.dims["hk"]) * d + 2 * n * d) * s
    return by_mode(mode, one_way, one_way), "B"


def _liger_rope(fn):  # a function of ours, so that the provider's note is not set on Liger's
    return lambda q, k, cos, sin: fn(q, k, cos, sin)


APPLY_ROTARY = OpSpec(
    "apply_rotary", "apply_rotary", _work_rope, head_dims, ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.transformers.rope.liger_rotary_pos_emb", _liger_rope,
                             "liger_rotary_pos_emb rotates q and k in place")},
    note="q (1, Hq, N, D), k (1, Hk, N, D) as transposed views of (1, N, H, D), cos/sin (N, D): each "
         "direction (2N(Hq + Hk)D + 2ND)s: read q, k (or their gradients), cos, sin; write two outputs.")
