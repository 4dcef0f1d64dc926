"""RMSNorm, alone (``rms_norm``) and after a residual add (``rms_norm+residual``).

Inputs: the registry's samples of the same names, ``(x, weight, eps)`` and ``(x, weight, eps,
residual)``, x and the residual ``(1, N, H)``, eps the model's ``rms_norm_eps``.
"""
from __future__ import annotations

from .harness import OpSpec, by_mode, element_size, liger_provider

# Liger's functions, called with LLaMA's casting ("llama": statistics in float32, as ours).
_LIGER_NOTE = "in_place=False, so the cotangent we pass is not overwritten between timed calls"


def _work_rms_norm(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], element_size(case)
    return by_mode(mode, (2 * n * h + h) * s, (3 * n * h + 2 * h) * s), "B"


def _work_rms_norm_residual(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], element_size(case)
    return by_mode(mode, (4 * n * h + h) * s, (4 * n * h + 2 * h) * s), "B"


def _liger_rms_norm(fn):
    return lambda x, w, eps: fn.apply(x, w, eps, 0.0, "llama", False)


def _liger_rms_norm_residual(fn):
    return lambda x, w, eps, residual: fn.apply(x, residual, w, eps, 0.0, "llama", False)


def _hidden(model):
    return {"hidden": model["hidden"]}


RMS_NORM = OpSpec(
    "rms_norm", "rms_norm", _work_rms_norm, _hidden, ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerRMSNormFunction", _liger_rms_norm, _LIGER_NOTE)},
    note="N tokens x H hidden, s bytes each: forward (2NH + H)s: read x, w; write y. "
         "Backward (3NH + 2H)s: read dy, x, w; write dx, dw.")

RMS_NORM_RESIDUAL = OpSpec(
    "rms_norm+residual", "rms_norm+residual", _work_rms_norm_residual, _hidden, ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerFusedAddRMSNormFunction", _liger_rms_norm_residual,
                             _LIGER_NOTE)},
    note="h = x + r, y = rms_norm(h): forward (4NH + H)s: read x, r, w; write y, h. Backward "
         "(4NH + 2H)s: read dy, dh, h, w; write dx (= dr, one tensor), dw.")
