"""What every benchmark shares: settings, timing, the card's two ceilings, result records, writers.

Numbers reported by the suite come from this run only: the copy bandwidth and matmul peak are
measured here (:func:`measure_limits`), each timing is a median of ``triton.testing.do_bench`` (on
the CPU, of a host clock: the smoke mode, whose timings mean nothing), and every derived figure
(GB/s, TFLOP/s, fraction of a ceiling, speedup) is computed from those and from the counted work.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

_START = time.perf_counter()

SMOKE_WARNING = (
    "SMOKE RUN: tiny shapes{where}. These timings, bandwidths, FLOP rates and speedups MEAN NOTHING; "
    "the run only proves that the benchmark harness works end to end."
)


def say(message: str) -> None:
    """Progress line with the time since start; flushed, so a remote log shows where a run is."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def elapsed_s() -> float:
    return time.perf_counter() - _START


class Missing(Exception):
    """A provider that cannot run here (not installed, no such backend); the message says why."""


class Skipped(Exception):
    """A provider left out of this run on purpose (e.g. torch.compile in smoke mode); says why."""


class Unreliable(Exception):
    """A measurement that came out meaningless (e.g. a negative difference of two noisy timings)."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    mode: str  # "full", "quick" or "smoke"
    device: torch.device
    warmup_ms: float  # do_bench's warm-up and repetition budgets (milliseconds, as do_bench takes)
    rep_ms: float
    host_reps: int  # calls the CPU timer of a smoke run takes the median of
    rotate_bytes: int  # rotate input sets until their total reaches this (2x the L2 on a GPU)
    compile: bool  # run the torch.compile providers
    ops: tuple[str, ...] | None = None  # only these ops (None: all)
    tokens: tuple[int, ...] | None = None  # override the token counts of the mode
    shapes: tuple[str, ...] | None = None  # override the model shapes of the mode (ops only)

    @property
    def meaningful(self) -> bool:
        return self.mode != "smoke" and self.device.type == "cuda"

    @property
    def warning(self) -> str | None:
        if self.meaningful:
            return None
        where = ", CPU under the Triton interpreter" if self.device.type == "cpu" else ""
        return SMOKE_WARNING.format(where=where)


def make_settings(mode: str, device: torch.device, compile: bool | None, ops=None, tokens=None,
                  shapes=None) -> Settings:
    if device.type == "cuda":
        # Rotating inputs whose total is twice the L2 means no timed call finds its inputs cached
        # (do_bench also flushes L2 before each call; the rotation makes that not the only guard).
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        rotate = 2 * l2
    else:
        rotate = 64 << 10  # smoke: small, but enough that the rotation code runs with several sets
    budgets = {"full": (25, 100, 10), "quick": (10, 40, 5), "smoke": (0, 0, 2)}
    warmup, rep, host_reps = budgets[mode]
    if compile is None:  # inductor's CPU compile takes ~20 s per graph: off in smoke unless asked
        compile = mode != "smoke"
    return Settings(mode, device, warmup, rep, host_reps, rotate, compile, ops, tokens, shapes)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float


def _summary(times_ms) -> Timing:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return Timing(statistics.median(times_ms), q[1], q[7])


def bench(fn, settings: Settings) -> Timing:
    """Median (and 20th/80th percentile) time of ``fn()`` in ms.

    On a GPU: ``triton.testing.do_bench`` with the mode's fixed warm-up/repetition budgets; it times
    each call with CUDA events and flushes L2 before each.  On the CPU (smoke): a host clock over
    ``host_reps`` calls after one warm-up call, so the same harness code runs.
    """
    if settings.device.type == "cuda":
        from triton.testing import do_bench

        # Two calls first, so that no lazy compilation or allocator growth lands in do_bench's
        # estimate of the call time (from which it sizes its warm-up and repetitions).
        fn(), fn()
        med, p20, p80 = do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    fn()
    return time_calls(fn, settings.device, warmup=0, reps=settings.host_reps)


def time_calls(fn, device: torch.device, warmup: int, reps: int) -> Timing:
    """Median over ``reps`` whole calls timed with a host clock around a device synchronize.

    For calls long enough (a training step, a generation) that launch gaps and clock resolution do
    not matter, and whose own warm-up (compilation) must be counted in calls, not milliseconds.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return _summary(times)


def rotation(build_set, set_bytes: int, settings: Settings, max_sets: int = 32) -> list:
    """Enough input sets (``build_set(i)``) that together they exceed ``settings.rotate_bytes``."""
    n = max(1, min(max_sets, math.ceil(settings.rotate_bytes / max(set_bytes, 1))))
    return [build_set(i) for i in range(n)]


