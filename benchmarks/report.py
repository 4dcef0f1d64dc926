"""The report of a run: its environment, its file names, and the JSON, markdown and plots written.

:func:`write_outputs` writes all three; :func:`json_safe` and :func:`write_text` are what every
writer of the suite (the memory benchmark's too) writes its files through.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
from pathlib import Path

import torch

from . import plots as plotting
from .common import Record, Settings, axis_name


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(settings: Settings) -> dict:
    """The device (a GPU's properties, or the CPU) and the library versions, for the report."""
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


def json_safe(value):
    """``value`` with every non-finite float (inf, nan) made None, in dicts, lists and tuples too:
    JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a run killed while
    writing (a lease's ``timeout``, SIGKILL included) leaves the previous complete file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(report: dict, records: list[Record], path: Path) -> None:
    """The report, its records and the speedups of ours (one entry per record that has one) as JSON."""
    doc = dict(report)
    doc["records"] = [dataclasses.asdict(r) for r in records]
    doc["speedups"] = [
        {"suite": r.suite, "op": r.op, "mode": r.mode, "shape": r.shape, "tokens": r.tokens,
         "dtype": r.dtype, "ours": r.speedup_base, "vs": r.provider, "speedup_of_ours": r.speedup_of_ours}
        for r in records if r.speedup_of_ours is not None
    ]
    write_text(path, json.dumps(json_safe(doc), indent=1) + "\n")


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
    """The report as markdown: the ceilings, the providers, then one table per (suite, op, mode)."""
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
    write_text(path, "\n".join(lines) + "\n")


def write_outputs(report: dict, records: list[Record], out_dir: Path, stem: str, plots: bool = True) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` in ``out_dir``, and with ``plots`` the PNGs; returns the paths.

    The JSON comes first: it is what a run cut short must leave.  The partial writes during a run
    pass ``plots=False`` (matplotlib takes seconds per figure, and they are redrawn at the end).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(report, records, json_path)
    write_markdown(report, records, md_path)
    written = [json_path, md_path]
    if plots:
        written += plotting.write_plots(report, records, out_dir, stem)
    return written
