"""Token choice: greedy / temperature (Gumbel-max) / top-k / top-p, confidence, unmask policies.

Randomness is per row and per event: the key for a draw is `fold_in(fold_in(row_key, stream), counter)`,
where `counter` is a row-local quantity (a position, or the row's own pass count). A row's output therefore
depends only on its own seed and prompt, never on which other rows share the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings as traced arrays, one value for every row ([]) or one per row ([B]): a new value
    never recompiles."""

    temperature: jax.Array  # float32; 0 = greedy
    top_p: jax.Array  # float32; 1 = off
    top_k: jax.Array  # int32; 0 = off

    @classmethod
    def make(cls, temperature=0.0, top_k=None, top_p=None) -> Sampling:
        """From scalars, or from per-row sequences (of equal length; None entries: off)."""
        def values(x):
            return list(x) if np.ndim(x) else [x]

        for t in values(temperature):
            if t is None or not np.isfinite(t) or t < 0:
                raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
        for k in values(top_k):
            if k is not None and (k != int(k) or k < 1):
                raise ValueError(f"top_k must be >= 1 (an int) or None, got {top_k}")
        for p in values(top_p):
            if p is not None and not 0 < p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")

        def arr(x, off, dtype):
            return np.asarray([off if v is None else v for v in x] if np.ndim(x) else (off if x is None else x),
                              dtype)

        return cls(jnp.asarray(arr(temperature, 0.0, np.float32)), jnp.asarray(arr(top_p, 1.0, np.float32)),
                   jnp.asarray(arr(top_k, 0, np.int32)))


def _rows(x: jax.Array, ndim: int) -> jax.Array:
    """A setting ([] or [B]) broadcastable against [B, ..., V] arrays of `ndim` dims."""
    return x if x.ndim == 0 else x.reshape(x.shape + (1,) * (ndim - 1))


def row_keys(key_rows: jax.Array, stream: int, counter: jax.Array) -> jax.Array:
    """[B] keys for one draw: row key x stream id x row-local counter [B]."""
    return jax.vmap(lambda k, c: jax.random.fold_in(jax.random.fold_in(k, stream), c))(key_rows, counter)


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Applies top-k then top-p to float32 logits [..., V] (masked entries -> -inf); per-row settings broadcast
    over the leading dimension. One descending sort serves both, and only when some row filters."""
    v = logits.shape[-1]
    top_k, top_p = _rows(s.top_k, logits.ndim), _rows(s.top_p, logits.ndim)
    temperature = _rows(s.temperature, logits.ndim)

    def filtered(lg):
        sorted_lg = jnp.sort(lg, axis=-1)[..., ::-1]
        # top-k: keep values >= the k-th largest (ties kept); k = 0 keeps everything
        k = jnp.broadcast_to(jnp.clip(top_k, 1, v) - 1, lg.shape[:-1] + (1,))
        kth = jnp.where(top_k > 0, jnp.take_along_axis(sorted_lg, k, axis=-1), NEG_INF)
        lg = jnp.where(lg < kth, NEG_INF, lg)
        sorted_lg = jnp.where(sorted_lg < kth, NEG_INF, sorted_lg)  # still sorted
        # top-p over what top-k kept: the smallest prefix whose mass reaches top_p (the first token always
        # survives)
        probs = jax.nn.softmax(sorted_lg / jnp.maximum(temperature, 1e-6), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_lg, jnp.inf), axis=-1, keepdims=True)
        return jnp.where((top_p < 1.0) & (lg < cutoff), NEG_INF, lg)

    return jax.lax.cond(jnp.any(s.top_k > 0) | jnp.any(s.top_p < 1.0), filtered, lambda lg: lg, logits)


def choose(logits: jax.Array, keys: jax.Array, s: Sampling, exclude: int | None = None) -> jax.Array:
    """Token ids [B, T] from float32 logits [B, T, V]: argmax in rows at temperature 0, else a draw from
    softmax(filtered logits / T) by the Gumbel-max trick (keys: [B], one per row)."""
    if exclude is not None:
        logits = logits.at[..., exclude].set(NEG_INF)

    def greedy(lg):
        return jnp.argmax(lg, axis=-1).astype(jnp.int32)

    def sampled(lg):
        t = _rows(s.temperature, lg.ndim)
        flt = filter_logits(lg, s)
        g = jax.vmap(lambda k, x: jax.random.gumbel(k, x.shape, jnp.float32))(keys, flt)
        draw = jnp.argmax(flt / jnp.where(t > 0, t, 1.0) + g, axis=-1).astype(jnp.int32)
        return jnp.where(_rows(s.temperature, lg.ndim - 1) > 0, draw, greedy(lg))

    return jax.lax.cond(jnp.any(s.temperature > 0), sampled, greedy, logits)


def confidence(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Probability of `tokens` under the untempered softmax of the full vocabulary (mask id included)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