def cycling(sets, call):
    """A no-argument function that calls ``call(set)`` on the next set each time."""
    it = itertools.cycle(sets)
    return lambda: call(next(it))


def peak_memory(fn, device: torch.device):
    """``(peak, peak - allocated_before)`` bytes of the caching allocator around one ``fn()``.

    The call's outputs stay alive until the peak is read, so they count.  None on the CPU.
    """
    if device.type != "cuda":  # the CPU allocator keeps no peak
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak, peak - before


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for a provider that raised: missing, oom or failed."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, Missing):
        return "missing", str(exc)
    if isinstance(exc, Skipped):
        return "skipped", str(exc)
    if isinstance(exc, Unreliable):
        return "unreliable", str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first_line.lower():
        return "oom", f"out of memory: {first_line}"
    return "failed", f"{type(exc).__name__}: {first_line}"


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# The card's ceilings
# ---------------------------------------------------------------------------------------------
def measure_limits(settings: Settings) -> dict:
    """Copy bandwidth and bf16 matmul rate of this device, measured now, on random data.

    Copy: ``dst.copy_(src)`` of a large buffer, counting bytes read + written (2x the buffer).
    Matmul: ``torch.mm`` of two random bf16 n x n matrices, 2 n^3 FLOP.  On a GPU the buffer is
    1 GiB and n = 8192 (well past L2, enough to fill the chip); in smoke mode both are tiny.
    """
    dev = settings.device
    gen = torch.Generator(device=dev).manual_seed(1234)
    copy_elems, n = ((1 << 29), 8192) if settings.mode != "smoke" else ((1 << 20), 256)
    src = torch.randn(copy_elems, generator=gen, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), settings)
    copy_bytes = 2 * nbytes(src)
    del src, dst
    a = torch.randn(n, n, generator=gen, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    t_mm = bench(lambda: torch.mm(a, b, out=c), settings)
    flops = 2 * n ** 3
    del a, b, c
    free_memory()
    limits = {
        "copy_gbps": copy_bytes / t_copy.ms / 1e6,
        "copy_bytes": copy_bytes,
        "copy_ms": t_copy.ms,
        "matmul_tflops": flops / t_mm.ms / 1e9,
        "matmul_shape": [n, n, n],
        "matmul_dtype": "bfloat16",
        "matmul_ms": t_mm.ms,
    }
    say(f"ceilings: copy {limits['copy_gbps']:.0f} GB/s (read + write of {copy_bytes / 2**30:.2f} GiB), "
        f"bf16 matmul {limits['matmul_tflops']:.1f} TFLOP/s ({n}^3)")
    return limits


def throughput(work: float, work_unit: str, ms: float, limits: dict):
    """``(value, unit, limit name, fraction of it)`` for ``work`` bytes or FLOP done in ``ms``."""
    if work_unit == "B":
        value = work / ms / 1e6  # GB/s
        return value, "GB/s", "copy", value / limits["copy_gbps"]
    value = work / ms / 1e9  # TFLOP/s
    return value, "TFLOP/s", "matmul", value / limits["matmul_tflops"]


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One measured (or not measurable) figure: one provider, one op, one shape, one mode."""

    suite: str  # "ops" or "model"
    op: str
    mode: str
    provider: str
    shape: str  # label of the model the shape comes from, e.g. "llama3-8b"
    dims: dict
    tokens: int  # the x axis of the plots: tokens (ops, train, prefill) or KV length (decode)
    dtype: str
    status: str = "ok"  # ok | mismatch | missing | oom | failed | skipped | unreliable
    reason: str | None = None
    note: str | None = None
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    work: float | None = None  # bytes that must move, or FLOP that must be done, per call
    work_unit: str | None = None  # "B" or "FLOP"
    throughput: float | None = None
    throughput_unit: str | None = None  # "GB/s" or "TFLOP/s"
    limit: str | None = None  # "copy" or "matmul": the measured ceiling `fraction` refers to
    fraction: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_delta_bytes: int | None = None
    max_rel_err: float | None = None  # vs the reference provider (ours), max|a-b| / max|ref|
    speedup_of_ours: float | None = None  # this provider's ms / ours' ms, same shape, same run
    speedup_base: str | None = None  # which ours: "ours", or "hf+ours" for transformers' models
    extra: dict = field(default_factory=dict)

    def set_timing(self, t: Timing, limits: dict) -> None:
        self.ms, self.ms_p20, self.ms_p80 = t.ms, t.p20, t.p80
        if self.work is not None:
            self.throughput, self.throughput_unit, self.limit, self.fraction = throughput(
                self.work, self.work_unit, t.ms, limits)

    def describe(self) -> str:
        head = f"{self.suite} {self.op} [{self.mode}] {self.shape} T={self.tokens} {self.dtype} {self.provider}"
        if self.status != "ok":
            return f"{head}: {self.status.upper()} ({self.reason})"
        parts = [f"{self.ms:.3f} ms"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.throughput is not None:
            parts.append(f"{self.throughput:,.1f} {self.throughput_unit} ({self.fraction:.0%} of {self.limit})")
        if self.peak_mem_delta_bytes is not None:
            parts.append(f"peak +{self.peak_mem_delta_bytes / 2**20:,.0f} MiB")
        return f"{head}: " + ", ".join(parts)


def ours_for(r: Record) -> str:
    """The provider of ours that ``r`` is compared with: transformers' model patched with our kernels
    for the transformers models of the model benchmark, else ours."""
    return "hf+ours" if r.suite == "model" and r.provider.startswith("hf") else "ours"


def axis_name(suite: str, op: str) -> str:
    """What a record's ``tokens`` counts, for table headers and plot axes: the KV length of an op's
    decode, the prompt of the model's decode figures (the real prompt tokens of a padded batch's),
    else tokens (varlen: the real tokens of the packed batch)."""
    if op.startswith("decode"):
        return "KV length" if suite == "ops" else "prompt tokens"
    if op.startswith("padded-"):
        return "prompt tokens"
    return "tokens"


def add_speedups(records: list[Record]) -> None:
    """Fill ``speedup_of_ours`` of every record timed beside its ours (:func:`ours_for`) in this run."""
    key = lambda r, provider: (r.suite, r.op, r.mode, r.shape, r.tokens, r.dtype, provider)  # noqa: E731
    ok = {key(r, r.provider): r for r in records if r.status == "ok"}
    for r in records:
        base = ok.get(key(r, ours_for(r)))
        if base is not None and r.status == "ok" and base is not r:
            r.speedup_of_ours, r.speedup_base = r.ms / base.ms, base.provider


# ---------------------------------------------------------------------------------------------
# Report and writers
# ---------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(settings: Settings) -> dict:
    import triton

    dev = settings.device
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        device = {"type": "cuda", "name": p.name, "multiprocessors": p.multi_processor_count,
                  "l2_bytes": p.L2_cache_size, "memory_bytes": p.total_memory,
                  "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version()}
    else:
        device = {"type": "cpu", "name": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
                  "threads": torch.get_num_threads()}
    return {
        "device": device,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "llama_kernels": _version("llama-kernels"), "transformers": _version("transformers"),
            "liger_kernel": _version("liger-kernel"), "flash_attn": _version("flash-attn"),
            "matplotlib": _version("matplotlib"),
        },
    }


def file_stem(settings: Settings, date: str) -> str:
    """``<gpu-name-slug>[-quick|-smoke]-<date>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-27``."""
    if settings.device.type == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(settings.device).lower()).strip("-")
    else:
        slug = "cpu"
    suffix = "" if settings.mode == "full" else f"-{settings.mode}"
    return f"{slug}{suffix}-{date}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a run killed while
    writing (a lease's ``timeout``, SIGKILL included) leaves the previous complete file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(report: dict, records: list[Record], path: Path) -> None:
    doc = dict(report)
    doc["records"] = [dataclasses.asdict(r) for r in records]
    doc["speedups"] = [
        {"suite": r.suite, "op": r.op, "mode": r.mode, "shape": r.shape, "tokens": r.tokens,
         "dtype": r.dtype, "ours": r.speedup_base, "vs": r.provider, "speedup_of_ours": r.speedup_of_ours}
        for r in records if r.speedup_of_ours is not None
    ]
    _write_text(path, json.dumps(_json_safe(doc), indent=1) + "\n")


def _num(x: float) -> str:
    """Three significant digits, thousands separated."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell(r: Record | None, footnotes: dict) -> str:
    if r is None:
        return ""
    if r.status != "ok":
        key = (r.status, r.reason or "")
        n = footnotes.setdefault(key, len(footnotes) + 1)
        return f"{r.status} [{n}]"
    parts = [f"{r.ms:.3f} ms"]
    if r.tokens_per_s is not None:
        parts.append(f"{_num(r.tokens_per_s)} tok/s")
    if r.throughput is not None:
        parts.append(f"{_num(r.throughput)} {r.throughput_unit} ({r.fraction:.0%})")
    mem = r.peak_mem_bytes if r.suite == "model" else r.peak_mem_delta_bytes
    if mem is not None:
        parts.append(f"{mem / 2**30:.2f} GiB" if mem >= 2**30 else f"{mem / 2**20:.0f} MiB")
    return ", ".join(parts)


