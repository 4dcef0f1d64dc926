"""``python -m benchmarks``: op and end-to-end benchmarks, written as JSON, markdown and PNG plots.

    PYTHONPATH=. python -m benchmarks --quick      # on a GPU box: ~5 minutes on an H100
    PYTHONPATH=. python -m benchmarks              # full sweep
    python -m benchmarks --smoke --out /tmp/bench  # tiny shapes: proves the harness, times nothing

Without CUDA the run is always a smoke run, on the CPU under Triton's interpreter.
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="few shapes, fewer repetitions (~5 min on an H100)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes, to test the harness (automatic without CUDA): timings mean nothing")
    p.add_argument("--only", choices=("ops", "model"), help="run only the op or only the model benchmarks")
    p.add_argument("--out", type=Path,
                   help="output folder (default benchmarks/results; for smoke runs a new temporary folder)")
    p.add_argument("--ops", help="comma-separated op names to run (default: all), e.g. rms_norm,swiglu")
    p.add_argument("--tokens", help="comma-separated token counts replacing the mode's sweep (ops only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch.compile providers (default: yes, except in smoke mode)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `llama-kernels bench -- --quick` passes the separator along
        argv = argv[1:]
    args = parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and "triton" not in sys.modules:
        # The kernels run on the CPU only under Triton's interpreter, chosen before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import bench_model, bench_ops, common
    from .common import say

    mode = "smoke" if args.smoke or not on_gpu else "quick" if args.quick else "full"
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = common.make_settings(
        mode, device, args.compile,
        ops=tuple(args.ops.split(",")) if args.ops else None,
        tokens=tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None,
    )
    if settings.ops:
        unknown = set(settings.ops) - {s.name for s in bench_ops.OPS}
        if unknown:
            say(f"unknown op(s) {sorted(unknown)}; known: {[s.name for s in bench_ops.OPS]}")
            return 2
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
    env = common.environment(settings)
    date = datetime.date.today().isoformat()
    say(f"device: {env['device']['name']}; torch {env['versions']['torch']}, triton {env['versions']['triton']}; "
        f"mode {mode}; output to {out_dir}")

    records: list = []
    limits, interrupted = None, None
    # A run cut short (Ctrl-C, or `timeout` sending SIGTERM at a lease's end) still writes what it
    # measured.  The exception is a BaseException, so the per-provider `except Exception` blocks
    # let it through.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        limits = common.measure_limits(settings)
        if args.only in (None, "ops"):
            bench_ops.run(settings, limits, records)
        if args.only in (None, "model"):
            bench_model.run(settings, limits, records)
    except (KeyboardInterrupt, Terminated) as exc:
        interrupted = f"stopped early ({type(exc).__name__}): only the figures measured before are reported"
        say(interrupted)
        if limits is None:
            return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    common.add_speedups(records)

    report = {
        "title": "llama_kernels benchmarks",
        "meaningful": settings.meaningful,
        "warning": settings.warning,
        "interrupted": interrupted,
        "mode": mode,
        "date": date,
        "environment": env,
        "limits": limits,
        "settings": {"warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms, "host_reps": settings.host_reps,
                     "rotate_bytes": settings.rotate_bytes, "compile": settings.compile,
                     "timer": "triton.testing.do_bench median" if on_gpu else "host clock median (CPU)"},
        "providers": {**bench_ops.provider_notes(), **bench_model.provider_notes()},
        "ops": {s.name: s.note for s in bench_ops.OPS},
        "wall_s": common.elapsed_s(),
    }
    common.write_outputs(report, records, out_dir, common.file_stem(settings, date))

    # Exit status: the run completed (0), unless our kernels failed or disagree with eager (1).
    bad = [r for r in records if r.provider in ("ours", "hf+ours") and r.status in ("failed", "mismatch")]
    bad += [r for r in records if r.provider == "eager" and r.status == "mismatch"]
    counts: dict = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    say(f"done in {common.elapsed_s():.0f} s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in bad:
        say(f"PROBLEM: {r.describe()}")
    if settings.warning:
        say(settings.warning)
    return 1 if bad else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
