"""The mask function registered with transformers (``AttentionMaskInterface``) and its :class:`MaskPlan`.

:func:`kernel_mask` runs once per model forward, where ``create_causal_mask`` (or, for a
sliding-window layer, ``create_sliding_window_causal_mask``) would build SDPA's ``(B, 1, Tq, Tk)``
boolean mask.  It builds a :class:`MaskPlan` instead: what the mask means, in terms the kernels
take (the semantics and the paths: :mod:`.attention`).  What it returns:

* ``None`` where transformers' SDPA mask would be ``None`` too (no padding, no packing, and
  ``Tq == 1`` or ``Tk == Tq``): plain causal attention, aligned bottom-right, over all ``Tk`` keys.
  (A model whose unpatched attention is FlashAttention may still find packed sequences there, by
  FlashAttention's own rule: :mod:`.attention`.)
* Otherwise a 2-D boolean *marker* tensor ``(B, kv_offset + Tk)``: the padding mask over the key
  positions (all true without padding), which is what the mask means, so it is still right if
  transformers feeds it back in as a 2-D ``attention_mask`` (``generate`` does so with static
  caches).  Its plan lives
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

The plan's results are small typed records (:class:`DecodeInputs`, :class:`PrefillSizes`,
:class:`VarlenPass`, :class:`~.masks.Packing`), computed on first use and kept: every layer of the
forward shares them.  NamedTuples, because under torch.compile Dynamo builds some of them inside
the traced forward (the decode inputs, the sizes of an unpadded prefill) and traces NamedTuples as
plain tuples.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

from . import host_values
from .masks import MaskPattern, Packing, mask_pattern, packing_from_segments


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive one (``finfo(dtype).min`` where hidden)."""
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) if mask.dtype == torch.bool else mask


class DecodeInputs(NamedTuple):
    """``flash_decode``'s view of the mask: row ``b`` holds keys ``[leftpad[b], seqlens[b])``."""

    seqlens: torch.Tensor  # (B,) int32: q_start + Tq, the cache_seqlens
    leftpad: Optional[torch.Tensor]  # (B,) int32: each row's first real slot (None: no padding)
    row_ok: Optional[torch.Tensor]  # (B,) bool: every slot of that range is real (None: nothing to check)


class PaddedSizes(NamedTuple):
    """The sizes of a padded batch's unpadded tokens (read on the host, with :class:`PrefillSizes`)."""

    all_real: bool  # no padding slot before q_start + Tq: the plain kernel on those keys
    total_keys: int  # real keys before q_start + Tq, all rows together
    total_queries: int  # real queries
    max_keys: int  # of one row
    max_queries: int
    padding_queries: int  # padding queries that see some key (right padding, holes)
    runs: int  # runs of consecutive such queries
    run_keys: int  # the keys the runs see, all runs together
    max_run: int  # queries of the longest run
    max_run_keys: int  # keys of the run that sees most


class PrefillSizes(NamedTuple):
    """The prefill path's host values, read in one synchronisation per forward."""

    ok: bool  # the queries sit in the slots the plan assumes, inside the keys
    end: int  # q_start + Tq: the keys any query sees are the slots before it
    padded: Optional[PaddedSizes]  # None without padding


class TokenMasks(NamedTuple):
    """Device masks over a padded batch's tokens (``(B, Tk)`` keys, ``(B, Tq)`` queries)."""

    key_real: torch.Tensor  # real slots before q_start + Tq (the only keys anyone sees)
    query_real: torch.Tensor  # real queries
    seen: torch.Tensor  # how many real keys each query sees
    # padding queries that see some key (right padding: SDPA gives them the attention over the real
    # keys before them, and `generate` reads the last one), in runs of consecutive ones (run_start),
    # which all see the same keys (run_keys of them, at the run's first query)
    pad_sees: torch.Tensor
    run_start: torch.Tensor
    run_keys: torch.Tensor
    run_length: torch.Tensor  # (B * Tq,) per run, indexed by run


class VarlenPass(NamedTuple):
    """One launch of the varlen kernel over gathered tokens: its queries are
    ``(query_rows, query_positions)`` of the batch, its keys ``(key_rows, key_positions)``."""

    query_rows: torch.Tensor
    query_positions: torch.Tensor
    key_rows: torch.Tensor
    key_positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool


