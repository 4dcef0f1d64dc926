"""The `llama-kernels` command: check, generate, argument handling."""
import pytest

from llama_kernels import cli


def test_check_passes_on_this_device(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for op in ("rms_norm", "swiglu", "apply_rotary", "flash_attention"):
        assert out.count(op) == 3 and "FAIL" not in out


def test_generate_with_smollm2(capsys):
    pytest.importorskip("gguf")
    try:
        cli.smollm2_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["check", "--bogus"])
