"""The decoding modes through `Generator.generate` / `.stream` on the tiny float32 model (CPU).

- greedy `linear_spec` and `quadratic_spec` == greedy `ar` token for token (several models, ragged batch,
  LoRA drafter on/off, stop tokens, multi-pass drafting, chain lengths); quadratic_spec's canvas against
  separate causal and bidirectional passes;
- a "forced" model whose next token depends only on the current token (attention and MLP outputs zeroed, one-hot
  embeddings, hand-set head), so drafts, acceptance counts and diffusion step counts are computed by hand;
- on-device loop == Python-loop twin, stream == generate, batch rows == the same prompt alone, seeds;
- stats and bad input.

Compilation dominates the runtime: every test uses the same prompt bucket (<= 16 tokens), MAX_NEW (max_new is
traced; cache/output shapes depend on it only through rounding) and a few option sets. top_k is static in the
compiled loops, so greedy runs carry the same top_k/top_p as sampled ones (ignored at temperature 0, see
test_sampling.test_greedy_is_argmax) and share their programs; the AR / linear_spec stop-token tests run
plain greedy (top_k None)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemodiff_jax.config import PRESETS
from nemodiff_jax.generate import Generator
from nemodiff_jax.lora import random_lora
from nemodiff_jax.model import Transformer

CFG = PRESETS["tiny"]  # vocab 256, block 8, mask 100, eos 11, max positions 256
MASK, EOS, L = CFG.mask_token_id, 11, CFG.block_size
MAX_NEW = 24
NOSTOP = []  # stop_token_ids=[]: rows run to MAX_NEW
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]
GREEDY = dict(temperature=0.0, top_k=40, top_p=0.9)
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)
# threshold 0.05: the random tiny model's confidences are ~0.05, so rows need different numbers of passes
DIFF_THRESHOLD = dict(policy="threshold", threshold=0.05)
MODES = [("ar", {}), ("linear_spec", {}), ("diffusion", DIFF_THRESHOLD),
         ("diffusion", dict(policy="low_confidence")), ("diffusion", dict(policy="leftmost")),
         ("quadratic_spec", dict(block_size=4))]
MODE_IDS = ["ar", "linear_spec", "diffusion-threshold", "diffusion-low_confidence", "diffusion-leftmost",
            "quadratic_spec"]
TIMING_KEYS = ("wall_time_s", "tokens_per_s", "batch_tokens_per_s")


def make_gen(seed: int) -> Generator:
    return Generator(Transformer(CFG, rngs=nnx.Rngs(seed), dtype=jnp.float32))


@pytest.fixture(scope="module")
def gens():
    return {k: make_gen(k) for k in (0, 1, 2)}


@pytest.fixture(scope="module")
def lora():
    return random_lora(CFG, jax.random.key(7), rank=8, std=0.3)


def run(g, prompts, mode="ar", **kw):
    """generate with this file's defaults: MAX_NEW, no stop tokens, GREEDY."""
    kw = {"max_new_tokens": MAX_NEW, "stop_token_ids": NOSTOP, **GREEDY, **kw}
    return g.generate(prompts, mode=mode, **kw)


def toks(results):
    return [r.tokens for r in results]


def stats_wo_timing(results):
    return [{k: v for k, v in r.stats.items() if k not in TIMING_KEYS} for r in results]


# ----------------------------------------------------------------------------- linear_spec == ar (greedy)


def test_linear_spec_equals_ar_greedy(gens, lora):
    """Three models, ragged B=4, LoRA drafter off/on, one draft pass / multi-pass drafting (threshold 0.3)."""
    differs = False
    for seed, g in gens.items():
        ar = toks(run(g, PROMPTS, "ar"))
        assert all(len(t) == MAX_NEW for t in ar)
        assert len({tuple(t) for t in ar}) == len(PROMPTS)
        for threshold in (0.0, 0.3):
            stats = {}
            for adapter in (False, lora):
                res = run(g, PROMPTS, "linear_spec", lora=adapter, threshold=threshold)
                assert toks(res) == ar, (seed, adapter is not False, threshold)
                for r in res:
                    assert r.stats["mean_accepted_per_round"] >= 1
                    assert r.stats["rounds"] >= 1
                stats[adapter is not False] = [(r.stats["rounds"], r.stats["decode_forward_passes"]) for r in res]
            differs |= stats[True] != stats[False]
    assert differs, "the LoRA never changed acceptance or draft passes: the LoRA cases test nothing"


