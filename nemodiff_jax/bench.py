"""Benchmark harness behind `nemodiff bench`: real NLD shapes with random bf16 weights made on the device (no
checkpoint), or the embedded model's shape.

One run measures: the HBM limit (`copy_limit`: every copy this machine can run, timed in the same process, plus a
read-only reduction; the roofline's denominator is the best measured rate, named, next to the card's datasheet
figure), one forward at T=1 and T=32 over several contexts, the linear_spec round cost in AR forwards, end-to-end
tokens/s per mode over batch sizes, compile time per mode; optionally the embedded model per mode. Every roofline
percentage comes as two numbers: of the measured limit and of the datasheet. Writes JSON (rewritten after every
measurement, so a run cut short keeps what it measured) and a markdown table.

    nemodiff bench                                     # auto: the embedded model's shape on a CPU, 8B on a GPU
    python3 -P -m nemodiff_jax.cli bench --sizes 8B --out $OUT/bench.json --md $OUT/bench.md
    python3 -P -m nemodiff_jax.cli bench --sizes 14B --mesh 1 2     # tensor parallel over 2 GPUs

Library use: `run(Settings(...))`; the mesh, where there is one, is passed through every function (no module
state), e.g. `make_model(cfg, mesh)`, `bench_forward(..., mesh=mesh)`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax import quant
from nemodiff_jax.attention import IMPLS
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import PRESETS, Config
from nemodiff_jax.decoding import quadratic
from nemodiff_jax.decoding.common import Options, RowSettings, forward, initial_state, run_device
from nemodiff_jax.model import Transformer, abstract_model, quantize_weights
from nemodiff_jax.sharding import cache_sharding, make_mesh, matmul_impl, param_shardings, shard_model

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")  # timed by default
# ... and on request, a mode with options: ar with deterministic=True (every step at the verify chunk's shape),
# whose cost decides it. Each maps to (the decoding mode, its options).
MODE_VARIANTS = {"ar_deterministic": ("ar", {"deterministic": True})}
E2E_MODES = (*MODES, *MODE_VARIANTS)
FORMATS = ("bf16", *quant.FORMATS)  # weights as made (bf16) or quantized on the device (model.quantize_weights)
ATTN_IMPLS = IMPLS  # "auto" | "xla" | "pallas" | "cudnn": nemodiff_jax.attention.chunk_attention's impl
EMBEDDED = "embedded"  # size name: the embedded model's config.json shape (random weights)
AUTO = "auto"  # size name: EMBEDDED on a CPU, 8B on an accelerator
SIZE_CHOICES = (AUTO, EMBEDDED, *sorted(PRESETS))

# Defaults for the settings left as None. An explicit size (or auto on a GPU) gets the GPU set; auto on a CPU gets
# the small set (the embedded shape, so that `make bench` on a 2-core CPU is done in about a minute).
GPU_DEFAULTS = dict(contexts=[1024, 4096, 16384], batches=[1, 8, 32, 64], prompt_len=512, new_tokens=128,
                    mode_new_tokens=64)
CPU_DEFAULTS = dict(contexts=[256, 1024], batches=[1, 4], prompt_len=64, new_tokens=32, mode_new_tokens=32)


@dataclasses.dataclass
class Settings:
    """What to run (the `nemodiff bench` options). None: the defaults above, per the resolved sizes."""
    sizes: list[str] = dataclasses.field(default_factory=lambda: [AUTO])
    contexts: list[int] | None = None  # [] skips the forward table
    batches: list[int] | None = None
    prompt_len: int | None = None
    new_tokens: int | None = None  # AR
    modes: list[str] = dataclasses.field(default_factory=lambda: list(MODES))
    mode_new_tokens: int | None = None  # diffusion / linear_spec (32-token forwards: costlier)
    embedded: bool = False  # also run the embedded model (real weights) per mode
    attn: list[str] = dataclasses.field(default_factory=lambda: ["auto"])
    formats: list[str] = dataclasses.field(default_factory=lambda: ["bf16"])  # weights: bf16 | int8 | int4
    mesh: tuple[int, int] | None = None  # (data, model)
    out: str | None = "bench.json"
    md: str | None = None
    probe_bytes: int | None = None  # copy_limit's buffer (None: 2 GiB on a GPU, 64 MiB on a CPU)

    def resolved(self, platform_name: str) -> Settings:
        """Sizes with `auto` replaced and every None default filled in, for this platform."""
        auto = list(self.sizes) == [AUTO]
        if AUTO in self.sizes and not auto:
            raise ValueError(f"size {AUTO!r} stands alone, got {self.sizes}")
        cpu = platform_name == "cpu"
        sizes = ([EMBEDDED] if cpu else ["8B"]) if auto else list(self.sizes)
        defaults = CPU_DEFAULTS if (auto and cpu) else GPU_DEFAULTS
        for s in sizes:
            if s not in SIZE_CHOICES:
                raise ValueError(f"unknown size {s!r}: choose from {SIZE_CHOICES}")
        for a in self.attn:
            if a not in ATTN_IMPLS:
                raise ValueError(f"unknown attention impl {a!r}: choose from {ATTN_IMPLS}")
        for m in self.modes:
            if m not in E2E_MODES:
                raise ValueError(f"unknown mode {m!r}: choose from {E2E_MODES}")
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"unknown weight format {f!r}: choose from {FORMATS}")
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
        return dataclasses.replace(self, sizes=sizes, **filled)


# ------------------------------------------------------------------------------------------------ timing


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


def device_time(fn, *, reps: int, trials: int, warmup: int = 3) -> float:
    """Seconds per call of fn (returns a jax value): the median over `trials` of `reps` back-to-back
    dispatches timed as one (blocking once, on the last), so host dispatch hides behind device time."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / reps)
        del out
    return statistics.median(ts)


