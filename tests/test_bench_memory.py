"""The training-step memory benchmark (``llama-kernels bench --only memory``; benchmarks/bench_memory.py).

One smoke run through the command line (tiny LLaMA, modes full and lora+ckpt, every provider, a
limit of 2 MB), then what it relies on: MemTracker's figures on fake tensors against a count done
by hand (parameters, AdamW states, the inputs), and the fit-and-verify search for the longest
length that fits against brute force on synthetic memory functions.
"""
import datetime
import json
import shutil

import pytest

from benchmarks import bench_memory as bm
from llama_kernels import cli

pytestmark = pytest.mark.timeout(120)

STATUSES = {"ok", "failed", "missing", "skipped"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    rc = cli.main(["bench", "--only", "memory", "--smoke", "--out", str(out)])
    (json_path,) = out.glob("*.json")
    return rc, out, json.loads(json_path.read_text())


def test_smoke_run_writes_its_files_named_as_a_fake_tensor_run(smoke):
    rc, out, doc = smoke
    assert rc in (0, 1)  # 1: one of the providers failed; the records say which (test below)
    stem = f"cpu-fake-memory-smoke-{datetime.date.today().isoformat()}"
    assert {p.name for p in out.iterdir()} >= {f"{stem}.json", f"{stem}.md", f"{stem}.png"}
    assert doc["complete"] is True and doc["interrupted"] is None
    assert doc["smoke"] is True and "SMOKE" in doc["warning"]
    md = (out / f"{stem}.md").read_text()
    assert "SMOKE" in md and "Longest sequence that fits" in md and "decimal GB" in md
    assert "no GPU" in md  # the CUDA column on a CPU machine


def test_every_provider_is_measured_or_reported_with_a_reason(smoke):
    _, _, doc = smoke
    records = doc["records"]
    assert {r["status"] for r in records} <= STATUSES
    for r in records:
        assert r["status"] == "ok" or r["reason"], r
    for mode in bm.SMOKE_MODES:
        assert {r["provider"] for r in records if r["mode"] == mode} == set(bm.PROVIDERS)
    # The harness's own providers always run, the reference model with its own checkpointing too.
    ok = {(r["mode"], r["provider"]) for r in records if r["status"] == "ok"}
    assert {("full", "hf-eager"), ("full", "hf-sdpa"), ("full", "ref-eager"),
            ("lora+ckpt", "hf-sdpa"), ("lora+ckpt", "hf-eager"), ("lora+ckpt", "ref-eager")} <= ok
    failed = [f"{r['mode']} {r['provider']}: {r['reason']}" for r in records if r["status"] == "failed"]
    assert smoke[0] == (1 if failed else 0), failed


def test_categories_sum_to_the_peak_and_ratios_are_to_hf_sdpa(smoke):
    _, _, doc = smoke
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert set(r["categories"]) == set(bm.CATEGORIES)
        assert sum(r["categories"].values()) == r["peak_bytes"] > 0
        assert r["peak_minus_params_bytes"] == r["peak_bytes"] - r["categories"]["PARAM"]
        assert r["cuda_note"] == "no GPU" and r["cuda_max_allocated_bytes"] is None
    base = {(r["mode"], r["tokens"]): r for r in ok if r["provider"] == "hf-sdpa"}
    for r in ok:
        b = base.get((r["mode"], r["tokens"]))
        if b is not None:
            assert r["ratio_to_hf_sdpa"] == pytest.approx(r["peak_minus_params_bytes"] / b["peak_minus_params_bytes"])
    # Eager attention keeps the T x T scores: more than SDPA at the same length.
    assert all(r["ratio_to_hf_sdpa"] > 1 for r in ok if r["provider"] == "hf-eager" and r["tokens"] >= 256)


def test_forward_backward_peak_is_reported_apart_from_the_optimizer_step(smoke):
    _, out, doc = smoke
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    base = {(r["mode"], r["tokens"]): r for r in ok if r["provider"] == "hf-sdpa"}
    for r in ok:
        cats = r["fwd_bwd_categories"]
        assert sum(cats.values()) == r["fwd_bwd_peak_bytes"] <= r["peak_bytes"]
        assert cats["PARAM"] == r["categories"]["PARAM"]
        # The states were made before the step; the AdamW step adds only to OPT, not before it.
        assert r["opt_state_bytes"] <= cats["OPT"] <= r["categories"]["OPT"]
        assert r["fwd_bwd_minus_params_states_bytes"] == r["fwd_bwd_peak_bytes"] - cats["PARAM"] - cats["OPT"]
        b = base.get((r["mode"], r["tokens"]))
        if b is not None:
            assert r["fwd_bwd_ratio_to_hf_sdpa"] == pytest.approx(
                r["fwd_bwd_minus_params_states_bytes"] / b["fwd_bwd_minus_params_states_bytes"])
    (md,) = out.glob("*.md")
    assert "forward + backward alone" in md.read_text()


def test_longest_fitting_lengths_are_verified_by_measurements(smoke):
    _, _, doc = smoke
    limit = doc["limits_gb"][0] * 1e9
    fits = [f for f in doc["fits"] if f["status"] not in ("failed", "missing", "skipped")]
    assert {(f["mode"], f["provider"]) for f in fits} >= {("full", "hf-sdpa"), ("lora+ckpt", "hf-sdpa")}
    measured = {(r["mode"], r["provider"], r["tokens"]): r["peak_bytes"] for r in doc["records"] if r["status"] == "ok"}
    for f in fits:
        assert f["status"] == "verified", f
        t = f["tokens"]
        assert t % doc["step_tokens"] == 0
        assert measured[(f["mode"], f["provider"], t)] == f["bytes_at"] <= limit
        assert measured[(f["mode"], f["provider"], t + doc["step_tokens"])] == f["bytes_one_step_above"] > limit


def _hand_count_params(c: dict) -> int:
    """LLaMA's parameters from its config, by hand: embedding, per layer q/k/v/o, gate/up/down and
    two norms, the final norm, an untied LM head."""
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h + c["num_hidden_layers"] * layer + h + v * h


@pytest.mark.parametrize("provider", ["hf-sdpa", "ref-eager"])
def test_fake_tensor_figures_equal_a_count_by_hand(provider):
    spec = bm.ALL_MODELS["smoke-llama"]
    tokens = 64
    m = bm.measure_fake(spec, "full", provider, tokens)
    params = _hand_count_params(spec.config)
    assert m["trainable"] == params
    assert m["categories"]["PARAM"] == 2 * params  # bf16
    assert m["opt_states"] == 2 * 2 * params  # AdamW: exp_avg and exp_avg_sq, bf16 like the parameters
    # At the peak OPT holds the states, one float32 step counter per parameter tensor (12 here), and
    # at most a few temporaries of the largest parameter (the V x H embedding) that the step makes.
    largest = 2 * spec.config["vocab_size"] * spec.config["hidden_size"]
    assert m["opt_states"] + 4 * 12 <= m["categories"]["OPT"] <= m["opt_states"] + 4 * 12 + 3 * largest
    assert m["categories"]["OTH"] == 8 * tokens  # the int64 input ids (the labels are the same tensor)
    assert m["offloaded"] is None
    assert sum(m["categories"].values()) == m["total"]
    # Before the AdamW step: the same parameters, inputs and states (the step counters included), and
    # at most every gradient (at this size the peak comes early in the backward, before most of them).
    fwd_bwd = m["fwd_bwd_categories"]
    assert fwd_bwd["PARAM"] == 2 * params and fwd_bwd["OTH"] == 8 * tokens
    assert fwd_bwd["OPT"] == m["opt_states"] + 4 * 12
    assert fwd_bwd["GRAD"] <= 2 * params


def test_lora_freezes_the_base_and_counts_only_adapter_states():
    spec = bm.ALL_MODELS["smoke-llama"]
    m = bm.measure_fake(spec, "lora", "hf-sdpa", 64)
    c = spec.config
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv, r = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, bm.LORA_RANK
    # A (r x in) and B (out x r) on each of q, k, v, o, gate, up, down
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    adapters = c["num_hidden_layers"] * sum(r * (a + b) for a, b in dims)
    assert m["trainable"] == adapters
    # PEFT keeps the adapters in float32 (autocast_adapter_dtype): 4 bytes, two AdamW states each
    assert m["opt_states"] == 2 * 4 * adapters
    assert m["categories"]["PARAM"] == 2 * _hand_count_params(c) + 4 * adapters


def _synthetic(a, b, c, jump=0.0, every=4096):
    calls = []

    def f(t):
        calls.append(t)
        return a + b * t + c * t * t + jump * ((t + every - 1) // every)

    return f, calls


def _brute(f, limit, step, cap):
    best = 0
    for t in range(step, cap + 1, step):
        if f(t) <= limit:
            best = t
    return best


@pytest.mark.parametrize("a,b,c,jump,limit", [
    (15e9, 5e5, 0.0, 0.0, 80e9),  # linear (checkpointed, chunked)
    (15e9, 2e5, 150.0, 0.0, 80e9),  # quadratic (eager attention's scores)
    (45e9, 1e6, 0.0, 3e8, 141e9),  # linear with steps where a chunk count changes
    (60e9, 7e6, 2.0, 0.0, 24e9),  # not even one step fits
])
def test_longest_fitting_matches_brute_force_with_few_measurements(a, b, c, jump, limit):
    step, cap = 1024, 1 << 20
    f, calls = _synthetic(a, b, c, jump)
    known = {t: f(t) for t in (2048, 4096, 8192, 16384)}
    t = 32768
    while known[max(known)] <= 141e9 and t <= cap:  # the sweep's doubling
        known[t] = f(t)
        t *= 2
    calls.clear()
    got = bm.longest_fitting(f, limit, known, step, cap)
    truth = _brute(lambda t: a + b * t + c * t * t + jump * ((t + 4095) // 4096), limit, step, cap)
    assert got["tokens"] == truth
    assert got["status"] == ("none" if truth == 0 else "verified")
    assert len(calls) <= 6, calls
    if truth:
        assert f(truth) <= limit < f(truth + step)
        if jump == 0.0:  # a polynomial of degree <= 2 is predicted exactly by the fit
            assert got["predicted"] == truth


def test_longest_fitting_says_when_the_cap_still_fits():
    f, _ = _synthetic(1e9, 10.0, 0.0)
    known = {t: f(t) for t in (2048, 4096)}
    got = bm.longest_fitting(f, 80e9, known, 1024, 8192)
    assert got == {"tokens": 8192, "status": "beyond-cap", "predicted": None, "measured": [8192]}


def test_a_part_of_the_sweep_keeps_the_other_parts_records(smoke, tmp_path):
    _, out, doc = smoke
    (json_path,) = out.glob("*.json")
    shutil.copy(json_path, tmp_path / json_path.name)
    rc = cli.main(["bench", "--only", "memory", "--smoke", "--out", str(tmp_path), "--memory-modes", "full",
                   "--memory-providers", "hf-sdpa", "--memory-tokens", "64", "--memory-no-search"])
    assert rc == 0
    new = json.loads((tmp_path / json_path.name).read_text())
    mine = [r for r in new["records"] if (r["mode"], r["provider"]) == ("full", "hf-sdpa")]
    tokens = [r["tokens"] for r in mine]  # 64, then doubling while the limit still fits
    assert tokens[0] == 64 and tokens == [64 * 2 ** k for k in range(len(tokens))]
    assert all(r["peak_bytes"] <= new["limits_gb"][0] * 1e9 for r in mine[:-1])
    assert mine[-1]["peak_bytes"] > new["limits_gb"][0] * 1e9 or tokens[-1] * 2 > new["max_tokens"]
    others = [r for r in doc["records"] if (r["mode"], r["provider"]) != ("full", "hf-sdpa")]
    assert [r for r in new["records"] if (r["mode"], r["provider"]) != ("full", "hf-sdpa")] == others


@pytest.mark.parametrize("argv", [["--memory-models", "nope"], ["--memory-modes", "half"],
                                  ["--memory-tokens", "0"], ["--only", "memory,nope"]])
def test_bad_memory_arguments_exit_with_status_2(argv, capsys):
    assert cli.main(["bench", "--only", "memory", *argv]) == 2
    assert "error:" in capsys.readouterr().err


def test_extrapolation_past_the_cap_is_the_line_through_the_two_longest_points():
    known = {2048: 10e9, 131072: 40e9, 262144: 60e9}
    # 60 GB at 262144, 20 GB per 131072 tokens: 80 GB at 393216
    assert bm.extrapolate(known, 80e9, 1024) == 393216
    assert bm.extrapolate({2048: 1e9}, 80e9, 1024) is None


def test_reference_model_checkpointing_keeps_less_of_the_forward():
    """The reference model's +ckpt modes use its own hook (``Llama.layer_checkpoint``)."""
    spec = bm.ALL_MODELS["smoke-llama"]
    plain, ckpt = (bm.measure_fake(spec, mode, "ref+ours", 256) for mode in ("full", "full+ckpt"))
    assert ckpt["categories"]["ACT"] < plain["categories"]["ACT"]
    assert ckpt["total"] < plain["total"]


# --- quantised models and the decode (inference) mode ---------------------------------------------

def _projection_shapes(c: dict) -> list:
    """(N, K) of one layer's q, k, v, o, gate, up, down."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def test_decode_mode_counts_quantised_weights_as_params():
    """Inference (prefill + one decode step): no gradient, no optimizer; a quantised model's weights
    (qweight, scales, zeros: buffers) are its PARAM, counted by hand; the activations and the KV
    cache are the same whatever the weights' format."""
    spec = bm.ALL_MODELS["smoke-llama"]
    c, tokens = spec.config, 128
    group = bm._int4_group(c)
    assert group == 64  # the tiny model's width is no multiple of 128
    projections = c["num_hidden_layers"] * sum(n * k for n, k in _projection_shapes(c))
    rows = c["num_hidden_layers"] * sum(n for n, _ in _projection_shapes(c))
    rest = 2 * (_hand_count_params(c) - projections)  # embedding, norms, LM head: bf16
    want = {"hf+ours": rest + 2 * projections,
            "hf+ours+int8": rest + projections + 2 * rows,  # int8 + a bf16 scale per output row
            "hf+ours+int4": rest + projections // 2 + 3 * (projections // group)}  # + bf16 scale, uint8 zero
    got = {p: bm.measure_fake(spec, "decode", p, tokens) for p in want}
    kv = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"] * 2 * tokens  # K and V, bf16
    for p, m in got.items():
        cats = m["categories"]
        assert cats["PARAM"] == want[p], p
        assert cats["GRAD"] == cats["OPT"] == cats["TEMP"] == 0 and m["opt_states"] == m["trainable"] == 0
        assert cats["ACT"] == got["hf+ours"]["categories"]["ACT"] >= kv
        assert sum(cats.values()) == m["total"] and m["fwd_bwd_total"] <= m["total"]
    assert "int4 in groups of 64" in " ".join(got["hf+ours+int4"]["notes"])
    # The kernel summary is taken before quantisation: the patched modules are there all the same.
    assert "attention 1" in " ".join(got["hf+ours+int4"]["notes"])


def test_quantised_providers_train_adapters_only():
    spec = bm.ALL_MODELS["smoke-llama"]
    with pytest.raises(bm.Skipped, match="frozen"):
        bm.build(spec, "full", "hf+ours+int8", "cpu", "meta")
    try:  # QLoRA's way: LoRA on the quantised base, when this PEFT can wrap the quantised layers
        m = bm.measure_fake(spec, "lora", "hf+ours+int4", 64)
    except bm.Missing as exc:
        assert "cannot add LoRA to llama_kernels.quantize.QuantizedLinear" in str(exc)
    else:
        assert 0 < m["trainable"] and m["categories"]["GRAD"] >= 0


def test_decode_mode_run_writes_its_table(tmp_path):
    rc = cli.main(["bench", "--only", "memory", "--smoke", "--out", str(tmp_path), "--memory-modes", "decode",
                   "--memory-providers", "hf-sdpa,hf+ours+int4", "--memory-tokens", "128", "--memory-no-search"])
    assert rc == 0
    (json_path,) = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert {(r["mode"], r["provider"], r["status"]) for r in doc["records"]} == {
        ("decode", "hf-sdpa", "ok"), ("decode", "hf+ours+int4", "ok")}
    by = {(r["provider"], r["tokens"]): r for r in doc["records"]}
    assert by["hf+ours+int4", 128]["categories"]["PARAM"] < by["hf-sdpa", 128]["categories"]["PARAM"]
    md = json_path.with_suffix(".md").read_text()
    assert "inference memory" in md and "decode: peak of the prefill and one decode step" in md
    assert "(weights " in md
