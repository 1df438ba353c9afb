"""Sampled `linear_spec` keeps AR's output distribution: a two-sample chi-square test on the embedded model.

The embedded model (float32, CPU, its drafter attached) continues one prompt in N = 2048 rows per sample; row i
of a call with `seed=s` draws with seed s+i, and every sample below takes its own block of N seeds, so the samples are
independent (same seeds would give both modes the same first token, row for row, and correlated samples).
The first generated token comes from the prefill in both modes (the same code), so the test looks at tokens
2..4, which sampled `linear_spec` emits from its causal verify passes: with block 3 the first round drafts
tokens 2 and 3 from token 1 and emits tokens 2..4 when both drafts are accepted, so each tested token is
emitted sometimes after accepted drafts and sometimes as the bonus token after a rejection.

Five statistics per comparison: the marginals of tokens 2, 3 and 4 and the joints of tokens (2, 3) and (3, 4).
Each is a chi-square test of homogeneity (scipy.stats.chi2_contingency, 2 x K table, no continuity correction)
over the outcomes seen at least MIN_POOLED = 20 times in the pooled draws, plus one "other" bucket (so every
expected count is >= 10). Significance: ALPHA = 1e-3 family-wise per comparison, Bonferroni over the five, so
each p-value must exceed 2e-4, for temperature 1.0 and for temperature 1.0 with top_p 0.9 (2 x 2048 draws
each). A correct sampler fails with probability <= 2e-3 over both; the draws are fixed by the seeds, so the
outcome is deterministic on a given jax version.

Power: the same test must reject (some p-value <= 2e-4) sampled `linear_spec` at temperature 1.0 against AR at
temperature 0.9, a 10% temperature change, with the same 2048 draws (1024 were enough for the Shakespeare
model this test was written on, whose next-token distributions are flatter). Exactness where it must hold:
greedy `linear_spec` == greedy `ar` token for token on distinct prompts, and at temperature 1.0 with equal
seeds both modes give the same first (prefill) token in every row.

Runtime: five generate() calls of 2048 rows (a 16-slot prefill + 3 AR steps, or the prefill + up to 3
speculative rounds of two 3-slot passes) and a small batch for the exact checks; temperature and top_p are
traced, so the calls of one batch size share their programs. top_p costs the most (a sort of the 4096-entry
vocabulary in every slot of every pass). A few minutes of CPU time on 2 cores, so the statistical tests are
marked `slow`; test_exact_where_it_must_be
(~10 s, mostly compiling its batch size) is not.
"""

from collections import Counter

import numpy as np
import pytest
from scipy import stats

from nemodiff_jax.embedded import PROMPTS, default_model
from nemodiff_jax.generate import load

N = 2048  # draws per sample (rows of one generate call)
MAX_NEW = 4  # tokens 1..4: token 1 from the prefill, tokens 2..4 tested
BLOCK = 3  # linear_spec block: small keeps the CPU cost down; 3 lets one round emit all tested tokens
PROMPT = "import os\nimport sys\n"  # its next tokens are neither near-deterministic nor flat
ALPHA = 1e-3  # family-wise, per comparison
COLUMNS = [(1,), (2,), (3,), (1, 2), (2, 3)]  # 0-based columns of the new tokens: tokens 2, 3, 4, joints
PER_TEST = ALPHA / len(COLUMNS)  # Bonferroni
MIN_POOLED = 20  # an outcome gets its own bucket when seen this often in both samples together
T1 = dict(temperature=1.0)
TOP_P = dict(temperature=1.0, top_p=0.9)
GREEDY_PROMPTS = PROMPTS[:8]
GREEDY_NEW = 24


