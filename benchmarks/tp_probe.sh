#!/usr/bin/env bash
# Where a tensor-parallel decode step's time goes (issue 7): the latency of one small all-reduce (XLA's default vs
# one-shot kernel) at 2 and 4 GPUs, and the per-kernel profile of the 14B batch-1 AR step on 1 GPU, on 2 GPUs,
# and on 2 GPUs with the one-shot all-reduce.   run: source scripts/gpu_setup.sh; bash benchmarks/tp_probe.sh
set -u
nvidia-smi topo -m | head -6
env | grep -E '^(NCCL|NVSHMEM|TORCH_SYMM)' | sort
OS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true
for tp in 2 4; do python3 -P benchmarks/allreduce_latency.py --tp $tp 2>&1 | grep -v Warning; done | tee $OUT/allreduce.txt
prof() {  # name, devices, extra XLA flags, profile_forward args
  CUDA_VISIBLE_DEVICES=$2 XLA_FLAGS="$3" timeout 200 python3 -P benchmarks/profile_forward.py --t 1 "${@:4}" \
    --out $OUT/prof_$1.txt > $OUT/prof_$1.log 2>&1
  echo "== $1: exit $?"; head -3 $OUT/prof_$1.txt 2>/dev/null || tail -5 $OUT/prof_$1.log
}
prof tp2 0,1 "" --mesh 1 2 --hlo-out $OUT/tp2.hlo
prof tp2_oneshot 0,1 "$OS" --mesh 1 2
prof tp1 0 ""
