"""Compile every kernel the public ops launch for a GPU target, on a machine without a GPU.

The CPU interpreter runs the kernels' Python, not Triton's compiler: code that the interpreter
accepts can still fail to compile, or need more shared memory or threads than a GPU has.  Here a
stand-in driver reports a target (an architecture and its published limits, ``TARGETS``) and
``JITFunction.run`` compiles without launching (Triton's own warm-up path), so calling the public
ops on CPU tensors drives every launcher through Triton's real compiler (ptxas for NVIDIA, the
wheel's LLVM and lld for AMD), with the launchers' own choices: the tiles they pick from the
device's limits (``llama_kernels.ops.device``), which read the stand-in's limits as they read a
real GPU's.  Outputs are never computed.

Usage::

    python tools/compile_matrix.py [--set ci|full] [--jobs N] TARGET [TARGET ...]   # or: all

``--set ci`` (the default; ``tests/test_compile_matrix.py`` runs it for every target): the
launchers' own choices at LLaMA-3-8B, SmolLM2 and Gemma shapes in bfloat16 and a few in float32,
attention at head dims 64/128/256 (both backward schedules, packed sequences, sliding window +
softcap), decode at 16 and 64 rows per KV head, the quantised linear (int8, int4 in groups of 32
and 128) at LLaMA-3-8B's projections: decode at 1 and 16 rows (split-K), a prefill of 512, with
and without bias, forward and backward.  ``--set full`` (``make compile-matrix``): every dtype and
shape of the old sm_90 report, every quantised format at five row counts, and every autotuning
candidate of the attention kernels (``llama_kernels.ops.attention.configs.CONFIGS``) and every
launch candidate of the quantised linear, one at a time.

One line per compiled kernel: name, dtype, case, shared memory, registers (NVIDIA; VGPRs on
AMD), spilled bytes (NVIDIA local memory; AMD scratch), the widths of its global loads (``ld 16B
x4``; ``cp.async``: asynchronous copies into shared memory, a pipelined loop; ``tma``: bulk tensor
copies) and its matrix instructions (``wgmma n128 x4``: m64n128k16 on Hopper; ``mma``; ``tcgen05``
on Blackwell; ``mfma`` on AMD; ``ws``: warp specialisation), then its launch constants.  A
candidate that the launcher refused for not fitting the target prints as ``pruned``.

It exits 1 when a launched kernel needs more shared memory or threads than the target has, or a
half-precision memory-bound or attention kernel spills more than ``SPILL_BOUND`` bytes (sm_90:
none, in every candidate; other targets: at most 16 bytes, in the launchers' own choices).
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_kernels.ops import registry  # noqa: E402
from llama_kernels.ops.device import PUBLISHED_LIMITS  # noqa: E402

# target -> (backend, arch as GPUTarget takes it, warp size, GPUs); limits: PUBLISHED_LIMITS.
TARGETS = {
    "sm_80": ("cuda", 80, 32, "A100"),
    "sm_86": ("cuda", 86, 32, "RTX 3090, A10, A40"),
    "sm_89": ("cuda", 89, 32, "RTX 4090, L4, L40S"),
    "sm_90": ("cuda", 90, 32, "H100, H200"),
    "sm_100": ("cuda", 100, 32, "B200"),
    "sm_120": ("cuda", 120, 32, "RTX 5090"),
    "gfx942": ("hip", "gfx942", 64, "MI300X, MI325X"),
    "gfx90a": ("hip", "gfx90a", 64, "MI210, MI250X"),
    "gfx950": ("hip", "gfx950", 64, "MI350X, MI355X"),
}
MAX_THREADS = 1024
# Kernels that must not spill in half precision (the memory-bound ones must run at copy
# bandwidth, attention at tensor-core rate): bytes of spill allowed in the launchers' own
# choices, per target.  sm_90 holds every candidate to zero.  Elsewhere 16 bytes (two 8-byte
# values): Triton 3.9's ptxas (CUDA 12.9/13) spills 8 bytes in a few decode specialisations on
# sm_80 that Triton 3.6's compiles clean; everything else is at zero on both.
NO_SPILL = registry.KERNEL_PREFIXES  # every op's kernels
SPILL_BOUND = {name: 0 if name == "sm_90" else 16 for name in TARGETS}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class StandInDriver:
    """Just enough of a driver for Triton to target ``name`` without a GPU: the target, and the
    device properties Triton's own driver reports (``utils.get_device_properties``)."""

    def __init__(self, name):
        self.name = name
        backend, arch, warp_size, _ = TARGETS[name]
        self.target = GPUTarget(backend, arch, warp_size)
        limits = PUBLISHED_LIMITS[name]
        props = {"max_shared_mem": limits["shared_memory"], "multiprocessor_count": limits["multiprocessors"],
                 "warpSize": warp_size, "max_num_regs": 65536}
        if backend == "hip":
            props["arch"] = arch
        self.utils = type("Utils", (), {"get_device_properties": staticmethod(lambda device: dict(props))})()

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty


