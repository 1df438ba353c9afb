"""Where the int8 / int4 kernel's time goes (pallas_kernels/qmatmul.py), per kernel, from CUPTI.

For each 8B layer matmul at M rows and each format, the device time of every kernel one call launches (the Pallas
kernel, the epilogue that sums the stream-K partials, an x pad where M needs one), averaged over enough distinct
weight copies that L2 holds none, under these variants of the Pallas kernel:
- `full`: the kernel as shipped;
- `memory` (QMatmulConfig(probe="memory")): the same ring of TMA copies, no compute: what the pipeline streams;
- `convert` (probe="convert"): load and dequantize every tile, but no per-step wgmma;
- `*_tiled`: the weights in quant.tile_q's layout (each TMA box one contiguous run of HBM);
- `*_k4`: 4 128-input sub-steps per pipeline stage.
`full - convert` is then the wgmma's share, `convert - memory` the dequantization's, and `memory` against the copy
limit (measured in the same process) the pipeline's own loss.

    python3 -P benchmarks/qmatmul_probe.py --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from nemodiff_jax import bench, quant
from nemodiff_jax.pallas_kernels import qmatmul as qm

sys.path.insert(0, str(Path(__file__).parent))
import qmatmul_kernels as qk  # noqa: E402

# name -> (QMatmulConfig fields, tiled weights)
VARIANTS = {"full": ({}, False), "convert": ({"probe": "convert"}, False), "memory": ({"probe": "memory"}, False),
            "memory_tiled": ({"probe": "memory"}, True), "full_tiled": ({}, True),
            "full_k4": ({"k_sub": 4}, False), "full_tiled_k4": ({"k_sub": 4}, True)}


def kernels_per_call(fn, copies, *args):
    """{kernel name: us per call} averaged over 5 iterations of `copies` calls (CUPTI, device time only)."""
    _, timings = profiler.measure(fn, aggregate=False, iterations=5)(*args)
    per = collections.defaultdict(float)
    for it in timings:
        for name, ms in it:
            per[name] += 1e3 * ms / (5 * copies)
    return dict(per)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["gate_up", "down", "qkv", "o"])
    p.add_argument("--ms", nargs="+", type=int, default=[1, 32])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    variants = {v: VARIANTS[v] for v in a.variants}
    hbm = bench.copy_limit()
    out = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "copy_limit": hbm.to_json(), "rows": []}
    gbps = hbm.limit / 1e9
    for name in a.shapes:
        k, n = qk.SHAPES[name]
        copies = min(32, max(1, math.ceil(512e6 / (2 * k * n))))
        ws = qk.weights(k, n, copies, 0)
        for fmt in quant.FORMATS:
            qs = qk.quantized(ws, fmt)
            tiled = [jax.jit(quant.tile_q)(q.q) for q in qs]
            nbytes = qs[0].nbytes
            for m in a.ms:
                x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
                row = {"shape": name, "fmt": fmt, "M": m, "bytes": nbytes,
                       "copy_limit_us": nbytes / gbps / 1e3}
                for variant, (fields, tile) in variants.items():
                    cfg = qm.QMatmulConfig(**fields)
                    fn = jax.jit(lambda x, ws, ss, cfg=cfg: sum(qm.qmatmul_pallas(x, w, s, config=cfg)
                                                               for w, s in zip(ws, ss)))
                    try:
                        per = kernels_per_call(fn, copies, x, tiled if tile else [q.q for q in qs],
                                               [q.scale for q in qs])
                        mosaic = {kn: us for kn, us in per.items() if "mosaic" in kn.lower() or "pallas" in kn.lower()
                                  or "qmatmul" in kn.lower()}
                        kernel_us = sum(mosaic.values()) if mosaic else max(per.values())
                        row[variant] = {"kernel_us": kernel_us, "all_us": sum(per.values()), "per_kernel": per}
                        if variant.startswith("full"):
                            got = fn(x, tiled[:1] if tile else [qs[0].q], [qs[0].scale]).astype(jnp.float32)
                            want = qm.qmatmul_reference(x, qs[0].q, qs[0].scale, out_dtype=jnp.float32)
                            row[variant]["rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                    except Exception as e:  # noqa: BLE001 - record and go on
                        row[variant] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                if a.out:
                    Path(a.out).write_text(json.dumps(out, indent=1))
        del ws, qs, tiled
    print("\nus per call: the Pallas kernel / every kernel of the call (with the stream-K sum and any pad)")
    print("| matmul | fmt | M | copy limit | " + " | ".join(variants) + " |")
    print("|---|---|---|---|" + "---|" * len(variants))
    for r in out["rows"]:
        cell = lambda v: f"{r[v]['kernel_us']:.1f} / {r[v]['all_us']:.1f}" if "kernel_us" in r.get(v, {}) else "err"
        print(f"| {r['shape']} | {r['fmt']} | {r['M']} | {r['copy_limit_us']:.1f} | "
              + " | ".join(cell(v) for v in variants) + " |")


if __name__ == "__main__":
    main()
