"""Long-context training tools (llama_kernels.long_context): chunked MLPs and offloaded checkpointing.

``chunked_mlp``: the chunked MLP gives the unchunked output and input gradient (bitwise on the CPU,
where a matmul of a subset of rows computes those rows exactly as the whole does), its parameters'
gradients by the 2x rule against float64, saves only its input and never makes a ``tokens x
intermediate`` tensor; reference model, transformers LLaMA, Phi-3 and Gemma, LoRA, apply_kernels.

``offloaded_checkpoint`` / ``checkpoint_layers``: the loss and every gradient equal plain
non-reentrant checkpointing bit for bit (transformers' own, with attention dropout, bfloat16,
autocast, LoRA with a frozen base, apply_kernels), and the saved hidden states really leave for
``offload_device``: ``"meta"`` under fake tensors, measured by ``MemTracker``.
"""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import llama_kernels as lk
from llama_kernels import long_context, model as reference_model
from llama_kernels.long_context import checkpoint_layers, chunked_mlp, offloaded_checkpoint
from llama_kernels.ops.common import LAUNCHES
from helpers import OpOutputs, assert_like_eager, grads, leaf

transformers = pytest.importorskip("transformers")

HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 128
TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
HF = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
      "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
      "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
      # Soft-capping is eager attention's math (5.0 builds Gemma 2 with SDPA, which skips it).
      "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                       "sliding_window": 8, "final_logit_softcapping": None,
                                                       "_attn_implementation": "eager"})}
CHUNK = 10  # divides no token count below
PLAIN = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def hf_model(family, device, dtype=torch.float32, **overrides):
    config_name, model_name, options = HF[family]
    options = {**TINY, **options, **overrides}
    attn = options.pop("_attn_implementation", None)
    config = getattr(transformers, config_name)(**options)
    if attn is not None:
        config._attn_implementation = attn
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(device=device, dtype=dtype).train()
    with torch.no_grad():  # Gemma's norms start at zero weight (scale 1): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def reference_llama(device):
    torch.manual_seed(0)
    config = reference_model.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return reference_model.Llama(config).to(device).train()


def mlp_module(kind, device):
    torch.manual_seed(0)
    if kind == "reference":
        return reference_llama(device).layers[0].mlp
    return hf_model(kind, device).model.layers[0].mlp


def ids_for(device, shape=(2, 24)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(1)).to(device)


