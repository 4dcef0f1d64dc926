"""Run every test on CUDA when there is a GPU, else on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before anything imports triton, so it is set here, at collection.
"""
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter is single-threaded numpy; torch's own threads only compete with it.
    torch.set_num_threads(1)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "latest_only: left out of the oldest-release job (`make test-oldest`: -m 'not latest_only'): "
                   "it repeats, at the price of a real model in the interpreter, a path the rest of that job "
                   "covers, or only runs kernels (the same Triton code under either torch)")


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter"
    return f"llama_kernels tests on {where}"


@pytest.fixture
def kernel_opts():
    """``kernel_opts(**overrides)`` sets ``llama_kernels.kernel_options`` for the rest of the test
    (calls nest; all are undone when the test ends)."""
    import contextlib

    from llama_kernels import kernel_options

    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(kernel_options(**overrides))
