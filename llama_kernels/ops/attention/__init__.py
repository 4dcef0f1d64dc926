"""Flash attention and split-KV decode: forward and backward for training and prefill, grouped-query heads, any strides.

Notation: for one (batch, query head) pair, ``q (Tq, D)`` and the ``k, v (Tk, D)`` of its KV head
(query head ``h`` reads KV head ``h // group``, ``group = Hq // Hk``), ``c = sm_scale * log2(e)``.
Causal masking is aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + (Tk - Tq)``.

Forward (online softmax in base 2; ``T x T`` scores never leave a tile)::

    for each key tile j:   s = c * q k_j^T                      (float32, masked entries -inf)
                           m' = max(m, rowmax(s));  p = 2^(s - m')
                           l  = 2^(m - m') l + rowsum(p)
                           acc = 2^(m - m') acc + cast(p) v_j   (cast to the input dtype, as the GPU
                                                                  feeds the tensor cores)
    o = acc / l;   kept for the backward, per row: m and log2(l)   (float32 "stats")

The backward recomputes ``P = 2^((s - m) - log2(l))``.  ``m`` and ``log2(l)`` are stored apart, not
as their sum (the log-sum-exp): rounded to float32 that sum loses ``|lse| * 2^-24`` in every
exponent, which with large logits (``|s|`` in the hundreds) would make the recomputed ``P`` differ
from the forward's by ~1e-5 relative, far more than eager float32 attention's error.  ``s - m``
repeats the forward's own arithmetic, so the two agree.  This matters for float32 inputs, which
also keep ``m`` in raw score units and form exponents as ``c (s - m)``, exact at the max (see
``tiles.softmax_row_max``); half precision folds ``m + log2(l)`` in the backward, one FMA per score,
since there the rounding is far below the input precision.

Packed (varlen) sequences: with ``cu_seqlens_q/k`` the batch is one row of concatenated sequences
and pair ``i`` is the ``(q, k)`` above restricted to rows ``[cu_q[i], cu_q[i+1])`` and
``[cu_k[i], cu_k[i+1])`` (causal bottom-right within the pair).  The launch grid enumerates the
tiles of every sequence (``tiles.varlen_tile`` finds a program's sequence on the
device), so uneven lengths cost what their tiles cost; the kernels are the same, with the
sequence's first rows added to the pointers and its lengths in place of ``Tq, Tk``.

Sliding window (``window = W``, causal only, transformers' ``kv_idx > q_idx - W``): query ``i``
sees key ``j`` iff ``i + (Tk - Tq) - W < j <= i + (Tk - Tq)``, the ``W`` most recent keys it may
see causally.  For the query tile ``[m0, m0 + BLOCK_M)`` the key range starts at the tile holding
``max(0, m0 + (Tk - Tq) - W + 1)`` (its first row's first key; tiles further left are never
visited), and key tiles below ``m0 + BLOCK_M + (Tk - Tq) - W`` (its last row's first key) straddle
the window's edge and are masked like the diagonal ones.  For the key tile ``[n0, n0 + BLOCK_N)``
(dK/dV) the query range ends before ``n0 + BLOCK_N - 1 - (Tk - Tq) + W``.  A window ``>= Tk``
hides nothing and compiles out.

Softcap (``softcap = C``, Gemma 2): the scaled scores become ``C tanh(sm_scale s / C)`` before the
softmax.  The kernels apply it to the raw scores with ``cap = C / sm_scale``,
``u = cap tanh(s / cap)``, and then run the softmax of ``sm_scale u`` as above (same ``c``, so
the row stats stay in the same units).  Backward: ``du/ds = 1 - tanh^2(s / cap) = 1 - (u /
cap)^2``, so ``dS`` below is multiplied by it, elementwise, before ``dQ`` and ``dK``.

A row that sees no key (causal with ``Tq > Tk``) ends with ``l = 0``: it outputs zeros and stores
``m = +inf``, so every probability the backward recomputes for it is ``2^(s - inf) = 0``.

Backward, with ``P`` recomputed tile by tile from q, k and the stats::

    Delta = rowsum(dO * O)                  (preprocess kernel, float32)
    dV    = P^T dO
    dP    = dO V^T
    dS    = P * (dP - Delta)                (gradient of the scaled scores sm_scale * q k^T)
    dQ    = sm_scale * dS K
    dK    = sm_scale * dS^T Q

For float32 inputs ``Delta`` is instead summed as ``rowsum(P * dP)`` by a first pass of the dQ
kernel over the same ``P`` and ``dP`` tiles, so ``dP - Delta`` cancels exactly where a row's
softmax is one-hot (large logits), as in eager autograd; ``rowsum(dO * O)`` differs from it by
roundings that large logits magnify.  That pass costs two matmuls per tile, so only float32, the
accuracy reference rather than the fast path, pays for it.

Every kernel only visits tiles that the causal mask leaves visible, and only tiles that straddle
the diagonal (or a ragged edge) pay for masking (except the warp-specialised forward, which masks
every tile: see ``forward.py``).  Padding rows of a ragged tile are masked in the
exponent, never left to produce inf/NaN that is merely not stored: a padding key's zero score can
exceed the max of a row whose scores are all negative, and ``2^(0 - m)`` would overflow
(non-causal; causal masking hides those keys anyway).

Precision: scores, softmax statistics and all accumulators are float32.  With float32 inputs the
dots run in IEEE float32 (the GPU's default TF32 would lose accuracy); with float16/bfloat16 the
operands of every dot are in the input dtype.  Under the Triton interpreter, which computes
bfloat16 dots and arithmetic wrongly, the operands are rounded to the input dtype (``cast_rne``) and
then multiplied in float32, which gives the same values as the GPU's tensor cores; the scores
``q k^T`` are summed in float64 there and rounded once (``tiles.score_dot``), so that the
backward's recomputed scores equal the forward's to the bit, as the GPU's float32 dots give them.

Where the code lives (imports run one way: ``validation``, ``problem`` and ``tiles`` at the
bottom, then ``configs``, then ``forward``, ``backward`` and ``decode``, then ``interface``):

* ``validation.py``: argument checks, before anything launches.
* ``problem.py``: ``AttentionProblem``, the host-side description of one call (shapes, GQA
  group, padded head dim, packed offsets, window, softcap, dot precision) and ``KernelSpec``, the
  one constexpr every kernel is compiled for.
* ``tiles.py``: the device-side helpers: tile pointers, loads and stores, the online-softmax
  arithmetic, the key ranges of a query tile, the visibility mask, the launch order.
* ``configs.py``: tile configurations per kernel, variant, dtype and head dim; autotuning; launch.
* ``forward.py``: the portable forward and the Hopper one (TMA descriptors, warp-specialised).
* ``backward.py``: the fused backward (5 matmuls per tile pair, atomic float32 dQ) and the
  deterministic one (separate dQ and dK/dV kernels), chosen by
  ``torch.are_deterministic_algorithms_enabled()`` (or the ``deterministic`` kernel option);
  float32 always takes the deterministic one.
* ``decode.py``: split-KV kernels for generation.  Calls that need no gradient and have few
  queries per KV group (``Tq * Hq / Hk <= 64``) go there instead.
* ``interface.py``: ``flash_attention``, its autograd function, and ``flash_decode``.

Runtime switches (the TMA forward, head splits, decode split size, interpreter tiles) are
``llama_kernels.kernel_options``; nothing here is switched by a module global.
"""
from .decode import DECODE_MAX_ROWS, use_decode
from .interface import FlashAttentionFunction, flash_attention, flash_decode
from .validation import MAX_HEAD_DIM, supports_head_dim

__all__ = ["flash_attention", "flash_decode", "FlashAttentionFunction", "supports_head_dim",
           "MAX_HEAD_DIM", "DECODE_MAX_ROWS", "use_decode"]
