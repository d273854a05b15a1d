# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where there is no GPU, pin the CPU build of torch so pip does not pull a multi-GB CUDA build.
# On other machines set TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.11
else
TORCH_SPEC ?= torch==2.13.0
endif

.PHONY: demo test test-slow test-gpu lint format bench clean

$(VENV)/.installed: pyproject.toml
	@echo "== creating the virtual environment $(VENV) (once; later runs reuse it)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "== installing $(TORCH_SPEC) (the largest download: a few minutes on a first install)"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@echo "== installing moekit (editable) with its test extras: triton, finance (arch, pandas,"
	@echo "   scipy), serve (fastapi, uvicorn, httpx), memory, hf (transformers), test tools (pytest,"
	@echo "   hypothesis, ruff)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@
	@echo "== done: $(VENV) is ready"

demo: $(VENV)/.installed
	$(VENV)/bin/moekit demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2

test-slow: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -m slow

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -m gpu tests/gpu

bench: $(VENV)/.installed
	$(VENV)/bin/moekit bench layer --device cpu --out-dir docs/benchmarks

clean:
	rm -rf $(VENV) moekit-out .pytest_cache .ruff_cache
