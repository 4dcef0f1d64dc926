"""CUDA-graph-safe decoding: ``flash_decode`` (device-side cache lengths) and the static decode step.

``flash_decode`` runs the split-KV decode kernel over a whole preallocated cache buffer, each batch
row attending to its first ``cache_seqlens[b]`` keys; the model's static decode step
(:class:`StaticDecodeStep`, ``generate(..., cuda_graphs=True)``) uses it so that every step has the
same shapes and no host synchronisation.  The kernel and the step run everywhere; capture and replay
need a GPU.
"""
import copy

import pytest
import torch

import llama_kernels as lk
from llama_kernels import reference
from llama_kernels.model import Llama, LlamaConfig, StaticDecodeStep
from llama_kernels.ops import common
from llama_kernels.ops.attention import decode
from llama_kernels.ops.attention import flash_attention
from llama_kernels.ops.attention.configs import tile_family
from llama_kernels.ops.device import device_limits
from llama_kernels.ops.common import LAUNCHES, KernelFallbackWarning
from llama_kernels.ops.attention import flash_decode
from helpers import DTYPES, assert_like_eager, max_error

SPLIT, COMBINE = "attention_decode_split_kernel", "attention_decode_combine_kernel"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # reproducible data for the 2x-of-eager comparisons


def cache_inputs(b, hq, hk, tq, t_max, d, dtype, device):
    q = torch.randn(b, hq, tq, d, device=device).to(dtype)
    k_cache = torch.randn(b, hk, t_max, d, device=device).to(dtype)
    v_cache = torch.randn(b, hk, t_max, d, device=device).to(dtype)
    return q, k_cache, v_cache


def check_flash_decode(name, q, k_cache, v_cache, cache_seqlens):
    """Run the kernel (proving it launched) and compare it with the float64 oracle by the 2x rule."""
    LAUNCHES.clear()
    out = flash_decode(q, k_cache, v_cache, cache_seqlens)
    assert LAUNCHES[SPLIT] == 1 and LAUNCHES["attention_fwd_kernel"] == 0, dict(LAUNCHES)
    oracle = reference.flash_decode(q.double(), k_cache.double(), v_cache.double(),
                                                     cache_seqlens)
    eager = reference.flash_decode(q, k_cache, v_cache, cache_seqlens)
    assert_like_eager(name, out, oracle, eager)
    return out


def splits_of(q, k_cache):
    rows = q.shape[2] * q.shape[1] // k_cache.shape[1]
    block_n = decode.decode_configs(q.shape[-1], q.dtype, rows, tile_family(device_limits(q.device)))[0][0]
    return decode.decode_splits(q.shape[0], k_cache.shape[1], k_cache.shape[2], block_n, q.device)


