# One-command set-up: each target creates .venv, installs the pinned requirements and packdit (with its
# native extension), then does its job. `make lint` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: install lint test run gpu-check clean

$(DEPS): requirements/ci.txt requirements/examples.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/ci.txt
	touch $@

# Re-runs the (incremental) CMake build every time so csrc/ edits are picked up.
install: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear, and the layering ban on
# importing packdit.reference outside the dispatcher
lint: $(DEPS)
	$(PY) -m ruff check .

test: install
	PACKDIT_REQUIRE_EXT=1 $(PY) -m pytest tests -ra --durations=15

# Without a GPU: the quick run, written to benchmarks/results/<device>-quick/ (ignored by git).
run: install
	$(PY) benchmarks/run.py

# On a GPU machine (no network, system python with torch/triton/pybind11/cmake/ninja), within 8 minutes: the
# benchmark sections most valuable first (attention, e2e, mlp, norm, rope) while the extension builds, then the
# GPU tests, patchify and layout, and compute-sanitizer; logs and results.tar.gz in $$OUT (default ./gpu-check-out).
# `bash .ci/gpu_check --dry-run` runs the same steps on the CPU (tests/test_gpu_check.py).
gpu-check:
	bash .ci/gpu_check

clean:
	rm -rf build $(VENV) packdit/_C*.so *.egg-info
