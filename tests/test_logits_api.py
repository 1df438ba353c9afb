"""The public entry points: `nemodiff_jax.load` errors and `Generator.logits` input checks and batching."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import nemodiff_jax
from nemodiff_jax.convert.hf import save_hf
from nemodiff_jax.config import PRESETS
from nemodiff_jax.model import abstract_model

# Original context 8 < T = 12: the Llama-4 query scale depends on absolute positions (RoPE alone is shift-invariant,
# so without it a wrong position offset would go unnoticed).
CFG = PRESETS["tiny"].replace(rope_original_max_position_embeddings=8, max_position_embeddings=32)


def random_model(dtype, seed=0):
    graphdef, state = nnx.split(abstract_model(CFG, dtype))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray((1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
        return jnp.asarray((rng.standard_normal(leaf.shape) * leaf.shape[0] ** -0.5).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(random_model(jnp.float32), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def gen(checkpoint):
    return nemodiff_jax.load(checkpoint, dtype="float32", progress=False)


# ------------------------------------------------------------------ load


def test_load_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'}: not a directory"):
        nemodiff_jax.load(tmp_path / "nope")


def test_load_file_instead_of_dir(checkpoint):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        nemodiff_jax.load(checkpoint / "config.json")


def test_load_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no config.json"):
        nemodiff_jax.load(tmp_path)


@pytest.mark.parametrize("dtype", ["fp32", "float16", "bf16", "int8"])
def test_load_bad_dtype(checkpoint, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be one of \['bfloat16', 'float32'\], got '{dtype}'"):
        nemodiff_jax.load(checkpoint, dtype=dtype)


def test_load_bad_dtype_checked_before_path(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        nemodiff_jax.load(tmp_path / "nope", dtype="fp8")


def test_load_dtypes(checkpoint, gen):
    assert gen.dtype == jnp.float32 and gen.config == CFG.replace(torch_dtype="float32")
    assert gen.tokenizer is None  # weights-only directory
    bf = nemodiff_jax.load(checkpoint, dtype="bfloat16", progress=False)
    assert bf.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf.model))} == {np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------ logits


@pytest.mark.parametrize("ids,match", [
    ([[1, 2, CFG.vocab_size]], rf"token ids must lie in \[0, {CFG.vocab_size}\), got \[1, {CFG.vocab_size}\]"),
    ([[-1, 2, 3]], r"token ids must lie in \[0, 256\), got \[-1, 3\]"),
    ([[]], r"non-empty \[B, T\] integer array, got shape \(1, 0\)"),
    ([], r"non-empty \[B, T\] integer array, got shape \(1, 0\)"),
    (np.zeros((2, 0), np.int32), r"non-empty \[B, T\] integer array, got shape \(2, 0\)"),
    (np.zeros((1, 2, 3), np.int32), r"got shape \(1, 2, 3\)"),
    ([[1.0, 2.0]], r"integer array, got shape \(1, 2\) dtype float64"),
])
def test_logits_rejects_bad_input(gen, ids, match):
    with pytest.raises(ValueError, match=match):
        gen.logits(ids)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_logits_batch_rows_equal_single(gen, causal):
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    out = gen.logits(ids, causal=causal)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 12, CFG.vocab_size)
    assert np.all(np.isfinite(out))
    for i in range(2):
        single = gen.logits(ids[i], causal=causal)  # 1-D input is one row
        assert single.shape == (1, 12, CFG.vocab_size)
        np.testing.assert_allclose(out[i], single[0], rtol=1e-5, atol=1e-5, err_msg=f"row {i}")
    assert np.abs(out[0] - out[1]).max() > 1e-2  # rows differ, so a row mix-up would show
    np.testing.assert_allclose(gen.logits(ids[::-1], causal=causal), out[::-1], rtol=1e-5, atol=1e-5)


def test_logits_match_model_forward_at_positions_from_zero(gen):
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    graphdef, state = nnx.split(gen.model)
    forward = jax.jit(lambda state, ids, pos: nnx.merge(graphdef, state)(ids, pos, None, causal=True)[0])
    want = forward(state, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(12), (2, 12)))
    np.testing.assert_allclose(gen.logits(ids), np.asarray(want), rtol=1e-5, atol=1e-5)
    shifted = forward(state, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(1, 13), (2, 12)))
    assert np.abs(np.asarray(shifted) - np.asarray(want)).max() > 1e-3  # positions are observable


def test_causal_logits_ignore_later_tokens(gen):
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % CFG.vocab_size
    # causal logits at t depend only on tokens <= t; bidirectional ones see the whole input
    np.testing.assert_allclose(gen.logits(changed)[:, :-1], gen.logits(ids)[:, :-1], rtol=1e-5, atol=1e-5)
    assert np.abs(gen.logits(changed, causal=False)[:, 0] - gen.logits(ids, causal=False)[:, 0]).max() > 1e-4


def test_logits_accepts_python_lists_and_int64(gen):
    ids = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    a = gen.logits(ids)
    b = gen.logits(np.asarray(ids, np.int64))
    np.testing.assert_array_equal(a, b)
