"""The LM head and its loss: fused linear cross-entropy (``linear_cross_entropy``)."""
from __future__ import annotations

import torch

from .harness import Inputs, OpSpec, by_mode, liger_provider

# Share of the targets set to the ignore index (-100), at random positions: prompt tokens and
# sequence boundaries carry no loss in a real batch, and the kernels must skip them.
LCE_IGNORED = 1 / 16


def _build_lce(case, gen, grad):
    # hidden (N, H) ~ N(0, 1), as the final RMSNorm leaves it; weight (V, H) ~ N(0, 1/H), so the
    # logits have a standard deviation of about 1 (a realistic spread: a softmax neither flat nor
    # one-hot); targets uniform over the vocabulary, N/16 of them (at least one) ignored.  One set
    # holds the whole weight (1 GiB at LLaMA-3-8B's shape in bf16), more than twice the L2, so the
    # rotation (sets until their total passes 2x the L2) builds a single set: no pile of weights.
    n, h, v = case.tokens, case.dims["hidden"], case.dims["vocab"]
    x = torch.randn(n, h, generator=gen, device=case.device, dtype=case.dtype).requires_grad_(grad)
    w = torch.randn(v, h, generator=gen, device=case.device, dtype=case.dtype).mul_(h ** -0.5).requires_grad_(grad)
    target = torch.randint(0, v, (n,), generator=gen, device=case.device)
    ignored = torch.randperm(n, generator=gen, device=case.device)[: max(1, round(n * LCE_IGNORED))]
    target[ignored] = -100
    return Inputs((x, w, target), (x, w))


def _work_lce(case, mode):
    # The matrix products a minimal implementation does: logits = x W^T (2NVH), then dx = dlogits W
    # and dW = dlogits^T x (4NVH); every token counted, ignored ones included.  The softmax is O(NV).
    fwd = 2 * case.tokens * case.dims["vocab"] * case.dims["hidden"]
    return by_mode(mode, fwd, 2 * fwd), "FLOP"


def _lce_call(f):
    return lambda x, w, target: f(x, w, target)  # ignore_index -100, mean over the targets kept


def _liger_lce_call(fn):
    # liger_fused_linear_cross_entropy(input, weight, target, bias=None, ..., ignore_index=-100,
    # ..., reduction="mean") returns the loss alone unless z-loss or accuracy are asked for.
    return lambda x, w, target: fn(x, w, target, ignore_index=-100, reduction="mean")


LINEAR_CROSS_ENTROPY = OpSpec(
    "linear_cross_entropy", "fused_linear_cross_entropy", "fused_linear_cross_entropy", _lce_call,
    _build_lce, _work_lce, lambda m: {"hidden": m["hidden"], "vocab": m["vocab"]},
    ("llama3-8b", "llama2-7b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy",
                             _liger_lce_call,
                             "liger_fused_linear_cross_entropy: computes the input and weight gradients in "
                             "its forward (chunks of tokens) and only scales them in its backward (a repeated "
                             "backward, as the backward mode times, recomputes them once, then reuses them), "
                             "so compare forward+backward")},
    sweep="lce", memory_vs="eager",
    note="LM head and loss: mean cross-entropy of x (N, H) W^T (V, H) over N targets (N/16 ignored, -100), "
         "in float32 from half-precision inputs; gradients of x and W. Work: the matrix products, "
         "forward 2NVH FLOP (the logits), backward 4NVH (dx and dW), compared with the bf16 matmul "
         "rate. Eager materialises the (N, V) logits (bf16 and float32); a fused provider may compute "
         "the gradients in its forward, so forward+backward is the figure to compare. Peak memory "
         "(the last figure of each cell) is the target: ours <= 1/4 of eager's at 8k tokens "
         "(ours' ratio listed under the table).")
