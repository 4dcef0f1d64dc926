"""Padded and packed batches end to end: transformers' LLaMA (random weights from a config, bf16)
generating for a left-padded batch of uneven prompts, and training on uneven sequences, packed
(``position_ids`` restarting at every sequence, as ``DataCollatorWithFlattening`` produces) or
right-padded (a 2-D ``attention_mask``).

Models, each built once from seed 0 (the same weights) and freed before the next:

* ``sdpa``: ``LlamaForCausalLM`` with ``attn_implementation="sdpa"`` (transformers' default);
* ``eager``: ``attn_implementation="eager"`` (generation only);
* ``fa2``: ``attn_implementation="flash_attention_2"``, missing where flash-attn is not installed;
* ``ours``: the sdpa model patched with ``llama_kernels.apply_kernels``.

Figures (suite ``model``; ``hf+ours`` is the provider the others are compared with):

* ``padded-prefill``: ``generate(max_new_tokens=1)`` of the left-padded batch (the prompts' forward
  with their padding mask, and one token): tokens/s = real prompt tokens / time; FLOP = the real
  work (2 P T + L * sum_i 4 Hq l_i^2 D / 2 over the prompts' lengths l_i, the LM head's part of P
  for one position per prompt, as generate computes it), so padding shows as waste.
* ``padded-generate``: greedy ``generate`` of N new tokens (dynamic cache, ``min_new_tokens=N``, no
  early stop): tokens/s = B N / time of the whole call, the prefill included; the record's ``extra``
  has the decode part alone, ``(generate(N) - generate(1)) / (N - 1)`` per step.
* ``varlen-train``: forward + loss + backward + fused AdamW step over the same real tokens, laid out
  per provider: ``hf+ours`` packed (one row, restarting ``position_ids``, labels -100 at each
  sequence's first token, ``use_cache=False``: transformers detects packed sequences only without a
  cache), ``hf+ours-padded``, ``hf-sdpa-padded`` and ``hf-sdpa-packed`` (transformers builds a
  block-diagonal mask) and ``hf-fa2-packed``.  Both layouts predict the same T - N targets, so
  losses agree.  tokens/s = real tokens / step time; FLOP = the real work, 6 P T + 3.5 L sum_i
  4 Hq L_i^2 D / 2.

Check first: logits at up to 256 real tokens (fixed sample) of each provider's forward (eval mode,
no grad) against the first provider that ran (``sdpa``: the unpatched model), max|a - b| /
max|ref| <= 5e-2, and for training the loss within 1e-2 relative; a provider that disagrees is
``mismatch`` and is not timed.  Greedy tokens of random weights flip at near-ties, so the generated
tokens' agreement with the reference is reported (``extra["token_agreement"]``), not judged.  For
``hf+ours`` the kernels launched are listed (``extra["launches"]``: generation, during the checked
prompt forward and generate; training, per timed step, backward included), and its note says
whether an attention kernel ran or transformers' SDPA did.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import itertools

import torch

from llama_kernels.ops.registry import varlen_lengths

from . import shapes
from .common import Missing, Record, Settings, Timing, building, classify, free_memory, say, time_calls
from .shapes import linear_params

# LLaMA-3.2-1B's shape (head dim 64, tied embeddings), without its RoPE scaling (the sweep sets
# the layer count); "smoke" for CPU runs: a tiny model of the same kind.
LLAMA32_1B = {k: v for k, v in shapes.LLAMA32_1B.items() if k != "rope_scaling"}
SMOKE = dict(LLAMA32_1B, vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=4096)

# batch: prompts, the longest `prompt` tokens (the others drawn from [prompt/4, prompt]); `new`
# tokens generated; train: real tokens of a training step (lengths: registry.varlen_lengths).
SWEEPS = {
    "full": dict(layers=16, batch=16, prompt=1024, new=128, train=(8192, 16384), warmup=2, reps=5),
    "quick": dict(layers=16, batch=8, prompt=512, new=64, train=(8192,), warmup=1, reps=3),
    "smoke": dict(layers=1, batch=3, prompt=8, new=3, train=(24,), warmup=0, reps=1),
}
LOGITS_TOLERANCE = 5e-2  # max|a - b| / max|ref| of bf16 logits after every layer
LOSS_TOLERANCE = 1e-2
SAMPLED = 256  # real tokens whose logits are compared
OPS = {"padded-prefill": "generate(1)", "padded-generate": "generate", "varlen-train": "forward+backward+AdamW"}

# model -> (attn_implementation, patched), the generation provider, the training providers (layouts).
MODELS = {
    "sdpa": ("sdpa", False, "hf-sdpa", {"hf-sdpa-padded": "padded", "hf-sdpa-packed": "packed"}),
    "eager": ("eager", False, "hf-eager", {}),
    "fa2": ("flash_attention_2", False, "hf-fa2", {"hf-fa2-packed": "packed"}),
    "ours": ("sdpa", True, "hf+ours", {"hf+ours-padded": "padded", "hf+ours": "packed"}),
}


def provider_notes() -> dict:
    return {
        "model padded-prefill / padded-generate": "transformers LlamaForCausalLM (LLaMA-3.2-1B shape, random "
            "weights) on a left-padded batch of uneven prompts, greedy, dynamic cache: hf-sdpa, hf-eager, "
            "hf-fa2 (attn_implementation sdpa / eager / flash_attention_2) and hf+ours (apply_kernels on the "
            "sdpa model); prefill = generate(max_new_tokens=1), generate = the whole call of N new tokens",
        "model varlen-train": "the same model, one training step (loss, backward, fused AdamW) over uneven "
            "sequences: hf+ours packed (position_ids restarting, as DataCollatorWithFlattening), hf+ours-padded, "
            "hf-sdpa-padded (2-D attention_mask), hf-sdpa-packed (transformers' block-diagonal mask), "
            "hf-fa2-packed; tokens/s and FLOP count the real tokens only",
    }


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def prompt_lengths(batch: int, longest: int) -> list[int]:
    """``batch`` prompt lengths: the first ``longest``, the others uniform in ``[longest // 4,
    longest]`` (seed ``longest``)."""
    gen = torch.Generator().manual_seed(longest)
    lo = max(1, longest // 4)
    return [longest] + [int(torch.randint(lo, longest + 1, (1,), generator=gen)) for _ in range(batch - 1)]


def _token_rows(cfg, lengths, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg["vocab_size"], (n,), generator=gen).to(device) for n in lengths]


def _padded(rows, left: bool):
    """``(ids, attention_mask)`` of the rows padded with token 0 to the longest, on the left or right."""
    width = max(len(r) for r in rows)
    ids = rows[0].new_zeros(len(rows), width)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def _sample(total: int) -> torch.Tensor:
    """Up to SAMPLED indices of real tokens (in packed order), spread over all of them."""
    return torch.linspace(0, total - 1, min(total, SAMPLED)).round().long().unique()


def _train_batches(cfg, lengths, device):
    """layout -> (model kwargs, indices of the sampled real tokens in the flattened logits)."""
    rows = _token_rows(cfg, lengths, device, seed=3)
    total = sum(lengths)
    sample = _sample(total).to(device)
    packed_ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    labels = packed_ids.clone()
    starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=device)
    labels[0, starts] = -100  # DataCollatorWithFlattening's separator: no target across sequences
    ids, mask = _padded(rows, left=False)
    padded_labels = ids.masked_fill(mask == 0, -100)
    # the flat index (row * width + column) of every real token of the padded batch, in packed order
    flat = torch.cat([i * ids.shape[1] + torch.arange(n, device=device) for i, n in enumerate(lengths)])
    return {
        "packed": (dict(input_ids=packed_ids, position_ids=positions, labels=labels), sample),
        "padded": (dict(input_ids=ids, attention_mask=mask, labels=padded_labels), flat[sample]),
    }


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _build(cfg, settings, attn: str, patched: bool):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:
        raise Missing(f"transformers not importable ({type(exc).__name__}: {exc})") from None
    if attn == "flash_attention_2":
        try:
            importlib.import_module("flash_attn")
        except Exception as exc:
            raise Missing(f"flash_attn not importable ({type(exc).__name__}: {exc})") from None
    config = LlamaConfig(**cfg, attn_implementation=attn)
    with building(settings.device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    if patched:
        try:
            import llama_kernels as lk

            lk.apply_kernels(model)
        except Exception as exc:
            raise Missing(f"llama_kernels.apply_kernels unavailable: {type(exc).__name__}: {exc}") from None
    return model.eval()


@contextlib.contextmanager
def _launches(record: bool):
    """Counts the llama_kernels launches inside (``LAUNCHES``), when ``record``; yields the Counter."""
    seen: collections.Counter = collections.Counter()
    if not record:
        yield seen
        return
    from llama_kernels.ops.common import LAUNCHES

    before = collections.Counter(LAUNCHES)
    try:
        yield seen
    finally:
        seen.update(LAUNCHES - before)


def _launch_note(launches) -> str:
    attention = sorted(name for name in launches if name.startswith("attention"))
    if attention:
        return "attention kernels launched: " + ", ".join(attention)
    return "no llama_kernels attention kernel launched (transformers' SDPA ran attention)"


def _timed(fn, device, warmup, reps) -> tuple[Timing, int | None]:
    """``time_calls`` and the absolute peak memory over those calls (None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time_calls(fn, device, warmup, reps)
    return t, (torch.cuda.max_memory_allocated() if device.type == "cuda" else None)


def _train_step(model, opt, kwargs):
    """A no-argument training step of ``model`` on the batch ``kwargs``: loss, backward, ``opt`` step."""

    def step():
        loss = model(**kwargs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _rel_err(got, want) -> float:
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _config(settings: Settings) -> tuple[dict, str]:
    base, label = (SMOKE, "smoke") if settings.mode == "smoke" else (LLAMA32_1B, "llama3.2-1b")
    return dict(base, num_hidden_layers=SWEEPS[settings.mode]["layers"]), label


def _attention_flop(cfg, lengths) -> float:
    return cfg["num_hidden_layers"] * sum(4 * cfg["num_attention_heads"] * n * n * cfg["head_dim"] / 2
                                          for n in lengths)


def run(settings: Settings, limits: dict, records: list, progress=None) -> None:
    """Every figure of every model of :data:`MODELS` into ``records``; ``progress(label)`` after each model."""
    cfg, label = _config(settings)
    sweep = SWEEPS[settings.mode]
    dev = settings.device
    say(f"batches: {cfg['num_hidden_layers']} layers of {label} shape")
    prompts = prompt_lengths(sweep["batch"], sweep["prompt"])
    prompt_ids, prompt_mask = _padded(_token_rows(cfg, prompts, dev, seed=2), left=True)
    prompt_flat = torch.cat([i * prompt_ids.shape[1] + torch.arange(prompt_ids.shape[1] - n, prompt_ids.shape[1],
                                                                      device=dev) for i, n in enumerate(prompts)])
    prompt_sample = prompt_flat[_sample(len(prompt_flat)).to(dev)]
    dims = {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "vocab_size")}
    refs: dict = {}  # what the first provider to pass its check gave: logits, losses, generated tokens

    def record(provider, op, tokens, lengths, **kw):
        r = Record("model", op, OPS[op], provider, label, {**dims, "batch": len(lengths), "lengths": lengths},
                   tokens, "bf16", **kw)
        records.append(r)
        return r

    def judge(provider, logits, reference_key):
        """``(error, reason or None)`` of ``logits`` against ``refs[reference_key]``, which the first
        provider to get here sets (``sdpa``'s unless its model failed)."""
        if reference_key not in refs:
            refs[reference_key] = (provider, logits)
            return None, None
        ref_provider, ref_logits = refs[reference_key]
        err = _rel_err(logits, ref_logits)
        if not err <= LOGITS_TOLERANCE:
            return err, f"logits: max|a - {ref_provider}| / max|{ref_provider}| = {err:.3g} > {LOGITS_TOLERANCE}"
        return err, None

    for model_name, (attn, patched, gen_provider, train_providers) in MODELS.items():
        say(f"batches {model_name}: building")
        plan = ([(gen_provider, op) for op in ("padded-prefill", "padded-generate")]
                + [(p, "varlen-train") for p in train_providers])

        try:
            model = _build(cfg, settings, attn, patched)
        except Exception as exc:
            status, reason = classify(exc)
            for provider, op in plan:
                for t in (sweep["train"] if op == "varlen-train" else (sum(prompts),)):
                    lengths = varlen_lengths(t) if op == "varlen-train" else prompts
                    say(record(provider, op, t, lengths, status=status, reason=reason).describe())
            free_memory()
            if progress is not None:
                progress(f"batches {model_name}")
            continue
        try:
            _generation(model, gen_provider, patched, cfg, sweep, dev, limits, prompts, prompt_ids, prompt_mask,
                        prompt_sample, record, judge, refs)
            for total in sweep["train"]:
                _training(model, train_providers, patched, cfg, sweep, dev, limits, total, record, judge, refs)
        finally:
            del model
            free_memory()
        if progress is not None:
            progress(f"batches {model_name}")


def _generation(model, provider, patched, cfg, sweep, dev, limits, prompts, ids, mask, sample, record, judge, refs):
    real = sum(prompts)
    new, batch = sweep["new"], len(prompts)
    head = cfg["hidden_size"] * cfg["vocab_size"]  # generate computes the logits of the last position only
    prefill = record(provider, "padded-prefill", real, prompts, work_unit="FLOP",
                     work=2 * (linear_params(cfg) - head) * real + 2 * head * batch + _attention_flop(cfg, prompts))
    whole = record(provider, "padded-generate", real, prompts)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)

    try:  # check: the padded prompts' logits at the sampled real tokens, then one whole generation
        with torch.no_grad(), _launches(patched) as launches:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.flatten(0, 1)[sample]
            tokens = gen(new)[:, ids.shape[1]:]
        err, bad = judge(provider, logits, "prompt logits")
        refs.setdefault("tokens", tokens)
        agreement = (tokens == refs["tokens"]).float().mean().item()
    except Exception as exc:
        for r in (prefill, whole):
            r.status, r.reason = classify(exc)
            say(r.describe())
        return
    for r in (prefill, whole):
        r.max_rel_err = err
        r.extra["token_agreement"] = agreement
        if patched:
            r.extra["launches"] = dict(launches)
            r.note = _launch_note(launches)
        if bad:
            r.status, r.reason = "mismatch", bad
    if bad:
        for r in (prefill, whole):
            say(r.describe())
        return
    try:
        with torch.no_grad():
            t1, peak1 = _timed(lambda: gen(1), dev, sweep["warmup"], sweep["reps"])
            prefill.set_timing(t1, limits)
            prefill.tokens_per_s = real / t1.ms * 1e3
            prefill.peak_mem_bytes = peak1
            say(prefill.describe())
            tn, peak = _timed(lambda: gen(new), dev, sweep["warmup"], sweep["reps"])
        whole.set_timing(tn, limits)
        whole.tokens_per_s = batch * new / tn.ms * 1e3
        whole.peak_mem_bytes = peak
        step = (tn.ms - t1.ms) / (new - 1) if new > 1 else None
        step = step if step is not None and step > 0 else None  # two noisy medians (smoke runs)
        whole.extra.update(new_tokens=new, generate_1_ms=t1.ms, decode_step_ms=step,
                           decode_tokens_per_s=batch / step * 1e3 if step else None)
    except Exception as exc:
        for r in (prefill, whole):
            if r.ms is None:
                r.status, r.reason = classify(exc)
    say(whole.describe())


