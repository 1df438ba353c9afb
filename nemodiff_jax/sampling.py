"""Token choice: greedy / temperature (Gumbel-max) / top-k / top-p, confidence, unmask policies.

Randomness is per row and per event: the key for a draw is `fold_in(fold_in(row_key, stream), counter)`,
where `counter` is a row-local quantity (a position, or the row's own pass count). A row's output therefore
depends only on its own seed and prompt, never on which other rows share the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-call sampling settings. temperature/top_p are traced; top_k is static (a shape)."""

    temperature: jax.Array  # [] float32; 0 = greedy
    top_p: jax.Array  # [] float32; 1 = off
    top_k: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampling:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p), top_k)


def row_keys(key_rows: jax.Array, stream: int, counter: jax.Array) -> jax.Array:
    """[B] keys for one draw: row key x stream id x row-local counter [B]."""
    return jax.vmap(lambda k, c: jax.random.fold_in(jax.random.fold_in(k, stream), c))(key_rows, counter)


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Applies top-k then top-p to float32 logits [..., V] (masked entries -> -inf)."""
    if s.top_k is not None:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)

    def nucleus(lg):
        t = jnp.maximum(s.temperature, 1e-6)
        sorted_lg = jnp.sort(lg, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_lg / t, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < s.top_p, sorted_lg, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(lg < cutoff, NEG_INF, lg)

    return jax.lax.cond(s.top_p < 1.0, nucleus, lambda lg: lg, logits)


def choose(logits: jax.Array, keys: jax.Array, s: Sampling, exclude: int | None = None) -> jax.Array:
    """Token ids [B, T] from float32 logits [B, T, V]: argmax at temperature 0, else a draw from
    softmax(filtered logits / T) by the Gumbel-max trick (keys: [B], one per row)."""
    if exclude is not None:
        logits = logits.at[..., exclude].set(NEG_INF)

    def sampled(lg):
        lg = filter_logits(lg, s)
        g = jax.vmap(lambda k, x: jax.random.gumbel(k, x.shape, jnp.float32))(keys, lg)
        return jnp.argmax(lg / s.temperature + g, axis=-1).astype(jnp.int32)

    return jax.lax.cond(s.temperature > 0, sampled, lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32), logits)


def confidence(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Probability of `tokens` under the untempered softmax of the full vocabulary (mask id included)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