# ------------------------------------------------------------------------------------------------ HBM limit

# HBM bandwidth from the vendors' datasheets, TB/s. First entry whose substrings all occur in jax's device_kind
# (case-insensitive) wins, so the more specific names come first. None: the name does not say which memory.
DATASHEET_TBPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("GH200",), None),  # 96 GB HBM3 (4.0 TB/s) or 144 GB HBM3e (4.9 TB/s)
    (("GB200",), 8.0),
    (("B200",), 8.0),
    (("H200",), 4.8),
    (("H100", "PCIe"), 2.0),
    (("H100", "NVL"), 3.9),
    (("H100",), 3.35),  # SXM ("NVIDIA H100 80GB HBM3")
    (("A100", "80GB", "PCIe"), 1.935),
    (("A100", "80GB"), 2.039),  # SXM ("NVIDIA A100-SXM4-80GB")
    (("A100",), 1.555),  # 40GB, SXM or PCIe
    (("L40S",), 0.864),
    (("L40",), 0.864),
    (("RTX 4090",), 1.008),
    (("RTX 3090 Ti",), 1.008),
    (("RTX 3090",), 0.936),
)


def datasheet_bandwidth(device_kind: str) -> tuple[str | None, float | None]:
    """(matched key, bytes/s) for a device_kind; (None, None) when unknown (a CPU, an unlisted card)."""
    kind = device_kind.lower()
    for subs, tbps in DATASHEET_TBPS:
        if all(s.lower() in kind for s in subs):
            return " ".join(subs), (None if tbps is None else tbps * 1e12)
    return None, None


@dataclasses.dataclass(frozen=True)
class HbmLimit:
    """The roofline's denominator: the best measured probe (bytes/s) and the datasheet figure."""
    limit: float  # bytes/s, best measured probe
    winner: str
    probes: dict  # name -> bytes/s (copies count read + write, reads count the read)
    skipped: dict  # name -> why it did not count (not importable, GPU only, wrong result, implausible)
    datasheet: float | None  # bytes/s
    datasheet_key: str | None
    device: str
    probe_bytes: int

    def pct(self, floor_bytes: float, seconds: float) -> tuple[float, float | None]:
        """% of roofline for moving floor_bytes in `seconds`: (of the measured limit, of the datasheet)."""
        meas = 100 * floor_bytes / self.limit / seconds
        sheet = None if self.datasheet is None else 100 * floor_bytes / self.datasheet / seconds
        return meas, sheet

    def to_json(self) -> dict:
        return {"limit_GBps": self.limit / 1e9, "winner": self.winner,
                "probes_GBps": {k: v / 1e9 for k, v in self.probes.items()}, "skipped": self.skipped,
                "datasheet_GBps": None if self.datasheet is None else self.datasheet / 1e9,
                "datasheet_key": self.datasheet_key, "device": self.device, "probe_bytes": self.probe_bytes}


