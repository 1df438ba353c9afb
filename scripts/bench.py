"""GPU benchmark: real NLD shapes with random bf16 weights made on the device (no checkpoint).

Measures, in one process: device copy bandwidth (the roofline's denominator), one forward at T=1 and T=32
over several contexts, the linear_spec round cost in AR forwards, end-to-end AR tokens/s over batch sizes,
compile time per mode; optionally the embedded model per mode. Writes JSON (raw) and a markdown table.

    python scripts/bench.py --sizes 8B --out $OUT/bench.json --md $OUT/bench.md
    python scripts/bench.py --sizes tiny --contexts 64 --batches 1 2 --new-tokens 16   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import PRESETS, Config
from nemodiff_jax.decoding.common import initial_state, run_device
from nemodiff_jax.model import Transformer, abstract_model
from nemodiff_jax.sampling import Sampling
from nemodiff_jax.sharding import cache_sharding, make_mesh, param_shardings


def timeit(fn, *, warmup=2, iters=10) -> float:
    """Median wall time (s) of fn(), which must block on its result."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Achievable HBM bytes/s: the better of a streaming copy (read + write counted) and a read-only
    reduction, so the roofline denominator is never understated."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    reduce = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t_copy = timeit(lambda: copy(x).block_until_ready(), iters=20)
    t_read = timeit(lambda: reduce(x).block_until_ready(), iters=20)
    # a decode-shaped GEMV over nbytes of weights (what a forward actually streams)
    w = x.reshape(8192, -1)
    v = jnp.ones((1, 8192), jnp.bfloat16)
    gemv = jax.jit(lambda v, w: v @ w)
    t_gemv = timeit(lambda: gemv(v, w).block_until_ready(), iters=20)
    rates = {"copy": 2 * nbytes / t_copy, "read": nbytes / t_read, "gemv": nbytes / t_gemv}
    print(json.dumps({"bandwidth_probe_GBps": {k: r / 1e9 for k, r in rates.items()}}), flush=True)
    return max(rates.values())


MESH = None  # set by --mesh: a ("data", "model") mesh for tensor-parallel runs


def make_model(cfg: Config) -> Transformer:
    """Random bf16 weights created on the device tensor by tensor (no host copy), straight into their
    shardings under --mesh. One jit over the whole 8B init is a very slow XLA compile (seen: > 9 min on an
    H200); per-tensor draws compile per shape only."""
    abstract = abstract_model(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(abstract, MESH) if MESH is not None else {}

    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape, sharding = tuple(var.shape), shardings.get(path)
        if len(shape) == 1:  # norm weights
            value = jnp.ones(shape, jnp.bfloat16, device=sharding)
        else:  # all leading dims as fan-in (o_proj [N, H, D]: N*H)
            scale = 1.0 if path == ("embed_tokens",) else float(np.prod(shape[:-1])) ** -0.5
            value = _drawer(shape, scale, sharding)(jax.random.key(i))
        var.set_value(value)
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _drawer(shape, scale, sharding):
    """One compiled draw per distinct (shape, scale, sharding): 14B init in seconds, not a compile per tensor."""
    return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16),
                   out_shardings=sharding)


def _resolve(impl: str, cfg):
    """Under --mesh the kernel must run per device (shard_map), as the Generator does."""
    if MESH is not None and impl in ("auto", "pallas"):
        from nemodiff_jax.generate import sharded_attention_impl

        return sharded_attention_impl(cfg, MESH)
    return impl


def _per_gpu(weight_bytes: int, kv: int) -> float:
    """Bytes one GPU streams per forward: its 1/TP of the weights, and of the KV cache also its 1/DP of the rows."""
    dp, tp = (MESH.shape["data"], MESH.shape["model"]) if MESH is not None else (1, 1)
    return weight_bytes / tp + kv / (tp * dp)


