"""GPU check + benchmark of the Pallas (Mosaic GPU) chunk-attention kernel, at the 8B head config (N=32, K=8, H=128).

1. Correctness of the compiled kernel against the pure-jnp reference: B in {1, 8, 64}, contexts {100, 1000, 4096,
   32768 (B <= 8)}, T in {1, 32}, both masks, ragged lengths that are not multiples of the KV block (one row at full
   capacity), NaN in every slot past the kernel's load horizon max(round_up(limit, 8), block_kv) and large finite
   values between the limit and that horizon. Also
   the `pv_from_smem` variant (the exact code the CPU interpreter test runs) and a few block configs.
2. Attention time per layer (device time via CUPTI, `jax.experimental.mosaic.gpu.profiler.measure`; falls back to
   wall clock over a chained on-device loop) of: the Pallas kernel (+ its jnp prologue/combine), the XLA path
   (`nemodiff_jax.attention.chunk_attention(impl="xla")`, jitted) and cuDNN (`jax.nn.dot_product_attention(
   implementation="cudnn")`: kv seq lengths for T=1 and bidirectional T=32, a boolean mask for causal T=32, whose
   bottom-right alignment cuDNN's own causal mode cannot express). Contexts 1K/4K/16K/32K, B in {1, 8, 32, 64}.

Every case is wrapped in try/except (errors printed verbatim, first traceback of each distinct error in full), and
a wall-clock budget stops starting new cases so the run ends in time. JSON to --out; markdown tables printed last.

    python scripts/gpu_kernels.py --out $OUT/gpu_kernels.json
    python scripts/gpu_kernels.py --out /tmp/k.json --quick     # a few cases of each part
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nemodiff_jax.attention import chunk_attention, chunk_mask  # noqa: E402
from nemodiff_jax.pallas_kernels.chunk_attention import (BlockSizes, chunk_attention_pallas,  # noqa: E402
                                            chunk_attention_reference, grid_plan)

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
POISON_K, POISON_V = 100.0, 1e4
T0 = time.perf_counter()
_seen_errors: set[str] = set()
RESULTS: dict = dict(env={}, correctness=[], timing=[], variants=[])  # saved after every case
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


@functools.partial(jax.jit, static_argnames=("t", "block_kv", "nan"))
def _poison(k, v, lengths, *, t, block_kv, nan):
    """Slots >= limit get large finite values; with nan, slots past the kernel's load horizon
    max(round_up(limit, 8), block_kv) get NaN."""
    s = k.shape[1]
    slot = jnp.arange(s)[None, :, None, None]
    limit = (lengths + t)[:, None, None, None]
    k = jnp.where(slot >= limit, jnp.asarray(POISON_K, k.dtype), k)
    v = jnp.where(slot >= limit, jnp.asarray(POISON_V, v.dtype), v)
    if nan:
        far = slot >= jnp.maximum((limit + 7) // 8 * 8, block_kv)
        k = jnp.where(far, jnp.asarray(jnp.nan, k.dtype), k)
        v = jnp.where(far, jnp.asarray(jnp.nan, v.dtype), v)
    return k, v


def make_case(b, t, s, lengths, seed=0, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = _normal(kq, (b, t, N_HEADS, HEAD_DIM), dtype)
    k = _normal(kk, (b, s, KV_HEADS, HEAD_DIM), dtype)
    v = _normal(kv, (b, s, KV_HEADS, HEAD_DIM), dtype)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def ragged_lengths(b, t, s, block_kv, seed):
    """Row 0 at full capacity; the others random in [s/2, s-t], nudged off multiples of block_kv."""
    rng = np.random.default_rng(seed)
    top = s - t
    ls = [top] + [int(rng.integers(top // 2, top + 1)) for _ in range(b - 1)]
    ls = [x - 1 if (x + t) % block_kv == 0 and x > 0 else x for x in ls]
    return ls


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


# Block configs checked for correctness (B=8, ctx=1000) and timed at a few shapes, to pick the default.
VARIANTS = [BlockSizes(pv_from_smem=True), BlockSizes(64, 2), BlockSizes(32, 6), BlockSizes(128, 2),
            BlockSizes(64, 3, num_splits=1), BlockSizes(64, 3, num_splits=7)]
_reference = jax.jit(chunk_attention_reference, static_argnames="causal")
INTERPRET = False  # --interpret: CPU smoke run of this script (GPU interpreter, tiny case lists)


def pallas_fn(causal, block):
    return jax.jit(functools.partial(chunk_attention_pallas, causal=causal, block=block, interpret=INTERPRET))


def xla_fn(causal):
    return jax.jit(functools.partial(chunk_attention, causal=causal, impl="xla"))


def cudnn_fn(causal):
    def f(q, k, v, lengths):
        t, s = q.shape[1], k.shape[1]
        if causal and t > 1:  # bottom-right causal: only expressible as a mask (becomes a bias in cuDNN)
            mask = chunk_mask(lengths, t, s, True)[:, None]  # [B, 1, T, S]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths + t, implementation="cudnn")
    return jax.jit(f)


# ---------------------------------------------------------------------------------------------------- parts


def check_case(b, t, ctx, causal, block, seed):
    s = (ctx + 37 + 7) // 8 * 8  # capacity (a multiple of 8, as the kernel requires), not of the block
    lengths = ragged_lengths(b, t, s, block.block_kv, seed)
    q, k, v, lens = make_case(b, t, s, lengths, seed)
    k, v = _poison(k, v, lens, t=t, block_kv=block.block_kv, nan=True)
    out = jax.block_until_ready(pallas_fn(causal, block)(q, k, v, lens))
    ref = _reference(q, k, v, lens, causal=causal)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    finite = bool(np.isfinite(out32).all())
    abs_err = float(np.nanmax(np.abs(out32 - ref32))) if finite else float("nan")
    scale = float(np.abs(ref32).max())
    rel = abs_err / scale if finite else float("nan")
    return dict(B=b, T=t, context=ctx, capacity=s, causal=causal, block=str(block), lengths_head=lengths[:4],
                splits=grid_plan(b, t, N_HEADS, KV_HEADS, s, block).splits,
                finite=finite, max_abs_err=abs_err, ref_scale=scale, max_rel_err=rel,
                ok=bool(finite and rel < 2e-2))


def correctness(args, deadline):
    default = BlockSizes()
    cases = []
    combos = [(8, 1000), (1, 100), (64, 4096), (8, 4096), (1, 1000), (64, 100), (1, 32768), (8, 32768),
              (64, 1000), (1, 4096), (8, 100)]
    if args.quick:
        combos = [(8, 1000), (1, 100), (1, 4096)]
    if INTERPRET:
        combos = [(1, 100)]
    variants = VARIANTS[: 0 if INTERPRET else 2 if args.quick else None]
    # the first shape under the default, then under the variant the CPU interpreter ran, then the rest
    for b, ctx, blk in [combos[0] + (default,)] + [(8, 1000, v) for v in variants[:1]] + \
            [c + (default,) for c in combos[1:]] + [(8, 1000, v) for v in variants[1:]]:
        for t in (32, 1):
            for causal in (True, False):
                cases.append((b, t, ctx, causal, blk))
    results = RESULTS["correctness"]
    for i, (b, t, ctx, causal, blk) in enumerate(cases):
        if time.perf_counter() > deadline:
            results.append(dict(B=b, T=t, context=ctx, causal=causal, block=str(blk), skipped="time budget"))
            continue
        what = f"check B={b} T={t} ctx={ctx} causal={causal} {blk}"
        r = dict(B=b, T=t, context=ctx, causal=causal, block=str(blk), status="running")
        results.append(r)  # saved before the run: a hang leaves this row marked "running"
        save()
        try:
            with watchdog():
                r.update(check_case(b, t, ctx, causal, blk, seed=i))
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {what}: max rel err {r['max_rel_err']:.3g} "
                f"(abs {r['max_abs_err']:.3g}, finite={r['finite']})")
        except Exception as e:  # noqa: BLE001
            if "exceeds available shared memory" in str(e):
                r["skipped"] = str(e)[:200]
                log(f"skip {what}: {str(e)[:200]}")
            else:
                r.update(error=report_error(what, e), ok=False)
        del r["status"]
    save()
    return results


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


def markdown(check, times, variants) -> str:
    lines = []
    bad = [r for r in check if not r.get("ok") and "skipped" not in r]
    done = [r for r in check if "max_rel_err" in r]
    worst = max((r["max_rel_err"] for r in done if r["finite"]), default=float("nan"))
    lines.append(f"correctness: {len(done) - len([r for r in done if not r['ok']])}/{len(done)} ok, "
                 f"{len([r for r in check if 'error' in r])} errors, "
                 f"{len([r for r in check if 'skipped' in r])} skipped; worst max rel err {worst:.3g}")
    for r in bad[:10]:
        lines.append(f"  not ok: {json.dumps({k: r[k] for k in r if k != 'error'})} "
                     f"{r.get('error', '').splitlines()[0][:200] if r.get('error') else ''}")
    lines.append("")
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
    ap.add_argument("--check-share", type=float, default=0.35, help="part of the budget for correctness")
    ap.add_argument("--variant-share", type=float, default=0.12, help="part of the budget for block variants")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
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
    check_deadline = start + args.budget_s * args.check_share
    check = [] if args.skip_check else correctness(args, check_deadline)
    times = [] if args.skip_timing else timing(args, start + args.budget_s * (1 - args.variant_share))
    variants = [] if args.skip_timing else timing_variants(args, start + args.budget_s)
    save()
    log(f"wrote {args.out}")
    print(markdown(check, times, variants), flush=True)


if __name__ == "__main__":
    main()
