"""Helpers shared by every kernel file: when to launch Triton, argument checks, row layouts.

Nothing here launches a kernel.  Every public op follows the same steps, in this order:
validate its arguments (``check_*``: a ``TypeError``/``ValueError`` that names the argument;
attention first casts its inputs as autocast would, ``autocast_inputs``),
decide whether a Triton kernel can run (``use_triton``: CUDA, or CPU under ``TRITON_INTERPRET=1``;
otherwise the eager reference runs, with a :class:`KernelFallbackWarning`), then launch and record
the launch in :data:`LAUNCHES` so that tests can prove a kernel really ran.
"""
from __future__ import annotations

import collections
import math
import numbers
import os
import warnings

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

# Triton decides at `@triton.jit` time whether a kernel is interpreted, from this variable, so it
# is read once here, when the first kernel module imports us.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INTERPRET: tl.constexpr = tl.constexpr(INTERPRET)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# kernel name -> number of launches since import (or since the last `LAUNCHES.clear()`).
LAUNCHES: collections.Counter = collections.Counter()


class KernelFallbackWarning(UserWarning):
    """A public op ran its eager PyTorch reference because no Triton kernel can run here."""


def count_launch(kernel) -> None:
    """Record one launch of ``kernel`` (a ``@triton.jit`` function) in :data:`LAUNCHES`."""
    LAUNCHES[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1


def triton_runs_on(device) -> bool:
    """Whether Triton kernels run on ``device``: CUDA, or the CPU under the interpreter."""
    return device is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))


def is_abstract(*values) -> bool:
    """Whether any of ``values`` is a tensor without values: on the ``meta`` device, or a fake
    tensor (``torch._subclasses.FakeTensor``: FakeTensorMode, memory tracking at model sizes).

    Nothing may be read back from such a tensor (as under torch.compile or CUDA-graph capture),
    and no kernel may be launched on it: the ops run their fake implementations instead.
    """
    return any(isinstance(v, torch.Tensor) and (v.is_meta or isinstance(v, FakeTensor)) for v in values)


def values_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read back on the host now: not while torch.compile traces,
    not during CUDA-graph capture, never from a meta or fake tensor (:func:`is_abstract`)."""
    if torch.compiler.is_compiling() or is_abstract(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def use_triton(op: str, device: torch.device) -> bool:
    """True when Triton kernels can run on ``device``; otherwise warn that ``op`` falls back.

    ``meta`` tensors take the kernels' path too: they run the ops' fake implementations (shapes
    and dtypes, nothing launched; see :func:`compilable`), so a patched model can be planned or
    measured at any size.  Fake tensors follow the device they stand for.
    """
    if triton_runs_on(device) or (device is not None and device.type == "meta"):
        return True
    if torch.compiler.is_compiling():
        return False  # Dynamo cannot trace warnings.warn; eager calls and apply_kernels warn
    warnings.warn(
        f"llama_kernels.{op}: no Triton kernel can run on {device} tensors (a CUDA device, or the "
        "CPU with TRITON_INTERPRET=1 set before triton is imported, is needed); running the eager "
        "PyTorch reference instead",
        KernelFallbackWarning,
        stacklevel=3,
    )
    return False


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """Cast float32 ``x`` to ``dtype`` rounding to nearest even, as PyTorch and the GPU do.

    Kernels round every half-precision result through this.  Triton 3.6's interpreter truncates
    float32 -> bfloat16 (and computes bfloat16 arithmetic wrongly: keep the math in float32), so
    under the interpreter the rounding is done on the bits first, which makes the cast exact.
    """
    if _INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def row_tile_ptrs(base, rows, cols, inner, stride_outer, stride_inner, stride_col):
    """Pointers to the ``rows x cols`` tile of a tensor whose rows :func:`row_layout` described.

    Offsets are int64: rows x row stride passes 2**31 at training sizes (16k tokens x 2 x 14336).
    """
    rows = rows.to(tl.int64)
    starts = (rows // inner) * stride_outer + (rows % inner) * stride_inner
    return base + starts[:, None] + cols[None, :] * stride_col


def check_tensor(name: str, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES) -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``t`` is a tensor of an accepted dtype/rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        allowed = " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same(attr: str, **tensors) -> None:
    """Raise unless every tensor has the same ``attr`` ("device" -> ValueError, "dtype" -> TypeError)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(first, attr):
            error = TypeError if attr == "dtype" else ValueError
            raise error(
                f"{name} must have the same {attr} as {first_name}: "
                f"{first_name} is {getattr(first, attr)}, {name} is {getattr(t, attr)}"
            )


