"""The int8 / int4 matmul kernel (pallas_kernels/qmatmul.py) against bf16 and against XLA's dequantize-then-dot,
on the GPU, in one process with the HBM copy limit.

1. Every 8B matmul shape (qkv, o, gate_up, down, head) at M rows: the kernel's error against the float32
   oracle, and its time per call over enough distinct weight copies to defeat L2 (>= 512 MB per shape),
   bf16 `x @ w`, the XLA path (quant.matmul_reference) and the kernel; GB/s of weight bytes.
2. All of the 8B's per-layer matmuls (34 layers) plus the head in one jit, chained as a forward chains them,
   at M = 1 and 32: the issue's measurement (bf16 4.72 ms, XLA int8 4.91, XLA int4-g128 15.45 on 2026-12-01).

    python3 -P benchmarks/qmatmul_kernels.py --out $OUT/qmatmul.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import jax
import jax.numpy as jnp

from nemodiff_jax import bench, quant
from nemodiff_jax.pallas_kernels import qmatmul as qm

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "head": (4096, 131072)}
LAYERS = 34


def weights(k, n, copies, seed):
    keys = jax.random.split(jax.random.key(seed), copies)
    draw = jax.jit(lambda key: (jax.random.normal(key, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16))
    return [draw(key) for key in keys]


def quantized(ws, fmt):
    f = jax.jit(lambda w: quant.quantize(w, fmt))
    return [f(w) for w in ws]


def qbytes(qw):
    return qw.nbytes


def time_chain(fn, *args):
    return bench.device_time(lambda: fn(*args), reps=10, trials=5)


def per_shape(ms, out):
    rows = []
    for name, (k, n) in SHAPES.items():
        copies = min(32, max(1, math.ceil(512e6 / (2 * k * n))))
        ws = weights(k, n, copies, 0)
        qs = {f: quantized(ws, f) for f in quant.FORMATS}
        for m in ms:
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
            row = {"shape": name, "K": k, "N": n, "M": m}
            bf = jax.jit(lambda x, ws: sum(x @ w for w in ws))
            row["bf16_us"] = 1e6 * time_chain(bf, x, ws) / copies
            row["bf16_GBps"] = 2 * k * n / row["bf16_us"] / 1e3
            for f in quant.FORMATS:
                xla = jax.jit(lambda x, qs: sum(quant.matmul_reference(x, q) for q in qs))
                row[f"{f}_xla_us"] = 1e6 * time_chain(xla, x, qs[f]) / copies
                try:
                    ker = jax.jit(lambda x, qs: sum(qm.qmatmul_pallas(x, q.q, q.scale) for q in qs))
                    row[f"{f}_kernel_us"] = 1e6 * time_chain(ker, x, qs[f]) / copies
                    row[f"{f}_kernel_GBps"] = qbytes(qs[f][0]) / row[f"{f}_kernel_us"] / 1e3
                    row[f"{f}_kernel_over_bf16"] = row["bf16_us"] / row[f"{f}_kernel_us"]
                    q = qs[f][0]
                    got = qm.qmatmul_pallas(x, q.q, q.scale, out_dtype=jnp.float32)
                    want = qm.qmatmul_reference(x, q.q, q.scale, out_dtype=jnp.float32)
                    row[f"{f}_kernel_rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                except Exception as e:  # noqa: BLE001 - record and go on to the next case
                    row[f"{f}_kernel_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            out["per_shape"] = rows
        del ws, qs
    return rows


def chain(out, ms, formats=quant.FORMATS, impls=("xla", "pallas"), bf16=True):
    """34 layers x (qkv, o, gate_up, down) + head, each output feeding the next input as in a forward."""
    d, f = SHAPES["o"][0], SHAPES["down"][0]
    layers = []
    for i in range(LAYERS):
        layers.append([weights(k, n, 1, 10 * i + j)[0] for j, (k, n) in enumerate(
            [SHAPES["qkv"], SHAPES["o"], SHAPES["gate_up"], SHAPES["down"]])])
    head = weights(*SHAPES["head"], 1, 999)[0]

    def forward(x, layers, head, mm):
        for qkv, o, gu, dn in layers:
            h = mm(x, qkv)[:, :d]
            x = x + mm(h, o)
            g = mm(x, gu)
            x = x + mm(jax.nn.silu(g[:, :f]) * g[:, f:], dn)
        return mm(x, head)

    res = {}
    for m in ms if bf16 else ():
        x = jax.random.normal(jax.random.key(2), (m, d), jnp.float32).astype(jnp.bfloat16) * 0.1
        res[f"bf16_M{m}_ms"] = 1e3 * time_chain(jax.jit(lambda x, ls, h: forward(x, ls, h, jnp.matmul)),
                                                x, layers, head)
        print(json.dumps({k: v for k, v in res.items()}), flush=True)
    bf16_layers = layers
    for fmt in formats:
        qlayers = [quantized(ws, fmt) for ws in bf16_layers]
        qhead = quantized([head], "int8")[0]
        for m in ms:
            x = jax.random.normal(jax.random.key(2), (m, d), jnp.float32).astype(jnp.bfloat16) * 0.1
            for impl in impls:
                mm = lambda x, q, impl=impl: quant.matmul(x, q, impl=impl)
                try:
                    res[f"{fmt}_{impl}_M{m}_ms"] = 1e3 * time_chain(
                        jax.jit(lambda x, ls, h, mm=mm: forward(x, ls, h, mm)), x, qlayers, qhead)
                except Exception as e:  # noqa: BLE001
                    res[f"{fmt}_{impl}_M{m}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            print(json.dumps(res), flush=True)
        del qlayers
    out["chain"] = res
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="qmatmul.json")
    p.add_argument("--ms", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--chain-ms", nargs="+", type=int, default=[1, 32])
    p.add_argument("--skip-shapes", action="store_true")
    a = p.parse_args()
    dev = jax.devices()[0]
    hbm = bench.copy_limit()
    out = {"device": dev.device_kind, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
           "hbm_limit_GBps": hbm.limit / 1e9, "hbm_winner": hbm.winner}
    save = lambda: open(a.out, "w").write(json.dumps(out, indent=1))
    if not a.skip_shapes:
        per_shape(a.ms, out)
        save()
    chain(out, a.chain_ms)
    save()
    print(f"HBM limit {out['hbm_limit_GBps']:.0f} GB/s ({hbm.winner}); {dev.device_kind}")
    print("| shape | M | bf16 us | int8 kernel us (x) | int4 kernel us (x) | int8 xla us | int4 xla us | int8 GB/s | "
          "int4 GB/s | err |")
    for r in out.get("per_shape", []):
        g = lambda k: r.get(k, float("nan"))
        print(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {g('int8_kernel_us'):.1f} "
              f"({g('int8_kernel_over_bf16'):.2f}) | {g('int4_kernel_us'):.1f} ({g('int4_kernel_over_bf16'):.2f}) | "
              f"{g('int8_xla_us'):.1f} | {g('int4_xla_us'):.1f} | {g('int8_kernel_GBps'):.0f} | "
              f"{g('int4_kernel_GBps'):.0f} | {max(g('int8_kernel_rel_err'), g('int4_kernel_rel_err')):.1e} |")
        for f in quant.FORMATS:
            if f"{f}_kernel_error" in r:
                print("   ", f, r[f"{f}_kernel_error"][:300])
    print(json.dumps(out["chain"], indent=0))


if __name__ == "__main__":
    main()
