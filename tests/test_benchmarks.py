"""The benchmark harness end to end in smoke mode (tiny shapes; on the CPU, the Triton interpreter).

Checks what a GPU run relies on: every op and model figure is produced for every provider (timed,
or reported missing/skipped with a reason), the JSON, markdown and plots are written, and a smoke
run says in its files that its timings mean nothing.  It does not judge the kernels (their own
tests do): "ours" may be reported missing while an op is being written.  Four runs: the ops and
the model (``smoke_run``), packed attention alone (``varlen_run``), the padded/packed batches
of transformers' model (``batches_run``) and two quantised linears at two projections
(``quantized_run``).
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_batches, bench_model, shapes
from benchmarks import ops as op_benchmarks
from benchmarks.__main__ import PARTS, Terminated, main
from benchmarks.ops import OPS, harness
from benchmarks.ops import attention as attention_ops
from benchmarks.ops import quantized as quantized_ops

VARLEN = "varlen_attention"  # run by varlen_run, left out of smoke_run (each run stays short)
QUANTIZED = [spec.name for spec in quantized_ops.QUANTIZED_LINEAR]  # run by quantized_run (two of them)
SMOKE_OPS = [spec.name for spec in OPS if spec.name != VARLEN and spec.name not in QUANTIZED]

pytestmark = pytest.mark.timeout(300)

STATUSES = {"ok", "mismatch", "missing", "oom", "failed", "skipped", "unreliable"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--smoke", "--only", "ops,model", "--ops", ",".join(SMOKE_OPS), "--out", str(out)])
    return rc, out


def _records(out):
    (json_path,) = out.glob("*.json")
    return json.loads(json_path.read_text())["records"]


@pytest.fixture(scope="module")
def varlen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-varlen")
    rc = main(["--smoke", "--only", "ops", "--ops", VARLEN, "--out", str(out)])
    return rc, out


@pytest.fixture(scope="module")
def batches_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-batches")
    rc = main(["--smoke", "--only", "batches", "--out", str(out)])
    return rc, out


def test_smoke_run_writes_json_markdown_and_plots(smoke_run):
    rc, out = smoke_run
    assert rc in (0, 1)  # 1: a kernel disagrees with eager, which the op tests report in detail
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    assert json_path.stem == md_path.stem
    assert json_path.name.startswith("cpu-smoke-") or "-smoke-" in json_path.name
    assert list(out.glob(f"{json_path.stem}-ops-*.png")), "no op plot written"

    report = json.loads(json_path.read_text())
    assert report["meaningful"] is False
    assert report["interrupted"] is None and report["complete"] is True
    assert "MEAN NOTHING" in report["warning"]
    assert "MEAN NOTHING" in md_path.read_text()
    for key in ("copy_gbps", "matmul_tflops"):
        assert report["limits"][key] > 0
    assert report["environment"]["versions"]["torch"]


def test_smoke_run_covers_every_op_and_provider(smoke_run):
    _, out = smoke_run
    (json_path,) = out.glob("*.json")
    records = json.loads(json_path.read_text())["records"]
    assert {r["status"] for r in records} <= STATUSES
    for r in records:
        assert r["status"] == "ok" or r["reason"], f"{r['op']} {r['provider']}: {r['status']} without a reason"
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["throughput"] is not None or r["tokens_per_s"], r

    ops = {(r["op"], r["mode"]) for r in records if r["suite"] == "ops"}
    expected = {(spec.name, mode) for spec in OPS for mode in spec.modes if spec.name in SMOKE_OPS}
    assert ops == expected
    for op, mode in expected:  # eager runs everywhere: every op is timed at least once
        eager = [r for r in records if (r["op"], r["mode"], r["provider"]) == (op, mode, "eager")]
        assert eager and all(r["status"] == "ok" for r in eager), (op, mode, eager)
    attention_providers = {r["provider"] for r in records if r["op"] == "flash_attention"}
    assert {"ours", "ours-portable-fwd", "ours-deterministic", "eager", "torch.compile", "sdpa-flash",
            "sdpa-cudnn", "flash-attn"} <= attention_providers
    # Our two attention variants pass the check wherever ours runs (a mismatch would fail the run).
    ours = {(r["mode"], r["tokens"], r["dtype"]): r["status"] for r in records
            if (r["op"], r["provider"]) == ("flash_attention", "ours")}
    for r in records:
        if r["op"] == "flash_attention" and r["provider"] in ("ours-portable-fwd", "ours-deterministic"):
            assert r["status"] == ours[r["mode"], r["tokens"], r["dtype"]], r
    compiled = [r for r in records if r["provider"] == "torch.compile"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)

    model = {(r["op"], r["provider"]) for r in records if r["suite"] == "model"}
    for op in ("prefill", "decode", "train"):
        for provider in ("eager", "ours", "torch.compile", "hf", "hf+ours", "hf+liger"):
            assert (op, provider) in model
    assert {p for op, p in model if op == "decode-no-graph"} == {"eager", "ours"}
    assert any(r["suite"] == "model" and r["provider"] == "eager" and r["status"] == "ok" for r in records)


def test_smoke_run_measures_the_lm_head_and_loss(smoke_run):
    """linear_cross_entropy (issue 15): every provider and mode at the smoke sweep's own token counts,
    the matrix products' FLOP as its work, ours checked against eager (ours is the reference of
    the others, so its check is the one that must pass), and its tables in the markdown."""
    rc, out = smoke_run
    spec = next(s for s in OPS if s.name == "linear_cross_entropy")
    records = [r for r in _records(out) if r["op"] == spec.name]
    providers = {"ours", "eager", "torch.compile", "liger"}
    assert {(r["provider"], r["mode"]) for r in records} == {(p, m) for p in providers for m in spec.modes}
    tokens = harness.SWEEPS["smoke"]["lce"]
    assert {(r["tokens"], r["dtype"]) for r in records} == {(n, "bf16") for n in tokens} | {(16, "fp16")}
    factor = {"forward": 2, "backward": 4, "forward+backward": 6}
    allowed = {"eager": ("ok",), "ours": ("ok", "missing"), "liger": ("ok", "missing"), "torch.compile": ("skipped",)}
    for r in records:
        n, h, v = r["tokens"], r["dims"]["hidden"], r["dims"]["vocab"]
        assert (h, v) == (op_benchmarks.MODELS["smoke"]["hidden"], op_benchmarks.MODELS["smoke"]["vocab"])
        assert r["work_unit"] == "FLOP" and r["work"] == factor[r["mode"]] * n * v * h
        # eager "ok" beside ours "ok": ours' loss and gradients passed the check against eager's
        assert r["status"] in allowed[r["provider"]], r
    md = next(out.glob("*.md")).read_text()
    for mode in spec.modes:
        assert f"## ops: {spec.name}, {mode}" in md
    assert "Peak memory (the last figure of each cell)" in md
    assert list(out.glob(f"*-ops-{spec.name}.png"))


def test_lce_inputs_have_realistic_logits_and_ignored_targets():
    import torch

    from benchmarks.ops.harness import MODELS, Case, build_inputs
    from llama_kernels.ops.registry import LOSS_IGNORED as LCE_IGNORED

    spec = next(s for s in OPS if s.name == "linear_cross_entropy")
    case = Case("smoke", MODELS["smoke"], 40, torch.bfloat16, torch.device("cpu"))
    inp = build_inputs(spec, case, 1000, True)
    x, w, target = inp.args
    assert inp.leaves == (x, w) and x.requires_grad and w.requires_grad and x.dtype == w.dtype == torch.bfloat16
    assert w.shape == (MODELS["smoke"]["vocab"], MODELS["smoke"]["hidden"]) and target.dtype == torch.int64
    logits = x.detach().float() @ w.detach().float().T
    assert 0.8 < logits.std().item() < 1.25  # a softmax neither flat nor one-hot; never zeros
    ignored = target == -100
    assert ignored.sum().item() == max(1, round(40 * LCE_IGNORED))
    assert 0 <= target[~ignored].min() and target[~ignored].max() < MODELS["smoke"]["vocab"]
    again = build_inputs(spec, case, 1000, False).args
    assert all(torch.equal(a, b) for a, b in zip((x, w, target), again))  # fixed seeds: every provider alike


def test_memory_ratio_of_ours_over_eager_is_listed_with_ours():
    from benchmarks.ops.harness import _memory_ratios
    from benchmarks.common import Record

    def record(provider, mode, delta, status="ok"):
        r = Record("ops", "linear_cross_entropy", mode, provider, "llama3-8b", {}, 8192, "bf16", status=status)
        r.peak_mem_delta_bytes = delta
        return r

    rs = [record("ours", "forward", 1 << 30), record("eager", "forward", 4 << 30), record("liger", "forward", 1 << 29),
          record("ours", "backward", None), record("eager", "backward", 4 << 30),  # no peak (CPU): nothing
          record("ours", "forward+backward", 1 << 30), record("eager", "forward+backward", 0, status="oom")]
    _memory_ratios(rs, "eager")
    assert rs[0].extra == {"peak_mem_vs_eager": 0.25}
    assert rs[0].note == "peak memory 0.25x eager's at llama3-8b T=8192 bf16"
    assert all(not r.extra and r.note is None for r in rs[1:])


def test_model_train_step_takes_each_models_own_loss_path(monkeypatch):
    """The training step calls the model's loss path, so that eager and patched compare like with
    like: the reference model's ``model.loss(ids)`` (its ``cross_entropy`` op slot, the LM head
    and the shifted next-token loss in one call), transformers' ``model(..., labels=ids).loss``."""
    import contextlib
    import types

    import torch
    import torch.nn.functional as F

    from benchmarks.common import make_settings
    from llama_kernels import model as llama_model
    from llama_kernels import reference

    settings = make_settings("smoke", torch.device("cpu"), False)
    cfg = bench_model._config(settings)
    calls = []

    def spy(hidden, weight, target, *args, **kwargs):
        calls.append((tuple(hidden.shape), tuple(target.shape)))
        return reference.fused_linear_cross_entropy(hidden, weight, target, *args, **kwargs)

    monkeypatch.setattr(llama_model.Llama, "cross_entropy", staticmethod(spy))
    runner = bench_model.providers(cfg, settings)["eager"](contextlib.ExitStack())
    ids = bench_model._ids(cfg, 16, settings.device, 3)
    loss = runner.loss(ids)
    assert calls == [((1, 16, cfg["hidden_size"]), (1, 16))]
    with torch.no_grad():
        logits = runner.logits(ids)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert loss.item() == pytest.approx(want.item(), rel=1e-3)

    seen = []

    class FakeHF(torch.nn.Module):
        generation_config = types.SimpleNamespace()

        def forward(self, **kwargs):
            seen.append(kwargs)
            return types.SimpleNamespace(loss=torch.tensor(1.0), logits=None)

    assert bench_model.HFRunner(FakeHF()).loss(ids).item() == 1.0
    assert seen[0]["labels"] is ids and seen[0]["input_ids"] is ids


