"""Speed against tokens, one PNG per op: ours against every provider, one panel per mode and shape.

matplotlib is imported here, lazily, with the Agg backend (no display on a GPU box); without it
the plots are skipped with a message and the JSON/markdown still get written.
"""
from __future__ import annotations

from pathlib import Path

from .common import Record, axis_name, say


def write_plots(report: dict, records: list[Record], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-<suite>-<op>.png`` in ``out_dir`` for every op with a measured figure; the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        say(f"plots skipped: matplotlib is not importable ({exc}); pip install matplotlib")
        return []

    written = []
    by_op: dict = {}
    for r in records:
        if r.status == "ok":
            by_op.setdefault((r.suite, r.op), []).append(r)
    for (suite, op), rs in by_op.items():
        # One row of panels per model shape, one column per mode (and, for an op whose unit changes
        # with the tokens, e.g. the quantised linears' GB/s at decode and TFLOP/s at prefill, per
        # unit); bf16 solid, other dtypes dashed.
        shapes = list(dict.fromkeys(r.shape for r in rs))
        columns = list(dict.fromkeys((r.mode, r.throughput_unit if suite == "ops" else None) for r in rs))
        fig, axes = plt.subplots(len(shapes), len(columns), figsize=(5 * len(columns), 3.8 * len(shapes)),
                                 squeeze=False)
        for row, shape in zip(axes, shapes, strict=True):
            for ax, (mode, unit) in zip(row, columns, strict=True):
                _panel(ax, [r for r in rs if (r.shape, r.mode) == (shape, mode)
                            and (unit is None or r.throughput_unit == unit)], report)
                ax.set_title(f"{op} {mode}, {shape}", fontsize=9)
        title = f"{report['environment']['device']['name']}, {report['date']}"
        if report.get("warning"):
            title += "\nSMOKE RUN: THESE NUMBERS MEAN NOTHING"
        fig.suptitle(title, fontsize=10, color="red" if report.get("warning") else "black")
        fig.tight_layout()
        path = out_dir / f"{stem}-{suite}-{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _panel(ax, rs: list[Record], report: dict) -> None:
    """One line per provider and dtype: throughput (or tokens/s) against tokens, log-2 x axis."""
    if not rs:
        ax.set_visible(False)
        return
    model_level = rs[0].suite == "model"
    unit = "tokens/s" if model_level else rs[0].throughput_unit
    colors: dict = {}
    for provider, dtype in dict.fromkeys((r.provider, r.dtype) for r in rs):
        pts = sorted((r.tokens, r.tokens_per_s if model_level else r.throughput)
                     for r in rs if (r.provider, r.dtype) == (provider, dtype))
        xs, ys = zip(*pts, strict=True)
        style = dict(linewidth=2.5, color="black") if provider == "ours" else dict(linewidth=1.2)
        if provider in colors:
            style["color"] = colors[provider]
        label = provider if dtype == "bf16" else f"{provider} {dtype}"
        (line,) = ax.plot(xs, ys, marker="o", linestyle="-" if dtype == "bf16" else "--", label=label, **style)
        colors.setdefault(provider, line.get_color())
    if not model_level:  # the measured ceiling of this unit, for scale
        lim = report["limits"]
        ceiling = lim["copy_gbps"] if unit == "GB/s" else lim["matmul_tflops"]
        ax.axhline(ceiling, linestyle=":", color="grey", linewidth=1)
        ax.annotate("measured " + ("copy" if unit == "GB/s" else "bf16 matmul"), (0.02, 0.97),
                    xycoords="axes fraction", fontsize=7, color="grey", va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(axis_name(rs[0].suite, rs[0].op))
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
