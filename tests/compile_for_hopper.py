"""Compile every kernel the public ops launch for an H100 (sm_90), on a machine without a GPU.

The CPU interpreter runs the kernels' Python, not Triton's compiler: code that the interpreter
accepts can still fail to compile, or need more shared memory than a GPU has.  Here a stand-in
driver reports an sm_90 target and ``JITFunction.run`` compiles without launching (Triton's own
warm-up path), so calling the public ops on CPU tensors drives every launcher through Triton's
real compiler and ptxas, with the launchers' own block sizes and constexpr flags.  Outputs are
never computed.  Run as a script (``tests/test_hopper_compile.py`` does, in a subprocess); it
prints one line per compiled kernel: name, dtype, launch constants, shared memory, registers, spilled
bytes, the widths of its global loads (``ld 16B x4`` = four 16-byte vector loads in the PTX;
``cp.async`` = asynchronous copies to shared memory, i.e. a pipelined loop; ``tma`` = bulk tensor
copies), the shapes of its wgmma instructions (``wgmma n128 x4``: m64n128k16) and ``ws`` when
warp specialisation split it into warpgroups with their own register budgets (setmaxnreg).
Besides the launchers' own choices, every autotuning candidate of the attention kernels
(``attention_launch.CONFIGS``) is compiled in bfloat16 at head dims 64, 128 and 256, for both
backward schedules, with the TMA forward, and on packed (varlen) sequences, and at 128 also with a
sliding window and a softcap (the WINDOW and SOFTCAP specialisations; the launchers' own choices
for them are compiled in bfloat16 at D = 64 and 128, dense and packed, decode included).

It exits 1 when a kernel needs more shared memory than an H100 has, or spills registers in half
precision: the memory-bound kernels (RMSNorm, SwiGLU, RoPE) must run at copy bandwidth, and the
attention kernels at tensor-core rate, and a spill is local-memory traffic on top of either.
"""
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