def training_step(model, ids, seed=5, autocast=None):
    """Loss and gradients of one step (the same dropout draws for every model: seeded), the
    forward under ``autocast`` (a dtype) if given, the backward outside it, as PyTorch advises."""
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast(ids.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if isinstance(model, reference_model.Llama):
            loss = model.loss(ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_bitwise(expected, actual):
    (loss, grads_), (loss2, grads2) = expected, actual
    assert torch.equal(loss, loss2), (loss, loss2)
    assert grads_.keys() == grads2.keys() and grads_
    different = [n for n in grads_ if not torch.equal(grads_[n], grads2[n])]
    assert not different, different


def assert_close(expected, actual, rtol=1e-5):
    (loss, grads_), (loss2, grads2) = expected, actual
    torch.testing.assert_close(loss2, loss, rtol=rtol, atol=0)
    assert grads_.keys() == grads2.keys() and grads_
    for n in grads_:
        scale = grads_[n].abs().max().item()
        torch.testing.assert_close(grads2[n], grads_[n], rtol=rtol, atol=rtol * scale, msg=n)


def plain_checkpointing(model):
    """transformers' own (non-reentrant) gradient checkpointing; 5.2x renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def is_chunked(output):
    return output.grad_fn is not None and output.grad_fn.name() == "_ChunkedMLPBackward"


# --- chunked_mlp ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["reference", "llama", "phi3", "gemma"])
def test_chunked_mlp_output_and_gradients(kind, dtype, device):
    """39 tokens (batch 3) in chunks of 10 from a non-contiguous input: the output and the input
    gradient are the unchunked ones; every gradient is within 2x eager's error of float64."""
    mlp = mlp_module(kind, device).to(dtype)
    eager, oracle = copy.deepcopy(mlp), copy.deepcopy(mlp).double()
    chunked = chunked_mlp(mlp, chunk_tokens=CHUNK)
    base = torch.randn(13, 3, HIDDEN, device=device)
    x = leaf(base.transpose(0, 1), dtype)  # (3, 13, hidden), its leading dims not viewable as one
    assert not x.is_contiguous()
    x_eager, x_oracle = leaf(x.detach()), leaf(x.detach(), torch.float64)
    out, expected, exact = chunked(x), eager(x_eager), oracle(x_oracle)
    assert is_chunked(out) and out.shape == expected.shape
    assert_like_eager(f"{kind} output", out, exact, expected)
    cot = torch.randn(exact.shape, device=device).to(dtype)
    ours = grads([out], [x, *chunked.parameters()], [cot])
    theirs = grads([expected], [x_eager, *eager.parameters()], [cot])
    truth = grads([exact], [x_oracle, *oracle.parameters()], [cot])
    names = ["input", *(n for n, _ in chunked.named_parameters())]
    for name, g, e, o in zip(names, ours, theirs, truth):
        assert_like_eager(f"{kind} grad of {name}", g, o, e)
    if device.type == "cpu":  # row subsets of a CPU matmul are its rows, bit for bit
        assert torch.equal(out, expected) and torch.equal(ours[0], theirs[0])


def test_chunked_mlp_sums_parameter_gradients_in_float32(device):
    """384 tokens in 96 chunks, bfloat16: rounding each partial sum to bfloat16 would break the
    2x rule (about 1.1-2.2 x eager's error here); summed in float32 and rounded once it holds."""
    mlp = mlp_module("reference", device).to(torch.bfloat16)
    eager, oracle = copy.deepcopy(mlp), copy.deepcopy(mlp).double()
    chunked = chunked_mlp(mlp, chunk_tokens=4)
    x = torch.randn(2, 192, HIDDEN, device=device)
    outs = [chunked(leaf(x, torch.bfloat16)), eager(leaf(x, torch.bfloat16)), oracle(leaf(x, torch.float64))]
    assert is_chunked(outs[0])
    cot = torch.randn(outs[2].shape, device=device)
    ours, theirs, truth = (grads([o], list(m.parameters()), [cot]) for o, m in zip(outs, (chunked, eager, oracle)))
    for name, g, e, o in zip(("gate", "up", "down"), ours, theirs, truth):
        assert_like_eager(f"grad of {name}_proj.weight", g, o, e)


def test_chunked_mlp_under_autocast_and_with_parameter_hooks(device):
    """The recompute runs under the forward's autocast (the backward is outside it); a hook on a
    parameter runs once, on the whole gradient."""
    mlp = mlp_module("llama", device)
    plain = copy.deepcopy(mlp)
    chunked_mlp(mlp, CHUNK)
    seen = []
    mlp.down_proj.weight.register_hook(lambda g: seen.append(g.clone()))
    x = torch.randn(2, 24, HIDDEN, device=device)
    results = []
    for module in (mlp, plain):
        x_leaf = leaf(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module(x_leaf)
        assert out.dtype == torch.bfloat16 and is_chunked(out) == (module is mlp)
        out.float().square().sum().backward()
        results.append((out, x_leaf.grad, *(p.grad for p in module.parameters())))
    assert len(seen) == 1 and torch.equal(seen[0], mlp.down_proj.weight.grad)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * theirs.abs().max().item())
    if device.type == "cpu":
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def large_intermediates(outputs, rows):
    """The shapes of the recorded outputs of intermediate width with more than ``rows`` rows."""
    large = []
    for _, shape, _ in outputs:
        if shape and shape[-1] in (INTERMEDIATE, 2 * INTERMEDIATE):
            n = math.prod(shape) // shape[-1]
            if n > rows and n != HIDDEN:  # (hidden, intermediate): down_proj's weight gradient
                large.append(shape)
    return large


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_chunked_mlp_saves_only_its_input_and_makes_no_token_by_intermediate_tensor(kind, device):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 24, HIDDEN, device=device, requires_grad=True)
    for chunk in (None, CHUNK):
        mlp = chunked_mlp(mlp_module(kind, device), chunk) if chunk else mlp_module(kind, device)
        saved.clear()
        with OpOutputs() as outputs:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = mlp(x)
            out.sum().backward()
        activations = [t for t in saved if not isinstance(t, torch.nn.Parameter)]
        if chunk is None:  # the control: gate and up (or gate_up) of all 48 tokens, saved and made
            assert any(t.shape[-1] in (INTERMEDIATE, 2 * INTERMEDIATE) for t in activations)
            assert large_intermediates(outputs.seen, 0)
        else:
            assert len(activations) == 1 and activations[0] is x
            large = large_intermediates(outputs.seen, chunk)
            assert not large, large


def test_chunked_mlp_runs_the_plain_forward_without_grad_or_for_short_inputs(device, monkeypatch):
    mlp = mlp_module("llama", device)
    plain = copy.deepcopy(mlp)
    chunked_mlp(mlp, CHUNK)
    x = torch.randn(2, 24, HIDDEN, device=device)
    with torch.no_grad():
        expected = plain(x)
        monkeypatch.setattr(long_context._ChunkedMLP, "apply", None)  # would fail if called
        assert torch.equal(mlp(x), expected)
        monkeypatch.undo()
    short = mlp(x[:, :5])  # 10 tokens: not more than a chunk
    assert short.grad_fn is not None and not is_chunked(short)
    assert is_chunked(mlp(x)) and is_chunked(mlp(x.reshape(-1, HIDDEN)))  # any leading dims
    with torch.no_grad():
        for p in mlp.parameters():
            p.requires_grad_(False)
    assert mlp(x).grad_fn is None  # nothing to differentiate: the plain forward
    assert is_chunked(mlp(x.requires_grad_()))


@pytest.mark.parametrize("kind", ["reference", "llama", "phi3", "gemma"])
def test_chunked_mlp_models(kind, device):
    """A whole model's step: loss and every gradient but the MLP weights' equal the unchunked
    model's on the CPU; the MLP weights' by the 2x rule against the float64 model."""
    model = reference_llama(device) if kind == "reference" else hf_model(kind, device)
    plain, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    chunked_mlp(model, CHUNK)
    ids = ids_for(device)
    ours, theirs, truth = training_step(model, ids), training_step(plain, ids), training_step(oracle, ids)
    assert ours[1].keys() == theirs[1].keys()
    for name in ours[1]:
        assert_like_eager(f"{kind} grad of {name}", ours[1][name], truth[1][name], theirs[1][name])
    if device.type == "cpu":
        assert torch.equal(ours[0], theirs[0])
        assert [n for n in ours[1] if not torch.equal(ours[1][n], theirs[1][n])] == [
            n for n in ours[1] if ".mlp." in n]


def test_chunked_mlp_replays_dropout(device):
    """Randomness inside the MLP: the backward recomputes each chunk with the forward's draws (the
    gradients are those of the chunks run one after the other with grad), and the RNG continues
    as it would after that forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    class DropoutMLP(LlamaMLP):
        def forward(self, x):
            return super().forward(F.dropout(x, 0.5, training=True))

    torch.manual_seed(0)
    mlp = DropoutMLP(transformers.LlamaConfig(**TINY)).to(device)
    plain = copy.deepcopy(mlp)
    chunked_mlp(mlp, CHUNK)
    x = torch.randn(2, 24, HIDDEN, device=device, requires_grad=True)
    x_plain = leaf(x.detach())
    torch.manual_seed(3)
    out = mlp(x)
    out.square().sum().backward()
    after = torch.rand(4, device=device)
    torch.manual_seed(3)
    rows = x_plain.reshape(-1, HIDDEN)
    expected = torch.cat([plain(rows[s:s + CHUNK]) for s in range(0, rows.shape[0], CHUNK)]).view(out.shape)
    expected.square().sum().backward()
    assert torch.equal(torch.rand(4, device=device), after)
    assert torch.equal(out, expected) and torch.equal(x.grad, x_plain.grad)
    for p, q in zip(mlp.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_chunked_mlp_lora(device):
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                  target_modules=["gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(2)
    plain = peft.get_peft_model(hf_model("llama", device), peft.LoraConfig(**config))
    model = chunked_mlp(copy.deepcopy(plain), CHUNK)
    ids = ids_for(device)
    ours, theirs = training_step(model, ids), training_step(plain, ids)
    assert ours[1] and all("lora_" in n and ".mlp." in n for n in ours[1])  # base weights: no grads
    assert len(ours[1]) == 2 * 3 * 2 and all(g.abs().max() > 0 for g in ours[1].values())
    assert_close(theirs, ours)


def test_chunked_mlp_off_idempotent_and_through_instance_forwards(device):
    mlp = mlp_module("llama", device)
    calls = []

    def hooked(x):  # an instance forward set before (as accelerate's hooks do): chunks go through it
        calls.append(x.shape)
        return type(mlp).forward(mlp, x)

    mlp.forward = hooked
    x = torch.randn(2, 24, HIDDEN, device=device, requires_grad=True)
    chunked_mlp(mlp, CHUNK)
    forward = mlp.forward
    assert chunked_mlp(mlp, CHUNK) is mlp and mlp.forward == forward  # idempotent
    assert is_chunked(mlp(x)) and calls == [(CHUNK, HIDDEN)] * 4 + [(8, HIDDEN)]
    chunked_mlp(mlp, 100)
    assert not is_chunked(mlp(x))  # 48 tokens fit one chunk of 100
    chunked_mlp(mlp, None)
    assert mlp.forward is hooked and "_lk_chunk_tokens" not in vars(mlp)
    del mlp.forward
    chunked_mlp(mlp, CHUNK)
    chunked_mlp(mlp, None)
    assert "forward" not in vars(mlp) and not is_chunked(mlp(x))


def test_chunked_mlp_refuses_bad_arguments(device):
    mlp = mlp_module("llama", device)
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError)):
        with pytest.raises(error, match="chunk_tokens"):
            chunked_mlp(mlp, bad)
    with pytest.raises(TypeError, match="model must contain the MLP modules"):
        chunked_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        chunked_mlp("llama")
    assert "forward" not in vars(mlp)


def test_chunked_mlp_and_checkpointing_with_apply_kernels_reference_model(device):
    """Kernels patched before: the chunked, offloaded model gives the plain checkpointed one's
    loss and gradients (the MLP weights' within float32 rounding of the chunk sums)."""
    plain = lk.apply_kernels(reference_llama(device))
    model = copy.deepcopy(plain)
    plain.layer_checkpoint = PLAIN
    checkpoint_layers(chunked_mlp(model, CHUNK))
    ids = ids_for(device)
    theirs = training_step(plain, ids)
    LAUNCHES.clear()
    ours = training_step(model, ids)
    assert_kernels_ran_chunked(layers=2)
    assert_close(theirs, ours)
    if device.type == "cpu":
        assert torch.equal(ours[0], theirs[0])
        assert all(torch.equal(ours[1][n], theirs[1][n]) for n in ours[1] if ".mlp." not in n)


def test_chunked_mlp_and_checkpointing_then_apply_kernels_transformers(device):
    """Kernels patched after both tools were installed (the classes change under them)."""
    plain = hf_model("llama", device, num_hidden_layers=1)
    model = checkpoint_layers(chunked_mlp(copy.deepcopy(plain), CHUNK))
    plain_checkpointing(plain)
    for m in (plain, model):
        lk.apply_kernels(m)
    assert hasattr(type(model.model.layers[0].mlp), "_lk_kernels")  # patched
    ids = ids_for(device)
    theirs = training_step(plain, ids)
    LAUNCHES.clear()
    ours = training_step(model, ids)
    assert_kernels_ran_chunked(layers=1)
    assert_close(theirs, ours)
    if device.type == "cpu":
        assert torch.equal(ours[0], theirs[0])
        assert all(torch.equal(ours[1][n], theirs[1][n]) for n in ours[1] if ".mlp." not in n)


def assert_kernels_ran_chunked(layers):
    """48 tokens in 5 chunks per MLP, each run by the kernel in the forward, in the checkpoint's
    recompute and in the chunked backward's, then differentiated by it; the attention runs its
    training kernels (not its forward-only decode path, which a forward without grad would take)."""
    assert LAUNCHES["glu_bwd_kernel"] == layers * 5 and LAUNCHES["glu_fwd_kernel"] >= layers * 5 * 3
    assert LAUNCHES["attention_fwd_kernel"] == layers * 2 and not [k for k in LAUNCHES if "decode" in k]


# --- offloaded_checkpoint / checkpoint_layers ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_checkpoint_layers_equals_transformers_checkpointing(family, dtype, device):
    """Attention dropout on: the recompute draws the forward's masks, as transformers' does."""
    model = hf_model(family, device, dtype, attention_dropout=0.2)
    plain, unchecked = plain_checkpointing(copy.deepcopy(model)), copy.deepcopy(model)
    checkpoint_layers(model)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.func is offloaded_checkpoint for layer in layers)
    ids = ids_for(device)
    ours = training_step(model, ids)
    assert_bitwise(training_step(plain, ids), ours)
    assert_close(training_step(unchecked, ids), ours, rtol=1e-5 if dtype == torch.float32 else 2e-2)


def test_checkpoint_layers_under_autocast(device):
    model = hf_model("llama", device, attention_dropout=0.2)
    plain = plain_checkpointing(copy.deepcopy(model))
    checkpoint_layers(model)
    ids = ids_for(device)
    ours = training_step(model, ids, autocast=torch.bfloat16)
    assert_bitwise(training_step(plain, ids, autocast=torch.bfloat16), ours)


def test_checkpoint_layers_lora_with_a_frozen_base(device):
    """No layer input requires grad (the embedding is frozen, transformers' input hook removed):
    the adapters still get their gradients, through the parameters passed to the checkpoint."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    torch.manual_seed(2)
    model = peft.get_peft_model(hf_model("llama", device), config)
    plain = copy.deepcopy(model)
    plain_checkpointing(plain.base_model.model)
    checkpoint_layers(model)
    for m in (model, plain):
        m.base_model.model.disable_input_require_grads()
    ids = ids_for(device)
    ours, theirs = training_step(model, ids), training_step(plain, ids)
    assert len(ours[1]) == 2 * 4 * 2 and all("lora_" in n for n in ours[1])
    assert_bitwise(theirs, ours)


def test_checkpoint_layers_reference_model(device, monkeypatch):
    model = reference_llama(device)
    plain, unchecked = copy.deepcopy(model), copy.deepcopy(model)
    plain.layer_checkpoint = PLAIN
    assert checkpoint_layers(model) is model and model.layer_checkpoint.func is offloaded_checkpoint
    ids = ids_for(device)
    ours = training_step(model, ids)
    assert_bitwise(training_step(plain, ids), ours)
    assert_close(training_step(unchecked, ids), ours)
    # Not in eval mode, without grad or with a cache (generation): the blocks run as before.
    monkeypatch.setattr(model, "layer_checkpoint", None)
    model.eval()
    expected = model(ids)
    calls = []
    monkeypatch.setattr(model, "layer_checkpoint", lambda *a, **k: calls.append(1))
    assert torch.equal(model(ids), expected)
    model.train()
    with torch.no_grad():
        model(ids)
        model.generate(ids[:, :4], 2)
    assert not calls
    monkeypatch.undo()
    checkpoint_layers(model, offload=False)
    assert model.layer_checkpoint.func is torch.utils.checkpoint.checkpoint
    assert checkpoint_layers(model, enabled=False).layer_checkpoint is None
    assert_close(training_step(unchecked, ids), training_step(model, ids))


def test_checkpoint_layers_off_and_plain(device):
    model = hf_model("gemma2", device)
    unchecked = copy.deepcopy(model)
    checkpoint_layers(model, offload=False)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.func is torch.utils.checkpoint.checkpoint for layer in layers)
    checkpoint_layers(model)
    checkpoint_layers(model, enabled=False)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert not any(getattr(layer._gradient_checkpointing_func, "func", None) is offloaded_checkpoint
                   for layer in layers)
    ids = ids_for(device)
    assert_bitwise(training_step(unchecked, ids), training_step(model, ids))


def test_checkpoint_layers_refuses_bad_arguments(device):
    model = reference_llama(device)
    with pytest.raises(TypeError, match="offload must be"):
        checkpoint_layers(model, offload="yes")
    with pytest.raises(TypeError, match="enabled must be"):
        checkpoint_layers(model, enabled=1)
    with pytest.raises(RuntimeError, match="offload_device"):
        checkpoint_layers(model, offload_device="nowhere")
    with pytest.raises(TypeError, match="model must be a llama_kernels.model.Llama"):
        checkpoint_layers(torch.nn.Linear(2, 2))
    assert model.layer_checkpoint is None


def test_offloaded_checkpoint_arguments_outputs_and_hooks(device):
    """Nested positional tensors, a keyword tensor that requires grad, a (tensor, None, int)
    output, an explicit params list; gradients equal torch.utils.checkpoint's; a parameter's
    tensor hook runs once, on the full gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).to(device)
    x, y, scale = (torch.randn(3, 8, device=device, requires_grad=True) for _ in range(3))
    seen = []
    lin.weight.register_hook(lambda g: seen.append(g.clone()))

    def function(pair, *, scale, bias):
        a, b = pair
        return F.dropout(lin(a) * scale, 0.3) + b.sin() + bias, None, 3

    bias = torch.ones(8, device=device)
    results = []
    for checkpoint in (PLAIN, functools.partial(offloaded_checkpoint, params=[lin.weight, lin.bias, lin.weight])):
        for t in (x, y, scale, *lin.parameters()):
            t.grad = None
        torch.manual_seed(4)
        out, none, three = checkpoint(function, (x, y), scale=scale, bias=bias)
        assert none is None and three == 3
        out.square().sum().backward()
        results.append([t.grad for t in (x, y, scale, *lin.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    with torch.no_grad():
        assert offloaded_checkpoint(function, (x, y), scale=scale, bias=bias)[0].grad_fn is None
    # params=None: the module a bound method or partial belongs to.
    out = offloaded_checkpoint(lin.forward, x.detach())
    assert out.grad_fn.name() == "_OffloadedCheckpointBackward"
    out = offloaded_checkpoint(functools.partial(type(lin).forward, lin), x.detach())
    assert out.grad_fn.name() == "_OffloadedCheckpointBackward"
    assert offloaded_checkpoint(torch.sin, x.detach()).grad_fn is None  # nothing to differentiate
    with pytest.raises(TypeError, match="params must be"):
        offloaded_checkpoint(lin, x, params=lin.weight)
    with pytest.raises(TypeError, match="params must be"):
        offloaded_checkpoint(lin, x, params=[lin.weight, 1])


def test_saved_hidden_states_are_on_offload_device_reference_model(device):
    """Saved for the backward: each block's positional inputs (x, and the residual after block 0)
    as copies on offload_device (here "meta": the forward only)."""
    model = checkpoint_layers(reference_llama(device), offload_device="meta")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ids = ids_for(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(ids)
    offloaded = [t for t in saved if t.device.type == "meta"]
    assert [t.shape for t in offloaded] == [(2, 24, HIDDEN)] * 3


def test_saved_hidden_states_leave_the_cpu_under_fake_tensors():
    """A fake-tensor memory measurement of a transformers LLaMA on the CPU: with offload_device
    "meta" the hidden states saved by the checkpoints leave the CPU's count after the forward
    (layers x batch x tokens x hidden x 4 bytes) and appear on "meta"; the backward runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    batch, tokens, layers = 2, 32, 2
    after_forward = {}
    for offload_device in ("cpu", "meta"):
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu").train()
            checkpoint_layers(model, offload_device=offload_device)
            ids = torch.randint(3, VOCAB, (batch, tokens))
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                loss = model(input_ids=ids, labels=ids).loss
                after_forward[offload_device] = {str(d): kinds["Total"]
                                                 for d, kinds in tracker.get_tracker_snapshot().items()}
                loss.backward()
            assert model.lm_head.weight.grad is not None
    hidden_states = layers * batch * tokens * HIDDEN * 4
    assert after_forward["cpu"].get("meta", 0) == 0
    assert after_forward["meta"]["meta"] == hidden_states
    assert after_forward["cpu"]["cpu"] - after_forward["meta"]["cpu"] == hidden_states
