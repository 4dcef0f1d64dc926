"""Every kernel the public ops launch compiles for every supported GPU, on a CPU-only machine.

The interpreter tests run the kernels' Python; this runs Triton's real compiler (ptxas for NVIDIA,
the wheel's LLVM for AMD) on the launchers' own choices for each target of the compile matrix
(``tools/compile_matrix.py --set ci``, in subprocesses without ``TRITON_INTERPRET``, the targets'
limits reported by a stand-in driver), so that a tile needing more shared memory or threads than
a GPU has, a spill in half precision, or code only the interpreter accepts fails here.
``make compile-matrix`` runs the whole matrix (every dtype, every autotuning candidate).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "compile_matrix.py"
TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx942", "gfx90a", "gfx950")
KERNELS = {
    "rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "rms_norm_dw_kernel", "glu_fwd_kernel", "glu_bwd_kernel",
    "rope_kernel", "attention_fwd_kernel", "attention_bwd_preprocess_kernel", "attention_bwd_dq_kernel",
    "attention_bwd_dkdv_kernel", "attention_bwd_fused_kernel", "attention_bwd_reduce_kernel",
    "attention_decode_split_kernel", "attention_decode_combine_kernel", "cross_entropy_fwd_kernel",
    "cross_entropy_bwd_kernel", "quantized_linear_fwd_kernel", "quantized_linear_reduce_kernel",
    "quantized_linear_bwd_kernel",
}


@pytest.fixture(scope="module")
def reports():
    """Each target's report (``tools/compile_matrix.py --set ci``), one target at a time (the other
    test worker keeps the second core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--set", "ci", "--jobs", "1", *TARGETS], env=env,
                            capture_output=True, text=True, timeout=1800)
    out = {}
    lines = []
    for line in result.stdout.splitlines():
        lines.append(line)
        head = line.split(" ", 1)[0]
        if head in TARGETS and "specialisations compiled" in line:
            out[head] = lines
            lines = []
    if len(out) != len(TARGETS):
        pytest.fail(f"compile matrix did not report every target:\n{(result.stdout + result.stderr)[-6000:]}")
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in every test")
@pytest.mark.parametrize("target", TARGETS)
def test_every_launch_fits_the_target(reports, target):
    lines = reports[target]
    print("\n".join(lines))
    problems = [line for line in lines if line.rstrip().endswith(("MEMORY", "THREADS", "PRECISION"))]
    assert not problems, "\n".join(problems)
    compiled = {line.split()[0] for line in lines if "_kernel" in line.split(" ", 1)[0]}
    hopper = target == "sm_90"
    # The TMA forward is Hopper's alone (never AMD's, whose MI300X reports capability 9.4).
    assert compiled == KERNELS | ({"attention_fwd_tma_kernel"} if hopper else set())