# (B, Hq, Hk, Tq, Tmax, D, lengths).  Under the interpreter the first buffer is cut into 3 splits
# of 224 keys: lengths 1 and 170 leave two of them empty, 600 fills all.  The chunk of 4 tokens
# includes a length 2 < Tq (its first two tokens see no key: zeros) and Tq itself; the last case
# fits one split (no combine).
CASES = [
    (3, 4, 1, 1, 600, 64, [1, 170, 600]),
    (3, 8, 2, 4, 300, 64, [2, 4, 257]),
    (2, 4, 2, 1, 50, 128, [1, 50]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_t{}-{}_d{}".format(*c[:6]))
def test_flash_decode_matches_oracle(case, dtype, device):
    *shape, lengths = case
    q, k_cache, v_cache = cache_inputs(*shape, dtype, device)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = check_flash_decode(f"flash_decode {case} {dtype}", q, k_cache, v_cache, cache_seqlens)
    if min(lengths) < q.shape[2]:  # tokens before the row's first key see nothing
        row = lengths.index(min(lengths))
        unseen = q.shape[2] - min(lengths)
        assert torch.equal(out[row, :, :unseen], torch.zeros_like(out[row, :, :unseen]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cases_leave_whole_splits_empty(dtype, device):
    """In the first case the rows of lengths 1 and 170 end inside the first of several splits."""
    b, hq, hk, tq, t_max, d, lengths = CASES[0]
    q, k_cache, _ = cache_inputs(b, hq, hk, tq, t_max, d, dtype, device)
    splits, keys_per_split = splits_of(q, k_cache)
    assert splits >= 3 and sorted(lengths)[1] <= keys_per_split, (splits, keys_per_split)


def test_full_lengths_equal_flash_attention(device):
    """With every length at the buffer size the kernel computes exactly what flash_attention does."""
    q, k_cache, v_cache = cache_inputs(2, 8, 2, 1, 600, 64, torch.bfloat16, device)
    full = torch.full((2,), 600, dtype=torch.int32, device=device)
    with torch.no_grad():
        assert torch.equal(flash_decode(q, k_cache, v_cache, full), flash_attention(q, k_cache, v_cache))


def test_lengths_read_through_strides_and_clamped(device):
    """``cache_seqlens`` may be a strided or expanded view; lengths outside [0, Tmax] are clamped."""
    q, k_cache, v_cache = cache_inputs(2, 4, 2, 1, 300, 64, torch.float16, device)
    every_other = torch.tensor([7, -1, 290, -1], dtype=torch.int32, device=device)[::2]
    check_flash_decode("strided lengths", q, k_cache, v_cache, every_other)
    expanded = torch.tensor([133], dtype=torch.int32, device=device).expand(2)
    check_flash_decode("expanded lengths", q, k_cache, v_cache, expanded)
    clamped = flash_decode(q, k_cache, v_cache, torch.tensor([-5, 10_000], dtype=torch.int32, device=device))
    assert torch.equal(clamped[0], torch.zeros_like(clamped[0]))
    full = flash_decode(q, k_cache, v_cache, torch.tensor([0, 300], dtype=torch.int32, device=device))
    assert torch.equal(clamped[1], full[1])


def test_bad_arguments_launch_nothing(device):
    q, k_cache, v_cache = cache_inputs(2, 4, 2, 1, 64, 64, torch.float32, device)
    lengths = torch.tensor([3, 64], dtype=torch.int32, device=device)
    LAUNCHES.clear()
    with pytest.raises(TypeError, match="cache_seqlens"):
        flash_decode(q, k_cache, v_cache, lengths.long())
    with pytest.raises(TypeError, match="cache_seqlens"):
        flash_decode(q, k_cache, v_cache, [3, 64])
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_decode(q, k_cache, v_cache, lengths[:1])
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_decode(q, k_cache, v_cache, lengths.to("meta"))
    with pytest.raises(ValueError, match="batch"):
        flash_decode(q, k_cache[:1], v_cache[:1], lengths)
    with pytest.raises(ValueError, match="query rows"):  # Tq * Hq / Hk = 33 * 2 > 64
        flash_decode(torch.randn(2, 4, 33, 64, device=device), k_cache, v_cache, lengths)
    with pytest.raises(ValueError, match="sm_scale"):
        flash_decode(q, k_cache, v_cache, lengths, sm_scale=-1.0)
    with pytest.raises(ValueError, match="forward only"):
        flash_decode(q.requires_grad_(), k_cache, v_cache, lengths)
    assert not LAUNCHES


def test_fallback_without_triton(monkeypatch):
    """Where no Triton kernel can run, flash_decode warns and runs its eager twin."""
    monkeypatch.setattr(common, "INTERPRET", False)
    q, k_cache, v_cache = cache_inputs(2, 4, 2, 1, 40, 32, torch.float32, "cpu")
    lengths = torch.tensor([5, 40], dtype=torch.int32)
    LAUNCHES.clear()
    with pytest.warns(KernelFallbackWarning, match="flash_decode"):
        out = flash_decode(q, k_cache, v_cache, lengths)
    assert not LAUNCHES
    assert torch.equal(out, reference.flash_decode(q, k_cache, v_cache, lengths))


# ------------------------------------------------------------------------------------------------
# The model's static decode step
# ------------------------------------------------------------------------------------------------

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    m = Llama(CONFIG).to(device)
    with torch.no_grad():  # larger weights than the init: less flat logits, tokens that differ
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _models(model):
    return {"eager": model, "patched": lk.apply_kernels(copy.deepcopy(model))}


def assert_decode_slot_is_kernel(m):
    slot = type(m.layers[0].self_attn).decode_attention
    assert slot is flash_decode, f"Attention.decode_attention is {slot.__module__}.{slot.__name__}"


def _relative(a, b):
    return max_error(a, b) / b.abs().max().item()


def run_static_steps(model, prompt, new_tokens, cache_len):
    """Greedy decoding through a StaticDecodeStep (no graph) over a ``cache_len`` cache; returns
    the tokens and every step's logits, and the same from the normal (sliced-cache) path."""
    b, t = prompt.shape
    results = []
    for static in (True, False):
        cache = model.new_cache(b, cache_len)
        step = StaticDecodeStep(model, cache) if static else (lambda tok, pos: model(tok, cache, pos)[:, -1])
        with torch.no_grad():
            logits = model(prompt, cache, 0)[:, -1]
            tokens, all_logits = [prompt], []
            for i in range(new_tokens):
                tokens.append(logits.argmax(-1, keepdim=True))
                logits = step(tokens[-1], t + i).clone()
                all_logits.append(logits)
        results.append((torch.cat(tokens, 1), torch.stack(all_logits)))
    return results


@pytest.mark.parametrize("kind", ["eager", "patched"])
def test_static_step_matches_normal_decoding(model, kind, device):
    """Same tokens and logits as the normal path, over a cache buffer much longer than the text
    (several splits, the later ones empty), with the kernel running in the patched model."""
    m = _models(model)[kind]
    if kind == "patched":
        assert_decode_slot_is_kernel(m)
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 5), device=device)
    LAUNCHES.clear()
    (static_tokens, static_logits), (tokens, logits) = run_static_steps(m, prompt, 6, cache_len=200)
    assert torch.equal(static_tokens, tokens)
    assert len(set(tokens[0, 5:].tolist())) > 1  # a sequence that is not one token repeated
    assert _relative(static_logits, logits) <= 1e-5
    if kind == "patched":
        assert LAUNCHES[SPLIT] > 0 and LAUNCHES[COMBINE] > 0, dict(LAUNCHES)


def test_static_chunk_matches_normal_forward(model, device):
    """A tensor ``start_pos`` with several new tokens: bottom-right causal over the cache."""
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), device=device)
    caches = [model.new_cache(2, 40) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :6], cache, 0)
        normal = model(ids[:, 6:], caches[0], 6)
        static = model(ids[:, 6:], caches[1], torch.tensor(6, device=device))
    assert _relative(static, normal) <= 1e-5
    # Layer 0 wrote the same projections at the same places; later layers' inputs went through
    # attention computed two ways, so they agree to rounding.
    assert all(torch.equal(a, b) for a, b in zip(caches[0].layers[0], caches[1].layers[0]))
    for normal_kv, static_kv in zip(caches[0].layers, caches[1].layers):
        assert all(_relative(b, a) <= 1e-5 for a, b in zip(normal_kv, static_kv))


