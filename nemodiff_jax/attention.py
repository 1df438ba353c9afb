"""The one attention entry point. It owns the mask semantics; `pallas_kernels/` owns speed.

Chunk attention over a KV cache (prefill, AR step, denoise, draft, verify, commit): the chunk's K/V are
already written at each row's `[length, length+T)`, so query j of a row sees cache slot s iff
    s < length + j + 1   (causal, "bottom-right" aligned), or
    s < length + T       (bidirectional: cache + the whole chunk), or
    s < length or within[j, s - length]   (a structured chunk: `within` [T, T], static, e.g. the
                                           quadratic_spec canvas; the cache is seen whole).
Shapes: B batch, T chunk, S cache capacity, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def chunk_mask(lengths: jax.Array, t: int, s: int, causal: bool) -> jax.Array:
    """bool [B, T, S]: which cache slots each chunk query may attend to."""
    limit = lengths[:, None] + (jnp.arange(1, t + 1) if causal else jnp.full((t,), t))[None, :]  # [B, T]
    return jnp.arange(s)[None, None, :] < limit[:, :, None]


def within_mask(lengths: jax.Array, within: np.ndarray, s: int) -> jax.Array:
    """bool [B, T, S]: the cache before each row's length, and the chunk at [length, length+T) as `within`
    [T, T] (query j sees chunk slot i iff within[j, i]) allows."""
    t = within.shape[0]
    rel = jnp.arange(s)[None, :] - lengths[:, None]  # [B, S]: slot index within the chunk
    inside = jnp.asarray(within)[:, jnp.clip(rel, 0, t - 1)]  # [T, B, S]
    inside = jnp.transpose(inside, (1, 0, 2)) & ((rel >= 0) & (rel < t))[:, None, :]
    return (rel < 0)[:, None, :] | inside


def sdpa(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference GQA attention. q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> [B,T,N,H] (q's dtype).

    Scores and softmax in float32; kv head j serves query heads jG..jG+G-1 (HF repeat_kv order)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


IMPLS = ("auto", "xla", "pallas", "cudnn")


# ------------------------------------------------------------------------------------------ which path runs
#
# One table decides, by capability: device x dtype x head_dim x shape -> "pallas" | "cudnn" | "xla".
#
#   path    runs on                                 dtype      head_dim            shape
#   pallas  CUDA, compute capability 9.x (Hopper:   bf16/f16   64, 128             capacity % 8 == 0 and
#           wgmma + TMA; Mosaic GPU)                                               >= one KV block (64)
#   cudnn   CUDA, compute capability >= 8.0         bf16/f16   <= 128 (<= 256 from any (kv lengths for
#           (cuDNN flash attention; CC 10.3 needs              9.0 on), % 8        T=1 and bidirectional,
#           cuDNN >= 9.11)                                                         a mask for causal T>1)
#   xla     everywhere (the reference)              any        any                 any
#
# "auto" takes the first path that runs and pays: pallas wherever it runs (1.1-7.5x the XLA path, up to 14x
# cuDNN on an H200); else cuDNN where it beat XLA on the H200 (docs/PERFORMANCE.md, 2026-12-01 attention table): every
# T=1 step (1.2-3.7x), 32-token chunks at batch >= 8 (1.4-2.8x), and bidirectional chunks over short caches
# (1.3x at 1024 slots, a tie at 4096; causal chunks carry a [B,1,T,S] mask, since cuDNN cannot align its causal
# mask bottom-right, and lose to XLA at batch 1); otherwise XLA. ROCm, TPU, CPU and pre-Ampere GPUs take XLA.
# A structured chunk (`within`, quadratic_spec's canvas) follows its own rule: the canvas of a chain in
# KERNEL_CANVAS_CHAINS goes to the Pallas kernel where it runs (it computes that mask itself; measured on an H100,
# 2026-12-07: a chain-8 round 1.19 / 1.26 AR forwards at 1K / 4K cached tokens, cuDNN with a bias 1.26 / 1.66);
# any other table, chain or device goes to cuDNN with the mask as a bias where cuDNN runs, else XLA.

CUDNN_BATCH = 8  # from this batch on, cuDNN beat XLA on every measured T=32 chunk
CUDNN_BIDIR_CAPACITY = 2048  # ... and bidirectional chunks up to this capacity at any batch
KERNEL_CANVAS_CHAINS = (2, 4, 8, 16, 32)  # canvases "auto" gives the kernel: the chains its GPU tests passed
#                                          (H100, 2026-12-07; a forced "pallas" takes any chain)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the attention table needs to know of a device (tests build fake ones)."""

    platform: str  # "cuda", "rocm", "cpu", "tpu", ...
    kind: str  # jax's device_kind, e.g. "NVIDIA H200"
    compute_capability: tuple[int, int] | None = None  # CUDA only
    cudnn_version: int | None = None  # e.g. 91100 for 9.11; None: unknown

    @classmethod
    def of(cls, device=None) -> "DeviceInfo":
        """The description of a jax device (default: the first of the default backend)."""
        return _describe(jax.devices()[0] if device is None else device)

    def __str__(self):
        cc = f", compute capability {self.compute_capability[0]}.{self.compute_capability[1]}" \
            if self.compute_capability else ""
        return f"{self.kind} ({self.platform}{cc})"


