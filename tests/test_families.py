"""apply_kernels on a tiny random transformers model of every family (LLaMA, Mistral, Qwen2, Qwen3,
Gemma 1/2/3, Phi-3), in float32 with inputs longer than the sliding windows: the patched model gives
the unpatched one's logits, loss, gradients and greedy generations, and the kernels run in every layer
(sliding-window, soft-capped, offset-norm, GeGLU, q/k-norm and fused-projection layers included)."""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels.integrations.transformers import attention
from llama_kernels.integrations.transformers.families import FAMILIES
from llama_kernels.ops.common import LAUNCHES, KernelFallbackWarning
from llama_kernels.patch import kernel_summary
from helpers import ALL_OFF, launched_flags, max_error

transformers = pytest.importorskip("transformers")

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
SLIDING = [key for key, family in FAMILIES.items() if "sliding_window" in family.features]
def tiny_model(family, device, **overrides):
    """A tiny random model of ``family`` (a key of ``FAMILIES``) with the family's own features on."""
    declared = FAMILIES[family]
    config = getattr(transformers, declared.config_class)(**{**TINY, **declared.features, **overrides})
    if getattr(config, "attn_logit_softcapping", None) is not None:
        # transformers 5.0 builds Gemma 2 with SDPA, which silently skips the soft-capping (later
        # releases refuse SDPA there): eager attention is the model's math, the kernels compute it.
        config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, declared.causal_lm_class)(config).to(device).eval()
    with torch.no_grad():  # Gemma's norms start at zero weight (scale 1): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def launched_families():
    return launched_flags()


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if any attention call leaves the kernels (SDPA or eager attention)."""
    def refuse(*args, **kwargs):
        raise AssertionError("attention fell back to transformers' own implementation")
    monkeypatch.setattr(attention, "_fallback", refuse)


def loss_and_grads(model, ids, mask=None):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_gradients_and_kernels(family, device, no_fallback):
    model = tiny_model(family, device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    counts = kernel_summary(patched)
    layers = model.config.num_hidden_layers
    qk_norms = 2 * layers if family in ("qwen3", "gemma3") else 0
    per_layer_norms = 4 if family in ("gemma2", "gemma3") else 2  # Gemma 2/3: pre and post feed-forward norms
    assert counts == {"rms_norm": per_layer_norms * layers + 1 + qk_norms, "swiglu": layers, "rope": layers,
                      "attention": layers, "cross_entropy": 1}, counts
    ids = torch.randint(3, VOCAB, (2, 13), device=device)
    with torch.no_grad():
        LAUNCHES.clear()
        logits = patched(ids).logits
        assert launched_families() == {"rms_norm", "swiglu", "rope", "attention"}
        assert relative_error(logits, model(ids).logits) <= 1e-5

    loss, grads = loss_and_grads(model.train(), ids)
    LAUNCHES.clear()
    p_loss, p_grads = loss_and_grads(patched.train(), ids)
    assert launched_families() == {"rms_norm", "swiglu", "rope", "attention", "cross_entropy"}
    assert abs(p_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads.keys() == p_grads.keys()
    worst = max(relative_error(p_grads[n], grads[n]) for n in grads)
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"


@pytest.mark.latest_only
@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_generation(family, device):
    """Past the window the sliding-window cache keeps only its last keys: those layers run
    transformers' attention then (exactly), the others the kernels."""
    model = tiny_model(family, device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (2, 4), device=device)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **greedy), model.generate(ids, **greedy))


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_with_padding(family, device):
    """Left padding keeps the real keys contiguous: the kernels run the window on the unpadded
    tokens.  Right padding does not (unpadding would shorten the distances): transformers'
    attention runs (Gemma 2's eager one, soft-capped).  Every position matches, left padding's
    too, which see no key (Gemma 2's unpatched attention is eager: the average of all value slots)."""
    model = tiny_model(family, device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (3, 12), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    with torch.no_grad():
        want, got = model(ids, attention_mask=mask).logits, patched(ids, attention_mask=mask).logits
    assert relative_error(got, want) <= 1e-5
    # left padding only: every layer in the kernels
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(attention, "_fallback", lambda *a, **k: pytest.fail("fell back"))
        got = patched(ids[[0, 2]], attention_mask=mask[[0, 2]]).logits
    assert relative_error(got, want[[0, 2]]) <= 1e-5


def test_left_padded_training_with_eager_attention(device, no_fallback):
    """Gemma 2 (eager attention unpatched, soft-capped) on a left-padded training batch, labels
    -100 on the padding (``DataCollatorForSeq2Seq``): the first real token's label is predicted at
    the last padding position, whose query sees no key; the loss and gradients are the unpatched
    model's."""
    model = tiny_model("gemma2", device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (2, 10), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for m in (model.train(), patched.train()):
        m.zero_grad()
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss, grads), (p_loss, p_grads) = results
    assert abs(p_loss - loss) <= 1e-5 * abs(loss)
    worst = max(relative_error(p_grads[n], grads[n]) for n in grads)
    assert worst <= 1e-4, f"worst relative gradient error {worst:.2e}"


def test_sliding_window_packed_sequences(device, no_fallback):
    """Packed rows (position_ids restarting, no cache): the window applies within each sequence."""
    model = tiny_model("mistral", device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (1, 17), device=device)
    positions = torch.cat([torch.arange(9), torch.arange(8)]).to(device)[None]
    with torch.no_grad():
        want = model(ids, position_ids=positions, use_cache=False).logits
        got = patched(ids, position_ids=positions, use_cache=False).logits
    assert relative_error(got, want) <= 1e-5


def test_family_heads_and_wrappers(device, no_fallback):
    """Rows follow the decoder modules: a sequence classifier, a bare base model and a user's
    wrapper module around one are patched as the causal LM is."""
    base = tiny_model("qwen3", device)
    ids = torch.randint(3, VOCAB, (2, 9), device=device)
    classifier = transformers.Qwen3ForSequenceClassification(base.config).to(device).eval()
    classifier.model.load_state_dict(base.model.state_dict())

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids).last_hidden_state

    cases = [(classifier, lambda m: m(ids).logits), (base.model, lambda m: m(ids).last_hidden_state),
             (Wrapper(copy.deepcopy(base.model)), lambda m: m(ids))]
    for model, run in cases:
        patched = lk.apply_kernels(copy.deepcopy(model))
        assert kernel_summary(patched)["attention"] == 2
        with torch.no_grad():
            LAUNCHES.clear()
            got = run(patched)
            assert {"rms_norm", "swiglu", "rope", "attention"} <= launched_families()
            assert relative_error(got, run(model)) <= 1e-5


