"""Per-op benchmarks: every llama_kernels op against eager, torch.compile, Liger-Kernel, SDPA, flash-attn.

One table, :data:`OPS`, says for each op which model shapes it runs at, which sample of the op
registry (``llama_kernels.ops.registry.SAMPLES``) builds its inputs and names its kernel and eager
twin, how many bytes (or FLOP) one call must move (or do), and which providers exist besides the
three most ops have (``ours``, ``eager``, ``torch.compile``; an op's ``base`` may name fewer).  Each op
family declares its ops in its own file (``rms_norm``, ``glu``, ``rope``, ``attention``,
``cross_entropy``, ``quantized``: one op per weight format); :mod:`benchmarks.ops.harness` holds
the declaration type and the one loop (:func:`~benchmarks.ops.harness.run_case`) that does the
same for every op and shape: check each provider's outputs and gradients against the reference
(ours, or eager where ours cannot run), then time each mode with rotated inputs and record the
peak memory.

Work per call (each op's ``note``, the README and the op files' ``_work_*`` functions say the same):
the bytes that must move, each input read once and each output written once, the least any
implementation moves, for memory-bound ops (compared with the measured copy bandwidth); the FLOP of
the two matrix products for attention (compared with the measured bf16 matmul rate); for packed
``varlen_attention``, the real per-sequence work only, so a padded provider's rate shows its waste;
for ``linear_cross_entropy`` (the LM head and its loss), the FLOP of its matrix products (logits
forward; dhidden and dweight backward), with ours' peak memory also given as a ratio of eager's;
for the quantised linears (``int8_linear``, ``int4_linear-g*``), the quantised weight + x + y bytes
at decode (up to 16 rows), the ``2 M N K`` FLOP at prefill.

Nothing here imports triton: ``python -m benchmarks`` reads :data:`OPS` and :data:`MODELS` to
check its arguments before it chooses Triton's interpreter.
"""
from __future__ import annotations

from . import harness
from .attention import DECODE, FLASH_ATTENTION, VARLEN_ATTENTION
from .cross_entropy import LINEAR_CROSS_ENTROPY
from .glu import SWIGLU
from .harness import MODELS
from .quantized import QUANTIZED_LINEAR
from .rms_norm import RMS_NORM, RMS_NORM_RESIDUAL
from .rope import APPLY_ROTARY

__all__ = ["MODELS", "OPS", "provider_notes", "run"]

# The order of the run, the tables and --help.
OPS = [RMS_NORM, RMS_NORM_RESIDUAL, SWIGLU, APPLY_ROTARY, FLASH_ATTENTION, DECODE, LINEAR_CROSS_ENTROPY,
       VARLEN_ATTENTION, *QUANTIZED_LINEAR]


def provider_notes() -> dict:
    """What each provider of :data:`OPS` is, for the report's provider list."""
    return harness.provider_notes(OPS)


def run(settings, limits: dict, records: list, progress=None) -> None:
    """Measure every op of :data:`OPS` (or ``settings.ops``) at every case into ``records``.

    ``progress(label)``, when given, is called after each op's figures are in ``records``
    (``__main__`` rewrites the report then, so a run killed later keeps them).
    """
    harness.run(OPS, settings, limits, records, progress)
