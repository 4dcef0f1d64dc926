"""The fused LM head + cross-entropy inside models: ``Llama.loss`` of the reference model and the
training forward of a patched transformers ``LlamaForCausalLM`` give the loss and gradients of the
eager model, without logits, and run the fused kernels; every other call keeps the eager path."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.model import Llama, LlamaConfig
from llama_kernels.ops.common import KernelFallbackWarning, LAUNCHES
from llama_kernels.patch import kernel_summary, original_class
from helpers import launched_flags, max_error

CE_KERNELS = {"cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"}
# Only the fused loss patched: the rest of the model stays eager, so the loss and every gradient
# must agree with the eager model to float32 rounding (the other kernels have their own tests).
CE_ONLY = dict(rms_norm=False, swiglu=False, rope=False, attention=False, cross_entropy=True)
ALL_OFF = dict(CE_ONLY, cross_entropy=False)
TOLERANCE = 1e-5


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def ce_launches():
    return CE_KERNELS & set(LAUNCHES)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(patched, model, tolerance=TOLERANCE):
    grads, p_grads = grads_of(model), grads_of(patched)
    assert grads.keys() == p_grads.keys() and grads
    worst = max(grads, key=lambda n: relative_error(p_grads[n], grads[n]))
    assert relative_error(p_grads[worst], grads[worst]) <= tolerance, f"{worst}: gradients differ"


# --- the reference model: Llama.loss and its op slot ------------------------------------------

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def llama(device):
    torch.manual_seed(0)
    return Llama(CONFIG).to(device)


def labels_with_ignored(ids):
    labels = torch.randint_like(ids, CONFIG.vocab_size)  # not the inputs: shows labels are read
    labels[0, 3:6] = -100
    labels[1, -1] = -100
    return labels


def test_reference_loss_is_the_shifted_cross_entropy_of_the_logits(llama, device):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), device=device)
    labels = labels_with_ignored(ids)
    with torch.no_grad():
        logits = llama(ids)
        # Position t predicts token t + 1: the last position has no target.
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        expected_labels = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        assert relative_error(llama.loss(ids), expected) <= TOLERANCE
        assert relative_error(llama.loss(ids, ids), expected) <= TOLERANCE
        assert relative_error(llama.loss(ids, labels), expected_labels) <= TOLERANCE
        assert relative_error(llama.loss(ids, labels.int()), expected_labels) <= TOLERANCE
        # The hidden states behind the loss are the ones the logits come from.
        assert torch.equal(llama.lm_head(llama.hidden_states(ids)), logits)


@pytest.mark.parametrize("with_labels", [False, True], ids=["labels=input_ids", "labels_with_-100"])
def test_patched_reference_loss_and_grads_equal_eager(llama, device, with_labels):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), device=device)
    labels = labels_with_ignored(ids) if with_labels else None
    patched = lk.apply_kernels(copy.deepcopy(llama), **CE_ONLY)
    assert type(patched).cross_entropy is not reference.fused_linear_cross_entropy
    loss = llama.loss(ids, labels)
    loss.backward()
    LAUNCHES.clear()
    p_loss = patched.loss(ids, labels)
    p_loss.backward()
    assert ce_launches() == CE_KERNELS, dict(LAUNCHES)
    assert p_loss.dtype == torch.float32
    assert relative_error(p_loss, loss) <= TOLERANCE
    assert_same_grads(patched, llama)


def test_fully_patched_reference_model(llama, device):
    """Every kernel on: the loss still matches, generation and pickling still work."""
    import io

    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), device=device)
    patched = lk.apply_kernels(copy.deepcopy(llama))
    assert kernel_summary(patched)["cross_entropy"] == 1 and "kernels=[cross_entropy]" in repr(patched)
    LAUNCHES.clear()
    patched.loss(ids).backward()
    assert ce_launches() == CE_KERNELS
    llama.loss(ids).backward()
    assert relative_error(patched.loss(ids), llama.loss(ids)) <= 1e-4
    assert_same_grads(patched, llama, tolerance=2e-3)  # attention and norms differ in rounding
    assert torch.equal(patched.generate(ids[:, :4], 5), llama.generate(ids[:, :4], 5))
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(patched) and kernel_summary(loaded) == kernel_summary(patched)
    with torch.no_grad():
        assert torch.equal(loaded.loss(ids), patched.loss(ids))


def test_reference_cross_entropy_flag(llama, device):
    ids = torch.randint(0, CONFIG.vocab_size, (1, 7), device=device)
    lk.apply_kernels(llama, cross_entropy=False)
    assert type(llama).cross_entropy is reference.fused_linear_cross_entropy
    assert kernel_summary(llama)["cross_entropy"] == 0
    LAUNCHES.clear()
    llama.loss(ids).backward()
    assert not ce_launches()
    lk.apply_kernels(llama, **CE_ONLY)
    patched_class = type(llama)
    assert lk.apply_kernels(llama, **CE_ONLY) is llama and type(llama) is patched_class  # idempotent
    assert kernel_summary(llama) == dict.fromkeys(("rms_norm", "swiglu", "rope", "attention"), 0) | {
        "cross_entropy": 1}
    lk.apply_kernels(llama, **ALL_OFF)
    assert type(llama) is Llama and all(type(m).__module__ != "llama_kernels.patch" for m in llama.modules())


@pytest.mark.parametrize("labels, error, match", [
    ([[1, 2, 3]], TypeError, "labels must be a torch.Tensor"),
    (torch.zeros(1, 3), TypeError, "labels must be an integer tensor"),
    (torch.zeros(1, 3, dtype=torch.bool), TypeError, "labels must be an integer tensor"),
    (torch.zeros(1, 4, dtype=torch.long), ValueError, r"labels must have input_ids' shape \(1, 3\)"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"labels must have input_ids' shape"),
])
def test_loss_refuses_bad_labels_before_running(llama, device, labels, error, match):
    patched = lk.apply_kernels(llama, **CE_ONLY)
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device)
    LAUNCHES.clear()
    with pytest.raises(error, match=match):
        patched.loss(torch.zeros(1, 3, dtype=torch.long, device=device), labels)
    assert not LAUNCHES
    with pytest.raises(TypeError, match="input_ids"):
        patched.loss(torch.zeros(1, 3, device=device))


# --- transformers: LlamaForCausalLM ------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB = 120


def tiny_hf(device, **overrides):
    config = transformers.LlamaConfig(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
               tie_word_embeddings=False),
        **overrides,
    })
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device).train()


@pytest.fixture
def hf_pair(device):
    """(eager, patched with the fused loss only), both in training mode."""
    model = tiny_hf(device)
    return model, lk.apply_kernels(copy.deepcopy(model), **CE_ONLY)


def run(model, *args, **kwargs):
    model.zero_grad()
    out = model(*args, **kwargs)
    out.loss.backward()
    return out


def assert_same_training_step(model, patched, *args, **kwargs):
    """The patched forward's loss and gradients are the eager ones, with no logits, from the
    fused kernels."""
    out = run(model, *args, **kwargs)
    LAUNCHES.clear()
    p_out = run(patched, *args, **kwargs)
    assert ce_launches() == CE_KERNELS, dict(LAUNCHES)
    assert p_out.logits is None and out.logits is not None
    assert relative_error(p_out.loss, out.loss) <= TOLERANCE
    assert_same_grads(patched, model)
    return out, p_out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_training_loss_and_grads_equal_eager(device, tied):
    model = tiny_hf(device, tie_word_embeddings=tied)
    patched = lk.apply_kernels(copy.deepcopy(model), **CE_ONLY)
    assert kernel_summary(patched)["cross_entropy"] == 1
    ids = torch.randint(1, VOCAB, (2, 13), device=device)
    out, p_out = assert_same_training_step(model, patched, ids, labels=ids)
    assert type(p_out) is type(out)
    # The cache and the other fields come from the base model, as in the original output.
    assert p_out.keys() == out.keys() - {"logits"}


def test_hf_signature_is_the_original(hf_pair):
    """transformers' Trainer and generate read the accepted arguments from the signature."""
    model, patched = hf_pair
    assert inspect.signature(patched.forward) == inspect.signature(model.forward)
    assert patched.forward.__doc__ == model.forward.__doc__