def weight_bytes_per_forward(cfg: Config) -> int:
    """Bytes a forward must stream: all layer weights + head + norms (the embedding is a row gather)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f + 2 * d
    return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * d + d)


def kv_bytes(cfg: Config, batch: int, slots: int) -> int:
    return 2 * 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim


@functools.lru_cache(maxsize=None)
def _forward_loop(graphdef, t: int, causal: bool, attn_impl, n: int, compiler_options: tuple):
    """n forwards in one fori_loop, jitted once per setting (a repeat measurement reuses the compile)."""
    @functools.partial(jax.jit, donate_argnums=(2,), compiler_options=dict(compiler_options) or None)
    def loop(params, tokens, cache):
        m = nnx.merge(graphdef, params)
        pos = cache.lengths[:, None] + jnp.arange(t)[None]

        def body(i, carry):
            cache, acc = carry
            logits, cache = m(tokens, pos, cache, causal=causal, attn_impl=attn_impl)
            return cache, acc + logits[:, -1, 0]

        return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((tokens.shape[0],), jnp.float32)))

    return loop


def bench_forward(model, cfg, batch, ctx, t, causal, attn_impl="xla", n=16, warmup=2, iters=5,
                  compiler_options=None, info=None):
    """Device time of one forward at chunk size t over a cache holding ctx tokens: n forwards in one
    on-device fori_loop (cache carried and donated), so host dispatch is not measured."""
    graphdef, params = nnx.split(model)
    capacity = ctx + 64
    loop = _forward_loop(graphdef, t, causal, attn_impl, n, tuple(sorted((compiler_options or {}).items())))
    cache = KVCache.init(cfg, batch, capacity, jnp.bfloat16, lengths=jnp.full((batch,), ctx, jnp.int32),
                         sharding=cache_sharding(cfg, batch, MESH))
    tokens = jnp.ones((batch, t), jnp.int32)
    state = {"cache": cache}

    def run():
        state["cache"], acc = loop(params, tokens, state["cache"])
        state["acc"] = acc.block_until_ready()

    dt = timeit(run, warmup=warmup, iters=iters) / n
    if info is not None:  # the summed logits of the last loop: variants of one model must agree
        info["acc"] = np.asarray(state["acc"])
    return dt


def bench_e2e(model, cfg, batch, prompt_len, new_tokens, mode="ar", attn_impl="auto", reps=3):
    """End-to-end on-device decode loop of one mode (prefill excluded), mode defaults as the Generator's:
    tokens/s, forwards, ms per forward, compile seconds. With random weights diffusion and linear_spec
    commit about one token per forward (worst case): their tokens/s is a floor, their ms per forward is real."""
    from nemodiff_jax.generate import MODES, _round_up, decoding_options

    graphdef, params = nnx.split(model)
    opts = decoding_options(cfg, mode, {}, (), attn_impl)
    step = MODES[mode].step
    capacity = _round_up(prompt_len + new_tokens + 2 * cfg.block_size + 64, 128)

    def fresh():
        cache = KVCache.init(cfg, batch, capacity, jnp.bfloat16, sharding=cache_sharding(cfg, batch, MESH),
                             lengths=jnp.full((batch,), prompt_len, jnp.int32))
        keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
        first = jnp.full((batch,), 5, jnp.int32)
        return initial_state(cache, new_tokens + 2 * cfg.block_size, keys, jnp.full((batch,), new_tokens, jnp.int32),
                             Sampling.make(), None, first, opts)

    t0 = time.perf_counter()
    st = run_device(graphdef, params, step, opts, fresh())
    st.n_out.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        st = fresh()
        t = time.perf_counter()
        st = run_device(graphdef, params, step, opts, st)
        st.n_out.block_until_ready()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    emitted = int(jnp.sum(jnp.minimum(st.n_out, new_tokens))) - batch  # the first token came from the prefill
    forwards = int(st.total_passes)
    tokens = np.asarray(st.out)[:, :new_tokens]
    rounds = int(jnp.max(st.rounds))
    return {"mode": mode, "tokens_per_s": emitted / dt, "forwards": forwards, "rounds": rounds,
            "ms_per_forward": 1e3 * dt / forwards, "ms_per_round": 1e3 * dt / max(rounds, 1),
            "tokens_per_forward": emitted / batch / forwards,
            "tokens_crc32": zlib.crc32(tokens.astype(np.int32).tobytes()),  # same tokens across runs/meshes?
            "compile_s": compile_s}


def bench_size(name: str, args, save=lambda res: None) -> dict:
    cfg = PRESETS[name]
    t = time.perf_counter()
    model = make_model(cfg)
    jax.block_until_ready(nnx.state(model))
    res = {"size": name, "init_s": time.perf_counter() - t, "weight_bytes": weight_bytes_per_forward(cfg),
           "forward": [], "e2e": []}
    bw = args.bandwidth
    for ctx, impl in ((c, i) for i in args.attn for c in args.contexts):
        row = {"context": ctx, "attn": impl}
        for t_chunk, causal, key in ((1, True, "t1"), (32, True, "t32_causal"), (32, False, "t32_bidir")):
            dt = bench_forward(model, cfg, 1, ctx, t_chunk, causal, attn_impl=_resolve(impl, cfg))
            row[key + "_ms"] = 1e3 * dt
        streamed = _per_gpu(res["weight_bytes"], kv_bytes(cfg, 1, ctx + 64))
        row["floor_ms"] = 1e3 * streamed / bw
        row["t1_roofline_pct"] = 100 * row["floor_ms"] / row["t1_ms"]
        row["t32_over_t1"] = row["t32_causal_ms"] / row["t1_ms"]
        row["linear_spec_round_in_ar_forwards"] = (row["t32_bidir_ms"] + row["t32_causal_ms"]) / row["t1_ms"]
        res["forward"].append(row)
        save(res)
        print(json.dumps({name: row}), flush=True)
    for mode, b, impl in ((m, b, i) for i in args.attn for m in args.modes for b in args.batches):
        new = args.new_tokens if mode == "ar" else args.mode_new_tokens
        r = bench_e2e(model, cfg, b, args.prompt_len, new, mode=mode, attn_impl=_resolve(impl, cfg))
        r["batch"], r["attn"] = b, impl
        if mode == "ar":
            floor = _per_gpu(res["weight_bytes"], kv_bytes(cfg, b, args.prompt_len + new + 64)) / bw
            r["roofline_pct"] = 100 * floor / (r["ms_per_forward"] / 1e3)
        res["e2e"].append(r)
        save(res)
        print(json.dumps({name: r}), flush=True)
    del model
    return res


def bench_embedded(args) -> list[dict]:
    from nemodiff_jax.cli import DEMO_PROMPTS, default_model
    from nemodiff_jax.generate import load

    gen = load(default_model(), dtype="bfloat16", progress=False)
    rows = []
    for mode in ("ar", "diffusion", "linear_spec"):
        t = time.perf_counter()
        gen.generate(DEMO_PROMPTS[:1], mode=mode, max_new_tokens=128)
        compile_s = time.perf_counter() - t
        r = gen.generate(DEMO_PROMPTS[:1], mode=mode, max_new_tokens=128)[0]
        row = {"mode": mode, "compile_s": compile_s, **{k: v for k, v in r.stats.items() if k != "mode"}}
        rows.append(row)
        print(json.dumps({"embedded": row}), flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"Card: {report['device']}; JAX {report['jax']}; {report['date']}; copy bandwidth "
             f"{report['bandwidth_GBps']:.0f} GB/s (read+write).", ""]
    for s in report["sizes"]:
        lines += [f"**{s['size']}** (random bf16 weights, {s['weight_bytes'] / 1e9:.2f} GB streamed per forward)"]
        if s["forward"]:
            lines += ["", "| attn | context | T=1 ms | floor ms | % roofline | T=32 causal ms | T=32/T=1 | "
                      "T=32 bidir ms | linear_spec round (AR fwds) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s["forward"]:
            lines.append(f"| {r['attn']} | {r['context']} | {r['t1_ms']:.2f} | {r['floor_ms']:.2f} | {r['t1_roofline_pct']:.0f}% | "
                         f"{r['t32_causal_ms']:.2f} | {r['t32_over_t1']:.2f} | {r['t32_bidir_ms']:.2f} | "
                         f"{r['linear_spec_round_in_ar_forwards']:.2f} |")
        lines += ["", "| mode | attn | batch | tok/s | ms/forward | forwards | tokens/forward | % roofline | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in s["e2e"]:
            roof = f"{r['roofline_pct']:.0f}%" if "roofline_pct" in r else ""
            lines.append(f"| {r['mode']} | {r['attn']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                         f"{r['ms_per_forward']:.2f} | {r['forwards']} | {r['tokens_per_forward']:.2f} | {roof} | "
                         f"{r['compile_s']:.1f} |")
        lines.append("")
    if report.get("embedded"):
        lines += ["**Embedded model** (batch 1, 128 new tokens, bf16)", "",
                  "| mode | tok/s | tokens/forward | accepted/round | steps/block | compile s |",
                  "|---|---|---|---|---|---|"]
        for r in report["embedded"]:
            lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['tokens_per_forward']:.2f} | "
                         f"{r.get('mean_accepted_per_round', float('nan')):.2f} | "
                         f"{r.get('denoise_steps_per_block', float('nan')):.2f} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["8B"], choices=sorted(PRESETS))
    p.add_argument("--contexts", nargs="*", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["ar", "diffusion", "linear_spec"],
                   choices=["ar", "diffusion", "linear_spec"], help="decoding modes timed end to end")
    p.add_argument("--mode-new-tokens", type=int, default=64,
                   help="new tokens per row for diffusion / linear_spec (32-token forwards: costlier)")
    p.add_argument("--embedded", action="store_true", help="also run the embedded model per mode")
    p.add_argument("--attn", nargs="+", default=["auto"], choices=["auto", "xla", "pallas"],
                   help="attention implementations to time (nemodiff_jax.attention.chunk_attention impl)")
    p.add_argument("--mesh", nargs=2, type=int, metavar=("DATA", "MODEL"), default=None,
                   help="run on a (data, model) mesh, e.g. --mesh 1 2 for tensor parallel over 2 GPUs")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    global MESH
    if args.mesh is not None:
        MESH = make_mesh(*args.mesh)
    dev = jax.devices()[0]
    args.bandwidth = copy_bandwidth(2 << 30 if dev.platform == "gpu" else 64 << 20)
    report = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "host": platform.node(),
              "bandwidth_GBps": args.bandwidth / 1e9, "mesh": args.mesh, "devices": jax.device_count(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "sizes": []}
    print(json.dumps({"bandwidth_GBps": report["bandwidth_GBps"], "device": report["device"]}), flush=True)
    out = Path(args.out)

    def save(res=None):  # rewritten after every measurement: a run cut short keeps what it measured
        sizes = report["sizes"] + ([res] if res is not None else [])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**report, "sizes": sizes}, indent=2))
        tmp.replace(out)

    for name in args.sizes:
        report["sizes"].append(bench_size(name, args, save))
    if args.embedded:
        report["embedded"] = bench_embedded(args)
    save()
    md = markdown(report)
    if args.md:
        Path(args.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
