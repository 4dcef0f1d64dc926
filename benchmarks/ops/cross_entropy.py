"""The LM head and its loss: fused linear cross-entropy (``linear_cross_entropy``).

Inputs: the registry's ``fused_linear_cross_entropy`` sample: hidden ``(1, N, H)`` ~ N(0, 1), as
the final RMSNorm leaves it; weight ``(V, H)`` ~ N(0, 1/H), so the logits have a standard deviation
of about 1 (a realistic spread: a softmax neither flat nor one-hot); targets ``(1, N)`` uniform over
the vocabulary, ``registry.LOSS_IGNORED`` of them (at least one) the ignore index -100.  One set
holds the whole weight (1 GiB at LLaMA-3-8B's shape in bf16), more than twice the L2, so the
rotation (sets until their total passes 2x the L2) builds a single set: no pile of weights.
"""
from __future__ import annotations

from .harness import OpSpec, by_mode, liger_provider


def _work_lce(case, mode):
    # The matrix products a minimal implementation does: logits = x W^T (2NVH), then dx = dlogits W
    # and dW = dlogits^T x (4NVH); every token counted, ignored ones included.  The softmax is O(NV).
    fwd = 2 * case.tokens * case.dims["vocab"] * case.dims["hidden"]
    return by_mode(mode, fwd, 2 * fwd), "FLOP"


def _liger_lce(fn):
    # liger_fused_linear_cross_entropy(input, weight, target, bias=None, ..., ignore_index=-100,
    # ..., reduction="mean") takes (N, H) and (N,) and returns the loss alone unless z-loss or
    # accuracy are asked for.
    return lambda hidden, weight, target: fn(hidden.flatten(0, -2), weight, target.flatten(), ignore_index=-100,
                                             reduction="mean")


LINEAR_CROSS_ENTROPY = OpSpec(
    "linear_cross_entropy", "fused_linear_cross_entropy", _work_lce,
    lambda m: {"hidden": m["hidden"], "vocab": m["vocab"]}, ("llama3-8b", "llama2-7b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.transformers.functional.liger_fused_linear_cross_entropy", _liger_lce,
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
