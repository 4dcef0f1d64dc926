"""``python -m benchmarks``: op and end-to-end benchmarks, written as JSON, markdown and PNG plots.

    PYTHONPATH=. python -m benchmarks --quick      # on a GPU box: ~5 minutes on an H100
    PYTHONPATH=. python -m benchmarks              # full sweep
    python -m benchmarks --smoke --out /tmp/bench  # tiny shapes: proves the harness, times nothing

Without CUDA the run is always a smoke run, on the CPU under Triton's interpreter.  Exit status: 0
when every figure was measured or reported missing/skipped/oom/unreliable with a reason; 1 when any
provider failed, or one of ours (or eager) disagrees with the reference; 2 for bad arguments; 130
when interrupted before anything was measured.

The JSON and markdown are rewritten after the ceilings and after every op and every model provider,
marked ``"complete": false`` with ``"interrupted": "partial: written after <op>; ..."``, so a run
killed outright (SIGKILL) keeps what it measured; the final write adds the plots and sets
``"complete": true`` (a SIGTERM or Ctrl-C still gets a final write, marked incomplete).
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class Terminated(BaseException):
    """SIGTERM arrived: stop measuring, write what was measured."""


def _terminate(signum, frame):
    raise Terminated()


# Shown by --help: plain text (the module docstring is reST, for the docs).
DESCRIPTION = ("Op and end-to-end benchmarks of llama_kernels against eager PyTorch, torch.compile, "
               "Liger-Kernel, SDPA and flash-attn, written as JSON, markdown and PNG plots. Without "
               "CUDA the run is a smoke run on the CPU (Triton interpreter) whose timings mean nothing.")
EPILOG = ("exit status: 0 all figures measured or reported missing/skipped with a reason; 1 a provider "
          "failed or a kernel disagrees with the reference; 2 bad arguments; 130 interrupted.")


def op_names() -> tuple[str, ...]:
    """Names ``--ops`` accepts: those of :data:`benchmarks.ops.OPS`.

    Imported on first use: benchmarks.ops needs torch but not triton, so this is safe before
    ``TRITON_INTERPRET`` is chosen.
    """
    from .ops import OPS

    return tuple(spec.name for spec in OPS)


def _name_list(text: str, known, what: str) -> tuple[str, ...]:
    """Comma-separated names from ``text``, each one of ``known``; ``what`` names them in the error."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} name(s) {', '.join(repr(n) for n in unknown)}; known: {', '.join(known)}")
    return names


def op_list(text: str) -> tuple[str, ...]:
    """``--ops`` value: comma-separated names, each one of :func:`op_names`."""
    return _name_list(text, op_names(), "op")


def shape_list(text: str) -> tuple[str, ...]:
    """``--shapes`` value: comma-separated model shape names, each a key of
    :data:`benchmarks.ops.MODELS` (imported on first use, as in :func:`op_names`)."""
    from .ops import MODELS

    return _name_list(text, tuple(MODELS), "shape")


def family_name(text: str) -> str:
    """``--family`` value: one key of :data:`benchmarks.bench_model.FAMILIES` (imported on first use:
    it needs torch, not triton)."""
    from .bench_model import FAMILIES

    if text not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown model family {text!r}; known: {', '.join(FAMILIES)}")
    return text


def format_list(text: str) -> tuple[str, ...]:
    """``--quantize`` value: comma-separated ``8``, ``4``, ``4g64``... -> weight format names
    (:func:`benchmarks.bench_quantized.parse_formats`; imported on first use: torch only)."""
    from .bench_quantized import parse_formats

    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PARTS = ("ops", "model", "batches")
# Run only when named in --only: training-step memory on fake tensors (benchmarks/bench_memory.py,
# CPU-heavy, exact without a GPU; its own files, <cpu|gpu>-fake-memory-<date>.*).
OPT_IN_PARTS = ("memory",)


def part_list(text: str) -> tuple[str, ...]:
    """``--only`` value: comma-separated parts of the run, each one of :data:`PARTS` or :data:`OPT_IN_PARTS`."""
    return _name_list(text, PARTS + OPT_IN_PARTS, "part")