def test_smoke_model_train_checks_the_training_mode_loss(smoke_run):
    _, out = smoke_run
    train = {r["provider"]: r for r in _records(out) if r["suite"] == "model" and r["op"] == "train"}
    for family, providers in (("eager", ("eager", "ours")), ("hf", ("hf", "hf+ours"))):
        ref = train[family]["extra"]["train_loss"]
        for p in providers:
            if train[p]["status"] in ("ok", "mismatch"):
                assert train[p]["extra"]["train_loss"] == pytest.approx(ref, rel=bench_model.LOSS_TOLERANCE)


def test_smoke_decode_without_cuda_skips_the_graph_figure(smoke_run):
    """No CUDA: the CUDA-graph decode figure is skipped with its reason (never timed without a graph),
    the no-graph one is measured; transformers' decode says it is not graph-captured."""
    _, out = smoke_run
    (json_path,) = out.glob("*.json")
    model = {(r["op"], r["provider"]): r for r in json.loads(json_path.read_text())["records"]
             if r["suite"] == "model"}
    for provider in ("eager", "ours"):
        graph = model["decode", provider]
        assert graph["status"] == "skipped" and "CUDA device" in graph["reason"], graph
        assert "cuda_graphs=True" in graph["note"]
    eager = model["decode-no-graph", "eager"]
    assert eager["status"] == "ok" and eager["extra"]["cuda_graphs"] is False and eager["work"] > 0
    assert "not graph-captured" in model["decode", "hf"]["note"]


def test_speedups_are_same_run_ratios(smoke_run):
    _, out = smoke_run
    (json_path,) = out.glob("*.json")
    report = json.loads(json_path.read_text())
    ms = {(r["suite"], r["op"], r["mode"], r["shape"], r["tokens"], r["dtype"], r["provider"]): r["ms"]
          for r in report["records"] if r["status"] == "ok"}
    for r in report["records"]:
        if r["speedup_of_ours"] is not None:
            assert r["speedup_base"] in ("ours", "hf+ours")
            key = (r["suite"], r["op"], r["mode"], r["shape"], r["tokens"], r["dtype"], r["speedup_base"])
            assert r["speedup_of_ours"] == pytest.approx(r["ms"] / ms[key])


