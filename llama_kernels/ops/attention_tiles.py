"""What the attention kernels share: argument checks, dot precision, tile loads and stores, the
online-softmax arithmetic, and the causal key range of a query tile.

``attention_fwd.py``, ``attention_bwd.py`` and ``decode.py`` import from here (and from
``attention_launch.py`` for tile configurations); nothing here imports them, so the imports run one
way.  The math these helpers implement is written out in ``attention.py``'s docstring.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from .common import _INTERPRET, INTERPRET, cast_rne, check_float_arg, check_same, check_tensor, is_abstract
from .device import device_limits
from triton.language.extra import libdevice

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


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


def effective_window(window, seq_k):
    """``window`` (0: off), or 0 when it cannot hide any key (``window >= seq_k``, the longest key
    range): then the kernels compile without the window (it would cost masking for nothing)."""
    return 0 if window >= seq_k else window


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


def dot_mode(dtype, device):
    """``(DOT_IN_FP32, PRECISION)`` for the kernels' dots on ``device``: the GPU multiplies
    half-precision operands as they are and float32 in IEEE precision (never TF32); the
    interpreter multiplies everything in float32 (its bfloat16 dots are wrong).  Half-precision
    operands name the backend's default precision, which they ignore: "tf32" on NVIDIA (the PTX
    every list was checked with), "ieee" on AMD (only gfx942 accepts "tf32"; gfx90a and gfx950
    refuse it).  Tests patch this to run the GPU's half-precision operand path under the
    interpreter (float16 only)."""
    if dtype == torch.float32 or INTERPRET:
        return INTERPRET, "ieee"
    return False, ("tf32" if device_limits(device).backend == "cuda" else "ieee")


def common_consts(q, causal, window=0, softcap=0.0):
    """The constexpr flags every training kernel takes, from ``q``'s dtype and head dim, and
    whether a sliding window (``WINDOW``) and a softcap (``SOFTCAP``) are compiled in."""
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_in_fp32, precision = dot_mode(q.dtype, q.device)
    return dict(
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, PAD_D=block_d != head_dim,
        DOT_IN_FP32=dot_in_fp32, PRECISION=precision, RAW_MAX=q.dtype == torch.float32,
        WINDOW=window > 0, SOFTCAP=softcap > 0,
    )


def softcap_arg(softcap, sm_scale):
    """The kernels' softcap in raw score units, ``softcap / sm_scale`` (0: off): capping the raw
    score ``s`` to ``cap * tanh(s / cap)`` and then scaling by ``sm_scale`` is
    ``softcap * tanh(sm_scale * s / softcap)``."""
    return softcap / sm_scale if softcap > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# Tile helpers (inlined into the kernels)
# ------------------------------------------------------------------------------------------------


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
    score units, ``attention_tiles.softcap_arg``) and ``t = tanh(s / softcap)``, whose
    ``1 - t^2`` is ``du/ds`` (the backward's chain factor).  Without SOFTCAP: ``(s, s)``."""
    if SOFTCAP:
        t = tanh_f32(s * (1.0 / softcap))
        return t * softcap, t
    else:
        return s, s