def test_quadratic_spec_equals_ar_greedy(gens, lora):
    """Three models, ragged B=4, LoRA drafter off/on, chains of 2, 4 and 8 (the tiny block): the same tokens
    as ar, one forward per round."""
    differs = False
    for seed, g in gens.items():
        ar = toks(run(g, PROMPTS, "ar"))
        for chain in (2, 4, 8):
            stats = {}
            for adapter in (False, lora):
                res = run(g, PROMPTS, "quadratic_spec", lora=adapter, block_size=chain)
                assert toks(res) == ar, (seed, adapter is not False, chain)
                for r in res:
                    assert r.stats["decode_forward_passes"] == r.stats["rounds"]
                    assert 1 <= r.stats["mean_accepted_per_round"] <= chain
                stats[adapter is not False] = [r.stats["rounds"] for r in res]
            differs |= stats[True] != stats[False]
    assert differs, "the LoRA never changed acceptance: the LoRA cases test nothing"


def test_quadratic_canvas_equals_separate_causal_and_bidirectional_passes(gens, lora):
    """One canvas forward (decoding.quadratic) gives, on the chain, the logits of a causal pass over the chain
    (linear_spec's verify), and on sub-block j those of a bidirectional pass of J masks after the cache plus
    chain[:j+1], drafter on; positions C+j+1..C+j+J. Independent of the mask/offset plumbing under test."""
    from nemodiff_jax.cache import KVCache
    from nemodiff_jax.decoding import quadratic
    from nemodiff_jax.decoding.common import Options, forward

    model, j = gens[1].model, 4
    offsets, within, is_chain = quadratic.canvas(j)
    opts = Options(mode="quadratic_spec", block=j, attn_impl="xla")
    prompt = jnp.asarray([[5, 9, 14, 2, 77, 31], [8, 3, 60, 61, 62, 63]], jnp.int32)
    chain = jnp.asarray([[12, 40, 41, 42], [90, 91, 5, 6]], jnp.int32)
    b = prompt.shape[0]

    def cache_after(tokens):
        cache = KVCache.init(CFG, b, 128, jnp.float32)
        _, cache = forward(model, tokens, cache, causal=True, opts=opts)
        return cache.advance(jnp.full((b,), tokens.shape[1], jnp.int32))

    base = cache_after(prompt)
    canvas = jnp.concatenate([chain, jnp.full((b, j * j), MASK, jnp.int32)], axis=1)
    gated = dataclasses.replace(lora, gate=jnp.broadcast_to(jnp.asarray(~is_chain), canvas.shape))
    got, _ = forward(model, canvas, base, causal=True, opts=opts, lora=gated, offsets=offsets, within=within)
    want_chain, _ = forward(model, chain, base, causal=True, opts=opts)
    np.testing.assert_allclose(got[:, :j], want_chain, rtol=1e-5, atol=1e-5)
    for k in (0, j - 1):  # the first and the last sub-block (the others differ only in how much chain they see)
        ctx = cache_after(jnp.concatenate([prompt, chain[:, :k + 1]], axis=1))
        want, _ = forward(model, jnp.full((b, j), MASK, jnp.int32), ctx, causal=False, opts=opts, lora=lora)
        np.testing.assert_allclose(got[:, j + k * j:j + (k + 1) * j], want, rtol=1e-5, atol=1e-5, err_msg=str(k))
    # the structure itself: offsets, and who sees whom
    assert offsets.tolist() == [0, 1, 2, 3] + [k + i for k in range(j) for i in range(1, j + 1)]
    assert within[:j, :j].tolist() == np.tril(np.ones((j, j), bool)).tolist() and not within[:j, j:].any()
    assert within[j + 2 * j, :j].tolist() == [True, True, True, False]  # sub-block 2 sees chain 0..2


def test_deterministic_ar_equals_ar(gens):
    """ar's deterministic option (each step a causal block-size chunk, slot 0 read) gives ar's tokens and
    stats, greedy and sampled (the same noise per position), on three models."""
    for seed, g in gens.items():
        for sampling in (GREEDY, SAMPLED):
            want = run(g, PROMPTS, "ar", seed=[11, 22, 33, 44], **sampling)
            got = run(g, PROMPTS, "ar", seed=[11, 22, 33, 44], deterministic=True, **sampling)
            assert toks(got) == toks(want), seed
            assert batch_stats(got) == batch_stats(want)


