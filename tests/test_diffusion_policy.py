"""Diffusion unmask policies (`diffusion.select`) and the denoise loop, on hand-controlled inputs.

1. `select` invariants, property-style over many random (conf, masked) draws.
2. `denoise` / `step` driven by a fake model that returns scripted logits per pass (the decoding code calls
   `model(tokens, positions, cache, causal=, lora=, attn_impl=)` and expects `(logits [B,T,V] f32, cache)`), so
   the commit schedule, the early exit on a stop token and the mask-id-as-seed case are checked against a
   schedule computed by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemodiff_jax.decoding import diffusion
from nemodiff_jax.decoding.common import Options, RowSettings, State

_select = jax.jit(diffusion.select, static_argnums=0)  # steps, threshold traced: one compile per policy


def random_case(seed: int, b: int = 64, slots: int = 16):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0, 1, (b, slots)).astype(np.float32)
    # some confidences exactly on the usual thresholds (the test is conf >= threshold)
    conf[rng.uniform(size=conf.shape) < 0.05] = 0.5
    density = rng.uniform(0, 1, (b, 1))
    masked = rng.uniform(size=(b, slots)) < density
    masked[: b // 8] = False  # some rows without any mask
    return conf, masked


# ----------------------------------------------------------------------------- select: threshold


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
def test_threshold_policy_invariants(threshold):
    for seed in range(25):
        conf, masked = random_case(seed)
        sel = np.asarray(_select("threshold", jnp.asarray(conf), jnp.asarray(masked), 0, 16, threshold))
        assert not (sel & ~masked).any(), "committed an unmasked slot"
        any_mask = masked.any(-1)
        assert (sel.sum(-1)[any_mask] >= 1).all(), "a step with masks left committed nothing"
        assert (sel.sum(-1)[~any_mask] == 0).all()
        assert (sel[masked & (conf >= threshold)]).all(), "a masked slot at/above the threshold was left"
        below = sel & (conf < threshold)
        assert (below.sum(-1) <= 1).all(), "more than the single top-1 below the threshold"
        for r in np.nonzero(below.any(-1))[0]:
            # only when nothing masked reaches the threshold, and then it is the most confident masked slot
            assert not (masked[r] & (conf[r] >= threshold)).any()
            assert conf[r][below[r]][0] == conf[r][masked[r]].max()
        # rows where nothing reaches the threshold commit exactly one slot
        none_reach = any_mask & ~(masked & (conf >= threshold)).any(-1)
        assert (sel.sum(-1)[none_reach] == 1).all()


def test_threshold_policy_hand_case():
    conf = jnp.array([[0.99, 0.5, 0.95, 0.3, 0.9, 0.1],
                      [0.99, 0.2, 0.3, 0.4, 0.1, 0.35]])
    masked = jnp.array([[False, True, True, True, True, True]] * 2)
    sel = np.asarray(_select("threshold", conf, masked, 0, 6, 0.9))
    np.testing.assert_array_equal(sel, [[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])


# ----------------------------------------------------------------------------- select: low_confidence / leftmost


def _k(n_masked, step_idx, steps):
    return -(-n_masked // max(steps - step_idx, 1))


def test_low_confidence_commits_the_k_most_confident():
    for seed in range(40):
        conf, masked = random_case(seed)
        conf = conf + np.arange(16, dtype=np.float32) * 1e-6  # distinct
        steps = 1 + seed % 16
        step_idx = seed % (steps + 2)  # past the last step too: then everything goes
        sel = np.asarray(_select("low_confidence", jnp.asarray(conf), jnp.asarray(masked), step_idx, steps, 0.9))
        assert not (sel & ~masked).any()
        for r in range(conf.shape[0]):
            n = int(masked[r].sum())
            assert sel[r].sum() == min(_k(n, step_idx, steps), n), (seed, r)
            if sel[r].any() and (masked[r] & ~sel[r]).any():
                assert conf[r][sel[r]].min() > conf[r][masked[r] & ~sel[r]].max()


def test_low_confidence_ties_take_the_lower_index():
    conf = jnp.array([[0.3, 0.5, 0.5, 0.5, 0.2]])
    masked = jnp.array([[True, True, True, True, True]])
    sel = np.asarray(_select("low_confidence", conf, masked, 0, 3, 0.0))  # k = ceil(5/3) = 2
    np.testing.assert_array_equal(sel, [[0, 1, 1, 0, 0]])


def test_leftmost_commits_a_prefix_of_the_masked_slots():
    for seed in range(40):
        conf, masked = random_case(seed)
        steps = 1 + seed % 16
        step_idx = seed % (steps + 2)
        sel = np.asarray(_select("leftmost", jnp.asarray(conf), jnp.asarray(masked), step_idx, steps, 0.9))
        for r in range(conf.shape[0]):
            idx = np.nonzero(masked[r])[0]
            k = min(_k(len(idx), step_idx, steps), len(idx))
            expected = np.zeros(16, bool)
            expected[idx[:k]] = True
            np.testing.assert_array_equal(sel[r], expected, err_msg=f"seed {seed} row {r}")


def test_every_mask_gone_after_the_scheduled_steps():
    """Iterating low_confidence / leftmost for `steps` steps unmasks everything, one schedule step at a time."""
    rng = np.random.default_rng(0)
    for policy in ("low_confidence", "leftmost"):
        for steps in (1, 3, 7, 8):
            masked = jnp.asarray(np.arange(8)[None].repeat(4, 0) > 0)
            for s in range(steps):
                conf = jnp.asarray(rng.uniform(size=(4, 8)).astype(np.float32))
                masked = masked & ~_select(policy, conf, masked, s, steps, 0.9)
            assert not np.asarray(masked).any(), (policy, steps)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown diffusion policy"):
        diffusion.select("random", jnp.ones((1, 4)), jnp.ones((1, 4), bool), 0, 4, 0.9)


# ----------------------------------------------------------------------------- scripted fake model

V, L, MASK, STOP = 16, 6, 5, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeCache:
    lengths: jax.Array  # [B]
    calls: jax.Array  # [] passes so far
    seen: jax.Array  # [S, B, L] block fed at each pass
    causal: jax.Array  # [S] the pass was causal

    def advance(self, counts):
        return dataclasses.replace(self, lengths=self.lengths + counts)


class FakeModel:
    """Returns table[pass index] as the logits and records what it was fed."""

    def __init__(self, table: np.ndarray):
        self.table = jnp.asarray(table, jnp.float32)  # [S, B, L, V]

    def __call__(self, tokens, positions, cache, *, causal, lora=None, attn_impl="xla"):
        i = jnp.minimum(cache.calls, self.table.shape[0] - 1)
        np.testing.assert_array_equal(positions.shape, tokens.shape)
        cache = dataclasses.replace(cache, calls=cache.calls + 1, seen=cache.seen.at[i].set(tokens),
                                    causal=cache.causal.at[i].set(causal))
        return self.table[i], cache


def logit_row(tok: int, p: float, mask_p: float | None = None) -> np.ndarray:
    """log-probs with `tok` at prob p, optionally the mask id at mask_p, the rest uniform."""
    probs = np.zeros(V)
    probs[tok] = p
    rest = [v for v in range(V) if v != tok and (mask_p is None or v != MASK)]
    if mask_p is not None:
        probs[MASK] = mask_p
    probs[rest] = (1 - probs.sum()) / len(rest)
    return np.log(probs)


# Scripted (token, prob) per pass, row, slot. Slot entries for slots already committed by then are (1, 0.99):
# they must never be taken. Row 0 seed 7; row 1 seed == the mask id (a real token, never re-committed).
SCRIPT = [
    [  # pass 0
        [(9, .99), (8, .5), (10, .95), (12, .3), (13, .92), (14, .3, .6)],  # slot 5: mask id argmax (excluded)
        [(9, .99), (4, .2), (6, .3), (STOP, .95), (7, .1), (8, .1)],
    ],
    [  # pass 1
        [(9, .99), (8, .4), (1, .99), (12, .6), (1, .99), (14, .2)],
        [(9, .99), (4, .97), (6, .96), (STOP, .5), (7, .2), (8, .1)],
    ],
    [  # pass 2
        [(9, .99), (8, .91), (1, .99), (1, .99), (1, .99), (15, .905)],
        [(9, .99), (2, .99), (2, .99), (2, .99), (7, .95), (8, .95)],
    ],
    [  # pass 3 (the commit pass in step(); a 4th denoise pass would be wrong for every policy here)
        [(9, .99), (9, .99), (9, .99), (9, .99), (9, .99), (11, .8)],
        [(9, .99), (9, .99), (9, .99), (9, .99), (9, .99), (13, .8)],
    ],
]


def script_table() -> np.ndarray:
    t = np.zeros((len(SCRIPT), 2, L, V), np.float32)
    for s, rows in enumerate(SCRIPT):
        for b, slots in enumerate(rows):
            for i, entry in enumerate(slots):
                t[s, b, i] = logit_row(*entry)
    return t


def fake_state(seed_tokens, steps=None):
    b = len(seed_tokens)
    z = jnp.zeros((b,), jnp.int32)
    cache = FakeCache(lengths=jnp.array([10, 20], jnp.int32), calls=jnp.int32(0),
                      seen=jnp.full((len(SCRIPT), b, L), -1, jnp.int32), causal=jnp.zeros((len(SCRIPT),), bool))
    out = jnp.zeros((b, 64), jnp.int32).at[:, 0].set(jnp.asarray(seed_tokens))
    return State(cache=cache, out=out, n_out=jnp.ones((b,), jnp.int32), done=jnp.zeros((b,), bool),
                 seed=jnp.asarray(seed_tokens, jnp.int32), keys=jax.vmap(jax.random.key)(jnp.arange(b)),
                 rows=RowSettings.make([100] * b, [0.0] * b, [None] * b, [None] * b, [(STOP,)] * b, [0.9] * b,
                                       [steps or L] * b),
                 lora=None, passes=z, rounds=z, work=z, total_passes=jnp.int32(0))


def opts_for(policy):
    return Options(mode="diffusion", block=L, policy=policy, mask_id=MASK)


M = MASK
# Hand schedules. threshold 0.9:
#   row 0: pass 0 commits slots 2 (.95) and 4 (.92) (slot 5's argmax is the mask id: excluded, 14 at .3);
#          pass 1: nothing >= .9, top-1 = slot 3 (.6); pass 2: slots 1 (.91) and 5 (.905). 3 passes.
#   row 1: pass 0 commits the stop at slot 3 (.95), masks before it remain; pass 1 commits slots 1, 2 ->
#          stop with no mask before: early exit, slots 4, 5 stay masked. 2 passes.
# low_confidence, steps=3 (k = ceil(masks / remaining steps)):
#   row 0: pass 0 k=ceil(5/3)=2 -> slots 2, 4; pass 1 k=ceil(3/2)=2 -> slots 3 (.6), 1 (.4); pass 2 k=1 -> 5.
#   row 1: pass 0 k=2 -> slots 3 (.95), 2 (.3); pass 1 k=2 of {1 .97, 4 .2, 5 .1} -> 1, 4 -> settled.
# leftmost, steps=3: same k, leftmost masked slots.
#   row 0: pass 0 -> 1, 2 (8, 10); pass 1 -> 3, 4 (12, 1); pass 2 -> 5 (15).
#   row 1: pass 0 -> 1, 2 (4, 6); pass 1 -> 3, 4 (STOP, 7) -> settled.
# low_confidence, default steps (= L = 6): k = ceil(masks / remaining) = 1 per pass.
#   row 0: pass 0 slot 2 (10, .95); pass 1 slot 4 (1, .99: masked here); pass 2 slot 3 (1, .99);
#          pass 3 slot 1 (9, .99); pass 4 (script repeats pass 3) slot 5 (11). 5 passes.
#   row 1: pass 0 slot 3 (stop); pass 1 slot 1 (4, .97); pass 2 slot 2 (2, .99) -> settled. 3 passes.
CASES = {
    ("threshold", None): dict(
        blocks=[[[7, M, M, M, M, M], [7, M, 10, M, 13, M], [7, M, 10, 12, 13, M]],
                [[M, M, M, M, M, M], [M, M, M, STOP, M, M], None]],
        final=[[7, 8, 10, 12, 13, 15], [M, 4, 6, STOP, M, M]], nsteps=[3, 2]),
    ("low_confidence", 3): dict(
        blocks=[[[7, M, M, M, M, M], [7, M, 10, M, 13, M], [7, 8, 10, 12, 13, M]],
                [[M, M, M, M, M, M], [M, M, 6, STOP, M, M], None]],
        final=[[7, 8, 10, 12, 13, 15], [M, 4, 6, STOP, 7, M]], nsteps=[3, 2]),
    ("leftmost", 3): dict(
        blocks=[[[7, M, M, M, M, M], [7, 8, 10, M, M, M], [7, 8, 10, 12, 1, M]],
                [[M, M, M, M, M, M], [M, 4, 6, M, M, M], None]],
        final=[[7, 8, 10, 12, 1, 15], [M, 4, 6, STOP, 7, M]], nsteps=[3, 2]),
}


@pytest.mark.parametrize("policy, steps", list(CASES))
def test_denoise_follows_the_hand_schedule(policy, steps):
    case = CASES[(policy, steps)]
    st = fake_state([7, MASK], steps)
    block, masked = diffusion.new_block(st.seed, L, MASK)
    model = FakeModel(script_table())
    out, cache, nsteps, k = diffusion.denoise(model, st, block, masked, st.cache, opts_for(policy))
    np.testing.assert_array_equal(np.asarray(out), case["final"])
    np.testing.assert_array_equal(np.asarray(nsteps), case["nsteps"])
    assert int(k) == max(case["nsteps"]) == int(cache.calls)
    assert not np.asarray(cache.causal)[:3].any()  # denoise passes are bidirectional
    seen = np.asarray(cache.seen)
    for b in range(2):
        for s, expected in enumerate(case["blocks"][b]):
            if expected is not None:
                np.testing.assert_array_equal(seen[s, b], expected, err_msg=f"pass {s} row {b}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 20])  # denoise never advances the cache


def test_threshold_policy_with_a_step_limit_leaves_no_mask():
    """steps=2 with the threshold policy: row 0 commits 2 slots in pass 0 and 1 in pass 1 (see CASES), so two
    masks are left when the step budget runs out. The last allowed pass must reveal every remaining mask (as
    vLLM's confidence_threshold sampler does) or the option must be rejected; leaving them emits mask ids."""
    st = fake_state([7, MASK], steps=2)
    block, masked = diffusion.new_block(st.seed, L, MASK)
    out, _, nsteps, _ = diffusion.denoise(FakeModel(script_table()), st, block, masked, st.cache,
                                          opts_for("threshold"))
    assert int(nsteps[0]) <= 2
    assert MASK not in np.asarray(out)[0].tolist(), np.asarray(out)[0]


def test_denoise_low_confidence_default_steps_one_per_pass():
    st = fake_state([7, MASK])
    block, masked = diffusion.new_block(st.seed, L, MASK)
    out, cache, nsteps, k = diffusion.denoise(FakeModel(script_table()), st, block, masked, st.cache,
                                              opts_for("low_confidence"))
    seen = np.asarray(cache.seen)
    np.testing.assert_array_equal(seen[1], [[7, M, 10, M, M, M], [M, M, M, STOP, M, M]])
    np.testing.assert_array_equal(seen[2], [[7, M, 10, M, 1, M], [M, 4, M, STOP, M, M]])
    np.testing.assert_array_equal(np.asarray(out), [[7, 9, 10, 1, 1, 11], [M, 4, 2, STOP, M, M]])
    np.testing.assert_array_equal(np.asarray(nsteps), [5, 3])  # five masks one per pass; row 1 exits early
    assert int(k) == 5


def test_done_rows_are_not_denoised():
    st = fake_state([7, MASK])
    st = dataclasses.replace(st, done=jnp.array([False, True]))
    block, masked = diffusion.new_block(st.seed, L, MASK)
    out, _, nsteps, _ = diffusion.denoise(FakeModel(script_table()), st, block, masked, st.cache,
                                          opts_for("threshold"))
    np.testing.assert_array_equal(np.asarray(out)[1], [M] * L)
    np.testing.assert_array_equal(np.asarray(nsteps), [3, 0])


def test_step_commits_block_and_seeds_next_from_causal_logits():
    """Full diffusion.step on the scripted model: 3 / 2 denoise passes, then the causal commit (pass 3) whose
    last-slot logits give the next seed; emitted = block[1:] + seed; stats counted per row."""
    st = fake_state([7, MASK])
    new = diffusion.step(FakeModel(script_table()), st, opts_for("threshold"))
    np.testing.assert_array_equal(np.asarray(new.cache.seen)[3], [[7, 8, 10, 12, 13, 15], [M, 4, 6, STOP, M, M]])
    assert bool(new.cache.causal[3]) and not np.asarray(new.cache.causal)[:3].any()
    np.testing.assert_array_equal(np.asarray(new.seed), [11, 13])
    np.testing.assert_array_equal(np.asarray(new.out)[:, :L + 1],
                                  [[7, 8, 10, 12, 13, 15, 11], [M, 4, 6, STOP, M, M, 13]])
    np.testing.assert_array_equal(np.asarray(new.n_out), [1 + L, 1 + L])
    np.testing.assert_array_equal(np.asarray(new.done), [False, True])  # row 1 emitted the stop token
    np.testing.assert_array_equal(np.asarray(new.cache.lengths), [10 + L, 20 + L])
    np.testing.assert_array_equal(np.asarray(new.passes), [4, 3])
    np.testing.assert_array_equal(np.asarray(new.work), [3, 2])
    np.testing.assert_array_equal(np.asarray(new.rounds), [1, 1])
    assert int(new.total_passes) == 4


def test_settled_tracks_masks_by_slot_not_by_value():
    stops = jnp.array([[STOP, -1]] * 4, jnp.int32)  # each row's stop ids, -1 padded
    block = jnp.array([[M, STOP, M, M], [M, M, STOP, 2], [M, 4, 2, 2], [STOP, M, M, M]])
    masked = jnp.array([[False, False, True, True], [False, True, False, False], [False, False, False, False],
                        [False, True, True, True]])
    np.testing.assert_array_equal(np.asarray(diffusion.settled(block, masked, stops)), [True, False, True, True])
