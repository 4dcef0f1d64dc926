"""torch.compile(fullgraph=True) of patched transformers models, and of unpatched ones beside them.

A patched transformers model compiles to one graph per input shape, forward and training step,
with and without padding masks, packed batches and a static cache, and gives the unpatched model's
answers (never NaN rows).  Under Dynamo nothing can be read back from the device and a mask
function's closure cannot be read, so the kernels take the layers whose mask is plain causal
without padding; the others run the model's unpatched attention, exactly.  Patching one model
changes nothing for any other model in the process (transformers' modules are never modified).
"""
import copy
import inspect

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import llama_kernels as lk
from llama_kernels.ops.common import LAUNCHES
from helpers import max_error

transformers = pytest.importorskip("transformers")
LAYERS = 2
_NEW_API = "cache" in inspect.signature(transformers.LlamaModel.forward).parameters


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def unpatched(device):
    """A tiny LLaMA with as many KV heads as query heads: short no-grad batches take `flash_decode`."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device).eval()


@pytest.fixture
def patched(unpatched):
    return lk.apply_kernels(copy.deepcopy(unpatched))


def compiled(model):
    """``model`` under ``torch.compile(fullgraph=True)`` (a graph break raises) and its counter."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter


def relative_error(a, b):
    return max_error(a, b) / b.abs().max().item()


def attention_launches():
    return sum(n for name, n in LAUNCHES.items() if name.startswith("attention_"))


def padded(device, side, length=9, pads=(3, 0)):
    ids = torch.randint(1, 100, (len(pads), length), device=device)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        if n:
            (mask[row, :n] if side == "left" else mask[row, -n:]).fill_(0)
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("batch", ["plain", "left-padded", "right-padded", "holed", "packed"])
def test_patched_forward_compiles_to_one_graph(unpatched, patched, device, batch):
    """No-grad forwards: plain causal runs the kernels; padded and packed batches (a short
    right-padded one would take ``flash_decode``, which cannot express it without a host read)
    give the unpatched logits at every position."""
    ids = torch.randint(1, 100, (2, 9), device=device)
    kwargs = {}
    if batch in ("left-padded", "right-padded"):
        ids, kwargs["attention_mask"] = padded(device, batch.split("-")[0])
    elif batch == "holed":
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][0, 4] = 0
    elif batch == "packed":
        kwargs.update(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2, device=device), use_cache=False)
    model, counter = compiled(patched)
    with torch.no_grad():
        LAUNCHES.clear()
        logits = model(ids, **kwargs).logits
        launched = attention_launches()
        expected = unpatched(ids, **kwargs).logits
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert not logits.isnan().any() and relative_error(logits, expected) <= 1e-5
    assert (launched > 0) == (batch == "plain")


def test_patched_training_step_compiles_to_one_graph(unpatched, patched, device):
    """A compiled training forward (the fused loss included), its backward through AOTAutograd:
    the unpatched loss and gradients, every kernel forward and backward launched."""
    ids = torch.randint(1, 100, (2, 12), device=device)
    model, counter = compiled(patched.train())
    LAUNCHES.clear()
    loss = model(ids, labels=ids).loss
    loss.backward()
    expected = unpatched.train()(ids, labels=ids).loss
    expected.backward()
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    worst = max(relative_error(p.grad, q.grad) for p, q in zip(patched.parameters(), unpatched.parameters()))
    assert worst <= 2e-3, f"worst relative gradient error {worst:.2e}"
    for kernel in ("attention_fwd", "attention_bwd", "rms_norm_bwd", "glu_bwd", "rope", "cross_entropy_bwd"):
        assert any(name.startswith(kernel) for name in LAUNCHES), kernel


def test_static_cache_decode_compiles(unpatched, patched, device):
    """A static cache: the compiled prefill (transformers' attention: its length is a device value)
    and decode steps (``flash_decode`` with the length on the device) give the unpatched logits."""
    ids = torch.randint(1, 100, (2, 6), device=device)
    model, counter = compiled(patched)
    results = []
    for forward in (model, unpatched):
        cache = transformers.StaticCache(config=unpatched.config, max_cache_len=16)
        kw = {"cache": cache} if _NEW_API else {"past_key_values": cache}
        with torch.no_grad():
            logits = [forward(ids, **kw).logits]
            step = logits[-1][:, -1:].argmax(-1)
            LAUNCHES.clear()
            for position in range(6, 9):
                if not _NEW_API:
                    kw = dict(kw, cache_position=torch.tensor([position], device=device))
                logits.append(forward(step, **kw).logits)
                step = logits[-1][:, -1:].argmax(-1)
        results.append((logits, LAUNCHES["attention_decode_split_kernel"]))
    (ours, decodes), (expected, _) = results
    assert not torch._dynamo.utils.counters["graph_break"] and counter.frame_count <= 3
    for a, b in zip(ours, expected):
        assert relative_error(a, b) <= 1e-5
    assert decodes == 3 * LAYERS


def test_patching_changes_nothing_for_other_models(unpatched, patched, device):
    """After a model was patched and ran, an unpatched one still compiles to one graph (no global
    dispatcher in transformers' modules) and gives its own answers."""
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    ids = torch.randint(1, 100, (2, 9), device=device)
    with torch.no_grad():
        patched(ids)
        expected = unpatched(ids).logits
        model, counter = compiled(unpatched)
        logits = model(ids).logits
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(logits, expected)
    assert {name: value for name, value in vars(modeling_llama).items() if before.get(name) is not value} == {}


def test_patched_forward_guards_its_own_scope(patched, device, monkeypatch):
    """The patched attention forward reads RoPE from a copy of its modeling module's globals, and
    Dynamo guards that copy, not the module: what the module's ``apply_rotary_pos_emb`` is (since
    transformers 5.25 a hub-kernel ``nn.Module``, with no ``__defaults__`` to guard) neither breaks
    the compile nor recompiles the patched model when it changes."""
    from transformers.models.llama import modeling_llama

    class HubKernelLike:  # a callable that is not a function
        def __init__(self, function):
            self.function = function

        def __call__(self, *args, **kwargs):
            return self.function(*args, **kwargs)

    original = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", HubKernelLike(original))
    ids = torch.randint(1, 100, (2, 9), device=device)
    model, counter = compiled(patched)
    with torch.no_grad():
        LAUNCHES.clear()
        model(ids)
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", HubKernelLike(original))
        model(ids)  # the guards evaluated again, against another module global: no recompile
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
    assert LAUNCHES["rope_kernel"] == 2 * LAYERS