def test_hf_positional_arguments_and_return_dict_false(hf_pair, device):
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 9), device=device)
    mask = torch.ones_like(ids)
    # (input_ids, attention_mask, position_ids, cache, inputs_embeds, labels): labels positional
    out = model(ids, mask, None, None, None, ids)
    LAUNCHES.clear()
    p_out = patched(ids, mask, None, None, None, ids)
    assert ce_launches() and p_out.logits is None
    assert relative_error(p_out.loss, out.loss) <= TOLERANCE
    as_tuple = patched(ids, labels=ids, return_dict=False)
    eager_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(eager_tuple) - 1  # no logits
    assert relative_error(as_tuple[0], eager_tuple[0]) <= TOLERANCE


def test_hf_eval_mode_and_calls_without_labels_keep_the_logits(hf_pair, device):
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 9), device=device)
    with torch.no_grad():
        LAUNCHES.clear()
        p_eval, eval_ = patched.eval()(ids, labels=ids), model.eval()(ids, labels=ids)
        assert not ce_launches()
        assert torch.equal(p_eval.logits, eval_.logits) and torch.equal(p_eval.loss, eval_.loss)
        p_train = patched.train()(ids)
        assert p_train.loss is None and torch.equal(p_train.logits, model.train()(ids).logits)
    assert not ce_launches()


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "int"])
def test_hf_num_items_in_batch(hf_pair, device, as_tensor):
    """The Trainer's gradient-accumulation normalisation: the sum over tokens divided by it."""
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 10), device=device)
    num_items = torch.tensor(37, device=device) if as_tensor else 37
    out, p_out = assert_same_training_step(model, patched, ids, labels=ids, num_items_in_batch=num_items)
    # It changed something: the sum over 18 tokens over 37 is not the mean.
    mean = model(ids, labels=ids).loss
    assert relative_error(out.loss, mean * 18 / 37) <= TOLERANCE


