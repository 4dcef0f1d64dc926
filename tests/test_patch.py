"""apply_kernels on the reference model: same logits, gradients and generations as eager."""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels.model import Llama, LlamaConfig
from llama_kernels.ops.common import LAUNCHES, KernelFallbackWarning
from llama_kernels.patch import kernel_summary
from helpers import ALL_OFF, max_error

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    m = Llama(CONFIG).to(device)
    with torch.no_grad():  # norms away from 1 so that a wrong weight would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _relative(a, b):
    return max_error(a, b) / b.abs().max().item()


def _loss_and_grads(m, ids):
    m.zero_grad()
    logits = m(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flags", [
    {},  # everything
    {**ALL_OFF, "rms_norm": True},
    {**ALL_OFF, "swiglu": True},
    {**ALL_OFF, "rope": True},
    {**ALL_OFF, "attention": True},
])
def test_patched_model_matches_eager(model, flags, device):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), device=device)
    patched = lk.apply_kernels(copy.deepcopy(model), **flags)
    logits, grads = _loss_and_grads(model, ids)
    p_logits, p_grads = _loss_and_grads(patched, ids)
    assert _relative(p_logits, logits) <= 1e-4
    assert grads.keys() == p_grads.keys()
    for name in grads:
        assert _relative(p_grads[name], grads[name]) <= 2e-3, name
    prompt = ids[:, :5]
    assert torch.equal(patched.generate(prompt, 8), model.generate(prompt, 8))


def test_bf16_patched_error_within_twice_eager(model, device):
    """In bf16, the patched model's logits are as close to a float64 model as eager's (2x rule)."""
    ids = torch.randint(0, CONFIG.vocab_size, (2, 21), device=device)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(ids)
        eager = copy.deepcopy(model).to(torch.bfloat16)(ids)
        patched = lk.apply_kernels(copy.deepcopy(model).to(torch.bfloat16))(ids)
    assert max_error(patched, oracle) <= 2 * max_error(eager, oracle) + 1e-6


def test_every_kernel_family_launches(model, device):
    patched = lk.apply_kernels(model)
    LAUNCHES.clear()
    ids = torch.randint(0, CONFIG.vocab_size, (1, 6), device=device)
    patched(ids).sum().backward()
    launched = " ".join(LAUNCHES)
    for family in ("rms_norm_fwd", "rms_norm_bwd", "glu_", "rope", "attention"):
        assert family in launched, f"no {family} kernel launched: {dict(LAUNCHES)}"


def test_idempotent_and_reversible(model):
    lk.apply_kernels(model)
    classes = [type(m) for m in model.modules()]
    assert lk.apply_kernels(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert kernel_summary(model) == {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "cross_entropy": 1}
    assert "kernels=[rms_norm]" in repr(model) and "kernels=[attention, rope]" in repr(model)
    lk.apply_kernels(model, swiglu=False)
    assert kernel_summary(model)["swiglu"] == 0 and kernel_summary(model)["rms_norm"] == 5
    lk.apply_kernels(model, **ALL_OFF)
    assert all(type(m).__module__ in ("llama_kernels.model", "torch.nn.modules.sparse",
                                      "torch.nn.modules.linear", "torch.nn.modules.container")
               for m in model.modules())
    assert "kernels" not in repr(model)


def test_state_dict_unchanged(model):
    before = model.state_dict()
    lk.apply_kernels(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        lk.apply_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="rope"):
        lk.apply_kernels(Llama(CONFIG), rope="yes")


def test_patched_model_pickles(model, device):
    """torch.save/torch.load of a whole patched model keeps its kernels (classes found by name)."""
    import io

    patched = lk.apply_kernels(model, swiglu=False)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert kernel_summary(loaded) == kernel_summary(patched)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 5), device=device)
    with torch.no_grad():
        assert torch.equal(loaded(ids), patched(ids))


# --- modules the kernels cannot take, and modules where no kernel runs --------------------------

@pytest.mark.parametrize("head_dim", [24, 8])
def test_unsupported_head_dim_runs_eagerly_with_one_warning(head_dim, device):
    """The attention kernel takes head dims that are multiples of 16: other attention modules are
    left eager at patch time (one warning), never failing inside a forward; RoPE still runs."""
    from llama_kernels.ops.common import KernelFallbackWarning

    config = LlamaConfig(vocab_size=97, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Llama(config).to(device)
    with pytest.warns(KernelFallbackWarning, match=f"2 x Attention with head_dim {head_dim}") as caught:
        patched = lk.apply_kernels(copy.deepcopy(model))
    assert len(caught) == 1
    assert kernel_summary(patched) == {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 0, "cross_entropy": 1}
    ids = torch.randint(0, 97, (2, 9), device=device)
    LAUNCHES.clear()
    logits, grads = _loss_and_grads(model, ids)
    p_logits, p_grads = _loss_and_grads(patched, ids)
    assert "rope_kernel" in LAUNCHES and not any("attention" in k for k in LAUNCHES)
    assert _relative(p_logits, logits) <= 1e-4
    assert all(_relative(p_grads[n], grads[n]) <= 2e-3 for n in grads)
    assert torch.equal(patched.generate(ids[:, :4], 5), model.generate(ids[:, :4], 5))


def test_kernel_summary_counts_only_modules_that_run_kernels(model, monkeypatch):
    """Modules on a device where no Triton kernel runs (the meta device; the CPU without the
    interpreter) are not counted, and apply_kernels says so once."""
    from llama_kernels.ops import common
    from llama_kernels.ops.common import KernelFallbackWarning

    patched = lk.apply_kernels(model)
    patched.layers[1].to("meta")
    assert kernel_summary(patched) == {"rms_norm": 3, "swiglu": 1, "rope": 1, "attention": 1, "cross_entropy": 1}
    with pytest.warns(KernelFallbackWarning, match="1 module\\(s\\) on meta") as caught:
        lk.apply_kernels(patched)
    assert len(caught) == 1
    monkeypatch.setattr(common, "INTERPRET", False)
    if next(model.parameters()).device.type == "cpu":
        assert kernel_summary(patched) == dict.fromkeys(lk.patch.FLAGS, 0)


def test_float64_model_stays_eager_with_one_warning(model, device):
    """float64 weights are beyond the kernels: decided at patch time (one warning naming them,
    ``eager=[...]`` in the repr, nothing counted), and the model runs, as eager does."""
    model = model.double()
    with pytest.warns(KernelFallbackWarning, match="float64 weights"):
        patched = lk.apply_kernels(copy.deepcopy(model))
    assert set(kernel_summary(patched).values()) == {0} and "eager=[" in repr(patched)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 7), device=device)
    LAUNCHES.clear()
    assert torch.equal(patched(ids), model(ids)) and not LAUNCHES
