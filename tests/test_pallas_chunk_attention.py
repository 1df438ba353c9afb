"""Pallas chunk attention (pallas_kernels/chunk_attention.py) on CPU.

1. Under the Mosaic GPU interpreter: it runs the kernel body itself (warpgroup threads, TMA copies, mbarriers,
   wgmma, SMEM/GMEM), raising on out-of-bounds reads, with uninitialised SMEM filled with NaN, and checking at
   deallocation that every barrier phase was waited for. It does not model asynchrony (copies and wgmma complete
   at once) or register layouts, and it runs the `pv_from_smem` variant of the PV step (module docstring).
   Each case runs the kernel once over a cache poisoned past every row's limit: NaN from slot
   max(round_up(limit, 8), block_kv) on (the kernel must never load those), large finite values in between
   (they may be loaded, for the 8-slot TMA alignment or a limit below block_kv, and must get exactly zero
   weight). It is compared with the pure-jnp reference (same NaN cache) and with
   nemodiff_jax.attention.chunk_attention(impl="xla") (which reads the whole capacity, so it gets the finite
   poison everywhere). Tolerances: float32 1e-5; bfloat16 1e-2 relative to the output's scale.
2. The compiled path's configurations are lowered for CUDA (Mosaic GPU layout inference and dialect lowering,
   SMEM budget), which needs no GPU. Running it is scripts/gpu_kernels.py's job.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemodiff_jax.attention import chunk_attention
from nemodiff_jax.decoding import quadratic
from nemodiff_jax.pallas_kernels.chunk_attention import (BlockSizes, auto_num_splits, canvas_within,
                                                         chunk_attention_pallas, chunk_attention_reference)

POISON_K, POISON_V = 100.0, 1e4  # would dominate the softmax / the output if ever given weight


def make_inputs(b, t, n, kh, h, s, lengths, dtype, block_kv, seed=0):
    """q [B,T,N,H]; caches [B,S,K,H] poisoned past each row's limit: (nan_cache, finite_cache)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h), np.float32)
    k = rng.standard_normal((b, s, kh, h), np.float32)
    v = rng.standard_normal((b, s, kh, h), np.float32)
    k_nan, v_nan = k.copy(), v.copy()
    for row, length in enumerate(lengths):
        limit = length + t
        assert limit <= s
        k[row, limit:], v[row, limit:] = POISON_K, POISON_V
        k_nan[row, limit:], v_nan[row, limit:] = POISON_K, POISON_V
        horizon = max(-(-limit // 8) * 8, block_kv)  # the kernel's load horizon (module docstring)
        k_nan[row, horizon:], v_nan[row, horizon:] = np.nan, np.nan
    cast = lambda x: jnp.asarray(x, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    return cast(q), (cast(k_nan), cast(v_nan)), (cast(k), cast(v)), lengths


def assert_close(out, ref, dtype, what):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), f"{what}: non-finite output"
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=what)
    else:
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert rel < 1e-2, f"{what}: max error {rel:.3g} of the output scale"


# (B, T, N, K, H, S, lengths, dtype, block, masks): lengths are ragged and mostly not multiples of block_kv; they
# include limits below block_kv, exactly at capacity, and rows with fewer blocks than splits (empty splits).
# Kept small: the interpreter runs every CTA's warpgroups op by op (about 0.1-0.3 s per CTA).
BOTH, CAUSAL, BIDIR = (True, False), (True,), (False,)
CASES = {
    # T=32, GQA 4: 128 folded rows = two compute warpgroups; ring of 2 so the refill loop runs; row 0 leaves
    # split 1 empty
    "t32_g4_b3_f32": (3, 32, 4, 1, 32, 304, [0, 37, 272], jnp.float32, BlockSizes(64, 2, num_splits=2), BOTH),
    # GQA 8: 256 rows = two query tiles of 128 per kv head (per-tile causal limits); several 32-slot blocks
    # per split, so the ring wraps around
    "t32_g8_b1_f32_bk32": (1, 32, 8, 1, 32, 264, [201], jnp.float32, BlockSizes(32, 2, num_splits=2), CAUSAL),
    # GQA 1 with two kv heads, T=32 (32 rows padded to one warpgroup), bf16, no split
    "t32_g1_b3_bf16": (3, 32, 2, 2, 64, 200, [5, 100, 150], jnp.bfloat16, BlockSizes(64, 3, num_splits=1), CAUSAL),
    # AR decode T=1 (causal and bidirectional masks coincide), GQA 4: 4 real rows (8 loaded) of a 64-row tile
    "t1_g4_b3_bf16": (3, 1, 4, 1, 32, 152, [151, 0, 63], jnp.bfloat16, BlockSizes(64, 2, num_splits=2), CAUSAL),
    # two kv heads (kv head k serves query heads kG..kG+G-1), automatic split count
    "t1_g4_k2_b1_f32_auto_splits": (1, 1, 8, 2, 64, 104, [70], jnp.float32, BlockSizes(64, 2), BIDIR),
}
PARAMS = [pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'bidir'}")
          for name, case in CASES.items() for causal in case[-1]]