GPU_PROBE_BYTES = 2 << 30  # 2 GiB: ~35x the H200's 60 MB L2
CPU_PROBE_BYTES = 64 << 20


def _pallas_configs():
    """TMA copy variants timed (best counts): one CTA per SM at 2 tile sizes, and 2 CTAs per SM."""
    from nemodiff_jax.pallas_kernels.copy import CopyConfig, num_sms

    sms = num_sms()
    return {"pallas_tma_32KiBx6": CopyConfig(32 << 10, 6), "pallas_tma_64KiBx3": CopyConfig(64 << 10, 3),
            "pallas_tma_16KiBx6_2cta": CopyConfig(16 << 10, 6, num_ctas=2 * sms)}


def _bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


@jax.jit
def _bit_equal(a, b):
    return jnp.array_equal(_bits(a), _bits(b))


# Run in a child process: torch / cupy load their own CUDA libraries, which then never meet jax's in one process
# (and a crash there cannot take the bench down). Prints one JSON line: name -> {"GBps": ...} or {"error": ...}.
_VENDOR_PROBE = r"""
import json, statistics, sys
nbytes, reps, trials = map(int, sys.argv[1:4])
res = {}

def timed(copy, event, sync):
    for _ in range(3):
        copy()
    sync()
    ts = []
    for _ in range(trials):
        a, b = event(), event()
        a.record()
        for _ in range(reps):
            copy()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / reps)  # elapsed_time: milliseconds
    return ts

try:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ts = timed(lambda: dst.copy_(src), lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize)
    if not torch.equal(dst, src):
        raise RuntimeError("torch copy_ result differs from its source")
    res["torch_copy"] = {"GBps": 2 * nbytes / statistics.median(ts) / 1e9, "version": torch.__version__}
    del src, dst
    torch.cuda.empty_cache()
except Exception as e:
    res["torch_copy"] = {"error": (type(e).__name__ + ": " + str(e))[:300]}

try:
    import cupy
    src = cupy.random.standard_normal(nbytes // 4, dtype=cupy.float32)  # cupy has no bf16: same bytes
    dst = cupy.empty_like(src)

    class Ev:
        def __init__(self):
            self.e = cupy.cuda.Event()
        def record(self):
            self.e.record()
        def synchronize(self):
            self.e.synchronize()
        def elapsed_time(self, other):
            return cupy.cuda.get_elapsed_time(self.e, other.e)

    ts = timed(lambda: dst.data.copy_from_device_async(src.data, src.nbytes), Ev,
               cupy.cuda.Device().synchronize)
    if not bool((dst == src).all()):
        raise RuntimeError("cupy memcpy result differs from its source")
    res["cupy_memcpy"] = {"GBps": 2 * nbytes / statistics.median(ts) / 1e9, "version": cupy.__version__}
except Exception as e:
    res["cupy_memcpy"] = {"error": (type(e).__name__ + ": " + str(e))[:300]}
print(json.dumps(res))
"""


def _vendor_probes(nbytes: int, reps: int, trials: int) -> dict:
    """torch / cupy device copies where importable (optional: never dependencies), timed with CUDA events."""
    present = [m for m in ("torch", "cupy") if importlib.util.find_spec(m) is not None]
    if not present:
        return {"torch_copy": {"error": "torch not importable"}, "cupy_memcpy": {"error": "cupy not importable"}}
    try:
        proc = subprocess.run([sys.executable, "-P", "-c", _VENDOR_PROBE, str(nbytes), str(reps), str(trials)],
                              capture_output=True, text=True, timeout=240)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            err = f"probe process exit {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}"
            return {"torch_copy": {"error": err}, "cupy_memcpy": {"error": err}}
        return json.loads(lines[-1])
    except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
        return {"torch_copy": {"error": f"{type(e).__name__}: {e}"[:300]}}