def test_unknown_models_and_modules_are_refused_or_stay_eager(device):
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                          bos_token_id=0, eos_token_id=0))
    with pytest.raises(TypeError, match="Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3"):
        lk.apply_kernels(gpt2)
    # exact GELU has no kernel; Gemma 2 with final-logit soft-capping keeps transformers' loss
    model = tiny_model("gemma2", device, hidden_activation="gelu", final_logit_softcapping=30.0)
    with pytest.warns(KernelFallbackWarning, match="swiglu: 2 x Gemma2MLP with activation GELUActivation"):
        patched = lk.apply_kernels(copy.deepcopy(model))
    text = repr(patched)
    assert "eager=[swiglu: activation GELUActivation" in text
    assert "eager=[cross_entropy: final_logit_softcapping 30.0" in text
    assert kernel_summary(patched)["swiglu"] == 0 and kernel_summary(patched)["cross_entropy"] == 0
    ids = torch.randint(3, VOCAB, (2, 9), device=device)
    out = patched.train()(ids, labels=ids)
    assert out.logits is not None and abs(out.loss.item() - model.train()(ids, labels=ids).loss.item()) <= 1e-5
    lk.apply_kernels(patched, **ALL_OFF)
    assert "eager=" not in repr(patched) and "kernels=" not in repr(patched)


def test_subclass_with_its_own_forward_stays_eager(device):
    """A user's subclass of a family module that overrides forward computes something else: no row."""
    model = tiny_model("mistral", device)
    mlp_class = type(model.model.layers[0].mlp)

    class ScaledMLP(mlp_class):
        def forward(self, x):
            return 2 * super().forward(x)

    model.model.layers[0].mlp.__class__ = ScaledMLP
    patched = lk.apply_kernels(copy.deepcopy(model))
    assert type(patched.model.layers[0].mlp) is ScaledMLP and kernel_summary(patched)["swiglu"] == 1
    ids = torch.randint(3, VOCAB, (1, 7), device=device)
    with torch.no_grad():
        assert relative_error(patched(ids).logits, model(ids).logits) <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_generation_past_the_window_runs_the_kernels(family, device, no_fallback):
    """Once a sliding-window cache layer is full it keeps only its last keys (the mask's
    ``kv_offset``): the kernels still run there, with dynamic and static caches and left padding."""
    model = tiny_model(family, device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (2, 4), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for options in (greedy, dict(greedy, attention_mask=mask), dict(greedy, cache_implementation="static")):
        assert torch.equal(patched.generate(ids, **options), model.generate(ids, **options))


def test_sliding_window_of_one_with_a_cache(device):
    """transformers is inconsistent here: a sliding-window cache of window 1 keeps every token (it
    keeps the last ``window - 1``) while its mask covers one key slot, which SDPA broadcasts over
    all of them.  The patched model gives the unpatched model's answer all the same (its attention
    runs those layers), in greedy generation of a left-padded batch."""
    model = tiny_model("mistral", device, sliding_window=1)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB, (2, 6), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=mask,
                  output_scores=True, return_dict_in_generate=True)
    ours, theirs = patched.generate(ids, **greedy), model.generate(ids, **greedy)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        assert relative_error(a, b) <= 1e-5
