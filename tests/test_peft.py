"""apply_kernels with PEFT: LoRA, DoRA, modules_to_save, merged and loaded adapters, and QLoRA
(bitsandbytes 4-bit and 8-bit bases), on a tiny random transformers LLaMA.

Each patched model is checked against the same PEFT model unpatched: the training step's loss and
the trainable (adapter) parameters' gradients, logits or greedy generation; and that the kernels
really ran (``LAUNCHES``) and are counted (``kernel_summary``).  The adapters start with non-zero
LoRA B (``init_lora_weights=False``), so that they change the model and get real gradients.
"""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels.ops.common import LAUNCHES, KernelFallbackWarning
from llama_kernels.ops import registry
from llama_kernels.patch import kernel_summary
from helpers import launched_flags, max_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "cross_entropy": 1}
FAMILIES = registry.FLAGS


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def launched_families():
    return launched_flags()


def tiny_config():
    # Widths are multiples of 64: bitsandbytes' CPU 4-bit inference path (0.50) repacks the
    # weights in blocks of 64 input features and fails on others (e.g. 96).
    return transformers.LlamaConfig(
        vocab_size=120, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def base(device):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).to(device).eval()


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """The tiny model saved, to reload quantised (no model hub here)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    base.save_pretrained(path)
    return path


@pytest.fixture
def ids(device):
    torch.manual_seed(1)
    return torch.randint(1, 120, (2, 11), device=device)


def with_lora(model, **options):
    """``get_peft_model`` with a LoRA on every projection; the same adapter weights every call."""
    options = {"target_modules": TARGETS, **options}
    torch.manual_seed(2)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))


def training_step(model, ids):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(reference, patched, ids, adapter="lora_B"):
    loss, grads = training_step(reference, ids)
    LAUNCHES.clear()
    p_loss, p_grads = training_step(patched, ids)
    # Only the adapter's parameters train, and their gradients are real.
    assert any(adapter in n for n in grads) and all("lora_" in n or "modules_to_save" in n for n in grads)
    assert all(g.abs().max() > 0 for g in grads.values())
    assert abs(p_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads.keys() == p_grads.keys()
    worst = max(relative_error(p_grads[n], grads[n]) for n in grads)
    assert worst <= 2e-3, f"worst relative gradient error {worst:.2e}"


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- LoRA ---------------------------------------------------------------------------------------

def test_lora_patched_before_or_after_get_peft_model(base, ids):
    reference = with_lora(copy.deepcopy(base))
    before = with_lora(lk.apply_kernels(copy.deepcopy(base)))
    after = lk.apply_kernels(with_lora(copy.deepcopy(base)))
    for patched in (before, after):
        assert type(patched.base_model.model.model.layers[0].mlp.gate_proj).__module__.startswith("peft.")
        assert kernel_summary(patched) == FULL
        assert_same_training_step(reference, patched, ids)
        assert launched_families() == set(FAMILIES), dict(LAUNCHES)
        assert "glu_bwd_kernel" in LAUNCHES and "attention_bwd_dq_kernel" in LAUNCHES


def test_dora(base, ids):
    reference = with_lora(copy.deepcopy(base), use_dora=True)
    patched = lk.apply_kernels(with_lora(copy.deepcopy(base), use_dora=True))
    assert kernel_summary(patched) == FULL
    assert_same_training_step(reference, patched, ids, adapter="lora_magnitude_vector")
    assert launched_families() == set(FAMILIES), dict(LAUNCHES)


def test_lm_head_wrapped_after_patching_is_not_counted_and_runs_eager(base, ids):
    """modules_to_save=["lm_head"] wraps the head in a ModulesToSaveWrapper, which the fused loss
    cannot read: it steps aside at call time, and kernel_summary says so (also for norms wrapped
    the same way, only the copy that runs counts)."""
    options = dict(modules_to_save=["lm_head", "input_layernorm"])
    reference = with_lora(copy.deepcopy(base), **options)
    before = with_lora(lk.apply_kernels(copy.deepcopy(base)), **options)
    with pytest.warns(KernelFallbackWarning, match="lm_head of type ModulesToSaveWrapper"):
        after = lk.apply_kernels(with_lora(copy.deepcopy(base), **options))
    wrappers = [m for m in before.modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    assert len(wrappers) == 3  # the head and the two layers' input norms
    for patched in (before, after):
        # 5 norms run, of 7 patched (each wrapped norm is there twice: original and copy).
        assert kernel_summary(patched) == FULL | {"cross_entropy": 0}
        with patched.disable_adapter():  # the originals run instead of the copies
            assert kernel_summary(patched) == FULL | {"cross_entropy": 0}
    assert_same_training_step(reference, before, ids)
    assert launched_families() == set(FAMILIES) - {"cross_entropy"}, dict(LAUNCHES)
    assert LAUNCHES["rms_norm_fwd_kernel"] == 5
    assert any("modules_to_save.default" in n for n, p in before.named_parameters() if p.grad is not None)
    # A LoRA on the head replaces it just as well.
    lora_head = with_lora(lk.apply_kernels(copy.deepcopy(base)), target_modules=TARGETS + ["lm_head"])
    assert kernel_summary(lora_head) == FULL | {"cross_entropy": 0}


def test_merge_and_unload_keeps_the_kernels(base, ids):
    merged = with_lora(copy.deepcopy(base)).merge_and_unload()
    patched = lk.apply_kernels(with_lora(copy.deepcopy(base))).merge_and_unload()
    assert type(patched.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert kernel_summary(patched) == FULL
    expected = logits(merged, ids)
    assert relative_error(expected, logits(base, ids)) > 1e-2  # the merged adapter changes the model
    LAUNCHES.clear()
    assert relative_error(logits(patched, ids), expected) <= 1e-4
    assert launched_families() == set(FAMILIES) - {"cross_entropy"}  # eval: no loss


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "8bit-float16-device-map-auto"])
def test_peft_from_pretrained_onto_patched_base(quantized, base, saved, ids, tmp_path):
    """alpaca-lora's inference flow: a base model (8-bit, float16, device_map="auto"), a saved
    adapter loaded with PeftModel.from_pretrained, greedy generation."""
    with_lora(copy.deepcopy(base)).save_pretrained(tmp_path / "adapter")

    def load():
        if not quantized:
            return copy.deepcopy(base)
        pytest.importorskip("bitsandbytes")
        return transformers.LlamaForCausalLM.from_pretrained(
            saved, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float16,
            device_map="auto")

    reference = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter")
    patched = peft.PeftModel.from_pretrained(lk.apply_kernels(load()), tmp_path / "adapter")
    assert kernel_summary(patched) == FULL
    layer = patched.base_model.model.model.layers[0]
    assert (type(layer.self_attn.q_proj.base_layer).__name__ == "Linear8bitLt") == quantized
    expected = logits(reference, ids)
    assert relative_error(expected, logits(load(), ids)) > 1e-2  # the adapter was loaded
    LAUNCHES.clear()
    error = relative_error(logits(patched, ids), expected)
    # float16: eager's own logits are 2.4e-3 off float32's here, and LLM.int8 quantises every
    # matmul's input rows to int8 again, so a rounding difference can move an input by a step.
    assert error <= (1e-2 if quantized else 1e-4), error
    assert launched_families() == set(FAMILIES) - {"cross_entropy"}
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(input_ids=ids[:, :5], **greedy),
                       reference.generate(input_ids=ids[:, :5], **greedy))


# --- QLoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, patch_first", [(4, True), (8, False)],
                         ids=["4bit-patched-before-peft", "8bit-patched-after-peft"])
def test_qlora_training_step_and_generation(bits, patch_first, saved, ids, device):
    bnb = pytest.importorskip("bitsandbytes")
    quantization = transformers.BitsAndBytesConfig(**{f"load_in_{bits}bit": True})
    layer_class = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt

    def qlora(patched):
        model = transformers.LlamaForCausalLM.from_pretrained(
            saved, quantization_config=quantization, dtype=torch.float32, device_map={"": device})
        assert type(model.model.layers[0].mlp.down_proj) is layer_class
        if patched and patch_first:
            lk.apply_kernels(model)
        model = with_lora(peft.prepare_model_for_kbit_training(model))  # gradient checkpointing on
        return lk.apply_kernels(model) if patched and not patch_first else model

    reference, patched = qlora(False), qlora(True)
    assert kernel_summary(patched) == FULL
    assert_same_training_step(reference, patched, ids)
    assert launched_families() == set(FAMILIES), dict(LAUNCHES)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    LAUNCHES.clear()
    out = patched.eval().generate(input_ids=ids[:, :5], **greedy)
    assert out.shape == (2, 9) and torch.equal(out, reference.eval().generate(input_ids=ids[:, :5], **greedy))
    assert {"rms_norm", "swiglu", "rope", "attention"} <= launched_families()
