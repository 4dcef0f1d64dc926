"""Rotary position embeddings of q and k (``apply_rotary``)."""
from __future__ import annotations

import torch

from llama_kernels import reference

from .harness import Inputs, OpSpec, by_mode, element_size, head_dims, heads, liger_provider


def _build_rope(case, gen, grad):
    (qb, q), (kb, k) = (heads(case, gen, case.dims[h], case.tokens, grad) for h in ("hq", "hk"))
    d = case.dims["d"]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=case.device).float() / d))
    cos, sin = reference.rotary_cos_sin(torch.arange(case.tokens, device=case.device), inv_freq, case.dtype)
    return Inputs((q, k, cos, sin), (qb, kb))


def _work_rope(case, mode):
    n, d, s = case.tokens, case.dims["d"], element_size(case)
    one_way = (2 * n * (case.dims["hq"] + case.dims["hk"]) * d + 2 * n * d) * s
    return by_mode(mode, one_way, one_way), "B"


def _rope_call(f):  # ours, eager and Liger's liger_rotary_pos_emb take the same arguments
    return lambda q, k, cos, sin: f(q, k, cos, sin)


APPLY_ROTARY = OpSpec(
    "apply_rotary", "apply_rotary", "apply_rotary", _rope_call, _build_rope, _work_rope, head_dims,
    ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.transformers.rope.liger_rotary_pos_emb", _rope_call,
                             "liger_rotary_pos_emb rotates q and k in place")},
    note="q (1, Hq, N, D), k (1, Hk, N, D) as transposed views of (1, N, H, D), cos/sin (N, D): each "
         "direction (2N(Hq + Hk)D + 2ND)s: read q, k (or their gradients), cos, sin; write two outputs.")
