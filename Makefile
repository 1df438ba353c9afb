# `make run`, `make test` and `make bench` set everything up on a fresh machine: $(VENV) with the exact locked
# dependency set (requirements.lock, from scripts/lock.sh; plus requirements-cuda.lock, the jax[cuda13] plugin and
# NVIDIA runtime wheels, when nvidia-smi runs), then this checkout installed editable on top of it (--no-deps).
# Any Python >= 3.12, the same rule as pyproject.toml's requires-python (.python-version picks 3.12.1 under pyenv).
# Override with e.g. `make test PYTHON=python3.13 VENV=/tmp/venv`. LOCKED=0 installs from pyproject.toml's ranges
# instead of the locks (for a machine whose own packages or wheel folder must serve, e.g. an offline GPU box:
# `PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels/ make run LOCKED=0 VENV=venv-made-with---system-site-packages`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCKS := requirements.lock requirements-cuda.lock
LOCKED ?= 1
CHECK_PYTHON = $(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 12) else "Python >= 3.12 is required (pyproject.toml requires-python); PYTHON=$(PYTHON) is Python %d.%d.%d (%s). Set PYTHON=python3.12 or newer." % (v[0], v[1], v[2], sys.executable))'

.PHONY: run test bench venv python-check clean

venv: $(STAMP)

python-check:
	@$(CHECK_PYTHON)

$(STAMP): pyproject.toml $(LOCKS)
	@$(CHECK_PYTHON)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if nvidia-smi >/dev/null 2>&1; then gpu=1; extra=cuda,test; else gpu=0; extra=test; fi; \
	if [ $$gpu = 1 ] && $(PY) -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then \
	  echo "jax in $(VENV) already runs on the GPU: keeping it (no cuda extra)"; gpu=0; extra=test; fi; \
	if [ "$(LOCKED)" = 1 ]; then \
	  if [ $$gpu = 1 ]; then \
	    echo "nvidia-smi runs: installing requirements.lock + requirements-cuda.lock (jax[cuda13])"; \
	    $(PY) -m pip install -q -r requirements.lock -r requirements-cuda.lock || exit 1; \
	  else \
	    echo "no NVIDIA GPU (nvidia-smi): installing requirements.lock (CPU)"; \
	    $(PY) -m pip install -q -r requirements.lock || exit 1; \
	  fi; \
	  $(PY) -m pip install -q --no-deps --no-build-isolation -e ".[$$extra]"; \
	else \
	  echo "LOCKED=0: installing .[$$extra] from pyproject.toml's ranges"; \
	  $(PY) -m pip install -q --no-build-isolation -e ".[$$extra]"; \
	fi
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m nemodiff_jax.cli demo

# Two worker processes, whole files each: the suite takes about half the wall time on 2 cores. (The crashes
# inside XLA's CPU compiler seen in 2026-12-02's runs were the process running out of memory mappings; the
# suite now frees each module's compiled programs: tests/conftest.py.)
PYTEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m nemodiff_jax.cli bench --out bench.json

clean:
	rm -rf $(VENV) build *.egg-info
