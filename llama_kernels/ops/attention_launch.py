"""Tile configurations of the attention kernels and the launch helper that picks one.

Every kernel kind has a list of candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` by dtype
width and padded head dim.  BLOCK_M always counts query rows and BLOCK_N key rows: the forward,
dQ and the TMA forward keep BLOCK_M queries resident and stream BLOCK_N keys; dK/dV and the fused
backward keep BLOCK_N keys resident and stream BLOCK_M queries.  The first candidate of a list is
the fixed choice for small problems; large ones are autotuned over the whole list on the GPU.
Each list was checked by compiling every candidate for sm_90 (``tests/compile_for_hopper.py``):
shared memory within the H100's 227 KiB and no register spills in half precision.  float32 runs
IEEE FMA dots, which need small tiles and 8 warps to stay out of local memory.
"""
from __future__ import annotations

import triton

from .common import INTERPRET, count_launch

# Under the interpreter every kernel runs with one fixed, small tiling: (BLOCK_M, BLOCK_N).
# The forward/dQ and dK/dV orientations differ on purpose so that tests cover both BLOCK_M > BLOCK_N
# and BLOCK_M < BLOCK_N around the causal diagonal.  Tests may patch these.
INTERPRET_BLOCKS = {"fwd": (32, 16), "fwd_tma": (32, 16), "dkdv": (16, 32), "bwd_fused": (16, 32),
                    "dq": (32, 16)}

# Problems with at least this many (query, key) pairs per head are autotuned on the GPU; smaller
# ones use a fixed configuration (cheap to compile, nothing to benchmark on the first call).
AUTOTUNE_MIN_PAIRS = 512 * 512

