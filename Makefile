# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates what it needs in .venv (CPU torch 2.13 from the local wheel), builds fewstep
# against that torch without build isolation, and is safe to run again.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: demo test install bench-cpu cuda-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(DEPS): $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" scikit-build-core ninja numpy triton \
		pytest pytest-benchmark diffusers safetensors peft scikit-learn tqdm
	touch $@

install: $(DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps .

demo: install
	$(BIN)/fewstep demo --out fewstep-demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

bench-cpu: install
	$(BIN)/python -m pytest -q --benchmark-only bench

# Compiles every CUDA source for sm_90 with nvcc (no GPU needed): kernels include only the CUDA
# toolkit, so this catches CUDA code that no longer builds on machines without a GPU.
cuda-check:
	@command -v nvcc >/dev/null || { echo "cuda-check: nvcc not found on PATH"; exit 1; }
	@set -e; for f in $$(find csrc -name '*.cu' | sort); do \
		echo "nvcc sm_90: $$f"; \
		nvcc -std=c++17 -O3 -arch=sm_90 -Icsrc -Xptxas -warn-spills -Werror all-warnings -c $$f -o /dev/null; \
	done

clean:
	rm -rf build dist $(VENV)
