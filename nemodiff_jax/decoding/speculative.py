"""`linear_spec`: linear self-speculation (spec §6.3, HF `linear_spec_generate`), for any batch size.

Per round and row: block = [seed, mask x (L-1)]; bidirectional draft pass(es) with the drafter LoRA on
(cache written, not advanced) fill the masks; one causal verify pass with the LoRA off over the same slots
and the same cache gives a[i], the AR choice for slot i+1. Accept the longest prefix with a[i] == block[i+1]
(n tokens) plus the bonus a[n]; advance the row's cache by n+1 (seed + accepted drafts; the bonus is the next
seed). Every emitted token is an AR choice given the emitted prefix, so greedy output equals `ar` exactly and
sampled output keeps the AR distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemodiff_jax.decoding.common import Options, State, finish_rows, force_think_end, forward
from nemodiff_jax.decoding.diffusion import new_block, select
from nemodiff_jax.sampling import choose, confidence, row_keys

STREAM_DRAFT = 2
STREAM_VERIFY = 3


def draft(model, st: State, block, masked, cache, opts: Options):
    """Fills the block's masked slots: rows at threshold 0 in one pass (every mask filled), the others by
    threshold passes until no mask is left. Returns (block, cache, passes)."""
    stride = opts.block + 1
    threshold = st.rows.threshold[:, None]

    def body(c):
        block, masked, cache, k = c
        logits, cache = forward(model, block, cache, causal=False, opts=opts, lora=st.lora)
        keys = row_keys(st.keys, STREAM_DRAFT, cache.lengths * stride + k)
        d = choose(logits, keys, st.rows.sampling, exclude=opts.mask_id)
        by_threshold = select("threshold", confidence(logits, d), masked, k, opts.block, threshold)
        sel = jnp.where(threshold > 0, by_threshold, masked)
        return jnp.where(sel, d, block), masked & ~sel, cache, k + 1

    def cond(c):
        _, masked, _, k = c
        return jnp.any(masked & ~st.done[:, None]) & (k < opts.block)

    block, _, cache, k = jax.lax.while_loop(cond, body, (block, masked, cache, jnp.int32(0)))
    return block, cache, k


def accept(st: State, a: jax.Array, block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One round's verdict from the verify choices a [B, L] (a[i]: the AR choice after block[i]): the longest
    prefix with a[i] == block[i+1], plus the bonus a[n]. A thinking budget among the accepted tokens: </think>
    takes the bonus's place at the budget index and the round stops there (the tokens before it are accepted
    drafts, as in AR with the same budget). Returns (a with that </think>, accepted count [B])."""
    n = jnp.sum(jnp.cumprod(a[:, :-1] == block[:, 1:], axis=-1), axis=-1).astype(jnp.int32)
    accepted = n + 1
    a, forced = force_think_end(a, st.n_out, st.out, st.n_out, st.rows)
    at = jnp.argmax(forced, axis=1).astype(jnp.int32)
    return a, jnp.where(jnp.any(forced, axis=1) & (at < accepted), at + 1, accepted)


def step(model, st: State, opts: Options) -> State:
    L = opts.block
    active = ~st.done
    block, masked = new_block(st.seed, L, opts.mask_id)
    block, cache, n_draft = draft(model, st, block, masked, st.cache, opts)
    logits, cache = forward(model, block, cache, causal=True, opts=opts)  # verify: LoRA off
    # fresh noise per round (the block start only grows) and per slot: a[i] ~ AR(. | prefix up to slot i)
    a = choose(logits, row_keys(st.keys, STREAM_VERIFY, cache.lengths), st.rows.sampling)  # [B, L]
    a, accepted = accept(st, a, block)
    cache = cache.advance(jnp.where(active, accepted, 0))
    bonus = jnp.take_along_axis(a, (accepted - 1)[:, None], axis=1)[:, 0]
    upd = finish_rows(st, a, accepted, active)
    one = active.astype(jnp.int32)
    return dataclasses.replace(st, cache=cache, seed=jnp.where(active, bonus, st.seed),
                               passes=st.passes + one * (n_draft + 1), rounds=st.rounds + one,
                               work=st.work + jnp.where(active, accepted, 0),
                               total_passes=st.total_passes + n_draft + 1, **upd)
