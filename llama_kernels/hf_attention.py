"""The attention kernels inside transformers' LLaMA family: an attention function and a mask function.

transformers (5.x) lets a model name its attention implementation; ``patch.apply_kernels`` registers
this module's pair under ``"llama_kernels"``:

* :func:`kernel_mask` (``AttentionMaskInterface``) runs once per model forward, where
  ``create_causal_mask`` (or, for a sliding-window layer, ``create_sliding_window_causal_mask``)
  would build SDPA's ``(B, 1, Tq, Tk)`` boolean mask.  It builds a
  :class:`MaskPlan` instead: what the mask means, in terms the kernels take.
* :func:`kernel_attention` (``AttentionInterface``) runs in every layer with that forward's mask
  and picks a kernel, or, when the kernels cannot give the answer, the attention implementation
  the model had before it was patched (``"sdpa"``, ``"eager"``, ...; kept on each attention module
  as ``_lk_unpatched_attention``), with the mask that implementation would have had; for
  soft-capped scores, which SDPA cannot compute, the model's own eager attention.

**The semantics, whichever path runs.**  Keys sit in slots ``j = 0 .. Tk-1`` of the layer's key
tensor (the current tokens, or a dynamic/static KV cache; a full sliding-window cache layer holds
only its last keys, slot 0 being position ``kv_offset``); query ``i`` of ``Tq`` sits in slot
``p_i = q_start + i`` (its position minus ``kv_offset``).  With a 2-D padding mask ``m (B, S)`` (``m[b, j]`` true where slot ``j``
holds a real token; slots ``j >= S`` are padding), query ``i`` of row ``b`` attends to key ``j`` iff

    j <= p_i  and  m[b, j]                                   (SDPA's mask, built by transformers)

A sliding-window layer (Mistral, Qwen2, Gemma 2/3 local layers) adds ``j > p_i - window``; the
window is read from the mask function transformers hands over (``sliding_window_overlay``), since
that mask, not the layer's ``sliding_window`` keyword, is what SDPA and eager attention apply.
Gemma 2's ``softcap`` keyword squashes the scores (``softcap * tanh(s / softcap)``) in every
kernel.  Without a mask every slot up to ``p_i`` counts.  Packed rows (several sequences one after the other
in one row, see below) add: ``j`` and ``p_i`` belong to the same sequence.  Every query that sees
some key gets exactly this attention, padding queries included (right padding: ``generate`` reads
the last one).  A query that sees no key (left padding) gets what the unpatched implementation
gives it: zeros from SDPA (torch >= 2.5) and from the kernels; from eager attention, whose mask adds
``finfo.min`` rather than ``-inf``, the average of every value slot, so for such models those rows
are computed by the model's eager function (:func:`_with_empty_queries`; the count is read with the
plan's other host values, nothing is computed where no row is empty).

**What the mask function returns.**

* ``None`` where transformers' SDPA mask would be ``None`` too (no padding, no packing, and
  ``Tq == 1`` or ``Tk == Tq``): plain causal attention, aligned bottom-right, over all ``Tk`` keys.
  (A model whose unpatched attention is FlashAttention may still find packed sequences there, by
  FlashAttention's own rule: below.)
* Otherwise a 2-D boolean *marker* tensor ``(B, kv_offset + Tk)``: the padding mask over the key
  positions (all true without padding), which is what the mask means, so it is still right if transformers feeds
  it back in as a 2-D ``attention_mask`` (``generate`` does so with static caches).  Its plan lives
  in a weak table keyed on the marker object, so that every layer of this forward shares one plan
  and one host synchronisation.
* A marker whose plan says "the unpatched implementation" (``sdpa_only``) where the kernels
  cannot express the mask (another mask function, such as a chunked one): every layer then runs
  it, with its own mask built from the same arguments, exactly.
* Under ``torch.compile`` the plan object itself instead of a marker (Dynamo traces it; a weak
  table keyed on a tensor it cannot).  Dynamo can neither read a closure's cells (the mask
  function's window or packed sequence ids) nor read values back, so there the kernels take the
  layers whose mask is plain causal without padding (a static cache's decode steps included), and
  every other layer runs the unpatched implementation: no graph break, the same answers.
* Meta and fake tensors (FakeTensorMode: memory tracking, planning at model sizes): no value can
  be read, but closures can, so plain causal and sliding-window layers without padding take the
  kernels (their fake implementations; nothing launches); padded or packed batches, whose mask
  lives in values, run the unpatched implementation.

**Which path each layer takes** ("decode-sized": no gradient and ``Tq * Hq / Hk <= 64``, the rule
of ``ops.attention.use_decode``), and the host synchronisations (never one per layer):

* no mask: ``flash_attention(causal=True)``, bottom-right; no sync.  Only for a model whose
  unpatched attention is FlashAttention, if ``Tk == Tq``: FA2's keyword arguments give the varlen
  kernel its offsets (no sync when the max lengths are ints, as the collator gives them), else
  FlashAttention's own test of ``position_ids`` runs once per forward (one sync).
* a marker, decode-sized: ``flash_decode`` over the whole key buffer with
  ``cache_seqlens = q_start + Tq`` and ``cache_leftpad`` = each row's first real slot, both made on
  the device; one read per forward checks that the mask has that form (none without padding).
* a marker, prefill-sized (or a mask ``flash_decode`` cannot express): one sync per forward for
  the sizes; no padding before ``q_start + Tq``: the plain kernel on those keys; else unpad ->
  varlen kernel -> pad.
* the unpatched implementation with the mask it would have had (:func:`_fallback`): attention
  dropout, ``output_attentions`` where that implementation returns weights (eager), 4-D masks,
  masks only it can apply, modules without the kernel, a sliding window over padding that is not
  all on the left (unpadding would change the distances between slots), and under
  ``torch.compile`` every mask but plain causal.

Unpadding is exact for any padding pattern: a row's real queries are the last of its real keys
(both are the real slots, in order, up to ``q_start + Tq``), so bottom-right causality within the
pair is the rule above.  Padding queries that follow real tokens (right padding, holes) see all the
real keys before them; a run of them is one more, non-causal, pair over those keys, in a second
varlen launch that only such masks pay for.  ``flash_decode`` only sees a contiguous range of keys
``[cache_leftpad, cache_seqlens)``: that covers left padding, not a hole (right padding followed by
generated tokens, a masked query token).  Whether a mask has that form is read on the host once per
forward (``MaskPlan.decode_ok``); a mask that does not goes the unpad way instead.  Under CUDA-graph
capture nothing can be read back, so the decode path runs unchecked and rows whose mask it cannot
express come out as NaN (never a silent wrong answer); under ``torch.compile`` padded masks never
reach it (above).

**Packed sequences** (padding-free batches, e.g. ``DataCollatorWithFlattening``) are what the
unpatched model makes of them, by transformers' own rule for its implementation, per version:

* SDPA and eager attention see packing only in the mask: transformers looks for it (its
  ``_preprocess_mask_arguments``) only with ``position_ids``, no 2-D ``attention_mask`` and no cache
  (``use_cache=False``, or gradient checkpointing; the default ``use_cache=True`` makes a
  DynamicCache, in training too), and starts a sequence wherever ``position_ids[t] -
  position_ids[t-1] != 1`` (``find_packed_sequence_indices``).  Its packed mask function is then
  recognised and its sequence ids run the varlen kernel.  FlashAttention-2's ``cu_seq_lens_*``
  keyword arguments are ignored, as SDPA and eager attention ignore them.
* FlashAttention models (``flash_attention_2``/``_3``) find packing themselves, mask or not: the
  four keyword arguments, else ``_is_packed_sequence(position_ids)`` and
  ``prepare_fa_kwargs_from_position_ids`` (a sequence starts where the position is the minimum),
  transformers' own functions, called here.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from transformers import masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

from .ops.attention import flash_attention
from .ops.common import is_abstract, values_readable
from .ops.attention import flash_decode, use_decode

HF_ATTENTION = "llama_kernels"  # the name the attention/mask pair is registered under

# kwargs of the attention interface that change the math beyond what the kernels do (a layer's
# `sliding_window` is read from its mask, which is what SDPA and eager attention apply; `softcap`
# goes to the kernels)
_UNSUPPORTED_KWARGS = ("s_aux", "position_bias")


def register() -> None:
    """Register :func:`kernel_attention` and :func:`kernel_mask` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(HF_ATTENTION, kernel_attention)
    AttentionMaskInterface.register(HF_ATTENTION, kernel_mask)


