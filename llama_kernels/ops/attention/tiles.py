"""The attention kernels' device-side helpers (inlined into the kernels): tile pointers, loads
and stores, dot precision, the online-softmax arithmetic, the key ranges of a query tile, which
(query, key) pairs are visible, and the launch order of query tiles.

``forward.py``, ``backward.py`` and ``decode.py`` import from here; nothing here imports them.
The math these helpers implement is written out in the package's docstring (``__init__.py``).
Tensors are ``(B, H, T, D)`` with strides passed as one tuple per tensor (``t.stride()``).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..common import _INTERPRET, cast_rne


@triton.jit
def head_rows(X, strides, b, h, row0):
    """Pointer to row ``row0`` of head ``h`` of batch row ``b`` of a ``(B, H, T, D)`` tensor."""
    return X + b * strides[0] + h * strides[1] + row0 * strides[2]


@triton.jit
def tile_ptrs(base, strides, rows, cols):
    """Pointers of the ``(rows, cols)`` tile at ``base`` (``head_rows``): rows along T, columns D."""
    return base + rows[:, None] * strides[2] + cols[None, :] * strides[3]


@triton.jit
def tile_offsets(strides, rows, cols):
    """Element offsets of a ``(rows, cols)`` tile, kept 32-bit (a loop adds a 64-bit tile start)."""
    return rows[:, None] * strides[2] + cols[None, :] * strides[3]


@triton.jit
def load_tile(ptrs, rows_in, cols_in, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr,
               DOT_IN_FP32: tl.constexpr):
    # A (rows, BLOCK_D) tile.  Masks are compiled in only where a tile can leave the tensor: the
    # head-dim padding (PAD_D) and ragged sequence edges (MASK_ROWS).
    if MASK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=rows_in[:, None] & cols_in[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_in[:, None], other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=cols_in[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # Round a float32 tile to the input dtype, the precision the tensor cores multiply in.  Under
    # the interpreter the rounded value is kept in float32 (its bfloat16 dots are wrong).
    x = cast_rne(x, DTYPE)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def score_dot(a, b, PRECISION: tl.constexpr):
    """``a b^T`` for the attention scores (``q k^T``, or ``k q^T`` transposed in the backward).

    The backward recomputes the forward's scores and takes ``P = 2^(s - lse)`` from the forward's
    row stats, so at large logits the two must agree to the bit (a score ~1e4 off by one float32
    ulp moves a one-hot row's ``P = 1`` by 1e-3).  The GPU's float32 dot sums the head dim in one
    order with fused multiply-adds whatever the operands' roles, so they do; numpy's float32
    matmul, which the interpreter calls, does not (OpenBLAS picks kernels, and their summation
    orders, by shape and operand order).  Under the interpreter the products are summed in
    float64 and rounded once, which is the same float32 result either way round.
    """
    if _INTERPRET:
        return tl.dot(a.to(tl.float64), tl.trans(b).to(tl.float64)).to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision=PRECISION)


@triton.jit
def softmax_row_max(m_i, s, qk_scale, RAW_MAX: tl.constexpr):
    """Running row max of the scores ``s``: raw units (RAW_MAX) or scaled by ``qk_scale``.

    float32 inputs keep the max in raw score units and exponents as ``(s - m) * c``: the max
    score's exponent is then exactly 0 (``s - m`` is exact for nearby scores), so a one-hot row
    gets ``P = 1`` exactly and its gradient cancels exactly, as in eager float32.  Half precision
    uses ``s * c - m``, one fused multiply-add per score, whose rounding of ``m`` (a common
    offset of the row, up to ``|s| * 2^-24``) is far below the error of half-precision eager.
    """
    if RAW_MAX:
        return tl.maximum(m_i, tl.max(s, 1))
    # qk_scale > 0, so scaling the row max equals the max of the scaled row.
    return tl.maximum(m_i, tl.max(s, 1) * qk_scale)


@triton.jit
def softmax_exponent(s, m, qk_scale, RAW_MAX: tl.constexpr):
    """log2 of the unnormalised probability ``2^(c s - c max)`` (``m`` broadcasts against ``s``)."""
    if RAW_MAX:
        return (s - m) * qk_scale
    return s * qk_scale - m


@triton.jit
def softmax_log_prob(s, m, log2_l, qk_scale, RAW_MAX: tl.constexpr):
    """log2 of the normalised probability, as the backward recomputes it from the row stats.

    Half precision folds ``m + log2(l)`` first (one fused multiply-add per score; rounding that
    log-sum-exp costs ~``|lse| * 2^-24`` relative, far below half-precision error); float32
    keeps them apart so the exponent of a one-hot row's max is exactly 0.
    """
    if RAW_MAX:
        return (s - m) * qk_scale - log2_l
    return s * qk_scale - (m + log2_l)


@triton.jit
def softmax_rescale(m_old, m_new, qk_scale, RAW_MAX: tl.constexpr):
    """The factor ``2^(c (max_old - max_new))`` that moves sums kept against ``m_old`` to ``m_new``."""
    if RAW_MAX:
        return tl.exp2((m_old - m_new) * qk_scale)
    return tl.exp2(m_old - m_new)


@triton.jit
def tanh_f32(x):
    """float32 ``tanh``: libdevice's on the GPU; under the interpreter (which has no libdevice) an
    odd Taylor polynomial for ``|x| < 0.5`` and ``(1 - e) / (1 + e)``, ``e = 2^(-2|x| log2 e)``,
    above (no cancellation there: ``e < 0.37``), both within a few float32 ulps."""
    if _INTERPRET:
        a = tl.abs(x)
        e = tl.exp2(a * (-2.0 * 1.4426950408889634))
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        # tanh x = x (1 - x^2/3 + 2x^4/15 - 17x^6/315 + 62x^8/2835 - 1382x^10/155925
        #             + 21844x^12/6081075 - 929569x^14/638512875): terms < 1e-9 at |x| = 0.5
        poly = -929569.0 / 638512875.0
        poly = poly * x2 + 21844.0 / 6081075.0
        poly = poly * x2 - 1382.0 / 155925.0
        poly = poly * x2 + 62.0 / 2835.0
        poly = poly * x2 - 17.0 / 315.0
        poly = poly * x2 + 2.0 / 15.0
        poly = poly * x2 - 1.0 / 3.0
        small = x + x * (x2 * poly)
        return tl.where(a < 0.5, small, tl.where(x < 0, -big, big))
    else:
        return libdevice.tanh(x)


@triton.jit
def capped_scores(s, softcap, SOFTCAP: tl.constexpr):
    """``(u, t)``: raw scores ``s`` capped to ``u = softcap * tanh(s / softcap)`` (``softcap`` in raw
    score units, ``AttentionProblem.cap``) and ``t = tanh(s / softcap)``, whose
    ``1 - t^2`` is ``du/ds`` (the backward's chain factor).  Without SOFTCAP: ``(s, s)``."""
    if SOFTCAP:
        t = tanh_f32(s * (1.0 / softcap))
        return t * softcap, t
    else:
        return s, s



@triton.jit
def store_tile(ptrs, x, rows_in, cols_in, PAD_D: tl.constexpr):
    x = cast_rne(x, ptrs.dtype.element_ty)
    if PAD_D:
        tl.store(ptrs, x, mask=rows_in[:, None] & cols_in[None, :])
    else:
        tl.store(ptrs, x, mask=rows_in[:, None])



# Offsets a program reads per step while it looks up its sequence (``varlen_tile``).
VARLEN_CHUNK = tl.constexpr(64)


@triton.jit
def varlen_tile(CU, num_seqs, tile, BLOCK: tl.constexpr):
    """``(seq, start)`` of tile number ``tile`` when every packed sequence ``i`` (rows
    ``[CU[i], CU[i+1])``) is cut into ``cdiv(len_i, BLOCK)`` tiles laid end to end: the sequence
    it belongs to and its first row within that sequence.  ``seq == num_seqs`` past the last tile.

    The schedule is per (sequence, tile), so uneven lengths cost what their tiles cost, and it is
    found on the device (a scan over the offsets, ``VARLEN_CHUNK`` at a time) whatever the block
    size the autotuner picked: nothing is read back to the host.
    """
    seq = 0
    first = 0  # tiles before `seq`
    passed_tiles = 0  # tiles of the chunks already scanned
    for c in range(0, num_seqs, VARLEN_CHUNK):
        idx = c + tl.arange(0, VARLEN_CHUNK)
        inside = idx < num_seqs
        lo = tl.load(CU + idx, mask=inside, other=0)
        hi = tl.load(CU + idx + 1, mask=inside, other=0)
        tiles = tl.where(inside, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK), 0)
        through = tl.cumsum(tiles, 0) + passed_tiles  # tiles of sequences 0..idx
        before = inside & (through <= tile)
        seq += tl.sum(before.to(tl.int32), 0)
        first = tl.maximum(first, tl.max(tl.where(before, through, 0), 0))
        passed_tiles += tl.sum(tiles, 0)
    return seq, (tile - first) * BLOCK


@triton.jit
def sequence_rows(CU, seq, num_seqs, total):
    """``(start, length)`` of packed sequence ``seq``: ``(0, 0)`` past the last one, and clamped
    to ``[0, total]`` so that offsets that were not checked on the host never reach past the
    tensor."""
    inside = seq < num_seqs
    start = tl.load(CU + seq, mask=inside, other=0)
    end = tl.load(CU + seq + 1, mask=inside, other=0)
    start = tl.minimum(tl.maximum(start, 0), total)
    end = tl.minimum(tl.maximum(end, start), total)
    return start, end - start


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, MASK: tl.constexpr,
                        DTYPE: tl.constexpr, SPEC: tl.constexpr):
    """Fold one key tile (raw scores ``s``, values ``v``) into the running ``acc, l, m``.

    ``visible`` hides keys (causal diagonal, window, ragged end) where ``MASK``; masked scores are
    -inf, so their probabilities are exactly 0.  ``P`` is rounded to the input dtype ``DTYPE``
    before ``P @ V``, as the tensor cores take it.
    """
    if MASK:
        s = tl.where(visible, s, float("-inf"))
    m_new = softmax_row_max(m_i, s, qk_scale, SPEC.RAW_MAX)
    p = tl.exp2(softmax_exponent(s, m_new[:, None], qk_scale, SPEC.RAW_MAX))
    alpha = softmax_rescale(m_i, m_new, qk_scale, SPEC.RAW_MAX)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(dot_operand(p, DTYPE, SPEC.DOT_IN_FP32), v, acc, input_precision=SPEC.PRECISION)
    return acc, l_i, m_new