@pytest.mark.parametrize("keep", ["int", "tensor"])
def test_hf_logits_to_keep_with_labels_of_that_length(hf_pair, device, keep):
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 12), device=device)
    if keep == "int":
        logits_to_keep, labels = 5, ids[:, -5:]
    else:
        logits_to_keep = torch.tensor([0, 2, 3, 7, 11], device=device)
        labels = ids[:, logits_to_keep]
    assert_same_training_step(model, patched, ids, labels=labels, logits_to_keep=logits_to_keep)


def test_hf_shift_labels(hf_pair, device):
    """Given ``shift_labels`` (already aligned with the positions), the labels are not shifted."""
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 10), device=device)
    shift_labels = torch.randint(0, VOCAB, (2, 10), device=device)
    shift_labels[:, -1] = -100
    out, _ = assert_same_training_step(model, patched, ids, labels=ids, shift_labels=shift_labels)
    assert (out.loss - model(ids, labels=ids).loss).abs() > 1e-3  # shift_labels were used


def test_hf_padding_ignored_and_custom_ignore_index(hf_pair, device):
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 11), device=device)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding of the second row
    labels = ids.masked_fill(mask == 0, -100)
    assert_same_training_step(model, patched, ids, attention_mask=mask, labels=labels)
    padded = ids.masked_fill(mask == 0, 0)  # pad_token_id 0 as the ignored label instead
    assert_same_training_step(model, patched, padded, attention_mask=mask, labels=padded, ignore_index=0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the eager run
def test_hf_cache_argument_under_either_name(hf_pair, device):
    """A cache from a prefix, passed as the version's own argument or as ``past_key_values`` (the
    name transformers 5.0 uses; later 5.x accept it as a deprecated alias of ``cache``)."""
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (1, 12), device=device)
    with torch.no_grad():
        prefix = model(ids[:, :5], use_cache=True)
    cache = prefix.get("cache", prefix.get("past_key_values"))
    names = {"past_key_values"} | ({"cache"} if "cache" in inspect.signature(model.forward).parameters else set())
    rest = ids[:, 5:]
    for name in sorted(names):
        # Each forward appends to the cache it is given: each gets its own copy of the prefix's.
        out = run(model, rest, labels=rest, **{name: copy.deepcopy(cache)})
        LAUNCHES.clear()
        p_out = run(patched, rest, labels=rest, **{name: copy.deepcopy(cache)})
        assert ce_launches() == CE_KERNELS and p_out.logits is None, name
        assert relative_error(p_out.loss, out.loss) <= TOLERANCE, name
        assert_same_grads(patched, model)
        assert p_out.get("cache", p_out.get("past_key_values")).get_seq_length() == 12, name