HALF, FP32 = 2, 4
# dK/dV and fused backward: the transposed dots (k q^T, v dO^T) are wgmma instructions N = BLOCK_M
# wide on one warpgroup (4 warps), BLOCK_M / 2 on two (8 warps split N); at least 64 keeps them off
# the shared-memory limit.  But the register budget decides: the dK, dV accumulators, S^T and dP^T
# of (64 queries, 128 keys) overflow 255 registers at D = 128 even with 8 warps, and 4 warps spill
# at BLOCK_M = 64 wherever D >= 128.  The spill-free choices are (64, 64, 8 warps) (wgmma n32 per
# warpgroup) and (32, 128, 8 warps) (n32 for the transposed dots, n128 for the rest); which is
# faster is for the autotuner on the GPU.  The TMA forward runs 4 warps (warp specialisation makes
# one producer and two consumer warpgroups of them; with 8 warps Triton 3.6 does not specialise).
CONFIGS = {
    ("fwd", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
                         (64, 128, 8, 2), (64, 64, 4, 3)],
    ("fwd", HALF, 256): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2)],
    ("fwd", FP32, 128): [(32, 32, 8, 2)],
    ("fwd", FP32, 256): [(32, 32, 8, 1)],
    ("fwd_tma", HALF, 128): [(128, 64, 4, 3), (128, 128, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2)],
    ("fwd_tma", HALF, 256): [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3)],
    ("dkdv", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2),
                         (64, 64, 8, 3)],
    ("dkdv", HALF, 128): [(64, 64, 8, 1), (32, 128, 8, 2), (32, 128, 8, 1)],
    ("dkdv", HALF, 256): [(32, 32, 8, 1), (64, 32, 8, 1), (16, 64, 8, 1), (32, 64, 8, 1)],
    ("dkdv", FP32, 128): [(16, 32, 8, 2)],
    ("dkdv", FP32, 256): [(16, 32, 8, 1)],
    ("bwd_fused", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2)],
    ("bwd_fused", HALF, 128): [(32, 128, 8, 2), (64, 64, 8, 1)],
    ("bwd_fused", HALF, 256): [(32, 32, 8, 1), (16, 64, 8, 1)],
    # Packed sequences (VARLEN) keep a few more scalars live (the sequence's offsets and lengths),
    # which tips every candidate above at D = 128 into spilling (8-88 bytes); these stay clear.
    ("bwd_fused_varlen", HALF, 64): [(64, 64, 8, 1), (32, 128, 8, 2), (32, 64, 4, 2)],
    ("bwd_fused_varlen", HALF, 128): [(16, 128, 8, 2), (64, 32, 8, 2)],
    ("bwd_fused_varlen", HALF, 256): [(32, 32, 8, 1)],
    ("dkdv_varlen", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2)],
    ("dkdv_varlen", HALF, 128): [(16, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dkdv_varlen", HALF, 256): [(32, 32, 8, 1), (64, 32, 8, 1)],
    # Softcap (SOFTCAP: a tanh per score, and in the backward its derivative folded into P) needs
    # the registers of a few more float32 tiles: these lists leave out the candidates that spilled
    # with it (compiled for sm_90 with a sliding window too, dense and packed).
    ("fwd_softcap", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 2),
                                 (64, 64, 4, 3)],
    ("dkdv_softcap", HALF, 64): [(32, 64, 4, 2), (32, 128, 8, 2)],
    ("dkdv_softcap", HALF, 128): [(16, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("bwd_fused_softcap", HALF, 128): [(16, 128, 8, 2), (64, 32, 8, 2)],
    ("dq_softcap", HALF, 128): [(64, 32, 4, 3)],
    ("dq", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
                        (64, 32, 4, 3)],
    ("dq", HALF, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", FP32, 128): [(32, 32, 8, 2)],
    ("dq", FP32, 256): [(32, 32, 8, 1)],
}


def candidates(kind, block_d, element_size, varlen=False, softcap=False):
    """Configurations for ``kind`` at padded head dim ``block_d`` and element size ``element_size``
    (with a softcap, the ``<kind>_softcap`` list where there is one; for packed sequences,
    ``varlen``, then the ``<kind>_varlen`` list where there is one)."""
    width = FP32 if element_size == 4 else HALF
    names = ((f"{kind}_softcap",) if softcap else ()) + ((f"{kind}_varlen",) if varlen else ()) + (kind,)
    for bound in (64, 128, 256):
        if block_d <= bound:
            for name in names:
                if (name, width, bound) in CONFIGS:
                    return CONFIGS[(name, width, bound)]
    raise AssertionError(f"no {kind} configuration for head dim {block_d}")


def _config(block_m, block_n, num_warps, num_stages, pre_hook=None):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages, pre_hook=pre_hook)


def autotuned(kernel, kind, first_arg, pre_hook=None, reset_to_zero=None):
    """``kernel`` wrapped in ``triton.autotune`` over every candidate of ``kind``, pruned at launch
    to the candidates of the call's head dim and dtype (read off the argument ``first_arg``).
    ``pre_hook(nargs)`` runs before each launch with the config's block sizes in ``nargs``;
    ``reset_to_zero`` names accumulators (atomics) that every benchmarking run must start from
    zero.  Built only with a GPU: under the interpreter a multi-config autotuner cannot benchmark."""
    if INTERPRET:
        return None
    every = sorted({c for (k, _, _), cs in CONFIGS.items()
                    if k in (kind, f"{kind}_varlen", f"{kind}_softcap") for c in cs})

    def prune(configs, named_args, **kwargs):
        arg = named_args[first_arg]
        element_size = arg.base.element_size() if hasattr(arg, "base") else arg.element_size()
        wanted = set(candidates(kind, kwargs["BLOCK_D"], element_size, kwargs.get("VARLEN", False),
                                kwargs.get("SOFTCAP", False)))
        return [c for c, t in zip(configs, every) if t in wanted]

    return triton.autotune(
        configs=[_config(*c, pre_hook=pre_hook) for c in every],
        key=["HEAD_DIM", "CAUSAL", "VARLEN", "WINDOW", "SOFTCAP", "TQ_BUCKET", "TK_BUCKET"],
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )(kernel)


def launch(kernel, tuned, kind, grid, args, consts, seq_q, seq_k, element_size, pre_hook=None):
    """Launch ``kernel`` with ``grid(meta)``: through its autotuned twin ``tuned`` for large
    problems on the GPU, else with the first (or, under the interpreter, the small) config.
    ``pre_hook(nargs)`` prepares arguments that depend on the block sizes (TMA descriptors)."""
    block_d = consts["BLOCK_D"]
    options = candidates(kind, block_d, element_size, consts.get("VARLEN", False),
                         consts.get("SOFTCAP", False))
    if INTERPRET:
        block_m, block_n, num_warps, num_stages = (*INTERPRET_BLOCKS[kind], 4, 1)
    elif len(options) > 1 and seq_q * seq_k >= AUTOTUNE_MIN_PAIRS:
        tuned[grid](*args, **consts)
        count_launch(kernel)
        return
    else:
        block_m, block_n, num_warps, num_stages = options[0]
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if pre_hook is not None:
        pre_hook({**dict(zip(kernel.arg_names, args)), **consts, **meta})
    kernel[grid(meta)](*args, **consts, **meta, num_warps=num_warps, num_stages=num_stages)
    count_launch(kernel)


def bucket(n):
    """Power-of-two bucket of a sequence length: the autotuners' key."""
    return triton.next_power_of_2(max(int(n), 1))


def grid_tiles(total, block, cu_seqlens=None, max_seqlen=0):
    """Programs along a sequence axis of ``total`` rows, one per tile of ``block`` rows (axis 1 of
    the attention grids).  Packed sequences (``cu_seqlens``) hold at most
    ``(total + N (block - 1)) // block`` and at most ``N cdiv(max_seqlen, block)`` tiles
    (``sum_i cdiv(len_i, block)``); programs past the real count find no sequence and return."""
    if cu_seqlens is None:
        return triton.cdiv(total, block)
    num_seqs = cu_seqlens.shape[0] - 1
    return max(1, min((total + num_seqs * (block - 1)) // block, num_seqs * triton.cdiv(max_seqlen, block)))
