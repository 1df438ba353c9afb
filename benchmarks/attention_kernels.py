"""GPU benchmark of the attention paths at the 8B head config (N=32, K=8, H=128). The compiled kernels'
correctness cases are pytest's: `python3 -P -m pytest -m gpu tests/test_gpu.py`.

Attention time per layer (device time via CUPTI, `jax.experimental.mosaic.gpu.profiler.measure`; falls back to
   wall clock over a chained on-device loop) of: the Pallas kernel (+ its jnp prologue/combine), the XLA path
   (`nemodiff_jax.attention.chunk_attention(impl="xla")`, jitted) and cuDNN (`jax.nn.dot_product_attention(
   implementation="cudnn")`: kv seq lengths for T=1 and bidirectional T=32, a boolean mask for causal T=32, whose
   bottom-right alignment cuDNN's own causal mode cannot express). Contexts 1K/4K/16K/32K, B in {1, 8, 32, 64}.

Every case is wrapped in try/except (errors printed verbatim, first traceback of each distinct error in full), and
a wall-clock budget stops starting new cases so the run ends in time. JSON to --out; markdown tables printed last.

    python3 -P benchmarks/attention_kernels.py --out $OUT/attention_kernels.json
    python3 -P benchmarks/attention_kernels.py --out /tmp/k.json --quick     # a few cases
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import platform
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from nemodiff_jax.attention import chunk_attention
from nemodiff_jax.pallas_kernels.chunk_attention import BlockSizes, chunk_attention_pallas

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
T0 = time.perf_counter()
_seen_errors: set[str] = set()
RESULTS: dict = dict(env={}, timing=[], variants=[])  # saved after every case
OUT: Path | None = None
CASE_TIMEOUT_S = 150.0


def save():
    """Rewrites --out with everything so far: a hung or killed run still leaves its results."""
    if OUT is not None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(RESULTS, indent=1, default=str))


class watchdog:
    """A case that runs past CASE_TIMEOUT_S (e.g. a kernel deadlocked on a barrier) dumps every thread's stack
    and ends the process, instead of eating the machine's time; results so far are already on disk."""

    def __enter__(self):
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()
        save()
        return False


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def report_error(what: str, e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    key = msg[:300]
    if key not in _seen_errors:
        _seen_errors.add(key)
        log(f"ERROR in {what}:\n{traceback.format_exc()}")
    else:
        log(f"ERROR in {what} (same as before): {msg.splitlines()[0][:300]}")
    return msg[:4000]


# ---------------------------------------------------------------------------------------------------- data


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def make_case(b, t, s, lengths, seed=0, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = _normal(kq, (b, t, N_HEADS, HEAD_DIM), dtype)
    k = _normal(kk, (b, s, KV_HEADS, HEAD_DIM), dtype)
    v = _normal(kv, (b, s, KV_HEADS, HEAD_DIM), dtype)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


# ---------------------------------------------------------------------------------------------------- timing


def device_time_ms(fn, args, iters: int) -> tuple[float, str, list | None]:
    """Median device time (ms) of fn(*args); method; per-kernel breakdown of one call (CUPTI) if available."""
    try:
        from jax.experimental.mosaic.gpu import profiler
        _, per_iter = profiler.measure(fn, iterations=iters)(*args)
        if per_iter is None:
            raise RuntimeError("CUPTI reported no kernels")
        per_iter = per_iter if isinstance(per_iter, list) else [per_iter]
        breakdown = None
        try:
            _, kernels = profiler.measure(fn, aggregate=False)(*args)
            breakdown = [(name[:80], round(ms * 1e3, 2)) for name, ms in (kernels or [])]
        except Exception:  # noqa: BLE001 - the breakdown is a nicety
            pass
        return statistics.median(per_iter), "cupti", breakdown
    except Exception as e:  # noqa: BLE001
        log(f"  CUPTI unavailable ({type(e).__name__}: {str(e)[:200]}); wall clock over a device loop")
    q, rest = args[0], args[1:]
    reps = 1 if INTERPRET else 10
    chained = jax.jit(lambda q, *r: jax.lax.fori_loop(0, reps, lambda i, x: fn(x, *r), q))
    jax.block_until_ready(chained(q, *rest))
    ts = []
    for _ in range(1 if INTERPRET else max(3, iters // 4)):
        t = time.perf_counter()
        jax.block_until_ready(chained(q, *rest))
        ts.append((time.perf_counter() - t) / reps)
    return statistics.median(ts) * 1e3, "wall_chained", None


# Block configs timed at a few shapes, to pick the default.
VARIANTS = [BlockSizes(pv_from_smem=True), BlockSizes(64, 2), BlockSizes(64, 2, num_splits=3),
            BlockSizes(128, 1), BlockSizes(64, 3, num_splits=1), BlockSizes(64, 3, num_splits=7)]
INTERPRET = False  # --interpret: CPU smoke run of this script (GPU interpreter, tiny case lists)


def pallas_fn(causal, block):
    return jax.jit(functools.partial(chunk_attention_pallas, causal=causal, block=block, interpret=INTERPRET))


def xla_fn(causal):
    return jax.jit(functools.partial(chunk_attention, causal=causal, impl="xla"))


def cudnn_fn(causal):
    """The library's cuDNN path (kv lengths; for causal T > 1 also the bottom-right mask, as a bias)."""
    return jax.jit(functools.partial(chunk_attention, causal=causal, impl="cudnn"))


# ---------------------------------------------------------------------------------------------------- parts


def kv_cache_bytes(b: int, ctx: int) -> int:
    """One layer's bf16 K and V for b rows of ctx slots (what attention streams)."""
    return 2 * b * ctx * KV_HEADS * HEAD_DIM * 2


def time_impls(row, impls, fn_args, kv_bytes, iters):
    for name, fn in impls:
        what = f"time {name} {json.dumps({k: row[k] for k in ('T', 'causal', 'B', 'context') if k in row})}"
        try:
            with watchdog():
                ms, method, breakdown = device_time_ms(fn, fn_args, iters)
            row[f"{name}_us"] = round(ms * 1e3, 2)
            row[f"{name}_GBps"] = round(kv_bytes / (ms * 1e-3) / 1e9, 1)
            row["method"] = method
            if name == "pallas" and breakdown:
                row["pallas_kernels_us"] = breakdown
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = report_error(what, e)


def timing(args, deadline):
    """Rows ordered so the budget cuts the least important shapes: every mode at 4K/1K contexts first."""
    contexts = [4096, 1024, 16384, 32768]
    batches = [8, 1, 64, 32]
    modes = [(1, True), (32, False), (32, True)]  # (T, causal): AR decode, denoise, draft/verify
    if args.quick:
        contexts, batches, modes = [4096, 1024], [8, 1], [(1, True), (32, False)]
    if INTERPRET:
        contexts, batches, modes = [128], [1], [(1, True)]
    results = RESULTS["timing"]
    for ctx in contexts:
        for b in batches:
            cache_gb = kv_cache_bytes(b, ctx) / 1e9
            if cache_gb > 20:
                results += [dict(T=t, causal=c, B=b, context=ctx, skipped="cache > 20 GB") for t, c in modes]
                continue
            if time.perf_counter() > deadline:
                results += [dict(T=t, causal=c, B=b, context=ctx, skipped="time budget") for t, c in modes]
                continue
            try:
                _, k, v, _ = make_case(b, 1, ctx, [0] * b, seed=1)
            except Exception as e:  # noqa: BLE001
                results.append(dict(B=b, context=ctx, error=report_error(f"data B={b} ctx={ctx}", e)))
                continue
            for t, causal in modes:
                row = dict(T=t, causal=causal, B=b, context=ctx, cache_GB=round(cache_gb, 3))
                if time.perf_counter() > deadline:
                    row["skipped"] = "time budget"
                    results.append(row)
                    continue
                q = _normal(jax.random.key(t), (b, t, N_HEADS, HEAD_DIM), jnp.bfloat16)
                lens = jnp.full((b,), ctx - t, jnp.int32)  # every row full: limit = capacity = context
                results.append(row)
                time_impls(row, (("pallas", pallas_fn(causal, BlockSizes())), ("xla", xla_fn(causal)),
                                 ("cudnn", cudnn_fn(causal))), (q, k, v, lens), kv_cache_bytes(b, ctx), args.iters)
                log(f"T={t} causal={causal} B={b} ctx={ctx}: " + ", ".join(
                    f"{n}={row.get(f'{n}_us', 'err')}" for n in ("pallas", "xla", "cudnn")))
            del k, v
    return results


def timing_variants(args, deadline):
    """The Pallas kernel alone under each block config at a few shapes (to choose the default)."""
    shapes = [(1, True, 8, 4096), (32, False, 8, 4096), (1, True, 1, 32768), (32, True, 64, 4096)]
    if args.quick or INTERPRET:
        shapes = shapes[:1] if not INTERPRET else []
    results = RESULTS["variants"]
    for t, causal, b, ctx in shapes:
        if time.perf_counter() > deadline:
            results.append(dict(T=t, causal=causal, B=b, context=ctx, skipped="time budget"))
            continue
        try:
            q, k, v, _ = make_case(b, t, ctx, [0] * b, seed=2)
        except Exception as e:  # noqa: BLE001
            results.append(dict(T=t, causal=causal, B=b, context=ctx, error=report_error("variant data", e)))
            continue
        lens = jnp.full((b,), ctx - t, jnp.int32)
        for blk in [BlockSizes()] + VARIANTS:
            row = dict(T=t, causal=causal, B=b, context=ctx, block=str(blk))
            results.append(row)
            if time.perf_counter() > deadline:
                row["skipped"] = "time budget"
            else:
                time_impls(row, (("pallas", pallas_fn(causal, blk)),), (q, k, v, lens),
                           kv_cache_bytes(b, ctx), args.iters)
                log(f"variant T={t} causal={causal} B={b} ctx={ctx} {blk}: {row.get('pallas_us', 'err')}")
        del q, k, v
    return results


def markdown(times, variants) -> str:
    lines = []
    lines.append("| T | mask | B | context | pallas us | xla us | cudnn us | vs xla | vs cudnn | pallas GB/s |")
    lines.append("|---|------|---|---------|-----------|--------|----------|--------|----------|-------------|")
    for r in sorted(times, key=lambda r: (r.get("T", 0), not r.get("causal"), r["context"], r["B"])):
        if "skipped" in r or "T" not in r:
            continue
        p, x, c = r.get("pallas_us"), r.get("xla_us"), r.get("cudnn_us")
        ratio = lambda a, b: f"{b / a:.2f}x" if a and b else "-"
        lines.append(f"| {r['T']} | {'causal' if r['causal'] else 'bidir'} | {r['B']} | {r['context']} | "
                     f"{p if p else 'err'} | {x if x else 'err'} | {c if c else 'err'} | {ratio(p, x)} | "
                     f"{ratio(p, c)} | {r.get('pallas_GBps', '-')} |")
    if variants:
        lines += ["", "| T | mask | B | context | block | pallas us |", "|---|---|---|---|---|---|"]
        for r in variants:
            us = r.get("pallas_us", r.get("skipped", "err"))
            lines.append(f"| {r['T']} | {'causal' if r['causal'] else 'bidir'} | {r['B']} | {r['context']} | "
                         f"{r.get('block', '-').replace('BlockSizes', '')} | {us} |")
    return "\n".join(lines)


def main():
    global INTERPRET, OUT, CASE_TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this")
    ap.add_argument("--variant-share", type=float, default=0.12, help="part of the budget for block variants")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke run of the script itself")
    ap.add_argument("--case-timeout-s", type=float, default=150.0, help="a case past this ends the run")
    args = ap.parse_args()
    INTERPRET, OUT, CASE_TIMEOUT_S = args.interpret, args.out, args.case_timeout_s

    dev = jax.devices()[0]
    env = dict(jax=jax.__version__, device=dev.device_kind, platform=dev.platform, python=platform.python_version(),
               num_sms=getattr(dev, "core_count", None))
    try:
        from jax._src.lib import cuda_versions
        env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        pass
    RESULTS["env"] = env
    save()
    log(f"env: {env}")
    if dev.platform != "gpu":
        log("WARNING: not a GPU; the compiled Mosaic GPU kernel cannot run here")

    start = time.perf_counter()
    times = [] if args.skip_timing else timing(args, start + args.budget_s * (1 - args.variant_share))
    variants = [] if args.skip_timing else timing_variants(args, start + args.budget_s)
    save()
    log(f"wrote {args.out}")
    print(markdown(times, variants), flush=True)


if __name__ == "__main__":
    main()