def _jax_probes(nbytes: int, on_gpu: bool, reps: int, trials: int, probes: dict, skipped: dict):
    """copy_limit's in-process probes over one random bf16 buffer (freed on return), into probes / skipped."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.float32).astype(jnp.bfloat16)
    x = jax.block_until_ready(x)

    def probe(name, fn, moved, check=None):
        try:
            if check is not None:
                out = fn()
                if not bool(check(out)):
                    skipped[name] = "result differs from the source"
                    return
                del out
            probes[name] = moved / device_time(fn, reps=reps, trials=trials)
        except Exception as e:  # noqa: BLE001 - a probe this machine cannot run is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e)[:300]}"

    def same(out):  # a real copy: the source's bits in a buffer of its own
        return out.unsafe_buffer_pointer() != x.unsafe_buffer_pointer() and _bit_equal(out, x)

    if on_gpu:
        from nemodiff_jax.pallas_kernels.copy import copy_pallas

        for name, cfg in _pallas_configs().items():
            probe(name, functools.partial(copy_pallas, x, config=cfg), 2 * nbytes, same)
    else:
        skipped["pallas_tma"] = "GPU only (Mosaic GPU)"
    xla_copy = jax.jit(jnp.copy)
    probe("xla_copy", lambda: xla_copy(x), 2 * nbytes, same)
    scale = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    probe("xla_scale", lambda: scale(x), 2 * nbytes)
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    probe("xla_read", lambda: read(x), nbytes)
    w = x.reshape(4096, -1)
    v = jax.random.normal(jax.random.key(1), (1, 4096), jnp.float32).astype(jnp.bfloat16)
    gemv = jax.jit(lambda v, w: v @ w)
    probe("xla_gemv", lambda: gemv(v, w), nbytes)


def copy_limit(nbytes: int | None = None, *, device=None, vendor: bool = True) -> HbmLimit:
    """Measures, in this process, every device copy it can and a read-only stream, and takes the best as the
    achievable HBM bytes/s (named). Probes: the Pallas Mosaic GPU TMA copy (GPU only; several tilings),
    torch `dst.copy_(src)` and cupy's device memcpy (GPU, where importable; a child process, CUDA events),
    XLA's own copy (`jnp.copy`: a runtime memcpy), an XLA elementwise copy (x * c, a fused kernel), a read-only
    reduction and a decode-shaped GEMV. Copies count read + write, the others the bytes read. Random data (never
    zeros), warmed up, median of many on a GPU over a 2 GiB buffer (several times L2); small and quick on a CPU.
    A copy whose result differs from its source, or a rate above 1.1x the datasheet, is reported, not counted."""
    dev = device if device is not None else jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    on_gpu = dev.platform == "gpu"
    nbytes = nbytes or (GPU_PROBE_BYTES if on_gpu else CPU_PROBE_BYTES)
    if nbytes % (64 << 10):
        raise ValueError(f"probe size {nbytes} must be a multiple of 64 KiB")
    reps, trials = (10, 25) if on_gpu else (2, 3)
    key, sheet = datasheet_bandwidth(kind)
    probes, skipped = {}, {}

    with jax.default_device(dev):
        _jax_probes(nbytes, on_gpu, reps, trials, probes, skipped)

    if on_gpu and vendor:
        for name, r in _vendor_probes(nbytes, reps, trials).items():
            if "GBps" in r:
                probes[name] = r["GBps"] * 1e9
            else:
                skipped[name] = r.get("error", "no result")
    elif not on_gpu:
        skipped["torch_copy/cupy_memcpy"] = "GPU only"
    if sheet is not None:
        for name in [n for n, r in probes.items() if r > 1.1 * sheet]:
            skipped[name] = f"implausible: {probes.pop(name) / 1e9:.0f} GB/s > 1.1x the datasheet"
    if not probes:
        raise RuntimeError(f"no bandwidth probe ran: {skipped}")
    winner = max(probes, key=probes.get)
    limit = HbmLimit(probes[winner], winner, probes, skipped, sheet, key, kind, nbytes)
    print(json.dumps({"hbm_limit": limit.to_json()}), flush=True)
    return limit


# ------------------------------------------------------------------------------------------------ model


def size_config(name: str) -> Config:
    if name == EMBEDDED:
        from nemodiff_jax.embedded import ASSETS

        return Config.from_file(ASSETS / "config.json")
    return PRESETS[name]


def make_model(cfg: Config, mesh=None, fmt: str = "bf16") -> Transformer:
    """Random bf16 weights created on the device tensor by tensor (no host copy), straight into their
    shardings under a mesh; `fmt` int8 | int4 then quantizes the matmul weights on the device. One jit over the whole 8B init is a very slow XLA compile (seen: > 9 min on an
    H200); per-tensor draws compile per shape only."""
    abstract = abstract_model(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh) if mesh is not None else {}

    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape, sharding = tuple(var.shape), shardings.get(path)
        if len(shape) == 1:  # norm weights
            value = jnp.ones(shape, jnp.bfloat16, device=sharding)
        else:  # all leading dims as fan-in (o_proj [N, H, D]: N*H)
            scale = 1.0 if path == ("embed_tokens",) else float(np.prod(shape[:-1])) ** -0.5
            value = _drawer(shape, scale, sharding)(jax.random.key(i))
        var.set_value(value)
    model = nnx.merge(graphdef, state)
    if fmt != "bf16":
        model = quantize_weights(model, fmt)
        if mesh is not None:
            model = shard_model(model, mesh)  # the quantized weights into their own shardings
    if mesh is not None:
        model.matmul_impl = matmul_impl(mesh)
    return model


@functools.lru_cache(maxsize=None)
def _drawer(shape, scale, sharding):
    """One compiled draw per distinct (shape, scale, sharding): 14B init in seconds, not a compile per tensor."""
    return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16),
                   out_shardings=sharding)


def resolve_attn(impl: str, cfg: Config, mesh=None):
    """The attention impl the Generator would run for `impl` (bf16 weights): under a mesh per device
    (attention.mesh_impl); a forced path this device cannot run is a ValueError."""
    from nemodiff_jax.generate import attention_impl

    return attention_impl(cfg, jnp.bfloat16, impl, mesh)


def per_device_bytes(weight_bytes: int, kv: int, mesh=None) -> float:
    """Bytes one device streams per forward: its 1/TP of the weights, and of the KV cache also its 1/DP of the rows."""
    dp, tp = (mesh.shape["data"], mesh.shape["model"]) if mesh is not None else (1, 1)
    return weight_bytes / tp + kv / (tp * dp)


def weight_bytes_per_forward(cfg: Config) -> int:
    """Bytes a forward must stream: all layer weights + head + norms (the embedding is a row gather)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f + 2 * d
    return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * d + d)


