#!/usr/bin/env bash
# Sourced at the start of every GPU-machine run: the image has jax 0.11.2 (CUDA 13), torch and transformers
# but not flax/optax/orbax; those travel as wheels in .whl/ (see docs/PERFORMANCE.md, "How to reproduce").
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
