"""transformers LLaMA patched with the kernels on padded batches, KV caches and packed sequences
(llama_kernels/hf_attention.py): the answers of the unpatched eager model at every position that
sees a real token, our attention kernel in every layer of every forward, transformers' SDPA only
where it must run."""
import copy
import inspect

import pytest
import torch

import llama_kernels as lk
from llama_kernels import hf_attention
from llama_kernels.ops.common import LAUNCHES
from helpers import max_error

transformers = pytest.importorskip("transformers")

LAYERS = 2
# transformers 5.x (after 5.0) renamed past_key_values to cache
_NEW_API = "cache" in inspect.signature(transformers.LlamaModel.forward).parameters
# One launch per attention call: the training/prefill forward (portable or Hopper) or split-KV decode.
ATTENTION_KERNELS = ("attention_fwd_kernel", "attention_fwd_tma_kernel", "attention_decode_split_kernel")


def attention_launches():
    return sum(LAUNCHES[name] for name in ATTENTION_KERNELS)


@pytest.fixture
def eager(device):
    """A tiny GQA LLaMA (head dim 16, 4 query heads on 2 KV heads) running transformers' eager attention."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture
def patched(eager):
    return lk.apply_kernels(copy.deepcopy(eager))


@pytest.fixture
def sdpa_calls(monkeypatch):
    """How many times torch's SDPA ran (transformers' SDPA fallback calls it)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


class PerForward:
    """Attention kernel launches in each forward of ``model`` (one entry per forward)."""

    def __init__(self, model):
        self.counts = []
        self.hooks = [model.model.register_forward_pre_hook(self.start),
                      model.model.register_forward_hook(self.stop)]

    def start(self, *_):
        self.counts.append(-attention_launches())

    def stop(self, *_):
        self.counts[-1] += attention_launches()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for hook in self.hooks:
            hook.remove()


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def padded_batch(device, length, side, pads=(3, 0, 5)):
    """Random ids ``(3, length)`` with ``pads[b]`` padding tokens on ``side`` of row ``b``."""
    ids = torch.randint(1, 100, (len(pads), length), device=device)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        if n:
            (mask[row, :n] if side == "left" else mask[row, -n:]).fill_(0)
    return ids.masked_fill(mask == 0, 0), mask


# --- padded batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("length", [9, 37], ids=["decode-sized", "prefill-sized"])
def test_padded_batch_logits(eager, patched, device, sdpa_calls, side, length):
    """9 tokens x 2 query heads per KV head fit the split-KV kernels (left padding as a leftpad,
    right padding unpadded); 37 take the training kernel on the unpadded tokens.  Every position
    that sees a real token matches: the real ones, and right padding's (which ``generate`` reads),
    given by a second, non-causal pass."""
    ids, mask = padded_batch(device, length, side)
    with torch.no_grad(), PerForward(patched) as launches:
        logits = patched(ids, attention_mask=mask).logits
        expected = eager(ids, attention_mask=mask).logits
    sees_a_token = mask.cumsum(-1) > 0
    assert relative_error(logits[sees_a_token], expected[sees_a_token]) <= 1e-5
    assert launches.counts == [LAYERS * (2 if side == "right" else 1)] and not sdpa_calls


def test_padded_batch_training_step(eager, patched, device, sdpa_calls):
    """Right-padded batch, forward and backward through the unpadded varlen kernels."""
    ids, mask = padded_batch(device, 12, "right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (eager.train(), patched.train()):
        model.zero_grad()
        LAUNCHES.clear()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, g), (p_loss, p_g) = grads
    assert abs(p_loss - loss) <= 1e-5 * abs(loss)
    worst = max(relative_error(p_g[n], g[n]) for n in g)
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"
    # real queries, then the padding queries (which see the real tokens: SDPA gives them that too)
    assert LAUNCHES["attention_fwd_kernel"] == 2 * LAYERS and any("attention_bwd" in n for n in LAUNCHES)
    assert not sdpa_calls


# --- generation with KV caches ----------------------------------------------------------------

@pytest.mark.parametrize("cache,side,length", [
    ("dynamic", "left", 36), ("static", "left", 36), ("static", "left", 7), ("dynamic", "right", 7),
])
def test_generation_runs_the_kernel_every_step(eager, patched, device, sdpa_calls, cache, side, length):
    """Greedy tokens equal eager's; every forward (prefill and each decode step) launches our
    attention kernel once per layer and never SDPA.  36-token prompts prefill with the training
    kernel on unpadded tokens, 7-token ones with the split-KV kernels; decode steps of a
    left-padded batch take flash_decode with a device-side leftpad, right padding leaves holes
    that only unpadding expresses (and its first token comes from a padding position)."""
    ids, mask = padded_batch(device, length, side)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with PerForward(patched) as launches:
        tokens = patched.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(tokens, eager.generate(ids, attention_mask=mask, **greedy))
    prefill = LAYERS * (2 if side == "right" else 1)  # right padding: the padding queries' pass too
    assert launches.counts == [prefill] + [LAYERS] * 3 and not sdpa_calls


def test_chunked_prefill_with_dynamic_cache(eager, patched, device, sdpa_calls):
    """A prompt fed in two chunks (the second attends to the cache and itself, bottom-right)."""
    ids, mask = padded_batch(device, 40, "left", pads=(4, 0))
    logits = []
    for model in (patched, eager):
        cache = transformers.DynamicCache(config=model.config)
        kw = {"cache": cache} if _NEW_API else {"past_key_values": cache}
        with torch.no_grad():
            model(ids[:, :24], attention_mask=mask[:, :24], **kw)
            logits.append(model(ids[:, 24:], attention_mask=mask, **kw).logits)
    assert relative_error(*logits) <= 1e-5 and not sdpa_calls