@triton.jit
def visible_pairs(keys, queries, offset, keys_end, window, RAGGED: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query, key) pairs of a tile take part; ``keys`` and ``queries`` are positions
    broadcast against each other in either orientation (``[None, :]`` and ``[:, None]``, or
    transposed).  Bottom-right causal (``CAUSAL``): key ``j`` is visible to query ``i`` iff
    ``j <= i + offset``, ``offset = Tk - Tq``; sliding window (``WINDOW``): also
    ``j > i + offset - window``; keys from ``keys_end`` on are hidden when not causal, and causal
    too with ``RAGGED`` (the diagonal hides them from every query inside Tq)."""
    if CAUSAL:
        visible = keys <= queries + offset
        if RAGGED:
            visible = visible & (keys < keys_end)
    else:
        visible = keys < keys_end
    if WINDOW:
        visible = visible & (keys > queries + (offset - window))
    return visible


@triton.jit
def query_tile_key_ranges(start_m, seq_q, seq_k, window, CAUSAL: tl.constexpr,
                          WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(lo, full_lo, full_hi, hi)``: the key tiles the query tile at ``start_m`` visits, in three
    ranges (the forward and dQ walk them the same way).  ``[lo, full_lo)`` straddles the sliding
    window's left edge (masked; empty without ``WINDOW``), ``[full_lo, full_hi)`` is seen in full
    by every row (no mask), ``[full_hi, hi)`` holds the causal diagonal and the ragged end of the
    keys (masked); tiles left of ``lo`` and from ``hi`` on are invisible and never loaded.

    Causal: key ``j`` is visible to every row iff ``j <= start_m + Tk - Tq``.  Window: query ``i``
    sees ``j > i + Tk - Tq - window``, so the first row's first key (rounded down to a tile) starts
    the range and the last row's first key (rounded up) ends the masked edge.
    """
    whole_tiles = (seq_k // BLOCK_N) * BLOCK_N
    offset = seq_k - seq_q
    if CAUSAL:
        first_row_sees = start_m + offset + 1
        full_hi = tl.minimum(tl.maximum(first_row_sees, 0) // BLOCK_N * BLOCK_N, whole_tiles)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), seq_k)
    else:
        full_hi = whole_tiles
        hi = seq_k
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = tl.maximum(start_m + offset - window + 1, 0) // BLOCK_N * BLOCK_N
        last_row_lo = tl.maximum(start_m + BLOCK_M + offset - window, 0)
        full_lo = tl.maximum(tl.minimum(tl.cdiv(last_row_lo, BLOCK_N) * BLOCK_N, full_hi), lo)
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_tile_program(dims, CU_Q, CU_K, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """``(start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k)`` of a forward/dQ program on the grid
    ``(B * Hq, query tiles)``, ``dims = (Hq, group, Tq, Tk, num_seqs)``: the tile's first query
    ``start_m`` (within its sequence), the batch and heads, and the sequence's first query row
    ``q0`` and key row ``k0`` in the tensors with its lengths.  Without ``VARLEN`` each batch row
    is one sequence (``q0 = k0 = 0``, the lengths as given); with it ``B = 1`` and axis 1
    enumerates the tiles of the packed sequences (``varlen_tile``; programs past the last tile get
    empty sequences and do nothing).

    Heads are the fastest launch axis: the programs in flight at one time hold the same query
    tile of many heads, so the query heads of one KV group (adjacent heads) read the same K/V
    tiles together (L2 reuse), and under causal masking, where the last query tiles see the most
    keys, every head's longest tile is dispatched first (longest first balances the tail).
    """
    num_heads, group, seq_q, seq_k, num_seqs = dims
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    if VARLEN:
        seq, start_m = varlen_tile(CU_Q, num_seqs, tile, BLOCK_M)
        q0, seq_q = sequence_rows(CU_Q, seq, num_seqs, seq_q)
        k0, seq_k = sequence_rows(CU_K, seq, num_seqs, seq_k)
    else:
        start_m = tile * BLOCK_M
        q0 = 0
        k0 = 0
    return start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k


@triton.jit
def pointer_query_tile(dims, CU_Q, CU_K, SPEC: tl.constexpr, BLOCK_M: tl.constexpr):
    """``query_tile_program`` for the kernels that address by pointer (forward, dQ), with the
    batch, heads and first rows 64-bit (a per-head base can pass 2^31 elements; the TMA kernel's
    coordinates stay 32-bit) and the tile's query rows and head-dim columns with their masks:
    ``(start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k, offs_m, offs_d, rows_in, d_in)``."""
    start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k = query_tile_program(dims, CU_Q, CU_K, BLOCK_M,
                                                                      SPEC.VARLEN)
    b, h, kvh = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    q0, k0 = tl.cast(q0, tl.int64), tl.cast(k0, tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, SPEC.BLOCK_D)
    return (start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k,
            offs_m, offs_d, offs_m < seq_q, offs_d < SPEC.HEAD_DIM)


@triton.jit
def key_value_tiles(K, V, k_strides, v_strides, b, kvh, k0, SPEC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ``kv`` that ``key_tile_scores`` walks for KV head ``kvh``: the K and V bases at the
    sequence's first key (64-bit), the 32-bit offsets of one ``(BLOCK_N, BLOCK_D)`` tile, and the
    row strides."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, SPEC.BLOCK_D)
    return (head_rows(K, k_strides, b, kvh, k0), head_rows(V, v_strides, b, kvh, k0),
            tile_offsets(k_strides, offs_n, offs_d), tile_offsets(v_strides, offs_n, offs_d),
            k_strides[2], v_strides[2])


@triton.jit
def key_tile_scores(q, kv, start_n, offs_m, seq_q, seq_k, window, MASK: tl.constexpr,
                    SPEC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key/value tile at ``start_n`` of ``kv = (k_base, v_base, k_offs, v_offs, k_step,
    v_step)`` (bases at the sequence's first key, 32-bit tile offsets, the row strides), the raw
    scores ``q k^T``, and which (query, key) pairs are visible (``visible_pairs``); callers apply
    that only where MASK."""
    k_base, v_base, k_offs, v_offs, k_step, v_step = kv
    start_n = tl.multiple_of(start_n, BLOCK_N)
    tile = start_n.to(tl.int64)
    keys = start_n + tl.arange(0, BLOCK_N)
    keys_in = keys < seq_k
    d_in = tl.arange(0, SPEC.BLOCK_D) < SPEC.HEAD_DIM
    k = load_tile(k_base + tile * k_step + k_offs, keys_in, d_in, MASK, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    v = load_tile(v_base + tile * v_step + v_offs, keys_in, d_in, MASK, SPEC.PAD_D, SPEC.DOT_IN_FP32)
    s = score_dot(q, k, SPEC.PRECISION)
    visible = visible_pairs(keys[None, :], offs_m[:, None], seq_k - seq_q, seq_k, window, True,
                            SPEC.CAUSAL, SPEC.WINDOW)
    return k, v, s, visible
