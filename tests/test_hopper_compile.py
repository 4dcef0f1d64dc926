"""Every kernel the public ops launch compiles for an H100 (sm_90), even on a CPU-only machine.

The interpreter tests run the kernels' Python; this runs Triton's real compiler and ptxas on them
(``compile_for_hopper.py``, in a subprocess without ``TRITON_INTERPRET``), so code that only the
interpreter accepts, or a tile that needs more shared memory than the GPU has, fails here too.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("compile_for_hopper.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in every test")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    problems = [line for line in result.stdout.splitlines() if line.rstrip().endswith(("MEMORY", "PRECISION"))]
    assert result.returncode == 0, "\n".join(problems) or (result.stdout + result.stderr)[-4000:]
    compiled = {line.split()[0] for line in result.stdout.splitlines() if "_kernel" in line}
    assert compiled == {
        "rms_norm_fwd_kernel", "rms_norm_bwd_kernel", "rms_norm_dw_kernel", "swiglu_fwd_kernel", "swiglu_bwd_kernel",
        "rope_kernel", "attention_fwd_kernel", "attention_fwd_tma_kernel", "attention_bwd_preprocess_kernel",
        "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_fused_kernel",
        "attention_bwd_reduce_kernel", "attention_decode_split_kernel",
        "attention_decode_combine_kernel", "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel",
    }