# ---------------------------------------------------------------------------------------------
# per-forward memo: keyed on a tensor object and its in-place version
# ---------------------------------------------------------------------------------------------
_MEMO = WeakIdKeyDictionary()  # tensor -> {key: (version, value)}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _memoised(t: torch.Tensor, key, compute):
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


def _read(*values) -> list:
    """Python ints of ``values`` (ints, bools or 0-d device tensors), in one host synchronisation."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [int(v) for v in values]
    read = iter(torch.stack([t.reshape(()).to(torch.int64) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else int(v) for v in values]


def _can_sync(t: torch.Tensor) -> bool:
    """False while a value cannot be read back: torch.compile tracing, CUDA-graph capture, meta
    and fake tensors."""
    return values_readable(t)


def _traced(*tensors) -> bool:
    """Whether this forward is traced rather than run: torch.compile, or tensors without values
    (meta, fake: a memory tracker, a planner), whose values (padding, packed sequence ids) cannot
    be read: the layers whose masks need them run the unpatched attention."""
    return torch.compiler.is_compiling() or is_abstract(*tensors)


# ---------------------------------------------------------------------------------------------
# packed sequences
# ---------------------------------------------------------------------------------------------
def _packing_from_segments(segments: torch.Tensor):
    """``(cu_seqlens, max_seqlen, count)`` of the flattened ``(B * T)`` tokens for sequence ids
    ``segments (B, T)``: a sequence starts at each row start and where the id changes.
    One host synchronisation (the number of sequences and the longest)."""
    batch, length = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = starts.flatten()
    sequence = starts.cumsum(0) - 1  # sequence index of each token
    lengths = torch.zeros(batch * length, dtype=torch.int32, device=segments.device)
    lengths.scatter_add_(0, sequence, torch.ones_like(lengths))  # (bincount would sync on CUDA)
    count, longest = _read(starts.sum(), lengths.max())
    cu = F.pad(lengths[:count].cumsum(0, dtype=torch.int32), (1, 0))
    return cu, longest, count


def _flash_attention_packing(kwargs: dict, batch: int):
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
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)

    return _memoised(position_ids, ("flash_packing", batch), detect)


def _packing_from_kwargs(kwargs: dict):
    """FlashAttention-2's packed-batch keyword arguments, if all four are given."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    cu_q, cu_k, max_q, max_k = (kwargs.get(n) for n in names)
    if cu_q is None or cu_k is None or max_q is None or max_k is None:
        return None

    def as_int(n):  # max lengths may come as tensors: read once per forward
        return _memoised(n, "int", lambda: int(n)) if isinstance(n, torch.Tensor) else int(n)

    return cu_q.to(torch.int32), cu_k.to(torch.int32), as_int(max_q), as_int(max_k)


