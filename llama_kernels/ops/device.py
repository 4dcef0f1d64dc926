"""A device's limits, read once per device, and the launch configuration that fits them.

Every launcher sizes its launch from :func:`device_limits`: shared memory per block (the opt-in
maximum on NVIDIA, the LDS on AMD), warp (wave) size, multiprocessor count, registers,
architecture and backend.  They come from Triton's driver (``utils.get_device_properties``, the
query Triton itself makes before a launch) and the device's capability, cached per device.

Tile choices are checked against the device by the compiler itself (:func:`first_fit`): a
candidate's shared memory is exactly what Triton allocates for it, read off the compiled kernel
(``metadata.shared``) before anything launches, so no launch raises ``OutOfResources``.  The check
compiles what the launch compiles anyway (the kernel cache keeps it), and its verdict is cached.

Where no GPU is present and the kernels are compiled for a stand-in target (``tools/
compile_matrix.py``), the limits come from the stand-in driver; a driver that cannot report its
device's properties gets the published limits of its architecture (:data:`PUBLISHED_LIMITS`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from .common import INTERPRET
from .options import current as current_options

# CUDA and HIP both cap a block (workgroup) at 1024 threads, whatever the warp size.
MAX_THREADS_PER_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What a launch must fit on one device.

    ``backend``: ``"cuda"`` (NVIDIA), ``"hip"`` (AMD ROCm) or ``"interpreter"`` (the CPU under
    ``TRITON_INTERPRET=1``).  ``arch``: ``"sm_90"``, ``"gfx942"``, ... ``shared_memory``: bytes a
    block may use.  ``warp_size``: 32, or 64 on AMD's CDNA.  ``registers``: 32-bit registers per
    block.
    """

    backend: str
    arch: str
    shared_memory: int
    warp_size: int
    multiprocessors: int
    registers: int = 65536
    max_threads: int = MAX_THREADS_PER_BLOCK

    @property
    def capability(self) -> Optional[int]:
        """NVIDIA compute capability as ``10 * major + minor`` (``90`` for sm_90); None elsewhere."""
        if self.backend != "cuda":
            return None
        return int("".join(ch for ch in self.arch[3:] if ch.isdigit()))

    @property
    def is_hopper(self) -> bool:
        """NVIDIA sm_90 (H100, H200, H20): the only target of the TMA + warp-specialised forward.
        (ROCm reports MI300X as capability 9.4 and MI250 as 9.0: they are ``"hip"``, never this.)"""
        return self.backend == "cuda" and self.capability is not None and self.capability // 10 == 9

    @property
    def max_warps(self) -> int:
        """Warps a block may hold: 32 of 32 threads, 16 of AMD's 64-wide waves."""
        return self.max_threads // self.warp_size

    def warps(self, num_warps: int) -> int:
        """``num_warps`` capped to what a block of this device may hold."""
        return max(1, min(num_warps, self.max_warps))


# Published per-block limits (CUDA C Programming Guide, compute capabilities table; AMD's CDNA
# ISA guides), used only when a driver cannot report its device's (a stand-in without a GPU).
PUBLISHED_LIMITS = {
    "sm_80": dict(shared_memory=166912, multiprocessors=108),   # A100
    "sm_86": dict(shared_memory=101376, multiprocessors=84),    # RTX 3090 / A10 / A40
    "sm_89": dict(shared_memory=101376, multiprocessors=128),   # RTX 4090 / L4 / L40
    "sm_90": dict(shared_memory=232448, multiprocessors=132),   # H100 / H200
    "sm_100": dict(shared_memory=232448, multiprocessors=148),  # B200
    "sm_120": dict(shared_memory=101376, multiprocessors=170),  # RTX 5090
    "gfx90a": dict(shared_memory=65536, multiprocessors=110, warp_size=64),   # MI210 / MI250
    "gfx942": dict(shared_memory=65536, multiprocessors=304, warp_size=64),   # MI300X
    "gfx950": dict(shared_memory=163840, multiprocessors=256, warp_size=64),  # MI350 / MI355
}

INTERPRETER = DeviceLimits(backend="interpreter", arch="interpreter", shared_memory=1 << 30,
                           warp_size=32, multiprocessors=4)


def _arch_name(target) -> str:
    return f"sm_{target.arch}" if target.backend == "cuda" else str(target.arch).split(":")[0]


def _from_driver(index: int) -> DeviceLimits:
    # The active Triton driver: the real one on a GPU, a stand-in when compiling without one.
    from triton.runtime import driver

    active = driver.active
    target = active.get_current_target()
    arch = _arch_name(target)
    try:
        props = dict(active.utils.get_device_properties(index))
    except Exception:  # a stand-in without a device query: the architecture's published limits
        if arch not in PUBLISHED_LIMITS:
            raise RuntimeError(
                f"llama_kernels: cannot read the limits of {target.backend} device {index} ({arch}) "
                "from Triton's driver, and its architecture is not in ops.device.PUBLISHED_LIMITS"
            ) from None
        published = PUBLISHED_LIMITS[arch]
        props = {"max_shared_mem": published["shared_memory"],
                 "multiprocessor_count": published["multiprocessors"],
                 "warpSize": published.get("warp_size", target.warp_size)}
    if target.backend == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"sm_{major}{minor}"
    return DeviceLimits(
        backend="hip" if target.backend == "hip" else "cuda",
        arch=arch,
        shared_memory=int(props["max_shared_mem"]),
        warp_size=int(props.get("warpSize", target.warp_size)),
        multiprocessors=int(props["multiprocessor_count"]),
        registers=int(props.get("max_num_regs", 65536)),
    )