def token_list(text: str) -> tuple[int, ...]:
    """``--tokens`` value: comma-separated whole numbers >= 1 (a 0-token shape has nothing to time)."""
    items = [item.strip() for item in text.split(",")]
    try:
        counts = tuple(int(item) for item in items)
    except ValueError:
        counts = ()
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers >= 1 (e.g. 2048,8192), got {text!r}")
    return counts


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks`` (and, with its ``prog``, of ``llama-kernels bench``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="few shapes, fewer repetitions (~5 min on an H100)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes, to test the harness (automatic without CUDA): timings mean nothing")
    p.add_argument("--only", type=part_list, metavar="PARTS",
                   help="comma-separated parts to run (default: all): ops (every op, varlen attention included), "
                        "model (LLaMA-3-8B-shaped, or --family's, training, prefill, decode), batches (transformers "
                        "LLaMA on padded and packed batches: padded generation, packed training); memory (only when "
                        "named: training-step memory at real model sizes on fake tensors, see --memory-*)")
    p.add_argument("--out", type=Path,
                   help="output folder (default benchmarks/results; for smoke runs a new temporary folder)")
    p.add_argument("--ops", type=op_list, metavar="NAMES",
                   help="comma-separated op names to run (default: all), e.g. rms_norm,swiglu")
    p.add_argument("--tokens", type=token_list, metavar="COUNTS",
                   help="comma-separated token counts >= 1 replacing the mode's sweep (ops only), e.g. 2048,8192")
    p.add_argument("--shapes", type=shape_list, metavar="NAMES",
                   help="comma-separated model shapes replacing the mode's (ops only; every op runs at each), "
                        "e.g. llama3-8b,smollm2-135m")
    p.add_argument("--family", type=family_name, default="llama", metavar="NAME",
                   help="the model part's model family (default llama: LLaMA-3-8B shapes, the reference model and "
                        "transformers' LLaMA); qwen3 (Qwen3-8B) or gemma2 (Gemma-2-9B): transformers' model of that "
                        "family only (hf, hf+ours, hf+compile, hf+liger); results named <stem>-NAME")
    p.add_argument("--quantize", type=format_list, metavar="FORMATS",
                   help="the model part measures the quantised comparison instead of its providers: the reference "
                        "LLaMA at its real depth (32 layers) with apply_kernels in bf16 (ours) and quantized to each "
                        "format (ours+int8, ours+int4-g128...: quantize_weights + apply_kernels), prefill and decode; "
                        "formats 8, 4 (groups of 128), 4g32, 4g64, 4g128, 4g256, e.g. 8,4; results named "
                        "<stem>-quantized (LLaMA only: not with --family)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile providers (default: yes, except in smoke mode)")
    from . import bench_memory  # torch only, no triton: safe before TRITON_INTERPRET is chosen

    bench_memory.add_arguments(p)
    return p


