#!/usr/bin/env bash
# Issue 7's GPU measurement, for an nvidia-h100-x2 (or -x4) machine: the 14B shape on one GPU and tensor
# parallel over all GPUs, in the same call so the ratio compares like with like. Results go to $OUT.
#   run: source scripts/gpu_setup.sh; bash scripts/bench_tp.sh      (carry .whl)
set -u
n=$(python3 -c 'import jax; print(jax.device_count())')
common="--sizes 14B --contexts 1024 4096 --batches 1 32 --new-tokens 128"
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 scripts/bench.py $common --out "$OUT/tp1.json" --md "$OUT/tp1.md" > "$OUT/tp1.log" 2>&1
timeout 300 python3 scripts/bench.py $common --mesh 1 "$n" --out "$OUT/tp$n.json" --md "$OUT/tp$n.md" > "$OUT/tp$n.log" 2>&1
cat "$OUT/tp1.md" "$OUT/tp$n.md"