@triton.jit
def window_key_bounds(start_m, seq_q, seq_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With a sliding window (causal): ``(lo, full_lo)`` of the query tile at ``start_m``.  Key
    tiles below ``lo`` are left of every row's window (never visited); ``[lo, full_lo)`` straddle
    the window's left edge (masked); from ``full_lo`` on, the window hides nothing (up to the
    causal ``full_hi`` of ``causal_key_bounds``).  Query ``i`` sees ``j > i + Tk - Tq - window``."""
    offset = seq_k - seq_q
    first_row_lo = tl.maximum(start_m + offset - window + 1, 0)  # the tile's first row's first key
    lo = first_row_lo // BLOCK_N * BLOCK_N
    last_row_lo = tl.maximum(start_m + BLOCK_M + offset - window, 0)  # its last row's first key
    full_lo = tl.cdiv(last_row_lo, BLOCK_N) * BLOCK_N
    return lo, full_lo


@triton.jit
def store_tile(ptrs, x, rows_in, cols_in, PAD_D: tl.constexpr):
    x = cast_rne(x, ptrs.dtype.element_ty)
    if PAD_D:
        tl.store(ptrs, x, mask=rows_in[:, None] & cols_in[None, :])
    else:
        tl.store(ptrs, x, mask=rows_in[:, None])


@triton.jit
def causal_key_bounds(start_m, seq_q, seq_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Key range of the query tile at ``start_m``: ``[0, full_hi)`` needs no mask at all,
    ``[full_hi, hi)`` holds the diagonal and the ragged end of the keys; the rest is invisible."""
    whole_tiles = (seq_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        offset = seq_k - seq_q
        # Key j is visible to every row of the tile iff j <= start_m + offset.
        first_row_sees = start_m + offset + 1
        full_hi = tl.minimum(tl.maximum(first_row_sees, 0) // BLOCK_N * BLOCK_N, whole_tiles)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), seq_k)
    else:
        full_hi = whole_tiles
        hi = seq_k
    return full_hi, hi


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, visible, qk_scale, MASK: tl.constexpr,
                        DTYPE: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
                        RAW_MAX: tl.constexpr):
    """Fold one key tile (raw scores ``s``, values ``v``) into the running ``acc, l, m``.

    ``visible`` hides keys (causal diagonal, ragged end) where ``MASK``; masked scores are -inf,
    so their probabilities are exactly 0.  ``P`` is rounded to the input dtype before ``P @ V``,
    as the tensor cores take it.
    """
    if MASK:
        s = tl.where(visible, s, float("-inf"))
    m_new = softmax_row_max(m_i, s, qk_scale, RAW_MAX)
    p = tl.exp2(softmax_exponent(s, m_new[:, None], qk_scale, RAW_MAX))
    alpha = softmax_rescale(m_i, m_new, qk_scale, RAW_MAX)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(dot_operand(p, DTYPE, DOT_IN_FP32), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


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
def query_tile_program(num_heads, group, seq_q, seq_k, CU_Q, CU_K, num_seqs,
                       BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """``(start_m, bh, b, h, kvh, q0, k0, seq_q, seq_k)`` of a forward/dQ program on the grid
    ``(B * Hq, query tiles)``: the tile's first query ``start_m`` (within its sequence), the
    batch and heads, and the sequence's first query row ``q0`` and key row ``k0`` in the tensors
    with its lengths.  Without ``VARLEN`` each batch row is one sequence (``q0 = k0 = 0``, the
    lengths as given); with it ``B = 1`` and axis 1 enumerates the tiles of the packed sequences
    (``varlen_tile``; programs past the last tile get empty sequences and do nothing).

    Heads are the fastest launch axis: the programs in flight at one time hold the same query
    tile of many heads, so the query heads of one KV group (adjacent heads) read the same K/V
    tiles together (L2 reuse), and under causal masking, where the last query tiles see the most
    keys, every head's longest tile is dispatched first (longest first balances the tail).
    """
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
def visible_keys(keys, queries, seq_q, seq_k, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query, key) pairs of a tile are visible: keys inside Tk, bottom-right causal, and
    (WINDOW) within the sliding window ``j > i + Tk - Tq - window``."""
    visible = (keys < seq_k)[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= queries[:, None] + (seq_k - seq_q))
    if WINDOW:
        visible = visible & (keys[None, :] > queries[:, None] + (seq_k - seq_q - window))
    return visible


@triton.jit
def key_tile_scores(q, k_base, v_base, k_offs, v_offs, k_st, v_st, start_n, offs_n, offs_m, d_in,
                    seq_q, seq_k, window, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                    PAD_D: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
                    WINDOW: tl.constexpr):
    """The key/value tile at ``start_n`` (pointer loads), the raw scores ``q k^T``, and which
    (query, key) pairs are visible (ragged end of the keys, causal diagonal, sliding window);
    callers apply that only where MASK."""
    start_n = tl.multiple_of(start_n, offs_n.shape[0])
    tile = start_n.to(tl.int64)
    keys = start_n + offs_n
    keys_in = keys < seq_k
    k = load_tile(k_base + tile * k_st + k_offs, keys_in, d_in, MASK, PAD_D, DOT_IN_FP32)
    v = load_tile(v_base + tile * v_st + v_offs, keys_in, d_in, MASK, PAD_D, DOT_IN_FP32)
    s = score_dot(q, k, PRECISION)
    return k, v, s, visible_keys(keys, offs_m, seq_q, seq_k, window, CAUSAL, WINDOW)