compiled = []  # (kernel name, dtype, case, launch constants, compiled kernel or None if pruned)
current_dtype = current_case = "?"  # what is being compiled: dtype, shape
sweeping = False  # compiling autotuning candidates one at a time (not the launchers' own choices)
_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    if not warmup:  # a launch (the launchers' fit checks compile with warmup=True: not recorded)
        constants = {}
        for k, v in kwargs.items():
            if hasattr(v, "_asdict"):  # a kernel's compiled description (SPEC): its fields
                constants.update(v._asdict())
            elif k.isupper() or k in ("num_warps", "num_stages"):
                constants[k] = v
        compiled.append((self.fn.__name__, current_dtype, current_case, constants, kernel, sweeping))
    return kernel


def resource_usage(kernel):
    """``(shared bytes, registers, spilled bytes)`` of a compiled kernel."""
    if "amdgcn" in kernel.asm:
        asm = kernel.asm["amdgcn"]
        vgprs = int(re.search(r"\.vgpr_count:\s*(\d+)", asm).group(1))
        scratch = max(int(n) for n in re.findall(r"; ScratchSize: (\d+)", asm) or ["0"])
        return kernel.metadata.shared, vgprs, scratch
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return kernel.metadata.shared, int(regs), int(stack)


def _counted(widths):
    parts = {}
    for (kind, nbytes), count in sorted(widths.items(), key=lambda item: (item[0][0], -item[0][1])):
        parts.setdefault(kind, []).append(f"{nbytes}B x{count}" if nbytes else f"x{count}")
    return "; ".join(f"{kind} {', '.join(items)}" for kind, items in parts.items()) or "no global loads"


def global_loads(kernel) -> str:
    """Widths of the global loads, e.g. ``ld 16B x4, 4B x1; cp.async 16B x2``."""
    widths: dict = {}
    if "amdgcn" in kernel.asm:
        sizes = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4,
                 "b32": 4, "ushort": 2, "short_d16": 2, "u16": 2, "ubyte": 1, "u8": 1}
        for kind, size in re.findall(r"\b(global|buffer)_load_(?:lds_)?([a-z0-9_]+)", kernel.asm["amdgcn"]):
            key = ("ld" if kind == "global" else "buffer", sizes.get(size, 0))
            widths[key] = widths.get(key, 0) + 1
        return _counted(widths)
    ptx = kernel.asm["ptx"]
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-z_]+\d*)*?(?:\.v(\d))?\.[bufs](\d+)\b", ptx):
        key = ("ld", int(vec or 1) * int(bits) // 8)
        widths[key] = widths.get(key, 0) + 1
    # cp.async.c{a,g}.shared.global[.modifiers] [dst], [src], size: the copy's size in bytes
    copies = r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_]+)*\s+\[[^]]+\],\s*\[[^]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
    for size in re.findall(copies, ptx):
        key = ("cp.async", int(size, 0))
        widths[key] = widths.get(key, 0) + 1
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx))
    if tma:
        widths[("tma", 0)] = tma
    return _counted(widths)


