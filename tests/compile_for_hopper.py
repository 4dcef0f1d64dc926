"""Compile every kernel the public ops launch for an H100 (sm_90), on a machine without a GPU.

The CPU interpreter runs the kernels' Python, not Triton's compiler: code that the interpreter
accepts can still fail to compile, or need more shared memory than a GPU has.  Here a stand-in
driver reports an sm_90 target and ``JITFunction.run`` compiles without launching (Triton's own
warm-up path), so calling the public ops on CPU tensors drives every launcher through Triton's
real compiler and ptxas, with the launchers' own block sizes and constexpr flags.  Outputs are
never computed.  Run as a script (``tests/test_hopper_compile.py`` does, in a subprocess); it
prints one line per compiled kernel: name, shared memory, registers, spilled bytes.
"""
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


compiled = []
_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append((self.fn.__name__, kernel))
    return kernel


def resource_usage(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return kernel.metadata.shared, int(regs), int(stack)


def main():
    driver.set_active(Sm90Driver())
    JITFunction.run = compile_only
    import llama_kernels as lk
    from llama_kernels.ops import attention, decode, rms_norm, rope, swiglu
    from llama_kernels.reference import rotary_cos_sin

    for module in (attention, decode, rms_norm, rope, swiglu):
        module.use_triton = lambda op, device: True  # CPU tensors, compiled for the GPU

    def grad(*tensors):
        return [t.requires_grad_() for t in tensors]

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden in (576, 4096, 5120):
            x, r = grad(torch.randn(8, hidden, dtype=dtype), torch.randn(8, hidden, dtype=dtype))
            w = torch.ones(hidden, dtype=dtype, requires_grad=True)
            y, h = lk.rms_norm(x, w, residual=r)
            torch.autograd.grad((y.float().sum() + h.float().sum()), (x, w, r))
        gate, up = grad(*torch.randn(2, 8, 11008, dtype=dtype).unbind(0))
        torch.autograd.grad(lk.swiglu(gate, up).float().sum(), (gate, up))
        for d, interleaved in ((128, False), (64, True), (80, False)):
            q, k = grad(torch.randn(2, 16, 32, d, dtype=dtype), torch.randn(2, 16, 8, d, dtype=dtype))
            cos, sin = rotary_cos_sin(torch.arange(16), torch.rand(d // 2), dtype)
            q_rot, k_rot = lk.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, interleaved)
            torch.autograd.grad(q_rot.float().sum() + k_rot.float().sum(), (q, k))
        for d in (64, 128, 96):
            q, k, v = grad(*(torch.randn(1, 128, h, d, dtype=dtype) for h in (8, 2, 2)))
            o = lk.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            torch.autograd.grad(o.float().sum(), (q, k, v))
            with torch.no_grad():  # the split-KV decode path: one split, several, device lengths
                cache = torch.randn(2, 2, 4096, d, dtype=dtype)
                for seq_k in (64, 4096):
                    lk.flash_attention(torch.randn(2, 8, 1, d, dtype=dtype), cache[:, :, :seq_k], cache[:, :, :seq_k])
                lengths = torch.tensor([100, 4000], dtype=torch.int32)
                lk.flash_decode(torch.randn(2, 8, 1, d, dtype=dtype), cache, cache, lengths)

    failures = 0
    for name, kernel in compiled:
        shared, regs, spilled = resource_usage(kernel)
        over = shared > H100_SHARED_MEMORY
        failures += over
        print(f"{name:36s} shared {shared:6d}  regs {regs:3d}  spilled {spilled:4d}{'  TOO MUCH SHARED MEMORY' if over else ''}")
    print(f"{len(compiled)} kernels compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
