"""Weight-only quantised linear (``quantized_linear``): ``y = x @ W.T`` with ``W`` in int8 or int4,
at the projections of a LLaMA model, decode (1 to 16 rows) and prefill.

One op per weight format (:data:`FORMATS`): ``int8_linear`` (one scale per output row) and
``int4_linear-g32`` / ``-g64`` / ``-g128`` (a scale and a zero point per group of input features).
Each runs at every distinct projection of its model shape (LLaMA-3-8B: q/o 4096 x 4096, k/v
1024 x 4096, gate/up 14336 x 4096, down 4096 x 14336, as ``N x K``: output x input features), the
records' shape ``"<model> <projection>"``, and at the mode's row counts (:data:`ROWS`; the
``tokens`` column, ``--tokens`` replaces them), bf16 activations.

Inputs (:func:`_inputs`, not the registry samples: those fix one format and the up projection):
``x (1, M, K)`` ~ N(0, 1) and a weight ~ N(0, 1/K) in bf16, quantised by
``llama_kernels.quantize.quantize_weight`` (never zeros), no bias; every provider is called as the
registry's ``int8_linear`` / ``int4_linear`` samples call ``quantized_linear``:
``fn(x, qweight, scales, zeros, None, bits=..., group_size=...)``.

Work per call (:func:`_work`): at most 16 rows (decode) the bytes that must move, the quantised
weight read once (``qweight`` + ``scales`` + ``zeros``) plus ``x`` read and ``y`` written, against
the copy bandwidth; above 16 rows (prefill, compute-bound) the matmul's ``2 M N K`` FLOP, against the
bf16 matmul rate.  Every record also carries the weight alone per second
(``extra["weight_gbps"]``, and its fraction of the copy bandwidth), and ``bf16``'s its own weight's
(``extra["own_weight_gbps"]``: 2NK bytes).  ``ours vs bf16`` in the tables is ours' speed-up over
cuBLAS on the bf16 weight.

Providers besides ``ours``, ``eager`` (dequantise, round to bf16, ``F.linear``) and
``torch.compile`` of it: ``bf16`` (cuBLAS ``F.linear`` on the dequantised weight, made before the
timing: the unquantised baseline), ``torchao`` (its weight-only int8 / int4 tinygemm of the same
group size, when importable) and ``bnb`` (bitsandbytes' ``Linear8bitLt`` / NF4 ``Linear4bit``, when
importable, on CUDA only).  The third-party ones quantise the dequantised weight again in their own
formats, before the timing, so they are checked against ours with a looser tolerance (a provider's
``tolerance``; their error is in the records).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_kernels import reference

from ..common import Missing, Skipped
from .harness import MODELS, SWEEPS, Case, Inputs, OpSpec

# The op label's format suffix -> (bits, group size).  int4's groups: 32, 64 and 128 input features.
FORMATS = {"int8": (8, None), "int4-g128": (4, 128), "int4-g64": (4, 64), "int4-g32": (4, 32)}
DECODE_ROWS = 16  # up to here a call is bandwidth-bound (the kernel's decode schedule): bytes, else FLOP
# Rows of x per mode (the tokens column): decode batches, then prefill chunks.  Smoke: one decode
# row and one more than the decode schedule's 16 (the prefill schedule, with a partial tile).
ROWS = {"full": (1, 2, 4, 8, 16, 512, 2048), "quick": (1, 2, 4, 8, 16, 2048), "smoke": (1, 20)}
SHAPES = ("llama3-8b",)  # model shapes of every mode but smoke (--shapes replaces them)
# How far a provider that re-quantises the weight in its own format may be from ours (max|a - b| /
# max|ours|): its format's rounding, not a wrong call (which is off by ~1 or more).  Measured on
# random weights: NF4 on a fresh bf16 weight ~0.07, LLM.int8 ~0.007.
FOREIGN_TOLERANCE = {8: 0.05, 4: 0.25}


# ---------------------------------------------------------------------------------------------
# Cases, inputs and work
# ---------------------------------------------------------------------------------------------
def projections(dims: dict) -> dict:
    """``name -> (N, K)`` of a model's attention and MLP projections, those of one shape merged
    under one name (LLaMA-3-8B: ``q/o``, ``k/v``, ``gate/up``, ``down``)."""
    h, i, q, kv = dims["hidden"], dims["intermediate"], dims["hq"] * dims["d"], dims["hk"] * dims["d"]
    named = {}
    for name, shape in (("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, q)), ("gate", (i, h)),
                        ("up", (i, h)), ("down", (h, i))):
        named.setdefault(shape, []).append(name)
    return {"/".join(names): shape for shape, names in named.items()}


def _case_list(fmt: str):
    bits, group = FORMATS[fmt]

    def case_list(settings):
        shapes = settings.shapes or (("smoke",) if settings.mode == "smoke" else SHAPES)
        rows = settings.tokens or ROWS[settings.mode]
        for shape in shapes:
            for proj, (n, k) in projections(MODELS[shape]).items():
                if bits == 4 and k % group:  # int4 groups must tile the input features
                    continue
                dims = {"projection": proj, "out_features": n, "in_features": k, "bits": bits, "group_size": group}
                for m in rows:
                    yield Case(f"{shape} {proj}", dims, m, torch.bfloat16, settings.device)

    return case_list


def _inputs(case: Case, seed: int, grad: bool) -> Inputs:
    """x ~ N(0, 1) and a weight ~ N(0, 1/K) (outputs of about unit size), the weight quantised in
    the case's format; no bias (LLaMA's projections have none).  Forward only: ``grad`` unused."""
    from llama_kernels.quantize import quantize_weight

    d = case.dims
    gen = torch.Generator(device=case.device).manual_seed(seed)
    x = torch.randn(1, case.tokens, d["in_features"], generator=gen, device=case.device).to(case.dtype)
    w = torch.randn(d["out_features"], d["in_features"], generator=gen, device=case.device)
    q = quantize_weight((w * d["in_features"] ** -0.5).to(case.dtype), d["bits"], d["group_size"])
    return Inputs((x, q.qweight, q.scales, q.zeros, None), (), {"bits": q.bits, "group_size": q.group_size})


def weight_bytes(dims: dict, scale_bytes: int = 2) -> int:
    """Bytes of one quantised weight: int8 ``N K`` + ``N`` scales; int4 ``N K / 2`` + ``N K / G``
    scales and as many uint8 zero points (scales in the model's dtype, bf16)."""
    n, k, g = dims["out_features"], dims["in_features"], dims["group_size"]
    if dims["bits"] == 8:
        return n * k + n * scale_bytes
    return n * k // 2 + (n * k // g) * (scale_bytes + 1)


def _work(case: Case, mode: str):
    n, k, m, s = case.dims["out_features"], case.dims["in_features"], case.tokens, 2
    if m <= DECODE_ROWS:
        return weight_bytes(case.dims) + m * k * s + m * n * s, "B"
    return 2 * m * n * k, "FLOP"


def _finish(records: list, limits: dict) -> None:
    """Per timed record of one case the weight alone per second (and its fraction of the copy
    bandwidth, in ``extra``); for ``bf16`` its own 2NK-byte weight's; for ours the speed-up over
    ``bf16``."""
    copy = limits.get("copy_gbps")
    ok = {r.provider: r for r in records if r.status == "ok" and r.ms}
    for r in ok.values():
        own = r.provider == "bf16"
        nbytes = 2 * r.dims["out_features"] * r.dims["in_features"] if own else weight_bytes(r.dims)
        key = "own_weight" if own else "weight"
        gbps = nbytes / r.ms / 1e6
        r.extra.update({f"{key}_bytes": nbytes, f"{key}_gbps": gbps})
        if copy:
            r.extra[f"{key}_fraction_of_copy"] = gbps / copy
    if "ours" in ok and "bf16" in ok:
        ok["ours"].extra["speedup_vs_bf16"] = ok["bf16"].ms / ok["ours"].ms


# ---------------------------------------------------------------------------------------------
# Providers beyond ours / eager / torch.compile.  Each carries a `layout` that builds, before
# any timing, the weight it multiplies by (harness._in_own_layout): the call is the matmul alone.
# ---------------------------------------------------------------------------------------------
def _dequantized(x, qweight, scales, zeros, bits, group_size):
    return reference.dequantize_weight(qweight, scales, zeros, bits=bits, group_size=group_size, dtype=x.dtype)


def _bf16():
    """cuBLAS ``F.linear`` on the dequantised weight in bf16: what the model runs unquantised."""

    def layout(x, qweight, scales, zeros, bias, *, bits, group_size):
        return (x, _dequantized(x, qweight, scales, zeros, bits, group_size)), {}, (lambda out: out)

    def run(x, weight):
        return F.linear(x, weight)

    run.layout = layout
    run.note = ("F.linear on the dequantised bf16 weight (2NK bytes); its GB/s is the quantised op's bytes over "
                "its time, its own weight's rate is extra['own_weight_gbps']")
    return run


# torchao's configs, newest API first: the tinygemm int4 path (aten._weight_int4pack_mm) under
# torchao >= 0.13's version-2 configs, then the older spelling.  (module attribute, kwargs)
_TORCHAO_CONFIGS = {
    8: (("Int8WeightOnlyConfig", {}), ("int8_weight_only", {})),
    4: (("Int4WeightOnlyConfig", {"int4_packing_format": "tile_packed_to_4d"}), ("Int4WeightOnlyConfig", {}),
        ("int4_weight_only", {})),
}


def _torchao_module(weight: torch.Tensor, bits: int, group_size):
    """An ``nn.Linear`` holding ``weight``, quantised by torchao's ``quantize_`` (the first config of
    :data:`_TORCHAO_CONFIGS` that takes it); ``(module, what ran)``.  Missing when torchao is not
    importable or refuses every config."""
    try:
        from torchao import quantization
    except Exception as exc:
        raise Missing(f"torchao not importable ({type(exc).__name__}: {exc})") from None
    errors = []
    for attr, kwargs in _TORCHAO_CONFIGS[bits]:
        make = getattr(quantization, attr, None)
        if make is None:
            continue
        kwargs = dict(kwargs, **({"group_size": group_size} if bits == 4 else {}))
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                 dtype=weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
        try:
            quantization.quantize_(module, make(**kwargs))
        except Exception as exc:
            errors.append(f"{attr}({kwargs}): {type(exc).__name__}: {str(exc).strip()[:120]}")
            continue
        spelled = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return module, f"torchao.quantization.quantize_ with {attr}({spelled})"
    raise Missing("torchao refused every config: " + "; ".join(errors or ["none of them exists in this torchao"]))


def _bnb_module(weight: torch.Tensor, bits: int):
    """bitsandbytes' layer holding ``weight``: ``Linear8bitLt`` (int8 weights, LLM.int8's int8
    matmul, its default threshold) or NF4 ``Linear4bit`` (blocks of 64, bf16 compute), quantised
    by ``.to(device)`` as bitsandbytes does; ``(module, what it is)``."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise Missing(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from None
    n, k = weight.shape
    host = weight.cpu()  # Int8Params quantises when moved from the host (Params4bit whenever moved)
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(host, requires_grad=False, has_fp16_weights=False)
        what = "bitsandbytes Linear8bitLt(has_fp16_weights=False): int8 weights, LLM.int8's int8 matmul"
    else:
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(host, requires_grad=False, quant_type="nf4", module=layer)
        what = "bitsandbytes Linear4bit(quant_type='nf4'): NF4 in blocks of 64 (its own), bf16 compute"
    return layer.to(weight.device), what


class _Requantized:
    """A third-party layer (torchao's, bitsandbytes') built from the dequantised weight in its
    layout (before the timing) and called on ``x``.  Its note says which configuration ran."""

    def __init__(self, build, what: str, bits: int, cuda_only: bool):
        self.build, self.what, self.cuda_only = build, what, cuda_only
        self.tolerance = FOREIGN_TOLERANCE[bits]
        self.note = None  # set by the first layout

    def layout(self, x, qweight, scales, zeros, bias, *, bits, group_size):
        if self.cuda_only and x.device.type != "cuda":
            raise Skipped(f"{self.what} is measured on CUDA only")
        module, how = self.build(_dequantized(x, qweight, scales, zeros, bits, group_size), bits, group_size)
        self.note = f"{how}; the dequantised weight quantised again in its format, checked to {self.tolerance}"
        return (x, module), {}, (lambda out: out)

    def __call__(self, x, module):
        return module(x)


def _extras(bits: int) -> dict:
    return {
        "bf16": _bf16,
        "torchao": lambda: _Requantized(_torchao_module, "torchao", bits, cuda_only=False),
        "bnb": lambda: _Requantized(lambda w, b, g: _bnb_module(w, b), "bitsandbytes", bits, cuda_only=True),
    }


PROVIDER_NOTES = {
    "bf16": "quantized_linear only: torch.nn.functional.linear (cuBLAS) on the dequantised weight in bf16, made "
            "before the timing: the unquantised model's matmul",
    "torchao": "quantized_linear only: torchao's weight-only int8 (Int8WeightOnlyConfig) or int4 tinygemm "
               "(Int4WeightOnlyConfig, the table's group size) on an nn.Linear holding the dequantised weight, "
               "quantised before the timing; missing when torchao is not importable",
    "bnb": "quantized_linear only: bitsandbytes Linear8bitLt (int8) or NF4 Linear4bit (int4 tables; blocks of 64) "
           "holding the dequantised weight, quantised before the timing; CUDA only",
}


def _spec(fmt: str) -> OpSpec:
    bits, group = FORMATS[fmt]
    name = f"{fmt}_linear" if bits == 8 else f"int4_linear-g{group}"
    return OpSpec(
        name, "int8_linear" if bits == 8 else "int4_linear", _work,
        lambda d: {k: d[k] for k in ("projection", "out_features", "in_features", "bits", "group_size")},
        SHAPES, _extras(bits), modes=("forward",), inputs=_inputs, case_list=_case_list(fmt), finish=_finish,
        provider_notes=PROVIDER_NOTES,
        note=(f"weight-only {fmt} linear, y (1, M, N) = x (1, M, K) @ W^T, bf16 activations, the tokens column "
              f"the rows M; shapes '<model> <projection>' (N x K in the dims). Work: M <= {DECODE_ROWS} the bytes "
              "that must move, quantised weight (qweight + scales + zeros) + x + y, against the copy bandwidth; "
              "M > 16 the 2MNK FLOP, against the bf16 matmul rate. 'ours vs bf16' is ours' speed-up over cuBLAS "
              "on the bf16 weight."))


QUANTIZED_LINEAR = tuple(_spec(fmt) for fmt in FORMATS)
# The formats phase q of benchmarks/gpu_session.sh measures: int8 and int4 in groups of 128.
QUICK_NAMES = tuple(spec.name for spec in QUANTIZED_LINEAR if spec.name in ("int8_linear", "int4_linear-g128"))
assert set(SWEEPS) == set(ROWS), "every run mode needs its quantized_linear rows"
