"""The attention function registered with transformers (``AttentionInterface``) and its fallback.

transformers (5.x) lets a model name its attention implementation; ``apply_kernels`` registers a
pair under ``"llama_kernels"`` (:func:`register`):

* :func:`~.mask_plan.kernel_mask` (``AttentionMaskInterface``, :mod:`.mask_plan`) runs once per
  model forward, where ``create_causal_mask`` (or, for a sliding-window layer,
  ``create_sliding_window_causal_mask``) would build SDPA's ``(B, 1, Tq, Tk)`` boolean mask.  It
  builds a :class:`~.mask_plan.MaskPlan` instead: what the mask means, in terms the kernels take
  (what it hands the layers: that module's docstring).
* :func:`kernel_attention` (``AttentionInterface``) runs in every layer with that forward's mask
  and picks a kernel, or, when the kernels cannot give the answer, the attention implementation
  the model had before it was patched (``"sdpa"``, ``"eager"``, ...; kept on each attention module
  as ``_lk_unpatched_attention``), with the mask that implementation would have had; for
  soft-capped scores, which SDPA cannot compute, the model's own eager attention.

**The semantics, whichever path runs.**  Keys sit in slots ``j = 0 .. Tk-1`` of the layer's key
tensor (the current tokens, or a dynamic/static KV cache; a full sliding-window cache layer holds
only its last keys, slot 0 being position ``kv_offset``); query ``i`` of ``Tq`` sits in slot
``p_i = q_start + i`` (its position minus ``kv_offset``).  With a 2-D padding mask ``m (B, S)``
(``m[b, j]`` true where slot ``j`` holds a real token; slots ``j >= S`` are padding), query ``i``
of row ``b`` attends to key ``j`` iff

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

import sys

import torch

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...ops.attention import flash_attention, flash_decode, use_decode
from . import host_values
from .mask_plan import MaskPlan, additive_mask, plan_of
from .masks import Packing, flash_attention_packing

HF_ATTENTION = "llama_kernels"  # the name the attention/mask pair is registered under

# kwargs of the attention interface that change the math beyond what the kernels do (a layer's
# `sliding_window` is read from its mask, which is what SDPA and eager attention apply; `softcap`
# goes to the kernels)
_UNSUPPORTED_KWARGS = ("s_aux", "position_bias")


def register() -> None:
    """Register :func:`kernel_attention` and :func:`~.mask_plan.kernel_mask` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .mask_plan import kernel_mask

    AttentionInterface.register(HF_ATTENTION, kernel_attention)
    AttentionMaskInterface.register(HF_ATTENTION, kernel_mask)


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
        plan = plan_of(attention_mask, query.shape[2], key.shape[2])
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
            if not host_values.can_read(query):
                return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
            packing = flash_attention_packing(kwargs, batch)
        elif plan is not None:
            packing = plan.packing()
        if packing is not None:
            return _packed_attention(query, key, value, packing, **options), None
        return flash_attention(query, key, value, causal=True, **options).transpose(1, 2), None

    # Eager attention gives a query that sees no key the average of all value slots (the kernels:
    # zeros, as SDPA); the count is read with the plan's other host values.
    plan.fill_empty = implementation == "eager"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if use_decode(q_length, query.shape[1] // key.shape[1], needs_grad):
        decode = plan.decode_inputs()
        if decode.row_ok is None or plan.decode_ok():
            out = flash_decode(query, key, value, decode.seqlens, cache_leftpad=decode.leftpad, **options)
            out = plan.decode_output(out).transpose(1, 2)
            return _with_empty_queries(module, plan, out, query, key, value, scaling, kwargs), None
        # A hole in some row's keys: unpadding below expresses any mask.

    if not (host_values.can_read(query) or plan.prefill_sizes_known()):
        # A static cache's prefill under CUDA-graph capture; padding of meta or fake tensors.
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
    sizes = plan.prefill_sizes()
    if not sizes.ok:
        return _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs)
    if sizes.padded is None or sizes.padded.all_real:
        end = sizes.end
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


def _fallback(module, query, key, value, attention_mask, plan, scaling, dropout, kwargs):
    """The model's unpatched attention (SDPA, eager, ...) with the mask it would have had."""
    implementation = _unpatched_implementation(module, kwargs)
    dtype = query.dtype if plan is None else plan.sdpa_args.get("dtype", query.dtype)
    if plan is not None:
        mask = plan.fallback_mask(implementation, dtype)
    elif attention_mask is None and implementation == "eager":  # eager never skips the causal mask
        q_length, kv_length = query.shape[2], key.shape[2]
        mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
        mask = additive_mask(mask, dtype)[None, None]
    elif implementation == "eager" and attention_mask.ndim == 4:
        mask = additive_mask(attention_mask, dtype)
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
    if not host_values.can_read(query):  # (CUDA-graph capture) every query's eager answer, kept where empty
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


def _packed_attention(query, key, value, packing: Packing, **options):
    """Packed sequences of the flattened batch: sequence ``i`` is tokens ``cu[i]:cu[i+1]``."""
    batch, heads, length, dim = query.shape
    q, k, v = _flatten_batch(query), _flatten_batch(key), _flatten_batch(value)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k,
                          max_seqlen_q=packing.max_seqlen_q, max_seqlen_k=packing.max_seqlen_k, **options)
    return out.transpose(1, 2).reshape(batch, length, heads, dim)


def _unpadded_attention(plan: MaskPlan, query, key, value, **options):
    """Gather the queries and keys of each varlen pass of ``plan.unpadded()``, attend with the
    varlen kernel, scatter the outputs back (zeros at padding queries that see no key)."""
    batch, heads, length, dim = query.shape
    out = None
    for launch in plan.unpadded():
        queries = (launch.query_rows, launch.query_positions)
        q = query[launch.query_rows, :, launch.query_positions]  # (tokens, H, D)
        k = key[launch.key_rows, :, launch.key_positions]
        v = value[launch.key_rows, :, launch.key_positions]
        rows = flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               causal=launch.causal, cu_seqlens_q=launch.cu_seqlens_q,
                               cu_seqlens_k=launch.cu_seqlens_k, max_seqlen_q=launch.max_seqlen_q,
                               max_seqlen_k=launch.max_seqlen_k, **options)[0].transpose(0, 1)
        out = (rows.new_zeros(batch, length, heads, dim) if out is None else out).index_put(queries, rows)
    return out