class MaskPlan:
    """What one forward's mask means, and what the kernels need from it.

    ``sdpa_args`` are the mask function's arguments, to build SDPA's mask for a fallback;
    ``sdpa_only`` plans stand for a mask only SDPA can apply.  ``q_start`` (slot of query 0) is an
    int, or a 0-d device tensor (a static cache's length; the queries' ``cache_position[0]`` on
    transformers 5.0), copied when the mask is made because the cache updates its own in place.
    ``q_slots`` (5.0 only, ``Tq > 1``) are the queries' slots, which must count up by one from
    ``q_start``.  ``padding (B, Tk)`` marks real tokens (None: all real); ``segments (B, T)`` are
    packed sequence ids; ``window`` (None: none) is the sliding window of key slots each query sees
    (``p_i - window < j <= p_i``).  Device values are made on first use and kept, host values are
    read once: every layer of the forward shares them.
    """

    def __init__(self, sdpa_args: dict, batch: int, q_length: int, kv_length: int, device, *,
                 sdpa_only=False, q_start=0, q_slots=None, padding=None, segments=None, window=None):
        self.sdpa_args, self.sdpa_only, self.window = sdpa_args, sdpa_only, window
        self.batch, self.q_length, self.kv_length, self.device = batch, q_length, kv_length, device
        self.q_start, self.q_slots, self.padding, self.segments = q_start, q_slots, padding, segments
        # Whether query rows that see no key need their unpatched answer (:meth:`empty_queries`):
        # set by the attention function, before the plan's host values are read.
        self.fill_empty = False
        self._memo = {}  # what the methods computed, by name: shared by the forward's layers

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
                return additive_mask(sdpa_mask(**{**self.sdpa_args, "allow_is_causal_skip": False}), dtype)
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            return ALL_MASK_ATTENTION_FUNCTIONS[implementation](**{"dtype": dtype, **self.sdpa_args})
        return self._once(("mask", implementation, dtype), compute)

    def empty_queries(self) -> torch.Tensor:
        """Device bool ``(B, Tq)``: the queries that see no key (padding before a row's first real
        token, a row of padding only).  The kernels give them zeros, as SDPA does; eager attention
        gives them the average of every value slot (its mask adds ``finfo.min``, not ``-inf``)."""
        return self._once("empty", lambda: self._tokens().seen == 0)

    def has_empty_queries(self) -> bool:
        """Whether :meth:`empty_queries` has any (read with the plan's other host values, if the
        attention function set ``fill_empty``)."""
        if self.padding is None or not self.fill_empty:
            return False
        return self._once("has_empty", lambda: bool(host_values.read_ints(self.empty_queries().any())[0]))

    def _read_ints(self, *values) -> list:
        """``host_values.read_ints(*values)``, with :meth:`has_empty_queries`' flag read in the same
        host synchronisation where it is wanted and not known yet (so it never costs a read of its own)."""
        fold = self.padding is not None and self.fill_empty and "has_empty" not in self._memo
        read = host_values.read_ints(*values, *([self.empty_queries().any()] if fold else []))
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

    def decode_inputs(self) -> DecodeInputs:
        """:class:`DecodeInputs` for ``flash_decode``, on the device: row ``b`` holds keys
        ``[leftpad_b, L)`` with ``L = q_start + Tq`` and ``leftpad_b`` its first real slot."""
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
            return DecodeInputs(seqlens, leftpad, row_ok)
        return self._once("decode", compute)

    def decode_ok(self) -> bool:
        """Whether ``flash_decode`` expresses the mask in every row: one host read per forward,
        or, where nothing can be read back (CUDA-graph capture, torch.compile), True, with the
        rows it does not express poisoned (:meth:`decode_output`)."""
        def compute():
            row_ok = self.decode_inputs().row_ok
            if row_ok is None or not host_values.can_read(row_ok):
                return True
            return bool(self._read_ints(row_ok.all())[0])
        return self._once("decode_ok", compute)

    def decode_output(self, out: torch.Tensor) -> torch.Tensor:
        """``flash_decode``'s output, NaN in the rows whose mask it does not express if that could
        not be checked on the host (never a silent wrong answer)."""
        row_ok = self.decode_inputs().row_ok
        if row_ok is None or host_values.can_read(row_ok):
            return out  # checked (decode_ok), or nothing to check
        poison = self._once(("poison", out.dtype),
                            lambda: torch.where(row_ok, 1.0, math.nan).to(out.dtype).view(-1, 1, 1, 1))
        return out * poison

    def prefill_sizes_known(self) -> bool:
        """Whether :meth:`prefill_sizes` reads nothing back: no padding, the queries' slots known."""
        return self.padding is None and self.q_slots is None and not isinstance(self.q_start, torch.Tensor)

    def prefill_sizes(self) -> PrefillSizes:
        """The prefill path's :class:`PrefillSizes`, read in one host synchronisation per forward."""
        def compute():
            end = self.q_start + self.q_length
            slots_ok = self._slots_ok()
            values = [end, True if slots_ok is None else slots_ok]
            if self.padding is not None:
                t = self._tokens()
                nk, nq = t.key_real.sum(1), t.query_real.sum(1)
                values += [(nk == end).all(), nk.sum(), nq.sum(), nk.max(), nq.max(), t.pad_sees.sum(),
                           t.run_start.sum(), t.run_keys.sum(), t.run_length.max(), t.run_keys.max()]
            read = self._read_ints(*values)
            padded = None
            if self.padding is not None:
                all_real, *sizes = read[2:]
                padded = PaddedSizes(bool(all_real), *sizes)
            return PrefillSizes(bool(read[1]) and read[0] <= self.kv_length, read[0], padded)
        return self._once("prefill_sizes", compute)

    def _tokens(self) -> TokenMasks:
        """The :class:`TokenMasks` of the padded batch."""
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
            return TokenMasks(key_real=key_real, query_real=query_real, seen=seen, pad_sees=pad_sees,
                              run_start=run_start, run_keys=seen * run_start, run_length=run_length[:dump])
        return self._once("tokens", compute)

    def unpadded(self) -> list[VarlenPass]:
        """The :class:`VarlenPass` launches that give every query its attention (no further sync):

        1. Causal, pair ``b`` = row ``b``: its real queries over its real keys.
        2. Only if some padding query sees a key: non-causal, one pair per run of such queries,
           over the real keys before the run (gathered again for each run).
        """
        def compute():
            sizes, t = self.prefill_sizes().padded, self._tokens()
            width = self.q_length

            def where(real, total):
                index = torch.nonzero_static(real.flatten(), size=total).squeeze(1)
                return index // real.shape[1], index % real.shape[1]

            def offsets(lengths):
                return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

            b_k, t_k = where(t.key_real, sizes.total_keys)
            cu_k = offsets(t.key_real.sum(1))
            passes = [VarlenPass(*where(t.query_real, sizes.total_queries), b_k, t_k, offsets(t.query_real.sum(1)),
                                 cu_k, sizes.max_queries, sizes.max_keys, causal=True)]
            if sizes.padding_queries:
                runs = sizes.runs
                first = torch.nonzero_static(t.run_start.flatten(), size=runs).squeeze(1)
                run_keys = t.seen.flatten()[first]
                cu_run_k = offsets(run_keys)
                # key j of the gathered run keys: run r's key number j - cu_run_k[r], in r's row
                j = torch.arange(sizes.run_keys, device=first.device)
                run = torch.searchsorted(cu_run_k[1:].to(torch.int64), j, right=True)
                real_key = cu_k[first[run] // width].to(torch.int64) + j - cu_run_k[run]
                passes.append(VarlenPass(*where(t.pad_sees, sizes.padding_queries), b_k[real_key], t_k[real_key],
                                         offsets(t.run_length[:runs]), cu_run_k, sizes.max_run, sizes.max_run_keys,
                                         causal=False))
            return passes
        return self._once("unpadded", compute)

    def packing(self) -> Packing:
        """Varlen arguments of transformers' packed sequence ids (one host sync per forward)."""
        return self._once("packing", lambda: packing_from_segments(self.segments))


# ---------------------------------------------------------------------------------------------
# the mask function
# ---------------------------------------------------------------------------------------------
_PLANS = WeakIdKeyDictionary()  # marker tensor -> MaskPlan


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
        pattern = MaskPattern(None, None)
    else:
        pattern = mask_pattern(mask_function)
    if pattern is None:
        return fallback()  # another mask pattern
    window, segments = pattern
    if segments is not None and (attention_mask is not None or kv_length != q_length
                                 or host_values.traced(segments)):
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


def plan_of(mask: torch.Tensor, q_length: int, kv_length: int) -> MaskPlan:
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
        sdpa_only = host_values.traced(mask) or not 0 <= q_start <= kv_length - q_length
        return MaskPlan(sdpa_args, mask.shape[0], q_length, kv_length, mask.device, q_start=q_start,
                        padding=padding, sdpa_only=sdpa_only)
    if torch.compiler.is_compiling():
        return make()
    plan = _PLANS.get(mask)
    return plan if plan is not None else host_values.memoised(mask, ("plan", q_length, kv_length), make)
