"""What every benchmark shares: settings, timing, the card's two ceilings, result records.

The report's writers (JSON, markdown, plots) are :mod:`benchmarks.report`'s.

Numbers reported by the suite come from this run only: the copy bandwidth and matmul peak are
measured here (:func:`measure_limits`), each timing is a median of ``triton.testing.do_bench`` (on
the CPU, of a host clock: the smoke mode, whose timings mean nothing), and every derived figure
(GB/s, TFLOP/s, fraction of a ceiling, speedup) is computed from those and from the counted work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field

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
    quantize: tuple[str, ...] = ()  # the model part's quantised comparison: weight formats ("int8", "int4-g128")

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
                  shapes=None, quantize=()) -> Settings:
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
    return Settings(mode, device, warmup, rep, host_reps, rotate, compile, ops, tokens, shapes, tuple(quantize))


def settings_json(settings: Settings) -> dict:
    """``settings`` as JSON-able fields (the device as its name), for a child process."""
    return {**dataclasses.asdict(settings), "device": str(settings.device)}


def settings_from_json(doc: dict) -> Settings:
    """The :class:`Settings` that :func:`settings_json` wrote (its tuples come back as JSON lists)."""
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()
              if k in ("ops", "tokens", "shapes", "quantize")}
    return Settings(**{**doc, **tuples, "device": torch.device(doc["device"])})


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


@contextlib.contextmanager
def building(device, dtype=torch.bfloat16):
    """Build parameters directly on ``device`` in ``dtype`` from seed 0 (no fp32 CPU copy)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


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
    t_copy, copy_bytes = _time_copy(copy_elems, gen, settings)
    t_mm = _time_matmul(n, gen, settings)
    flops = 2 * n ** 3
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


def _time_copy(elems: int, gen, settings: Settings):
    """``(timing, bytes read + written)`` of ``dst.copy_(src)`` on ``elems`` random bf16 values; the
    buffers are freed on return."""
    src = torch.randn(elems, generator=gen, device=settings.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), settings), 2 * nbytes(src)


def _time_matmul(n: int, gen, settings: Settings) -> Timing:
    """Timing of ``torch.mm`` of two random bf16 ``n x n`` matrices into a third; freed on return."""
    a = torch.randn(n, n, generator=gen, device=settings.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=settings.device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return bench(lambda: torch.mm(a, b, out=c), settings)


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
    def key(r, provider):
        return r.suite, r.op, r.mode, r.shape, r.tokens, r.dtype, provider

    ok = {key(r, r.provider): r for r in records if r.status == "ok"}
    for r in records:
        base = ok.get(key(r, ours_for(r)))
        if base is not None and r.status == "ok" and base is not r:
            r.speedup_of_ours, r.speedup_base = r.ms / base.ms, base.provider
