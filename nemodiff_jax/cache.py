"""The KV cache: fixed capacity, one buffer per layer, independent per-row lengths.

The write/advance rule (DESIGN §3): every forward writes its chunk's K/V at each row's `[length, length+T)`;
only `advance(counts)` makes them part of the committed prefix. A pass that is not advanced ("peek": a
diffusion denoise step or a speculative draft) is overwritten by the next pass, so the cache is never copied,
concatenated or cropped by value: cropping is setting the lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nemodiff_jax.config import Config


class CacheOverflowError(ValueError):
    """A write would run past the cache capacity."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    lengths: jax.Array  # [B] int32: committed tokens per row

    @classmethod
    def init(cls, cfg: Config, batch: int, capacity: int, dtype=jnp.bfloat16,
             lengths: jax.Array | None = None, sharding=None) -> KVCache:
        """Zeroed buffers; `sharding` (a NamedSharding for [B, S, K, H]) places them on a mesh."""
        shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)

        def buf():
            x = jnp.zeros(shape, dtype)
            return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

        k = tuple(buf() for _ in range(cfg.num_layers))
        v = tuple(buf() for _ in range(cfg.num_layers))
        if lengths is None:
            lengths = jnp.zeros((batch,), jnp.int32)
        return cls(k=k, v=v, lengths=jnp.asarray(lengths, jnp.int32))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def advance(self, counts: jax.Array) -> KVCache:
        """Commits `counts[B]` more tokens per row (the K/V the last forward wrote)."""
        return dataclasses.replace(self, lengths=self.lengths + jnp.asarray(counts, jnp.int32))

    def crop(self, lengths: jax.Array) -> KVCache:
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))

    def with_layer(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        ks, vs = list(self.k), list(self.v)
        ks[layer], vs[layer] = k, v
        return dataclasses.replace(self, k=tuple(ks), v=tuple(vs))

    def check_fits(self, chunk: int) -> None:
        """Host-side capacity check; a no-op under tracing (jitted loops check their bounds before launch)."""
        if isinstance(self.lengths, jax.core.Tracer):
            return
        longest = int(np.max(np.asarray(self.lengths))) if self.batch else 0
        if longest + chunk > self.capacity:
            raise CacheOverflowError(
                f"KV cache overflow: a row holds {longest} tokens, writing {chunk} more needs "
                f"{longest + chunk} > capacity {self.capacity}")


def write_chunk(buf: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """buf [B, S, K, H] <- new [B, T, K, H] at rows' [length, length+T). Out-of-range slots are dropped,
    never wrapped or clamped onto committed entries (the loops' bounds make that unreachable)."""
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    cols = lengths[:, None] + jnp.arange(t)[None, :]
    return buf.at[rows, cols].set(new.astype(buf.dtype), mode="drop")
