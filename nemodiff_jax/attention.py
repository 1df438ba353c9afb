"""The one attention entry point. It owns the mask semantics; `pallas_kernels/` owns speed.

Chunk attention over a KV cache (prefill, AR step, denoise, draft, verify, commit): the chunk's K/V are
already written at each row's `[length, length+T)`, so query j of a row sees cache slot s iff
    s < length + j + 1   (causal, "bottom-right" aligned), or
    s < length + T       (bidirectional: cache + the whole chunk).
Shapes: B batch, T chunk, S cache capacity, N query heads, K kv heads, G = N/K, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def chunk_mask(lengths: jax.Array, t: int, s: int, causal: bool) -> jax.Array:
    """bool [B, T, S]: which cache slots each chunk query may attend to."""
    limit = lengths[:, None] + (jnp.arange(1, t + 1) if causal else jnp.full((t,), t))[None, :]  # [B, T]
    return jnp.arange(s)[None, None, :] < limit[:, :, None]


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


IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ShardedPallas:
    """The Pallas kernel under a mesh: a pallas_call is one device's program, so it runs inside shard_map with
    rows over "data" and heads over "model" (query head groups stay with their kv head: both are split into
    the same number of contiguous blocks). Needs batch % data == 0 and kv heads % model == 0."""

    mesh: Mesh
    # CPU tests of the partitioning: run the kernel file's pure-jnp reference per device instead of the kernel
    # (the Mosaic GPU interpreter keeps global state and cannot run several fake devices at once)
    reference: bool = False


def pallas_supported(q: jax.Array, k_cache: jax.Array) -> bool:
    """The Mosaic GPU kernel's domain: a Hopper-class GPU, 16-bit inputs, capacity a multiple of the TMA row
    tile and at least one KV block (the kernel's own limits), head_dim 64 or 128."""
    if jax.default_backend() != "gpu":
        return False
    from nemodiff_jax.pallas_kernels.chunk_attention import TMA_ROWS, BlockSizes  # Mosaic GPU only on a GPU

    s = k_cache.shape[1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cache.dtype == q.dtype and s % TMA_ROWS == 0
            and s >= BlockSizes().block_kv and q.shape[-1] in (64, 128))


def chunk_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                    causal: bool, impl: str | ShardedPallas = "auto") -> jax.Array:
    """q [B,T,N,H] over the layer's cache [B,S,K,H] (chunk already written) with per-row lengths [B].

    impl: "xla" (the reference; CPU and any device), "pallas" (pallas_kernels/chunk_attention.py: reads only
    up to each row's length + T, scores stay on chip; 4-7x faster than "xla" on an H200, see
    docs/PERFORMANCE.md), "auto" = pallas where supported, else xla."""
    if isinstance(impl, ShardedPallas):
        return _sharded_pallas(q, k_cache, v_cache, lengths, causal, impl)
    if impl == "auto":
        impl = "pallas" if pallas_supported(q, k_cache) else "xla"
    if impl == "xla":
        mask = chunk_mask(lengths, q.shape[1], k_cache.shape[1], causal)
        return sdpa(q, k_cache, v_cache, mask)
    if impl == "pallas":
        from nemodiff_jax.pallas_kernels.chunk_attention import chunk_attention_pallas  # Mosaic GPU only when used

        return chunk_attention_pallas(q, k_cache, v_cache, lengths, causal=causal)
    raise ValueError(f"unknown attention impl {impl!r}; choose from {IMPLS}")


def _sharded_pallas(q, k_cache, v_cache, lengths, causal: bool, impl: ShardedPallas):
    from nemodiff_jax.pallas_kernels.chunk_attention import chunk_attention_reference

    def per_device(q, k, v, lens):
        if impl.reference:
            return chunk_attention_reference(q, k, v, lens, causal=causal)
        return chunk_attention(q, k, v, lens, causal=causal, impl="auto")  # the kernel where it applies

    heads = P("data", None, "model", None)
    kernel = jax.shard_map(per_device, mesh=impl.mesh, in_specs=(heads, heads, heads, P("data")),
                           out_specs=heads, check_vma=False)
    return kernel(q, k_cache, v_cache, lengths)
