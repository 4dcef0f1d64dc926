"""``lk.quantize_weights``: round-to-nearest int8 / int4 weights, QuantizedLinear in our LLaMA and
in a tiny transformers model of every family, composed with apply_kernels (either order), greedy
generation patched and unpatched, state_dict save and load, refusals, and LoRA (PEFT) trained on a
quantised base with the gradients of the dequantised eager model.

"Unpatched" is the quantised model with every op eager, the quantised projections included
(:func:`eager_quantized`: dequantise, then ``F.linear``); "patched" runs the kernels."""
import copy
import io

import pytest
import torch
from torch import nn

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.integrations.transformers.families import FAMILIES
from llama_kernels.model import Llama, LlamaConfig, StaticDecodeStep
from llama_kernels.ops.common import LAUNCHES
from llama_kernels.quantize import QuantizedLinear, quantize_weight
from helpers import max_error

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
FORMATS = [(8, None), (4, 32)]


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def eager_quantized(model):
    """``model`` with its quantised projections running the eager twin (dequantise + F.linear)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.quantized_linear = reference.quantized_linear
    return model


def quantized_llama(bits, group_size, config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return lk.quantize_weights(Llama(config).eval(), bits, group_size)


# --- quantize_weight ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_to_nearest_within_half_a_step(bits, group_size, dtype):
    weight = torch.randn(33, 256).to(dtype)
    weight[3] = 0  # an all-zero row (and groups): scale 0, dequantised exactly
    qw = quantize_weight(weight, bits, group_size)
    assert qw.scales.dtype == dtype
    w = reference.dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits=bits, group_size=group_size,
                                    dtype=torch.float64)
    step = qw.scales.double()[:, None].expand(33, 256) if bits == 8 else \
        qw.scales.double().repeat_interleave(group_size, 1)
    error = (w - weight.double()).abs()
    # Half a step, except at the ends of an int4 range: its integer zero point moves the grid by
    # up to half a step, so the group's minimum or maximum may be clamped, at most one step away.
    q = qw.qweight if bits == 8 else reference.unpack_int4(qw.qweight)
    inside = (q > 0) & (q < 15) if bits == 4 else torch.ones_like(error, dtype=torch.bool)
    assert (error[inside] <= (step / 2 * (1 + 1e-2))[inside]).all()
    assert (error <= step * (1 + 1e-2)).all()
    assert torch.equal(w[3], torch.zeros(256, dtype=torch.float64))
    if bits == 4:  # byte j: input features 2j (low nibble) and 2j + 1 (high)
        values = reference.unpack_int4(qw.qweight)
        assert values.shape == (33, 256) and int(values.max()) <= 15
        assert torch.equal(qw.qweight[:, 5], values[:, 10] | (values[:, 11] << 4))


def test_quantize_weight_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="multiple of group_size 64"):
        quantize_weight(torch.randn(8, 96), 4, 64)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(torch.tensor([[1.0, float("inf")]]), 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(8, 64), 2)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(8, 64), 8, 32)
    with pytest.raises(ValueError, match="weight must have 2"):
        quantize_weight(torch.randn(64), 8)


# --- our LLaMA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group_size", FORMATS)
def test_reference_model_quantised_patched_and_unpatched(bits, group_size, device):
    model = quantized_llama(bits, group_size).to(device)
    layer = model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    assert all(type(m) is QuantizedLinear and m.bits == bits for m in linears)
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    weight = layer.mlp.up_proj.weight  # what code inspecting an nn.Linear sees: no values
    assert weight.shape == (96, 64) and weight.dtype == torch.float32 and weight.device == device
    with pytest.raises(RuntimeError, match="no float weight"):
        weight.sum()
    unpatched = eager_quantized(copy.deepcopy(model))
    before = lk.apply_kernels(quantized_llama(bits, group_size).to(device))  # quantised, then patched
    torch.manual_seed(0)
    after = lk.quantize_weights(lk.apply_kernels(Llama(CONFIG).eval().to(device)), bits, group_size)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        expected = unpatched(ids)
        for patched in (before, after):
            LAUNCHES.clear()
            assert relative_error(patched(ids), expected) <= 1e-5
            assert LAUNCHES["quantized_linear_fwd_kernel"] == 7 * CONFIG.num_hidden_layers
            assert LAUNCHES["rope_kernel"] and LAUNCHES["glu_fwd_kernel"]
    tokens = unpatched.generate(ids, 6)
    assert torch.equal(before.generate(ids, 6), tokens) and torch.equal(after.generate(ids, 6), tokens)
    # The static decode step (what a CUDA graph captures) launches the same kernels, no host reads.
    cache = before.new_cache(2, 16)
    step = StaticDecodeStep(before, cache)
    logits = before(ids, cache, 0)[:, -1]
    next_token = logits.argmax(-1, keepdim=True)
    assert torch.equal(step(next_token, 9).argmax(-1), unpatched(torch.cat([ids, next_token], 1))[:, -1].argmax(-1))


def test_training_through_a_quantised_model(device):
    # Frozen quantised projections: gradients reach the norms and embeddings, as in the eager model.
    model = lk.apply_kernels(quantized_llama(4, 32).to(device)).train()
    unpatched = eager_quantized(quantized_llama(4, 32).to(device)).train()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), device=device)
    LAUNCHES.clear()
    loss = model.loss(ids)
    loss.backward()
    expected = unpatched.loss(ids)
    expected.backward()
    assert LAUNCHES["quantized_linear_bwd_kernel"] == 7 * CONFIG.num_hidden_layers
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    grads = {n: p.grad for n, p in unpatched.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, grads[name]) <= 1e-4, name


def test_lm_head_included_unties_it(device):
    config = LlamaConfig(**{**vars(CONFIG), "tie_word_embeddings": True})
    model = quantized_llama(8, None, config)
    torch.manual_seed(0)
    head = lk.quantize_weights(Llama(config).eval(), 8, include_lm_head=True).to(device)
    assert type(head.lm_head) is QuantizedLinear and isinstance(head.embed_tokens.weight, nn.Parameter)
    assert torch.equal(head.embed_tokens.weight, model.to(device).embed_tokens.weight)
    ids = torch.randint(0, config.vocab_size, (2, 7), device=device)
    unpatched = eager_quantized(copy.deepcopy(head))
    with torch.no_grad():  # the loss of a quantised head takes the logits (nothing to fuse)
        assert abs(lk.apply_kernels(head).loss(ids).item() - unpatched.loss(ids).item()) <= 1e-5


def test_state_dict_saves_and_loads_quantised_weights(device):
    model = quantized_llama(4, 32).to(device)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["layers.0.mlp.up_proj.qweight"].dtype == torch.uint8 and "layers.0.mlp.up_proj.weight" not in state
    fresh = quantized_llama(4, 32, seed=1).to(device)
    fresh.load_state_dict(state)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 5), device=device)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(TypeError, match="qweight must have dtype int8"):
        quantized_llama(8, None).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key"):
        Llama(CONFIG).load_state_dict(state)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        lk.quantize_weights(Llama(CONFIG), bits=3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        lk.quantize_weights(Llama(CONFIG), bits=4, group_size=48)
    with pytest.raises(ValueError, match="group_size must be None"):
        lk.quantize_weights(Llama(CONFIG), bits=8, group_size=32)
    with pytest.raises(TypeError, match="model"):
        lk.quantize_weights("model")
    # 96 MLP features are not a multiple of 64: every down projection is named, nothing replaced.
    model = Llama(CONFIG)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj, layers\.1\.mlp\.down_proj \(96 input features, "
                                         r"not a multiple of 64\); group_size 32 would fit"):
        lk.quantize_weights(model, bits=4, group_size=64)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="already quantised"):
        lk.quantize_weights(quantized_llama(8, None))

    class OwnLinear(nn.Linear):
        pass

    model.layers[0].mlp.up_proj = OwnLinear(64, 96, bias=False)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj \(OwnLinear"):
        lk.quantize_weights(model)


def test_fake_tensors_plan_a_quantised_model_at_any_size():
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8)
    with FakeTensorMode():
        model = lk.apply_kernels(lk.quantize_weights(Llama(config), 4, 128))
        logits = model(torch.randint(0, 100, (1, 3)))
    assert logits.shape == (1, 3, 128256)
    mlp = model.layers[0].mlp
    assert mlp.down_proj.qweight.shape == (4096, 7168) and mlp.down_proj.scales.shape == (4096, 112)


# --- transformers families ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_family_generates_like_unpatched(family, device):
    from test_families import VOCAB, tiny_model

    bits, group_size = FORMATS[list(FAMILIES).index(family) % 2]  # int8 and int4 in turn
    model = lk.quantize_weights(tiny_model(family, device), bits, group_size)
    assert type(model.lm_head) is nn.Linear
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) >= 4 * model.config.num_hidden_layers
    unpatched = eager_quantized(copy.deepcopy(model))
    patched = lk.apply_kernels(model)
    ids = torch.randint(3, VOCAB, (2, 5), device=device)
    with torch.no_grad():
        LAUNCHES.clear()
        logits = patched(ids).logits
        assert LAUNCHES["quantized_linear_fwd_kernel"] and LAUNCHES["rms_norm_fwd_kernel"]
        assert relative_error(logits, unpatched(ids).logits) <= 1e-5
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **greedy), unpatched.generate(ids, **greedy))


# --- LoRA on a quantised base (QLoRA without bitsandbytes) ------------------------------------------

def test_lora_on_a_quantised_base_trains_like_the_dequantised_model(device):
    peft = pytest.importorskip("peft")
    from test_peft import TARGETS, assert_same_training_step, tiny_config

    torch.manual_seed(0)
    base = lk.quantize_weights(transformers.LlamaForCausalLM(tiny_config()).to(device), 4, 64)
    # The eager model the quantised one stands for: nn.Linear layers holding the dequantised weights.
    dequantised = copy.deepcopy(base)
    for name, module in list(dequantised.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=device)
            linear.weight.data = module.dequantized_weight(torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(dequantised.get_submodule(parent), child, linear)

    def with_lora(model):
        torch.manual_seed(2)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
        return peft.get_peft_model(model, config)

    reference_model = with_lora(dequantised)
    patched = lk.apply_kernels(with_lora(base))
    layer = patched.base_model.model.model.layers[0]
    assert type(layer.mlp.down_proj.base_layer) is QuantizedLinear
    ids = torch.randint(1, 120, (2, 11), device=device)
    assert_same_training_step(reference_model, patched, ids)
    assert LAUNCHES["quantized_linear_bwd_kernel"] and LAUNCHES["glu_bwd_kernel"]
    for safe_merge in (False, True):  # merging needs a float weight: refused loudly, never dropped
        with pytest.raises(RuntimeError, match="no float weight"):
            patched.merge_and_unload(safe_merge=safe_merge)