def _closure(fn, factory: str) -> dict:
    """The variables captured by ``fn`` if it is a closure made by ``masking_utils.<factory>``."""
    qualname = getattr(fn, "__qualname__", "")
    if getattr(fn, "__module__", None) != masking_utils.__name__ or qualname.split(".<locals>.")[0] != factory:
        return {}
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def _causal_window(mask_function):
    """``(True, window)`` if ``mask_function`` is transformers' causal mask function (window None)
    or its sliding-window one (``and_masks(sliding_window_overlay(W), causal)``), possibly remapped
    to the positions of packed sequences (5.x after 5.0); else ``(False, None)``."""
    remapped = _closure(mask_function, "remap_positions_for_packed_sequence").get("mask_function")
    fn = remapped if remapped is not None else mask_function
    if fn is causal_mask_function:
        return True, None
    parts = _closure(fn, "and_masks").get("mask_functions")
    if isinstance(parts, tuple) and len(parts) == 2 and parts[1] is causal_mask_function:
        window = _closure(parts[0], "sliding_window_overlay").get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and window >= 1:
            return True, window
    return False, None


def _mask_pattern(mask_function):
    """``(window, segments)`` for the mask functions the kernels express, else None: causal
    attention, within a sliding ``window`` of keys or not (None), over packed sequences with ids
    ``segments (B, T)`` (``and_masks(causal, packed_sequence_mask_function(ids))``) or not (None).
    Within one packed sequence the positions count up by one, so a window over positions (5.x
    after 5.0 remaps the causal part to ``position_ids``) is one over slots."""
    causal, window = _causal_window(mask_function)
    if causal:
        return window, None
    parts = _closure(mask_function, "and_masks").get("mask_functions")
    if isinstance(parts, tuple) and len(parts) == 2:
        causal, window = _causal_window(parts[0])
        segments = _closure(parts[1], "packed_sequence_mask_function").get("packed_sequence_mask")
        if causal and isinstance(segments, torch.Tensor) and segments.ndim == 2:
            return window, segments
    return None


# ---------------------------------------------------------------------------------------------
# the mask function and its plan
# ---------------------------------------------------------------------------------------------
_PLANS = WeakIdKeyDictionary()  # marker tensor -> MaskPlan