def matmuls(kernel) -> str:
    """The matrix instructions: wgmma shapes (``n128 x4`` = four m64n128k16), ``mma`` (pre-Hopper
    tensor cores), ``tcgen05`` (Blackwell), ``mfma`` (AMD), and ``ws`` when warpgroups set their own
    register budgets (warp specialisation)."""
    if "amdgcn" in kernel.asm:
        mfma = len(re.findall(r"\bv_mfma_", kernel.asm["amdgcn"]))
        return f"mfma x{mfma}" if mfma else ""
    ptx = kernel.asm["ptx"]
    shapes: dict = {}
    for n in re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx):
        shapes[int(n)] = shapes.get(int(n), 0) + 1
    parts = [f"n{n} x{count}" for n, count in sorted(shapes.items(), reverse=True)]
    text = ("wgmma " + ", ".join(parts)) if parts else ""
    for name, pattern in (("mma", r"\bmma\.sync\.aligned"), ("tcgen05", r"\btcgen05\.mma\.")):
        count = len(re.findall(pattern, ptx))
        if count:
            text += f"{'; ' if text else ''}{name} x{count}"
    if "setmaxnreg" in ptx:
        text += " ws"
    return text


def grad(*tensors):
    return [t.requires_grad_() for t in tensors]


def backward(outputs, inputs):
    # Random cotangents, laid out like the outputs: what a training step feeds the backward
    # (the gradient of a plain sum is a stride-0 expand, which no real backward sees).
    outputs = [o for o in outputs if o is not None]
    torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs])


def case(dtype, text):
    global current_dtype, current_case
    current_dtype, current_case = str(dtype).replace("torch.", ""), text


def pruned(kernel_name, error):
    """Record a candidate the launcher refused (it does not fit the target)."""
    compiled.append((kernel_name, current_dtype, current_case, {"error": str(error).split(";")[0]}, None,
                     sweeping))