# --- packed (padding-free) sequences ----------------------------------------------------------

LENGTHS = (5, 11, 8)


@pytest.mark.parametrize("how", ["position_ids", "position_ids-no-cache", "cu_seq_lens"])
def test_packed_training_equals_separate_sequences(eager, patched, device, sdpa_calls, how):
    """Sequences packed into one row attend only to themselves: the logits and parameter gradients
    of separate forwards.  ``position_ids`` restarting (with transformers' default DynamicCache,
    where transformers' own mask does not look for packing, and with ``use_cache=False``, where it
    does), or FlashAttention-2's ``cu_seq_lens_*`` / ``max_length_*`` keyword arguments."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(1)
    sequences = [torch.randint(1, 100, (n,)).tolist() for n in LENGTHS]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=how == "cu_seq_lens", return_tensors="pt")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in collator([{"input_ids": s} for s in sequences]).items()}
    batch.pop("labels")
    if how == "position_ids-no-cache":
        batch["use_cache"] = False
    weight = torch.randn(1, sum(LENGTHS), 100, device=device)

    patched.train().zero_grad()
    LAUNCHES.clear()
    logits = patched(**batch).logits
    (logits * weight).sum().backward()
    assert LAUNCHES["attention_fwd_kernel"] == LAYERS and any("attention_bwd" in n for n in LAUNCHES)

    eager.train().zero_grad()
    separate = torch.cat([eager(torch.tensor([s], device=device)).logits for s in sequences], dim=1)
    (separate * weight).sum().backward()
    assert relative_error(logits, separate) <= 1e-5
    worst = max(relative_error(p.grad, q.grad) for p, q in zip(patched.parameters(), eager.parameters()))
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"
    assert not sdpa_calls


# --- what the kernels cannot express: transformers' SDPA, exactly --------------------------------

def test_custom_4d_mask_goes_to_sdpa(eager, patched, device, sdpa_calls):
    ids = torch.randint(1, 100, (2, 10), device=device)
    allowed = torch.rand(2, 1, 10, 10, device=device) > 0.4
    allowed |= torch.eye(10, dtype=torch.bool, device=device)  # every query sees something
    allowed = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad(), PerForward(patched) as launches:  # (additive: eager reads a mask so)
        logits = patched(ids, attention_mask=allowed).logits
        assert len(sdpa_calls) == LAYERS
        expected = eager(ids, attention_mask=allowed).logits
    assert relative_error(logits, expected) <= 1e-5 and launches.counts == [0]


@pytest.mark.parametrize("padded", [False, True])
def test_dropout_goes_to_sdpa(eager, patched, device, sdpa_calls, padded):
    """Attention dropout draws its random numbers in SDPA: with the same seed the patched model
    gives what unpatched SDPA gives, padding mask included."""
    for model in (eager, patched):
        model.config.attention_dropout = 0.3
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
    sdpa = copy.deepcopy(eager).train()
    sdpa.set_attn_implementation("sdpa")
    ids, mask = padded_batch(device, 12, "left") if padded else (torch.randint(1, 100, (2, 12), device=device), None)
    outputs = []
    for model in (patched.train(), sdpa):
        torch.manual_seed(5)
        outputs.append(model(ids, attention_mask=mask).logits)
    assert len(sdpa_calls) == 2 * LAYERS
    real = mask.bool() if padded else torch.ones(ids.shape, dtype=torch.bool, device=device)
    assert relative_error(outputs[0][real], outputs[1][real]) <= 1e-5


def test_output_attentions_goes_to_sdpa(patched, device, sdpa_calls):
    ids = torch.randint(1, 100, (1, 8), device=device)
    with torch.no_grad():
        patched(ids, output_attentions=True)
    assert len(sdpa_calls) == LAYERS


# --- decode steps that cannot read anything back (CUDA-graph capture, torch.compile) ------------

def test_decode_step_without_host_reads(eager, patched, device, sdpa_calls, monkeypatch):
    """With reads forbidden, a static-cache decode step of a left-padded batch still runs
    flash_decode with lengths and leftpad on the device, and equals eager; a row whose mask it
    cannot express (a hole) comes out NaN instead of wrong."""
    ids, mask = padded_batch(device, 7, "left")
    caches, logits = [], []
    for model in (patched, eager):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        kw = {"cache": cache} if _NEW_API else {"past_key_values": cache}
        with torch.no_grad():
            model(ids, attention_mask=mask, **kw)
        caches.append(kw)
    step = torch.randint(1, 100, (3, 1), device=device)
    holed = torch.cat([mask, torch.ones_like(step)], dim=1)
    holed[1, 2] = 0  # row 1: a hole in the middle of its keys
    monkeypatch.setattr(hf_attention, "_can_sync", lambda t: False)
    monkeypatch.setattr(hf_attention, "_read", _no_reads)
    with torch.no_grad():
        for model, kw in zip((patched, eager), caches):
            if not _NEW_API:  # 5.0 guesses the static cache's length from its zero keys (padding)
                kw = dict(kw, cache_position=torch.tensor([7], device=device))
            position = holed.long().cumsum(-1)[:, -1:] - 1
            logits.append(model(step, attention_mask=holed, position_ids=position, **kw).logits)
    fine = torch.tensor([True, False, True], device=device)
    assert relative_error(logits[0][fine], logits[1][fine]) <= 1e-5
    assert torch.isnan(logits[0][1]).all() and not sdpa_calls


def _no_reads(*values):
    raise AssertionError("a host read during a step that must not synchronise")