def test_attached_drafter_is_the_default_lora(gens, lora):
    g = make_gen(0)
    plain = run(g, PROMPTS, "linear_spec", threshold=0.3)
    g.attach_drafter(lora)
    attached = run(g, PROMPTS, "linear_spec", threshold=0.3)
    explicit = run(g, PROMPTS, "linear_spec", threshold=0.3, lora=lora)
    off = run(g, PROMPTS, "linear_spec", threshold=0.3, lora=False)
    assert toks(plain) == toks(attached) == toks(explicit) == toks(off)
    assert stats_wo_timing(attached) == stats_wo_timing(explicit)
    assert stats_wo_timing(off) == stats_wo_timing(plain)


@pytest.fixture(scope="module")
def stop_case(gens):
    """Stop ids taken from the no-stop AR output so the rows stop at different points."""
    g = gens[0]
    full = toks(run(g, PROMPTS, "ar"))
    stops = sorted({full[0][3], full[1][9], full[2][15]})
    expected = []
    for t in full:
        hits = [i for i, x in enumerate(t) if x in stops]
        expected.append(t[: hits[0] + 1] if hits else t)
    lengths = [len(e) for e in expected]
    assert len(set(lengths)) >= 3 and min(lengths) < MAX_NEW, lengths
    return stops, expected


def test_ar_stops_at_the_first_stop_token(gens, stop_case):
    stops, expected = stop_case
    res = gens[0].generate(PROMPTS, mode="ar", max_new_tokens=MAX_NEW, stop_token_ids=stops)
    assert toks(res) == expected
    for r in res:
        assert r.stats["decode_forward_passes"] == len(r.tokens) - 1  # a stopped row takes no more passes
        assert r.stats["tokens_per_forward"] == 1.0


def test_linear_spec_equals_ar_with_stop_tokens(gens, lora, stop_case):
    stops, expected = stop_case
    res = gens[0].generate(PROMPTS, mode="linear_spec", max_new_tokens=MAX_NEW, stop_token_ids=stops, lora=lora)
    assert toks(res) == expected
    for r, e in zip(res, expected):
        if len(e) < MAX_NEW:
            assert r.tokens[-1] in stops and not set(r.tokens[:-1]) & set(stops)
            assert 1 + r.stats["rounds"] * r.stats["mean_accepted_per_round"] >= len(r.tokens)