def test_shapes_replace_the_modes_shapes(tmp_path, capsys):
    import torch

    from benchmarks.common import make_settings

    spec = next(s for s in OPS if s.name == "flash_attention")
    settings = make_settings("quick", torch.device("cpu"), False, tokens=(2048, 4096, 8192, 16384),
                             shapes=("llama3-8b", "smollm2-135m"))
    got = [(c.shape, c.dims["d"], c.tokens, c.dtype) for c in harness.cases(spec, settings)]
    assert got == [(shape, d, n, torch.bfloat16) for shape, d in (("llama3-8b", 128), ("smollm2-135m", 64))
                   for n in (2048, 4096, 8192, 16384)]
    assert main(["--smoke", "--shapes", "smoke,nope", "--out", str(tmp_path)]) == 2
    assert "error: argument --shapes: unknown shape name(s) 'nope'; known: llama3-8b" in capsys.readouterr().err


def test_a_providers_context_holds_for_its_backward_too():
    """``ours-deterministic`` relies on this: every checked or timed step, a backward alone
    included, runs inside the provider's ``context``, and the setting is restored after each."""
    import torch

    from benchmarks.ops.attention import deterministic_algorithms
    from benchmarks.ops.harness import Inputs, _check_run, _timed_call
    from benchmarks.common import make_settings

    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", torch.are_deterministic_algorithms_enabled()))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", torch.are_deterministic_algorithms_enabled()))
            return grad * 2

    def fn(x):
        return Spy.apply(x)

    fn.context = deterministic_algorithms

    def build(i, grad):
        x = torch.randn(64, generator=torch.Generator().manual_seed(i)).requires_grad_(grad)
        return Inputs((x,), (x,))

    settings = make_settings("smoke", torch.device("cpu"), False)
    assert not torch.are_deterministic_algorithms_enabled()
    _check_run(fn, build, True)
    for mode in ("forward", "backward", "forward+backward"):
        call, _ = _timed_call(fn, build, mode, True, settings)
        assert not torch.are_deterministic_algorithms_enabled()
        call()
    assert {step for step, _ in seen} == {"forward", "backward"}
    assert all(on for _, on in seen), seen
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("before", [(False, False), (True, True), (True, False)])
def test_deterministic_algorithms_restores_the_setting_and_warn_only(before):
    import torch
    import torch.utils.deterministic as det

    from benchmarks.ops.attention import deterministic_algorithms

    fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert det.fill_uninitialized_memory is False
        assert (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) == before
        assert det.fill_uninitialized_memory == fill
    finally:
        torch.use_deterministic_algorithms(False)


def test_portable_forward_provider_turns_tma_off_for_the_call_only(monkeypatch):
    import llama_kernels
    from llama_kernels.ops.options import current

    seen = []

    def spy(q, k, v, causal=True, sm_scale=None):
        seen.append((current().tma_forward, causal))
        raise RuntimeError("on purpose")

    monkeypatch.setattr(llama_kernels, "flash_attention", spy)
    spec = next(s for s in OPS if s.name == "flash_attention")
    fn = spec.extra["ours-portable-fwd"]()
    with llama_kernels.kernel_options(tma_forward=True):
        with pytest.raises(RuntimeError, match="on purpose"):
            fn(None, None, None)
        assert seen == [(False, True)] and current().tma_forward is True
    assert spec.extra["ours-deterministic"]().context is attention_ops.deterministic_algorithms
    assert {"ours-portable-fwd", "ours-deterministic"} <= set(op_benchmarks.provider_notes())


