"""`ar`: one causal forward of one token per step (spec §6.1).

`Options.deterministic` (ar's `deterministic` option): the step runs as a causal chunk of `block` slots, the
token then masks, and reads slot 0. Slot 0 sees only the cache and itself, so the tokens are the same; the
point is the arithmetic: every matmul and the attention run at linear_spec's verify shape, so that on a GPU an
AR step and a verify slot round alike and greedy linear_spec equals greedy ar in bf16 too (tests/test_gpu.py).
The cache is written for the whole chunk (the masks' K/V past the new length are overwritten later) and
advanced by one."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from nemodiff_jax.decoding.common import Options, State, finish_rows, force_think_end, forward
from nemodiff_jax.sampling import choose, row_keys

STREAM = 0  # random stream of AR choices; the counter is the position of the token being chosen


def first_token(logits_last, cache, keys, sampling):
    """The first generated token from the prefill's last logits (position = prompt length)."""
    return choose(logits_last[:, None], row_keys(keys, STREAM, cache.lengths), sampling)[:, 0]


def step(model, st: State, opts: Options) -> State:
    active = ~st.done
    tokens = st.seed[:, None]
    if opts.deterministic:
        masks = jnp.full((tokens.shape[0], opts.block - 1), opts.mask_id, jnp.int32)
        tokens = jnp.concatenate([tokens, masks], axis=1)
    logits, cache = forward(model, tokens, st.cache, causal=True, opts=opts)
    logits = logits[:, :1]
    cache = cache.advance(active.astype(jnp.int32))
    tok = choose(logits, row_keys(st.keys, STREAM, cache.lengths), st.rows.sampling)
    tok = force_think_end(tok, st.n_out, st.out, st.n_out, st.rows)[0][:, 0]
    upd = finish_rows(st, tok[:, None], jnp.ones_like(st.n_out), active)
    one = active.astype(jnp.int32)
    return dataclasses.replace(st, cache=cache, seed=jnp.where(active, tok, st.seed), passes=st.passes + one,
                               rounds=st.rounds + one, total_passes=st.total_passes + 1, **upd)
