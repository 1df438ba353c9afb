#!/usr/bin/env bash
# Sourced at the start of every GPU-machine run (no network there). The image has jax 0.11.2 (CUDA 13), torch
# and transformers; flax/optax/orbax travel as wheels in .whl/ (pinned versions), and the project itself is
# installed from this checkout, as a user's `pip install .` would lay it out (nemodiff_jax.convert,
# nemodiff_jax.pallas_kernels). Run Python with -P afterwards, so the checkout's own folders do not shadow the
# installed package:  python3 -P -m pytest -m gpu,   python3 -P -m nemodiff_jax.cli bench
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
  || { echo "project install failed"; exit 1; }
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -P -c 'import jax, flax, nemodiff_jax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices(), nemodiff_jax.__file__)'
