"""Where the int8 / int4 kernel's time goes (pallas_kernels/qmatmul.py), per kernel, from CUPTI.

For each 8B layer matmul at M rows and each format, the device time of every kernel one call launches (the x pad,
the Pallas kernel, the epilogue that sums the stream-K partials), summed over enough distinct weight copies that
L2 holds none, under three variants of the Pallas kernel:
- `full`: the kernel as shipped;
- `memory` (QMatmulConfig(probe="memory")): the same ring of TMA copies, no compute: what the pipeline streams;
- `convert` (probe="convert"): load and dequantize every tile, but no per-step wgmma.
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

PROBES = [None, "convert", "memory"]


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
    p.add_argument("--out", default=None)
    a = p.parse_args()
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
            nbytes = qs[0].nbytes
            for m in a.ms:
                x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
                row = {"shape": name, "fmt": fmt, "M": m, "bytes": nbytes,
                       "copy_limit_us": nbytes / gbps / 1e3}
                for probe in PROBES:
                    cfg = qm.QMatmulConfig(probe=probe)
                    fn = jax.jit(lambda x, qs, cfg=cfg: sum(qm.qmatmul_pallas(x, q.q, q.scale, config=cfg)
                                                           for q in qs))
                    try:
                        per = kernels_per_call(fn, copies, x, qs)
                        mosaic = {kn: us for kn, us in per.items() if "mosaic" in kn.lower() or "pallas" in kn.lower()
                                  or "qmatmul" in kn.lower()}
                        kernel_us = sum(mosaic.values()) if mosaic else max(per.values())
                        row[str(probe or "full")] = {"kernel_us": kernel_us, "all_us": sum(per.values()),
                                                     "per_kernel": per}
                    except Exception as e:  # noqa: BLE001 - record and go on
                        row[str(probe or "full")] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                if a.out:
                    Path(a.out).write_text(json.dumps(out, indent=1))
        del ws, qs
    print("\n| matmul | fmt | M | copy-limit us | memory us | convert us | full us | all kernels us (full) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        cell = lambda v: f"{r[v]['kernel_us']:.1f}" if "kernel_us" in r.get(v, {}) else "err"
        full_all = f"{r['full']['all_us']:.1f}" if "all_us" in r["full"] else "err"
        print(f"| {r['shape']} | {r['fmt']} | {r['M']} | {r['copy_limit_us']:.1f} | {cell('memory')} | "
              f"{cell('convert')} | {cell('full')} | {full_all} |")


if __name__ == "__main__":
    main()
