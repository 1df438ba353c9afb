"""`diffusion`: block-wise masked diffusion with an AR-seeded block start (spec §6.2, HF `generate`).

Per block of L slots right after the committed text: slot 0 = the AR seed from the previous causal pass,
slots 1..L-1 = mask. Bidirectional denoise passes (cache written, not advanced) unmask slots by the policy
until none is left (or the row's block holds a stop token with no mask before it: early exit), then one
causal commit pass writes the block's K/V, advances the cache by L and gives the next block's seed.

Deviation from the HF reference, on purpose: the mask id is excluded from the denoise argmax (as vLLM and
SGLang do). HF may "unmask" a slot to the mask id, which makes no progress and can leak mask ids into the
output; excluding it guarantees >= 1 real commit per step. Confidence still uses the full softmax (mask id
in the denominator), as HF does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemodiff_jax.decoding.common import Options, State, finish_rows, force_think_end, forward, is_stop
from nemodiff_jax.sampling import choose, confidence, row_keys

POLICIES = ("threshold", "low_confidence", "leftmost")
STREAM = 1


def new_block(seed: jax.Array, block: int, mask_id: int) -> tuple[jax.Array, jax.Array]:
    """[seed, mask x (L-1)] and its mask flags [B, L] (slot 0 is never masked)."""
    b = seed.shape[0]
    tokens = jnp.concatenate([seed[:, None], jnp.full((b, block - 1), mask_id, jnp.int32)], axis=1)
    return tokens, jnp.broadcast_to(jnp.arange(block) > 0, (b, block))


def _rank_desc(score: jax.Array) -> jax.Array:
    """rank [B, L] of each slot by score, 0 = highest (ties: lower index first)."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def select(policy: str, conf: jax.Array, masked: jax.Array, step_idx, steps, threshold) -> jax.Array:
    """Which masked slots [B, L] to commit this step; `steps` and `threshold` per row ([B, 1]) or scalars."""
    n_masked = masked.sum(-1, keepdims=True)
    score = jnp.where(masked, conf, -jnp.inf)
    if policy == "threshold":
        # the single most confident masked slot always, plus every masked slot at or above the threshold;
        # on the last allowed step everything left (a step limit must never leave masks in the output)
        top1 = jax.nn.one_hot(jnp.argmax(score, axis=-1), masked.shape[-1], dtype=bool)
        return masked & (top1 | (conf >= threshold) | (step_idx >= steps - 1))
    remaining = jnp.maximum(steps - step_idx, 1)
    k = -(-n_masked // remaining)  # ceil(masks / remaining steps)
    if policy == "low_confidence":
        return masked & (_rank_desc(score) < k)
    if policy == "leftmost":
        return masked & (jnp.cumsum(masked, axis=-1) <= k)
    raise ValueError(f"unknown diffusion policy {policy!r}; choose from {POLICIES}")


def settled(block: jax.Array, masked: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """[B] the row needs no more denoising: no mask left, or a stop token with no mask before it.
    `masked` is tracked by slot, not by token value: a seed that happens to equal the mask id is a token."""
    no_mask_before = jnp.cumsum(masked, axis=-1) == 0
    early = jnp.any(is_stop(block, stop_ids) & ~masked & no_mask_before, axis=-1)
    return ~jnp.any(masked, axis=-1) | early


def denoise(model, st: State, block: jax.Array, masked: jax.Array, cache, opts: Options):
    """Bidirectional passes until every row is settled (a row's step limit commits whatever it has left on
    its last step); returns (block, cache, steps per row, passes)."""
    rows = st.rows
    steps, threshold = rows.steps[:, None], rows.threshold[:, None]
    stride = opts.block + 1

    def body(c):
        block, masked, cache, k, nsteps = c
        active = ~st.done & ~settled(block, masked, rows.stop_ids)
        logits, cache = forward(model, block, cache, causal=False, opts=opts)
        keys = row_keys(st.keys, STREAM, cache.lengths * stride + k)
        x0 = choose(logits, keys, rows.sampling, exclude=opts.mask_id)
        conf = confidence(logits, x0)
        sel = select(opts.policy, conf, masked, k, steps, threshold) & active[:, None]
        return jnp.where(sel, x0, block), masked & ~sel, cache, k + 1, nsteps + active.astype(jnp.int32)

    def cond(c):
        block, masked, _, k, _ = c
        return jnp.any(~st.done & ~settled(block, masked, rows.stop_ids)) & (k < opts.block)

    nsteps = jnp.zeros_like(st.n_out)
    block, _, cache, k, nsteps = jax.lax.while_loop(cond, body, (block, masked, cache, jnp.int32(0), nsteps))
    return block, cache, nsteps, k


def step(model, st: State, opts: Options) -> State:
    L = opts.block
    active = ~st.done
    block, masked = new_block(st.seed, L, opts.mask_id)
    # a thinking budget inside this block: </think> written into its slot before denoising (slot j is output
    # index n_out - 1 + j; slot 0, the seed, is already out)
    forced_tail, forced = force_think_end(block[:, 1:], st.n_out, st.out, st.n_out, st.rows)
    block = block.at[:, 1:].set(forced_tail)
    masked = masked.at[:, 1:].set(masked[:, 1:] & ~forced)
    block, cache, nsteps, k = denoise(model, st, block, masked, st.cache, opts)
    # commit: causal pass over the final block writes its K/V; its last logit seeds the next block
    logits, cache = forward(model, block, cache, causal=True, opts=opts)
    cache = cache.advance(jnp.where(active, L, 0))
    seed = choose(logits[:, -1:], row_keys(st.keys, 0, cache.lengths), st.rows.sampling)[:, 0]
    # slot 0 was emitted when it was chosen; emit the denoised slots and the next seed (chosen now)
    emitted = jnp.concatenate([block[:, 1:], seed[:, None]], axis=1)
    emitted = force_think_end(emitted, st.n_out, st.out, st.n_out, st.rows)[0]  # the budget at the next seed
    seed = emitted[:, -1]
    upd = finish_rows(st, emitted, jnp.full_like(st.n_out, L), active)
    one = active.astype(jnp.int32)
    return dataclasses.replace(st, cache=cache, seed=jnp.where(active, seed, st.seed),
                               passes=st.passes + nsteps + one, rounds=st.rounds + one, work=st.work + nsteps,
                               total_passes=st.total_passes + k + 1, **upd)
