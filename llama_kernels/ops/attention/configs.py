"""Tile configurations of the attention kernels and the launch helper that picks one.

Every kernel kind (``fwd``, ``fwd_tma``, ``dq``, ``dkdv``, ``bwd_fused``) has lists of candidate
``Tile(block_m, block_n, num_warps, num_stages)`` by variant, dtype width and padded head dim,
keyed ``(kind, variant, width, head_dim_bound)``: variant ``""`` is the kernel as such,
``"varlen"`` packed sequences and ``"softcap"`` Gemma 2's score cap, which need more registers
(``VARIANTS``: which list a call takes).  BLOCK_M always counts query rows and BLOCK_N key rows:
the forward, dQ and the TMA forward keep BLOCK_M queries resident and stream BLOCK_N keys; dK/dV
and the fused backward keep BLOCK_N keys resident and stream BLOCK_M queries.  The first candidate
of a list is the fixed choice for small problems; large ones are autotuned over the whole list on
the GPU.  ``CONFIGS`` was checked by compiling every candidate for sm_90
(``tools/compile_matrix.py``): shared memory within the H100's 227 KiB and no register spills in
half precision; ``FAMILY_CONFIGS`` holds the lists of the other GPU families (``tile_family``).
float32 runs IEEE FMA dots, which need small tiles and 8 warps to stay out of local memory.

Whatever the list, a tile launches only if it fits the device (``device.config_fits``: the compiled
kernel's shared memory and its threads against the device's limits): the fixed choice is the
first candidate that fits, the autotuner benchmarks only those that fit, and where none does the
last candidate shrinks (``with_fallbacks``) until one does.  The ``interpreter_tiles`` and
``only_candidate`` options (``llama_kernels.kernel_options``) override the choice for tests and
the compile matrix's sweep.
"""
from __future__ import annotations

from typing import NamedTuple

import triton

from ..common import INTERPRET, count_launch
from ..device import config_fits, device_limits, first_fit
from ..options import current as current_options