@pytest.fixture(scope="module")
def gen():
    return load(default_model(), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def draws(gen):
    """(mode, sample index, sampling) -> (tokens [N, MAX_NEW], per-row stats); sample k uses seeds kN..kN+N-1."""
    cache = {}
    prompt = gen.tokenizer.encode(PROMPT)

    def get(mode: str, k: int, sampling: dict):
        key = (mode, k, tuple(sorted(sampling.items())))
        if key not in cache:
            opts = dict(block_size=BLOCK) if mode == "linear_spec" else {}
            res = gen.generate([prompt] * N, mode=mode, max_new_tokens=MAX_NEW, seed=k * N, stop_token_ids=[],
                               **sampling, **opts)
            tokens = np.array([r.tokens for r in res])
            assert tokens.shape == (N, MAX_NEW)
            cache[key] = tokens, [r.stats for r in res]
        return cache[key]

    return get


def homogeneity(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(p-value, degrees of freedom) of the chi-square homogeneity test of two samples of outcomes (rows of
    x [n, c] and y [m, c]), bucketed to the outcomes seen >= MIN_POOLED times in both together + "other"."""
    cx, cy = Counter(map(tuple, x.tolist())), Counter(map(tuple, y.tolist()))
    pooled = cx + cy
    kept = [o for o, c in pooled.most_common() if c >= MIN_POOLED]
    table = np.array([[c[o] for o in kept] + [len(s) - sum(c[o] for o in kept)] for c, s in ((cx, x), (cy, y))])
    if table[:, -1].sum() < MIN_POOLED:  # a thin "other" joins the rarest kept outcome (or is empty)
        table = np.concatenate([table[:, :-2], table[:, -2:].sum(axis=1, keepdims=True)], axis=1)
    assert table.shape[1] >= 3, f"degenerate outcome table {table}"  # the test must have something to compare
    _, p, dof, _ = stats.chi2_contingency(table, correction=False)
    return float(p), int(dof)


def p_values(a: np.ndarray, b: np.ndarray) -> list[tuple[float, int]]:
    return [homogeneity(a[:, list(c)], b[:, list(c)]) for c in COLUMNS]


def fmt(ps) -> str:
    return ", ".join(f"tokens {tuple(i + 1 for i in c)}: p={p:.3g} (dof {d})" for c, (p, d) in zip(COLUMNS, ps))


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [T1, TOP_P], ids=["T1", "T1-top_p0.9"])
def test_sampled_linear_spec_keeps_the_ar_distribution(draws, sampling):
    ar, _ = draws("ar", 0, sampling)
    spec, spec_stats = draws("linear_spec", 1, sampling)
    # the speculative path was really taken: drafts got accepted in a good share of the rounds
    accepted = np.mean([s["mean_accepted_per_round"] for s in spec_stats])
    assert accepted > 1.2, accepted
    ps = p_values(ar, spec)
    print(f"\n{sampling}: mean accepted per round {accepted:.3f}; {fmt(ps)}")
    assert min(p for p, _ in ps) > PER_TEST, fmt(ps)


@pytest.mark.slow
def test_the_test_rejects_a_10_percent_temperature_change(draws):
    """Power at this sample size: linear_spec at temperature 1.0 vs AR at 0.9 (the draws of the test above)."""
    spec, _ = draws("linear_spec", 1, T1)
    ar_cold, _ = draws("ar", 2, dict(temperature=0.9))
    ps = p_values(ar_cold, spec)
    print(f"\nAR T=0.9 vs linear_spec T=1.0: {fmt(ps)}")
    assert min(p for p, _ in ps) <= PER_TEST, fmt(ps)


def test_exact_where_it_must_be(gen):
    """Greedy linear_spec == greedy ar token for token on distinct prompts; at temperature 1.0 and equal seeds
    the first generated token (the prefill's, the same code in both modes) is the same in every row."""
    kw = dict(max_new_tokens=GREEDY_NEW, stop_token_ids=[])
    ar = [r.tokens for r in gen.generate(GREEDY_PROMPTS, mode="ar", **kw)]
    spec = gen.generate(GREEDY_PROMPTS, mode="linear_spec", block_size=BLOCK, **kw)
    assert [r.tokens for r in spec] == ar
    assert all(len(t) == GREEDY_NEW for t in ar) and len({tuple(t) for t in ar}) == len(GREEDY_PROMPTS)
    assert np.mean([r.stats["mean_accepted_per_round"] for r in spec]) > 1.0  # drafts were accepted

    ar = [r.tokens for r in gen.generate(GREEDY_PROMPTS, mode="ar", seed=5, **T1, **kw)]
    spec = [r.tokens for r in gen.generate(GREEDY_PROMPTS, mode="linear_spec", block_size=BLOCK, seed=5, **T1,
                                           **kw)]
    assert [t[0] for t in spec] == [t[0] for t in ar]
    assert spec != ar  # later tokens come from other random streams: equal in distribution, not row for row