# With T*G < 64 (decode) a CTA loads only the real query rows; the rest of the 64-row wgmma tile is uninitialised
# SMEM, NaN under the interpreter. Those rows are never stored, and the finite, correct outputs show they stay put.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("name,causal", PARAMS)
def test_kernel_matches_reference_and_xla(name, causal):
    b, t, n, kh, h, s, lengths, dtype, block, _ = CASES[name]
    q, (k_nan, v_nan), (k, v), lens = make_inputs(b, t, n, kh, h, s, lengths, dtype, block.block_kv)
    out = chunk_attention_pallas(q, k_nan, v_nan, lens, causal=causal, block=block, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = chunk_attention_reference(q, k_nan, v_nan, lens, causal=causal)
    assert_close(out, ref, dtype, f"{name} vs reference")
    xla = chunk_attention(q, k, v, lens, causal=causal, impl="xla")
    assert_close(out, xla, dtype, f"{name} vs xla")


# quadratic_spec's canvas (chain J: T = J(J+1)), its mask computed in the kernel from row and slot indices:
# (B, chain, N, K, H, S, lengths, block). GQA 16 at J=3: 192 folded rows = two query tiles per kv head.
CANVAS_CASES = {
    "j2_g2_b2": (2, 2, 2, 1, 32, 136, [0, 71], BlockSizes(64, 2, num_splits=2)),
    "j3_g16_b1": (1, 3, 16, 1, 32, 128, [50], BlockSizes(32, 2, num_splits=1)),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("name", CANVAS_CASES)
def test_canvas_mask_matches_reference_and_xla(name):
    b, chain, n, kh, h, s, lengths, block = CANVAS_CASES[name]
    within = quadratic.canvas(chain)[1]
    np.testing.assert_array_equal(canvas_within(chain), within)  # the kernel's formula is the mode's table
    t = within.shape[0]
    q, (k_nan, v_nan), (k, v), lens = make_inputs(b, t, n, kh, h, s, lengths, jnp.float32, block.block_kv)
    out = chunk_attention_pallas(q, k_nan, v_nan, lens, causal=True, block=block, interpret=True, chain=chain)
    ref = chunk_attention_reference(q, k_nan, v_nan, lens, causal=True, within=within)
    assert_close(out, ref, jnp.float32, f"{name} vs reference")
    xla = chunk_attention(q, k, v, lens, causal=True, impl="xla", within=within)
    assert_close(out, xla, jnp.float32, f"{name} vs xla")
    causal = chunk_attention_reference(q, k_nan, v_nan, lens, causal=True)
    assert np.abs(np.asarray(out) - np.asarray(causal)).max() > 1e-2  # the canvas is not the causal mask
    with pytest.raises(ValueError, match="a canvas of chain 2 has 6 queries"):
        chunk_attention_pallas(q[:, :5], k_nan, v_nan, lens, causal=True, interpret=True, chain=2)


def test_the_canvas_is_recognised():
    """attention.chunk_attention hands the kernel a `within` table only when it is a canvas (the kernel computes
    that one mask itself); any other table keeps cuDNN / XLA."""
    from nemodiff_jax.attention import _canvas_chain

    for j in (1, 2, 8):
        assert _canvas_chain(quadratic.canvas(j)[1]) == j
    other = quadratic.canvas(2)[1].copy()
    other[0, 1] = True
    assert _canvas_chain(other) == 0
    assert _canvas_chain(np.tril(np.ones((6, 6), bool))) == 0 and _canvas_chain(np.ones((5, 5), bool)) == 0


# Compiled-path configurations (8B heads N=32, K=8, H=128), lowered for CUDA on this CPU machine: runs the Mosaic GPU
# lowering (layout inference, TMA/tiling divisibility, SMEM budget) without a GPU. Not a substitute for running.
LOWERINGS = [dict(t=t, causal=c, block=BlockSizes()) for t in (1, 32) for c in (True, False)] + [
    dict(t=32, causal=True, block=BlockSizes(pv_from_smem=True)),  # the variant the interpreter runs
    dict(t=32, causal=True, block=BlockSizes(), n=64),  # GQA 8: two query tiles per kv head
    dict(t=1, causal=True, block=BlockSizes(128, 2), dtype=jnp.float16),
    dict(t=32, causal=True, block=BlockSizes(128, 1)),
    dict(t=72, causal=True, block=BlockSizes(), chain=8),  # quadratic_spec's default canvas: 288 rows, 3 q tiles
    *(dict(t=j * (j + 1), causal=True, block=BlockSizes(), chain=j) for j in (2, 4, 16, 32)),  # the other chains
]


def test_compiled_path_lowers_for_cuda():
    failures = []
    for cfg in LOWERINGS:
        t, n, dtype = cfg["t"], cfg.get("n", 32), cfg.get("dtype", jnp.bfloat16)
        args = (jax.ShapeDtypeStruct((2, t, n, 128), dtype), jax.ShapeDtypeStruct((2, 1024, 8, 128), dtype),
                jax.ShapeDtypeStruct((2, 1024, 8, 128), dtype), jax.ShapeDtypeStruct((2,), jnp.int32))
        fn = jax.jit(functools.partial(chunk_attention_pallas, causal=cfg["causal"], block=cfg["block"],
                                       chain=cfg.get("chain", 0)))
        try:
            fn.trace(*args).lower(lowering_platforms=("cuda",))
        except Exception as e:  # noqa: BLE001 - collect every failing configuration
            failures.append(f"{cfg}: {type(e).__name__}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)


def test_auto_num_splits():
    assert auto_num_splits(1, 8, 32768, BlockSizes()) == 16  # 8 CTAs -> fill 132 SMs
    assert auto_num_splits(64, 8, 32768, BlockSizes()) == 1
    assert auto_num_splits(1, 1, 100, BlockSizes()) == 2  # no more splits than blocks
    assert auto_num_splits(1, 8, 4096, BlockSizes(num_splits=5)) == 5


def test_bad_input():
    q = jnp.zeros((2, 32, 8, 64), jnp.bfloat16)
    k = jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
    lens = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="capacity"):
        chunk_attention_pallas(q, k[:, :32], k[:, :32], lens, causal=True)  # S < block_kv
    with pytest.raises(ValueError, match="multiple of 8"):
        chunk_attention_pallas(q, k[:, :100], k[:, :100], lens, causal=True)
    with pytest.raises(ValueError, match="shape mismatch"):
        chunk_attention_pallas(q, k, k[:, :, :1], lens, causal=True)
    with pytest.raises(ValueError, match="lengths"):
        chunk_attention_pallas(q, k, k, lens[:1], causal=True)
    with pytest.raises(NotImplementedError, match="bf16"):
        chunk_attention_pallas(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32), lens,
                               causal=True)
    with pytest.raises(ValueError, match="block_kv"):
        BlockSizes(block_kv=24)
    # configurations the Mosaic GPU compiler rejects (seen on an H200) are clear errors before it runs
    q8b = jnp.zeros((1, 32, 32, 128), jnp.bfloat16)
    k8b = jnp.zeros((1, 1024, 8, 128), jnp.bfloat16)
    lens1 = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="multiple of 64"):
        chunk_attention_pallas(q8b, k8b, k8b, lens1, causal=True, block=BlockSizes(32, 6))
    with pytest.raises(ValueError, match="multiple of 64"):
        chunk_attention_pallas(q8b, k8b, k8b, lens1, causal=True, block=BlockSizes(32, 6, pv_from_smem=True))
    for block in (BlockSizes(128, 2), BlockSizes(64, 4)):  # 2 compute warpgroups at T=32, G=4, H=128
        with pytest.raises(ValueError, match="shared memory"):
            chunk_attention_pallas(q8b, k8b, k8b, lens1, causal=True, block=block)


def test_canvas_within_first_asked_for_inside_a_trace():
    """The dispatch (attention._canvas_chain) first builds the table while a forward is being traced, as
    `nemodiff bench --attn pallas` did on the GPU: it must come out as a concrete table there too."""
    canvas_within.cache_clear()
    seen = []
    jax.jit(lambda x: seen.append(canvas_within(4)) or x)(jnp.zeros(()))
    np.testing.assert_array_equal(seen[0], quadratic.canvas(4)[1])
