"""The device values the attention path reads on the host: at most once per forward, never per layer.

A padding mask's sizes, packed sequence lengths and the like live on the device; each read is a
host synchronisation.  They are read here in one batch (:func:`read_ints`), computed once per
tensor object (:func:`memoised`), and not at all where nothing can be read back
(:func:`can_read`, :func:`traced`).

Callers reach these functions through the module (``host_values.read_ints(...)``), never by a
name imported into their own module, so that a test replacing one here (to forbid reads) replaces
it for every caller.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...ops.common import is_abstract, values_readable

_MEMO = WeakIdKeyDictionary()  # tensor -> {key: (version, value)}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def memoised(t: torch.Tensor, key, compute):
    """``compute()``, once per object ``t`` (and per in-place change of it) and ``key``.

    Keyed on the object, never on its values, so looking it up reads nothing back from the device;
    the version counter catches a buffer that is reused and overwritten in place between calls.
    """
    slot = _MEMO.setdefault(t, {})
    version = _version(t)
    hit = slot.get(key)
    if hit is None or hit[0] != version:
        hit = slot[key] = (version, compute())
    return hit[1]


def read_ints(*values) -> list:
    """Python ints of ``values`` (ints, bools or 0-d device tensors), in one host synchronisation."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [int(v) for v in values]
    read = iter(torch.stack([t.reshape(()).to(torch.int64) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else int(v) for v in values]


def can_read(t: torch.Tensor) -> bool:
    """False while a value cannot be read back: torch.compile tracing, CUDA-graph capture, meta
    and fake tensors."""
    return values_readable(t)


def traced(*tensors) -> bool:
    """Whether this forward is traced rather than run: torch.compile, or tensors without values
    (meta, fake: a memory tracker, a planner), whose values (padding, packed sequence ids) cannot
    be read: the layers whose masks need them run the unpatched attention."""
    return torch.compiler.is_compiling() or is_abstract(*tensors)