H100_SHARED_MEMORY = 232448
# Kernels that must not spill in half precision.
NO_SPILL = ("rms_norm_", "swiglu_", "rope_", "attention_", "cross_entropy_")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Sm90Driver:
    """Just enough of a driver for Triton to target sm_90 without a GPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty


compiled = []  # (kernel name, dtype, case, launch constants, compiled kernel)
current_dtype = current_case = "?"  # what main() is compiling for: dtype, shape
_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    constants = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    compiled.append((self.fn.__name__, current_dtype, current_case, constants, kernel))
    return kernel


def resource_usage(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return kernel.metadata.shared, int(regs), int(stack)


def global_loads(ptx: str) -> str:
    """Widths of the global loads in ``ptx``, e.g. ``ld 16B x4, 4B x1; cp.async 16B x2``."""
    widths: dict = {}
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-z_]+\d*)*?(?:\.v(\d))?\.[bufs](\d+)\b", ptx):
        key = ("ld", int(vec or 1) * int(bits) // 8)
        widths[key] = widths.get(key, 0) + 1
    for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_]+)*\s+\[[^]]+\],\s*\[[^]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        key = ("cp.async", int(size, 0))
        widths[key] = widths.get(key, 0) + 1
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx))
    if tma:
        widths[("tma", 0)] = tma
    parts = {}
    for (kind, nbytes), count in sorted(widths.items(), key=lambda item: (item[0][0], -item[0][1])):
        parts.setdefault(kind, []).append(f"{nbytes}B x{count}" if nbytes else f"x{count}")
    return "; ".join(f"{kind} {', '.join(items)}" for kind, items in parts.items()) or "no global loads"


def matmuls(ptx: str) -> str:
    """The wgmma shapes in ``ptx`` (``n128 x4`` = four m64n128k16 instructions; ``mma`` for the
    pre-Hopper tensor-core instructions) and ``ws`` when warpgroups set their own register budgets."""
    shapes: dict = {}
    for n in re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx):
        shapes[int(n)] = shapes.get(int(n), 0) + 1
    parts = [f"n{n} x{count}" for n, count in sorted(shapes.items(), reverse=True)]
    text = ("wgmma " + ", ".join(parts)) if parts else ""
    mma = len(re.findall(r"\bmma\.sync\.aligned", ptx))
    if mma:
        text += f"{'; ' if text else ''}mma x{mma}"
    if "setmaxnreg" in ptx:
        text += " ws"
    return text


def compile_attention_candidates(lk):
    """Every autotuning candidate of every attention kernel, through the public op: the launchers
    are made to see one candidate at a time (the launch path they take for small problems)."""
    import torch

    global current_case
    from llama_kernels.ops import attention_fwd, attention_launch

    every = attention_launch.candidates
    attention_fwd.USE_TMA = True
    try:
        for index in range(max(len(c) for c in attention_launch.CONFIGS.values())):
            attention_launch.candidates = lambda kind, block_d, size, varlen=False, softcap=False: [
                every(kind, block_d, size, varlen, softcap)[
                    min(index, len(every(kind, block_d, size, varlen, softcap)) - 1)]]
            for d in (64, 128, 256):
                # Sliding window + softcap (WINDOW, SOFTCAP: the most registers) at D = 128, dense.
                options = ({}, {"window": 32, "softcap": 50.0}) if d == 128 else ({},)
                for deterministic, varlen, extra in itertools.product((False, True), (False, True), options):
                    if extra and varlen:
                        continue
                    current_case = (f"D {d}, 32/8 heads{', det' if deterministic else ''}"
                                    f"{', varlen' if varlen else ''}{', w32 cap50' if extra else ''}")
                    q, k, v = (torch.randn(1, 256, h, d, dtype=torch.bfloat16).requires_grad_()
                               for h in (32, 8, 8))
                    torch.use_deterministic_algorithms(deterministic)
                    packed = dict(cu_seqlens_q=torch.tensor([0, 100, 256], dtype=torch.int32),
                                  max_seqlen_q=156, max_seqlen_k=156) if varlen else {}
                    o = lk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           **packed, **extra)
                    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    finally:
        torch.use_deterministic_algorithms(False)
        attention_launch.candidates = every
        attention_fwd.USE_TMA = None


def compile_window_softcap(lk, backward, d, dtype, q, k, v, cache):
    """The sliding-window (WINDOW) and softcap (SOFTCAP) specialisations of every attention
    kernel: forward (portable, and TMA in half precision), both backward schedules, packed
    sequences, the decode path and flash_decode; both options together (the most registers), and
    each alone for the dense training kernels at D = 128."""
    global current_case
    from llama_kernels.ops import attention_fwd

    options = [(32, 50.0)] + ([(32, None), (None, 50.0)] if d == 128 else [])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    for window, softcap in options:
        extra = dict(window=window, softcap=softcap)
        current_case = f"D {d}, 8/2 heads, w{window} cap{softcap}"
        for deterministic, tma in ((False, False), (True, dtype != torch.float32)):
            torch.use_deterministic_algorithms(deterministic)
            attention_fwd.USE_TMA = tma or None
            try:
                backward([lk.flash_attention(qt, kt, vt, **extra)], (q, k, v))
            finally:
                torch.use_deterministic_algorithms(False)
                attention_fwd.USE_TMA = None
    extra = dict(window=32, softcap=50.0)
    current_case = f"D {d}, 8/2 heads, w32 cap50, varlen"
    cu = torch.tensor([0, 100, 128], dtype=torch.int32)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            backward([lk.flash_attention(qt, kt, vt, cu_seqlens_q=cu, max_seqlen_q=100, max_seqlen_k=100,
                                         **extra)], (q, k, v))
        finally:
            torch.use_deterministic_algorithms(False)
    current_case = f"D {d}, 8/2 heads, w32 cap50, decode"
    with torch.no_grad():
        lk.flash_attention(torch.randn(2, 8, 1, d, dtype=dtype), cache, cache, **extra)
        lk.flash_decode(torch.randn(2, 8, 1, d, dtype=dtype), cache, cache,
                        torch.tensor([100, 4000], dtype=torch.int32),
                        cache_leftpad=torch.tensor([0, 7], dtype=torch.int32), **extra)
        lk.flash_attention(torch.randn(1, 8, 2, d, dtype=dtype), cache[:1, :, :4000], cache[:1, :, :4000],
                           cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 100, 4000], dtype=torch.int32),
                           max_seqlen_q=1, max_seqlen_k=3900, **extra)


def main():
    driver.set_active(Sm90Driver())
    JITFunction.run = compile_only
    import llama_kernels as lk
    from llama_kernels.ops import attention, cross_entropy, decode, rms_norm, rope, swiglu
    from llama_kernels.reference import rotary_cos_sin

    for module in (attention, cross_entropy, decode, rms_norm, rope, swiglu):
        module.use_triton = lambda op, device: True  # CPU tensors, compiled for the GPU

    def grad(*tensors):
        return [t.requires_grad_() for t in tensors]

    def backward(outputs, inputs):
        # Random cotangents, laid out like the outputs: what a training step feeds the backward
        # (the gradient of a plain sum is a stride-0 expand, which no real backward sees).
        outputs = [o for o in outputs if o is not None]
        torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs])

    global current_dtype, current_case
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        current_dtype = str(dtype).replace("torch.", "")
        # Row counts are multiples of 16, as real token counts are (Triton specialises on it).
        for hidden in (576, 4096, 5120):  # SmolLM2, LLaMA-3-8B, LLaMA-2-13B
            current_case = f"hidden {hidden}"
            x, r = grad(torch.randn(16, hidden, dtype=dtype), torch.randn(16, hidden, dtype=dtype))
            w = torch.ones(hidden, dtype=dtype, requires_grad=True)
            backward([lk.rms_norm(x, w)], (x, w))
            backward(lk.rms_norm(x, w, residual=r), (x, w, r))
            current_case = f"hidden {hidden} gemma"  # Gemma's (1 + w), one rounding, float32 weight
            w32 = torch.zeros(hidden, dtype=torch.float32, requires_grad=True)
            backward([lk.rms_norm(x, w32, offset=1.0, casting="gemma")], (x, w32))
            backward(lk.rms_norm(x, w32, residual=r, offset=1.0, casting="gemma"), (x, w32, r))
        for d in (64, 128, 256):  # per-head q/k norms: Qwen3's (B, T, H, D), Gemma 3's (B, H, T, D)
            current_case = f"q/k norm D {d}"
            q = grad(torch.randn(2, 16, 8, d, dtype=dtype))[0]
            w = torch.ones(d, dtype=dtype, requires_grad=True)
            backward([lk.rms_norm(q, w)], (q, w))
            backward([lk.rms_norm(q.transpose(1, 2), w, offset=1.0, casting="gemma")], (q, w))
        for width in (11008, 14336):  # LLaMA-2-7B, LLaMA-3-8B
            current_case = f"width {width}"
            gate, up = grad(*torch.randn(2, 16, width, dtype=dtype).unbind(0))
            backward([lk.swiglu(gate, up)], (gate, up))
        for width in (9216, 16384):  # GeGLU: Gemma 2 2B, Gemma 7B
            current_case = f"geglu width {width}"
            gate, up = grad(*torch.randn(2, 16, width, dtype=dtype).unbind(0))
            backward([lk.geglu(gate, up)], (gate, up))
        for bias, smoothing in ((False, 0.0), (True, 0.1)):  # LLaMA-3's vocabulary (H is immaterial)
            current_case = f"vocab 128256{' bias' if bias else ''}{' smoothing' if smoothing else ''}"
            h, w = grad(torch.randn(16, 64, dtype=dtype), torch.randn(128256, 64, dtype=dtype))
            b = grad(torch.randn(128256, dtype=dtype))[0] if bias else None
            target = torch.randint(0, 128256, (16,))
            loss = lk.fused_linear_cross_entropy(h, w, target, b, label_smoothing=smoothing, reduction="none")
            backward([loss], (h, w) + ((b,) if bias else ()))
        for d, interleaved in ((128, False), (64, True), (80, False)):
            current_case = f"D {d}{' interleaved' if interleaved else ''}, 32/8 heads"
            q, k = grad(torch.randn(2, 16, 32, d, dtype=dtype), torch.randn(2, 16, 8, d, dtype=dtype))
            cos, sin = rotary_cos_sin(torch.arange(16), torch.rand(d // 2), dtype)
            backward(lk.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, interleaved), (q, k))
        for d in (64, 128, 96):
            current_case = f"D {d}, 8/2 heads"
            q, k, v = grad(*(torch.randn(1, 128, h, d, dtype=dtype) for h in (8, 2, 2)))
            backward([lk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))], (q, k, v))
            with torch.no_grad():  # the split-KV decode path: one split, several, device lengths
                cache = torch.randn(2, 2, 4096, d, dtype=dtype)
                for seq_k in (64, 4096):
                    lk.flash_attention(torch.randn(2, 8, 1, d, dtype=dtype), cache[:, :, :seq_k], cache[:, :, :seq_k])
                lengths = torch.tensor([100, 4000], dtype=torch.int32)
                lk.flash_decode(torch.randn(2, 8, 1, d, dtype=dtype), cache, cache, lengths,
                                cache_leftpad=torch.tensor([0, 7], dtype=torch.int32))
            # Packed sequences, both backward schedules, and their decode path.
            current_case = f"D {d}, 8/2 heads, varlen"
            cu = torch.tensor([0, 100, 128], dtype=torch.int32)
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic)
                backward([lk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             cu_seqlens_q=cu, max_seqlen_q=100, max_seqlen_k=100)], (q, k, v))
            torch.use_deterministic_algorithms(False)
            with torch.no_grad():
                lk.flash_attention(torch.randn(1, 8, 2, d, dtype=dtype), cache[:1, :, :4000], cache[:1, :, :4000],
                                   cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 100, 4000], dtype=torch.int32),
                                   max_seqlen_q=1, max_seqlen_k=3900)
            if dtype == torch.bfloat16 and d != 96:  # the registers of float16's; 96 pads to 128
                compile_window_softcap(lk, backward, d, dtype, q, k, v, cache)

    current_dtype = "bfloat16"
    compile_attention_candidates(lk)

    failures = 0
    seen = set()
    for name, dtype, case, constants, kernel in compiled:
        config = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constants.items())
        if id(kernel) in seen:  # the same specialisation launched twice
            continue
        seen.add(id(kernel))
        ptx = kernel.asm["ptx"]
        shared, regs, spilled = resource_usage(kernel)
        problems = []
        if shared > H100_SHARED_MEMORY:
            problems.append("TOO MUCH SHARED MEMORY")
        if spilled and dtype != "float32" and name.startswith(NO_SPILL):
            problems.append("SPILLS IN HALF PRECISION")
        failures += bool(problems)
        print(f"{name:32s} {dtype:8s} {case:26s} shared {shared:6d}  regs {regs:3d}  spilled {spilled:4d}  "
              f"{global_loads(ptx)}  {matmuls(ptx)}  [{config}]{'  ' + ', '.join(problems) if problems else ''}")
    print(f"{len(seen)} kernel specialisations compiled for sm_90, {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
