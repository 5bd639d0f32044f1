# `make run`: train the quick ListOps job into runs/listops-quick.
# `make test`: the test suite. Both create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-gpu venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m htransformer.main --config=configs/listops.py:quick \
	    --workdir=runs/listops-quick

# Two worker processes (work stealing: the long end-to-end tests do not
# wait at the end of one queue) sharing one XLA compilation cache, and
# XLA's CPU code built without LLVM optimisation or its fusion emitters
# except where a test runs many steps (tests/conftest.py): about 10 minutes
# on 2 cores (a fresh clone, venv included, 2026-12-05).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

# On a GPU host with a CUDA jax (requirements.txt, first lines): the checks
# of tests/test_gpu.py on the GPU (the suite itself runs on the CPU). Most
# of their time is compiling, on the host's cores: GPU_WORKERS processes
# share the GPU (16 on a 16-core H200 host: over 9 minutes for the 112
# tests of 2026-12-04, 105 of them done in 560 s, with the same pytest
# command; on 2026-12-03 the TUNING alternatives alone took 283 s of a
# whole run's 487).
# Stops first when .venv's jax sees no GPU (its checks would all skip).
GPU_WORKERS ?= 4
test-gpu: $(STAMP)
	@$(PY) -c "import jax, sys; b = jax.default_backend(); sys.exit(0 if b == 'gpu' else 'make test-gpu: the jax in .venv runs on ' + repr(b) + ', not a GPU. Install a CUDA build of it, e.g. .venv/bin/pip install \"jax[cuda12]==' + jax.__version__ + '\" (requirements.txt, first lines).')"
	HTRANSFORMER_TEST_ACCELERATOR=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
	    $(PY) -m pytest -q -n $(GPU_WORKERS) tests/test_gpu.py

clean:
	rm -rf runs .pytest_cache
