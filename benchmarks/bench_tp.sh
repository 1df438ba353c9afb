#!/usr/bin/env bash
# Issue 7's GPU measurement: the 14B shape (random bf16 weights) on 1 GPU and over N GPUs of one host, each in
# its own process on the same machine, so the ratios compare like with like.
#   run: source scripts/gpu_setup.sh; bash benchmarks/bench_tp.sh "1 2 4"      (carry .whl)
# Per GPU count n: $OUT/tp$n$TAG.json (rewritten after every measurement) and $OUT/tp$n$TAG.log.
# BENCH_ARGS adds `nemodiff bench` options (later ones win, e.g. "--contexts --modes ar --batches 1"); TAG names a
# variant (e.g. a flag set); DP=1 makes the N GPUs data parallel (mesh N x 1: the whole model on each GPU, rows
# split) instead of tensor parallel (mesh 1 x N); SIZE picks another preset (tiny: a CPU smoke run).
set -u
counts=${1:-"1 $(python3 -c 'import jax; print(jax.device_count())')"}
common="--sizes ${SIZE:-14B} --contexts 1024 --batches 1 32 --new-tokens 128 --mode-new-tokens 64"
for n in $counts; do
  mesh="" tag=${TAG:-}
  if [ "$n" -gt 1 ]; then
    if [ "${DP:-0}" = 1 ]; then mesh="--mesh $n 1" tag="${tag}_dp"; else mesh="--mesh 1 $n"; fi
  fi
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "${TP_TIMEOUT:-290}" python3 -P -m nemodiff_jax.cli bench $common $mesh \
    ${BENCH_ARGS:-} --out "$OUT/tp$n$tag.json" > "$OUT/tp$n$tag.log" 2>&1
  echo "== $n GPU(s) $tag: exit $?"
  sed -n '/^Card:/,$p' "$OUT/tp$n$tag.log" | grep -v '^$' || tail -5 "$OUT/tp$n$tag.log"
done
