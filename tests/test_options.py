"""``lk.kernel_options`` / ``lk.KernelOptions``: the launchers' runtime switches in one frozen
object, set for a block of code; bad names and values are refused before the block runs, and each
switch changes what the launchers do (and nothing else: results stay within the 2x rule)."""
import dataclasses
import threading

import pytest
import torch

import llama_kernels as lk
from llama_kernels.ops import options
from llama_kernels.ops.attention import (backward as attention_backward, configs, decode, forward as attention_forward,
                                         problem)
from llama_kernels.ops.common import INTERPRET, LAUNCHES

from test_attention import check, make_qkv


def test_defaults_and_frozen():
    opts = options.current()
    assert opts == lk.KernelOptions()
    assert opts.tma_forward is None and opts.deterministic is None and opts.min_programs_per_sm == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tma_forward = False


def test_nests_and_restores_also_on_errors():
    with lk.kernel_options(tma_forward=False) as outer:
        assert options.current() is outer and outer.tma_forward is False
        with lk.kernel_options(min_programs_per_sm=0):
            assert options.current().tma_forward is False  # the outer block's value is kept
            assert options.current().min_programs_per_sm == 0
        assert options.current().min_programs_per_sm == 2
        with pytest.raises(RuntimeError):
            with lk.kernel_options(cross_entropy_chunk=1024):
                raise RuntimeError
        assert options.current().cross_entropy_chunk == lk.KernelOptions().cross_entropy_chunk
    assert options.current() == lk.KernelOptions()


def test_per_thread():
    seen = []
    with lk.kernel_options(tma_forward=False):
        thread = threading.Thread(target=lambda: seen.append(options.current().tma_forward))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("overrides, error, match", [
    ({"use_tma": False}, TypeError, "unknown option"),
    ({"tma_forward": 1}, TypeError, "tma_forward"),
    ({"deterministic": "yes"}, TypeError, "deterministic"),
    ({"min_programs_per_sm": -1}, ValueError, "min_programs_per_sm"),
    ({"min_programs_per_sm": 2.0}, TypeError, "min_programs_per_sm"),
    ({"decode_min_keys_per_split": 0}, ValueError, "decode_min_keys_per_split"),
    ({"cross_entropy_chunk": True}, TypeError, "cross_entropy_chunk"),
    ({"interpreter_tiles": {"fwd": (24, 16)}}, ValueError, "interpreter_tiles"),
    ({"interpreter_tiles": {"bwd": (16, 16)}}, ValueError, "unknown kernel kind"),
    ({"interpreter_tiles": [("fwd", (16, 16))]}, TypeError, "interpreter_tiles"),
    ({"interpreter_half_dots": 1}, TypeError, "interpreter_half_dots"),
    ({"only_candidate": -1}, ValueError, "only_candidate"),
])
def test_bad_options_are_refused_before_the_block(overrides, error, match):
    ran = []
    with pytest.raises(error, match=match):
        with lk.kernel_options(**overrides):
            ran.append(True)
    assert not ran and options.current() == lk.KernelOptions()


def test_option_kinds_are_the_launchers_kinds():
    # options.py names the kinds without importing the kernels (it must not import triton).
    assert set(options.ATTENTION_KINDS) == set(configs.INTERPRETER_TILES)


def test_interpreter_tiles_are_copied():
    tiles = {"fwd": (16, 16)}
    with lk.kernel_options(interpreter_tiles=tiles) as opts:
        tiles["fwd"] = (64, 64)
        assert opts.interpreter_tiles == {"fwd": (16, 16)}


def test_no_module_switches_left():
    # The switches that tests and benchmarks used to monkeypatch are options now.
    for module, name in ((attention_forward, "USE_TMA"), (attention_backward, "MIN_PROGRAMS_PER_SM"),
                         (configs, "INTERPRET_BLOCKS"), (decode, "MIN_KEYS_PER_SPLIT")):
        assert not hasattr(module, name), name
    from llama_kernels.ops import cross_entropy

    assert not hasattr(cross_entropy, "CHUNK_ELEMENTS")


def test_tma_forward_option():
    q = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    assert attention_forward.uses_tma(q, q, q) is False  # auto: Hopper only
    with lk.kernel_options(tma_forward=True):
        assert attention_forward.uses_tma(q, q, q) is True
        assert attention_forward.uses_tma(q, q, q, varlen=True) is False
        assert attention_forward.uses_tma(q.float(), q.float(), q.float()) is False


def test_deterministic_option_overrides_torch(device):
    assert attention_backward.fused_backward(torch.float16) is True
    with lk.kernel_options(deterministic=True):
        assert attention_backward.fused_backward(torch.float16) is False
        assert attention_backward.fused_backward(torch.float32) is False
    torch.use_deterministic_algorithms(True)
    try:
        assert attention_backward.fused_backward(torch.float16) is False
        with lk.kernel_options(deterministic=False):
            assert attention_backward.fused_backward(torch.float16) is True
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not INTERPRET, reason="interpreter launches")
def test_deterministic_option_picks_the_schedule_and_stays_exact(device):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 64, torch.float16, device)
    with lk.kernel_options(deterministic=True):
        LAUNCHES.clear()
        check("attention deterministic option", q, k, v, causal=True)
        assert LAUNCHES["attention_bwd_dq_kernel"] == 1 and LAUNCHES["attention_bwd_fused_kernel"] == 0


def test_decode_split_size_option(device):
    with lk.kernel_options(decode_min_keys_per_split=4096):
        assert decode.decode_splits(1, 1, 4096, 32, torch.device(device))[0] == 1
    with lk.kernel_options(decode_min_keys_per_split=64):
        assert decode.decode_splits(1, 1, 4096, 32, torch.device(device))[0] > 1


def test_only_candidate_option():
    spec = problem.KernelSpec(True, 128, 128, False, False, "tf32", False, False, False, False)
    every = configs.spec_candidates("fwd", spec, 2, "hopper")
    assert len(every) > 1
    with lk.kernel_options(only_candidate=1):
        assert configs.spec_candidates("fwd", spec, 2, "hopper") == [every[1]]
    with lk.kernel_options(only_candidate=100):  # the last of a shorter list
        assert configs.spec_candidates("fwd", spec, 2, "hopper") == [every[-1]]


def test_variant_lookup_is_explicit():
    # Packed sequences with a softcap take the softcap list (no list is made for the pair); a
    # family's own list of the kernel wins over a variant list of CONFIGS.
    assert configs.VARIANTS[True, True] == ("softcap", "varlen", "")
    softcap = configs.CONFIGS[("fwd", "softcap", configs.HALF, 128)]
    assert configs.candidates("fwd", 128, 2, varlen=True, softcap=True) == softcap
    assert configs.candidates("fwd", 128, 2, softcap=True, family="mma") == \
        configs.FAMILY_CONFIGS["mma"][("fwd", "", configs.HALF, 128)]
    varlen = configs.CONFIGS[("bwd_fused", "varlen", configs.HALF, 128)]
    assert configs.candidates("bwd_fused", 128, 2, varlen=True) == varlen
    assert all(isinstance(t, configs.Tile) for t in varlen)