def compile_row_ops(lk, dtype, hiddens, qk_dims, widths, geglu_widths, vocab_cases, rope_cases):
    """RMSNorm (LLaMA and Gemma casting, residual, per-head q/k norms), SwiGLU, GeGLU, RoPE and the
    fused cross-entropy, forward and backward.  Row counts are multiples of 16, as real token
    counts are (Triton specialises on it)."""
    from llama_kernels.reference import rotary_cos_sin

    for hidden in hiddens:
        case(dtype, f"hidden {hidden}")
        x, r = grad(torch.randn(16, hidden, dtype=dtype), torch.randn(16, hidden, dtype=dtype))
        w = torch.ones(hidden, dtype=dtype, requires_grad=True)
        backward([lk.rms_norm(x, w)], (x, w))
        backward(lk.rms_norm(x, w, residual=r), (x, w, r))
        case(dtype, f"hidden {hidden} gemma")  # Gemma's (1 + w), one rounding, float32 weight
        w32 = torch.zeros(hidden, dtype=torch.float32, requires_grad=True)
        backward([lk.rms_norm(x, w32, offset=1.0, casting="gemma")], (x, w32))
        backward(lk.rms_norm(x, w32, residual=r, offset=1.0, casting="gemma"), (x, w32, r))
    for d in qk_dims:  # per-head q/k norms: Qwen3's (B, T, H, D), Gemma 3's (B, H, T, D)
        case(dtype, f"q/k norm D {d}")
        q = grad(torch.randn(2, 16, 8, d, dtype=dtype))[0]
        w = torch.ones(d, dtype=dtype, requires_grad=True)
        backward([lk.rms_norm(q, w)], (q, w))
        backward([lk.rms_norm(q.transpose(1, 2), w, offset=1.0, casting="gemma")], (q, w))
    for width in widths:
        case(dtype, f"width {width}")
        gate, up = grad(*torch.randn(2, 16, width, dtype=dtype).unbind(0))
        backward([lk.swiglu(gate, up)], (gate, up))
    for width in geglu_widths:
        case(dtype, f"geglu width {width}")
        gate, up = grad(*torch.randn(2, 16, width, dtype=dtype).unbind(0))
        backward([lk.geglu(gate, up)], (gate, up))
    for vocab, bias, smoothing in vocab_cases:  # the hidden size is immaterial to these kernels
        case(dtype, f"vocab {vocab}{' bias' if bias else ''}{' smoothing' if smoothing else ''}")
        h, w = grad(torch.randn(16, 64, dtype=dtype), torch.randn(vocab, 64, dtype=dtype))
        b = grad(torch.randn(vocab, dtype=dtype))[0] if bias else None
        target = torch.randint(0, vocab, (16,))
        loss = lk.fused_linear_cross_entropy(h, w, target, b, label_smoothing=smoothing, reduction="none")
        backward([loss], (h, w) + ((b,) if bias else ()))
    for d, interleaved in rope_cases:
        case(dtype, f"D {d}{' interleaved' if interleaved else ''}, 32/8 heads")
        q, k = grad(torch.randn(2, 16, 32, d, dtype=dtype), torch.randn(2, 16, 8, d, dtype=dtype))
        cos, sin = rotary_cos_sin(torch.arange(16), torch.rand(d // 2), dtype)
        backward(lk.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, interleaved), (q, k))


def quantized_weight(n, k, bits, group, dtype):
    """An ``(n, k)`` weight in ``quantize_weight``'s format (``llama_kernels.quantize``), as
    ``(qweight, scales, zeros)``: shapes and dtypes only (nothing is computed, and quantising a
    real weight of LLaMA's size takes a second)."""
    if bits == 8:
        return torch.zeros(n, k, dtype=torch.int8), torch.ones(n, dtype=dtype), None
    return (torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // group, dtype=dtype),
            torch.zeros(n, k // group, dtype=torch.uint8))


def compile_quantized(lk, dtype, cases):
    """quantized_linear: ``cases`` of ``(rows, N, K, bits, group, bias, backward)``; at most 16 rows
    the decode schedule (split-K: float32 partial sums, then their reduction), more the tiled one;
    ``backward``: the gradient to the activations too (else under ``no_grad``, as decoding runs)."""
    for rows, n, k, bits, group, bias, with_backward in cases:
        fmt = f"int{bits}" + (f" g{group}" if bits == 4 else "")
        case(dtype, f"{fmt} {rows}x{k}->{n}{' bias' if bias else ''}")
        qweight, scales, zeros = quantized_weight(n, k, bits, group, dtype)
        x = torch.randn(rows, k, dtype=dtype, requires_grad=with_backward)
        b = torch.randn(n, dtype=dtype, requires_grad=with_backward) if bias else None
        with torch.set_grad_enabled(with_backward):
            y = lk.quantized_linear(x, qweight, scales, zeros, b, bits=bits, group_size=group if bits == 4 else None)
        if with_backward:
            backward([y], (x,) + ((b,) if bias else ()))


def compile_quantized_candidates(lk):
    """Every launch candidate of the quantised linear (``_fwd_candidates``, ``_bwd_candidates``), one
    at a time (the launchers are made to see one), at a decode and a prefill shape of each format
    (the gate/up projection: the most column blocks); a candidate that does not fit the target is
    recorded as pruned."""
    global sweeping
    from llama_kernels.ops import quantized
    from llama_kernels.ops.device import NoFittingConfig

    fwd_candidates, bwd_candidates = quantized._fwd_candidates, quantized._bwd_candidates
    n, k = 14336, 4096
    sweeping = True
    try:
        for rows, (bits, group) in itertools.product((16, 512), ((8, 0), (4, 32), (4, 128))):
            fmt = f"int{bits}" + (f" g{group}" if bits == 4 else "")
            qweight, scales, zeros = quantized_weight(n, k, bits, group, torch.bfloat16)
            for which, configs in (("fwd", fwd_candidates(rows, n, k, bits, group)),
                                   ("bwd", bwd_candidates(rows, n, k))):
                for index, config in enumerate(configs):
                    case(torch.bfloat16, f"{fmt} {rows}x{k}->{n}, {which} candidate {index}")
                    setattr(quantized, f"_{which}_candidates", lambda *args, config=config: [config])
                    x = torch.randn(rows, k, dtype=torch.bfloat16, requires_grad=which == "bwd")
                    try:
                        with torch.set_grad_enabled(which == "bwd"):
                            y = lk.quantized_linear(x, qweight, scales, zeros, bits=bits, group_size=group or None)
                        if which == "bwd":
                            backward([y], (x,))
                    except NoFittingConfig:
                        pruned(f"quantized_linear_{which}_kernel", f"{config} does not fit")
                    finally:
                        quantized._fwd_candidates, quantized._bwd_candidates = fwd_candidates, bwd_candidates
    finally:
        sweeping = False


def compile_attention(lk, dtype, d, *, varlen=True, decode_rows=(), extra=None, heads=(8, 2)):
    """flash_attention forward and backward (both schedules) at head dim ``d``; packed sequences
    (``varlen``) with their decode path; ``decode_rows``: the split-KV decode path with that many
    query rows per KV head (one token of ``rows`` heads per KV head), one split and several, and
    flash_decode with device lengths and left padding.  ``extra``: flash_attention's ``window``
    and ``softcap``."""
    extra = extra or {}
    tag = (f", w{extra.get('window')} cap{extra.get('softcap')}" if extra else "")
    hq, hk = heads
    q, k, v = grad(*(torch.randn(1, 128, h, d, dtype=dtype) for h in (hq, hk, hk)))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    for deterministic in (False, True):
        case(dtype, f"D {d}, {hq}/{hk} heads{tag}{', det' if deterministic else ''}")
        torch.use_deterministic_algorithms(deterministic)
        try:
            backward([lk.flash_attention(qt, kt, vt, **extra)], (q, k, v))
        finally:
            torch.use_deterministic_algorithms(False)
    if varlen:
        cu = torch.tensor([0, 100, 128], dtype=torch.int32)
        for deterministic in (False, True):
            case(dtype, f"D {d}, {hq}/{hk} heads{tag}, varlen{', det' if deterministic else ''}")
            torch.use_deterministic_algorithms(deterministic)
            try:
                backward([lk.flash_attention(qt, kt, vt, cu_seqlens_q=cu, max_seqlen_q=100, max_seqlen_k=100,
                                             **extra)], (q, k, v))
            finally:
                torch.use_deterministic_algorithms(False)
    cache = torch.randn(2, 2, 4096, d, dtype=dtype)
    for rows in decode_rows:
        case(dtype, f"D {d}, decode {rows} rows{tag}")
        with torch.no_grad():
            query = torch.randn(2, 2 * rows, 1, d, dtype=dtype)
            for seq_k in (64, 4096):  # one split, several
                lk.flash_attention(query, cache[:, :, :seq_k], cache[:, :, :seq_k], **extra)
            lk.flash_decode(query, cache, cache, torch.tensor([100, 4000], dtype=torch.int32),
                            cache_leftpad=torch.tensor([0, 7], dtype=torch.int32), **extra)
            if varlen:
                lk.flash_attention(torch.randn(1, 2 * rows, 2, d, dtype=dtype), cache[:1, :, :4000],
                                   cache[:1, :, :4000], cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 100, 4000], dtype=torch.int32),
                                   max_seqlen_q=1, max_seqlen_k=3900, **extra)


def compile_tma(lk, dtype, d, extra=None):
    """The TMA + warp-specialised forward (the default on sm_90 only; forced here elsewhere to
    show it still compiles there, never launched by default)."""
    extra = extra or {}
    case(dtype, f"D {d}, 8/2 heads, tma{', w32 cap50' if extra else ''}")
    q, k, v = (torch.randn(1, h, 128, d, dtype=dtype) for h in (8, 2, 2))
    with lk.kernel_options(tma_forward=True), torch.no_grad():
        lk.flash_attention(q, k, v, **extra)


def compile_attention_candidates(lk):
    """Every autotuning candidate of every attention kernel, through the public op: the launchers
    are made to see one candidate at a time (the ``only_candidate`` option, the launch path they
    take for small problems); a candidate that does not fit the target is recorded as pruned."""
    global sweeping
    from llama_kernels.ops.attention import configs
    from llama_kernels.ops.device import NoFittingConfig, device_limits

    tma = device_limits(torch.device("cpu")).is_hopper or None
    sweeping = True
    try:
        tables = [configs.CONFIGS, *configs.FAMILY_CONFIGS.values()]
        for index in range(max(len(c) for table in tables for c in table.values())):
            for d in (64, 128, 256):
                # Sliding window + softcap (WINDOW, SOFTCAP: the most registers) at D = 128, dense.
                options = ({}, {"window": 32, "softcap": 50.0}) if d == 128 else ({},)
                for deterministic, varlen, extra in itertools.product((False, True), (False, True), options):
                    if extra and varlen:
                        continue
                    case(torch.bfloat16, f"D {d}, 32/8 heads{', det' if deterministic else ''}"
                                         f"{', varlen' if varlen else ''}{', w32 cap50' if extra else ''}")
                    q, k, v = (torch.randn(1, 256, h, d, dtype=torch.bfloat16).requires_grad_()
                               for h in (32, 8, 8))
                    packed = dict(cu_seqlens_q=torch.tensor([0, 100, 256], dtype=torch.int32),
                                  max_seqlen_q=156, max_seqlen_k=156) if varlen else {}
                    try:
                        with lk.kernel_options(only_candidate=index, tma_forward=tma,
                                               deterministic=deterministic):
                            o = lk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   **packed, **extra)
                            torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
                    except NoFittingConfig as error:
                        pruned(str(error).split(" of ")[1].split(" ")[0], error)
    finally:
        sweeping = False


