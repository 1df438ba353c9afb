"""Token choice (sampling.py): greedy, temperature, top-k, top-p, exclude, confidence, per-row keys.

Distribution checks draw N samples with fixed keys and compare counts with the expected probabilities by a
chi-square statistic against the 1e-4 critical value; each such test also asserts the statistic would reject
a plausible wrong distribution (so the check has power, not just a loose bound)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nemodiff_jax.sampling import Sampling, choose, confidence, filter_logits, row_keys

N = 40_000
_choose = jax.jit(choose, static_argnames="exclude")  # one compile per shape instead of op-by-op dispatch


def keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def draw(logits_1d, s: Sampling, n: int = N, seed: int = 0, exclude=None) -> np.ndarray:
    """n independent draws (one row each, own key) from the same logits."""
    lg = jnp.broadcast_to(jnp.asarray(logits_1d, jnp.float32), (n, 1, len(logits_1d)))
    return np.asarray(_choose(lg, keys(n, seed), s, exclude=exclude))[:, 0]


def chi2(samples: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(statistic, 1e-4 critical value) over the categories with positive expected mass."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    assert counts[probs == 0].sum() == 0, f"drew zero-probability tokens {np.nonzero(counts * (probs == 0))}"
    support = probs > 0
    expected = probs[support] * len(samples)
    stat = float(np.sum((counts[support] - expected) ** 2 / expected))
    return stat, float(stats.chi2.ppf(1 - 1e-4, max(int(support.sum()) - 1, 1)))


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


LOGITS = np.array([1.5, 0.2, -0.7, 2.1, 0.9, -1.6, 0.0, 1.1], np.float32)


def test_greedy_is_argmax():
    lg = jax.random.normal(jax.random.key(3), (5, 7, 300)) * 3
    for s in (Sampling.make(), Sampling.make(0.0, top_k=3, top_p=0.5)):
        got = np.asarray(_choose(lg, keys(5), s))
        np.testing.assert_array_equal(got, np.argmax(np.asarray(lg), axis=-1))
        assert got.dtype == np.int32


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_temperature_matches_softmax(temperature):
    samples = draw(LOGITS, Sampling.make(temperature), seed=int(temperature * 10))
    stat, crit = chi2(samples, softmax(LOGITS / temperature))
    assert stat < crit, (stat, crit)
    wrong = softmax(LOGITS) if temperature != 1.0 else softmax(LOGITS / 1.3)
    assert chi2(samples, wrong)[0] > crit  # the check can tell the temperature apart


def test_top_k_support_and_distribution():
    rng = np.random.default_rng(0)
    lg = rng.permutation(np.linspace(-2, 2, 32)).astype(np.float32)  # distinct values
    k, t = 5, 0.9
    top = np.argsort(-lg)[:k]
    samples = draw(lg, Sampling.make(t, top_k=k), seed=1)
    assert set(np.unique(samples)) == set(top.tolist())  # never outside the top k, and every one occurs
    expected = np.zeros(32)
    expected[top] = softmax(lg[top] / t)
    stat, crit = chi2(samples, expected)
    assert stat < crit, (stat, crit)
    # filter_logits keeps exactly the top k finite
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(lg)[None], Sampling.make(t, top_k=k))))[0]
    assert set(np.nonzero(kept)[0].tolist()) == set(top.tolist())


# probs 0.2 0.4 0.1 0.3 (shuffled, so sorting matters)
P4 = np.array([0.2, 0.4, 0.1, 0.3])


@pytest.mark.parametrize("top_p, kept", [(0.3, {1}), (0.4, {1}), (0.65, {1, 3}), (0.75, {1, 3, 0}),
                                         (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    lg = jnp.log(jnp.asarray(P4, jnp.float32))[None]
    out = np.asarray(filter_logits(lg, Sampling.make(1.0, top_p=top_p)))[0]
    assert set(np.nonzero(np.isfinite(out))[0].tolist()) == kept
    np.testing.assert_array_equal(out[np.isfinite(out)], np.asarray(lg)[0][np.isfinite(out)])


def test_top_p_sampling_distribution():
    lg = np.log(P4).astype(np.float32)
    samples = draw(lg, Sampling.make(1.0, top_p=0.65), seed=5)
    expected = np.array([0.0, 0.4, 0.0, 0.3]) / 0.7
    stat, crit = chi2(samples, expected)
    assert stat < crit, (stat, crit)
    assert chi2(samples, np.array([0.0, 0.5, 0.0, 0.5]))[0] > crit


def test_top_p_applies_to_the_tempered_distribution():
    # T=2: probs ~ sqrt(P4) -> sorted .325 .282 .230 .163; p=0.65 keeps three (untempered it would keep two)
    lg = jnp.log(jnp.asarray(P4, jnp.float32))[None]
    out = np.asarray(filter_logits(lg, Sampling.make(2.0, top_p=0.65)))[0]
    assert set(np.nonzero(np.isfinite(out))[0].tolist()) == {0, 1, 3}


def test_top_k_then_top_p():
    lg = np.log(np.array([0.05, 0.35, 0.1, 0.3, 0.2])).astype(np.float32)
    # top_k=3 -> {1, 3, 4} renormalised .411 .353 .235; top_p=0.7 keeps {1, 3}
    out = np.asarray(filter_logits(jnp.asarray(lg)[None], Sampling.make(1.0, top_k=3, top_p=0.7)))[0]
    assert set(np.nonzero(np.isfinite(out))[0].tolist()) == {1, 3}


def test_exclude_never_returned():
    lg = LOGITS.copy()
    lg[3] = 20.0  # the excluded id dominates
    greedy = draw(lg, Sampling.make(), n=8, exclude=3)
    assert (greedy == 0).all()  # next best
    for s in (Sampling.make(1.0), Sampling.make(3.0, top_k=2), Sampling.make(1.0, top_p=0.5)):
        samples = draw(lg, s, exclude=3)
        assert 3 not in samples
    # the rest of the distribution is the softmax without the excluded id
    samples = draw(lg, Sampling.make(1.0), exclude=3, seed=9)
    expected = softmax(np.where(np.arange(8) == 3, -np.inf, lg))
    stat, crit = chi2(samples, expected)
    assert stat < crit


def test_confidence_is_untempered_softmax_prob():
    lg = jax.random.normal(jax.random.key(1), (3, 6, 50)) * 4
    tok = jax.random.randint(jax.random.key(2), (3, 6), 0, 50)
    got = np.asarray(confidence(lg, tok))
    e = np.exp(np.asarray(lg, np.float64))
    ref = np.take_along_axis(e / e.sum(-1, keepdims=True), np.asarray(tok)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    # confidence of the argmax equals the max prob
    np.testing.assert_allclose(np.asarray(confidence(lg, jnp.argmax(lg, -1))),
                               (e / e.sum(-1, keepdims=True)).max(-1), rtol=1e-5)


def test_rows_draw_with_their_own_keys():
    """A row's draw depends on its own key only (not on the batch it is in)."""
    lg = jnp.broadcast_to(jnp.asarray(LOGITS), (6, 3, 8))
    ks = keys(6, 4)
    s = Sampling.make(1.0)
    full = np.asarray(_choose(lg, ks, s))
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(_choose(lg[i:i + 1], ks[i:i + 1], s))[0], full[i])
    assert len({tuple(r) for r in full}) > 1


def test_row_keys_differ_by_stream_and_counter():
    base = keys(3, 0)
    c = jnp.array([5, 5, 6])
    a = jax.random.key_data(row_keys(base, 0, c))
    np.testing.assert_array_equal(a, jax.random.key_data(row_keys(base, 0, c)))
    assert not np.array_equal(a, jax.random.key_data(row_keys(base, 1, c)))
    assert not np.array_equal(a, jax.random.key_data(row_keys(base, 0, c + 1)))


@pytest.mark.parametrize("kw, msg", [(dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"),
                                     (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampling.make(**kw)