def streamed_bytes(model: Transformer) -> int:
    """Bytes of weights a forward streams, as the model holds them (quantized or not): every parameter but the
    untied embedding table (a row gather)."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        if path == ("embed_tokens",) and model.diffusion_head is not None:
            continue
        total += v.nbytes if isinstance(v, quant.QWeight) else v.size * v.dtype.itemsize
    return total


def kv_bytes(cfg: Config, batch: int, slots: int) -> int:
    return 2 * 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim


# ------------------------------------------------------------------------------------------------ measurements


@functools.lru_cache(maxsize=None)
def _forward_loop(graphdef, t: int, causal: bool, attn_impl, n: int, compiler_options: tuple, chain: int = 0):
    """n forwards in one fori_loop, jitted once per setting (a repeat measurement reuses the compile).
    `chain` > 0: quadratic_spec's canvas of that chain (t = its width; its positions and mask)."""
    offsets, within = quadratic.canvas(chain)[:2] if chain else (None, None)
    opts = Options(mode="bench", attn_impl=attn_impl)

    @functools.partial(jax.jit, donate_argnums=(2,), compiler_options=dict(compiler_options) or None)
    def loop(params, tokens, cache):
        m = nnx.merge(graphdef, params)

        def body(i, carry):  # the decode loops' forward: cache written at each row's length, not advanced
            cache, acc = carry
            logits, cache = forward(m, tokens, cache, causal=causal, opts=opts, offsets=offsets, within=within)
            return cache, acc + logits[:, -1, 0]

        return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((tokens.shape[0],), jnp.float32)))

    return loop


