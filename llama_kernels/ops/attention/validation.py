"""Argument checks of the attention ops, before anything launches: a ``TypeError`` or
``ValueError`` that names the argument (``q``, ``k_cache``, ``window``...)."""
from __future__ import annotations

import numbers

import torch

from ..common import check_float_arg, check_same, check_tensor, is_abstract

MAX_HEAD_DIM = 256


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels have tiles for ``head_dim``: a multiple of 16 from 16 to ``MAX_HEAD_DIM``."""
    return head_dim % 16 == 0 and 16 <= head_dim <= MAX_HEAD_DIM


def validate_attention(q, k, v, causal, sm_scale, names=("q", "k", "v"), allow_empty_keys=False) -> float:
    """Check the arguments of an attention call (before anything launches) and return ``sm_scale``
    (``D ** -0.5`` when ``None``).  ``names`` are the argument names the errors quote; packed
    sequences (``allow_empty_keys``) may hold no key at all."""
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, ndim=4)
    check_same("dtype", **{qn: q, kn: k, vn: v})
    check_same("device", **{qn: q, kn: k, vn: v})
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{vn} must have the shape of {kn} {tuple(k.shape)}, got {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{kn} must have {qn}'s batch size {batch}, got shape {tuple(k.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"{kn} must have {qn}'s head dim {head_dim}, got shape {tuple(k.shape)}")
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(
            f"{kn}'s number of heads must divide {qn}'s ({heads}) for grouped-query attention; "
            f"got {k.shape[1]}"
        )
    if not supports_head_dim(head_dim):
        raise ValueError(
            f"{qn}'s head dim must be a multiple of 16 between 16 and {MAX_HEAD_DIM}, got {head_dim}"
        )
    if k.shape[2] < 1 and not allow_empty_keys:
        raise ValueError(f"{kn} must hold at least one key (Tk >= 1), got shape {tuple(k.shape)}")
    if sm_scale is None:
        return head_dim ** -0.5
    return check_float_arg("sm_scale", sm_scale, positive=True)


def validate_window_softcap(window, softcap, causal):
    """Check ``flash_attention``'s ``window`` and ``softcap`` (before anything launches) and return
    them as the launchers take them: ``(window, softcap)`` with 0 meaning "off".

    ``window``: an int >= 1 (not a bool), only with ``causal=True`` (sliding windows are defined
    relative to the causal diagonal).  ``softcap``: a finite real number > 0.
    """
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be an int (>= 1) or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (the number of most recent keys a query sees), got {window}")
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True")
        window = int(window)
    else:
        window = 0
    softcap = 0.0 if softcap is None else check_float_arg("softcap", softcap, positive=True)
    return window, softcap


def _check_max_seqlen(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def validate_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Check the packed-sequence arguments of ``flash_attention`` (before anything launches).

    Returns ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` with ``cu_seqlens_k``
    defaulting to ``cu_seqlens_q``.  A missing max length costs one host synchronisation, which
    also checks the offsets (non-decreasing, within the packed tensors); given max lengths are
    trusted (they must be at least the longest sequence) and nothing is read back.  Offsets
    without values (meta or fake tensors: nothing is launched) are not read: a missing max length
    is then the packed length, which bounds every sequence.
    """
    if cu_seqlens_q is None:
        if cu_seqlens_k is not None or max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("cu_seqlens_k, max_seqlen_q and max_seqlen_k need cu_seqlens_q (packed sequences)")
        return None, None, None, None
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must hold N + 1 >= 2 offsets (N sequences), got shape {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)} (one offset "
            f"per sequence), got {tuple(cu_seqlens_k.shape)}"
        )
    check_same("device", q=q, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(
            "packed sequences (cu_seqlens_q) take q (1, Hq, total_q, D) and k, v (1, Hk, total_k, D); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if (max_seqlen_q is None or max_seqlen_k is None) and is_abstract(cu_seqlens_q, cu_seqlens_k):
        max_seqlen_q = q.shape[2] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = k.shape[2] if max_seqlen_k is None else max_seqlen_k
    if max_seqlen_q is None or max_seqlen_k is None:
        measured = []
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[2]),
                                ("cu_seqlens_k", cu_seqlens_k, k.shape[2])):
            offsets = cu.tolist()  # the one host synchronisation
            lengths = [b - a for a, b in zip(offsets, offsets[1:])]
            if offsets[0] < 0 or min(lengths) < 0 or offsets[-1] > total:
                raise ValueError(
                    f"{name} must be non-decreasing offsets from >= 0 to at most {total} (the packed "
                    f"length), got {offsets if len(offsets) <= 12 else offsets[:12] + ['...']}"
                )
            measured.append(max(lengths))
        max_seqlen_q = measured[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = measured[1] if max_seqlen_k is None else max_seqlen_k
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def validate_cache_lengths(q, k_cache, v_cache, cache_seqlens, cache_leftpad, max_rows):
    """Check ``flash_decode``'s cache arguments (``q`` and the caches already checked by
    ``validate_attention``): int32 ``(B,)`` lengths (and left padding) on ``q``'s device, at most
    ``max_rows`` query rows per KV head, and no input that needs a gradient."""
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    if cache_seqlens.shape[0] != q.shape[0]:
        raise ValueError(
            f"cache_seqlens must have shape (B,) = ({q.shape[0]},) to match q; "
            f"got {tuple(cache_seqlens.shape)}"
        )
    check_same("device", q=q, cache_seqlens=cache_seqlens)
    if cache_leftpad is not None:
        check_tensor("cache_leftpad", cache_leftpad, ndim=1, dtypes=(torch.int32,))
        if cache_leftpad.shape != cache_seqlens.shape:
            raise ValueError(f"cache_leftpad must have shape (B,) = ({q.shape[0]},) to match q; "
                             f"got {tuple(cache_leftpad.shape)}")
        check_same("device", q=q, cache_leftpad=cache_leftpad)
    seq_q, group = q.shape[2], q.shape[1] // k_cache.shape[1]
    if seq_q * group > max_rows:
        raise ValueError(
            f"q holds too many query rows per KV head for flash_decode: Tq * Hq / Hk = {seq_q} * "
            f"{group} > {max_rows}; use flash_attention for prefill-sized chunks"
        )
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError(
            "flash_decode is forward only: q, k_cache and v_cache must not require grad "
            "(call it under torch.no_grad(), or use flash_attention for training)"
        )