def test_diffusion_output_ends_at_first_stop(gens):
    full = toks(run(gens[0], PROMPTS, "diffusion", **DIFF_THRESHOLD))
    stops = sorted({full[0][3], full[1][9], full[2][15]})  # from diffusion's own no-stop output
    res = run(gens[0], PROMPTS, "diffusion", stop_token_ids=stops, **DIFF_THRESHOLD)
    assert any(len(r.tokens) < MAX_NEW for r in res)
    for f, r in zip(full, res):
        hits = [i for i, x in enumerate(f) if x in stops]
        assert r.tokens == (f[: hits[0] + 1] if hits else f)  # same blocks up to the stop (no mask before it)
        assert r.stats["blocks"] == -(-(len(r.tokens) - 1) // L)  # no block after the one with the stop


# ----------------------------------------------------------------------------- forced model (hand-computed)


def forced_gen(next_of: dict[int, int], scale: float) -> Generator:
    """A model whose logits at a slot depend only on that slot's token t: argmax = next_of[t], with confidence
    e^z / (e^z + V - 1), z ~= 8 * scale. Attention (o_proj) and MLP (down_proj) outputs are zero, so the
    residual stream is the one-hot embedding (every in-play token gets its own dimension)."""
    m = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    for layer in m.layers:
        layer.self_attn.o_proj[...] = jnp.zeros_like(layer.self_attn.o_proj[...])
        layer.mlp.down_proj[...] = jnp.zeros_like(layer.mlp.down_proj[...])
    in_play = sorted(set(next_of) | set(next_of.values()))
    assert len(in_play) <= CFG.hidden_size
    emb = np.zeros((CFG.vocab_size, CFG.hidden_size), np.float32)
    head = np.zeros((CFG.hidden_size, CFG.vocab_size), np.float32)
    for d, t in enumerate(in_play):
        emb[t, d] = 1.0
    for t, nxt in next_of.items():
        head[in_play.index(t), nxt] = scale
    m.embed_tokens[...] = jnp.asarray(emb)
    m.diffusion_head[...] = jnp.asarray(head)
    return Generator(m)


# chain 40 -> 41 -> ... -> 50 -> 50 (fixed point); a masked slot drafts 50
CHAIN = {**{t: t + 1 for t in range(40, 50)}, 50: 50, MASK: 50}
FORCED_PROMPTS = [[44, 45], [48, 49], [41, 42], [45, 46, 47]]
# By hand (L=8, MAX_NEW=24). Draft block [seed, 50 x 7]; verify a[i] = next(block[i]); accept the longest
# prefix with a[i] == block[i+1] (+ the bonus a[n]). a[0] = next(seed) equals 50 only when seed is 49 or 50,
# and then every draft matches (next(50) = 50): 8 tokens; otherwise n = 0: 1 token.
#   row 0 (last 45): first 46; seeds 46, 47, 48 -> 1 each; 49 -> 8; 50 -> 8, 8: 6 rounds, 27 accepted
#   row 1 (last 49): first 50; 8, 8, 8: 3 rounds, 24 accepted
#   row 2 (last 42): first 43; seeds 43..48 -> 1 each (6 rounds); 49 -> 8; 50 -> 8, 8: 9 rounds, 30
#   row 3 (last 47): first 48; seed 48 -> 1; 49 -> 8; 50 -> 8, 8: 4 rounds, 25
FORCED_TOKENS = [[46, 47, 48, 49] + [50] * 20, [50] * 24, list(range(43, 50)) + [50] * 17, [48, 49] + [50] * 22]
FORCED_ROUNDS = [6, 3, 9, 4]
FORCED_ACCEPTED = [27, 24, 30, 25]


def test_forced_model_ar_is_the_chain():
    g = forced_gen(CHAIN, scale=2.0)
    assert toks(run(g, FORCED_PROMPTS, "ar")) == FORCED_TOKENS


@pytest.mark.parametrize("scale, threshold, drafts_per_round", [
    (2.0, 0.0, 1),  # one draft pass
    (2.0, 0.3, 1),  # confidence ~1 >= 0.3: every mask filled by the first pass
    (0.5, 0.3, 7),  # confidence e^4/(e^4+255) = 0.18 < 0.3: only the top-1 (leftmost, all tied) per pass
])
def test_forced_model_linear_spec_acceptance(scale, threshold, drafts_per_round):
    g = forced_gen(CHAIN, scale)
    res = run(g, FORCED_PROMPTS, "linear_spec", threshold=threshold)
    assert toks(res) == FORCED_TOKENS
    for r, rounds, acc in zip(res, FORCED_ROUNDS, FORCED_ACCEPTED):
        assert r.stats["rounds"] == rounds
        assert r.stats["mean_accepted_per_round"] == pytest.approx(acc / rounds)
        assert r.stats["decode_forward_passes"] == rounds * (drafts_per_round + 1)
    assert res[1].stats["mean_accepted_per_round"] == 8.0
    assert res[0].stats["mean_accepted_per_round"] == 4.5
    assert res[0].stats["batch_forward_passes"] == 1 + max(FORCED_ROUNDS) * (drafts_per_round + 1)


def test_forced_model_quadratic_spec_acceptance():
    """By hand, chain J = 8: the same as linear_spec (a mask drafts 50 in every sub-block) except that the
    round after the prefill has no drafts (its chain is [seed, masks]): row 1 (first 50) takes 1 + 8 + 8 + 8
    in 4 rounds; rows 0, 2, 3 had a 1-token round there anyway."""
    g = forced_gen(CHAIN, 2.0)
    res = run(g, FORCED_PROMPTS, "quadratic_spec", block_size=L)
    assert toks(res) == FORCED_TOKENS
    rounds, accepted = [6, 4, 9, 4], [27, 25, 30, 25]
    for r, n, acc in zip(res, rounds, accepted):
        assert r.stats["rounds"] == r.stats["decode_forward_passes"] == n
        assert r.stats["mean_accepted_per_round"] == pytest.approx(acc / n)
    assert res[0].stats["batch_forward_passes"] == 1 + max(rounds)


def test_forced_model_lora_changes_acceptance_not_output():
    g = forced_gen(CHAIN, 2.0)
    adapter = random_lora(CFG, jax.random.key(3), rank=8, std=0.3)
    plain = run(g, FORCED_PROMPTS, "linear_spec")
    res = run(g, FORCED_PROMPTS, "linear_spec", lora=adapter)
    assert toks(res) == toks(plain) == FORCED_TOKENS
    accepted = [r.stats["mean_accepted_per_round"] * r.stats["rounds"] for r in res]
    assert sum(accepted) < sum(FORCED_ACCEPTED)  # the LoRA-perturbed drafts miss the chain
    assert sum(r.stats["rounds"] for r in res) > sum(FORCED_ROUNDS)


# Diffusion on a forced model: masked slots denoise to 60 (bidirectional logits depend on the slot's own token,
# the mask), the causal commit's last slot (60) gives the next seed 61. All masked slots tie, so the
# threshold policy commits either all of them in one pass (conf >= threshold) or one per pass, left to right.
DIFF = {45: 46, 49: 50, 42: 43, 47: 48, MASK: 60, 60: 61}
DIFF_TOKENS = [[f] + [60] * 7 + [61] + [60] * 7 + [61] + [60] * 7 for f in (46, 50, 43, 48)]


@pytest.mark.parametrize("scale, opts, steps_per_block", [
    (2.0, DIFF_THRESHOLD, 1),  # conf ~1 >= 0.05: all 7 masks in one pass
    (0.2, DIFF_THRESHOLD, 7),  # conf e^1.6 / (e^1.6 + 255) = 0.019 < 0.05: the single top-1 per pass
    (2.0, dict(policy="low_confidence"), 7),  # k = ceil(masks / remaining of 8 steps) = 1 per pass
    (2.0, dict(policy="leftmost"), 7),
])
def test_forced_model_diffusion_steps(scale, opts, steps_per_block):
    g = forced_gen(DIFF, scale)
    res = run(g, FORCED_PROMPTS, "diffusion", **opts)
    assert toks(res) == DIFF_TOKENS
    for r in res:
        assert r.stats["blocks"] == 3  # 1 + 8 + 8 + 8 >= 24
        assert r.stats["denoise_steps_per_block"] == steps_per_block
        assert r.stats["decode_forward_passes"] == 3 * (steps_per_block + 1)


def test_forced_model_diffusion_early_exit_on_stop(stop_case):
    # masks denoise to a stop token; one commit per pass: after pass 1 the block is [46, stop, mask x 6]: a stop
    # with no mask before it ends the block (1 denoise step), and the row ends at the stop. (The stop ids of
    # stop_case, so the compiled loop is shared with test_diffusion_output_ends_at_first_stop.)
    stops, _ = stop_case
    stop = stops[0]
    assert not set(stops) & {42, 43, 45, 46, 47, 48, 49, 50, MASK}
    g = forced_gen({45: 46, 49: 50, 42: 43, 47: 48, MASK: stop, stop: stop}, 0.2)  # conf 0.019 < 0.05
    res = run(g, FORCED_PROMPTS, "diffusion", stop_token_ids=stops, **DIFF_THRESHOLD)
    assert toks(res) == [[46, stop], [50, stop], [43, stop], [48, stop]]
    for r in res:
        assert r.stats["blocks"] == 1 and r.stats["denoise_steps_per_block"] == 1
        assert r.stats["decode_forward_passes"] == 2


def test_forced_model_seed_equal_to_mask_id_is_a_token():
    # the prefill picks the mask id as the first token: it is block slot 0 (a real token), not a mask. One
    # commit per pass: 7 masks -> 7 passes in every block (8 in the first if slot 0 were taken for a mask).
    g = forced_gen({45: MASK, 49: MASK, 42: MASK, 47: MASK, MASK: 60, 60: 61}, 0.2)
    res = run(g, FORCED_PROMPTS, "diffusion", **DIFF_THRESHOLD)
    for r in res:
        assert r.tokens == [MASK] + [60] * 7 + [61] + [60] * 7 + [61] + [60] * 7
        assert r.stats["denoise_steps_per_block"] == 7


# ----------------------------------------------------------------------------- device loop == Python twin


@pytest.fixture(scope="module")
def device_runs(gens):
    """(mode index, sampling name) -> device-loop results on model 0, shared by several tests."""
    out = {}
    for i, (mode, opts) in enumerate(MODES):
        for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            out[i, name] = run(gens[0], PROMPTS, mode, seed=[11, 22, 33, 44], **sampling, **opts)
    return out


def batch_stats(results):
    return [{k: v for k, v in d.items() if not k.startswith("batch_")} for d in stats_wo_timing(results)]


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("mi", range(len(MODES)), ids=MODE_IDS)
def test_rows_equal_single_python_loop_runs_and_stream(gens, device_runs, mi, sampling):
    """Loop twin + batch independence: each row of the on-device B=4 batch equals its prompt run alone with its
    own seed through the Python-loop twin (tokens and per-row stats), and `stream` of that prompt yields chunks
    that concatenate to the same tokens. (B=1 programs are the expensive part: the twin is checked at B=1
    here and at B=4 for the diffusion threshold loop below.)"""
    mode, opts = MODES[mi]
    kw = dict(GREEDY if sampling == "greedy" else SAMPLED, **opts)
    batch = device_runs[mi, sampling]
    seeds = [11, 22, 33, 44]
    for i in (0, 2):  # a short and the longest prompt
        alone = run(gens[0], [PROMPTS[i]], mode, loop="python", seed=[seeds[i]], **kw)
        assert alone[0].tokens == batch[i].tokens, (mode, opts, sampling, i)
        assert batch_stats(alone) == batch_stats(batch[i:i + 1])
    items = list(gens[0].stream(PROMPTS[3], mode=mode, max_new_tokens=MAX_NEW, stop_token_ids=NOSTOP,
                                seed=seeds[3], **kw))
    chunks, final = items[:-1], items[-1]
    assert sum(chunks, []) == final.tokens == batch[3].tokens
    assert batch_stats([final]) == batch_stats(batch[3:])
    assert all(len(c) > 0 for c in chunks)
    if mode == "ar":
        assert len(chunks) == MAX_NEW  # one token per step
    if mode == "diffusion":
        assert [len(c) for c in chunks] == [1, L, L, MAX_NEW - 1 - 2 * L]  # first token, then whole blocks


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_device_loop_equals_python_loop_batched(gens, device_runs, sampling):
    """Same batch, both loops: diffusion with the threshold policy (rows need different numbers of passes)."""
    mi = MODE_IDS.index("diffusion-threshold")
    dev = device_runs[mi, sampling]
    py = run(gens[0], PROMPTS, "diffusion", loop="python", seed=[11, 22, 33, 44],
             **(GREEDY if sampling == "greedy" else SAMPLED), **MODES[mi][1])
    assert toks(dev) == toks(py)
    assert stats_wo_timing(dev) == stats_wo_timing(py)
    if sampling == "greedy":  # the rows really progress differently (sampled rows may all take 7 steps)
        assert len({r.stats["denoise_steps_per_block"] for r in dev}) > 1


def test_seeds(gens, device_runs):
    """Sampled: the same seed gives the same tokens, another seed other tokens; int seed s means rows s+i."""
    g = gens[0]
    for mi, (mode, opts) in enumerate(MODES):
        base = toks(device_runs[mi, "sampled"])
        again = toks(run(g, PROMPTS, mode, seed=[11, 22, 33, 44], **SAMPLED, **opts))
        assert again == base
        other = toks(run(g, PROMPTS, mode, seed=[12, 23, 34, 45], **SAMPLED, **opts))
        assert all(a != b for a, b in zip(other, base)), mode
        greedy = toks(device_runs[mi, "greedy"])
        assert greedy != base
    ints = toks(run(g, PROMPTS, "ar", seed=11, **SAMPLED))
    listed = toks(run(g, PROMPTS, "ar", seed=[11, 12, 13, 14], **SAMPLED))
    assert ints == listed


def test_sampled_ar_tokens_lie_in_the_top_k_top_p_set(gens, device_runs):
    """Every sampled AR token is in the top-k, then top-p (of the tempered, renormalised top-k distribution)
    set of the AR logits given its prefix (recomputed by one causal pass over prompt + output)."""
    g = gens[0]
    res = device_runs[0, "sampled"]
    seqs = [p + r.tokens for p, r in zip(PROMPTS, res)]
    width = max(len(s) for s in seqs)
    logits = g.logits([s + [0] * (width - len(s)) for s in seqs])  # causal: right padding changes nothing
    sizes = []
    for b, (p, r) in enumerate(zip(PROMPTS, res)):
        for j, tok in enumerate(r.tokens):
            lg = logits[b, len(p) + j - 1].astype(np.float64)
            order = np.argsort(-lg)[: SAMPLED["top_k"]]
            probs = np.exp((lg[order] - lg[order].max()) / SAMPLED["temperature"])
            probs /= probs.sum()
            keep = int(np.searchsorted(np.cumsum(probs), SAMPLED["top_p"]) + 1)
            assert tok in order[:keep], (b, j)
            sizes.append(keep)
    assert min(sizes) < SAMPLED["top_k"]  # the nucleus actually cut somewhere


# ----------------------------------------------------------------------------- stats


def test_stats_consistent_with_mode(device_runs):
    for mi, (mode, opts) in enumerate(MODES):
        for name in ("greedy", "sampled"):
            for r in device_runs[mi, name]:
                s = r.stats
                n = s["generated_tokens"]
                assert n == len(r.tokens) == MAX_NEW
                assert s["mode"] == mode
                assert s["forward_passes"] == s["decode_forward_passes"] + 1  # + the prefill
                assert s["tokens_per_forward"] == pytest.approx(n / s["forward_passes"])
                if mode == "ar":
                    assert s["tokens_per_forward"] == 1.0
                    assert s["decode_forward_passes"] == MAX_NEW - 1
                if mode == "linear_spec":
                    rounds, acc = s["rounds"], s["mean_accepted_per_round"]
                    assert acc >= 1
                    assert s["decode_forward_passes"] == 2 * rounds  # draft + verify, threshold 0
                    total = round(acc * rounds)
                    assert 1 + total >= MAX_NEW  # first token + accepted per round cover the output...
                    assert 1 + total - L < MAX_NEW  # ...and the last round was needed
                if mode == "quadratic_spec":
                    rounds, acc = s["rounds"], s["mean_accepted_per_round"]
                    assert acc >= 1 and s["decode_forward_passes"] == rounds  # one forward per round
                    total = round(acc * rounds)
                    assert 1 + total >= MAX_NEW and 1 + total - opts["block_size"] < MAX_NEW
                if mode == "diffusion":
                    blocks, steps = s["blocks"], s["denoise_steps_per_block"]
                    assert blocks == -(-(MAX_NEW - 1) // L)  # without stops: every block, first token aside
                    assert 1 <= steps <= L - 1
                    assert s["decode_forward_passes"] == round(blocks * (steps + 1))
                    if opts["policy"] in ("low_confidence", "leftmost"):
                        assert steps == L - 1  # 7 masks over 8 steps: one per pass
            batch = device_runs[mi, name]
            most = 1 + max(x.stats["decode_forward_passes"] for x in batch)
            for r in batch:
                if mode == "diffusion":  # a block runs as many denoise passes as its slowest row
                    assert most <= r.stats["batch_forward_passes"] <= 1 + r.stats["blocks"] * L
                else:
                    assert r.stats["batch_forward_passes"] == most


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(gens, lora):
    g = gens[0]
    ok = dict(max_new_tokens=8)
    cases = [
        (dict(prompts=PROMPTS, mode="beam"), "unknown mode 'beam'"),
        (dict(prompts=PROMPTS, mode="diffusion", policy="random"), "unknown diffusion policy 'random'"),
        (dict(prompts=PROMPTS, mode="linear_spec", policy="threshold"), r"unknown option\(s\) \['policy'\]"),
        (dict(prompts=PROMPTS, mode="ar", block_size=8), r"unknown option\(s\) \['block_size'\]"),
        (dict(prompts=PROMPTS, mode="diffusion", steps=0), "steps must be an int in"),
        (dict(prompts=PROMPTS, mode="diffusion", steps=L + 1), "steps must be an int in"),
        (dict(prompts=PROMPTS, mode="diffusion", block_size=1), "block_size must be an int in"),
        (dict(prompts=PROMPTS, max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(prompts=PROMPTS, max_new_tokens=-3), "max_new_tokens must be a positive int"),
        (dict(prompts=PROMPTS, max_new_tokens=250), "exceeds the model's max_position_embeddings 256"),
        (dict(prompts=PROMPTS, mode="diffusion", max_new_tokens=240), "exceeds the model's max_position"),
        (dict(prompts=[[1] * 300]), "prompt of 300 tokens .* exceeds the model's max_position_embeddings"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[1, 2, 256]]), r"prompt 0: token id\(s\) \[256\] outside \[0, 256\)"),
        (dict(prompts=[[3], [-1, 4]]), r"prompt 1: token id\(s\) \[-1\] outside"),
        (dict(prompts=["hello"]), "no tokenizer"),
        (dict(prompts="hello"), "non-empty list"),
        (dict(prompts=PROMPTS, mode="ar", lora=lora),
         r"lora is only used by modes \('linear_spec', 'quadratic_spec'\)"),
        (dict(prompts=PROMPTS, mode="diffusion", lora=lora), "lora is only used by modes"),
        (dict(prompts=PROMPTS, mode="quadratic_spec", block_size=33),
         r"quadratic_spec block_size \(the chain\) must be <= 32"),
        (dict(prompts=PROMPTS, mode="quadratic_spec", threshold=0.5), r"unknown option\(s\) \['threshold'\]"),
        (dict(prompts=PROMPTS, mode="linear_spec",
              lora=random_lora(dataclasses.replace(CFG, num_layers=3), jax.random.key(0))), "LoRA shape does not fit this model"),
        (dict(prompts=PROMPTS, mode="linear_spec",
              lora=random_lora(dataclasses.replace(CFG, hidden_size=32), jax.random.key(0))), r"\(8, 32\)\), model needs"),
        (dict(prompts=PROMPTS, seed=[1, 2]), "got 2 seeds for 4 prompts"),
        (dict(prompts=PROMPTS, loop="gpu"), "loop must be 'device' or 'python'"),
        (dict(prompts=PROMPTS, temperature=-1.0), "temperature must be >= 0"),
        (dict(prompts=PROMPTS, top_p=0.0), "top_p must be in"),
        (dict(prompts=PROMPTS, top_k=0), r"top_k must be an int in \[1, vocab_size=256\]"),
        (dict(prompts=PROMPTS, top_k=257), r"top_k must be an int in \[1, vocab_size=256\]"),
        (dict(prompts=[[5.5, 6]]), "prompt 0: token ids must be integers, got 5.5"),
        (dict(prompts=PROMPTS, seed=-1), r"seed must be an int in \[0, 2\*\*32\)"),
        (dict(prompts=PROMPTS, seed=1.5), "seed must be an int or one int per prompt"),
        (dict(prompts=PROMPTS, mode="diffusion", block_size=0), "block_size must be an int in"),
        (dict(prompts=PROMPTS, mode="ar", deterministic="yes"), "deterministic must be true or false, got 'yes'"),
        (dict(prompts=PROMPTS, mode="linear_spec", deterministic=True), r"unknown option\(s\) \['deterministic'\]"),
    ]
    for kw, msg in cases:
        kw = {**ok, **kw}
        with pytest.raises(ValueError, match=msg):
            g.generate(kw.pop("prompts"), **kw)
    with pytest.raises(ValueError, match="unknown mode"):
        next(g.stream(PROMPTS[0], mode="beam"))


def test_lora_for_a_model_with_another_head_layout_is_rejected_clearly(gens):
    """Same layer count and hidden size, different heads x head_dim: must be a clear LoRA error, not an einsum
    shape error from inside the jitted loop."""
    other = dataclasses.replace(CFG, num_heads=2, num_kv_heads=2)
    adapter = random_lora(other, jax.random.key(0))
    with pytest.raises(ValueError, match="LoRA"):
        gens[0].generate(PROMPTS, mode="linear_spec", max_new_tokens=8, lora=adapter)


def test_lora_false_is_accepted_for_every_mode(gens):
    res = run(gens[0], PROMPTS, "ar", lora=False)
    assert all(len(r.tokens) == MAX_NEW for r in res)


def test_max_new_tokens_bounds_are_exact(gens):
    """max_new_tokens=1 gives the prefill's token only, in every mode."""
    g = gens[0]
    full = toks(run(g, PROMPTS, "ar"))
    for mode, opts in MODES[:3]:
        res = run(g, PROMPTS, mode, max_new_tokens=1, **opts)
        assert toks(res) == [t[:1] for t in full]
        assert all(r.stats["decode_forward_passes"] == 0 for r in res)


def test_prefill_heads_only_each_rows_last_token(gens):
    """prefill runs the head on each row's last prompt token only: its logits are the full forward's at that
    position (ragged right-padded prompts), and the cache is advanced by each row's own length."""
    from nemodiff_jax.cache import KVCache
    from nemodiff_jax.decoding.common import Options, forward, prefill

    model, opts = gens[0].model, Options(mode="ar", attn_impl="xla")
    lens = jnp.array([6, 3, 1], jnp.int32)
    prompt = jnp.asarray(np.random.default_rng(0).integers(12, 99, (3, 6)), jnp.int32)
    cache = KVCache.init(CFG, 3, 64, jnp.float32)
    last, advanced = prefill(model, prompt, lens, cache, opts)
    full, _ = forward(model, prompt, cache, causal=True, opts=opts)
    assert last.shape == (3, CFG.vocab_size)
    np.testing.assert_allclose(last, full[jnp.arange(3), lens - 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(last, full[:, -1], atol=1e-3)  # rows 1 and 2 end before the padding
    np.testing.assert_array_equal(advanced.lengths, lens)
