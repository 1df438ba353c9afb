#!/usr/bin/env bash
# Builds the code model of issue 15 end to end and evaluates it: model, drafter, the per-mode table.
#
#   bash scripts/build_code_model.sh OUT_DIR [MINUTES]
#
# Needs data/code/ and out/code_tokenizer/ from `python scripts/code_corpus.py --out out/code_tokenizer
# --data-out data/code` (made here on CPython 3.12.1: on the GPU machine carry both, so the corpus is the one
# the manifest lists rather than that machine's stdlib). MINUTES is the model's training budget (default 8;
# `nemodiff train --minutes` fits the cosine horizon to it). Logs and JSON go to OUT_DIR; the model to
# OUT_DIR/code (with OUT_DIR/code/linear_spec_lora), ready to copy into nemodiff_jax/assets. ROLLOUTS (2048)
# and DRAFTER_STEPS (500) size the drafter's run (small values make a CPU smoke run of the script). The
# drafter's rollouts run in float32 at full matmul precision (no TF32 on a GPU), so its targets are the greedy
# tokens of the float32 CPU runs the targets are measured on. STAGES (default "train drafter eval") runs a subset,
# e.g. STAGES=train in one call and STAGES="drafter eval" in a later one with OUT_DIR/code carried back (a call of
# the GPU machine is limited to 10 minutes and keeps nothing between calls).
set -euo pipefail
out=$(realpath -m "${1:?usage: build_code_model.sh OUT_DIR [MINUTES]}")
cd "$(dirname "$0")/.."
minutes=${2:-8}
py=${PYTHON:-python3}
for need in data/code/train.txt data/code/val.txt out/code_tokenizer/tokenizer.json; do
  [ -f "$need" ] || { echo "missing $need: run scripts/code_corpus.py first" >&2; exit 2; }
done
stages=" ${STAGES:-train drafter eval} "
for stage in $stages; do
  case $stage in train|drafter|eval) ;; *) echo "unknown stage $stage in STAGES (train, drafter, eval)" >&2; exit 2;; esac
done
want() { [[ $stages == *" $1 "* ]]; }  # is stage $1 in STAGES
mkdir -p "$out"
if want train; then
  $py -P -m nemodiff_jax.cli train --tokenizer out/code_tokenizer --train data/code/train.txt \
    --val data/code/val.txt --out "$out/code" --minutes "$minutes" --sample-prompt $'def main():\n' \
    --no-progress 2>&1 | tee "$out/train.log"
fi
[ -f "$out/code/config.json" ] || { echo "no trained model in $out/code: run the train stage first" >&2; exit 2; }
if want drafter; then
  JAX_DEFAULT_MATMUL_PRECISION=highest $py -P -m nemodiff_jax.cli train --drafter --model "$out/code" --train data/code/train.txt --val data/code/val.txt \
    --rollouts "${ROLLOUTS:-2048}" --steps "${DRAFTER_STEPS:-500}" --batch 32 --rank 32 --no-progress 2>&1 \
    | tee "$out/drafter.log"
fi
if want eval; then
  $py -P scripts/eval_code_model.py --model "$out/code" --val data/code/val.txt --out "$out/code_eval.json" \
    2>&1 | tee "$out/eval.log"
fi
du -sh "$out/code"