class Tile(NamedTuple):
    """One launch configuration of an attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Under the interpreter every kernel runs with one fixed, small tiling: (BLOCK_M, BLOCK_N).
# The forward/dQ and dK/dV orientations differ on purpose so that tests cover both BLOCK_M > BLOCK_N
# and BLOCK_M < BLOCK_N around the causal diagonal (the ``interpreter_tiles`` option changes them).
INTERPRETER_TILES = {"fwd": (32, 16), "fwd_tma": (32, 16), "dkdv": (16, 32), "bwd_fused": (16, 32),
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
    ("fwd", "", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
                         (64, 128, 8, 2), (64, 64, 4, 3)],
    ("fwd", "", HALF, 256): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2)],
    ("fwd", "", FP32, 128): [(32, 32, 8, 2)],
    ("fwd", "", FP32, 256): [(32, 32, 8, 1)],
    ("fwd_tma", "", HALF, 128): [(128, 64, 4, 3), (128, 128, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2)],
    ("fwd_tma", "", HALF, 256): [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3)],
    ("dkdv", "", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2),
                         (64, 64, 8, 3)],
    ("dkdv", "", HALF, 128): [(64, 64, 8, 1), (32, 128, 8, 2), (32, 128, 8, 1)],
    ("dkdv", "", HALF, 256): [(32, 32, 8, 1), (64, 32, 8, 1), (16, 64, 8, 1), (32, 64, 8, 1)],
    ("dkdv", "", FP32, 128): [(16, 32, 8, 2)],
    ("dkdv", "", FP32, 256): [(16, 32, 8, 1)],
    ("bwd_fused", "", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2)],
    ("bwd_fused", "", HALF, 128): [(32, 128, 8, 2), (64, 64, 8, 1)],
    ("bwd_fused", "", HALF, 256): [(32, 32, 8, 1), (16, 64, 8, 1)],
    # Packed sequences (VARLEN) keep a few more scalars live (the sequence's offsets and lengths),
    # which tips every candidate above at D = 128 into spilling (8-88 bytes); these stay clear.
    ("bwd_fused", "varlen", HALF, 64): [(64, 64, 8, 1), (32, 128, 8, 2), (32, 64, 4, 2)],
    ("bwd_fused", "varlen", HALF, 128): [(16, 128, 8, 2), (64, 32, 8, 2)],
    ("bwd_fused", "varlen", HALF, 256): [(32, 32, 8, 1)],
    # Triton 3.9's ptxas (CUDA 13) spills 8 bytes of the dense dQ list's first candidate here.
    ("dq", "varlen", HALF, 128): [(128, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3)],
    ("dkdv", "varlen", HALF, 64): [(64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 4, 2)],
    ("dkdv", "varlen", HALF, 128): [(16, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dkdv", "varlen", HALF, 256): [(32, 32, 8, 1), (64, 32, 8, 1)],
    # Softcap (SOFTCAP: a tanh per score, and in the backward its derivative folded into P) needs
    # the registers of a few more float32 tiles: these lists leave out the candidates that spilled
    # with it (compiled for sm_90 with a sliding window too, dense and packed).
    ("fwd", "softcap", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 2),
                                 (64, 64, 4, 3)],
    ("dkdv", "softcap", HALF, 64): [(32, 64, 4, 2), (32, 128, 8, 2)],
    ("dkdv", "softcap", HALF, 128): [(16, 128, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("bwd_fused", "softcap", HALF, 128): [(16, 128, 8, 2), (64, 32, 8, 2)],
    ("dq", "softcap", HALF, 128): [(64, 32, 4, 3)],
    ("dq", "", HALF, 128): [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
                        (64, 32, 4, 3)],
    ("dq", "", HALF, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dq", "", FP32, 128): [(32, 32, 8, 2)],
    ("dq", "", FP32, 256): [(32, 32, 8, 1)],
}

# Triton 3.7 to 3.9 fail to compile the warp-specialised TMA forward with 128-row query tiles
# ("descriptor block and tensor must have the same number of elements", triton-lang/triton issue
# 11587; 3.6 compiles it): there its lists keep the 64-row candidates.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
TMA_MAX_BLOCK_M = 128 if TRITON_VERSION < (3, 7) else 64
for _key in [key for key in CONFIGS if key[0] == "fwd_tma"]:
    CONFIGS[_key] = [tile for tile in CONFIGS[_key] if tile[0] <= TMA_MAX_BLOCK_M]


# Lists for the GPUs whose tensor cores are not Hopper's wgmma, where the lists above (made for
# sm_90) spill: NVIDIA's mma.sync (A100 sm_80, RTX 3090/A10 sm_86, RTX 4090/L4 sm_89, RTX 5090
# sm_120: every operand and accumulator fragment lives in registers) and AMD's MFMA (CDNA,
# 64-wide waves, 64 KB of LDS).  A kind missing here takes the list above; every candidate is
# still checked against the device's shared memory before it launches.
FAMILY_CONFIGS = {
    # Spill-free on sm_80 (compiled with every candidate of a 11-tile x 2-warp x 3-stage grid),
    # where ptxas gives some 8-warp kernels of the sm_90 lists only 32-128 registers and spills
    # 1.3-3.2 KB; 8 warps and 32-row tiles keep the register fragments of mma.sync small.  The
    # first candidates need at most 80 KB of shared memory, so they fit the 99 KB cards too.
    "mma": {
        ("fwd", "", HALF, 64): [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
        ("fwd", "", HALF, 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3), (32, 64, 8, 2)],
        ("fwd", "", HALF, 256): [(64, 32, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 3)],
        ("bwd_fused", "", HALF, 64): [(64, 32, 8, 2), (32, 32, 8, 2), (128, 32, 8, 1)],
        ("bwd_fused", "", HALF, 128): [(64, 32, 8, 1), (32, 32, 8, 2), (64, 32, 8, 2), (16, 64, 8, 1)],
        ("bwd_fused", "", HALF, 256): [(32, 32, 8, 1), (16, 64, 8, 1)],
        ("dq", "", HALF, 64): [(64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
        ("dq", "", HALF, 128): [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2)],
        ("dq", "", HALF, 256): [(32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2)],
        ("dkdv", "", HALF, 64): [(64, 32, 8, 2), (128, 32, 8, 1), (32, 32, 8, 2)],
        ("dkdv", "", HALF, 128): [(64, 32, 8, 2), (64, 64, 8, 1), (32, 32, 8, 2), (128, 32, 8, 1)],
        ("dkdv", "", HALF, 256): [(32, 32, 8, 1), (32, 32, 8, 2), (16, 64, 8, 1)],
    },
    # Spill-free (no scratch) on gfx942 (a 7-tile x 2-warp x 2-stage grid), within its 64 KB of
    # LDS: 8 waves of 64 lanes, and for the backward 16-query tiles against 64-128 keys.
    "cdna": {
        ("fwd", "", HALF, 64): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
        ("fwd", "", HALF, 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 1)],
        ("bwd_fused", "", HALF, 64): [(16, 128, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2)],
        ("bwd_fused", "", HALF, 128): [(16, 128, 8, 1), (16, 64, 8, 1), (16, 64, 4, 1)],
        ("dq", "", HALF, 64): [(64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2), (32, 32, 8, 2)],
        ("dq", "", HALF, 128): [(64, 32, 8, 2), (64, 32, 8, 1), (32, 64, 8, 2), (32, 32, 8, 2)],
        ("dkdv", "", HALF, 64): [(16, 128, 8, 2), (16, 128, 8, 1), (32, 64, 8, 1), (16, 64, 8, 2)],
        ("dkdv", "", HALF, 128): [(16, 128, 8, 1), (16, 128, 8, 2), (16, 64, 8, 2), (16, 64, 8, 1)],
        # Head dim 256: of 6 tiles x 2 stages (8 warps), only 16 x 32 keeps the backward out of
        # scratch.
        ("fwd", "", HALF, 256): [(64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 8, 1), (16, 64, 8, 1)],
        ("bwd_fused", "", HALF, 256): [(16, 32, 8, 1)],
        ("dq", "", HALF, 256): [(16, 32, 8, 1)],
        ("dkdv", "", HALF, 256): [(16, 32, 8, 1)],
    },
}


# B200 (sm_100, tcgen05): the sm_90 forward lists compile spill-free there, the sm_90 backward
# lists spill 16-152 bytes, the mma ones none.
FAMILY_CONFIGS["blackwell"] = {key: tiles for key, tiles in FAMILY_CONFIGS["mma"].items() if key[0] != "fwd"}

# As named records: Tile(block_m, block_n, num_warps, num_stages).
CONFIGS = {key: [Tile(*tile) for tile in tiles] for key, tiles in CONFIGS.items()}
FAMILY_CONFIGS = {family: {key: [Tile(*tile) for tile in tiles] for key, tiles in table.items()}
                  for family, table in FAMILY_CONFIGS.items()}


def tile_family(limits) -> str:
    """Which lists a device takes: ``"cdna"`` (AMD), ``"blackwell"`` (sm_100, sm_103), ``"mma"``
    (the other NVIDIA GPUs but Hopper: sm_80, sm_86, sm_89, sm_120) or ``"hopper"`` (sm_90, the
    lists of ``CONFIGS``; also the interpreter)."""
    if limits.backend == "hip":
        return "cdna"
    if limits.backend == "cuda" and limits.capability in (100, 103):
        return "blackwell"
    if limits.backend == "cuda" and limits.capability != 90:
        return "mma"
    return "hopper"


# The variant lists a call may take, in order of preference, by (varlen, softcap).  Both at once
# take the softcap lists (no list is made for the pair): the softcap's float32 tiles cost more
# registers than the packed sequences' few scalars.
VARIANTS = {
    (False, False): ("",),
    (True, False): ("varlen", ""),
    (False, True): ("softcap", ""),
    (True, True): ("softcap", "varlen", ""),
}


def candidates(kind, block_d, element_size, varlen=False, softcap=False, family="hopper"):
    """Configurations for ``kind`` at padded head dim ``block_d`` and element size
    ``element_size``: the first head-dim bound at least ``block_d`` that has a list, from
    ``family``'s table (``tile_family``) before ``CONFIGS``, and within a table the first variant
    of ``VARIANTS[varlen, softcap]`` that has one."""
    width = FP32 if element_size == 4 else HALF
    tables = (FAMILY_CONFIGS.get(family, {}), CONFIGS)
    for bound in (64, 128, 256):
        if block_d <= bound:
            for table in tables:
                for variant in VARIANTS[bool(varlen), bool(softcap)]:
                    if (kind, variant, width, bound) in table:
                        return table[(kind, variant, width, bound)]
    raise AssertionError(f"no {kind} configuration for head dim {block_d}")


def spec_candidates(kind, spec, element_size, family):
    """``candidates`` for a call compiled as ``spec`` (``problem.KernelSpec``), narrowed to one by
    the ``only_candidate`` option (the last of a shorter list)."""
    options = candidates(kind, spec.BLOCK_D, element_size, spec.VARLEN, spec.SOFTCAP, family)
    index = current_options().only_candidate
    return options if index is None else [options[min(index, len(options) - 1)]]


def with_fallbacks(options):
    """``options`` followed by smaller tiles for devices that fit none of them (99 KB consumer
    cards, AMD's 64 KB LDS): the last candidate with one stage, then with its larger block halved,
    down to 16 x 16.  On the GPUs a list was made for, its own candidates fit and these never run."""
    block_m, block_n, num_warps, num_stages = options[-1]
    smaller = [Tile(block_m, block_n, num_warps, 1)]
    while max(block_m, block_n) > 16:
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2
        smaller.append(Tile(block_m, block_n, num_warps, 1))
    return list(options) + [t for t in smaller if t not in options]


def _launch_options(tile: Tile) -> dict:
    return {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "num_warps": tile.num_warps,
            "num_stages": tile.num_stages}


# The autotuners' key: the compiled description and the length buckets, of those a kernel takes
# (Triton >= 3.9 refuses key names that are not the kernel's arguments).
TUNING_KEY = ("SPEC", "TQ_BUCKET", "TK_BUCKET")


def tuning_key(kernel) -> list:
    """The names of ``TUNING_KEY`` that ``kernel`` takes as arguments."""
    return [name for name in TUNING_KEY if name in kernel.arg_names]


def _tensor_device(arg):
    return (arg.base if hasattr(arg, "base") else arg).device


def autotuned(kernel, kind, first_arg, pre_hook=None, reset_to_zero=None):
    """``kernel`` wrapped in ``triton.autotune`` over every candidate of ``kind``, pruned at launch
    to the candidates of the call's ``SPEC`` and dtype (read off the argument ``first_arg``) that
    fit the device (``device.config_fits``: shared memory and threads), before anything is
    benchmarked.  ``pre_hook(nargs)`` runs before each launch with the config's block sizes in
    ``nargs``; ``reset_to_zero`` names accumulators (atomics) that every benchmarking run must
    start from zero.  Built only with a GPU: under the interpreter a multi-config autotuner cannot
    benchmark."""
    if INTERPRET:
        return None
    tables = [CONFIGS, *FAMILY_CONFIGS.values()]
    every = sorted({c for table in tables for (k, _, _, _), cs in table.items() if k == kind
                    for c in with_fallbacks(cs)})
    constexprs = {name for name, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr}

    def prune(configs, named_args, **kwargs):
        arg = named_args[first_arg]
        element_size = arg.base.element_size() if hasattr(arg, "base") else arg.element_size()
        limits = device_limits(_tensor_device(arg))
        options = spec_candidates(kind, kwargs["SPEC"], element_size, tile_family(limits))
        args = [named_args[n] for n in kernel.arg_names if n not in constexprs]
        consts = {k: v for k, v in kwargs.items() if k in constexprs}
        by_tile = dict(zip(every, configs))

        def fits(tile):
            meta = _launch_options(tile)
            if pre_hook is not None:
                pre_hook({**named_args, **consts, **meta})
            return config_fits(kernel, args, consts, meta, limits)

        kept = [by_tile[t] for t in options if fits(t)]
        if not kept:  # the first smaller tile that fits (launch() raises if none does)
            kept = [by_tile[t] for t in with_fallbacks(options)[len(options):] if fits(t)][:1]
        return kept

    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                               num_stages=c.num_stages, pre_hook=pre_hook) for c in every],
        key=tuning_key(kernel),
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )(kernel)


def launch(kernel, tuned, kind, grid, args, consts, problem, pre_hook=None):
    """Launch ``kernel`` for ``problem`` (``problem.AttentionProblem``) with ``grid(meta)``: through
    its autotuned twin ``tuned`` for large problems on the GPU, else with the first config of the
    list that fits the device (or, under the interpreter, the small one).  ``consts`` hold
    ``SPEC``; ``pre_hook(nargs)`` prepares arguments that depend on the block sizes (TMA
    descriptors)."""
    spec = consts["SPEC"]
    limits = device_limits(problem.device)
    options = spec_candidates(kind, spec, problem.element_size, tile_family(limits))
    seq_q, seq_k = problem.lengths
    if INTERPRET:
        block_m, block_n = {**INTERPRETER_TILES, **(current_options().interpreter_tiles or {})}[kind]
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    elif len(options) > 1 and seq_q * seq_k >= AUTOTUNE_MIN_PAIRS:
        tuned[grid](*args, **consts)
        count_launch(kernel)
        return
    else:
        def prepare(config):
            if pre_hook is not None:
                pre_hook({**dict(zip(kernel.arg_names, args)), **consts, **config})

        config = first_fit(kernel, args, consts, [_launch_options(c) for c in with_fallbacks(options)],
                           limits, f"{kernel.fn.__name__} (head dim {spec.BLOCK_D})", prepare)
    meta = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    if pre_hook is not None:
        pre_hook({**dict(zip(kernel.arg_names, args)), **consts, **meta})
    kernel[grid(meta)](*args, **consts, **config)
    count_launch(kernel)