def bench_forward(model, cfg, batch, ctx, t, causal, attn_impl="xla", n=16, warmup=2, iters=5,
                  compiler_options=None, info=None, mesh=None, chain=0):
    """Device time of one forward at chunk size t over a cache holding ctx tokens: n forwards in one
    on-device fori_loop (cache carried and donated), so host dispatch is not measured. `chain` > 0: a
    quadratic_spec round's canvas (t must be its width)."""
    graphdef, params = nnx.split(model)
    capacity = ctx + max(64, t)
    loop = _forward_loop(graphdef, t, causal, attn_impl, n, tuple(sorted((compiler_options or {}).items())),
                         chain)
    cache = KVCache.init(cfg, batch, capacity, jnp.bfloat16, lengths=jnp.full((batch,), ctx, jnp.int32),
                         sharding=cache_sharding(cfg, batch, mesh))
    tokens = jnp.ones((batch, t), jnp.int32)
    state = {"cache": cache}

    def run():
        state["cache"], acc = loop(params, tokens, state["cache"])
        state["acc"] = acc.block_until_ready()

    dt = timeit(run, warmup=warmup, iters=iters) / n
    if info is not None:  # the summed logits of the last loop: variants of one model must agree
        info["acc"] = np.asarray(state["acc"])
    return dt


def bench_e2e(model, cfg, batch, prompt_len, new_tokens, mode="ar", attn_impl="auto", reps=3, mesh=None):
    """End-to-end on-device decode loop of one mode (prefill excluded), mode defaults as the Generator's:
    tokens/s, forwards, ms per forward, compile seconds. With random weights diffusion and linear_spec
    commit about one token per forward (worst case): their tokens/s is a floor, their ms per forward is real.
    mode may also be one of MODE_VARIANTS."""
    from nemodiff_jax.generate import MODE_OPTIONS, decoding_options
    from nemodiff_jax.slots import MODES as DECODERS
    from nemodiff_jax.slots import chunk_width, draft_width, round_up

    graphdef, params = nnx.split(model)
    base, options = MODE_VARIANTS.get(mode, (mode, {}))
    opts = decoding_options(cfg, base, options, attn_impl)
    step = DECODERS[base].step
    capacity = round_up(prompt_len + new_tokens + 2 * cfg.block_size + chunk_width(opts) + 64, 128)

    def fresh():
        cache = KVCache.init(cfg, batch, capacity, jnp.bfloat16, sharding=cache_sharding(cfg, batch, mesh),
                             lengths=jnp.full((batch,), prompt_len, jnp.int32))
        keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
        first = jnp.full((batch,), 5, jnp.int32)
        threshold = MODE_OPTIONS[base].get("threshold", 0.0)  # the Generator's defaults, no stop ids
        rows = RowSettings.make([new_tokens] * batch, [0.0] * batch, [None] * batch, [None] * batch, [()] * batch,
                                [threshold] * batch, [opts.block] * batch)
        return initial_state(cache, new_tokens + 2 * cfg.block_size, keys, rows, None, first, draft_width(opts))

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
    return {"mode": mode, "deterministic": bool(opts.deterministic), "tokens_per_s": emitted / dt,
            "forwards": forwards, "rounds": rounds,
            "ms_per_forward": 1e3 * dt / forwards, "ms_per_round": 1e3 * dt / max(rounds, 1),
            "tokens_per_forward": emitted / batch / forwards,
            "tokens_crc32": zlib.crc32(tokens.astype(np.int32).tobytes()),  # same tokens across runs/meshes?
            "compile_s": compile_s}


def _roof(row: dict, prefix: str, hbm: HbmLimit, floor_bytes: float, seconds: float):
    meas, sheet = hbm.pct(floor_bytes, seconds)
    row[prefix + "roofline_pct"] = meas  # of the measured limit (hbm.winner)
    row[prefix + "roofline_pct_datasheet"] = sheet  # of the datasheet figure (None: unknown device)


