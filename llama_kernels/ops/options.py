"""Every runtime switch of the launchers, in one frozen object.

The launchers read the options in force when they run (``current()``); callers change them for a
block of code with ``kernel_options(**overrides)``, which nests and restores on exit (also on an
exception), per thread and per asyncio task (a ``contextvars.ContextVar``)::

    import llama_kernels as lk
    with lk.kernel_options(tma_forward=False):     # the portable forward, even on an H100
        o = lk.flash_attention(q, k, v)

No module global of the kernels is part of the API: tests and benchmarks set these instead.  An
autograd backward reads the options in force when it runs (usually outside the ``with`` of its
forward), like ``torch.are_deterministic_algorithms_enabled()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from typing import Mapping, Optional

# Kinds of attention kernel whose interpreter tiles may be set (``interpreter_tiles``): the keys of
# ``attention.configs.INTERPRETER_TILES``, named here so that this module never imports triton.
ATTENTION_KINDS = ("fwd", "fwd_tma", "dq", "dkdv", "bwd_fused")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """The launchers' runtime switches (defaults: what a user gets without asking).

    * ``tma_forward``: the Hopper attention forward (TMA descriptors, warp-specialised).  ``None``
      (auto) takes it wherever it applies on an NVIDIA sm_90 GPU; ``True`` wherever it applies on
      any device (half precision, unit head-dim stride, 16-byte aligned strides; the interpreter
      runs it too); ``False`` never (the portable kernel).
    * ``deterministic``: the attention backward's schedule.  ``None`` follows
      ``torch.are_deterministic_algorithms_enabled()``; ``True`` always takes the bitwise
      reproducible one (no atomics); ``False`` the fused one with atomic dQ (half precision;
      float32 is always deterministic).
    * ``min_programs_per_sm``: the attention backward splits a KV group's query heads over more
      programs while its dK/dV grid has fewer than this many programs per multiprocessor
      (0: never split).
    * ``decode_min_keys_per_split``: the fewest keys a split-KV decode program reads (``None``:
      256 on a GPU, 64 under the interpreter, so that tests see several splits).
    * ``quantized_split_k``: how many programs share each output tile's reduction over the input
      features in the quantised linear (split-K; ``None``: as many as fill the device's
      multiprocessors twice over, capped by the reduction's blocks).
    * ``cross_entropy_chunk``: logits computed at a time by the fused linear cross-entropy
      (elements of its float32 ``(tokens, vocab chunk)`` tile).
    * ``interpreter_tiles``: ``{kind: (BLOCK_M, BLOCK_N)}`` for the attention kernels under the
      interpreter (kinds: ``fwd``, ``fwd_tma``, ``dq``, ``dkdv``, ``bwd_fused``; the missing ones
      keep their defaults), to test other orientations around the causal diagonal.
    * ``interpreter_half_dots``: under the interpreter, feed float16/bfloat16 tiles to the
      attention and quantised-linear dots as they are (the GPU's operand path; the interpreter's bfloat16 dots are
      wrong, its float16 ones sound) instead of rounding them and multiplying in float32.
    * ``only_candidate``: the attention launchers take only candidate number ``i`` of each tile
      list (the last of a shorter one) as their fixed choice: the compile matrix's sweep of
      every candidate (``tools/compile_matrix.py --set full``).
    """

    tma_forward: Optional[bool] = None
    deterministic: Optional[bool] = None
    min_programs_per_sm: int = 2
    decode_min_keys_per_split: Optional[int] = None
    quantized_split_k: Optional[int] = None
    cross_entropy_chunk: int = 1 << 26
    interpreter_tiles: Optional[Mapping[str, tuple]] = None
    interpreter_half_dots: bool = False
    only_candidate: Optional[int] = None

    def __post_init__(self):
        for name in ("tma_forward", "deterministic"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None, got {type(value).__name__}")
        if not isinstance(self.interpreter_half_dots, bool):
            raise TypeError(f"interpreter_half_dots must be a bool, got {type(self.interpreter_half_dots).__name__}")
        _check_int("min_programs_per_sm", self.min_programs_per_sm, 0)
        if self.decode_min_keys_per_split is not None:
            _check_int("decode_min_keys_per_split", self.decode_min_keys_per_split, 1)
        if self.quantized_split_k is not None:
            _check_int("quantized_split_k", self.quantized_split_k, 1)
        _check_int("cross_entropy_chunk", self.cross_entropy_chunk, 1)
        if self.only_candidate is not None:
            _check_int("only_candidate", self.only_candidate, 0)
        if self.interpreter_tiles is not None:
            if not isinstance(self.interpreter_tiles, Mapping):
                raise TypeError("interpreter_tiles must be a mapping {kind: (BLOCK_M, BLOCK_N)}, got "
                                f"{type(self.interpreter_tiles).__name__}")
            tiles = {}
            for kind, tile in self.interpreter_tiles.items():
                if kind not in ATTENTION_KINDS:
                    raise ValueError(f"interpreter_tiles: unknown kernel kind {kind!r}; known: {ATTENTION_KINDS}")
                if (not isinstance(tile, tuple) or len(tile) != 2
                        or not all(_power_of_two_at_least_16(n) for n in tile)):
                    raise ValueError(f"interpreter_tiles[{kind!r}] must be (BLOCK_M, BLOCK_N), powers of two "
                                     f">= 16, got {tile!r}")
                tiles[kind] = tile
            # A private copy: the options stay frozen whatever the caller does with its dict.
            object.__setattr__(self, "interpreter_tiles", tiles)

    def deterministic_backward(self) -> bool:
        """Whether the attention backward takes the deterministic schedule for half precision."""
        if self.deterministic is None:
            import torch

            return torch.are_deterministic_algorithms_enabled()
        return self.deterministic


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _power_of_two_at_least_16(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 16 and n & (n - 1) == 0


# KernelOptions is frozen: the shared default cannot change under anyone.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("llama_kernels_options", default=KernelOptions())  # noqa: B039


def current() -> KernelOptions:
    """The options in force here (the defaults outside every ``kernel_options`` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def kernel_options(**overrides):
    """Run a block with some launcher options changed (``KernelOptions``' fields; the others keep
    the values in force).  Unknown names raise ``TypeError``, bad values ``TypeError`` /
    ``ValueError``, before the block runs.  Yields the options in force inside."""
    fields = {f.name for f in dataclasses.fields(KernelOptions)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"kernel_options: unknown option(s) {unknown}; known: {sorted(fields)}")
    options = dataclasses.replace(current(), **overrides)
    token = _CURRENT.set(options)
    try:
        yield options
    finally:
        _CURRENT.reset(token)
