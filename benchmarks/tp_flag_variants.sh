#!/usr/bin/env bash
# XLA flag variants for the 14B TP=2 AR step (docs/PERFORMANCE.md, "XLA flags tried"), on a GPU machine with
# >= 2 GPUs, .whl carried:  bash benchmarks/tp_flag_variants.sh   (every variant stays NVLink-multicast free)
source scripts/gpu_setup.sh >/dev/null
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL,COLLECTIVES --xla_gpu_graph_min_graph_size=1"
CK="--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE"
export BENCH_ARGS="--contexts --modes ar --batches 1 32" TP_TIMEOUT=110
TAG=_cb XLA_FLAGS="$CB" bash benchmarks/bench_tp.sh 2
TAG=_cbck XLA_FLAGS="$CB $CK" bash benchmarks/bench_tp.sh 2
TAG=_ck XLA_FLAGS="$CK" bash benchmarks/bench_tp.sh 2
TAG=_nock XLA_FLAGS="--xla_gpu_experimental_use_collective_kernels=" bash benchmarks/bench_tp.sh 2
for f in $OUT/*.json; do python3 -c "import json,sys;r=json.load(open('$f'));[print('$f'.split('/')[-1], e['mode'], e['batch'], round(e['ms_per_forward'],2), e['tokens_crc32']) for s in r['sizes'] for e in s['e2e']]"; done
grep -h -i "error\|unknown\|abort" $OUT/*.log | head