def bench_size(name: str, settings: Settings, hbm: HbmLimit, mesh=None, save=lambda res: None) -> dict:
    """Forward table and end-to-end rows for one size; `settings` resolved (Settings.resolved)."""
    s = settings
    cfg = size_config(name)
    impls = {i: resolve_attn(i, cfg, mesh) for i in s.attn}  # a path that cannot run fails here, before any work
    res = {"size": name, "weight_bytes": weight_bytes_per_forward(cfg), "formats": {}, "forward": [], "e2e": []}
    for fmt in s.formats:
        _bench_format(res, name, cfg, fmt, s, hbm, impls, mesh, save)
    return res


def _bench_format(res, name, cfg, fmt, s, hbm, impls, mesh, save):
    t = time.perf_counter()
    model = make_model(cfg, mesh, fmt)
    jax.block_until_ready(nnx.state(model))
    weight_bytes = streamed_bytes(model)
    stats = jax.devices()[0].memory_stats() or {}  # what the allocator holds now: the model (and its KV-free state)
    res["formats"][fmt] = {"init_s": time.perf_counter() - t, "weight_bytes": weight_bytes,
                           "device_bytes_in_use": stats.get("bytes_in_use")}
    for ctx, impl in ((c, i) for i in s.attn for c in s.contexts):
        row = {"format": fmt, "context": ctx, "attn": impl}
        for t_chunk, causal, key in ((1, True, "t1"), (32, True, "t32_causal"), (32, False, "t32_bidir")):
            dt = bench_forward(model, cfg, 1, ctx, t_chunk, causal, attn_impl=impls[impl], mesh=mesh)
            row[key + "_ms"] = 1e3 * dt
        streamed = per_device_bytes(weight_bytes, kv_bytes(cfg, 1, ctx + 64), mesh)
        row["floor_ms"] = 1e3 * streamed / hbm.limit
        _roof(row, "t1_", hbm, streamed, row["t1_ms"] / 1e3)
        row["t32_over_t1"] = row["t32_causal_ms"] / row["t1_ms"]
        row["linear_spec_round_in_ar_forwards"] = (row["t32_bidir_ms"] + row["t32_causal_ms"]) / row["t1_ms"]
        chain = quadratic.DEFAULT_CHAIN
        dt = bench_forward(model, cfg, 1, ctx, quadratic.width(chain), True, attn_impl=impls[impl], mesh=mesh,
                           chain=chain)
        row["quadratic_round_ms"] = 1e3 * dt
        row["quadratic_round_in_ar_forwards"] = row["quadratic_round_ms"] / row["t1_ms"]
        res["forward"].append(row)
        save(res)
        print(json.dumps({name: row}), flush=True)
    for mode, b, impl in ((m, b, i) for i in s.attn for m in s.modes for b in s.batches):
        ar = MODE_VARIANTS.get(mode, (mode,))[0] == "ar"
        new = s.new_tokens if ar else s.mode_new_tokens
        r = bench_e2e(model, cfg, b, s.prompt_len, new, mode=mode, attn_impl=impls[impl], mesh=mesh)
        r["format"], r["batch"], r["attn"] = fmt, b, impl
        if ar:
            floor = per_device_bytes(weight_bytes, kv_bytes(cfg, b, s.prompt_len + new + 64), mesh)
            _roof(r, "", hbm, floor, r["ms_per_forward"] / 1e3)
        res["e2e"].append(r)
        save(res)
        print(json.dumps({name: r}), flush=True)
    del model


