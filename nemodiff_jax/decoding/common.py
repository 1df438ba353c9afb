"""Loop state and pieces shared by the decoding modes.

Every mode is `step(model, State, opts) -> State`, run while `cond(State)`. The decode slots (slots.Pool) run
the step in on-device while loops (segments) and, as their Python-loop twin, one jitted step at a time;
`run_device` is the bare whole-decode loop (the benchmark's baseline). Rows are independent: each has its own
cache length, output count, done flag, random key and request settings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax.cache import KVCache
from nemodiff_jax.lora import LoRA
from nemodiff_jax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (hashable) decoding options: what changes the program. Values a request sets (sampling, stop
    ids, thresholds, budgets) are traced, per row, in RowSettings."""

    mode: str
    block: int = 32
    policy: str = "threshold"  # diffusion: threshold | low_confidence | leftmost
    mask_id: int = 100
    attn_impl: object = "auto"  # "auto" | "xla" | "pallas" | "cudnn" | attention.Sharded
    deterministic: bool = False  # ar: each step a causal `block`-token chunk (token, then masks): decoding/ar.py


MAX_STOP_IDS = 16  # stop ids per row: the width of RowSettings.stop_ids (padded with -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Each row's request settings as traced arrays [B, ...]: a new value never recompiles."""

    max_new: jax.Array  # [B] int32: the row's budget of new tokens
    sampling: Sampling  # [B] temperature / top_p / top_k
    stop_ids: jax.Array  # [B, S] int32, -1 = no stop id
    threshold: jax.Array  # [B] float32: diffusion unmask threshold; linear_spec draft threshold (0 = one pass)
    steps: jax.Array  # [B] int32: diffusion's most denoise steps per block (<= block)
    think_budget: jax.Array  # [B] int32: the most thinking tokens before </think> is forced (-1: no budget)
    think_end: jax.Array  # [B] int32: the </think> id (-1: none)

    @classmethod
    def make(cls, max_new, temperature, top_k, top_p, stop_ids, threshold, steps, think_budget=None,
             think_end=None) -> RowSettings:
        """From per-row Python values (lists of length B; top_k / top_p entries may be None, stop_ids a list
        of id lists; think_budget / think_end: None = no budget for any row)."""
        if max((len(x) for x in stop_ids), default=0) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids per request")
        stops = np.full((len(stop_ids), MAX_STOP_IDS), -1, np.int32)  # one width: rows of any request mix
        for i, ids in enumerate(stop_ids):
            stops[i, :len(ids)] = ids
        return cls(max_new=jnp.asarray(max_new, jnp.int32), sampling=Sampling.make(temperature, top_k, top_p),
                   stop_ids=jnp.asarray(stops), threshold=jnp.asarray(threshold, jnp.float32),
                   steps=jnp.asarray(steps, jnp.int32),
                   think_budget=jnp.asarray([-1] * len(stop_ids) if think_budget is None else think_budget, jnp.int32),
                   think_end=jnp.asarray([-1] * len(stop_ids) if think_end is None else think_end, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    cache: KVCache
    out: jax.Array  # [B, O] int32 generated tokens
    n_out: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    seed: jax.Array  # [B] int32: AR: last token (to feed); diffusion/linear_spec: next block's slot 0
    keys: jax.Array  # [B] PRNG keys
    rows: RowSettings  # the rows' own settings (budget, sampling, stop ids, thresholds)
    lora: LoRA | None
    passes: jax.Array  # [B] int32 decode forwards each row took part in (prefill excluded)
    rounds: jax.Array  # [B] int32 AR steps / diffusion blocks / speculative rounds
    work: jax.Array  # [B] int32 diffusion: denoise steps; linear_spec: draft passes
    total_passes: jax.Array  # [] int32 forwards run for the whole batch
    drafts: jax.Array | None = None  # quadratic_spec: [B, J-1] the next round's drafts (-1: none yet)


def forward(model, tokens: jax.Array, cache: KVCache, *, causal: bool, opts: Options, lora=None, embeds=None,
            offsets: np.ndarray | None = None, within: np.ndarray | None = None, hidden: bool = False):
    """One chunk forward at each row's own position (cache.lengths + arange(T)); cache written at
    [length, length+T), not advanced. `embeds` [B,T,D] (a prefill with images) replace the token lookup.
    A structured chunk (quadratic_spec's canvas) gives each slot's position offset `offsets` [T] and who sees
    whom inside the chunk, `within` [T, T] (both static numpy). The plain paths call the model exactly as
    before (no extra arguments). `hidden`: the final hidden states [B,T,D] instead of the logits."""
    t = tokens.shape[1]
    offsets = np.arange(t, dtype=np.int32) if offsets is None else offsets
    positions = cache.lengths[:, None] + jnp.asarray(offsets, jnp.int32)[None, :]
    extra = {} if embeds is None else {"embeds": embeds}
    if within is not None:
        extra["within"] = within
    call = model.hidden if hidden else model
    return call(tokens, positions, cache, causal=causal, lora=lora, attn_impl=opts.attn_impl, **extra)


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """tokens [B] or [B, T] against each row's stop ids [B, S] (-1 pads): bool, tokens' shape."""
    stops = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    return jnp.any(tokens[..., None] == stops, axis=-1)


def write_out(out: jax.Array, n_out: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """out[b, n_out[b] : n_out[b]+T] = tokens[b] for active rows (slots past the buffer are dropped)."""
    b, t = tokens.shape
    cols = jnp.where(active[:, None], n_out[:, None] + jnp.arange(t)[None, :], out.shape[1])
    return out.at[jnp.arange(b)[:, None], cols].set(tokens, mode="drop")


def prefill(model, prompt: jax.Array, prompt_lens: jax.Array, cache: KVCache, opts: Options, embeds=None):
    """Causal prefill of right-padded prompts [B, P]; returns the logits [B, V] at each row's last prompt
    token and the cache advanced by each row's own length (padding K/V sit past it, overwritten later).
    `embeds` [B, P, D]: the prompts' input embeddings (image features spliced in) instead of the lookup.
    Only the last token's hidden state goes through the head: [B, P, V] float32 logits would be most of a
    long prefill's memory (8B: 0.5 MB per token)."""
    h, cache = forward(model, prompt, cache, causal=True, opts=opts, embeds=embeds, hidden=True)
    cache = cache.advance(prompt_lens)
    last = jnp.take_along_axis(h, (prompt_lens - 1)[:, None, None], axis=1)  # [B, 1, D]
    return model.head(last)[:, 0], cache


def force_think_end(tokens: jax.Array, start: jax.Array, out: jax.Array, n_out: jax.Array,
                    rows: RowSettings) -> tuple[jax.Array, jax.Array]:
    """The thinking budget (spec §6: the reference's max_thinking_tokens / end_think_token_id), one rule for
    every mode: the first output index >= the row's budget holds </think> unless the row emitted one before it.
    In diffusion, as in the reference, the slot is written before its block is denoised, so the denoiser may
    still put another </think> earlier in that block.

    `tokens` [B, T] are to be emitted at output indices start..start+T-1 (`start` [B]) after the row's
    `n_out` tokens in `out`. Returns the tokens with </think> written where the rule puts it, and where [B, T]."""
    t = tokens.shape[1]
    end, budget = rows.think_end[:, None], rows.think_budget[:, None]
    seen = jnp.any((out == end) & (jnp.arange(out.shape[1])[None, :] < n_out[:, None]), axis=1)
    is_end = tokens == end
    before = jnp.cumsum(is_end, axis=1) - is_end  # ends among the new tokens before each slot
    at = start[:, None] + jnp.arange(t)[None, :] == jnp.maximum(budget, start[:, None])
    force = (budget >= 0) & (end >= 0) & ~seen[:, None] & at & (before == 0)
    return jnp.where(force, end, tokens), force


def initial_state(cache, out_len, keys, rows: RowSettings, lora, first: jax.Array, draft_width: int = 0) -> State:
    """State after prefill: `first` [B] is the first generated token (already emitted); `draft_width` > 0 (the
    quadratic_spec chain less one) adds the carried drafts, none yet."""
    b = first.shape[0]
    out = jnp.zeros((b, out_len), jnp.int32)
    zero = jnp.zeros((b,), jnp.int32)
    first = force_think_end(first[:, None], zero, out, zero, rows)[0][:, 0]  # a budget of 0
    out = out.at[:, 0].set(first)
    n_out = jnp.ones((b,), jnp.int32)
    done = is_stop(first, rows.stop_ids) | (n_out >= rows.max_new)
    def zeros():  # distinct buffers: the state is donated, and one buffer may not be donated twice
        return jnp.zeros((b,), jnp.int32)

    return State(cache=cache, out=out, n_out=n_out, done=done, seed=first, keys=keys, rows=rows,
                 lora=lora, passes=zeros(), rounds=zeros(), work=zeros(),
                 total_passes=jnp.int32(0),
                 drafts=jnp.full((b, draft_width), -1, jnp.int32) if draft_width else None)


def finish_rows(st: State, new_tokens: jax.Array, counts: jax.Array, active: jax.Array) -> dict[str, Any]:
    """Emits `new_tokens[b, :counts[b]]` for active rows; returns updated out/n_out/done."""
    t = new_tokens.shape[1]
    valid = jnp.arange(t)[None, :] < counts[:, None]
    out = write_out(st.out, st.n_out, new_tokens, active)
    n_out = st.n_out + jnp.where(active, counts, 0)
    hit_stop = jnp.any(is_stop(new_tokens, st.rows.stop_ids) & valid, axis=1)
    done = st.done | (active & hit_stop) | (n_out >= st.rows.max_new)
    return dict(out=out, n_out=n_out, done=done)


def cond(st: State) -> jax.Array:
    return ~jnp.all(st.done)


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnums=(4,))
def run_device(graphdef, params, step_fn, opts: Options, st: State) -> State:
    """The whole decode as one on-device while loop."""
    model = nnx.merge(graphdef, params)
    return jax.lax.while_loop(cond, lambda s: step_fn(model, s, opts), st)