def compile_ci(lk):
    """The representative set: the launchers' own choices at real models' shapes, each kind of
    launch once where the dtype does not change its tiles (float16 takes bfloat16's)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    # LLaMA-3-8B (4096, 14336, D 128, vocab 128256), SmolLM2 (576, D 64), Gemma 2 (GeGLU 9216, D 256,
    # window + softcap), Qwen3's q/k norms (D 128); float32 rows of 8192 (autocast's residual stream
    # at 70B widths: the most threads) and head dim 256 (the most shared memory).
    compile_row_ops(lk, bf16, (576, 4096), (128,), (14336,), (9216,), ((128256, False, 0.0),),
                    ((128, False), (64, True)))
    compile_row_ops(lk, fp32, (8192,), (), (), (), ((49152, True, 0.1),), ())
    compile_attention(lk, bf16, 64, varlen=False, decode_rows=(16,))
    compile_attention(lk, bf16, 128, decode_rows=(16, 64))
    compile_attention(lk, bf16, 256, varlen=False, decode_rows=(64,))
    compile_attention(lk, bf16, 256, varlen=False, decode_rows=(16,), extra=dict(window=32, softcap=50.0))
    compile_attention(lk, fp32, 256, varlen=False, decode_rows=(16,))
    if TARGETS[target_name()][:2] == ("cuda", 90):
        compile_tma(lk, bf16, 128)
    # Quantised LLaMA-3-8B projections (q/o 4096 -> 4096, k/v -> 1024, gate/up -> 14336, down
    # 14336 -> 4096): decode at 1 and 16 rows (split-K), a prefill of 512 rows, forward and backward.
    h, kv, inter = 4096, 1024, 14336
    compile_quantized(lk, bf16, (
        (1, h, h, 8, 0, False, False), (16, kv, h, 8, 0, True, True), (512, inter, h, 8, 0, True, True),
        (1, inter, h, 4, 128, False, False), (16, h, inter, 4, 128, True, True), (512, h, h, 4, 128, False, True),
        (1, h, h, 4, 32, False, False), (16, kv, h, 4, 32, True, False), (512, h, inter, 4, 32, True, True)))
    compile_quantized(lk, fp32, ((512, inter, h, 8, 0, True, True),))


def target_name():
    """The target this process compiles for (its stand-in driver's)."""
    return driver.active.name


def compile_full(lk):
    """Every dtype at every shape of the representative set and more, then every attention
    autotuning candidate."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        compile_row_ops(lk, dtype, (576, 2304, 4096, 5120, 8192), (64, 128, 256), (11008, 14336),
                        (9216, 16384), ((128256, False, 0.0), (128256, True, 0.1)),
                        ((128, False), (64, True), (80, False)))
        for d in (64, 128, 96, 256):
            compile_attention(lk, dtype, d, decode_rows=(1, 16, 64))
            if dtype != torch.float32 and d != 96:
                compile_attention(lk, dtype, d, decode_rows=(16,), extra=dict(window=32, softcap=50.0))
                for extra in ({"window": 32}, {"softcap": 50.0}):
                    compile_attention(lk, dtype, d, varlen=False, extra=extra)
                if TARGETS[target_name()][:2] == ("cuda", 90):
                    compile_tma(lk, dtype, d)
                    compile_tma(lk, dtype, d, extra=dict(window=32, softcap=50.0))
        # Every format at LLaMA-3-8B's four projection shapes (the k/v one with a bias, as Qwen2's),
        # decode to prefill.
        projections = ((4096, 4096, False), (1024, 4096, True), (14336, 4096, False), (4096, 14336, False))
        compile_quantized(lk, dtype, [
            (rows, n, k, bits, group, bias, rows > 1)
            for bits, group in ((8, 0), (4, 32), (4, 64), (4, 128), (4, 256))
            for rows in (1, 16, 64, 512, 2048) for n, k, bias in projections])
    compile_attention_candidates(lk)
    compile_quantized_candidates(lk)


def report(target):
    """Print one line per compiled kernel and a summary; return the number with problems."""
    backend, _, warp_size, gpus = TARGETS[target]
    limit = PUBLISHED_LIMITS[target]["shared_memory"]
    failures = spills = max_spill = pruned_count = 0
    seen = set()
    for name, dtype, where, constants, kernel, swept in compiled:
        if kernel is None:
            pruned_count += 1
            print(f"{name:32s} {dtype:8s} {where:34s} pruned: {constants['error']}")
            continue
        if id(kernel) in seen:  # the same specialisation launched twice
            continue
        seen.add(id(kernel))
        config = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constants.items())
        shared, regs, spilled = resource_usage(kernel)
        problems = []
        if shared > limit:
            problems.append("OVER SHARED MEMORY")
        if kernel.metadata.num_warps * warp_size > MAX_THREADS:
            problems.append("OVER THREADS")
        if spilled and dtype != "float32" and name.startswith(NO_SPILL):
            spills += 1
            max_spill = max(max_spill, spilled)
            if spilled > SPILL_BOUND[target] and (not swept or target == "sm_90"):
                problems.append("SPILLS IN HALF PRECISION")
        failures += bool(problems)
        print(f"{name:32s} {dtype:8s} {where:34s} shared {shared:6d}  regs {regs:3d}  spilled {spilled:4d}  "
              f"{global_loads(kernel)}  {matmuls(kernel)}  [{config}]{'  ' + ', '.join(problems) if problems else ''}")
    print(f"{target} ({gpus}; {limit} B shared memory, {warp_size}-wide warps): {len(seen)} kernel "
          f"specialisations compiled, {failures} with problems, {spills} spill in half precision "
          f"(max {max_spill} B), {pruned_count} candidates pruned")
    return failures


def run_target(target, which):
    driver.set_active(StandInDriver(target))
    JITFunction.run = compile_only
    import llama_kernels as lk
    from llama_kernels.ops import cross_entropy, glu, quantized, rms_norm, rope
    from llama_kernels.ops.attention import interface

    for module in (interface, cross_entropy, glu, quantized, rms_norm, rope):
        module.use_triton = lambda op, device: True  # CPU tensors, compiled for the GPU
    (compile_full if which == "full" else compile_ci)(lk)
    return 1 if report(target) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+", help=f"'all' or any of {', '.join(TARGETS)}")
    parser.add_argument("--set", dest="which", choices=("ci", "full"), default="ci")
    parser.add_argument("--jobs", type=int, default=1, help="targets compiled in parallel processes")
    args = parser.parse_args(argv)
    targets = list(TARGETS) if args.targets == ["all"] else args.targets
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    if len(targets) == 1:
        return run_target(targets[0], args.which)
    # One process per target (a process holds one driver), --jobs at a time, printed in order.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pending, running, status = list(targets), [], 0
    while pending or running:
        while pending and len(running) < args.jobs:
            target = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--set", args.which, target], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        proc = running.pop(0)
        out, _ = proc.communicate()
        print(out, end="", flush=True)
        status |= proc.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
