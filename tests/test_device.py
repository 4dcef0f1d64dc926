"""Device limits and the launch choices made from them (``llama_kernels/ops/device.py``).

The compile matrix (``test_compile_matrix.py``) proves every launch fits each GPU target; these
check the rules on the host: which devices take the Hopper path, the dot precision per backend,
warps counted in threads for 64-wide waves, the autotuners' keys, and the error when nothing fits.
"""
import types

import pytest
import torch

from llama_kernels.ops import device as device_module, rms_norm
from llama_kernels.ops.attention import backward as attention_backward, configs, forward as attention_forward
from llama_kernels.ops.device import (
    INTERPRETER,
    PUBLISHED_LIMITS,
    DeviceLimits,
    NoFittingConfig,
    device_limits,
    first_fit,
)


def limits_of(arch):
    published = PUBLISHED_LIMITS[arch]
    backend = "hip" if arch.startswith("gfx") else "cuda"
    return DeviceLimits(backend=backend, arch=arch, shared_memory=published["shared_memory"],
                        warp_size=published.get("warp_size", 32), multiprocessors=published["multiprocessors"])


H100, A100, RTX4090, MI300X, MI250, B200 = (limits_of(a) for a in ("sm_90", "sm_80", "sm_89", "gfx942", "gfx90a",
                                                                   "sm_100"))


def test_the_interpreter_has_its_own_limits():
    assert device_limits(torch.device("cpu")) is INTERPRETER
    assert INTERPRETER.backend == "interpreter" and not INTERPRETER.is_hopper


def test_only_nvidia_sm90_is_hopper():
    # ROCm reports MI300X as capability (9, 4) and MI250 as (9, 0): they are "hip", never Hopper.
    assert H100.is_hopper and H100.capability == 90
    assert not any(d.is_hopper for d in (A100, RTX4090, MI300X, MI250, B200))
    assert MI300X.capability is None


@pytest.mark.parametrize("limits, expected", [(H100, True), (MI300X, False), (MI250, False), (A100, False)])
def test_tma_forward_only_on_hopper(monkeypatch, limits, expected):
    monkeypatch.setattr(attention_forward, "device_limits", lambda device: limits)
    q = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    assert attention_forward.uses_tma(q, q, q) is expected
    assert attention_forward.uses_tma(q, q, q, varlen=True) is False


@pytest.mark.parametrize("limits, half", [(H100, "tf32"), (A100, "tf32"), (MI300X, "ieee"), (MI250, "ieee")])
def test_dot_precision_per_backend(monkeypatch, limits, half):
    # gfx90a and gfx950 refuse input_precision="tf32" (only gfx942 takes it): half-precision
    # operands name each backend's default; float32 is IEEE everywhere.
    monkeypatch.setattr(device_module, "INTERPRET", False)
    monkeypatch.setattr(device_module, "device_limits", lambda device: limits)
    cpu = torch.device("cpu")
    assert device_module.dot_mode(torch.bfloat16, cpu) == (False, half)
    assert device_module.dot_mode(torch.float16, cpu) == (False, half)
    assert device_module.dot_mode(torch.float32, cpu) == (False, "ieee")


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("hidden", [576, 4096, 5120, 8192, 16384])
def test_rms_norm_threads_stay_within_a_block(monkeypatch, hidden, element_size):
    for limits in (H100, MI300X):
        monkeypatch.setattr(rms_norm, "device_limits", lambda device: limits)
        _, _, num_warps = rms_norm._launch_config(hidden, element_size, torch.device("cpu"))
        assert num_warps * limits.warp_size <= 1024
    monkeypatch.setattr(rms_norm, "device_limits", lambda device: H100)
    warps_nvidia = rms_norm._launch_config(hidden, element_size, torch.device("cpu"))[2]
    monkeypatch.setattr(rms_norm, "device_limits", lambda device: MI300X)
    warps_amd = rms_norm._launch_config(hidden, element_size, torch.device("cpu"))[2]
    # The same threads in 64-wide waves, capped at 1024.
    assert warps_amd * 64 == min(1024, warps_nvidia * 32)


def test_autotune_keys_name_only_kernel_arguments():
    # Triton >= 3.9 refuses an autotune key that is not an argument of the kernel: every autotuned
    # kernel takes its compiled description (SPEC) and the two length buckets.
    for kernel in (attention_forward.attention_fwd_kernel, attention_forward.attention_fwd_tma_kernel,
                   attention_backward.attention_bwd_dq_kernel, attention_backward.attention_bwd_dkdv_kernel,
                   attention_backward.attention_bwd_fused_kernel):
        assert configs.tuning_key(kernel) == ["SPEC", "TQ_BUCKET", "TK_BUCKET"]
        assert set(configs.tuning_key(kernel)) <= set(kernel.arg_names)


def test_fallback_tiles_shrink_to_16():
    tiles = configs.with_fallbacks([(64, 64, 4, 3), (32, 32, 8, 2)])
    assert tiles[:2] == [(64, 64, 4, 3), (32, 32, 8, 2)]
    assert tiles[2:] == [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1)]


class _FakeKernel:
    """Compiles to a kernel needing ``shared[BLOCK_M]`` bytes."""

    def __init__(self, shared):
        self.shared, self.fn, self.calls = shared, types.SimpleNamespace(__name__="fake_kernel"), 0

    def warmup(self, *args, grid, **kwargs):
        self.calls += 1
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=self.shared[kwargs["BLOCK_M"]]))


def test_first_fit_takes_the_first_config_that_fits_and_caches_it():
    kernel = _FakeKernel({128: 200_000, 64: 90_000, 32: 40_000})
    configs = [{"BLOCK_M": m, "num_warps": 4} for m in (128, 64, 32)]
    assert first_fit(kernel, (), {}, configs, RTX4090, "fake op")["BLOCK_M"] == 64
    assert first_fit(kernel, (), {}, configs, H100, "fake op")["BLOCK_M"] == 128
    calls = kernel.calls
    first_fit(kernel, (), {}, configs, RTX4090, "fake op")
    assert kernel.calls == calls  # the verdicts are cached


def test_first_fit_names_the_op_and_device_when_nothing_fits():
    kernel = _FakeKernel({128: 200_000, 64: 90_000})
    configs = [{"BLOCK_M": m, "num_warps": 4} for m in (128, 64)]
    with pytest.raises(NoFittingConfig, match=r"fake op .*gfx942 \(65536 bytes"):
        first_fit(kernel, (), {}, configs, MI300X, "fake op")


def test_threads_beyond_a_block_never_fit():
    kernel = _FakeKernel({16: 1024})
    # 32 warps of 64 lanes = 2048 threads: refused without compiling.
    with pytest.raises(NoFittingConfig):
        first_fit(kernel, (), {}, [{"BLOCK_M": 16, "num_warps": 32}], MI300X, "fake op")
    assert kernel.calls == 0
    assert first_fit(kernel, (), {}, [{"BLOCK_M": 16, "num_warps": 32}], H100, "fake op")
