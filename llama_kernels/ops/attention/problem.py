"""The host-side description of one attention call, built once per launch.

``AttentionProblem.build`` derives everything the launchers used to re-derive: shapes, the GQA
group, the padded head dim, packed-sequence offsets and lengths, the sliding window that can hide
a key, the softcap in raw score units, the dot precision, and the constexprs every kernel takes
(``KernelSpec``, passed as the one constexpr ``SPEC``).  Kernels take strides as tuples
(``tensor.stride()``) and the problem's scalars as the tuples ``dims`` and ``scoring`` below.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import triton

from ..device import dot_mode

LOG2E = 1.4426950408889634


class KernelSpec(NamedTuple):
    """What an attention kernel is compiled for: one constexpr, ``SPEC``, of every kernel (and of
    the autotuners' key).  ``PAD_D``: the head dim is padded to ``BLOCK_D`` (masked columns);
    ``DOT_IN_FP32``: dots on float32 tiles (float32 inputs under the interpreter, and half
    precision there: its bfloat16 dots are wrong); ``PRECISION``: the dots' ``input_precision``;
    ``RAW_MAX``: float32 keeps the row max in raw score units (``tiles.softmax_row_max``)."""

    CAUSAL: bool
    HEAD_DIM: int
    BLOCK_D: int
    PAD_D: bool
    DOT_IN_FP32: bool
    PRECISION: str
    RAW_MAX: bool
    WINDOW: bool
    SOFTCAP: bool
    VARLEN: bool


def effective_window(window: int, seq_k: int) -> int:
    """``window`` (0: off), or 0 when it cannot hide any key (``window >= seq_k``, the longest key
    range): then the kernels compile without the window (it would cost masking for nothing)."""
    return 0 if window >= seq_k else window


def bucket(n) -> int:
    """Power-of-two bucket of a sequence length: the autotuners' key."""
    return triton.next_power_of_2(max(int(n), 1))


def grid_tiles(total, block, cu_seqlens=None, max_seqlen=0) -> int:
    """Programs along a sequence axis of ``total`` rows, one per tile of ``block`` rows (axis 1 of
    the attention grids).  Packed sequences (``cu_seqlens``) hold at most
    ``(total + N (block - 1)) // block`` and at most ``N cdiv(max_seqlen, block)`` tiles
    (``sum_i cdiv(len_i, block)``); programs past the real count find no sequence and return."""
    if cu_seqlens is None:
        return triton.cdiv(total, block)
    num_seqs = cu_seqlens.shape[0] - 1
    return max(1, min((total + num_seqs * (block - 1)) // block, num_seqs * triton.cdiv(max_seqlen, block)))


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
    """One attention call as the kernels see it (``flash_attention``'s arguments, validated).

    ``seq_q, seq_k`` are the tensors' lengths; packed, ``max_seqlen_q/k`` bound one sequence's and
    ``lengths`` are those (else the tensors').  ``window`` is 0 where it hides nothing; ``cap`` is
    the softcap in raw score units (``softcap / sm_scale``: capping the raw score ``s`` to
    ``cap tanh(s / cap)`` and then scaling is ``softcap tanh(sm_scale s / softcap)``)."""

    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    sm_scale: float
    window: int
    cap: float
    cu_seqlens_q: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]
    max_seqlen_q: int
    max_seqlen_k: int
    element_size: int
    device: torch.device
    spec: KernelSpec

    @classmethod
    def build(cls, q, k, causal, sm_scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
              max_seqlen_k=0, window=0, softcap=0.0) -> "AttentionProblem":
        batch, heads, seq_q, head_dim = q.shape
        varlen = cu_seqlens_q is not None
        if varlen and cu_seqlens_k is None:
            cu_seqlens_k = cu_seqlens_q
        window = effective_window(window, max_seqlen_k if varlen else k.shape[2])
        block_d = max(16, triton.next_power_of_2(head_dim))
        dot_in_fp32, precision = dot_mode(q.dtype, q.device)
        spec = KernelSpec(
            CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, PAD_D=block_d != head_dim,
            DOT_IN_FP32=dot_in_fp32, PRECISION=precision, RAW_MAX=q.dtype == torch.float32,
            WINDOW=window > 0, SOFTCAP=softcap > 0, VARLEN=varlen,
        )
        return cls(batch=batch, heads=heads, kv_heads=k.shape[1], seq_q=seq_q, seq_k=k.shape[2],
                   head_dim=head_dim, sm_scale=sm_scale, window=window,
                   cap=softcap / sm_scale if softcap > 0 else 0.0, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q if varlen else 0,
                   max_seqlen_k=max_seqlen_k if varlen else 0, element_size=q.element_size(),
                   device=q.device, spec=spec)

    @property
    def varlen(self) -> bool:
        return self.spec.VARLEN

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qk_scale(self) -> float:
        """``c = sm_scale * log2(e)``: the softmax runs in base 2."""
        return self.sm_scale * LOG2E

    @property
    def num_seqs(self) -> int:
        """Packed sequences (0 when not packed)."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else 0

    @property
    def lengths(self) -> tuple:
        """``(Tq, Tk)`` of the longest sequence: what the tiles and the autotuners go by."""
        return (self.max_seqlen_q, self.max_seqlen_k) if self.varlen else (self.seq_q, self.seq_k)

    @property
    def buckets(self) -> tuple:
        """The kernels' ``TQ_BUCKET, TK_BUCKET`` (autotuning keys only)."""
        return bucket(self.lengths[0]), bucket(self.lengths[1])

    @property
    def scoring(self) -> tuple:
        """The kernels' ``scoring`` tuple: ``(qk_scale, window, cap)``."""
        return self.qk_scale, self.window, self.cap

    @property
    def stats_plane(self) -> int:
        """Elements of one plane of the row stats ``(2, B, Hq, Tq)``."""
        return self.batch * self.heads * self.seq_q

    def offsets(self, placeholder) -> tuple:
        """The kernels' ``CU_Q, CU_K``: the packed offsets, or ``placeholder`` twice (never read)."""
        return (self.cu_seqlens_q, self.cu_seqlens_k) if self.varlen else (placeholder, placeholder)

    def query_dims(self) -> tuple:
        """``dims`` of the kernels with a program per query tile (forward, dQ):
        ``(Hq, group, Tq, Tk, num_seqs)``."""
        return self.heads, self.group, self.seq_q, self.seq_k, self.num_seqs

    def key_dims(self, splits) -> tuple:
        """``dims`` of the kernels with a program per key tile (dK/dV, fused backward):
        ``(Hk, group, splits, Tq, Tk, num_seqs)``."""
        return self.kv_heads, self.group, splits, self.seq_q, self.seq_k, self.num_seqs

    def query_grid(self, meta) -> tuple:
        """``(B * Hq, query tiles)``."""
        return (self.batch * self.heads,
                grid_tiles(self.seq_q, meta["BLOCK_M"], self.cu_seqlens_q, self.max_seqlen_q))

    def key_grid(self, splits):
        """``grid(meta)`` of ``(B * Hk * splits, key tiles)``."""
        def grid(meta):
            return (self.batch * self.kv_heads * splits,
                    grid_tiles(self.seq_k, meta["BLOCK_N"], self.cu_seqlens_k, self.max_seqlen_k))
        return grid
