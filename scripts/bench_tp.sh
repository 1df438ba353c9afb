#!/usr/bin/env bash
# Issue 7's GPU measurement: the 14B shape (random bf16 weights) on 1 GPU and tensor parallel over N GPUs of
# one host, each in its own process on the same machine, so the ratios compare like with like.
#   run: source scripts/gpu_setup.sh; bash scripts/bench_tp.sh "1 2 4"      (carry .whl)
# Per GPU count n: $OUT/tp$n$TAG.json (rewritten after every measurement) and $OUT/tp$n$TAG.log.
# BENCH_ARGS adds bench.py options (e.g. "--modes ar --batches 1"); TAG names a variant (e.g. a flag set).
set -u
counts=${1:-"1 $(python3 -c 'import jax; print(jax.device_count())')"}
common="--sizes 14B --contexts 1024 --batches 1 32 --new-tokens 128 --mode-new-tokens 64"
tag=${TAG:-}
for n in $counts; do
  mesh=""
  [ "$n" -gt 1 ] && mesh="--mesh 1 $n"
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "${TP_TIMEOUT:-290}" python3 scripts/bench.py $common $mesh \
    ${BENCH_ARGS:-} --out "$OUT/tp$n$tag.json" > "$OUT/tp$n$tag.log" 2>&1
  echo "== $n GPU(s) $tag: exit $?"
  sed -n '/^Card:/,$p' "$OUT/tp$n$tag.log" | grep -v '^$' || tail -5 "$OUT/tp$n$tag.log"
done
