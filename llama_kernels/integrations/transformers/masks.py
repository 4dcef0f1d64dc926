"""What transformers' mask functions and packed-batch arguments mean, in terms the kernels take.

transformers hands its mask interface a *mask function* (``masking_utils``' closures: causal,
``and_masks(sliding_window_overlay(W), causal)``, ``and_masks(causal, packed_sequence_mask_function(ids))``,
possibly remapped to packed positions) rather than the mask.  :func:`mask_pattern` recognises the
ones the kernels express by reading those closures' cells (never by calling them: that would build
the mask).  Packed batches reach FlashAttention models by another road, its keyword arguments or
``position_ids`` (:func:`flash_attention_packing`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from transformers import masking_utils
from transformers.masking_utils import causal_mask_function

from . import host_values


class MaskPattern(NamedTuple):
    """A mask function the kernels express: causal attention, within a sliding ``window`` of key
    slots (None: no window), over packed sequences with ids ``segments (B, T)`` (None: unpacked)."""

    window: Optional[int]
    segments: Optional[torch.Tensor]


class Packing(NamedTuple):
    """The varlen kernel's arguments for packed sequences of the flattened ``(B * T)`` tokens:
    sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``."""

    cu_seqlens_q: torch.Tensor  # int32
    cu_seqlens_k: torch.Tensor  # int32
    max_seqlen_q: int
    max_seqlen_k: int


def _closure(fn, factory: str) -> dict:
    """The variables captured by ``fn`` if it is a closure made by ``masking_utils.<factory>``."""
    qualname = getattr(fn, "__qualname__", "")
    if getattr(fn, "__module__", None) != masking_utils.__name__ or qualname.split(".<locals>.")[0] != factory:
        return {}
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def _causal_window(mask_function) -> Optional[MaskPattern]:
    """The pattern of ``mask_function`` if it is transformers' causal mask function (window None)
    or its sliding-window one (``and_masks(sliding_window_overlay(W), causal)``), possibly remapped
    to the positions of packed sequences (5.x after 5.0); else None."""
    remapped = _closure(mask_function, "remap_positions_for_packed_sequence").get("mask_function")
    fn = remapped if remapped is not None else mask_function
    if fn is causal_mask_function:
        return MaskPattern(None, None)
    parts = _closure(fn, "and_masks").get("mask_functions")
    if isinstance(parts, tuple) and len(parts) == 2 and parts[1] is causal_mask_function:
        window = _closure(parts[0], "sliding_window_overlay").get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
            return MaskPattern(window, None)
    return None


def mask_pattern(mask_function) -> Optional[MaskPattern]:
    """The :class:`MaskPattern` of ``mask_function`` if the kernels express it, else None: causal
    attention, within a sliding window or not, over packed sequences
    (``and_masks(causal, packed_sequence_mask_function(ids))``) or not.  Within one packed sequence
    the positions count up by one, so a window over positions (5.x after 5.0 remaps the causal part
    to ``position_ids``) is one over slots."""
    causal = _causal_window(mask_function)
    if causal is not None:
        return causal
    parts = _closure(mask_function, "and_masks").get("mask_functions")
    if isinstance(parts, tuple) and len(parts) == 2:
        causal = _causal_window(parts[0])
        segments = _closure(parts[1], "packed_sequence_mask_function").get("packed_sequence_mask")
        if causal is not None and isinstance(segments, torch.Tensor) and segments.ndim == 2:
            return MaskPattern(causal.window, segments)
    return None


def packing_from_segments(segments: torch.Tensor) -> Packing:
    """The :class:`Packing` of sequence ids ``segments (B, T)`` over the flattened tokens: a
    sequence starts at each row start and where the id changes.  One host synchronisation (the
    number of sequences and the longest)."""
    batch, length = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = starts.flatten()
    sequence = starts.cumsum(0) - 1  # sequence index of each token
    lengths = torch.zeros(batch * length, dtype=torch.int32, device=segments.device)
    lengths.scatter_add_(0, sequence, torch.ones_like(lengths))  # (bincount would sync on CUDA)
    count, longest = host_values.read_ints(starts.sum(), lengths.max())
    cu = F.pad(lengths[:count].cumsum(0, dtype=torch.int32), (1, 0))
    return Packing(cu, cu, longest, longest)


def flash_attention_packing(kwargs: dict, batch: int) -> Optional[Packing]:
    """Packed sequences as transformers' FlashAttention functions find them (for models whose
    unpatched attention is one of those): its four keyword arguments (``cu_seq_lens_q/k``,
    ``max_length_q/k``, all given), else its own test of ``position_ids``
    (``_is_packed_sequence``, then ``prepare_fa_kwargs_from_position_ids``), once per forward."""
    from transformers.modeling_flash_attention_utils import (_is_packed_sequence,
                                                             prepare_fa_kwargs_from_position_ids)

    packing = _packing_from_kwargs(kwargs)
    position_ids = kwargs.get("position_ids")
    if packing is not None or position_ids is None:
        return packing

    def detect():
        if not bool(_is_packed_sequence(position_ids, batch)):
            return None
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
        return Packing(cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k))

    return host_values.memoised(position_ids, ("flash_packing", batch), detect)


def _packing_from_kwargs(kwargs: dict) -> Optional[Packing]:
    """FlashAttention-2's packed-batch keyword arguments, if all four are given."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    cu_q, cu_k, max_q, max_k = (kwargs.get(n) for n in names)
    if cu_q is None or cu_k is None or max_q is None or max_k is None:
        return None

    def as_int(n):  # max lengths may come as tensors: read once per forward
        return host_values.memoised(n, "int", lambda: int(n)) if isinstance(n, torch.Tensor) else int(n)

    return Packing(cu_q.to(torch.int32), cu_k.to(torch.int32), as_int(max_q), as_int(max_k))
