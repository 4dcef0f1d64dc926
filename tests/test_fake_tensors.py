"""The ops and the patched models under fake and meta tensors (issue 26): nothing launches, the
fake implementations give the launchers' outputs (shapes, dtypes, devices), which is what a memory
tracker counts (a launcher's own scratch, freed before it returns, is not seen: see
benchmarks/README.md); a patched transformers model of every family trains under FakeTensorMode on the kernels'
path, and the masks whose values would have to be read back take the unpatched attention."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import llama_kernels as lk
from llama_kernels.integrations.transformers import attention
from llama_kernels.integrations.transformers.families import FAMILIES
from llama_kernels.ops import registry
from llama_kernels.ops.common import LAUNCHES, is_abstract
from llama_kernels.patch import kernel_summary

transformers = pytest.importorskip("transformers")
from test_families import TINY  # noqa: E402

ALL_KERNELS = set(registry.FLAGS)


def _inputs(dtype, device="cpu"):
    """One call of every public op, forward and backward: ``{name: (fn, tensors)}``."""
    def t(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_(grad)

    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)
    return {
        "rms_norm": (lambda x, w: lk.rms_norm(x, w), (t(2, 7, 64), t(64))),
        "rms_norm+residual": (lambda x, w, r: lk.rms_norm(x, w, residual=r), (t(2, 7, 64), t(64), t(2, 7, 64))),
        "swiglu": (lk.swiglu, (t(3, 5, 96), t(3, 5, 96))),
        "geglu": (lk.geglu, (t(3, 5, 96), t(3, 5, 96))),
        "apply_rotary": (lambda q, k, c, s: lk.apply_rotary(q, k, c, s),
                         (t(2, 4, 9, 32), t(2, 2, 9, 32), t(9, 32, grad=False), t(9, 32, grad=False))),
        "flash_attention": (lk.flash_attention, (t(2, 4, 33, 64), t(2, 2, 33, 64), t(2, 2, 33, 64))),
        "varlen_attention": (lambda q, k, v: lk.flash_attention(q, k, v, cu_seqlens_q=cu),
                             (t(1, 4, 16, 64), t(1, 2, 16, 64), t(1, 2, 16, 64))),
        "fused_linear_cross_entropy": (
            lambda h, w: lk.fused_linear_cross_entropy(h, w, torch.zeros(h.shape[0], dtype=torch.long,
                                                                         device=h.device)),
            (t(24, 64), t(300, 64))),
    }


def _run(fn, tensors):
    """Outputs and gradients of one forward and backward (the outputs summed into one loss)."""
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()
    return outs, tuple(x.grad for x in tensors if x.requires_grad)


def _signature(tensors):
    return [(tuple(x.shape), x.dtype, x.device.type if not isinstance(x, FakeTensor) else x.fake_device.type)
            for x in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fake", "meta"])
def test_ops_run_their_fake_implementations(kind, dtype):
    """Every op, forward and backward, on fake or meta tensors: no kernel launches and the outputs
    and gradients have the shapes and dtypes of a real run's (on the meta device for meta)."""
    real = {name: _run(fn, tensors) for name, (fn, tensors) in _inputs(dtype).items()}
    LAUNCHES.clear()
    if kind == "fake":
        with FakeTensorMode():
            abstract = {name: _run(fn, tensors) for name, (fn, tensors) in _inputs(dtype).items()}
    else:
        abstract = {name: _run(fn, tensors) for name, (fn, tensors) in _inputs(dtype, "meta").items()}
    assert not LAUNCHES, f"kernels launched on {kind} tensors: {dict(LAUNCHES)}"
    for name, (outs, grads) in real.items():
        a_outs, a_grads = abstract[name]
        assert all(is_abstract(x) for x in (*a_outs, *a_grads)), name
        expected = _signature(outs + grads)
        if kind == "meta":
            expected = [(shape, dt, "meta") for shape, dt, _ in expected]
        assert _signature(a_outs + a_grads) == expected, name


@pytest.fixture
def no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("attention fell back to transformers' own implementation")
    monkeypatch.setattr(attention, "_fallback", refuse)


def _model(family, patched=True, **overrides):
    """A tiny random model of ``family`` in training mode (built in place: under FakeTensorMode a
    module cannot be moved, its parameters cannot be swapped for fake ones)."""
    declared = FAMILIES[family]
    config = getattr(transformers, declared.config_class)(**{**TINY, **declared.features, **overrides})
    if getattr(config, "attn_logit_softcapping", None) is not None:
        config._attn_implementation = "eager"  # as test_families: the soft-capped math is eager's
    model = getattr(transformers, declared.causal_lm_class)(config).train()
    return lk.apply_kernels(model) if patched else model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_trains_under_fake_tensors(family, no_fallback):
    """A patched model of every family, built inside FakeTensorMode: a training step (the fused
    loss included) takes every kernel's path and launches none."""
    LAUNCHES.clear()
    with FakeTensorMode():
        model = _model(family)
        assert kernel_summary(model).keys() >= ALL_KERNELS - ({"cross_entropy"} if family == "gemma2" else set())
        ids = torch.zeros((2, 12), dtype=torch.long)
        out = model(ids, labels=ids)
        assert out.logits is None  # the fused loss
        out.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(isinstance(g, FakeTensor) for g in grads)
    assert not LAUNCHES, dict(LAUNCHES)


@pytest.mark.parametrize("batch", ["padded", "packed"])
def test_masks_that_need_their_values_take_the_unpatched_attention(batch, monkeypatch):
    """Padding and packed position ids under fake tensors: their values cannot be read, so every
    layer runs the model's unpatched attention (with the mask transformers makes), not a kernel
    that would have had to guess."""
    calls = []
    fallback = attention._fallback
    monkeypatch.setattr(attention, "_fallback", lambda *a, **k: calls.append(1) or fallback(*a, **k))
    LAUNCHES.clear()
    with FakeTensorMode():
        model = _model("llama")
        ids = torch.zeros((2, 12), dtype=torch.long)
        if batch == "padded":
            out = model(ids, attention_mask=torch.ones((2, 12), dtype=torch.long), labels=ids)
        else:
            out = model(ids, position_ids=torch.arange(12).repeat(2, 1), labels=ids, use_cache=False)
        out.loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    assert not LAUNCHES, dict(LAUNCHES)


def test_reference_model_on_meta_and_fake_tensors():
    config = lk.model.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    LAUNCHES.clear()
    with torch.device("meta"):
        model = lk.apply_kernels(lk.model.Llama(config))
        ids = torch.zeros((2, 12), dtype=torch.long)
        loss = model.loss(ids)
        loss.backward()
        assert loss.is_meta and model.lm_head.weight.grad.is_meta
        assert model(ids).shape == (2, 12, 300)
    with FakeTensorMode():
        model = lk.apply_kernels(lk.model.Llama(config))
        model.loss(torch.zeros((2, 12), dtype=torch.long)).backward()
    assert not LAUNCHES, dict(LAUNCHES)


def test_memory_tracker_sees_the_kernels_savings():
    """At sizes where the logits dominate, the patched model's tracked peak is below the unpatched
    one's by more than the float32 logits it never materialises."""
    vocab, tokens = 4096, 512
    peaks = {}
    for patched in (False, True):
        with FakeTensorMode():
            model = _model("llama", patched, vocab_size=vocab)
            ids = torch.zeros((1, tokens), dtype=torch.long)
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                model(ids, labels=ids).loss.backward()
            peaks[patched] = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    assert peaks[False] - peaks[True] > tokens * vocab * 4