def test_unknown_op_is_refused(tmp_path):
    assert main(["--smoke", "--ops", "no_such_op", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("tokens", ["abc", "0", "-3", "16,", "16,x", ""])
def test_bad_token_counts_are_refused(tokens, tmp_path, capsys):
    # Refused by the parser, before anything runs: a 0-token shape used to run, fail in eager and
    # still exit 0.
    assert main(["--smoke", "--tokens", tokens, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "python -m benchmarks: error: argument --tokens: expected comma-separated whole numbers >= 1" in err
    assert not list(tmp_path.iterdir())


def test_unknown_op_is_named(tmp_path, capsys):
    assert main(["--smoke", "--ops", "rms_norm,no_such_op", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    known = ", ".join(spec.name for spec in OPS)
    assert f"error: argument --ops: unknown op name(s) 'no_such_op'; known: {known}" in err


def test_help_is_plain(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m benchmarks") and "``" not in out


def test_a_failing_provider_fails_the_run(monkeypatch, tmp_path, capsys):
    """Any provider that fails (here eager) makes the exit status 1, not just ours."""
    from llama_kernels import reference

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(reference, "rms_norm", broken)
    assert main(["--smoke", "--only", "ops", "--ops", "rms_norm", "--tokens", "16", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: ops rms_norm [forward] smoke T=16 bf16 eager: FAILED (RuntimeError: broken on purpose)" in out


def test_which_records_fail_a_run():
    from benchmarks.__main__ import problems
    from benchmarks.common import Record

    def record(provider, status):
        return Record("ops", "rms_norm", "forward", provider, "smoke", {}, 16, "bf16", status=status)

    bad = [record(p, "failed") for p in ("ours", "eager", "liger", "torch.compile", "hf+liger", "hf-sdpa-packed")]
    bad += [record(p, "mismatch") for p in ("ours", "hf+ours", "eager", "ours-portable-fwd", "ours-deterministic",
                                            "hf+ours-padded")]
    fine = [record("ours", s) for s in ("ok", "missing", "skipped", "oom", "unreliable")]
    fine.append(record("liger", "mismatch"))  # a third party disagreeing with ours: reported, not a failure
    fine.append(record("sdpa-padded", "mismatch"))
    fine.append(record("hf-fa2-packed", "mismatch"))
    assert problems(bad + fine) == bad


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (main handles only Ctrl-C and SIGTERM)."""


@pytest.mark.parametrize("stop", [Killed, Terminated], ids=["sigkill", "sigterm"])
def test_a_run_stopped_after_the_first_op_keeps_its_figures(stop, monkeypatch, tmp_path):
    """The report is rewritten after every op: killed outright, the partial JSON/markdown remain,
    marked incomplete; stopped by SIGTERM, the final write (with plots) says so too.  Either way
    the stop comes while the second op is being timed, as a lease's end would."""
    real_run_case, real_bench = harness.run_case, harness.bench
    second_op: list = []

    def run_case(spec, *args, **kwargs):
        if spec.name != "rms_norm":
            second_op.append(spec.name)
        return real_run_case(spec, *args, **kwargs)

    def bench(call, settings):
        if second_op:  # its first timing: after its check, with its record already listed
            raise stop()
        return real_bench(call, settings)

    monkeypatch.setattr(harness, "run_case", run_case)
    monkeypatch.setattr(harness, "bench", bench)
    argv = ["--smoke", "--only", "ops", "--ops", "rms_norm,swiglu", "--tokens", "16", "--out", str(tmp_path)]
    if stop is Killed:
        with pytest.raises(Killed):
            main(argv)
    else:
        assert main(argv) == 130
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["complete"] is False
    expected = "partial: written after ops rms_norm" if stop is Killed else "stopped early (Terminated)"
    assert report["interrupted"].startswith(expected)
    assert report["limits"]["copy_gbps"] > 0
    assert {r["op"] for r in report["records"]} == {"rms_norm"}
    assert f"Incomplete: {expected}" in json_path.with_suffix(".md").read_text()
    # Plots only in a final write; no temporary file left beside the results.
    assert bool(list(tmp_path.glob("*.png"))) is (stop is Terminated)
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.suffix != ".png") == [".json", ".md"]


def test_a_killed_model_run_keeps_the_providers_measured_before(monkeypatch, tmp_path):
    real = bench_model.providers

    def providers(cfg, settings, family="llama"):
        def killed(stack):
            raise Killed()

        return {"eager": real(cfg, settings)["eager"], "ours": killed}

    monkeypatch.setattr(bench_model, "providers", providers)
    with pytest.raises(Killed):
        main(["--smoke", "--only", "model", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["complete"] is False and report["interrupted"].startswith("partial: written after model eager")
    assert {(r["op"], r["provider"]) for r in report["records"]} == {
        ("prefill", "eager"), ("decode", "eager"), ("decode-no-graph", "eager"), ("train", "eager")}


def test_family_option_runs_another_transformers_family(monkeypatch, tmp_path):
    """--family qwen3 end to end (transformers' unpatched model only: hf+ours under the interpreter
    costs ~20 s, and tests/test_families.py checks apply_kernels on every family), then the table:
    the real models' shapes, Gemma 2's eager attention and windowed FLOP, and hf+liger's undo."""
    import contextlib
    import sys
    import types

    import torch

    from benchmarks.common import make_settings

    real = bench_model.providers

    def providers(cfg, settings, family="llama"):
        built = real(cfg, settings, family)
        assert list(built) == ["hf", "hf+ours", "hf+compile", "hf+liger"]
        return {"hf": built["hf"]}

    monkeypatch.setattr(bench_model, "providers", providers)
    assert main(["--smoke", "--only", "model", "--family", "qwen3", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.stem.endswith("-qwen3")  # never the LLaMA run's file
    report = json.loads(json_path.read_text())
    assert report["model_family"] == "qwen3" and "model (Qwen3-8B shapes)" in report["providers"]
    records = report["records"]
    assert {(r["op"], r["provider"], r["status"], r["shape"]) for r in records} == {
        (op, "hf", "ok", "qwen3-smoke") for op in ("prefill", "decode", "train")}
    cfg = bench_model._config(make_settings("smoke", torch.device("cpu"), False), "qwen3")
    assert all(r["dims"]["family"] == "qwen3" and r["dims"]["head_dim"] == cfg["head_dim"] for r in records)
    monkeypatch.setattr(bench_model, "providers", real)

    # The real models: Qwen3-8B and Gemma-2-9B at the sweep's layer count, their own head dims.
    quick, full = (make_settings(m, torch.device("cpu"), False) for m in ("quick", "full"))
    qwen = bench_model._config(quick, "qwen3")
    assert (qwen["vocab_size"], qwen["intermediate_size"], qwen["head_dim"], qwen["rope_theta"]) == (
        151936, 12288, 128, 1e6) and qwen["num_hidden_layers"] == bench_model.SWEEPS["quick"]["layers"]
    gemma = bench_model._config(full, "gemma2")
    assert gemma["layer_types"] == ["sliding_attention", "full_attention"] * 2 and gemma["head_dim"] == 256
    t, w, per_pair = 8192, 4096, 4 * 16 * 256  # local layers: only the pairs inside the window
    assert bench_model._attention_fwd_flop(gemma, t) == 2 * per_pair * t * t / 2 + 2 * per_pair * (
        t * t / 2 - (t - w) ** 2 / 2)
    assert shapes.linear_params(gemma) == 4 * (3584 * 256 * 48 + 3 * 3584 * 14336) + 3584 * 256000
    smoke = make_settings("smoke", torch.device("cpu"), False)
    model = bench_model._hf(bench_model._config(smoke, "gemma2"), smoke, "gemma2")
    assert model.config._attn_implementation == "eager" and model.config.head_dim == 64  # != 128 / 4
    assert model.config.final_logit_softcapping == 30.0 and model.config.sliding_window == 8

    # hf+liger: Liger swaps the modeling module's names; they are restored when the provider ends.
    from transformers.models.gemma2 import modeling_gemma2

    names = ("apply_rotary_pos_emb", "Gemma2RMSNorm", "Gemma2MLP")
    before = [getattr(modeling_gemma2, n) for n in names] + [modeling_gemma2.Gemma2ForCausalLM.forward]

    def fake_apply(model):
        for n in names:
            setattr(modeling_gemma2, n, object())
        modeling_gemma2.Gemma2ForCausalLM.forward = lambda self, **kw: None

    liger = types.ModuleType("liger_kernel")
    liger.transformers = types.SimpleNamespace(apply_liger_kernel_to_gemma2=fake_apply)
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger.transformers)
    with contextlib.ExitStack() as stack:
        bench_model._liger_patched(stack, model, "gemma2")
        assert modeling_gemma2.Gemma2RMSNorm is not before[1]
    assert [getattr(modeling_gemma2, n) for n in names] + [modeling_gemma2.Gemma2ForCausalLM.forward] == before
    assert main(["--smoke", "--only", "model", "--family", "nope", "--out", str(tmp_path)]) == 2


def test_a_compiled_baseline_is_measured_where_nothing_was_patched(monkeypatch, tmp_path):
    """--family runs hf+ours before hf+compile.  A provider that changes transformers' modeling
    module for every later model (as apply_kernels' RoPE dispatcher, which reads a ContextVar,
    did) must not reach the compiled baseline: compiled in that process it broke its graph at
    every layer.  hf+compile is measured in a fresh process: no graph break there, nothing
    compiled here, and its losses checked against hf's all the same.  The compile backend is
    Dynamo's "eager" (its tracing and graph breaks, not inductor's ~20 s per graph on the CPU)."""
    import contextvars

    from torch._dynamo.utils import counters
    from transformers.models.qwen3 import modeling_qwen3

    real = bench_model.providers
    active = contextvars.ContextVar("active", default=())
    original = modeling_qwen3.apply_rotary_pos_emb
    calls = []

    def dispatcher(q, k, cos, sin, unsqueeze_dim=1):  # inert for an unpatched model; Dynamo cannot trace .get()
        calls.append("rope" in active.get())
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    def providers(cfg, settings, family="llama"):
        built = real(cfg, settings, family)

        def patched(stack):  # stands for hf+ours' side effect on the module (cheap: no interpreter)
            monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", dispatcher)
            return built["hf"](stack)

        return {"hf": built["hf"], "hf+ours": patched, "hf+compile": built["hf+compile"]}

    monkeypatch.setattr(bench_model, "providers", providers)
    monkeypatch.setattr(bench_model, "COMPILE_BACKEND", "eager")
    counters.clear()
    assert main(["--smoke", "--only", "model", "--family", "qwen3", "--compile", "--out", str(tmp_path)]) == 0
    assert calls and not any(calls)  # the fake patch was in place for the providers after it
    assert not counters["graph_break"] and not counters["stats"]["unique_graphs"]  # nothing compiled here
    by = {(r["op"], r["provider"]): r for r in _records(tmp_path)}
    for op in ("prefill", "train"):
        compiled, hf = by[op, "hf+compile"], by[op, "hf"]
        assert compiled["status"] == "ok", compiled
        assert compiled["extra"]["graph_breaks"] == 0 and compiled["extra"]["graphs"] > 0, compiled["extra"]
        assert compiled["extra"]["loss"] == pytest.approx(hf["extra"]["loss"], rel=bench_model.LOSS_TOLERANCE)
    assert by["train", "hf+compile"]["extra"]["train_loss"] == pytest.approx(
        by["train", "hf"]["extra"]["train_loss"], rel=bench_model.LOSS_TOLERANCE)
    assert by["decode", "hf+compile"]["status"] == "skipped"  # compiled decode: full mode only


def test_a_compiled_baseline_refuses_a_patched_process(monkeypatch, tmp_path):
    """The fresh process checks before measuring that no kernel library's function is found in
    transformers (module names, class attributes, attention registrations) and says what it found;
    a process that fails or refuses leaves every figure of its provider failed, with the reason."""
    import torch
    from transformers import AttentionInterface
    from transformers.models.qwen3 import modeling_qwen3

    from benchmarks import isolated
    from benchmarks.common import make_settings

    def rope(*args, **kwargs):
        pass

    def lce_forward(self, **kwargs):
        pass

    rows = "llama_kernels.integrations.transformers.rows"
    rope.__module__, rope.__qualname__ = rows, "rope"
    lce_forward.__module__ = "liger_kernel.transformers.model.qwen3"
    before = set(isolated.patches_present())  # other tests of this process may have patched already
    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", rope)
    monkeypatch.setattr(modeling_qwen3.Qwen3ForCausalLM, "forward", lce_forward)
    monkeypatch.setitem(AttentionInterface._global_mapping, "llama_kernels", rope)
    found = set(isolated.patches_present()) - before
    assert found == {
        f"transformers.models.qwen3.modeling_qwen3.apply_rotary_pos_emb is {rows}.rope",
        "transformers.models.qwen3.modeling_qwen3.Qwen3ForCausalLM.forward is liger_kernel.transformers.model.qwen3's",
        f"transformers.modeling_utils.AttentionInterface._global_mapping['llama_kernels'] is {rows}'s",
    }
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"name": "hf+compile", "settings": {"device": "cpu"}}))
    assert isolated.main([str(request), str(result)]) == 0
    error = json.loads(result.read_text())["error"]
    assert error.startswith("Patched: hf+compile (a compiled baseline) refused: this process has patched "
                            "transformers (") and f"apply_rotary_pos_emb is {rows}.rope" in error
    monkeypatch.undo()
    assert set(isolated.patches_present()) == before

    # What the main process makes of a child that refused, or died without a result.
    settings = make_settings("smoke", torch.device("cpu"), True)
    cfg = bench_model._config(settings, "qwen3")

    class Child:
        def __init__(self, argv, **kwargs):
            self.pid, self.returncode = 1, (0 if error_result else -9)
            if error_result:
                Path(argv[-1]).write_text(json.dumps({"error": "Patched: refused"}))

        def wait(self, timeout=None):
            return self.returncode

        def poll(self):
            return self.returncode

    # Child reads error_result when the loop's body constructs it.
    for error_result, reason in ((True, "Patched: refused"), (False, "exited with status -9 without a result")):  # noqa: B007
        monkeypatch.setattr(bench_model.subprocess, "Popen", Child)
        records, refs = [], {"hf": 1.0}
        bench_model.run_isolated("hf+compile", cfg, settings, {}, records, refs, "qwen3")
        assert [(r.op, r.status) for r in records] == [("prefill", "failed"), ("decode", "failed"),
                                                      ("train", "failed")]
        assert all(reason in r.reason for r in records) and refs == {"hf": 1.0}


def test_decode_bytes_split_at_the_graph_baseline():
    """The graph figure times steps 2..N-1 (generate(N) - generate(2)); the plain one steps 1..N-1:
    both count the weights once a step and the cache rows each step reads."""
    from benchmarks.bench_model import SMOKE, _decode_bytes

    cfg = dict(SMOKE, num_hidden_layers=2)
    kv_row = 2 * 2 * SMOKE["num_key_value_heads"] * (SMOKE["hidden_size"] // SMOKE["num_attention_heads"]) * 2
    weights, prompt = 1000, 8
    # step j writes one K/V row and reads the prompt + j rows up to it
    assert _decode_bytes(cfg, weights, prompt, 1, 1, 2) == weights + kv_row + kv_row * (prompt + 1)
    assert _decode_bytes(cfg, weights, prompt, 1, 5, 2) == (
        _decode_bytes(cfg, weights, prompt, 1, 1, 2) + _decode_bytes(cfg, weights, prompt, 2, 5, 2))
    assert _decode_bytes(cfg, weights, prompt, 2, 5, 2) == 4 * (weights + kv_row) + kv_row * sum(
        prompt + j for j in range(2, 6))


# --- packed (varlen) attention and the padded/packed batches of transformers' model ----------------

def test_varlen_lengths_are_uneven_fixed_and_total_the_tokens():
    from llama_kernels.ops.registry import varlen_lengths

    for total in (1, 7, 40, 8192, 16384):
        lengths = varlen_lengths(total)
        assert sum(lengths) == total and min(lengths) >= 1
        assert max(lengths) <= max(1, total // 4) and lengths == varlen_lengths(total)
    assert len(set(varlen_lengths(8192))) > 3  # uneven: the point of the benchmark


def test_varlen_run_checks_every_provider_in_the_packed_layout(varlen_run):
    rc, out = varlen_run
    assert rc in (0, 1)  # 1: ours disagrees with eager, which tests/test_varlen.py reports in detail
    records = _records(out)
    spec = next(s for s in OPS if s.name == VARLEN)
    providers = ["ours", "eager", "flash-attn", "sdpa-padded", "sdpa-padded-mask", "sdpa-loop"]
    assert {(r["provider"], r["mode"]) for r in records} == {(p, m) for p in providers for m in spec.modes}
    by = {(r["provider"], r["mode"]): r for r in records}
    for r in records:
        assert r["status"] == "ok" or r["reason"], r
        lengths = r["dims"]["lengths"]
        assert sum(lengths) == r["tokens"] and r["dims"]["sequences"] == len(lengths) > 1
        fwd = sum(4 * r["dims"]["hq"] * n * n * r["dims"]["d"] / 2 for n in lengths)  # the real work only
        assert r["work"] == pytest.approx(fwd if r["mode"] == "forward" else 3.5 * fwd)
        assert r["work"] < (4 * r["dims"]["hq"] * r["dims"]["max_len"] ** 2 * r["dims"]["d"] / 2
                            * len(lengths) * (1 if r["mode"] == "forward" else 3.5))  # padding costs more
    for mode in spec.modes:
        assert by["eager", mode]["status"] == "ok"
        assert by["flash-attn", mode]["status"] in ("ok", "missing")
        # The padded batch, its mask and the per-sequence loop agree with the reference (ours, or
        # eager where ours is missing) in the packed layout, gradients included (forward+backward).
        for p in ("sdpa-padded", "sdpa-padded-mask", "sdpa-loop"):
            assert by[p, mode]["status"] == "ok", by[p, mode]
            assert by[p, mode]["max_rel_err"] is None or by[p, mode]["max_rel_err"] <= 3e-2
    assert "right-padded batch" in by["sdpa-padded", "forward"]["note"]
    md = next(out.glob("*.md")).read_text()
    assert "## ops: varlen_attention, forward+backward" in md and "x the causal attention work); lengths" in md
    assert list(out.glob("*-ops-varlen_attention.png"))


def test_padded_layout_round_trip():
    import torch

    from benchmarks.ops.attention import _pad, _unpad

    buf = torch.randn(1, 10, 3, 4)  # (1, total, H, D), seen as (1, H, total, D)
    x = buf.transpose(1, 2)
    bounds = [(0, 4), (4, 5), (5, 10)]
    padded = _pad(x, bounds, 5)
    assert padded.shape == (3, 3, 5, 4) and padded.transpose(1, 2).is_contiguous()
    assert torch.equal(padded[1, :, 1:], torch.zeros(3, 4, 4)) and torch.equal(padded[2], x[0, :, 5:])
    assert torch.equal(_unpad(padded, bounds), x)


def test_batches_run_covers_every_model_and_layout(batches_run):
    rc, out = batches_run
    assert rc in (0, 1)
    records = _records(out)
    assert {r["suite"] for r in records} == {"model"}
    expected = set()
    for _, _, gen, train in bench_batches.MODELS.values():
        expected |= {("padded-prefill", gen), ("padded-generate", gen)} | {("varlen-train", p) for p in train}
    assert {(r["op"], r["provider"]) for r in records} == expected
    by = {(r["op"], r["provider"]): r for r in records}
    for r in records:
        assert r["status"] == "ok" or r["reason"], r
        assert sum(r["dims"]["lengths"]) == r["tokens"] and r["dims"]["batch"] == len(r["dims"]["lengths"])
        if "fa2" in r["provider"]:
            assert r["status"] in ("ok", "missing")
        elif r["provider"].startswith("hf-"):
            assert r["status"] == "ok", r  # transformers' own paths run everywhere
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tokens_per_s"] > 0
    # One reference (the unpatched sdpa model): the others' logits and losses were checked against it.
    train = [r for r in records if r["op"] == "varlen-train" and r["status"] == "ok"]
    ref = by["varlen-train", "hf-sdpa-padded"]
    assert ref["max_rel_err"] is None and ref["extra"]["layout"] == "padded"
    for r in train:
        assert r["extra"]["loss"] == pytest.approx(ref["extra"]["loss"], rel=1e-2)
        assert r["work"] == ref["work"]  # the real tokens' work, whatever the layout
    # transformers detects the packed layout (position_ids restarting; use_cache=False): its logits
    # are the padded batch's, which they would not be if attention crossed sequences.
    assert by["varlen-train", "hf-sdpa-packed"]["max_rel_err"] <= bench_batches.LOGITS_TOLERANCE
    gen = by["padded-generate", "hf-eager"]
    assert gen["extra"]["new_tokens"] == bench_batches.SWEEPS["smoke"]["new"] and "token_agreement" in gen["extra"]
    for op in ("padded-prefill", "padded-generate", "varlen-train"):
        ours = by[op, "hf+ours"]
        assert ours["status"] in ("ok", "missing"), ours
        if ours["status"] == "ok":  # which kernels ran, and whether attention was ours
            assert ours["extra"]["launches"] and "attention" in ours["note"]
    md = next(out.glob("*.md")).read_text()
    for op in ("padded-prefill", "padded-generate", "varlen-train"):
        assert f"## model: {op}," in md
    assert "| shape | prompt tokens |" in md and "padded to" in md


def test_only_takes_parts(tmp_path, capsys):
    assert PARTS == ("ops", "model", "batches")
    assert main(["--smoke", "--only", "ops,nope", "--out", str(tmp_path)]) == 2
    assert "error: argument --only: unknown part name(s) 'nope'; known: ops, model, batches" in capsys.readouterr().err


def test_gpu_session_phase_b_runs_every_op_but_the_attention_sweeps():
    """Phase b lists its ops (phases d and v run the attention ones, phase q the quantised linears):
    a new op must be added there."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    (bench_ops_arg,) = re.findall(r'BENCH_ARGS:---quick --only ops,model --ops ([^ }"]+)', text)
    assert sorted(bench_ops_arg.split(",")) == sorted(n for n in SMOKE_OPS if n != "flash_attention")
    assert "PHASES=${PHASES:-abvdc}" in text and "--ops varlen_attention" in text
    # Phase q (a call of its own): int8 and int4 in groups of 128, and the quantised model.
    (quant_args,) = re.findall(r'QUANT_ARGS:-([^}"]+)', text)
    ops = re.findall(r"--ops ([^ ]+)", quant_args)[0].split(",")
    assert ops == list(quantized_ops.QUICK_NAMES) and set(ops) <= set(QUANTIZED)
    assert "--quantize 8,4" in quant_args and "--only ops,model" in quant_args
    assert "wanted q" in text and "PHASES=q bash benchmarks/gpu_session.sh" in text


# --- weight-only quantised linears and the quantised model -----------------------------------------

QUANTIZED_RUN_OPS = ("int8_linear", "int4_linear-g64")
QUANTIZED_RUN_PROJECTIONS = ("k/v", "down")  # N < K and N > K: a few projections keep the run short


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quantized")
    every = quantized_ops.projections
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantized_ops, "projections",
                   lambda dims: {k: v for k, v in every(dims).items() if k in QUANTIZED_RUN_PROJECTIONS})
        rc = main(["--smoke", "--only", "ops", "--ops", ",".join(QUANTIZED_RUN_OPS), "--tokens", "1,20",
                   "--out", str(out)])
    return rc, out


def test_quantized_projections_and_cases_cover_the_model():
    import torch

    from benchmarks.common import make_settings

    assert quantized_ops.projections(op_benchmarks.MODELS["llama3-8b"]) == {
        "q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    assert [s.name for s in quantized_ops.QUANTIZED_LINEAR] == [
        "int8_linear", "int4_linear-g128", "int4_linear-g64", "int4_linear-g32"]
    quick = make_settings("quick", torch.device("cpu"), False)
    spec = next(s for s in OPS if s.name == "int4_linear-g128")
    cases = list(spec.case_list(quick))
    assert [(c.shape, c.tokens) for c in cases] == [
        (f"llama3-8b {p}", m) for p in ("q/o", "k/v", "gate/up", "down") for m in quantized_ops.ROWS["quick"]]
    assert cases[0].dims == {"projection": "q/o", "out_features": 4096, "in_features": 4096, "bits": 4,
                             "group_size": 128}
    # An int4 group must tile the input features: SmolLM2's 576 is no multiple of 128.
    smol = make_settings("quick", torch.device("cpu"), False, shapes=("smollm2-135m",), tokens=(1,))
    assert {c.dims["in_features"] % 128 for c in spec.case_list(smol)} == {0}


def test_quantized_inputs_are_random_weights_quantised_in_the_format():
    import torch

    from benchmarks.ops.harness import Case, build_inputs
    from llama_kernels import reference

    spec = next(s for s in OPS if s.name == "int4_linear-g64")
    dims = {"projection": "k/v", "out_features": 64, "in_features": 128, "bits": 4, "group_size": 64}
    case = Case("smoke k/v", dims, 3, torch.bfloat16, torch.device("cpu"))
    inp = build_inputs(spec, case, 1000, False)
    x, qweight, scales, zeros, bias = inp.args
    assert inp.kwargs == {"bits": 4, "group_size": 64} and bias is None and inp.leaves == ()
    assert x.shape == (1, 3, 128) and x.dtype == torch.bfloat16
    assert qweight.shape == (64, 64) and qweight.dtype == torch.uint8 and scales.shape == zeros.shape == (64, 2)
    w = reference.dequantize_weight(qweight, scales, zeros, bits=4, group_size=64, dtype=torch.float32)
    assert 0.6 < w.std().item() * 128 ** 0.5 < 1.4  # ~N(0, 1/K): never zeros
    assert len(torch.unique(qweight)) > 16
    again = build_inputs(spec, case, 1000, False).args
    assert all(torch.equal(a, b) for a, b in zip(inp.args[:4], again[:4]))  # fixed seeds: every provider alike
    assert not torch.equal(x, build_inputs(spec, case, 1001, False).args[0])  # rotated sets differ
    assert quantized_ops.weight_bytes(dims) == 64 * 128 // 2 + 64 * 2 * 3
    assert quantized_ops.weight_bytes(dict(dims, bits=8, group_size=None)) == 64 * 128 + 64 * 2


def test_quantized_run_times_every_provider_with_bytes_and_flop(quantized_run):
    rc, out = quantized_run
    assert rc in (0, 1)  # 1: a kernel disagrees with eager (the op tests say more)
    records = [r for r in _records(out) if r["suite"] == "ops"]
    providers = ("ours", "eager", "torch.compile", "bf16", "torchao", "bnb")
    smoke = op_benchmarks.MODELS["smoke"]
    projections = {k: v for k, v in quantized_ops.projections(smoke).items() if k in QUANTIZED_RUN_PROJECTIONS}
    expected = {(op, f"smoke {p}", m, provider) for op in QUANTIZED_RUN_OPS for p in projections
                for m in (1, 20) for provider in providers}
    assert {(r["op"], r["shape"], r["tokens"], r["provider"]) for r in records} == expected
    allowed = {"ours": ("ok",), "eager": ("ok",), "bf16": ("ok",), "torch.compile": ("skipped",),
               "torchao": ("ok", "missing"), "bnb": ("skipped",)}  # bitsandbytes: CUDA only
    for r in records:
        assert r["status"] in allowed[r["provider"]], r
        assert r["mode"] == "forward" and r["dtype"] == "bf16"
        n, k, m = r["dims"]["out_features"], r["dims"]["in_features"], r["tokens"]
        assert (n, k) == projections[r["dims"]["projection"]]
        weights = quantized_ops.weight_bytes(r["dims"])
        if m <= quantized_ops.DECODE_ROWS:  # bytes: the quantised weight, x and y
            assert r["work_unit"] == "B" and r["work"] == weights + 2 * m * k + 2 * m * n
        else:
            assert r["work_unit"] == "FLOP" and r["work"] == 2 * m * n * k
        if r["status"] == "ok":
            own = r["provider"] == "bf16"
            key = "own_weight" if own else "weight"
            assert r["extra"][f"{key}_bytes"] == (2 * n * k if own else weights)
            assert r["extra"][f"{key}_gbps"] == pytest.approx(r["extra"][f"{key}_bytes"] / r["ms"] / 1e6)
            assert r["extra"][f"{key}_fraction_of_copy"] > 0
    by = {(r["op"], r["shape"], r["tokens"], r["provider"]): r for r in records}
    for op, shape, m, provider in expected:
        if provider == "ours":
            ours, bf16 = by[op, shape, m, "ours"], by[op, shape, m, "bf16"]
            assert ours["extra"]["speedup_vs_bf16"] == pytest.approx(bf16["ms"] / ours["ms"])
            assert bf16["speedup_of_ours"] == pytest.approx(bf16["ms"] / ours["ms"])  # the table's column
            assert bf16["max_rel_err"] <= 3e-2  # the bf16 weight is the dequantised one
    md = next(out.glob("*.md")).read_text()
    for op in QUANTIZED_RUN_OPS:
        assert f"## ops: {op}, forward" in md and list(out.glob(f"*-ops-{op}.png"))
    assert "ours vs bf16" in md
    assert "bitsandbytes is measured on CUDA only" in md


def test_a_providers_tolerance_replaces_the_dtype_one(monkeypatch):
    """A provider in another number format (torchao's, bitsandbytes' weights) is checked against its
    own ``tolerance``; the others keep the dtype's; the spec's finish hook gets the case's records."""
    import torch

    from benchmarks.common import make_settings
    from benchmarks.ops.harness import OpSpec, run_case

    def off_by(factor, tolerance=None):
        def factory():
            def fn(x, qweight, scales, zeros, bias, **kwargs):
                from llama_kernels import reference

                return reference.quantized_linear(x, qweight, scales, zeros, bias, **kwargs) * factor

            fn.tolerance = tolerance
            return fn

        return factory

    finished = []
    spec = OpSpec("int8_linear", "int8_linear", quantized_ops._work, lambda d: {}, ("smoke",),
                  {"loose": off_by(1.05, 0.1), "strict": off_by(1.05)}, modes=("forward",), base=("eager",),
                  inputs=quantized_ops._inputs, finish=lambda rs, limits: finished.append(len(rs)))
    dims = {"projection": "k/v", "out_features": 32, "in_features": 64, "bits": 8, "group_size": None}
    case = harness.Case("smoke k/v", dims, 2, torch.bfloat16, torch.device("cpu"))
    records = []
    run_case(spec, case, make_settings("smoke", torch.device("cpu"), False), {"copy_gbps": 1.0}, records)
    status = {r.provider: r.status for r in records}
    assert status == {"eager": "ok", "loose": "ok", "strict": "mismatch"}
    assert finished == [3]


def test_bitsandbytes_layers_hold_the_dequantised_weight():
    """The bnb provider's layers (measured on CUDA; built here on the CPU, which bitsandbytes 0.50
    supports) multiply by the weight they were given, within their own format's rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    import torch.nn.functional as F

    del bnb
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 128, generator=gen) * 128 ** -0.5).to(torch.bfloat16)
    x = torch.randn(1, 3, 128, generator=gen).to(torch.bfloat16)
    want = F.linear(x, w).float()
    for bits in (8, 4):
        layer, what = quantized_ops._bnb_module(w, bits)
        got = layer(x).float()
        assert got.shape == want.shape and "bitsandbytes" in what
        assert ((got - want).abs().max() / want.abs().max()).item() <= quantized_ops.FOREIGN_TOLERANCE[bits]
    provider = quantized_ops._extras(4)["bnb"]()
    with pytest.raises(Exception, match="CUDA only"):
        provider.layout(x, None, None, None, None, bits=4, group_size=64)


def test_quantize_option_is_parsed_and_checked(tmp_path, capsys):
    from benchmarks import bench_quantized

    assert bench_quantized.parse_formats("8,4,4g64,4") == ("int8", "int4-g128", "int4-g64")
    assert bench_quantized.format_bits("int4-g64") == (4, 64) and bench_quantized.format_bits("int8") == (8, None)
    assert main(["--smoke", "--only", "model", "--quantize", "3", "--out", str(tmp_path)]) == 2
    assert "unknown format(s) '3'" in capsys.readouterr().err
    assert main(["--smoke", "--only", "model", "--quantize", "8", "--family", "qwen3", "--out", str(tmp_path)]) == 2
    assert "does not take --family" in capsys.readouterr().err


def test_quantized_providers_quantize_the_patched_model():
    """ours+<format>: apply_kernels, then quantize_weights (every projection; the LM head bf16);
    its decode bytes count the quantised buffers, not a float weight."""
    import contextlib

    import torch

    from benchmarks import bench_quantized
    from benchmarks.common import make_settings
    from llama_kernels.quantize import QuantizedLinear

    settings = make_settings("smoke", torch.device("cpu"), False, quantize=("int8", "int4-g64"))
    cfg = bench_quantized.config(settings)
    assert cfg["num_hidden_layers"] == bench_quantized.LAYERS["smoke"] and bench_quantized.shape(settings) == (
        "smoke-2layers")
    built = bench_quantized.providers(cfg, settings)
    assert list(built) == ["ours", "ours+int8", "ours+int4-g64"]
    runner = built["ours+int4-g64"](contextlib.ExitStack())
    layers = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 7 * cfg["num_hidden_layers"] and {(m.bits, m.group_size) for m in layers} == {(4, 64)}
    assert type(runner.model.lm_head) is torch.nn.Linear  # quantize_weights leaves the head
    assert "apply_kernels then quantize_weights(model, bits=4, group_size=64)" in runner.note
    assert type(runner.model.norm).__module__.startswith("llama_kernels")  # patched
    quantized = sum(t.numel() * t.element_size() for m in layers for t in (m.qweight, m.scales, m.zeros))
    params = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters() if "embed" not in n)
    row = cfg["hidden_size"] * 2  # one embedding row a step
    assert bench_model._weight_bytes_per_token(runner.model, cfg) == params + row + quantized


def test_quantized_model_comparison_end_to_end(monkeypatch, tmp_path):
    """--quantize: the comparison's providers, figures and files (the kernels swapped for their eager
    twins, so that the interpreter's time stays out of a harness test)."""
    from benchmarks import bench_quantized
    from llama_kernels import reference
    from llama_kernels.quantize import QuantizedLinear

    monkeypatch.setattr(bench_model, "_patched", lambda model: model)
    monkeypatch.setattr(QuantizedLinear, "quantized_linear", staticmethod(reference.quantized_linear))
    assert main(["--smoke", "--only", "model", "--quantize", "8,4g64", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.stem.endswith("-quantized")
    report = json.loads(json_path.read_text())
    assert report["quantize"] == ["int8", "int4-g64"]
    assert any("quantised comparison" in k for k in report["providers"])
    records = report["records"]
    sweep = bench_model.SWEEPS["smoke"]
    providers = ("ours", "ours+int8", "ours+int4-g64")
    expected = {("prefill", p, t) for p in providers for t in sweep["prefill"]}
    expected |= {(op, p, prompt) for p in providers for prompt, _ in sweep["decode"]
                 for op in ("decode", "decode-no-graph")}
    assert {(r["op"], r["provider"], r["tokens"]) for r in records} == expected  # no training step
    assert {r["shape"] for r in records} == {"smoke-2layers"}
    by = {(r["op"], r["provider"]): r for r in records}
    for p in providers:
        assert by["decode", p]["status"] == "skipped" and "CUDA device" in by["decode", p]["reason"]
        assert by["decode-no-graph", p]["status"] == "ok" and by["prefill", p]["status"] == "ok"
        assert by["prefill", p]["extra"]["loss"] == pytest.approx(by["prefill", "ours"]["extra"]["loss"],
                                                                  rel=bench_model.LOSS_TOLERANCE)
    # A quantised model's decode step moves fewer bytes: its projections' quantised weights.
    bf16, int8, int4 = (by["decode-no-graph", p]["work"] for p in providers)
    assert int4 < int8 < bf16
    for p in providers[1:]:
        r = by["decode-no-graph", p]
        assert r["extra"]["speedup_vs_bf16"] == pytest.approx(by["decode-no-graph", "ours"]["ms"] / r["ms"])
        assert r["speedup_of_ours"] == pytest.approx(r["ms"] / by["decode-no-graph", "ours"]["ms"])
    md = json_path.with_suffix(".md").read_text()
    assert "## model: decode-no-graph, generate" in md and "ours vs ours+int4-g64" in md
    assert bench_quantized.LAYERS["quick"] == bench_quantized.LAYERS["full"] == 32
