"""KV cache semantics (DESIGN §3): write-then-advance, per-row lengths, peeks that never commit, overflow.

float32 model on CPU; every comparison is between two ways of computing the same thing (tolerance 1e-5 for
float32, bit-exact where nothing should have been recomputed). Shapes are shared between tests so the jitted
forward compiles a handful of times only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemodiff_jax.cache import CacheOverflowError, KVCache
from nemodiff_jax.config import PRESETS
from nemodiff_jax.model import abstract_model

CFG = PRESETS["tiny"]  # yarn, GQA 4/2, head_dim != hidden/heads, original context 64
CAP = 80
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    """Random float32 weights, filled host-side (the nnx initialiser compiles one RNG kernel per shape: slow)."""
    graphdef, state = nnx.split(abstract_model(CFG, jnp.float32))
    rng = np.random.default_rng(0)

    def fill(leaf):
        if len(leaf.shape) == 1:  # norm weights
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(leaf.shape) * leaf.shape[0] ** -0.5, jnp.float32)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@functools.partial(jax.jit, static_argnums=0, static_argnames="causal")
def _forward(graphdef, state, toks, pos, cache, *, causal):
    return nnx.merge(graphdef, state)(toks, pos, cache, causal=causal)


@functools.cache
def _split(model):
    return nnx.split(model)


def forward(model, toks, pos, cache, *, causal):
    """model(toks, pos, cache, causal=...) under jit; numpy logits."""
    logits, cache = _forward(*_split(model), toks, pos, cache, causal=causal)
    return np.asarray(logits), cache


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def positions(lengths, t):
    return jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def new_cache(b, capacity=CAP):
    return KVCache.init(CFG, b, capacity, jnp.float32)


def run_chunk(model, cache, toks, *, causal=True, advance=True):
    """One pass at each row's own positions (length + arange); advances by the chunk unless it is a peek."""
    logits, cache = forward(model, toks, positions(cache.lengths, toks.shape[1]), cache, causal=causal)
    if advance:
        cache = cache.advance(jnp.full((toks.shape[0],), toks.shape[1], jnp.int32))
    return logits, cache


def test_prefill_at_once_equals_token_by_token(model):
    b, t = 2, 70  # crosses the original context (64), where the Llama-4 query scale changes
    toks = tokens(b, t)
    full, full_cache = run_chunk(model, new_cache(b), toks)

    cache = new_cache(b)
    head, cache = run_chunk(model, cache, toks[:, :60])  # chunked prefill ...
    steps = [head]
    for i in range(60, t):  # ... then one token at a time
        logits, cache = run_chunk(model, cache, toks[:, i : i + 1])
        steps.append(logits)
    stepped = np.concatenate(steps, axis=1)
    assert stepped.shape == full.shape == (b, t, CFG.vocab_size)
    np.testing.assert_allclose(stepped, full, **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [t, t])
    for layer in range(CFG.num_layers):
        np.testing.assert_allclose(np.asarray(cache.k[layer])[:, :t], np.asarray(full_cache.k[layer])[:, :t], **TOL)
        np.testing.assert_allclose(np.asarray(cache.v[layer])[:, :t], np.asarray(full_cache.v[layer])[:, :t], **TOL)
        assert not np.any(np.asarray(cache.k[layer])[:, t:])  # nothing written past the committed tokens


def test_single_token_decode_equals_token_by_token_from_scratch(model):
    # Every step through the cache alone (no chunked prefill): exercises slot 0 and a cache that is mostly empty.
    toks = tokens(2, 60, seed=9)
    cache, steps = new_cache(2), []
    for i in range(10):
        logits, cache = run_chunk(model, cache, toks[:, i : i + 1])
        steps.append(logits)
    full, _ = forward(model, toks, positions([0, 0], 60), None, causal=True)  # causal: the first 10 see only 10
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full[:, :10], **TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_ragged_batch_equals_rows_alone(model, causal):
    lengths = np.array([4, 11])
    prompt, chunk = tokens(2, 60, seed=1), tokens(2, 4, seed=2)
    # Both rows write 60 slots; each commits only its own prefix (the stale slots after it must be overwritten).
    _, cache = forward(model, prompt, positions([0, 0], 60), new_cache(2), causal=True)
    cache = cache.advance(lengths)
    batched, cache = run_chunk(model, cache, chunk, causal=causal)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 4)

    for i, n in enumerate(lengths):
        row_cache = new_cache(1)
        for j in range(n):  # the row's own prefix, token by token in a batch of one
            _, row_cache = run_chunk(model, row_cache, prompt[i : i + 1, j : j + 1])
        alone, _ = run_chunk(model, row_cache, chunk[i : i + 1], causal=causal)
        np.testing.assert_allclose(batched[i], alone[0], **TOL, err_msg=f"row {i}")


