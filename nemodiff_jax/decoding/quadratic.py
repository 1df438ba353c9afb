"""`quadratic_spec`: self-speculation in one forward per round (spec §6.4, the HF-OLD `self_spec_generate`),
for any batch size. `block` = J, the chain length (default 8): a round accepts at most J tokens.

Per round and row, one forward over a canvas of J(J+1) slots written at the row's cache length C:
- the chain, slots 0..J-1: D_0..D_{J-1} at positions C..C+J-1 (D_0 the seed, the rest the previous round's
  drafts), causal among themselves, drafter LoRA off. It is linear_spec's verify pass: a[i] is the AR choice
  for position C+i+1 given D_0..D_i.
- sub-block j (j = 0..J-1), slots J+jJ..J+jJ+J-1: J masks at positions C+j+1..C+j+J that see the cache, the
  chain up to D_j and each other, drafter LoRA on. It drafts the continuation in case D_1..D_j are accepted.
Acceptance is linear_spec's: n = the longest prefix with a[i] == D_{i+1}; a[0..n] are emitted (n drafts and the
bonus a[n]); the cache keeps the chain's slots 0..n (advance n+1; the sub-blocks' K/V past them are
overwritten later, as any rejected slot). The next chain is [a[n], sub-block n's drafts for positions
C+n+2..C+n+J]. Every emitted token is an AR choice given the emitted prefix, so greedy output equals `ar`
exactly and sampled output keeps the AR distribution. The round after the prefill has no drafts (its chain is
the seed and masks, which never match): it emits one token and drafts the next round.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from nemodiff_jax.decoding.common import Options, State, finish_rows, forward
from nemodiff_jax.decoding.speculative import STREAM_DRAFT, STREAM_VERIFY, accept
from nemodiff_jax.sampling import choose, row_keys

DEFAULT_CHAIN = 8
MAX_CHAIN = 32  # a canvas of 1056 tokens


def width(chain: int) -> int:
    """Slots one round writes into the cache (the canvas)."""
    return chain * (chain + 1)


@functools.lru_cache(maxsize=None)
def canvas(chain: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position offsets [T], within-canvas visibility [T, T], chain flags [T]) of a J-chain canvas."""
    j = chain
    offsets = np.concatenate([np.arange(j), (np.arange(j)[:, None] + np.arange(1, j + 1)[None, :]).ravel()])
    owner = np.concatenate([np.arange(j), np.repeat(np.arange(j), j)])  # the chain slot each slot hangs on
    is_chain = np.arange(width(j)) < j
    within = np.zeros((width(j), width(j)), bool)
    within[:, :j] = np.arange(j)[None, :] <= owner[:, None]  # the chain up to (and with) its own slot
    within[j:, j:] = owner[j:, None] == owner[None, j:]  # a sub-block's masks see each other
    for a in (offsets, within, is_chain):
        a.flags.writeable = False
    return offsets.astype(np.int32), within, is_chain


def step(model, st: State, opts: Options) -> State:
    j = opts.block
    offsets, within, is_chain = canvas(j)
    b = st.seed.shape[0]
    active = ~st.done
    chain = jnp.concatenate([st.seed[:, None], st.drafts], axis=1)  # [B, J]; -1: no draft yet (first round)
    tokens = jnp.concatenate([jnp.where(chain < 0, opts.mask_id, chain),
                              jnp.full((b, j * j), opts.mask_id, jnp.int32)], axis=1)
    lora = st.lora
    if lora is not None:  # the drafter on the sub-blocks only: the chain is the plain model, as AR
        lora = dataclasses.replace(lora, gate=jnp.broadcast_to(jnp.asarray(~is_chain), tokens.shape))
    logits, cache = forward(model, tokens, st.cache, causal=True, opts=opts, lora=lora, offsets=offsets,
                            within=within)
    a = choose(logits[:, :j], row_keys(st.keys, STREAM_VERIFY, cache.lengths), st.rows.sampling)  # [B, J]
    d = choose(logits[:, j:], row_keys(st.keys, STREAM_DRAFT, cache.lengths), st.rows.sampling,
               exclude=opts.mask_id).reshape(b, j, j)
    a, accepted = accept(st, a, chain)  # linear_spec's rule (a missing draft, -1, never matches)
    cache = cache.advance(jnp.where(active, accepted, 0))
    last = (accepted - 1)[:, None]
    bonus = jnp.take_along_axis(a, last, axis=1)[:, 0]
    nxt = jnp.take_along_axis(d, last[:, :, None], axis=1)[:, 0, 1:]  # sub-block n's drafts after the bonus
    upd = finish_rows(st, a, accepted, active)
    one = active.astype(jnp.int32)
    return dataclasses.replace(st, cache=cache, seed=jnp.where(active, bonus, st.seed),
                               drafts=jnp.where(active[:, None], nxt, st.drafts),
                               passes=st.passes + one, rounds=st.rounds + one,
                               work=st.work + jnp.where(active, accepted, 0),
                               total_passes=st.total_passes + 1, **upd)