def parse_args(argv, prog: str = "python -m benchmarks"):
    """Parsed and validated arguments; argparse exits with status 2 and an ``error:`` line if bad."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.quantize and args.family != "llama":
        parser.error("--quantize measures the reference LLaMA model: it does not take --family")
    return args


def problems(records: list) -> list:
    """The records that make a run fail (exit status 1).

    Every ``failed`` record, whichever the provider: a provider that cannot run here is reported
    ``missing`` or ``skipped`` (and a full card ``oom``) with its reason, so ``failed`` is an
    unexpected exception, e.g. eager itself breaking on a shape, which a run must not hide.  A
    ``mismatch`` counts for ours (and its variants ``ours-*``, e.g. the portable attention forward)
    and eager only: the reference is ours when it ran, so a third-party provider that disagrees
    alone is a finding about that provider, reported in the tables, not a failure of our kernels.
    """
    judged = ("ours", "hf+ours", "eager")
    return [r for r in records
            if r.status == "failed"
            or (r.status == "mismatch" and (r.provider in judged or r.provider.startswith(("ours-", "hf+ours-"))))]


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    """Run the benchmarks with command-line ``argv``; returns the exit status (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `llama-kernels bench -- --quick` passes the separator along
        argv = argv[1:]
    try:
        args = parse_args(argv, prog)
    except SystemExit as exc:  # bad arguments (argparse printed why) or --help: a status, not a raise
        return exc.code if isinstance(exc.code, int) else 2
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and "triton" not in sys.modules:
        # The kernels run on the CPU only under Triton's interpreter, chosen before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    memory_rc = None
    if args.only and "memory" in args.only:  # its own run and files (bench_memory.run), first
        from . import bench_memory

        memory_rc = bench_memory.run(args, on_gpu, RESULTS)
        args.only = tuple(part for part in args.only if part != "memory")
        if not args.only:
            return memory_rc
    from . import bench_batches, bench_model, bench_quantized, common, ops, report
    from .common import say

    mode = "smoke" if args.smoke or not on_gpu else "quick" if args.quick else "full"
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = common.make_settings(
        mode, device, args.compile,
        ops=args.ops, tokens=args.tokens, shapes=args.shapes,  # validated by the parser
        quantize=args.quantize or (),
    )
    if args.out is not None:
        out_dir = args.out
    elif mode != "smoke":
        out_dir = RESULTS
    else:  # smoke results are meaningless: never drop them into the committed results folder
        out_dir = Path(tempfile.mkdtemp(prefix="llama-kernels-bench-"))

    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        say("note: no GPU and TRITON_INTERPRET is not 1 (triton was imported first): "
            "'ours' runs the eager fallback")
    if settings.warning:
        say("!" * 100)
        say(settings.warning)
        say("!" * 100)
    env = report.environment(settings)
    date = datetime.date.today().isoformat()
    say(f"device: {env['device']['name']}; torch {env['versions']['torch']}, triton {env['versions']['triton']}; "
        f"mode {mode}; output to {out_dir}")

    records: list = []
    limits, interrupted = None, None
    stem = report.file_stem(settings, date)
    if args.family != "llama":  # another model: never overwrite the LLaMA run's files of the same day
        stem = f"{stem}-{args.family}"
    if settings.quantize:  # the quantised comparison's model part: never overwrite the plain run's files
        stem = f"{stem}-quantized"

    def make_report(interrupted: str | None, complete: bool) -> dict:
        common.add_speedups(records)
        return {
            "title": "llama_kernels benchmarks",
            "meaningful": settings.meaningful,
            "warning": settings.warning,
            "complete": complete,
            "interrupted": interrupted,
            "mode": mode,
            "date": date,
            "environment": env,
            "limits": limits,
            "settings": {"warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms, "host_reps": settings.host_reps,
                         "rotate_bytes": settings.rotate_bytes, "compile": settings.compile,
                         "timer": "triton.testing.do_bench median" if on_gpu else "host clock median (CPU)"},
            "model_family": args.family,
            "providers": {**ops.provider_notes(),
                          **(bench_quantized.provider_notes(settings.quantize) if settings.quantize
                             else bench_model.provider_notes(args.family)),
                          **bench_batches.provider_notes()},
            "quantize": list(settings.quantize),
            "ops": {s.name: s.note for s in ops.OPS},
            "wall_s": common.elapsed_s(),
        }

    def progress(label: str) -> None:
        # Rewritten after every op and every model provider: a run killed outright (a lease's
        # `timeout` ends in SIGKILL, which no handler sees) still leaves what it measured, marked
        # incomplete.  No plots here: they are slow and drawn once at the end.
        note = f"partial: written after {label}; the run had not finished"
        report.write_outputs(make_report(note, complete=False), records, out_dir, stem, plots=False)
        say(f"partial results ({len(records)} figures, after {label}) in {out_dir / stem}.json")

    # A run cut short (Ctrl-C, or `timeout` sending SIGTERM at a lease's end) still writes what it
    # measured.  The exception is a BaseException, so the per-provider `except Exception` blocks
    # let it through.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        limits = common.measure_limits(settings)
        progress("the ceilings")
        parts = args.only or PARTS
        if "ops" in parts:
            ops.run(settings, limits, records, progress)
        if "model" in parts and settings.quantize:  # the quantised comparison replaces the model part
            bench_quantized.run(settings, limits, records, progress)
        elif "model" in parts:
            bench_model.run(settings, limits, records, progress, family=args.family)
        if "batches" in parts:
            bench_batches.run(settings, limits, records, progress)
    except (KeyboardInterrupt, Terminated) as exc:
        interrupted = f"stopped early ({type(exc).__name__}): only the figures measured before are reported"
        say(interrupted)
        if limits is None:
            return 130
        # An op's record is listed before it is timed: the one being timed when the signal came
        # has no time, and is not a figure.
        records[:] = [r for r in records if not (r.status == "ok" and r.ms is None)]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    for path in report.write_outputs(make_report(interrupted, complete=interrupted is None), records, out_dir, stem):
        say(f"wrote {path}")

    # Exit status: the run completed (0), unless a provider failed or a kernel disagrees (1).
    bad = problems(records)
    counts: dict = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    say(f"done in {common.elapsed_s():.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in bad:
        say(f"PROBLEM: {r.describe()}")
    if settings.warning:
        say(settings.warning)
    rc = 1 if bad else 130 if interrupted else 0
    return rc if memory_rc in (None, 0) or rc == 1 else memory_rc


if __name__ == "__main__":
    sys.exit(main())
