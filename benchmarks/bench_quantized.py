"""The model part's quantised comparison (``--quantize 8,4``): one model in bf16 and with its
projections in int8 / int4, prefill and batch-1 decode.

The reference LLaMA (``llama_kernels.model.Llama``) at LLaMA-3-8B's shapes and its real depth,
32 layers (:data:`LAYERS`; smoke runs: the tiny smoke model, 2 layers), built from one seed in bf16
for every provider:

* ``ours``: ``apply_kernels(model)``, bf16 weights: the baseline;
* ``ours+int8``, ``ours+int4-g128``, ``ours+int4-g64`` ... (the formats asked for):
  ``quantize_weights(apply_kernels(model), bits, group_size)``: every attention and MLP projection
  quantised (round to nearest, ``llama_kernels.quantize``), the embedding and the LM head in bf16,
  as ``quantize_weights`` leaves them by default.

Each provider is measured as the model part measures ``ours`` (:func:`benchmarks.bench_model._measure`,
its sweep's prefill and decode), without the training step (the quantised weights are frozen):
prefill tokens/s; decode tokens/s of the CUDA-graph step (``generate(cuda_graphs=True)``) and of
plain ``generate`` (``decode-no-graph``), and the bytes a decode step moves (every weight once, a
quantised layer's ``qweight`` + ``scales`` + ``zeros``; the KV cache up to the position) per second
against the measured copy bandwidth.  The first loss of each is checked against ``ours``'.  The
records' shape is ``<model>-<layers>layers`` (``llama3-8b-32layers``), so that their rows stand apart
from the model part's shallower ones; ``ours vs ours+int4-g128`` in the tables is int4's time over
bf16's (below 1: the quantised model is faster), and each quantised record's
``extra["speedup_vs_bf16"]`` is bf16's time over its own.

The real depth matters at decode: at 2 or 4 layers the bf16 LM head (128256 x 4096, 1 GiB) would be
most of the bytes a step reads and hide what quantising the layers saves.
"""
from __future__ import annotations

from . import bench_model
from .common import say

# Layers of the comparison per run mode: LLaMA-3-8B's 32 (its config.json), the whole model as
# decode reads it; smoke runs the tiny model at 2.
LAYERS = {"full": 32, "quick": 32, "smoke": 2}
# --quantize's items -> format names: "8" int8; "4" int4 in groups of 128 (quantize_weights'
# default); "4g64" int4 in groups of 64 (32, 128 and 256 likewise).
FORMAT_ALIASES = {"8": "int8", "4": "int4-g128", **{f"4g{g}": f"int4-g{g}" for g in (32, 64, 128, 256)}}


def format_bits(fmt: str) -> tuple[int, int | None]:
    """``(bits, group_size)`` of a format name: ``int8`` -> (8, None), ``int4-g64`` -> (4, 64)."""
    return (8, None) if fmt == "int8" else (4, int(fmt.split("-g", 1)[1]))


def parse_formats(text: str) -> tuple[str, ...]:
    """``--quantize`` value: comma-separated ``8``, ``4`` or ``4g<group>`` -> format names, in order."""
    items = [item.strip().lower() for item in text.split(",")]
    unknown = [item for item in items if item not in FORMAT_ALIASES]
    if unknown or not items:
        raise ValueError(f"unknown format(s) {', '.join(repr(i) for i in unknown)}; known: "
                         f"{', '.join(FORMAT_ALIASES)}")
    return tuple(dict.fromkeys(FORMAT_ALIASES[item] for item in items))


def config(settings) -> dict:
    """The model of the comparison: LLaMA-3-8B's config (smoke: the smoke model's) at :data:`LAYERS`."""
    base = bench_model.SMOKE if settings.mode == "smoke" else bench_model.real_config("llama")
    return dict(base, num_hidden_layers=LAYERS[settings.mode])


def shape(settings) -> str:
    """The records' shape: the model's label and its depth, e.g. ``llama3-8b-32layers``."""
    return f"{bench_model.shape_label('llama', settings)}-{LAYERS[settings.mode]}layers"


def _quantized(model, fmt: str):
    from llama_kernels import quantize_weights

    bits, group = format_bits(fmt)
    return quantize_weights(model, bits=bits, group_size=group)


def providers(cfg: dict, settings) -> dict:
    """name -> builder(stack) of a runner: ``ours`` (bf16), then ``ours+<format>`` per format."""
    def llama():
        return bench_model._llama(cfg, settings)

    built = {"ours": lambda stack: bench_model.LlamaRunner(
        bench_model._patched(llama()), "apply_kernels, bf16 weights: the comparison's baseline")}
    for fmt in settings.quantize:
        bits, group = format_bits(fmt)
        args = f"bits={bits}" + (f", group_size={group}" if group else "")
        # apply_kernels then quantize_weights (the other order gives the same model).
        built[f"ours+{fmt}"] = (lambda stack, fmt=fmt, args=args: bench_model.LlamaRunner(
            _quantized(bench_model._patched(llama()), fmt),
            f"apply_kernels then quantize_weights(model, {args}): projections {fmt}, embedding and LM head bf16"))
    return built


def provider_notes(formats) -> dict:
    """What the comparison's providers are, for the report's provider list."""
    return {
        "model ours / ours+<format> (quantised comparison)": (
            "llama_kernels.model.Llama at the real depth (LLaMA-3-8B: 32 layers), one seed: apply_kernels with "
            "bf16 weights (ours) and quantize_weights(apply_kernels(model), bits, group_size) (ours+"
            f"{', ours+'.join(formats)}): projections quantised, embedding and LM head bf16; prefill and "
            "decode (CUDA-graph step and plain generate), no training step (frozen weights); decode bytes count "
            "a quantised layer's qweight + scales + zeros; each loss checked against ours'"),
    }


def add_speedups_vs_bf16(records: list) -> None:
    """``extra["speedup_vs_bf16"]`` of each quantised record: ours' (bf16) time over its own, same
    op and tokens."""
    base = {(r.op, r.tokens): r for r in records if r.provider == "ours" and r.status == "ok" and r.ms}
    for r in records:
        b = base.get((r.op, r.tokens))
        if r.provider.startswith("ours+") and r.status == "ok" and r.ms and b is not None:
            r.extra["speedup_vs_bf16"] = b.ms / r.ms


def run(settings, limits: dict, records: list, progress=None) -> None:
    """Measure ``ours`` and each format of ``settings.quantize`` into ``records``, one model at a
    time (built, measured, freed); ``progress(label)`` after each, as the model part does."""
    cfg = config(settings)
    label = shape(settings)
    say(f"model (quantised comparison): {cfg['num_hidden_layers']} layers, formats {', '.join(settings.quantize)}")
    ref_losses: dict = {}
    first = len(records)
    for name, build in providers(cfg, settings).items():
        bench_model.run_provider(name, build, cfg, settings, limits, records, ref_losses, shape=label,
                                 training=False)
        add_speedups_vs_bf16(records[first:])
        if progress is not None:
            progress(f"model {name}")
