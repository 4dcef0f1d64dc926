"""apply_kernels on transformers LLaMA models: a tiny random one (every path, fast) and the real
trained SmolLM2-135M-Instruct (logits, a training step, greedy and padded-batch generation)."""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels.model import Llama
from llama_kernels.ops.common import LAUNCHES, KernelFallbackWarning
from llama_kernels.patch import kernel_summary
from helpers import ALL_OFF, launched_flags, max_error

transformers = pytest.importorskip("transformers")
def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def launched_families():
    return launched_flags(among=("rms_norm", "swiglu", "rope", "attention"))


def loss_and_grads(model, ids, mask=None):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(model, patched, ids, mask=None):
    loss, grads = loss_and_grads(model, ids, mask)
    p_loss, p_grads = loss_and_grads(patched, ids, mask)
    assert abs(p_loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert grads.keys() == p_grads.keys()
    worst = max(relative_error(p_grads[n], grads[n]) for n in grads)
    assert worst <= 2e-3, f"worst relative gradient error {worst:.2e}"


# --- a tiny random transformers model: every path, quickly ------------------------------------

@pytest.fixture
def tiny(device):
    config = transformers.LlamaConfig(
        vocab_size=120, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device).eval()


def test_tiny_hf_logits_grads_and_launches(tiny, device):
    patched = lk.apply_kernels(copy.deepcopy(tiny))
    ids = torch.randint(1, 120, (2, 19), device=device)
    with torch.no_grad():
        LAUNCHES.clear()
        assert relative_error(patched(ids).logits, tiny(ids).logits) <= 1e-4
    assert launched_families() == {"rms_norm", "swiglu", "rope", "attention"}
    assert_same_training_step(tiny.train(), patched.train(), ids)


def test_tiny_hf_generation_dynamic_static_and_padded(tiny, device):
    patched = lk.apply_kernels(copy.deepcopy(tiny))
    ids = torch.randint(1, 120, (2, 7), device=device)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **greedy), tiny.generate(ids, **greedy))
    static = dict(greedy, cache_implementation="static")
    assert torch.equal(patched.generate(ids, **static), tiny.generate(ids, **static))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of the first row
    ids[0, :3] = 0
    assert torch.equal(patched.generate(ids, attention_mask=mask, **greedy),
                       tiny.generate(ids, attention_mask=mask, **greedy))


def test_tiny_hf_flags_print_and_restore(tiny):
    eager_classes = [type(m) for m in tiny.modules()]
    lk.apply_kernels(tiny, swiglu=False)
    assert kernel_summary(tiny) == {"rms_norm": 5, "swiglu": 0, "rope": 2, "attention": 2, "cross_entropy": 1}
    assert "kernels=[rms_norm]" in repr(tiny) and "kernels=[attention, rope]" in repr(tiny)
    assert tiny.config._attn_implementation == "llama_kernels"
    lk.apply_kernels(tiny, **ALL_OFF)
    assert [type(m) for m in tiny.modules()] == eager_classes
    assert tiny.config._attn_implementation != "llama_kernels" and "kernels" not in repr(tiny)


def test_tiny_hf_llama_model_without_head(tiny, device):
    body = lk.apply_kernels(copy.deepcopy(tiny.model))
    ids = torch.randint(1, 120, (1, 9), device=device)
    with torch.no_grad():
        expected = tiny.model(ids).last_hidden_state
        assert relative_error(body(ids).last_hidden_state, expected) <= 1e-4


# --- the real trained model -------------------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def smollm2(device):
    from llama_kernels.cli import load_smollm2, smollm2_path

    pytest.importorskip("gguf", reason="transformers reads SmolLM2's GGUF file with the gguf package")
    try:
        smollm2_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    model, tokenizer = load_smollm2(torch.float32, device, quiet=True)
    return model, lk.apply_kernels(copy.deepcopy(model)), tokenizer


def test_smollm2_logits_and_kernels_ran(smollm2, device):
    model, patched, tok = smollm2
    assert kernel_summary(patched) == {"rms_norm": 61, "swiglu": 30, "rope": 30, "attention": 30, "cross_entropy": 1}
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        LAUNCHES.clear()
        error = relative_error(patched(ids).logits, model(ids).logits)
    assert error <= 1e-4
    assert launched_families() == {"rms_norm", "swiglu", "rope", "attention"}


@pytest.mark.latest_only
def test_smollm2_training_step(smollm2, device):
    model, patched, tok = smollm2
    ids = tok(PROMPTS[1] + " return n if n < 2 else", return_tensors="pt").input_ids.to(device)
    LAUNCHES.clear()
    assert_same_training_step(model, patched, ids)
    assert {"attention_fwd_kernel", "rms_norm_bwd_kernel", "glu_bwd_kernel"} <= set(LAUNCHES)
    assert any("attention_bwd" in name for name in LAUNCHES)