def test_hf_custom_loss_function_and_hooked_head_run_the_original(hf_pair, device):
    model, patched = hf_pair
    ids = torch.randint(1, VOCAB, (2, 8), device=device)

    def custom_loss(logits, labels, vocab_size, **kwargs):
        return logits.float().square().mean()

    patched.loss_function = custom_loss
    LAUNCHES.clear()
    out = patched(ids, labels=ids)
    assert out.logits is not None and not ce_launches()
    assert torch.equal(out.loss, out.logits.float().square().mean())
    from transformers.loss.loss_utils import ForCausalLMLoss

    patched.loss_function = ForCausalLMLoss  # the standard loss, set explicitly: fused again
    assert patched(ids, labels=ids).logits is None
    # A hook on the LM head (an adapter, offloading) would be skipped by reading its weight.
    handle = patched.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    try:
        LAUNCHES.clear()
        out = patched(ids, labels=ids)
        assert out.logits is not None and not ce_launches()
    finally:
        handle.remove()


def test_hf_fully_patched_training_step_runs_every_kernel(device):
    model = tiny_hf(device)
    patched = lk.apply_kernels(copy.deepcopy(model))
    ids = torch.randint(1, VOCAB, (2, 9), device=device)
    out = run(model, ids, labels=ids)
    LAUNCHES.clear()
    p_out = run(patched, ids, labels=ids)
    for family in ("rms_norm", "swiglu", "rope", "attention"):
        assert family in launched_flags(), f"no {family} kernel launched: {dict(LAUNCHES)}"
    assert ce_launches() == CE_KERNELS, dict(LAUNCHES)
    assert p_out.logits is None and relative_error(p_out.loss, out.loss) <= 1e-4
    assert_same_grads(patched, model, tolerance=2e-3)  # attention and norms differ in rounding


def test_hf_flag_reapply_and_restore(hf_pair, device):
    model, patched = hf_pair
    base = type(model)
    patched_class = type(patched)
    assert original_class(patched) is base and patched_class.__name__ == base.__name__
    assert lk.apply_kernels(patched, **CE_ONLY) is patched and type(patched) is patched_class
    lk.apply_kernels(patched, **ALL_OFF)
    assert type(patched) is base and kernel_summary(patched)["cross_entropy"] == 0
    ids = torch.randint(1, VOCAB, (1, 6), device=device)
    assert patched(ids, labels=ids).logits is not None
    # The base model without a head has nothing to fuse.
    body = lk.apply_kernels(copy.deepcopy(model.model))
    assert kernel_summary(body)["cross_entropy"] == 0


def test_hf_softcapped_logits_are_refused_at_patch_time(device):
    """Gemma 2/3 squash the logits before the loss: such a model keeps its forward for this
    family, with one warning."""
    model = tiny_hf(device)
    model.config.final_logit_softcapping = 30.0
    with pytest.warns(KernelFallbackWarning, match="final_logit_softcapping 30.0") as caught:
        lk.apply_kernels(model, **CE_ONLY)
    assert len(caught) == 1
    assert type(model)._lk_kernels == () and kernel_summary(model)["cross_entropy"] == 0
    assert "eager=[cross_entropy: final_logit_softcapping 30.0" in repr(model)  # print(model) says so
