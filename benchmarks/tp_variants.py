"""ms per forward of the 14B decode step under XLA compiler-option variants, for several tensor-parallel
degrees in one process (each model built once, on its own devices), so every ratio compares like with like.

    python3 -P benchmarks/tp_variants.py --tp 1 2 4 --batches 1 32

TP=1 runs on the last visible GPU, TP=n on the first n. Each variant recompiles the same forward loop with
`jax.jit(..., compiler_options=...)` and must give the same summed logits as the default (checked).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from nemodiff_jax import bench
from nemodiff_jax.config import PRESETS
from nemodiff_jax.sharding import make_mesh

# XLA's one-shot all-reduce kernel option, as in allreduce_latency.py (benchmarks/ is not a package: each script
# stands alone)
ONE_SHOT = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}
CB = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
VARIANTS = {
    "default": {},
    "no_cmd_buffer": {"xla_gpu_enable_command_buffer": ""},
    "cmd_buffer_collectives": {"xla_gpu_enable_command_buffer": CB + ",COLLECTIVES"},
    "one_shot": ONE_SHOT,
    "one_shot_cmd_buffer_collectives": {**ONE_SHOT, "xla_gpu_enable_command_buffer": CB + ",COLLECTIVES"},
}
ONE_DEVICE = ("default", "no_cmd_buffer")  # the others change only collectives


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="14B", choices=sorted(PRESETS))
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cfg = PRESETS[a.size]
    devices = jax.devices()
    rows = []
    for tp in a.tp:
        if tp == 1:
            mesh = None
            ctx = jax.default_device(devices[-1])
        else:
            mesh = make_mesh(1, tp, devices[:tp])
            ctx = jax.default_device(devices[0])
        with ctx:
            model = bench.make_model(cfg, mesh)
            impl = bench.resolve_attn("auto", cfg, mesh)
            for batch in a.batches:
                ref = None
                for name in a.variants:
                    if tp == 1 and name not in ONE_DEVICE:
                        continue  # no collectives on one device
                    info = {}
                    try:
                        ms = 1e3 * bench.bench_forward(model, cfg, batch, a.context, 1, True, attn_impl=impl,
                                                       compiler_options=VARIANTS[name] or None, info=info,
                                                       mesh=mesh)
                    except Exception as e:  # a variant this XLA rejects: report it, go on
                        print(f"tp={tp} b={batch} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    ref = info["acc"] if ref is None else ref
                    same = bool(np.array_equal(ref, info["acc"]))
                    rows.append({"tp": tp, "batch": batch, "variant": name, "ms_per_forward": ms, "same_logits": same})
                    print(f"tp={tp} b={batch} {name}: {ms:.3f} ms/forward, logits same as default: {same}", flush=True)
                    if a.out:
                        with open(a.out, "w") as f:
                            json.dump({"device": devices[0].device_kind, "size": a.size, "context": a.context,
                                       "rows": rows}, f, indent=1)
        del model
    base = {r["batch"]: r["ms_per_forward"] for r in rows if r["tp"] == 1 and r["variant"] == "default"}
    print(f"\n{devices[0].device_kind}, {a.size}, T=1, context {a.context}")
    print("| TP | batch | variant | ms/forward | speedup vs 1 GPU | same logits |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b = base.get(r["batch"])
        sp = f"{b / r['ms_per_forward']:.2f}x" if b else "-"
        print(f"| {r['tp']} | {r['batch']} | {r['variant']} | {r['ms_per_forward']:.3f} | {sp} | {r['same_logits']} |")
    return rows


if __name__ == "__main__":
    main()
