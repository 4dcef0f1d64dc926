"""Bytes per token that each module of a decoder layer keeps for the backward: transformers'
eager and SDPA attention against the patched model, at real shapes, on fake tensors (exact, no GPU).

    PYTHONPATH=. python -m benchmarks.memory_saved [--models llama3-8b,qwen3-8b,gemma2-9b] [--out DIR]

Autograd's saved-tensor hooks see every tensor an op keeps for its backward; storages are counted
once (views share them) and parameters are left out (they exist anyway), so a module's figure is
what its forward adds to the activation memory of a training step.  Each module runs alone on a
fresh input (its input counts when it keeps it); the decoder layer runs whole (each storage once).
The LM head + loss row is per token of the loss.  Writes ``cpu-fake-saved-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # fake CPU tensors take the kernels' path (nothing launches)

import torch  # noqa: E402

from .shapes import GEMMA2_9B, LLAMA3_8B, QWEN3_8B, fields  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 4096

# Public model cards' shapes (one decoder layer; the vocabulary for the LM head + loss row): the
# fields this sets of the real models' configs (benchmarks/shapes.py), transformers' defaults for
# the rest (Gemma 2: no final-logit soft-capping).
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
MODELS = {
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", fields(LLAMA3_8B, *_FIELDS)),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", fields(QWEN3_8B, *_FIELDS, "head_dim")),
    "gemma2-9b": ("Gemma2Config", "Gemma2ForCausalLM",
                  dict(fields(GEMMA2_9B, *_FIELDS, "head_dim"), final_logit_softcapping=None)),
}
PROVIDERS = ("eager", "sdpa", "ours")


def saved_bytes(run, parameters) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``run()`` executes."""
    skip = {p.untyped_storage()._cdata for p in parameters}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            storages[storage._cdata] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def _model(name: str, provider: str):
    import transformers
    import llama_kernels as lk

    config_name, model_name, shape = MODELS[name]
    config = getattr(transformers, config_name)(**shape, num_hidden_layers=1)
    config._attn_implementation = "sdpa" if provider == "ours" else provider
    if getattr(config, "attn_logit_softcapping", None) is not None and provider != "eager":
        config._attn_implementation = "eager"  # SDPA cannot soft-cap: transformers refuses it for Gemma 2
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = getattr(transformers, model_name)(config).train()
    finally:
        torch.set_default_dtype(torch.float32)
    return lk.apply_kernels(model) if provider == "ours" else model


def measure(name: str, provider: str) -> dict:
    """``{module: bytes per token}`` for one decoder layer of ``name`` (and its LM head + loss)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _model(name, provider)
        layer, hidden = model.model.layers[0], model.config.hidden_size
        params = list(model.parameters())
        positions = torch.arange(TOKENS)[None]

        def x():
            return torch.randn(1, TOKENS, hidden, dtype=torch.bfloat16, requires_grad=True)
        rotary = model.model.rotary_emb(x(), positions)
        attention = dict(position_embeddings=rotary, attention_mask=None, position_ids=positions)
        rows = {
            "input_layernorm": lambda: layer.input_layernorm(x()),
            "self_attn (projections, RoPE, attention)": lambda: layer.self_attn(x(), **attention),
            "mlp": lambda: layer.mlp(x()),
            "decoder layer": lambda: layer(x(), **attention),
        }
        figures = {row: saved_bytes(run, params) / TOKENS for row, run in rows.items()}
        ids = torch.zeros((1, TOKENS), dtype=torch.long)
        figures["LM head + loss (per token, with the final norm)"] = saved_bytes(
            lambda: model(ids, labels=ids).loss, params) / TOKENS - figures["decoder layer"]
    return figures


def markdown(results: dict) -> str:
    lines = [f"# Bytes per token kept for the backward ({results['date']}, bf16, {TOKENS} tokens, fake tensors)", "",
             "Saved-tensor hooks on fake CPU tensors: exact and device-independent (the CPU's SDPA flash backend "
             "keeps what the CUDA one keeps: output and float32 log-sum-exp). Parameters excluded; a row's input "
             "counts when it keeps it. `ours/sdpa` is the patched model over transformers' SDPA model "
             "(Gemma 2: transformers refuses SDPA for its soft-capped attention, so its sdpa column is eager "
             "attention, as the model runs).", ""]
    for name, by_provider in results["models"].items():
        lines += [f"## {name}", "", "| module | " + " | ".join(PROVIDERS) + " | ours/sdpa |",
                  "| --- |" + " ---: |" * (len(PROVIDERS) + 1)]
        for row in by_provider["ours"]:
            values = [by_provider[p][row] for p in PROVIDERS]
            ratio = values[2] / values[1] if values[1] else float("nan")
            lines.append(f"| {row} | " + " | ".join(f"{v:,.0f}" for v in values) + f" | {ratio:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    results = {"date": datetime.date.today().isoformat(), "tokens": TOKENS, "dtype": "bfloat16",
               "unit": "bytes per token", "models": {}}
    for name in names:
        results["models"][name] = {provider: measure(name, provider) for provider in PROVIDERS}
        print(f"{name}: done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-fake-saved-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
