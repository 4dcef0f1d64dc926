"""Attention: causal prefill (``flash_attention``), one token's decode over a KV cache (``decode``)
and packed sequences of uneven lengths (``varlen_attention``), against SDPA's backends, flash-attn,
padded batches and a per-sequence loop.

Inputs: the registry's samples of the same names.  q ``(1, Hq, N, D)``, k, v ``(1, Hk, N, D)`` in
the layouts of transposed views of ``(1, N, H, D)`` projections, as in the model, ``causal=True``;
decode: one query over a KV cache of N positions laid out as the cache is; varlen: a packed batch
(``registry.varlen_lengths``) with ``cu_seqlens_q`` (int32, on the device) and the longest length
as an int (no host sync in ours).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llama_kernels import reference
from llama_kernels.ops.registry import SAMPLES, varlen_lengths

from ..common import Missing
from .harness import OpSpec, by_mode, element_size, head_dims


# ---------------------------------------------------------------------------------------------
# Work per call
# ---------------------------------------------------------------------------------------------
def _varlen_case_dims(case):
    lengths = varlen_lengths(case.tokens)
    return {"sequences": len(lengths), "max_len": max(lengths), "padded_tokens": len(lengths) * max(lengths),
            "lengths": lengths}


def _work_attention(case, mode):
    n, d = case.tokens, case.dims["d"]
    fwd = 4 * case.dims["hq"] * n * n * d / 2  # QK^T and PV, 2 FLOP per multiply-add, causal half
    return by_mode(mode, fwd, 2.5 * fwd), "FLOP"


def _work_varlen(case, mode):
    # Only the real work: each sequence's own causal attention, none of a padded batch's waste.
    d = case.dims["d"]
    fwd = sum(4 * case.dims["hq"] * n * n * d / 2 for n in varlen_lengths(case.tokens))
    return by_mode(mode, fwd, 2.5 * fwd), "FLOP"


def _work_decode(case, mode):
    hq, hk, d, s = case.dims["hq"], case.dims["hk"], case.dims["d"], element_size(case)
    return (2 * hq * d + 2 * hk * case.tokens * d) * s, "B"


# ---------------------------------------------------------------------------------------------
# Providers beyond ours / eager / torch.compile.  Each is called as the sample says, (q, k, v,
# causal=True[, cu_seqlens_q=..., max_seqlen_q=..., max_seqlen_k=...]); SDPA's and flash-attn's
# causal masks are their own (the `causal` each was made with): see _attention_extras.
# ---------------------------------------------------------------------------------------------
class Sdpa:
    """``F.scaled_dot_product_attention`` pinned to one backend with ``sdpa_kernel``.

    Grouped-query heads: ``enable_gqa=True`` when the backend accepts it; otherwise K/V are expanded
    to the query heads (``repeat_interleave``) inside the timed call, since a caller of that backend
    has to pay for it.  Which of the two ran is the provider's note.
    """

    def __init__(self, backend: str, causal: bool, what: str | None = None):
        self.backend_name, self.causal, self.what = backend, causal, what
        self.expand = None  # decided by the first call
        self.note = what  # completed by the first call with how GQA ran

    def _call(self, q, k, v, expand):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if expand and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with sdpa_kernel(getattr(SDPBackend, self.backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=not expand)

    def __call__(self, q, k, v, **options):  # options: the sample's causal=True, which self.causal replaces
        if self.expand is not None:
            return self._call(q, k, v, self.expand)
        try:
            out, self.expand = self._call(q, k, v, False), False
            self.note = "; ".join(filter(None, (self.what, "enable_gqa=True")))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as gqa_error:
            try:
                out = self._call(q, k, v, True)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                raise Missing(f"SDPA {self.backend_name} backend refuses these inputs: "
                              f"{str(exc).strip().splitlines()[0][:200]}") from None
            self.expand = True
            self.note = "; ".join(filter(None, (
                self.what, "K/V expanded to the query heads inside the timed call (enable_gqa refused: "
                           f"{str(gqa_error).strip().splitlines()[0][:120]})")))
        return out


def _flash_attn(causal: bool):
    def factory():
        try:
            from flash_attn import flash_attn_func
        except Exception as exc:
            raise Missing(f"flash_attn not importable ({type(exc).__name__}: {exc})") from None

        def run(q, k, v, **options):  # flash-attn takes (B, T, H, D): our views transposed back, no copy
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)

        run.note = "flash_attn_func, native GQA"
        return run

    return factory


def _ours_with_options():
    """``(flash_attention, kernel_options)`` of ``llama_kernels`` (the sample's kernel, looked up
    now); Missing when either is not importable."""
    try:
        import llama_kernels as lk

        return SAMPLES["flash_attention"].kernel(), lk.kernel_options  # the switch ours-portable-fwd sets
    except Exception as exc:
        raise Missing(f"llama_kernels.kernel_options not importable: {type(exc).__name__}: {exc}") from None


def _ours_portable_fwd():
    """Ours with the ``tma_forward=False`` kernel option during each call: the portable forward
    kernel where ours would take the Hopper TMA one.  The backward does not read the option, so
    it is ours'."""
    kernel, options = _ours_with_options()

    def run(*args, **kwargs):
        with options(tma_forward=False):
            return kernel(*args, **kwargs)

    run.note = "kernel_options(tma_forward=False): the portable forward kernel; backward as ours"
    return run


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside, the previous setting (and its
    ``warn_only``) restored after.  ``torch.utils.deterministic.fill_uninitialized_memory`` is off
    inside (restored too), so that the timings hold the deterministic kernels and not the NaN
    filling of every ``torch.empty`` that deterministic mode adds by default."""
    import torch.utils.deterministic as det

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = getattr(det, "fill_uninitialized_memory", None)
    torch.use_deterministic_algorithms(True)
    if fill is not None:
        det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if fill is not None:
            det.fill_uninitialized_memory = fill


def _ours_deterministic():
    """Ours with deterministic algorithms on for each checked or timed step, its backward included
    (the ``context`` attribute, honoured by :func:`_steps_in`): the two-kernel backward schedule
    instead of the fused one with float32 atomic dQ."""
    kernel, _ = _ours_with_options()

    def run(*args, **kwargs):  # a function of ours to carry the attributes, not the package's
        return kernel(*args, **kwargs)

    run.context = deterministic_algorithms
    run.note = ("torch.use_deterministic_algorithms(True) around each step, backward included: "
                "the deterministic backward (separate dQ and dK/dV kernels)")
    return run


def _attention_extras(causal: bool) -> dict:
    # Decode (one query over the whole cache) is non-causal for SDPA, whose causal mask is aligned
    # top-left; ours and eager align bottom-right, which for Tq = 1 is the same thing.
    return {
        "sdpa-flash": lambda: Sdpa("FLASH_ATTENTION", causal),
        "sdpa-cudnn": lambda: Sdpa("CUDNN_ATTENTION", causal),
        "flash-attn": _flash_attn(causal),
    }


# Packed (varlen) attention.  Providers that want another layout (a padded batch, a list of
# slices) carry a ``layout`` attribute: ``layout(*packed_args, **packed_kwargs) -> (their args,
# their kwargs, restore)``, where ``restore`` maps their output back to the packed layout.  The
# check runs layout -> call -> restore under autograd, so outputs and input gradients are compared
# in the packed layout with the same cotangents; the timed calls get inputs converted beforehand
# (:func:`_in_own_layout`), so a conversion is never timed: a padded batch is what its user
# already has.
def _bounds(cu) -> list:
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:], strict=True))


def _pad(x, bounds, width):
    """Packed ``x (1, H, total, D)`` -> right-padded ``(B, H, width, D)``, a transposed view of a
    ``(B, width, H, D)`` buffer (the model's layout); differentiable."""
    rows = x[0].transpose(0, 1)  # (total, H, D)
    return torch.stack([F.pad(rows[a:b], (0, 0, 0, 0, 0, width - (b - a))) for a, b in bounds]).transpose(1, 2)


def _unpad(out, bounds):
    """Right-padded ``(B, H, width, D)`` -> packed ``(1, H, total, D)``: the real rows, in order."""
    return torch.cat([out[i, :, : b - a] for i, (a, b) in enumerate(bounds)], dim=1).unsqueeze(0)


def _padded_layout(masked: bool):
    def layout(q, k, v, *, cu_seqlens_q, **options):
        bounds = _bounds(cu_seqlens_q)
        width = max(b - a for a, b in bounds)
        args = tuple(_pad(t, bounds, width) for t in (q, k, v))
        if masked:  # as transformers builds it for a padded batch: causal, and no padding key
            lengths = torch.tensor([b - a for a, b in bounds], device=q.device)
            keys = torch.arange(width, device=q.device)
            mask = reference.causal_mask(width, width, q.device)[None] & (keys < lengths[:, None])[:, None, :]
            args += (mask[:, None],)  # (B, 1, width, width)
        return args, {}, lambda out: _unpad(out, bounds)

    return layout


def _sdpa_padded():
    """SDPA flash on a right-padded batch with ``is_causal=True`` and no mask: causal masking alone
    hides every padding key from the real queries, whose rows are all that is kept (the padding
    rows get zero cotangents in the check), so this is exact, and it pays only for the padding."""
    fn = Sdpa("FLASH_ATTENTION", causal=True, what="right-padded batch, SDPA flash, is_causal=True, no mask")
    fn.layout = _padded_layout(masked=False)
    return fn


def _sdpa_padded_mask():
    """SDPA on a right-padded batch with the boolean mask transformers builds for it (causal and key
    padding, ``(B, 1, L, L)``), K/V expanded to the query heads as transformers' ``repeat_kv`` does
    when there is a mask; SDPA picks the backend (flash takes no mask)."""

    def run(q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run.layout = _padded_layout(masked=True)
    run.note = ("right-padded batch, attn_mask (B, 1, L, L) causal & key padding, K/V expanded "
                "(transformers' sdpa path); SDPA chooses the backend")
    return run


class _SdpaLoop:
    """One SDPA flash call per sequence on slices of the packed tensors (no padding, no mask), a
    Python loop, the outputs concatenated (a copy a caller needs too)."""

    def __init__(self):
        self.inner = Sdpa("FLASH_ATTENTION", causal=True, what="one SDPA flash call per sequence, outputs "
                                                               "concatenated")

    def layout(self, q, k, v, *, cu_seqlens_q, **options):
        return (q, k, v, _bounds(cu_seqlens_q)), {}, (lambda out: out)

    def __call__(self, q, k, v, bounds):
        return torch.cat([self.inner(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds], dim=2)

    @property
    def note(self):
        return self.inner.note


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:
        raise Missing(f"flash_attn not importable ({type(exc).__name__}: {exc})") from None

    def run(q, k, v, *, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal=True):  # (total, H, D): no copy
        cu = cu_seqlens_q
        out = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                     cu, cu, max_seqlen_q, max_seqlen_k, causal=causal)
        return out.unsqueeze(0).transpose(1, 2)

    run.note = "flash_attn_varlen_func, native GQA"
    return run


def _varlen_eager():
    """The sample's eager twin (``reference.flash_attention`` with ``cu_seqlens_q``, which runs
    ``reference.varlen_attention``), with a note of what it does."""
    eager = SAMPLES["varlen_attention"].eager()

    def run(*args, **kwargs):
        return eager(*args, **kwargs)

    run.note = "reference.varlen_attention: eager attention per sequence (a Python loop, scores materialised)"
    return run



# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------
_SDPA_NOTES = {
    "sdpa-flash": "torch SDPA under sdpa_kernel(SDPBackend.FLASH_ATTENTION)",
    "sdpa-cudnn": "torch SDPA under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)",
    "flash-attn": "flash_attn.flash_attn_func (varlen_attention: flash_attn_varlen_func)",
}

FLASH_ATTENTION = OpSpec(
    "flash_attention", "flash_attention", _work_attention, head_dims, ("llama3-8b", "smollm2-135m"),
    {"ours-portable-fwd": _ours_portable_fwd, "ours-deterministic": _ours_deterministic,
     **_attention_extras(causal=True)},
    note="causal prefill, Tq = Tk = N, GQA: forward 4 Hq N^2 D / 2 FLOP (two matrix products, causal "
         "half); backward 2.5x that (FlashAttention's count); compared with the bf16 matmul rate.",
    provider_notes={
        "ours-portable-fwd": "flash_attention only: ours inside llama_kernels.kernel_options(tma_forward=False) "
                             "during each call (restored after), i.e. the portable forward kernel instead of "
                             "the Hopper TMA / warp-specialised one that ours takes on sm_90 in fp16/bf16; "
                             "the backward is ours'",
        "ours-deterministic": "flash_attention only: ours with torch.use_deterministic_algorithms(True) around "
                              "each checked or timed step, its backward included (the previous setting and "
                              "warn_only restored after; torch.utils.deterministic.fill_uninitialized_memory "
                              "off inside): the deterministic two-kernel backward instead of the fused one "
                              "with float32 atomic dQ; the forward is ours'",
        **_SDPA_NOTES,
    })

DECODE = OpSpec(
    "decode", "decode", _work_decode, head_dims, ("llama3-8b", "smollm2-135m"), _attention_extras(causal=False),
    modes=("forward",), sweep="decode",
    note="one query token over a KV cache of L positions (the tokens column), inference: "
         "(2 Hq D + 2 Hk L D)s bytes: read q, K, V; write o; compared with the copy bandwidth.",
    provider_notes=_SDPA_NOTES)

VARLEN_ATTENTION = OpSpec(
    "varlen_attention", "varlen_attention", _work_varlen, head_dims, ("llama3-8b", "smollm2-135m"),
    {"eager": _varlen_eager, "flash-attn": _flash_attn_varlen, "sdpa-padded": _sdpa_padded,
     "sdpa-padded-mask": _sdpa_padded_mask, "sdpa-loop": _SdpaLoop},
    modes=("forward", "forward+backward"), sweep="varlen", base=("ours",), case_dims=_varlen_case_dims,
    note="packed causal attention of uneven sequences (lengths drawn uniformly from [N/32, N/4], fixed "
         "seed, the last cut so that they total N, the tokens column; listed below the table), GQA. "
         "Work counts only the real work, each sequence's own causal attention: forward "
         "sum_i 4 Hq L_i^2 D / 2 FLOP, backward 2.5x that; padded providers are charged the same, so "
         "their rate shows the padding's waste. Padded providers get their batch built before the "
         "timing; every output and gradient is compared in the packed layout.",
    provider_notes={
        "flash-attn": _SDPA_NOTES["flash-attn"],
        "sdpa-padded": "varlen_attention only: the sequences right-padded to the longest into a (B, H, L, D) "
                       "batch (built before the timing), SDPA flash with is_causal=True and no mask (causal "
                       "masking hides the padding keys from every real query; padding rows are discarded): "
                       "the fastest padded baseline, paying only for the padding",
        "sdpa-padded-mask": "varlen_attention only: the same padded batch with the boolean (B, 1, L, L) causal "
                            "and key-padding mask transformers builds, K/V expanded to the query heads as "
                            "transformers does with a mask; SDPA chooses its backend",
        "sdpa-loop": "varlen_attention only: one SDPA flash call per sequence on slices of the packed tensors "
                     "(a Python loop, no padding), outputs concatenated",
    })