def test_peeks_do_not_change_later_results(model):
    prompt, nxt, junk = tokens(2, 60, seed=3), tokens(2, 1, seed=4), tokens(2, 4, seed=5)
    _, cache = run_chunk(model, new_cache(2), prompt)
    want, want_cache = run_chunk(model, cache, nxt)

    peeked = cache
    for causal in (True, False):  # a draft (causal) and a denoise step (bidirectional), longer than `nxt`
        _, peeked = run_chunk(model, peeked, junk, causal=causal, advance=False)
    np.testing.assert_array_equal(np.asarray(peeked.lengths), [60, 60])
    got, got_cache = run_chunk(model, peeked, nxt)
    np.testing.assert_array_equal(got, want)  # same computation on the same committed state: bit-exact
    for layer in range(CFG.num_layers):
        np.testing.assert_array_equal(np.asarray(got_cache.k[layer])[:, :61], np.asarray(want_cache.k[layer])[:, :61])
        np.testing.assert_array_equal(np.asarray(got_cache.v[layer])[:, :61], np.asarray(want_cache.v[layer])[:, :61])


def test_bidirectional_peek_keeps_committed_entries(model):
    _, cache = run_chunk(model, new_cache(2), tokens(2, 60, seed=6))
    lengths = [60, 41]
    cache = cache.crop(jnp.asarray(lengths, jnp.int32))  # ragged committed lengths
    _, peeked = run_chunk(model, cache, tokens(2, 4, seed=7), causal=False, advance=False)
    np.testing.assert_array_equal(np.asarray(peeked.lengths), lengths)
    for layer in range(CFG.num_layers):
        for before, after in ((cache.k[layer], peeked.k[layer]), (cache.v[layer], peeked.v[layer])):
            before, after = np.asarray(before), np.asarray(after)
            for row, n in enumerate(lengths):
                np.testing.assert_array_equal(after[row, :n], before[row, :n])  # committed: bit-exact
                assert not np.array_equal(after[row, n : n + 4], before[row, n : n + 4])  # the peek did write
                np.testing.assert_array_equal(after[row, n + 4 :], before[row, n + 4 :])


def test_overflow_raises(model):
    # Eager calls: the capacity check runs on the host before anything is computed.
    cache = new_cache(2, capacity=8).advance(jnp.asarray([6, 6]))
    with pytest.raises(CacheOverflowError, match=r"holds 6 tokens, writing 3 more needs 9 > capacity 8"):
        model(tokens(2, 3), positions(cache.lengths, 3), cache, causal=True)
    ragged = cache.crop(jnp.asarray([2, 7], jnp.int32))  # the row furthest along decides
    with pytest.raises(CacheOverflowError, match=r"holds 7 tokens, writing 2 more needs 9 > capacity 8"):
        model(tokens(2, 2), positions(ragged.lengths, 2), ragged, causal=False)
    with pytest.raises(CacheOverflowError, match="capacity 8"):
        model(tokens(1, 9), positions([0], 9), new_cache(1, capacity=8), causal=True)
    cache.check_fits(2)  # exactly full is fine
    ragged.check_fits(1)


def test_writes_past_capacity_are_dropped_under_jit(model):
    # Under jit the host check cannot run; slots past the end must be dropped, never clamped onto the last slot.
    _, cache = run_chunk(model, new_cache(2), tokens(2, 60, seed=10))
    a, b = tokens(2, 2, seed=11), tokens(2, 2, seed=12)
    # Row 0 holds CAP-2 tokens: of the chunk [a, b] only `a` fits, in the last two slots; row 1 has room.
    over_cache = cache.crop(jnp.asarray([CAP - 2, 10], jnp.int32))
    _, over = run_chunk(model, over_cache, jnp.concatenate([a, b], axis=1), causal=False, advance=False)
    # Reference: the same `a` at the same positions CAP-2, CAP-1, preceded by `b` (layer-0 K of a token depends
    # only on the token and its position).
    ref_cache = cache.crop(jnp.asarray([CAP - 4, 10], jnp.int32))
    _, ref = run_chunk(model, ref_cache, jnp.concatenate([b, a], axis=1), causal=False, advance=False)
    for layer in range(CFG.num_layers):
        before, got = np.asarray(over_cache.k[layer]), np.asarray(over.k[layer])
        np.testing.assert_array_equal(got[0, : CAP - 2], before[0, : CAP - 2])
        np.testing.assert_array_equal(got[1, :10], before[1, :10])
    np.testing.assert_allclose(np.asarray(over.k[0])[0, CAP - 2 :], np.asarray(ref.k[0])[0, CAP - 2 :], **TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cache_free_equals_cached(model, causal):
    toks = tokens(2, 60, seed=8)
    pos = positions([0, 0], 60)
    free, none = forward(model, toks, pos, None, causal=causal)
    assert none is None
    cached, _ = forward(model, toks, pos, new_cache(2), causal=causal)  # capacity 80: 20 empty slots masked
    assert free.dtype == cached.dtype == np.float32
    np.testing.assert_allclose(free, cached, **TOL)


def test_causal_and_bidirectional_differ(model):
    # Guards the tests above against a mask that ignores `causal`.
    toks, pos = tokens(2, 60, seed=8), positions([0, 0], 60)
    causal, _ = forward(model, toks, pos, None, causal=True)
    bidir, _ = forward(model, toks, pos, None, causal=False)
    assert np.abs(causal[:, :-1] - bidir[:, :-1]).max() > 1e-2
