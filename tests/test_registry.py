"""The op registry (llama_kernels/ops/registry.py): every sample of every op against its float64
oracle, and the places that read the registry agree with it."""
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_kernels
from helpers import DTYPES, assert_all_pass
from llama_kernels import cli, reference
from llama_kernels.ops import registry
from llama_kernels.oracle import check_backward, check_forward

ROOT = Path(__file__).resolve().parents[1]
# Two sequences of an odd length at the smoke model's widths: every block size has a tail.
BATCH, TOKENS = 2, 19


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: registry.dtype_name(d))
@pytest.mark.parametrize("name", registry.SAMPLES)
def test_sample_matches_oracle(name, dtype, device):
    op_sample = registry.SAMPLES[name]
    generator = torch.Generator(device=device).manual_seed(0)
    case = registry.SampleCase(registry.MODEL_SHAPES["smoke"].dims(), BATCH, TOKENS, dtype, device, generator)
    sample = op_sample.build(case)
    kernel, eager = op_sample.kernel(), op_sample.eager()
    assert_all_pass(f"{name} inference", check_forward(kernel, eager, sample.args, sample.kwargs))
    if op_sample.training:
        assert_all_pass(name, check_backward(kernel, eager, sample.args, sample.kwargs, sample.grad, sample.names,
                                             generator))


@pytest.mark.parametrize("op", registry.OPS, ids=lambda op: op.name)
def test_each_op_is_exported_with_a_twin_of_its_signature(op):
    kernel, twin = getattr(llama_kernels, op.name), getattr(reference, op.name)
    module = f"llama_kernels{op.module}"
    assert kernel.__module__ == module or kernel.__module__.startswith(module + ".")
    # The twin takes every argument the kernel takes, under the same name.
    assert set(inspect.signature(kernel).parameters) <= set(inspect.signature(twin).parameters)
    assert op.samples and (op.flag is None or op.flag in registry.FLAGS)


def test_the_registry_drives_flags_check_and_exports():
    assert tuple(inspect.signature(llama_kernels.apply_kernels).parameters)[1:] == registry.FLAGS
    assert set(cli.CHECK_OPS) == {name for name, s in registry.SAMPLES.items() if s.check}
    assert {op.name for op in registry.OPS} <= set(llama_kernels.__all__)
    assert set(registry.DTYPES.values()) == set(DTYPES)


def test_api_docstring_is_generated():
    """llama_kernels' docstring is tools/api_docstring.py's output (run it after changing the API)."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "api_docstring.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