class MaskPlan:
    """What one forward's mask means (module docstring), and what the kernels need from it.

    ``sdpa_args`` are the mask function's arguments, to build SDPA's mask for a fallback;
    ``sdpa_only`` plans stand for a mask only SDPA can apply.  ``q_start`` (slot of query 0) is an
    int, or a 0-d device tensor (a static cache's length; the queries' ``cache_position[0]`` on
    transformers 5.0), copied when the mask is made because the cache updates its own in place.
    ``q_slots`` (5.0 only, ``Tq > 1``) are the queries' slots, which must count up by one from
    ``q_start``.  ``padding (B, Tk)`` marks real tokens (None: all real); ``segments (B, T)`` are
    packed sequence ids; ``window`` (None: none) is the sliding window of key slots each query sees
    (``p_i - window < j <= p_i``).  Device values are made on first use and kept, host values are read once:
    every layer of the forward shares them.
    """

    def __init__(self, sdpa_args: dict, batch: int, q_length: int, kv_length: int, device, *,
                 sdpa_only=False, q_start=0, q_slots=None, padding=None, segments=None, window=None):
        self.sdpa_args, self.sdpa_only, self.window = sdpa_args, sdpa_only, window
        self.batch, self.q_length, self.kv_length, self.device = batch, q_length, kv_length, device
        self.q_start, self.q_slots, self.padding, self.segments = q_start, q_slots, padding, segments
        # Whether query rows that see no key need their unpatched answer (:meth:`empty_queries`):
        # set by the attention function, before the plan's host values are read.
        self.fill_empty = False
        self._memo = {}

    def _once(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def fallback_mask(self, implementation: str, dtype: torch.dtype):
        """The mask ``implementation`` (transformers' name: ``"sdpa"``, ``"eager"``, ...) would have
        had for this forward, from the arguments its own mask function would have had."""
        def compute():
            if implementation == "sdpa":
                return sdpa_mask(**self.sdpa_args)
            if implementation == "eager":
                return _additive(sdpa_mask(**{**self.sdpa_args, "allow_is_causal_skip": False}), dtype)
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            return ALL_MASK_ATTENTION_FUNCTIONS[implementation](**{"dtype": dtype, **self.sdpa_args})
        return self._once(("mask", implementation, dtype), compute)

    def empty_queries(self) -> torch.Tensor:
        """Device bool ``(B, Tq)``: the queries that see no key (padding before a row's first real
        token, a row of padding only).  The kernels give them zeros, as SDPA does; eager attention
        gives them the average of every value slot (its mask adds ``finfo.min``, not ``-inf``)."""
        return self._once("empty", lambda: self._tokens()["seen"] == 0)

    def has_empty_queries(self) -> bool:
        """Whether :meth:`empty_queries` has any (read with the plan's other host values, if the
        attention function set ``fill_empty``)."""
        if self.padding is None or not self.fill_empty:
            return False
        return self._once("has_empty", lambda: bool(_read(self.empty_queries().any())[0]))

    def _read(self, *values) -> list:
        """``_read(*values)``, with :meth:`has_empty_queries`' flag read in the same host
        synchronisation where it is wanted and not known yet (so it never costs a read of its own)."""
        fold = self.padding is not None and self.fill_empty and "has_empty" not in self._memo
        read = _read(*values, *([self.empty_queries().any()] if fold else []))
        if fold:
            self._memo["has_empty"] = bool(read.pop())
        return read

    def _slots_ok(self):
        """Device bool: the queries sit in slots ``q_start .. q_start + Tq - 1`` inside the keys;
        None when that holds by construction (an int ``q_start`` is checked when the plan is made,
        a static cache cannot hold its update otherwise)."""
        if self.q_slots is None:
            return None
        steps = torch.arange(self.q_length, device=self.q_slots.device)
        return ((self.q_slots - self.q_start == steps).all()
                & (self.q_start + self.q_length <= self.kv_length))

    def decode_inputs(self):
        """``(cache_seqlens, cache_leftpad, row_ok)`` for ``flash_decode``, on the device.

        Row ``b`` holds keys ``[leftpad_b, L)`` with ``L = q_start + Tq`` and ``leftpad_b`` its
        first real slot; ``row_ok[b]`` says whether every slot in that range is real (so the mask
        has that form), None when there is no padding to check.
        """
        def compute():
            device = self.device
            end = self.q_start + self.q_length
            if isinstance(end, torch.Tensor):
                seqlens = end.to(torch.int32).reshape(1).expand(self.batch)
            else:
                seqlens = torch.full((self.batch,), end, dtype=torch.int32, device=device)
            leftpad = row_ok = None
            if self.padding is not None:
                first = self.padding.to(torch.int32).argmax(1).to(torch.int32)  # first real slot
                slot = torch.arange(self.kv_length, device=device)
                inside = (slot >= first[:, None]) & (slot < end)
                row_ok = (self.padding | ~inside).all(1)  # (a row of padding only: False)
                leftpad = first
            slots_ok = self._slots_ok()
            if slots_ok is not None:
                row_ok = slots_ok.expand(self.batch) if row_ok is None else row_ok & slots_ok
            return seqlens, leftpad, row_ok
        return self._once("decode", compute)

    def decode_ok(self) -> bool:
        """Whether ``flash_decode`` expresses the mask in every row: one host read per forward,
        or, where nothing can be read back (CUDA-graph capture, torch.compile), True, with the
        rows it does not express poisoned (:meth:`decode_output`)."""
        def compute():
            row_ok = self.decode_inputs()[2]
            if row_ok is None or not _can_sync(row_ok):
                return True
            return bool(self._read(row_ok.all())[0])
        return self._once("decode_ok", compute)

    def decode_output(self, out: torch.Tensor) -> torch.Tensor:
        """``flash_decode``'s output, NaN in the rows whose mask it does not express if that could
        not be checked on the host (never a silent wrong answer)."""
        row_ok = self.decode_inputs()[2]
        if row_ok is None or _can_sync(row_ok):
            return out  # checked (decode_ok), or nothing to check
        poison = self._once(("poison", out.dtype),
                            lambda: torch.where(row_ok, 1.0, math.nan).to(out.dtype).view(-1, 1, 1, 1))
        return out * poison

    def host_known(self) -> bool:
        """Whether :meth:`host` reads nothing back: no padding, the queries' slots known."""
        return self.padding is None and self.q_slots is None and not isinstance(self.q_start, torch.Tensor)

    def host(self) -> dict:
        """The prefill path's values, read in one host synchronisation per forward:
        ``ok`` (the queries' slots are as assumed), ``end = q_start + Tq`` and, with padding,
        ``all_real`` (no padding slot before ``end``) and the sizes of the unpadded tokens."""
        def compute():
            end = self.q_start + self.q_length
            slots_ok = self._slots_ok()
            values = [end, True if slots_ok is None else slots_ok]
            if self.padding is not None:
                t = self._tokens()
                nk, nq = t["key_real"].sum(1), t["query_real"].sum(1)
                values += [(nk == end).all(), nk.sum(), nq.sum(), nk.max(), nq.max(), t["pad_sees"].sum(),
                           t["run_start"].sum(), t["run_keys"].sum(), t["run_length"].max(), t["run_keys"].max()]
            read = self._read(*values)
            host = {"end": read[0], "ok": bool(read[1]) and read[0] <= self.kv_length}
            if self.padding is not None:
                names = ("all_real", "total_k", "total_q", "max_k", "max_q", "pad_queries", "runs", "run_keys",
                         "max_run", "max_run_keys")
                host.update(zip(names, read[2:]))
            return host
        return self._once("host", compute)

    def _tokens(self) -> dict:
        """Device masks over the batch's tokens (``(B, Tk)`` keys, ``(B, Tq)`` queries):

        * ``key_real``: real slots before ``q_start + Tq`` (the only keys anyone sees);
        * ``query_real``: real queries; ``seen``: how many real keys each query sees;
        * ``pad_sees``: padding queries that see some key (right padding: SDPA gives them the
          attention over the real keys before them, and ``generate`` reads the last one), in runs
          of consecutive ones (``run_start``), which all see the same keys (``run_keys`` of them,
          at the run's first query; ``run_length`` per run, indexed by run).
        """
        def compute():
            device, batch = self.padding.device, self.batch
            slot = torch.arange(self.kv_length, device=device)
            key_real = self.padding & (slot < self.q_start + self.q_length)
            query_slot = (self.q_start + torch.arange(self.q_length, device=device)).clamp(max=self.kv_length - 1)
            query_real = key_real[:, query_slot]
            seen = key_real.cumsum(1)[:, query_slot]
            pad_sees = ~query_real & (seen > 0)
            run_start = pad_sees.clone()
            run_start[:, 1:] &= ~pad_sees[:, :-1]
            run = run_start.flatten().cumsum(0) - 1
            dump = batch * self.q_length  # tokens outside every run count here
            run_length = torch.zeros(dump + 1, dtype=torch.int64, device=device)
            run_length.scatter_add_(0, torch.where(pad_sees.flatten(), run, dump), torch.ones_like(run))
            return dict(key_real=key_real, query_real=query_real, seen=seen, pad_sees=pad_sees,
                        run_start=run_start, run_keys=seen * run_start, run_length=run_length[:dump])
        return self._once("tokens", compute)

    def unpadded(self) -> list:
        """The varlen passes that give every query its attention (no further sync): each is
        ``(b_q, t_q, b_k, t_k, cu_q, cu_k, max_q, max_k, causal)``, with ``(b_q, t_q)`` the batch
        rows and positions of its queries, ``(b_k, t_k)`` of its keys.

        1. Causal, pair ``b`` = row ``b``: its real queries over its real keys.
        2. Only if some padding query sees a key: non-causal, one pair per run of such queries,
           over the real keys before the run (gathered again for each run).
        """
        def compute():
            host, t = self.host(), self._tokens()
            width = self.q_length

            def where(real, total):
                index = torch.nonzero_static(real.flatten(), size=total).squeeze(1)
                return index // real.shape[1], index % real.shape[1]

            def offsets(lengths):
                return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

            b_k, t_k = where(t["key_real"], host["total_k"])
            cu_k = offsets(t["key_real"].sum(1))
            passes = [(*where(t["query_real"], host["total_q"]), b_k, t_k, offsets(t["query_real"].sum(1)),
                       cu_k, host["max_q"], host["max_k"], True)]
            if host["pad_queries"]:
                runs = host["runs"]
                first = torch.nonzero_static(t["run_start"].flatten(), size=runs).squeeze(1)
                run_keys = t["seen"].flatten()[first]
                cu_run_k = offsets(run_keys)
                # key j of the gathered run keys: run r's key number j - cu_run_k[r], in r's row
                j = torch.arange(host["run_keys"], device=first.device)
                run = torch.searchsorted(cu_run_k[1:].to(torch.int64), j, right=True)
                real_key = cu_k[first[run] // width].to(torch.int64) + j - cu_run_k[run]
                passes.append((*where(t["pad_sees"], host["pad_queries"]), b_k[real_key], t_k[real_key],
                               offsets(t["run_length"][:runs]), cu_run_k, host["max_run"], host["max_run_keys"],
                               False))
            return passes
        return self._once("unpadded", compute)

    def packing(self):
        """Varlen arguments of transformers' packed sequence ids (one host sync per forward)."""
        def compute():
            cu, longest, _ = _packing_from_segments(self.segments)
            return cu, cu, longest, longest
        return self._once("packing", compute)


def kernel_mask(*, batch_size: int, kv_length: int, kv_offset: int = 0, mask_function=causal_mask_function,
                attention_mask: Optional[torch.Tensor] = None, q_length: Optional[int] = None, q_offset=0,
                cache_position: Optional[torch.Tensor] = None, local_size: Optional[int] = None,
                allow_is_causal_skip: bool = True, **kwargs):
    """transformers' mask interface (``AttentionMaskInterface``): ``None``, or what stands for a
    :class:`MaskPlan` (a marker tensor; under torch.compile the plan itself), see the module docstring.

    Takes the arguments of ``masking_utils.sdpa_mask`` of either transformers 5.x API: the queries
    as ``q_length``/``q_offset`` (5.1+) or as ``cache_position`` (5.0).  ``kv_offset`` is the
    position of the first key slot (a full sliding-window cache layer keeps only its last keys):
    the plan works in slots, so the queries sit at ``q_offset - kv_offset`` and the padding mask is
    read from column ``kv_offset`` on.
    """
    sdpa_args = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if cache_position is not None:  # transformers 5.0: the queries' slots
        q_length = cache_position.shape[0]
        slots = cache_position - kv_offset
        q_start, q_slots = slots[0], (slots if q_length > 1 else None)
        sdpa_args["cache_position"] = cache_position
        device = cache_position.device
    else:
        # A static cache hands over its own length tensor, which its update then changes in place.
        q_offset = q_offset.clone() if isinstance(q_offset, torch.Tensor) else q_offset
        q_start, q_slots = q_offset - kv_offset, None
        sdpa_args.update(q_length=q_length, q_offset=q_offset)
        device = kwargs.get("device", "cpu") if attention_mask is None else attention_mask.device

    def fallback():  # a mask only transformers' own attention applies, exactly
        plan = MaskPlan(sdpa_args, batch_size, q_length, kv_length, device, sdpa_only=True)
        return _carrier(plan, None, kv_offset + kv_length)

    if torch.compiler.is_compiling():
        # Dynamo cannot read a closure's cells, nor may anything be read back from the device: the
        # kernels take plain causal masks without padding, every other layer runs transformers'.
        if mask_function is not causal_mask_function or attention_mask is not None:
            return fallback()
        pattern = (None, None)
    else:
        pattern = _mask_pattern(mask_function)
    if pattern is None:
        return fallback()  # another mask pattern
    window, segments = pattern
    if segments is not None and (attention_mask is not None or kv_length != q_length or _traced(segments)):
        return fallback()
    if local_size is not None and local_size != window:
        return fallback()
    if not isinstance(q_start, torch.Tensor) and q_start + q_length > kv_length:
        return fallback()  # queries past the keys: not a layout the kernels assume
    if window is not None and window >= kv_length:
        window = None  # every key slot is within the window of every query
    if (segments is None and window is None and attention_mask is None and allow_is_causal_skip
            and q_length in (1, kv_length)):
        # SDPA would get no mask either (is_causal for Tq > 1): the plain kernel gives that.
        return None
    by_position = padding = None
    if attention_mask is not None:
        by_position = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, :kv_offset + kv_length]
        padding = by_position[:, kv_offset:]  # by slot
    plan = MaskPlan(sdpa_args, batch_size, q_length, kv_length, device, q_start=q_start, q_slots=q_slots,
                    padding=padding, segments=segments, window=window)
    return _carrier(plan, by_position, kv_offset + kv_length)


def _carrier(plan: MaskPlan, padding: Optional[torch.Tensor], width: int):
    """What the layers get as their mask for ``plan``.  Under torch.compile, the plan itself
    (Dynamo traces the object; it never leaves the compiled forward).  Otherwise a new 2-D tensor,
    its padding mask over the key positions ``0 .. width - 1`` (``kv_offset + Tk``; all true
    without padding), so that it means the same if transformers passes it back in as a 2-D
    ``attention_mask`` (which it reads by position); the plan is found in a weak table."""
    if torch.compiler.is_compiling():
        return plan
    if padding is None:
        padding = torch.ones((plan.batch, width), dtype=torch.bool, device=plan.device)
    marker = padding[:, :width]  # always a new object, so that the plan is this call's alone
    # Contiguous, so that `generate`'s `.contiguous()` (static caches) hands the layers this very
    # object, whose plan the attention function then finds.
    marker = marker if marker.is_contiguous() else marker.contiguous()
    _PLANS[marker] = plan
    return marker


def _plan_of(mask: torch.Tensor, q_length: int, kv_length: int) -> MaskPlan:
    """The plan behind a 2-D mask: the mask function's, or (for a 2-D padding mask that did not come
    through it) FlashAttention-2's reading: its ``S`` columns are the first ``S`` key slots and the
    queries are the last ``Tq`` of them."""
    def make():
        padding = prepare_padding_mask(mask.to(torch.bool), kv_length, 0)[:, :kv_length]
        q_start = mask.shape[1] - q_length
        sdpa_args = dict(batch_size=mask.shape[0], q_length=q_length, q_offset=q_start, kv_length=kv_length,
                         attention_mask=padding, allow_is_causal_skip=False, device=mask.device,
                         cache_position=torch.arange(q_length, device=mask.device) + q_start)
        # Under torch.compile the values cannot be read back: transformers' attention applies it.
        sdpa_only = _traced(mask) or not 0 <= q_start <= kv_length - q_length
        return MaskPlan(sdpa_args, mask.shape[0], q_length, kv_length, mask.device, q_start=q_start,
                        padding=padding, sdpa_only=sdpa_only)
    if torch.compiler.is_compiling():
        return make()
    plan = _PLANS.get(mask)
    return plan if plan is not None else _memoised(mask, ("plan", q_length, kv_length), make)


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------
def kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: ``query (B, Hq, Tq, D)``, ``key, value (B, Hk, Tk, D)``
    -> ``(output (B, Tq, Hq, D), None)``.  The kernels where they give the answer (module docstring),
    else the model's own (unpatched) attention with the mask it would have had (:func:`_fallback`).

    A sliding window comes with the mask (the plan's ``window``: what SDPA and eager attention
    apply), soft-capping (Gemma 2) as the ``softcap`` keyword; both go to every kernel path."""
    plan = None
    if isinstance(attention_mask, MaskPlan):
        plan = attention_mask
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        plan = _plan_of(attention_mask, query.shape[2], key.shape[2])
    implementation = _unpatched_implementation(module, kwargs)
    if not _kernel_runs(module, attention_mask, plan, dropout, implementation, kwargs, key.shape[2]):
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)

    batch, _, q_length, _ = query.shape
    kv_length = key.shape[2]
    options = dict(sm_scale=scaling, window=None if plan is None else plan.window, softcap=kwargs.get("softcap"))
    flash_rules = implementation.startswith("flash_attention")
    if plan is None or plan.segments is not None:
        packing = None
        if flash_rules and q_length == kv_length:
            # transformers' FlashAttention functions find packed batches themselves (their rule,
            # not the mask's); SDPA and eager attention see them only in the mask (segments).
            if not _can_sync(query):
                return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
            packing = _flash_attention_packing(kwargs, batch)
        elif plan is not None:
            packing = plan.packing()
        if packing is not None:
            return _packed_attention(query, key, value, *packing, **options), None
        return flash_attention(query, key, value, causal=True, **options).transpose(1, 2), None

    # Eager attention gives a query that sees no key the average of all value slots (the kernels:
    # zeros, as SDPA); the count is read with the plan's other host values.
    plan.fill_empty = implementation == "eager"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if use_decode(q_length, query.shape[1] // key.shape[1], needs_grad):
        seqlens, leftpad, row_ok = plan.decode_inputs()
        if row_ok is None or plan.decode_ok():
            out = flash_decode(query, key, value, seqlens, cache_leftpad=leftpad, **options)
            out = plan.decode_output(out).transpose(1, 2)
            return _with_empty_queries(module, plan, out, query, key, value, scaling, kwargs), None
        # A hole in some row's keys: unpadding below expresses any mask.

    if not (_can_sync(query) or plan.host_known()):
        # A static cache's prefill under CUDA-graph capture; padding of meta or fake tensors.
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
    host = plan.host()
    if not host["ok"]:
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
    if plan.padding is None or host["all_real"]:
        end = host["end"]
        out = flash_attention(query, key[:, :, :end], value[:, :, :end], causal=True, **options)
        return out.transpose(1, 2), None
    if plan.window is not None and not plan.decode_ok():
        # Unpadding keeps the window only where each row's real keys are contiguous slots (left
        # padding): then a key's distance in the unpadded sequence is its distance in slots.
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
    out = _unpadded_attention(plan, query, key, value, **options)
    return _with_empty_queries(module, plan, out, query, key, value, scaling, kwargs), None


def _unpatched_implementation(module, kwargs) -> str:
    """The attention implementation the model had before it was patched (transformers' name),
    which decides corner cases and computes wherever the kernels step aside.  Soft-capped scores
    under SDPA (which cannot soft-cap: transformers 5.0 skips it, later releases refuse) use the
    model's eager attention, the model's math."""
    implementation = getattr(module, "_lk_unpatched_attention", None) or "sdpa"
    if implementation == "sdpa" and kwargs.get("softcap") is not None:
        return "eager"
    return implementation


def _eager_attention(module):
    """The ``eager_attention_forward`` of ``module``'s modeling module (or of a base class's)."""
    return next(vars(sys.modules[cls.__module__])["eager_attention_forward"] for cls in type(module).__mro__
                if "eager_attention_forward" in vars(sys.modules[cls.__module__]))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive one (``finfo(dtype).min`` where hidden)."""
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) if mask.dtype == torch.bool else mask