@pytest.mark.latest_only
def test_smollm2_greedy_generation_token_for_token(smollm2, device):
    model, patched, tok = smollm2
    for prompt in PROMPTS[:2]:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        greedy = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(patched.generate(ids, **greedy), model.generate(ids, **greedy)), prompt


@pytest.mark.latest_only
def test_smollm2_padded_batch_generation(smollm2, device):
    model, patched, tok = smollm2
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to(device)
    assert (batch.attention_mask == 0).any()
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(patched.generate(**batch, **greedy), model.generate(**batch, **greedy))


def test_from_hf_matches_smollm2(smollm2, device):
    model, _, tok = smollm2
    ours = Llama.from_hf(model).to(device)
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        assert relative_error(ours(ids), model(ids).logits) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 end to end is checked on a GPU")
def test_smollm2_bf16_within_twice_eager_error(smollm2, device):
    """In bf16 the patched model's logits are as close to a float64 run as eager bf16's (2x rule)."""
    model, _, tok = smollm2
    ids = tok(PROMPTS, return_tensors="pt", padding=True).input_ids.to(device)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(ids).logits
        eager = copy.deepcopy(model).to(torch.bfloat16)
        patched = lk.apply_kernels(copy.deepcopy(eager))
        eager_logits, patched_logits = eager(ids).logits, patched(ids).logits
    assert max_error(patched_logits, oracle) <= 2 * max_error(eager_logits, oracle) + 1e-6 * oracle.abs().max().item()


# --- modules the kernels cannot take; accelerate offloading ----------------------------------

def test_tiny_hf_unsupported_modules_stay_eager(device):
    """A GELU MLP and head dim 24: those modules keep transformers' code (one warning at patch
    time), the rest runs the kernels, the model's answers do not change."""
    from llama_kernels.ops.common import KernelFallbackWarning

    config = transformers.LlamaConfig(
        vocab_size=120, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="gelu", max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    with pytest.warns(KernelFallbackWarning) as caught:
        patched = lk.apply_kernels(copy.deepcopy(model))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 x LlamaMLP with activation GELUActivation" in message and "2 x LlamaAttention with head_dim 24" in message
    assert kernel_summary(patched) == {"rms_norm": 5, "swiglu": 0, "rope": 2, "attention": 0, "cross_entropy": 1}
    ids = torch.randint(1, 120, (2, 11), device=device)
    with torch.no_grad():
        LAUNCHES.clear()
        assert relative_error(patched(ids).logits, model(ids).logits) <= 1e-4
    assert launched_families() == {"rms_norm", "rope"}
    assert_same_training_step(model.train(), patched.train(), ids)


def test_tiny_hf_accelerate_hooks_keep_the_kernels(tiny, device):
    """accelerate's hooks bind a module's forward on the instance: patching afterwards must still
    run the kernels there (and counting must follow the hook's execution device, not the
    offloaded weights' meta device)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    ids = torch.randint(1, 120, (1, 9), device=device)
    with torch.no_grad():
        expected = tiny(ids).logits
    model = copy.deepcopy(tiny)
    accelerate.cpu_offload(model.model.layers[1], execution_device=device)  # weights to meta
    add_hook_to_module(model.model.layers[0].mlp, AlignDevicesHook(execution_device=device))
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    lk.apply_kernels(model)
    assert kernel_summary(model) == {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "cross_entropy": 1}
    with torch.no_grad():
        LAUNCHES.clear()
        assert relative_error(model(ids).logits, expected) <= 1e-4
    assert LAUNCHES["glu_fwd_kernel"] == 2, dict(LAUNCHES)
    remove_hook_from_module(model.model.layers[0].mlp)  # leaves the bound forward on the instance
    lk.apply_kernels(model, swiglu=False)
    with torch.no_grad():
        LAUNCHES.clear()
        assert relative_error(model(ids).logits, expected) <= 1e-4
    assert "glu_fwd_kernel" not in LAUNCHES and kernel_summary(model)["swiglu"] == 0


def test_tiny_hf_float64_stays_eager(tiny, device):
    """A float64 transformers model: every module keeps its eager code at patch time, and the
    patched model gives the unpatched logits, loss and gradients."""
    tiny = tiny.double()
    with pytest.warns(KernelFallbackWarning, match="float64 weights"):
        patched = lk.apply_kernels(copy.deepcopy(tiny))
    assert set(kernel_summary(patched).values()) == {0}
    ids = torch.randint(1, 120, (2, 9), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    LAUNCHES.clear()
    with torch.no_grad():
        assert torch.equal(patched(ids, attention_mask=mask).logits, tiny(ids, attention_mask=mask).logits)
    assert not LAUNCHES
    loss, grads = loss_and_grads(tiny.train(), ids, mask)
    p_loss, p_grads = loss_and_grads(patched.train(), ids, mask)
    assert torch.equal(loss, p_loss) and all(torch.equal(grads[n], p_grads[n]) for n in grads)
