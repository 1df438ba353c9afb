"""Which tiling of the int8 / int4 kernel (pallas_kernels/qmatmul.py) streams fastest: compute warpgroups x
64-row accumulators per warpgroup x 128-input sub-steps per pipeline stage, over the 8B's layer matmuls at the
rows of AR decode (M=1) and of a 32-token chunk (M=32). Every case is also checked against the float32 oracle.
Then the best tiling per format runs the issue's chain (34 layers of qkv, o, gate_up, down, plus the head).

Each tiling runs in its own process under `--case-timeout` seconds (on 2026-12-02 the 4-warpgroup tiling never
returned: a hang or a very slow compile, which must not take the whole sweep with it).

    python3 -P benchmarks/qmatmul_tiling.py --out $OUT/tiling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nemodiff_jax import bench, quant
from nemodiff_jax.pallas_kernels import qmatmul as qm

sys.path.insert(0, str(Path(__file__).parent))
import qmatmul_kernels as qk  # noqa: E402

# (compute warpgroups, row tiles, K sub-steps); the 4-warpgroup ones last (they did not return on 2026-12-02
# and 2026-12-07)
TILINGS = [(2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2), (4, 1, 1), (4, 1, 2)]
SHAPES = ["qkv", "o", "gate_up", "down"]


def one_tiling(tiling, ms):
    """Every shape, format and M for one tiling; prints one JSON row per case (the parent collects them)."""
    for name in SHAPES:
        k, n = qk.SHAPES[name]
        copies = min(32, max(1, math.ceil(512e6 / (2 * k * n))))
        ws = qk.weights(k, n, copies, 0)
        for fmt in quant.FORMATS:
            qs = qk.quantized(ws, fmt)
            for m in ms:
                x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
                cfg = qm.QMatmulConfig(*tiling)
                row = {"shape": name, "fmt": fmt, "M": m, "tiling": tiling}
                try:
                    fn = jax.jit(lambda x, qs, cfg=cfg: sum(qm.qmatmul_pallas(x, q.q, q.scale, config=cfg)
                                                            for q in qs))
                    row["us"] = 1e6 * qk.time_chain(fn, x, qs) / copies
                    row["GBps"] = qs[0].nbytes / row["us"] / 1e3
                    got = qm.qmatmul_pallas(x, qs[0].q, qs[0].scale, out_dtype=jnp.float32, config=cfg)
                    want = qm.qmatmul_reference(x, qs[0].q, qs[0].scale, out_dtype=jnp.float32)
                    row["rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                print("ROW " + json.dumps(row), flush=True)
            del qs
        del ws


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="tiling.json")
    p.add_argument("--ms", nargs="+", type=int, default=[1, 32])
    p.add_argument("--one", nargs=3, type=int, default=None, help="(internal) run one tiling in this process")
    p.add_argument("--case-timeout", type=float, default=90)
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole sweep: tilings that could "
                   "not finish in it are skipped, and the chain runs only with >= 90 s left")
    a = p.parse_args()
    if a.one:
        one_tiling(tuple(a.one), a.ms)
        return
    dev = jax.devices()[0]
    hbm = bench.copy_limit(vendor=False)
    out = {"device": dev.device_kind, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
           "hbm_limit_GBps": hbm.limit / 1e9, "hbm_winner": hbm.winner, "rows": []}
    totals = {}
    start = time.monotonic()
    for tiling in TILINGS:
        if time.monotonic() - start + a.case_timeout > a.budget:
            out.setdefault("status", {})["x".join(map(str, tiling))] = "skipped: out of --budget"
            continue
        cmd = [sys.executable, "-P", __file__, "--one", *map(str, tiling), "--ms", *map(str, a.ms)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=a.case_timeout)
            text, status = run.stdout, f"exit {run.returncode}: {run.stderr[-400:]}" if run.returncode else "ok"
        except subprocess.TimeoutExpired as e:
            text, status = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {a.case_timeout} s"
        rows = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]
        out["rows"] += rows
        out.setdefault("status", {})["x".join(map(str, tiling))] = status
        for r in rows:
            if "us" in r:
                key = (r["fmt"], r["M"], tiling)
                totals[key] = totals.get(key, 0.0) + r["us"]
        print(json.dumps({"tiling": tiling, "status": status, "cases": len(rows)}), flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    best = {}
    for (fmt, m, tiling), us in totals.items():
        if (fmt, m) not in best or us < totals[(fmt, m, best[(fmt, m)])]:
            best[(fmt, m)] = tiling
    out["best"] = {f"{f}_M{m}": list(t) for (f, m), t in best.items()}
    out["totals_us"] = {f"{f}_M{m}_{'x'.join(map(str, t))}": v for (f, m, t), v in totals.items()}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"HBM limit {hbm.limit / 1e9:.0f} GB/s ({hbm.winner}); {dev.device_kind}")
    print("| fmt | M | " + " | ".join("x".join(map(str, t)) for t in TILINGS) + " | (us, sum of qkv+o+gate_up+down)")
    for fmt in quant.FORMATS:
        for m in a.ms:
            print(f"| {fmt} | {m} | " + " | ".join(f"{totals.get((fmt, m, t), float('nan')):.1f}" for t in TILINGS)
                  + " |")
    errs = [r.get("rel_err", 0) for r in out["rows"]]
    print("max rel err", max(errs), "errors", [r for r in out["rows"] if "error" in r][:3])

    # The chain with the best tiling per format (M=1's choice for both row counts, as the default would be)
    chain = {}
    for fmt in quant.FORMATS:
        if time.monotonic() - start > a.budget - 90:
            print(f"chain skipped for {fmt}: out of --budget")
            continue
        wgs, rows, k_sub = best.get((fmt, a.ms[0]), (2, 1, 2))
        qm.DEFAULT_TILING.update(compute_wgs=wgs, row_tiles=rows, k_sub=k_sub)
        sub = {}
        qk.chain(sub, a.ms, formats=(fmt,), impls=("pallas",), bf16=(fmt == quant.FORMATS[0]))
        chain.update(sub["chain"])
        chain[f"{fmt}_tiling"] = [wgs, rows, k_sub]
        out["chain"] = chain
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(chain, indent=0))


if __name__ == "__main__":
    main()