def check_float_arg(name: str, value, *, positive: bool = False, finite: bool = True) -> float:
    """Return ``value`` as a Python float, or raise an error that names ``name``.

    Any real number is accepted (``int``, ``float``, numpy scalars such as ``np.float32``: whatever
    registers as ``numbers.Real``); ``bool`` is refused (a flag passed by mistake), as is anything
    else (TypeError).  NaN and +-inf are refused (ValueError) unless ``finite=False``: no kernel
    argument means anything at either, and a NaN ``eps`` would only turn every output into NaN.
    ``positive`` also requires ``value > 0``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float (any real number), got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def autocast_inputs(*tensors):
    """``tensors`` cast as autocast casts the inputs of a matmul or of SDPA, when it is on.

    Under ``torch.autocast`` for the tensors' device type (CPU or CUDA) with a float16/bfloat16
    dtype, every floating tensor but float64 is cast to that dtype (differentiably: its gradient
    comes back in its own dtype); otherwise, or if any argument is not a tensor (validation will
    name it), everything is returned unchanged.  Attention calls this first, so that it takes what
    eager attention takes under autocast (e.g. float32 q, k after RoPE with float32 tables, and a
    bfloat16 v) and returns what it returns.  ``torch.is_autocast_enabled(device_type)`` traces
    under ``torch.compile`` (torch >= 2.4).
    """
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in (torch.float16, torch.bfloat16):
        return tensors
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def merged_row_dims(x: torch.Tensor) -> list:
    """The leading dims of ``x (..., N)`` as ``(size, stride)`` levels, outermost first: dims of
    size 1 dropped, neighbours merged where ``stride[i] == stride[i+1] * size[i+1]``."""
    merged = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    return merged


def row_layout(x: torch.Tensor):
    """Describe the rows of ``x (..., N)`` by two strided levels, without copying.

    Returns ``(x, inner, stride_outer, stride_inner, stride_col)``: row ``r`` of the flattened
    ``(-1, N)`` view starts at ``(r // inner) * stride_outer + (r % inner) * stride_inner``.  Leading
    dims merge when their strides allow it, so every 1-, 2- and 3-D tensor and every slice or
    transpose of a contiguous buffer qualifies; a tensor whose leading dims still need more than two
    levels (rare: e.g. a 4-D tensor sliced in two dims) is copied to contiguous first.
    """
    merged = merged_row_dims(x)
    if len(merged) > 2:
        x = x.contiguous()
        return row_layout(x)
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    (_, stride_outer), (inner, stride_inner) = merged
    return x, inner, stride_outer, stride_inner, x.stride(-1)


def compilable(name: str, fake):
    """Register a launcher as the custom operator ``llama_kernels::<name>``.

    ``torch.compile`` sees the operator as one opaque node whose output shapes come from ``fake``
    (no graph break, no tracing into Triton); eager calls skip the dispatcher (~10 us per call) and
    run the launcher directly, except on tensors without values (:func:`is_abstract`: meta and
    fake tensors), which go through the dispatcher to ``fake``: nothing is launched, and memory
    trackers see exactly the outputs the launcher would allocate.  The launcher must not mutate its
    inputs and needs type annotations; ``fake`` must allocate what the launcher returns.
    """

    def register(launcher):
        op = torch.library.custom_op(f"llama_kernels::{name}", launcher, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            if torch.compiler.is_compiling() or is_abstract(*args):
                return op(*args)
            return launcher(*args)

        call.__name__, call.__doc__, call.op = launcher.__name__, launcher.__doc__, op
        return call

    return register
