"""Flash-decoding: split-KV attention for generation over a KV cache (forward only).

With few queries (one decode step, ``Tq = 1``, or a short chunk) and a long cache, the training
kernel would launch only ``B * Hq`` programs, each streaming the whole cache for a handful of rows.
Here the cache length is the parallel axis instead:

* ``attention_decode_split_kernel``: one program per (split, batch, KV head).  The rows of its
  query tile are all ``Tq`` tokens of all ``group = Hq / Hk`` query heads that share the KV head
  (row ``r`` is head ``r // Tq``, token ``r % Tq``), so every K/V tile is read from memory once
  for the whole group.  It runs the online softmax of the package docstring over its chunk of keys
  (``keys_per_split`` of them) and writes the chunk's normalised partial output ``o_s``, its
  softmax max ``m_s`` and its sum ``l_s`` (float32; ``l_s = 0`` if the chunk holds no visible
  key).
* ``attention_decode_combine_kernel``: merges the splits of each row::

      M = max_s m_s,   w_s = l_s 2^(m_s - M),   o = sum_s w_s o_s / sum_s w_s

  which is zero for a row that sees no key at all.  ``m_s`` and ``l_s`` stay apart rather than
  as one log-sum-exp, whose float32 rounding would cost ~``|lse| * 2^-24`` relative in every
  weight when logits are large.  (For float32 inputs the maxima are in raw score units and
  ``w_s = l_s 2^(c (m_s - M))``: see ``tiles.softmax_row_max``.)  With a single split the
  first kernel writes the output itself and the combine is skipped.

Causal masking is bottom-right as everywhere: token ``i`` of the chunk sees keys
``j <= i + Tk - Tq``, so the last token sees the whole cache.

``flash_decode`` serves a decode step captured in a CUDA graph, whose shapes must not change from
token to token: the keys are the whole preallocated cache buffer ``(B, Hk, Tmax, D)`` and
``cache_seqlens (B,)`` (int32, on the device) says how much of it each row holds.  Row ``b`` sees
keys ``[0, L_b)``, causal relative to that length (token ``i`` sees ``j <= i + L_b - Tq``).  The
splits still cover the whole buffer (their number depends on ``Tmax``, never on the lengths), so
a split that starts at or past ``L_b`` visits no key and leaves ``l_s = 0``: it adds nothing.

Sliding window (``WINDOW``, causal): token ``i`` also hides keys ``j <= i + L - Tq - window``, so
each program starts at the key tile of its first token's first visible key (``L - Tq - window + 1``
rounded down to a tile); a split wholly left of the window visits no key and adds nothing, like a
split past ``L``.  Softcap (``SOFTCAP``): raw scores are capped to ``cap tanh(s / cap)`` with
``cap = softcap / sm_scale`` before the softmax.

``cache_leftpad (B,)`` (left-padded batches) also hides each row's first ``cache_leftpad[b]``
slots: whole tiles of padding are skipped, the rest masked.  Packed sequences
(``attention_decode_varlen``, ``flash_attention``'s varlen arguments) take one program per
(split, sequence, KV head): the sequence's queries (at most ``max_seqlen_q``) are the tile's
rows, its keys start at ``cu_seqlens_k[i]``, and the splits cover ``max_seqlen_k``.

Precision as in the training kernels: float32 scores, statistics and accumulators, ``P`` rounded to the
input dtype before ``P @ V``, IEEE float32 dots for float32 inputs, and under the interpreter
float32 dots on operands rounded with ``cast_rne``.

The number of splits is a function of the shapes and the device's multiprocessor count only, and
nothing here reads data back to the host, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, cast_rne, compilable, count_launch
from ..device import NoFittingConfig, config_fits, device_limits, num_sms
from ..options import current as current_options
from .configs import tile_family
from .problem import AttentionProblem
from .tiles import (
    capped_scores,
    head_rows,
    key_value_tiles,
    online_softmax_step,
    score_dot,
    sequence_rows,
    softmax_rescale,
    visible_pairs,
)

# The rule ``flash_attention`` uses (see ``use_decode``): the query tile of one (batch, KV head)
# holds ``Tq * group`` rows; up to this many it is a decode-shaped problem.
DECODE_MAX_ROWS = 64
# The K/V stages worth keeping in flight (a speed choice: the H100 reads its cache at full
# bandwidth with this much); what fits is the device's question (``decode_configs``).
PIPELINE_BUDGET = 160 * 1024


def min_keys_per_split() -> int:
    """The fewest keys a split reads, so that the combine stays cheap next to the key reads: the
    ``decode_min_keys_per_split`` option, by default 256 on a GPU and 64 under the interpreter
    (whose tests then see several splits)."""
    chosen = current_options().decode_min_keys_per_split
    return chosen if chosen is not None else (64 if INTERPRET else 256)


def use_decode(seq_q: int, group: int, needs_grad: bool) -> bool:
    """True when ``flash_attention`` runs the split-KV decode kernels.

    Rule: no gradient is needed (the decode path is forward only; training keeps the autograd
    kernels) and the queries of one KV group fit one small tile: ``seq_q * group <= 64``
    (``DECODE_MAX_ROWS``), e.g. one decode step with up to 64 query heads per KV head, or a chunk
    of 8 tokens with group 8.  Any cache length qualifies: a short cache simply gets one split.
    """
    return not needs_grad and seq_q * group <= DECODE_MAX_ROWS


@triton.jit
def _group_rows_ptrs(X, strides, b, heads, rows, cols):
    # Pointers of a decode tile whose rows are (query head, token) pairs: heads[r], rows[r].
    return (X + b * strides[0] + heads[:, None] * strides[1] + rows[:, None] * strides[2]
            + cols[None, :] * strides[3])


@triton.jit
def attention_decode_split_kernel(
    Q, K, V, O, O_PART, STATS_PART, SEQLENS, LEFTPAD, CU_Q, CU_K,
    q_strides, k_strides, v_strides, o_strides, dims, scoring, split_keys, length_strides,
    SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
):
    # dims = (Hk, group, seq_q, total_q, seq_k, num_seqs): seq_q the rows of one sequence in the
    # tile (packed: the longest sequence's), total_q the rows of q per head, seq_k the rows of k.
    # split_keys = (keys per split, splits); length_strides: of SEQLENS and LEFTPAD.
    num_kv_heads, group, seq_q, total_q, seq_k, num_seqs = dims
    qk_scale, window, softcap = scoring
    keys_per_split, num_splits = split_keys
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // num_kv_heads).to(tl.int64)  # batch row, or packed sequence
    kvh = bkv % num_kv_heads

    # Pack (query head of the group, token) pairs as the rows of one tile.
    rows = tl.arange(0, BLOCK_M)
    tok = rows % seq_q
    head = kvh * group + rows // seq_q
    rows_in = rows < group * seq_q
    if SPEC.VARLEN:
        # Packed sequences (B = 1): sequence b's queries start at row q0 of q, its keys at k0.
        q0, len_q = sequence_rows(CU_Q, b, num_seqs, total_q)
        k0, seq_len = sequence_rows(CU_K, b, num_seqs, seq_k)
        q0, k0 = q0.to(tl.int64), k0.to(tl.int64)
        rows_in = rows_in & (tok < len_q)
        b = 0
    else:
        q0 = 0
        k0 = 0
        len_q = seq_q
        if HAS_SEQLENS:
            # This row's cache holds keys [0, L) of the buffer (clamped to it, so that a bad
            # length can never read past the buffer); the rest is stale or empty.
            seq_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b * length_strides[0]), 0), seq_k)
        else:
            seq_len = seq_k
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, SPEC.BLOCK_D)
    d_in = offs_d < SPEC.HEAD_DIM

    q = tl.load(_group_rows_ptrs(Q, q_strides, b, head.to(tl.int64), q0 + tok, offs_d),
                mask=rows_in[:, None] & d_in[None, :], other=0.0)
    if SPEC.DOT_IN_FP32:
        q = q.to(tl.float32)
    kv = key_value_tiles(K, V, k_strides, v_strides, b, kvh.to(tl.int64), k0, SPEC, BLOCK_N)
    k_base, v_base, k_offs, v_offs, k_step, v_step = kv

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked rows give 2^-inf = 0
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, SPEC.BLOCK_D], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seq_len)  # hi <= lo: a split past L visits no key
    offset = seq_len - len_q  # bottom-right causal: token i sees j <= i + L - Tq
    first_visible = 0
    if HAS_LEFTPAD:
        # A left-padded row: keys [0, pad) are padding.  Whole tiles of padding are skipped (lo
        # stays a multiple of BLOCK_N); the rest is masked.
        first_visible = tl.maximum(tl.load(LEFTPAD + b * length_strides[1]), 0)
        lo = tl.maximum(lo, first_visible // BLOCK_N * BLOCK_N)
    if SPEC.WINDOW:
        # Token 0's window starts at L - Tq - window + 1 (later tokens' further right): key tiles
        # left of it are skipped, a split wholly left of it visits nothing; the edge is masked.
        lo = tl.maximum(lo, tl.maximum(offset - window + 1, 0) // BLOCK_N * BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        tile = start_n.to(tl.int64)
        keys = start_n + offs_n
        keys_in = keys < hi
        kv_mask = keys_in[:, None] & d_in[None, :]
        k = tl.load(k_base + tile * k_step + k_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_base + tile * v_step + v_offs, mask=kv_mask, other=0.0)
        if SPEC.DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = score_dot(q, k, SPEC.PRECISION)
        s, _tanh = capped_scores(s, softcap, SPEC.SOFTCAP)
        visible = visible_pairs(keys[None, :], tok[:, None], offset, hi, window, True, SPEC.CAUSAL,
                                SPEC.WINDOW)
        if HAS_LEFTPAD:
            visible = visible & (keys >= first_visible)[None, :]
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, True,
                                            Q.dtype.element_ty, SPEC)

    seen = l_i > 0.0
    o = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]
    out_mask = rows_in[:, None] & d_in[None, :]
    if WRITE_PARTIAL:
        row_id = (b * (num_kv_heads * group) + head) * total_q + q0 + tok  # (B, Hq, Tq) flat
        part = row_id * num_splits + split
        tl.store(O_PART + part[:, None] * SPEC.HEAD_DIM + offs_d[None, :], o, mask=out_mask)
        tl.store(STATS_PART + 2 * part, m_i, mask=rows_in)  # (m_s, l_s) pairs
        tl.store(STATS_PART + 2 * part + 1, l_i, mask=rows_in)
    else:
        o_ptrs = _group_rows_ptrs(O, o_strides, b, head.to(tl.int64), q0 + tok, offs_d)
        tl.store(o_ptrs, cast_rne(o, O.dtype.element_ty), mask=out_mask)


@triton.jit
def attention_decode_combine_kernel(
    O_PART, STATS_PART, O, o_strides, num_heads, seq_q, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, RAW_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one output row: (batch, head, token)
    tok = row % seq_q
    bh = row // seq_q
    h = bh % num_heads
    b = bh // num_heads
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    splits_in = splits < num_splits
    d_in = offs_d < HEAD_DIM
    part = row * num_splits + splits
    # A split without visible keys has l_s = 0 (and m_s = -1e30): its weight is 0.
    m_s = tl.load(STATS_PART + 2 * part, mask=splits_in, other=-1.0e30)
    l_s = tl.load(STATS_PART + 2 * part + 1, mask=splits_in, other=0.0)
    w = l_s * softmax_rescale(m_s, tl.max(m_s, 0), qk_scale, RAW_MAX)
    denom = tl.sum(w, 0)  # 0 only for a row that sees no key at all: it outputs zeros
    o_part = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=splits_in[:, None] & d_in[None, :], other=0.0)
    o = tl.sum(w[:, None] * o_part, 0) / tl.where(denom > 0.0, denom, 1.0)
    o_ptrs = head_rows(O, o_strides, b, h, tok) + offs_d * o_strides[3]
    tl.store(o_ptrs, cast_rne(o, O.dtype.element_ty), mask=d_in)


def decode_configs(head_dim: int, dtype: torch.dtype, rows: int = 1, family: str = "hopper"):
    """``(BLOCK_N, num_warps, num_stages)`` candidates of the split kernel for ``rows = Tq * group``
    query rows on a GPU of tile ``family`` (``configs.tile_family``), best first; the
    launcher takes the first that fits the device (``device.config_fits``).  Best: K/V tiles of
    64 keys (32 off Hopper beyond 16 rows) with as many stages in flight as ``PIPELINE_BUDGET``
    allows (the kernel is bound by reading the cache); then fewer stages, then narrower tiles, for
    devices with less shared memory (99 KB consumer cards, AMD's 64 KB LDS)."""
    if INTERPRET:
        return [(32, 4, 1)]
    block_d = max(16, triton.next_power_of_2(head_dim))
    elt = torch.empty((), dtype=dtype).element_size()
    if elt == 4:
        # float32 multiplies with FMA dots whose operand tiles live in registers: 8 warps, and
        # narrow key tiles once the rows are many (sizes checked for spills by compiling for sm_90).
        first = 32 if rows <= 16 else 16
        return [(first, 8, 2)] + [(16, 8, s) for s in (2, 1) if (16, 8, s) != (first, 8, 2)]
    stages = 4
    while stages * 2 * 64 * block_d * elt > PIPELINE_BUDGET and stages > 2:
        stages -= 1
    # More than 16 rows of head dim >= 128 hold a float32 accumulator of 32-64 KB next to the
    # scores: 4 warps spill it (sm_86/89 at D 128, sm_90 at D 256), 8 do not.
    warps = 8 if block_d >= 128 and rows > 16 else 4
    # Beyond Hopper (wgmma), more than 16 rows of 64-key scores spill a little (8-36 bytes:
    # gfx950 at D 128; sm_80, sm_86, sm_120 with Triton 3.9's ptxas): 32-key tiles there.
    first = 64 if family == "hopper" or rows <= 16 else 32
    best = [(first, warps, s) for s in range(stages, 1, -1)]
    narrower = [(block_n, warps, s) for block_n in (64, 32, 16) if block_n <= first for s in (2, 1)]
    return best + [t for t in narrower if t not in best]


def decode_splits(batch: int, kv_heads: int, seq_k: int, block_n: int, device: torch.device):
    """``(num_splits, keys_per_split)``: about two programs per multiprocessor in all, each split
    at least ``min_keys_per_split()`` keys and a whole number of ``block_n`` tiles.  Depends on the
    shapes and the device only (never on data), as CUDA-graph capture requires."""
    programs = max(1, batch * kv_heads)
    want = triton.cdiv(2 * num_sms(device), programs)
    splits = max(1, min(want, triton.cdiv(seq_k, min_keys_per_split())))
    keys_per_split = triton.cdiv(triton.cdiv(seq_k, splits), block_n) * block_n
    return triton.cdiv(seq_k, keys_per_split), keys_per_split


def _launch_decode(q, k, v, causal, sm_scale, *, cache_seqlens=None, cache_leftpad=None,
                   cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window=0,
                   softcap=0.0):
    # Shared by attention_decode (batch rows) and attention_decode_varlen (packed sequences).
    problem = AttentionProblem.build(q, k, causal, sm_scale, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, window, softcap)
    batch, heads, total_q, head_dim = q.shape
    kv_heads, total_k, group = problem.kv_heads, problem.seq_k, problem.group
    seq_q, seq_k = problem.lengths
    programs = problem.num_seqs if problem.varlen else batch  # per KV head
    # Packed sequences need not cover every row of q: the rows they leave out are zeros.
    o = torch.zeros_like(q) if problem.varlen else torch.empty_like(q)
    if o.numel() == 0 or seq_q == 0:
        return o
    if seq_q * group > DECODE_MAX_ROWS:
        raise ValueError(
            f"attention_decode takes at most {DECODE_MAX_ROWS} query rows per KV head "
            f"(Tq * Hq / Hk); got {seq_q} * {group}"
        )
    spec = problem.spec
    rows = batch * heads * total_q
    has_seqlens, has_leftpad = cache_seqlens is not None, cache_leftpad is not None
    consts = dict(SPEC=spec, BLOCK_M=max(16, triton.next_power_of_2(seq_q * group)),
                  HAS_SEQLENS=has_seqlens, HAS_LEFTPAD=has_leftpad)
    length_strides = (cache_seqlens.stride(0) if has_seqlens else 0,
                      cache_leftpad.stride(0) if has_leftpad else 0)

    def split_args(o_part, stats_part, keys_per_split, splits):
        return (q, k, v, o, o_part, stats_part, cache_seqlens if has_seqlens else o,
                cache_leftpad if has_leftpad else o, *problem.offsets(o),
                q.stride(), k.stride(), v.stride(), o.stride(),
                (kv_heads, group, seq_q, total_q, total_k, programs), problem.scoring,
                (keys_per_split, splits), length_strides)

    # The first candidate whose compiled kernel fits the device (partials: placeholders of their
    # dtype; shared memory depends on the tiles, never on the buffers).
    limits = device_limits(q.device)
    placeholder = o.new_empty(0, dtype=torch.float32)
    family = tile_family(limits)
    for block_n, num_warps, num_stages in decode_configs(head_dim, q.dtype, seq_q * group, family):
        splits, keys_per_split = decode_splits(programs, kv_heads, max(seq_k, 1), block_n, q.device)
        meta = dict(BLOCK_N=block_n, WRITE_PARTIAL=splits > 1)
        partial = (placeholder, placeholder) if splits > 1 else (o, o)
        if config_fits(attention_decode_split_kernel, split_args(*partial, keys_per_split, splits),
                       {**consts, **meta}, dict(num_warps=num_warps, num_stages=num_stages), limits):
            break
    else:
        raise NoFittingConfig(
            f"llama_kernels: no tile of flash_decode (head dim {head_dim}, {seq_q * group} rows, "
            f"{q.dtype}) fits {limits.arch} ({limits.shared_memory} bytes of shared memory)")
    if splits > 1:
        alloc = torch.zeros if problem.varlen else torch.empty
        o_part = alloc((rows, splits, head_dim), dtype=torch.float32, device=q.device)
        stats_part = alloc((rows, splits, 2), dtype=torch.float32, device=q.device)
    else:  # the split kernel writes o directly; these are never touched
        o_part = stats_part = o
    attention_decode_split_kernel[(splits, programs * kv_heads)](
        *split_args(o_part, stats_part, keys_per_split, splits), **consts, **meta,
        num_warps=num_warps, num_stages=num_stages,
    )
    count_launch(attention_decode_split_kernel)
    if splits > 1:
        attention_decode_combine_kernel[(rows,)](
            o_part, stats_part, o, o.stride(), heads, total_q, splits, problem.qk_scale,
            HEAD_DIM=head_dim, BLOCK_D=spec.BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            RAW_MAX=spec.RAW_MAX, num_warps=4 if spec.BLOCK_D >= 128 else 2,
        )
        count_launch(attention_decode_combine_kernel)
    return o


def _decode_fake(q, k, v, causal, sm_scale, cache_seqlens=None, cache_leftpad=None, window=0,
                 softcap=0.0):
    return torch.empty_like(q)


@compilable("attention_decode", _decode_fake)
def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
    cache_seqlens: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
    window: int = 0, softcap: float = 0.0,
) -> torch.Tensor:
    """Launch split-KV attention (forward only): returns ``o (B, Hq, Tq, D)`` in ``q.dtype``.

    Arguments are those of ``flash_attention``, already validated; ``Tq * Hq / Hk`` must be at most
    ``DECODE_MAX_ROWS``.  With ``cache_seqlens`` (int32 ``(B,)``, see ``flash_decode``) row ``b``
    attends to the first ``cache_seqlens[b]`` keys of ``k, v`` only, and with ``cache_leftpad``
    not to its first ``cache_leftpad[b]``.  ``window`` (causal) and ``softcap`` as in
    ``flash_attention`` (validated; 0 is off).
    """
    return _launch_decode(q, k, v, causal, sm_scale, cache_seqlens=cache_seqlens,
                          cache_leftpad=cache_leftpad, window=window, softcap=softcap)


def _decode_varlen_fake(q, k, v, causal, sm_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, window=0, softcap=0.0):
    return torch.empty_like(q)


@compilable("attention_decode_varlen", _decode_varlen_fake)
def attention_decode_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    window: int = 0, softcap: float = 0.0,
) -> torch.Tensor:
    """Split-KV attention of packed sequences (``flash_attention``'s varlen arguments, already
    validated): one program per (split, sequence, KV head) holding the sequence's (at most
    ``max_seqlen_q``) queries of the whole group, e.g. one new token per sequence over long keys.
    ``max_seqlen_q * Hq / Hk`` must be at most ``DECODE_MAX_ROWS``; the splits follow
    ``max_seqlen_k``.  Rows outside every sequence are zeros.  ``window`` and ``softcap`` as in
    ``attention_decode``, within each sequence."""
    return _launch_decode(q, k, v, causal, sm_scale, cu_seqlens_q=cu_seqlens_q,
                          cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, window=window, softcap=softcap)