def bench_embedded() -> list[dict]:
    """The embedded model (real weights) per mode: batch 1, 128 new tokens, bf16."""
    from nemodiff_jax.embedded import DEMO_PROMPTS, default_model
    from nemodiff_jax.generate import load

    gen = load(default_model(), dtype="bfloat16", progress=False)
    rows = []
    for mode in MODES:
        t = time.perf_counter()
        gen.generate(DEMO_PROMPTS[:1], mode=mode, max_new_tokens=128)
        compile_s = time.perf_counter() - t
        r = gen.generate(DEMO_PROMPTS[:1], mode=mode, max_new_tokens=128)[0]
        row = {"mode": mode, "compile_s": compile_s, **{k: v for k, v in r.stats.items() if k != "mode"}}
        rows.append(row)
        print(json.dumps({"embedded": row}), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report


def _pct2(meas, sheet) -> str:
    return f"{meas:.0f}% / {'-' if sheet is None else f'{sheet:.0f}%'}"


def markdown(report: dict) -> str:
    h = report["hbm"]
    sheet = (f"{h['datasheet_GBps']:.0f} GB/s ({h['datasheet_key']})" if h["datasheet_GBps"] is not None
             else "unknown for this device")
    lines = [f"Card: {report['device']}; JAX {report['jax']}; {report['date']}; mesh {report['mesh']}.", "",
             f"HBM limit (roofline denominator): **{h['limit_GBps']:.0f} GB/s**, best measured probe "
             f"`{h['winner']}`; datasheet {sheet}. Probes over {h['probe_bytes'] / 2**20:.0f} MiB of random bf16 "
             "(copies count read + write):", "", "| probe | GB/s |", "|---|---|"]
    for name, gbps in sorted(h["probes_GBps"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {gbps:.0f} |")
    for name, why in h["skipped"].items():
        lines.append(f"| {name} | not counted: {why[:120]} |")
    lines += ["", "% roofline: of the measured limit / of the datasheet.", ""]
    for s in report["sizes"]:
        streamed = ", ".join(f"{f} {v['weight_bytes'] / 1e9:.2f} GB" for f, v in s.get("formats", {}).items())
        lines += [f"**{s['size']}** (random weights; streamed per forward: {streamed})"]
        if s["forward"]:
            lines += ["", "| weights | attn | context | T=1 ms | floor ms | % roofline | T=32 causal ms | T=32/T=1 | "
                      "T=32 bidir ms | linear_spec round (AR fwds) | quadratic_spec round, chain 8 (AR fwds) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["forward"]:
            lines.append(f"| {r.get('format', 'bf16')} | {r['attn']} | {r['context']} | {r['t1_ms']:.2f} | "
                         f"{r['floor_ms']:.2f} | "
                         f"{_pct2(r['t1_roofline_pct'], r['t1_roofline_pct_datasheet'])} | "
                         f"{r['t32_causal_ms']:.2f} | {r['t32_over_t1']:.2f} | {r['t32_bidir_ms']:.2f} | "
                         f"{r['linear_spec_round_in_ar_forwards']:.2f} | "
                         f"{r.get('quadratic_round_in_ar_forwards', float('nan')):.2f} |")
        lines += ["", "| weights | mode | attn | batch | tok/s | ms/forward | forwards | tokens/forward | % roofline | "
                  "compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["e2e"]:
            roof = _pct2(r["roofline_pct"], r["roofline_pct_datasheet"]) if "roofline_pct" in r else ""
            lines.append(f"| {r.get('format', 'bf16')} | {r['mode']} | {r['attn']} | {r['batch']} | "
                         f"{r['tokens_per_s']:.1f} | "
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


def run(settings: Settings) -> dict:
    """The whole bench: HBM limit, then every size, then (optionally) the embedded model. Returns the report
    (also written to settings.out as JSON after every measurement, and as markdown to settings.md)."""
    dev = jax.devices()[0]
    s = settings.resolved(dev.platform)
    mesh = make_mesh(*s.mesh) if s.mesh is not None else None
    hbm = copy_limit(s.probe_bytes, device=dev)
    report = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "host": platform.node(),
              "bandwidth_GBps": hbm.limit / 1e9, "hbm": hbm.to_json(),
              "mesh": list(s.mesh) if s.mesh is not None else None, "devices": jax.device_count(),
              "settings": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("out", "md")},
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "sizes": []}
    out = Path(s.out) if s.out else None

    def save(res=None):  # rewritten after every measurement: a run cut short keeps what it measured
        if out is None:
            return
        sizes = report["sizes"] + ([res] if res is not None else [])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**report, "sizes": sizes}, indent=2))
        tmp.replace(out)

    save()
    for name in s.sizes:
        report["sizes"].append(bench_size(name, s, hbm, mesh, save))
    if s.embedded:
        report["embedded"] = bench_embedded()
    save()
    md = markdown(report)
    if s.md:
        Path(s.md).write_text(md)
    print(md)
    return report