def test_static_step_arguments(model, device):
    ids = torch.randint(0, CONFIG.vocab_size, (1, 3), device=device)
    with pytest.raises(ValueError, match="cache"):
        model(ids, None, torch.tensor(0, device=device))
    with pytest.raises(ValueError, match="start_pos"):
        model(ids, model.new_cache(1, 8), torch.tensor([0.0], device=device))
    with pytest.raises(TypeError, match="cuda_graphs"):
        model.generate(ids, 2, cuda_graphs="yes")
    with pytest.raises(ValueError, match="position"):
        StaticDecodeStep(model, model.new_cache(1, 8))(ids[:, :1], 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_graphs_refused_on_cpu(model):
    ids = torch.randint(0, CONFIG.vocab_size, (1, 3))
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, 4, cuda_graphs=True)
    assert torch.equal(model.generate(ids, 4, cuda_graphs=False), model.generate(ids, 4))


# ------------------------------------------------------------------------------------------------
# Capture and replay (GPU only)
# ------------------------------------------------------------------------------------------------


@needs_gpu
def test_flash_decode_capture_and_replay(device):
    """One captured launch serves every length: lengths change in place between replays."""
    q, k_cache, v_cache = cache_inputs(2, 32, 8, 1, 4096, 128, torch.bfloat16, device)
    lengths = torch.tensor([1, 4096], dtype=torch.int32, device=device)
    with torch.no_grad():
        flash_decode(q, k_cache, v_cache, lengths)  # compiles the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_decode(q, k_cache, v_cache, lengths)
        for new_lengths in ([1, 4096], [300, 2049], [4096, 17]):
            lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
            q.copy_(torch.randn_like(q))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, flash_decode(q, k_cache, v_cache, lengths)), new_lengths


GPU_CONFIG = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2)


def gpu_model(kind, dtype, device):
    torch.manual_seed(0)
    model = Llama(GPU_CONFIG).to(device=device, dtype=dtype)
    if kind == "patched":
        model = lk.apply_kernels(model)
        assert_decode_slot_is_kernel(model)
    return model


@needs_gpu
@pytest.mark.parametrize("kind", ["eager", "patched"])
def test_generate_with_cuda_graphs_matches_eager_generation(kind, device):
    """generate(cuda_graphs=True) captures one step and replays it: the tokens of generate()
    (float32, where the two paths' last-bit differences cannot flip a token), and the kernels'
    Python launchers run only for the prompt, the warm-up and the capture."""
    model = gpu_model(kind, torch.float32, device)
    prompt = torch.randint(0, GPU_CONFIG.vocab_size, (2, 600), device=device)  # several splits
    launches = []
    for new_tokens in (8, 24):
        expected = model.generate(prompt, new_tokens)
        LAUNCHES.clear()
        out = model.generate(prompt, new_tokens, cuda_graphs=True)
        torch.cuda.synchronize()
        launches.append(dict(LAUNCHES))
        assert torch.equal(out, expected), new_tokens
    assert launches[0] == launches[1], launches  # more tokens, no more launches: replays
    if kind == "patched":
        assert launches[0][SPLIT] > 0, launches


@needs_gpu
@pytest.mark.parametrize("kind", ["eager", "patched"])
def test_cuda_graph_replays_the_static_step_exactly(kind, device):
    """bfloat16: the replayed graph gives bit for bit the tokens of the same static step run
    without a graph (the same launches on the same shapes)."""
    model = gpu_model(kind, torch.bfloat16, device)
    prompt = torch.randint(0, GPU_CONFIG.vocab_size, (2, 300), device=device)
    (static_tokens, _), _ = run_static_steps(model, prompt, 16, cache_len=300 + 16)
    assert torch.equal(model.generate(prompt, 16, cuda_graphs=True), static_tokens)
