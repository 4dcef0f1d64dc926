"""transformers LLaMA patched with the kernels on padded batches, KV caches and packed sequences
(llama_kernels/integrations/transformers/): the answers of the unpatched eager model at every position that
sees a real token, our attention kernel in every layer of every forward, transformers' SDPA only
where it must run."""
import copy
import inspect

import pytest
import torch

import llama_kernels as lk
from llama_kernels.integrations.transformers import attention, host_values
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
def fallbacks(monkeypatch):
    """How many attention calls left the kernels for the model's unpatched attention (eager here)."""
    calls = []
    fallback = attention._fallback

    def counting(*args, **kwargs):
        calls.append(1)
        return fallback(*args, **kwargs)

    monkeypatch.setattr(attention, "_fallback", counting)
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

def unpatched_as(eager, implementation):
    """``eager`` switched to ``implementation``, and a patched copy of it."""
    eager.set_attn_implementation(implementation)
    return eager, lk.apply_kernels(copy.deepcopy(eager))


@pytest.mark.parametrize("unpatched", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("length", [9, 37], ids=["decode-sized", "prefill-sized"])
def test_padded_batch_logits(eager, device, fallbacks, side, length, unpatched):
    """9 tokens x 2 query heads per KV head fit the split-KV kernels (left padding as a leftpad,
    right padding unpadded); 37 take the training kernel on the unpadded tokens.  Every position
    matches the unpatched model: the real ones, right padding's (which ``generate`` reads, given by
    a second, non-causal pass), and left padding's, which see no key (zeros from SDPA, the average
    of every value slot from eager attention, whose mask adds ``finfo.min``)."""
    eager, patched = unpatched_as(eager, unpatched)
    ids, mask = padded_batch(device, length, side)
    with torch.no_grad(), PerForward(patched) as launches:
        logits = patched(ids, attention_mask=mask).logits
        expected = eager(ids, attention_mask=mask).logits
    assert relative_error(logits, expected) <= 1e-5
    assert launches.counts == [LAYERS * (2 if side == "right" else 1)] and not fallbacks


@pytest.mark.parametrize("unpatched", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_training_step(eager, device, fallbacks, side, unpatched):
    """Padded training batches, labels -100 on the padding, forward and backward through the
    unpadded varlen kernels.  Left padding as ``DataCollatorForSeq2Seq`` leaves it (alpaca-lora
    trains so): the first real token's label is predicted at the last padding position, whose
    query sees no key, so the loss and every gradient depend on what attention gives it.  Right
    padding: a second pass gives the padding queries their attention over the real keys."""
    eager, patched = unpatched_as(eager, unpatched)
    ids, mask = padded_batch(device, 12, side)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (eager.train(), patched.train()):
        model.zero_grad()
        LAUNCHES.clear()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (p_loss, p_grads) = results
    assert abs(p_loss - loss) <= 1e-5 * abs(loss)
    worst = max(relative_error(p_grads[n], grads[n]) for n in grads)
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"
    passes = 2 if side == "right" else 1
    assert LAUNCHES["attention_fwd_kernel"] == passes * LAYERS and any("attention_bwd" in n for n in LAUNCHES)
    assert not fallbacks


# --- generation with KV caches ----------------------------------------------------------------

@pytest.mark.parametrize("cache,side,length", [
    ("dynamic", "left", 36), ("static", "left", 36), ("static", "left", 7), ("dynamic", "right", 7),
])
def test_generation_runs_the_kernel_every_step(eager, patched, device, fallbacks, cache, side, length):
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
    assert launches.counts == [prefill] + [LAYERS] * 3 and not fallbacks


def test_chunked_prefill_with_dynamic_cache(eager, patched, device, fallbacks):
    """A prompt fed in two chunks (the second attends to the cache and itself, bottom-right)."""
    ids, mask = padded_batch(device, 40, "left", pads=(4, 0))
    logits = []
    for model in (patched, eager):
        cache = transformers.DynamicCache(config=model.config)
        kw = {"cache": cache} if _NEW_API else {"past_key_values": cache}
        with torch.no_grad():
            model(ids[:, :24], attention_mask=mask[:, :24], **kw)
            logits.append(model(ids[:, 24:], attention_mask=mask, **kw).logits)
    assert relative_error(*logits) <= 1e-5 and not fallbacks



# --- packed (padding-free) sequences ----------------------------------------------------------

LENGTHS = (5, 11, 8)


def packed_batch(device, how, lengths=LENGTHS):
    """``DataCollatorWithFlattening``'s batch of random sequences of ``lengths`` (labels dropped):
    restarting ``position_ids``, with FlashAttention-2's keyword arguments for ``cu_seq_lens``;
    ``no-cache`` adds ``use_cache=False``."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(1)
    sequences = [torch.randint(1, 100, (n,)).tolist() for n in lengths]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=how.startswith("cu_seq_lens"),
                                          return_tensors="pt")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in collator([{"input_ids": s} for s in sequences]).items()}
    batch.pop("labels")
    if how.endswith("no-cache"):
        batch["use_cache"] = False
    return sequences, batch


def logits_and_grads(model, batch, weight):
    model.train().zero_grad()
    logits = model(**batch).logits
    (logits * weight).sum().backward()
    return logits, [p.grad for p in model.parameters()]


def assert_same_logits_and_grads(actual, expected):
    assert relative_error(actual[0], expected[0]) <= 1e-5
    worst = max(relative_error(p, q) for p, q in zip(actual[1], expected[1]))
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"


@pytest.mark.parametrize("how", ["position_ids", "position_ids-no-cache", "cu_seq_lens", "cu_seq_lens-no-cache"])
def test_packed_batches_follow_transformers_rule(eager, patched, device, fallbacks, how):
    """A packed row (``DataCollatorWithFlattening``) is what the unpatched model makes of it:
    transformers' own mask finds packed sequences only without a cache (``use_cache=False``;
    with its default DynamicCache, also in training, the row is one sequence), and SDPA and eager
    attention ignore FlashAttention-2's ``cu_seq_lens_*`` keyword arguments."""
    sequences, batch = packed_batch(device, how)
    weight = torch.randn(1, sum(LENGTHS), 100, device=device)
    LAUNCHES.clear()
    ours = logits_and_grads(patched, batch, weight)
    assert LAUNCHES["attention_fwd_kernel"] == LAYERS and any("attention_bwd" in n for n in LAUNCHES)
    assert_same_logits_and_grads(ours, logits_and_grads(eager, batch, weight))
    if how.endswith("no-cache"):  # packed: each sequence attends only to itself
        eager.zero_grad()
        separate = torch.cat([eager(torch.tensor([s], device=device)).logits for s in sequences], dim=1)
        (separate * weight).sum().backward()
        assert_same_logits_and_grads(ours, (separate, [p.grad for p in eager.parameters()]))
    assert not fallbacks


@pytest.mark.parametrize("use_cache", [True, False])
def test_position_gaps_follow_transformers_rule(eager, patched, device, use_cache):
    """PoSE-style positions with a gap (``0..5, 40..45``) in one sequence: one sequence with a
    cache, two packed ones without (transformers' rule: a new sequence wherever the position does
    not count up by one); either way the unpatched model's answer."""
    ids = torch.randint(1, 100, (2, 12), device=device)
    positions = torch.cat([torch.arange(6), torch.arange(40, 46)]).to(device)[None].expand(2, -1)
    with torch.no_grad():
        LAUNCHES.clear()
        logits = patched(ids, position_ids=positions, use_cache=use_cache).logits
        assert attention_launches() == LAYERS
        expected = eager(ids, position_ids=positions, use_cache=use_cache).logits
        # (not the answer: the gap must matter)
        joined = eager(ids, position_ids=torch.arange(12, device=device)[None], use_cache=use_cache).logits
    assert relative_error(logits, expected) <= 1e-5
    assert relative_error(expected, joined) > 1e-3


def test_flash_attention_models_keep_its_packing_rule(eager, patched, device):
    """A model whose unpatched attention was FlashAttention-2 packs as its functions do: by the
    ``cu_seq_lens_*`` arguments, else by ``position_ids`` restarting, with a cache or not."""
    for layer in patched.model.layers:
        layer.self_attn._lk_unpatched_attention = "flash_attention_2"
    for how in ("position_ids", "cu_seq_lens"):
        sequences, batch = packed_batch(device, how)
        with torch.no_grad():
            logits = patched(**batch).logits
            separate = torch.cat([eager(torch.tensor([s], device=device)).logits for s in sequences], dim=1)
        assert relative_error(logits, separate) <= 1e-5, how


# --- what the kernels cannot express: transformers' SDPA, exactly --------------------------------

def test_custom_4d_mask_goes_to_the_unpatched_attention(eager, patched, device, fallbacks):
    ids = torch.randint(1, 100, (2, 10), device=device)
    allowed = torch.rand(2, 1, 10, 10, device=device) > 0.4
    allowed |= torch.eye(10, dtype=torch.bool, device=device)  # every query sees something
    allowed = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad(), PerForward(patched) as launches:  # (additive: eager reads a mask so)
        logits = patched(ids, attention_mask=allowed).logits
        assert len(fallbacks) == LAYERS
        expected = eager(ids, attention_mask=allowed).logits
    assert relative_error(logits, expected) <= 1e-5 and launches.counts == [0]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("unpatched", ["eager", "sdpa"])
def test_dropout_goes_to_the_unpatched_attention(eager, device, fallbacks, padded, unpatched):
    """Attention dropout draws its random numbers in the unpatched attention: with the same seed
    the patched model gives what that gives, padding mask included."""
    for layer in eager.model.layers:
        layer.self_attn.attention_dropout = 0.3
    eager.config.attention_dropout = 0.3
    eager.set_attn_implementation(unpatched)
    patched = lk.apply_kernels(copy.deepcopy(eager))
    ids, mask = padded_batch(device, 12, "left") if padded else (torch.randint(1, 100, (2, 12), device=device), None)
    outputs = []
    for model in (patched.train(), eager.train()):
        torch.manual_seed(5)
        outputs.append(model(ids, attention_mask=mask).logits)
    assert len(fallbacks) == LAYERS
    assert relative_error(outputs[0], outputs[1]) <= 1e-5


@pytest.mark.parametrize("unpatched", ["eager", "sdpa"])
def test_output_attentions_as_the_unpatched_model(eager, device, unpatched):
    """``output_attentions=True`` returns what the unpatched model returns: eager attention's
    weights, none from SDPA (which the kernels then compute); in ``generate`` too."""
    eager.set_attn_implementation(unpatched)
    patched = lk.apply_kernels(copy.deepcopy(eager))
    ids, mask = padded_batch(device, 8, "left", pads=(3, 0))
    with torch.no_grad():
        LAUNCHES.clear()
        ours = patched(ids, attention_mask=mask, output_attentions=True)
        expected = eager(ids, attention_mask=mask, output_attentions=True)

    def weights(attentions):  # (transformers 5.0 without weights: None)
        return list(attentions or ())

    assert len(weights(ours.attentions)) == len(weights(expected.attentions)) == (LAYERS if unpatched == "eager" else 0)
    for a, b in zip(weights(ours.attentions), weights(expected.attentions)):
        assert relative_error(a, b) <= 1e-5
    assert relative_error(ours.logits, expected.logits) <= 1e-5
    assert (attention_launches() == 0) == (unpatched == "eager")
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_attentions=True,
                  return_dict_in_generate=True, attention_mask=mask)
    ours, expected = patched.generate(ids, **greedy), eager.generate(ids, **greedy)
    assert torch.equal(ours.sequences, expected.sequences)

    def steps(attentions):
        return [weights(step) for step in weights(attentions)]

    assert [len(step) for step in steps(ours.attentions)] == [len(step) for step in steps(expected.attentions)]
    for mine, theirs in zip(steps(ours.attentions), steps(expected.attentions)):
        for a, b in zip(mine, theirs):
            assert relative_error(a, b) <= 1e-5


# --- decode steps that cannot read anything back (CUDA-graph capture, torch.compile) ------------

def test_decode_step_without_host_reads(eager, patched, device, fallbacks, monkeypatch):
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
    monkeypatch.setattr(host_values, "can_read", lambda t: False)
    monkeypatch.setattr(host_values, "read_ints", _no_reads)
    with torch.no_grad():
        for model, kw in zip((patched, eager), caches):
            if not _NEW_API:  # 5.0 guesses the static cache's length from its zero keys (padding)
                kw = dict(kw, cache_position=torch.tensor([7], device=device))
            position = holed.long().cumsum(-1)[:, -1:] - 1
            logits.append(model(step, attention_mask=holed, position_ids=position, **kw).logits)
    fine = torch.tensor([True, False, True], device=device)
    assert relative_error(logits[0][fine], logits[1][fine]) <= 1e-5
    assert torch.isnan(logits[0][1]).all() and not fallbacks


def _no_reads(*values):
    raise AssertionError("a host read during a step that must not synchronise")