@functools.lru_cache(maxsize=None)
def _describe(device) -> DeviceInfo:
    platform, cc, cudnn = device.platform, None, None
    if platform == "gpu":  # jax names CUDA and ROCm devices alike; the client says which
        platform = "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    if platform == "cuda":
        cc = tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
        cudnn = _cudnn_version()
    return DeviceInfo(platform, device.device_kind, cc, cudnn)


def _cudnn_version() -> int | None:
    try:
        from jax._src.lib import cuda_versions  # not public: the version is a nicety for one rule

        return int(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001
        return None


def why_not(path: str, device: DeviceInfo, dtype, head_dim: int, capacity: int) -> str | None:
    """Why `path` cannot run these inputs on `device`, or None when it can."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    cc = device.compute_capability
    if path == "xla":
        return None
    if path == "pallas":
        from nemodiff_jax.pallas_kernels.chunk_attention import TMA_ROWS, BlockSizes

        block_kv = BlockSizes().block_kv
        if device.platform != "cuda" or cc is None or cc[0] != 9:
            return "the Mosaic GPU kernel uses Hopper instructions (wgmma, TMA): CUDA compute capability 9.x only"
        if not half:
            return f"the kernel takes bfloat16/float16, got {jnp.dtype(dtype).name}"
        if head_dim not in (64, 128):
            return f"the kernel takes head_dim 64 or 128, got {head_dim}"
        if capacity % TMA_ROWS or capacity < block_kv:
            return f"cache capacity {capacity} must be a multiple of {TMA_ROWS} and >= {block_kv}"
        return None
    if path == "cudnn":
        if device.platform != "cuda" or cc is None or cc < (8, 0):
            return "cuDNN flash attention needs a CUDA GPU of compute capability >= 8.0"
        if cc == (10, 3) and device.cudnn_version is not None and device.cudnn_version < 91100:
            return f"compute capability 10.3 needs cuDNN >= 9.11, found {device.cudnn_version}"
        if not half:
            return f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype).name}"
        h_max = 256 if cc >= (9, 0) else 128
        if head_dim > h_max or head_dim % 8:
            return f"cuDNN flash attention takes head_dim <= {h_max} and a multiple of 8 here, got {head_dim}"
        return None
    raise ValueError(f"unknown attention impl {path!r}; choose from {IMPLS}")


def choose_impl(device: DeviceInfo, dtype, head_dim: int, batch: int, t: int, capacity: int,
                causal: bool) -> str:
    """The path "auto" takes (the table above)."""
    if why_not("pallas", device, dtype, head_dim, capacity) is None:
        return "pallas"
    if why_not("cudnn", device, dtype, head_dim, capacity) is None:
        if t == 1 or batch >= CUDNN_BATCH or (not causal and capacity <= CUDNN_BIDIR_CAPACITY):
            return "cudnn"
    return "xla"


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Attention under a mesh: one device's program (the kernel, cuDNN or XLA, as the table picks for the
    per-device shapes) inside shard_map, rows over "data" and heads over "model" (query head groups stay with
    their kv head: both split into the same number of contiguous blocks). Needs kv heads % model == 0."""

    mesh: Mesh
    impl: str = "auto"  # the per-device path: "auto" or a forced one
    # CPU tests of the partitioning: run the Pallas kernel file's pure-jnp reference per device instead of the
    # kernel (the Mosaic GPU interpreter keeps global state and cannot run several fake devices at once)
    reference: bool = False


def mesh_impl(mesh: Mesh, num_kv_heads: int, impl: str = "auto", reference: bool = False):
    """The attention impl under a mesh: per device (Sharded) where the kv heads split evenly over "model" and
    some device of the mesh has a faster path than XLA; otherwise the XLA path, which the SPMD partitioner
    splits by itself. A forced path that cannot split is an error."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose from {IMPLS}")
    splits = num_kv_heads % mesh.shape["model"] == 0
    if impl not in ("auto", "xla") and not splits:
        raise ValueError(f"attention impl {impl!r} under a mesh needs the {num_kv_heads} kv heads to split "
                         f"evenly over the {mesh.shape['model']} model devices")
    fast = any(DeviceInfo.of(d).platform == "cuda" for d in mesh.devices.flat)
    if splits and (reference or impl not in ("auto", "xla") or fast):
        return Sharded(mesh, impl, reference)
    return "xla"


def chunk_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                    causal: bool, impl: str | Sharded = "auto", device: DeviceInfo | None = None,
                    within: np.ndarray | None = None) -> jax.Array:
    """q [B,T,N,H] over the layer's cache [B,S,K,H] (chunk already written) with per-row lengths [B].

    impl: "xla" (the reference; any device), "pallas" (pallas_kernels/chunk_attention.py: reads only up to
    each row's length + T, scores stay on chip), "cudnn" (jax.nn.dot_product_attention's cuDNN flash
    attention), "auto" (the table above, for `device`, default the first jax device), or a Sharded (under a
    mesh). A forced path that cannot run here is a ValueError naming the device and the reason.
    `within` [T, T] (static numpy bool) replaces `causal` inside the chunk (module doc). The Pallas kernel
    computes one such mask itself, quadratic_spec's canvas (its `chain`), and takes it when forced ("pallas")
    or, for the chains in KERNEL_CANVAS_CHAINS, under "auto" where the kernel runs (the table above). Any other
    table, or no kernel, takes cuDNN (the mask as a bias) where it runs, else XLA."""
    if isinstance(impl, Sharded):
        return _sharded(q, k_cache, v_cache, lengths, causal, impl, within)
    device = DeviceInfo.of() if device is None else device
    b, t, _, h = q.shape
    s = k_cache.shape[1]
    chain = 0  # > 0: `within` is the canvas the kernel computes itself
    if within is not None:
        if within.shape != (t, t):
            raise ValueError(f"within mask {within.shape} does not match the chunk of {t} queries")
        kernel = impl == "pallas" or (impl == "auto" and why_not("pallas", device, q.dtype, h, s) is None)
        chain = _canvas_chain(within) if kernel else 0
        if impl == "auto" and chain in KERNEL_CANVAS_CHAINS:
            impl = "pallas"
        if impl == "auto" or (impl == "pallas" and not chain):  # the next path that runs
            impl = "cudnn" if why_not("cudnn", device, q.dtype, h, s) is None else "xla"
    if impl == "auto":
        impl = choose_impl(device, q.dtype, h, b, t, s, causal)
    elif (reason := why_not(impl, device, q.dtype, h, s)) is not None:
        raise ValueError(f"attention impl {impl!r} cannot run on {device}: {reason}")
    if impl == "xla":
        mask = chunk_mask(lengths, t, s, causal) if within is None else within_mask(lengths, within, s)
        return sdpa(q, k_cache, v_cache, mask)
    if impl == "pallas":
        from nemodiff_jax.pallas_kernels.chunk_attention import chunk_attention_pallas  # Mosaic GPU only when used

        return chunk_attention_pallas(q, k_cache, v_cache, lengths, causal=causal, chain=chain)
    return cudnn_chunk_attention(q, k_cache, v_cache, lengths, causal=causal, within=within)


def _canvas_chain(within: np.ndarray) -> int:
    """J if `within` is quadratic_spec's canvas of a J-chain (the one table the Pallas kernel computes), else 0."""
    t = within.shape[0]
    j = int(round((math.sqrt(4 * t + 1) - 1) / 2))
    if j < 1 or j * (j + 1) != t:
        return 0
    from nemodiff_jax.pallas_kernels.chunk_attention import canvas_within  # Mosaic GPU only when used

    return j if np.array_equal(within, canvas_within(j)) else 0


def cudnn_chunk_attention(q, k_cache, v_cache, lengths, *, causal: bool, implementation: str = "cudnn",
                          within: np.ndarray | None = None):
    """The chunk semantics through cuDNN flash attention: every row's keys end at length + T (kv lengths:
    cuDNN skips the rest); a causal chunk of T > 1 also needs its bottom-right causal mask, which cuDNN's own
    (top-left) causal mode cannot express, so it goes in as a mask (cuDNN adds it as a bias), as does a
    `within` chunk. `implementation="xla"` runs the same call through jax's XLA path (CPU tests of these
    arguments)."""
    t, s = q.shape[1], k_cache.shape[1]
    kv_lengths = (lengths + t).astype(jnp.int32)
    if within is not None:
        mask = within_mask(lengths, within, s)[:, None]
    else:
        mask = chunk_mask(lengths, t, s, True)[:, None] if causal and t > 1 else None  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask, key_value_seq_lengths=kv_lengths,
                                        implementation=implementation)


def _sharded(q, k_cache, v_cache, lengths, causal: bool, impl: Sharded, within=None):
    from nemodiff_jax.pallas_kernels.chunk_attention import chunk_attention_reference

    def per_device(q, k, v, lens):
        if impl.reference and within is None:
            return chunk_attention_reference(q, k, v, lens, causal=causal)
        # the table per device (the reference of a structured chunk: the XLA path, which has no kernel state)
        return chunk_attention(q, k, v, lens, causal=causal, impl="xla" if impl.reference else impl.impl,
                               within=within)

    heads = P("data", None, "model", None)
    kernel = jax.shard_map(per_device, mesh=impl.mesh, in_specs=(heads, heads, heads, P("data")),
                           out_specs=heads, check_vma=False)
    return kernel(q, k_cache, v_cache, lengths)