def _lengths_lines(rs: list[Record]) -> list[str]:
    """For records of uneven sequences (``dims["lengths"]``: varlen attention, the model's padded
    and packed batches), one line per token count: the lengths and what padding them would cost."""
    seen: dict = {}
    for r in rs:
        if r.dims.get("lengths"):
            seen.setdefault((r.tokens, tuple(r.dims["lengths"])), None)
    lines = []
    for tokens, lengths in seen:
        n, longest, real = len(lengths), max(lengths), sum(lengths)
        waste = n * longest * longest / sum(x * x for x in lengths)
        head = f"{tokens} tokens" if tokens == real else f"{tokens} ({real:,} real tokens)"
        lines.append(f"- {head}: {n} sequences, longest {longest:,}; padded to {n} x "
                     f"{longest:,} = {n * longest:,} tokens ({n * longest / real:.2f}x the tokens, {waste:.2f}x the "
                     f"causal attention work); lengths {', '.join(map(str, lengths))}")
    return lines


def write_markdown(report: dict, records: list[Record], path: Path) -> None:
    lim = report["limits"]
    env = report["environment"]
    lines = [f"# llama_kernels benchmarks: {env['device']['name']}, {report['date']} ({report['mode']} mode)", ""]
    if report.get("warning"):
        lines += [f"> **{report['warning']}**", ""]
    if report.get("interrupted"):
        lines += [f"> **Incomplete: {report['interrupted']}.**", ""]
    v = env["versions"]
    lines += [
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, "
        f"liger-kernel {v['liger_kernel']}, flash-attn {v['flash_attn']}; wall time {report['wall_s']:.0f} s.",
        "",
        f"Ceilings measured in this run: copy **{_num(lim['copy_gbps'])} GB/s** (device-to-device `copy_`, "
        f"bytes read + written), bf16 matmul **{_num(lim['matmul_tflops'])} TFLOP/s** "
        f"(`torch.mm` {'x'.join(map(str, lim['matmul_shape']))}, random data). Percentages in the tables are "
        "fractions of these (GB/s of the copy bandwidth, TFLOP/s of the matmul rate).",
        "",
        "Each cell: median ms, rate (fraction of ceiling), peak memory (ops: allocated during one call beyond "
        "what existed before it; model: absolute peak of one call). `ours vs X` = X's time / ours: above 1, "
        "ours is faster (transformers' models are compared with `hf+ours`). benchmarks/README.md gives the "
        "byte and FLOP counts.",
        "",
        "## Providers",
        "",
    ]
    for name, info in report["providers"].items():
        lines.append(f"- **{name}**: {info}")
    groups: dict = {}
    for r in records:
        groups.setdefault((r.suite, r.op, r.mode), []).append(r)
    for (suite, op, mode), rs in groups.items():
        providers = list(dict.fromkeys(r.provider for r in rs))
        # Speedup columns only for providers timed beside ours somewhere in this table.
        compared = {r.provider: r.speedup_base for r in rs if r.speedup_of_ours}
        compared = {p: compared[p] for p in providers if p in compared}
        rows = list(dict.fromkeys((r.shape, r.tokens, r.dtype) for r in rs))
        header = ["shape", axis_name(suite, op), "dtype",
                  *providers, *(f"{base} vs {p}" for p, base in compared.items())]
        lines += ["", f"## {suite}: {op}, {mode}", ""]
        if report.get("ops", {}).get(op) and suite == "ops":
            lines += [report["ops"][op], ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        footnotes: dict = {}
        for shape, tokens, dtype in rows:
            by_p = {r.provider: r for r in rs if (r.shape, r.tokens, r.dtype) == (shape, tokens, dtype)}
            cells = [shape, str(tokens), dtype, *(_cell(by_p.get(p), footnotes) for p in providers)]
            cells += [f"{by_p[p].speedup_of_ours:.2f}x" if p in by_p and by_p[p].speedup_of_ours else ""
                      for p in compared]
            lines.append("| " + " | ".join(cells) + " |")
        notes = sorted({f"{r.provider}: {r.note}" for r in rs if r.note})
        lines += [""] + [f"[{n}] {status}: {reason}  " for (status, reason), n in footnotes.items()]
        lines += [f"- {n}" for n in notes]
        lines += _lengths_lines(rs)
    _write_text(path, "\n".join(lines) + "\n")


def write_outputs(report: dict, records: list[Record], out_dir: Path, stem: str, plots: bool = True) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` in ``out_dir``, and with ``plots`` the PNGs; returns the paths.

    The JSON comes first: it is what a run cut short must leave.  The partial writes during a run
    pass ``plots=False`` (matplotlib takes seconds per figure, and they are redrawn at the end).
    """
    from . import plots as plotting

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(report, records, json_path)
    write_markdown(report, records, md_path)
    written = [json_path, md_path]
    if plots:
        written += plotting.write_plots(report, records, out_dir, stem)
    return written