def _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs):
    """The model's unpatched attention (SDPA, eager, ...) with the mask it would have had."""
    implementation = _unpatched_implementation(module, kwargs)
    dtype = query.dtype if plan is None else plan.sdpa_args.get("dtype", query.dtype)
    if plan is not None:
        mask = plan.fallback_mask(implementation, dtype)
    elif attention_mask is None and implementation == "eager":  # eager never skips the causal mask
        q_length, kv_length = query.shape[2], key.shape[2]
        mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
        mask = _additive(mask, dtype)[None, None]
    elif implementation == "eager" and attention_mask.ndim == 4:
        mask = _additive(attention_mask, dtype)
    else:
        mask = attention_mask
    if implementation == "eager":
        function = _eager_attention(module)
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = sdpa_attention_forward if implementation == "sdpa" else ALL_ATTENTION_FUNCTIONS[implementation]
    return function(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _with_empty_queries(module, plan: MaskPlan, out, query, key, value, scaling, kwargs):
    """``out (B, Tq, Hq, D)`` with the queries that see no key given eager attention's answer
    (the model's own function over all key slots with an all-``finfo.min`` mask) if the model's
    unpatched attention is eager; nothing to do (and nothing read) otherwise."""
    if plan.padding is None or not plan.fill_empty:
        return out
    dtype = plan.sdpa_args.get("dtype", query.dtype)
    eager = _eager_attention(module)
    if not _can_sync(query):  # (CUDA-graph capture) every query's eager answer, kept where empty
        hidden = torch.full((1, 1, *query.shape[2:3], key.shape[2]), torch.finfo(dtype).min, dtype=dtype,
                            device=query.device)
        filled, _ = eager(module, query, key, value, hidden, dropout=0.0, scaling=scaling, **kwargs)
        return torch.where(plan.empty_queries()[..., None, None], filled.to(out.dtype), out)
    if not plan.has_empty_queries():
        return out
    rows, positions = plan.empty_queries().nonzero(as_tuple=True)
    for b in rows.unique().tolist():  # at most one eager call per batch row that has some
        t = positions[rows == b]
        hidden = torch.full((1, 1, t.numel(), key.shape[2]), torch.finfo(dtype).min, dtype=dtype,
                            device=query.device)
        filled, _ = eager(module, query[b:b + 1, :, t], key[b:b + 1], value[b:b + 1], hidden, dropout=0.0,
                          scaling=scaling, **kwargs)
        out = out.index_put((torch.full_like(t, b), t), filled[0].to(out.dtype))
    return out


def _attentions_requested(module, kwargs) -> bool:
    """Whether this forward returns attention weights (``output_attentions``: a call argument,
    transformers' output collector of 5.x after 5.0, or the model's config)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers 5.0 passes the argument down
        collected = None
    else:
        collected = _active_collector.get()
    if collected is not None:
        return "attentions" in collected
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _kernel_runs(module, attention_mask, plan, dropout, implementation, kwargs, kv_length) -> bool:
    """Whether the kernels can give this call's answer (else the unpatched attention runs, exactly)."""
    if "attention" not in getattr(module, "_lk_kernels", ()) or dropout > 0:
        return False
    if plan is not None and plan.kv_length != kv_length:
        # More keys than the mask describes: a sliding-window cache of window 1 keeps every token
        # (it keeps the last `window - 1`, sliced as `[-0:]`) while the mask covers one slot, which
        # SDPA then broadcasts over all of them.  transformers' own answer, whatever it is.
        return False
    if implementation == "eager" and _attentions_requested(module, kwargs):
        return False  # eager attention returns its weights (SDPA and FlashAttention return None)
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal", True) is False:
        return False
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return False
    if attention_mask is None:
        return True
    return plan is not None and not plan.sdpa_only  # a 4-D mask, or an SDPA-only plan: no


def _flatten_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(1, H, B * T, D)``, the rows of the batch one after the other."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(1, batch * length, heads, dim).transpose(1, 2)


def _packed_attention(query, key, value, cu_q, cu_k, max_q, max_k, **options):
    """Packed sequences of the flattened batch: sequence ``i`` is tokens ``cu[i]:cu[i+1]``."""
    batch, heads, length, dim = query.shape
    q, k, v = _flatten_batch(query), _flatten_batch(key), _flatten_batch(value)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                          max_seqlen_k=max_k, **options)
    return out.transpose(1, 2).reshape(batch, length, heads, dim)


def _unpadded_attention(plan: MaskPlan, query, key, value, **options):
    """Gather the queries and keys of each varlen pass of ``plan.unpadded()``, attend with the
    varlen kernel, scatter the outputs back (zeros at padding queries that see no key)."""
    batch, heads, length, dim = query.shape
    out = None
    for b_q, t_q, b_k, t_k, cu_q, cu_k, max_q, max_k, causal in plan.unpadded():
        q, k, v = query[b_q, :, t_q], key[b_k, :, t_k], value[b_k, :, t_k]  # (tokens, H, D)
        rows = flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                               max_seqlen_k=max_k, **options)[0].transpose(0, 1)
        out = (rows.new_zeros(batch, length, heads, dim) if out is None else out).index_put((b_q, t_q), rows)
    return out
