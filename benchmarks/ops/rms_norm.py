"""RMSNorm, alone (``rms_norm``) and after a residual add (``rms_norm+residual``)."""
from __future__ import annotations

from .harness import Inputs, OpSpec, by_mode, element_size, liger_provider, randn

EPS = 1e-5  # LLaMA-3's rms_norm_eps
# Liger's functions, called with LLaMA's casting ("llama": statistics in float32, as ours).
_LIGER_NOTE = "in_place=False, so the cotangent we pass is not overwritten between timed calls"


def _build_rms_norm(case, gen, grad):
    x = randn(case, gen, case.tokens, case.dims["hidden"], grad=grad)
    w = randn(case, gen, case.dims["hidden"], grad=grad)
    return Inputs((x, w), (x, w))


def _build_rms_norm_residual(case, gen, grad):
    x, w = _build_rms_norm(case, gen, grad).args
    r = randn(case, gen, case.tokens, case.dims["hidden"], grad=grad)
    return Inputs((x, r, w), (x, r, w))


def _work_rms_norm(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], element_size(case)
    return by_mode(mode, (2 * n * h + h) * s, (3 * n * h + 2 * h) * s), "B"


def _work_rms_norm_residual(case, mode):
    n, h, s = case.tokens, case.dims["hidden"], element_size(case)
    return by_mode(mode, (4 * n * h + h) * s, (4 * n * h + 2 * h) * s), "B"


# How each op calls a function of its family: ours and eager share one adapter, and the eager one
# is what torch.compile compiles.
def _rms_norm_call(f):
    return lambda x, w: f(x, w, EPS)


def _rms_norm_residual_call(f):
    return lambda x, r, w: f(x, w, EPS, residual=r)


def _hidden(model):
    return {"hidden": model["hidden"]}


RMS_NORM = OpSpec(
    "rms_norm", "rms_norm", "rms_norm", _rms_norm_call, _build_rms_norm, _work_rms_norm, _hidden,
    ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerRMSNormFunction",
                             lambda fn: lambda x, w: fn.apply(x, w, EPS, 0.0, "llama", False), _LIGER_NOTE)},
    note="N tokens x H hidden, s bytes each: forward (2NH + H)s: read x, w; write y. "
         "Backward (3NH + 2H)s: read dy, x, w; write dx, dw.")

RMS_NORM_RESIDUAL = OpSpec(
    "rms_norm+residual", "rms_norm", "rms_norm", _rms_norm_residual_call, _build_rms_norm_residual,
    _work_rms_norm_residual, _hidden, ("llama3-8b", "smollm2-135m"),
    {"liger": liger_provider("liger_kernel.ops.LigerFusedAddRMSNormFunction",
                             lambda fn: lambda x, r, w: fn.apply(x, r, w, EPS, 0.0, "llama", False), _LIGER_NOTE)},
    note="h = x + r, y = rms_norm(h): forward (4NH + H)s: read x, r, w; write y, h. Backward "
         "(4NH + 2H)s: read dy, dh, h, w; write dx (= dr, one tensor), dw.")