def _training(model, providers, patched, cfg, sweep, dev, limits, total, record, judge, refs):
    lengths = varlen_lengths(total)
    work = 6 * linear_params(cfg) * total + 3.5 * _attention_flop(cfg, lengths)
    try:
        batches = _train_batches(cfg, lengths, dev)
    except Exception as exc:
        status, reason = classify(exc)
        for provider, layout in providers.items():
            say(record(provider, "varlen-train", total, lengths, work=work, work_unit="FLOP", status=status,
                       reason=reason, extra={"layout": layout}).describe())
        return
    checked = []
    for provider, layout in providers.items():  # every check first: the timed steps change the weights
        kwargs, sample = batches[layout]
        r = record(provider, "varlen-train", total, lengths, work=work, work_unit="FLOP",
                   extra={"layout": layout})
        try:
            model.eval()
            with torch.no_grad():
                out = model(**kwargs, use_cache=False)
            logits, loss = out.logits.flatten(0, 1)[sample], out.loss.item()
            del out
            r.extra["loss"] = loss
            err, bad = judge(provider, logits, f"train logits {total}")
            ref_loss = refs.setdefault(f"train loss {total}", loss)
            r.max_rel_err = err
            if bad is None and not abs(loss - ref_loss) <= LOSS_TOLERANCE * abs(ref_loss):
                bad = f"loss {loss:.4f} vs the reference's {ref_loss:.4f}"
            if bad:
                r.status, r.reason = "mismatch", bad
                say(r.describe())
            else:
                checked.append((r, kwargs))
        except Exception as exc:
            r.status, r.reason = classify(exc)
            say(r.describe())
        free_memory()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **({"fused": True} if dev.type == "cuda" else {}))
    for r, kwargs in checked:
        try:
            with _launches(patched) as launches:
                t, peak = _timed(_train_step(model, opt, kwargs), dev, sweep["warmup"], sweep["reps"])
            if patched:  # per step: what the timed steps ran, backward included
                steps = sweep["warmup"] + sweep["reps"]
                r.extra["launches"] = {name: n // steps for name, n in launches.items()}
                r.note = _launch_note(launches)
            r.set_timing(t, limits)
            r.tokens_per_s = total / t.ms * 1e3
            r.peak_mem_bytes = peak
        except Exception as exc:
            r.status, r.reason = classify(exc)
        model.zero_grad(set_to_none=True)  # a failed step may leave its gradients
        free_memory()
        say(r.describe())
    model.eval()
    opt.state.clear()  # AdamW's moments: freed before the next layout or model
    free_memory()