@functools.lru_cache(maxsize=None)
def _cached_limits(device_type: str, index: Optional[int]) -> DeviceLimits:
    if device_type == "cpu" and INTERPRET:
        return INTERPRETER
    if device_type == "meta":  # nothing runs (fake implementations): the GPU here, if any, else the interpreter
        return _cached_limits("cuda", None) if torch.cuda.is_available() else INTERPRETER
    if device_type == "cuda":
        index = torch.cuda.current_device() if index is None else index
        with torch.cuda.device(index):
            return _from_driver(index)
    # CPU tensors compiled for a stand-in target (no GPU): the driver's current device.
    from triton.runtime import driver

    return _from_driver(driver.active.get_current_device())


def device_limits(device: torch.device) -> DeviceLimits:
    """The :class:`DeviceLimits` of ``device`` (a ``torch.device``), read once and cached."""
    return _cached_limits(device.type, device.index)


def num_sms(device: torch.device) -> int:
    """Multiprocessors (NVIDIA SMs, AMD CUs) of ``device`` (4 under the interpreter)."""
    return device_limits(device).multiprocessors


class NoFittingConfig(RuntimeError):
    """No tile configuration of a kernel fits the device (shared memory, threads)."""


_FITS: dict = {}  # (kernel, device, constants, config) -> shared bytes, or None if it does not fit


def _dtypes(args) -> tuple:
    # What of the arguments can change the compiled kernel's shared memory: the tensors' dtypes
    # (sizes, strides and scalars do not; the tiles and flags are in the constants).
    return tuple(a.dtype for a in args if type(a) not in _SCALARS and hasattr(a, "dtype"))


_SCALARS = (int, float, bool)


def config_fits(kernel, args, consts: dict, config: dict, limits: DeviceLimits) -> bool:
    """Whether ``kernel`` launched with ``args``, constexprs ``consts`` and ``config`` (its block
    sizes, ``num_warps``, ``num_stages``) fits ``limits``: its threads at most the block limit, and
    the shared memory of the compiled kernel at most the device's.  Compiles (without launching)
    on first use; the answer is cached."""
    if limits.backend == "interpreter":
        return True
    if config.get("num_warps", 4) * limits.warp_size > limits.max_threads:
        return False
    key = (kernel.fn.__name__, limits.arch, limits.shared_memory, _dtypes(args),
           tuple(consts.items()), tuple(config.items()))
    if key not in _FITS:
        compiled = kernel.warmup(*args, grid=(1,), **consts, **config)
        _FITS[key] = compiled.metadata.shared
    return _FITS[key] <= limits.shared_memory


def first_fit(kernel, args, consts: dict, configs, limits: DeviceLimits, what: str,
              prepare=None) -> dict:
    """The first of ``configs`` (dicts of block sizes, ``num_warps``, ``num_stages``) that fits
    ``limits`` (:func:`config_fits`), in order of preference; ``prepare(config)``, if given, runs
    before each check (e.g. sets TMA descriptors' block shapes).  Raises :class:`NoFittingConfig`
    naming ``what`` (the op and its shape) and the device when none does."""
    for config in configs:
        if prepare is not None:
            prepare(config)
        if config_fits(kernel, args, consts, config, limits):
            return config
    raise NoFittingConfig(
        f"llama_kernels: no launch configuration of {what} fits {limits.arch} "
        f"({limits.shared_memory} bytes of shared memory per block, {limits.max_threads} threads "
        f"of {limits.warp_size}-wide warps); tried {list(configs)}"
    )


def dot_mode(dtype, device):
    """``(DOT_IN_FP32, PRECISION)`` for the dots of the attention and quantised-linear kernels on
    ``device``: the GPU multiplies half-precision operands as they are and float32 in IEEE
    precision (never TF32); the interpreter multiplies everything in float32 (its bfloat16 dots
    are wrong), unless the ``interpreter_half_dots`` option asks for the GPU's operand path.  Half-precision operands
    name the backend's default precision, which they ignore: "tf32" on NVIDIA (the PTX every list
    was checked with), "ieee" on AMD (only gfx942 accepts "tf32"; gfx90a and gfx950 refuse it)."""
    if dtype == torch.float32:
        return INTERPRET, "ieee"
    if INTERPRET and not current_options().interpreter_half_dots:
        return True, "ieee"
    return False, ("tf32" if device_limits(device).backend in ("cuda", "interpreter") else "ieee")
