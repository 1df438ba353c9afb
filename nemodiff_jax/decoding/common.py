"""Loop state and pieces shared by the three modes.

Every mode is `init(model, prompt, opts) -> State`, `step(model, State, opts) -> State` and `cond(State)`.
`run_device` runs the step in a `lax.while_loop` inside one jit (cache and state donated); `run_python`
calls the same jitted step from a Python loop (the twin: streaming and tests). Rows are independent: each
has its own cache length, output count, done flag and random key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemodiff_jax.cache import KVCache
from nemodiff_jax.lora import LoRA
from nemodiff_jax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (hashable) per-call decoding options."""

    mode: str
    stop_ids: tuple[int, ...]
    block: int = 32
    policy: str = "threshold"  # diffusion: threshold | low_confidence | leftmost
    threshold: float = 0.9  # diffusion unmask threshold; linear_spec draft threshold (0 = one draft pass)
    steps: int | None = None  # diffusion: max denoise steps per block (default: block size)
    mask_id: int = 100
    attn_impl: object = "auto"  # "auto" | "xla" | "pallas" | "cudnn" | attention.Sharded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    cache: KVCache
    out: jax.Array  # [B, O] int32 generated tokens
    n_out: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    seed: jax.Array  # [B] int32: AR: last token (to feed); diffusion/linear_spec: next block's slot 0
    keys: jax.Array  # [B] PRNG keys
    max_new: jax.Array  # [B] int32: each row's own budget of new tokens
    sampling: Sampling
    lora: LoRA | None
    passes: jax.Array  # [B] int32 decode forwards each row took part in (prefill excluded)
    rounds: jax.Array  # [B] int32 AR steps / diffusion blocks / speculative rounds
    work: jax.Array  # [B] int32 diffusion: denoise steps; linear_spec: draft passes
    total_passes: jax.Array  # [] int32 forwards run for the whole batch


def forward(model, tokens: jax.Array, cache: KVCache, *, causal: bool, opts: Options, lora=None):
    """One chunk forward at each row's own position (cache.lengths + arange(T)); cache written, not advanced."""
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return model(tokens, positions, cache, causal=causal, lora=lora, attn_impl=opts.attn_impl)


def is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


def write_out(out: jax.Array, n_out: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """out[b, n_out[b] : n_out[b]+T] = tokens[b] for active rows (slots past the buffer are dropped)."""
    b, t = tokens.shape
    cols = jnp.where(active[:, None], n_out[:, None] + jnp.arange(t)[None, :], out.shape[1])
    return out.at[jnp.arange(b)[:, None], cols].set(tokens, mode="drop")


def prefill(model, prompt: jax.Array, prompt_lens: jax.Array, cache: KVCache, opts: Options):
    """Causal prefill of right-padded prompts [B, P]; returns the logits [B, V] at each row's last prompt
    token and the cache advanced by each row's own length (padding K/V sit past it, overwritten later)."""
    logits, cache = forward(model, prompt, cache, causal=True, opts=opts)
    cache = cache.advance(prompt_lens)
    last = jnp.take_along_axis(logits, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


def initial_state(cache, out_len, keys, max_new, sampling, lora, first: jax.Array, opts: Options) -> State:
    """State after prefill: `first` [B] is the first generated token (already emitted)."""
    b = first.shape[0]
    out = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((b,), jnp.int32)
    done = is_stop(first, opts.stop_ids) | (n_out >= max_new)
    def zeros():  # distinct buffers: the state is donated, and one buffer may not be donated twice
        return jnp.zeros((b,), jnp.int32)

    return State(cache=cache, out=out, n_out=n_out, done=done, seed=first, keys=keys, max_new=max_new,
                 sampling=sampling, lora=lora, passes=zeros(), rounds=zeros(), work=zeros(),
                 total_passes=jnp.int32(0))


def finish_rows(st: State, new_tokens: jax.Array, counts: jax.Array, active: jax.Array,
                stop_ids: tuple[int, ...]) -> dict[str, Any]:
    """Emits `new_tokens[b, :counts[b]]` for active rows; returns updated out/n_out/done."""
    t = new_tokens.shape[1]
    valid = jnp.arange(t)[None, :] < counts[:, None]
    out = write_out(st.out, st.n_out, new_tokens, active)
    n_out = st.n_out + jnp.where(active, counts, 0)
    hit_stop = jnp.any(is_stop(new_tokens, stop_ids) & valid, axis=1)
    done = st.done | (active & hit_stop) | (n_out >= st.max_new)
    return dict(out=out, n_out=n_out, done=done)


def cond(st: State) -> jax.Array:
    return ~jnp.all(st.done)


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnums=(4,))
def run_device(graphdef, params, step_fn, opts: Options, st: State) -> State:
    """The whole decode as one on-device while loop."""
    model = nnx.merge(graphdef, params)
    return jax.lax.while_loop(cond, lambda s: step_fn(model, s, opts), st)


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnums=(4,))
def run_step(graphdef, params, step_fn, opts: Options, st: State) -> State:
    """One step, for the Python-loop twin."""
    model = nnx.merge(graphdef, params)
    return step_fn(model, st, opts)


def run_python(graphdef, params, step_fn, opts: Options, st: State):
    """Python-loop twin of run_device: yields the state after every step (host sync per step)."""
    while bool(cond(st)):
        st = run_step(graphdef, params, step_fn, opts, st)
        yield st
