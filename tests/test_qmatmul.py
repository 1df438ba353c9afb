"""The int8 / int4 matmul kernel (pallas_kernels/qmatmul.py) and the path table (nemodiff_jax/quant.py).

1. Under the Mosaic GPU interpreter on CPU (its TMA copies, barriers, wgmma; uninitialised memory is NaN, a
   race detector on): every case is compared with the kernel file's pure-jnp float32 oracle and with quant.py's
   reference (the XLA path the model takes on a CPU). The cases cover one and several stream-K slots per tile,
   ragged M (padding rows), several M tiles and a CTA whose range spans three N tiles. Tolerance: 1e-5 of the
   output's scale in float32 (summation order only).
2. The compiled path is lowered for CUDA on this machine (Mosaic GPU layout inference and lowering, no GPU).
3. `gpu`-marked: the compiled kernel at the 8B's shapes against the oracle on the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from nemodiff_jax import quant
from nemodiff_jax.attention import DeviceInfo
from nemodiff_jax.pallas_kernels import qmatmul as qm


def _inputs(fmt, m, n, k, seed=0):
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32) * 0.05
    qw = quant.quantize(w, fmt)
    x = (jax.random.normal(jax.random.key(seed + 1), (m, k), jnp.float32)).astype(jnp.bfloat16)
    return x, qw


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    return float(np.abs(a - b).max() / np.abs(b).max())


# (fmt, M, N, K, CTAs): slots per tile 1 and 2+, ragged M, two M tiles, a CTA over three tiles (6 tiles x 1 step
# over 2 CTAs)
# The tilings: (compute warpgroups, row tiles per warpgroup, 128-input sub-steps per stage)
CASES = [("int8", 3, 256, 512, 3, (2, 1, 1)), ("int4", 3, 256, 512, 3, (2, 1, 1)), ("int8", 17, 512, 256, 7, (2, 1, 1)),
         ("int4", 130, 384, 384, 4, (2, 1, 1)), ("int8", 8, 768, 128, 2, (2, 1, 1)),
         ("int4", 1, 256, 256, 1, (2, 1, 1)),
         ("int8", 5, 1024, 1024, 5, (4, 1, 1)), ("int4", 33, 1024, 1024, 3, (2, 2, 2)),
         ("int4", 9, 512, 768, 4, (4, 1, 2)),
         ("int8", 3, 256, 512, 3, (2, 1, 2)), ("int8", 8, 768, 256, 2, (2, 1, 2)),
         # M = 130: two balanced M tiles of 72 rows; one N tile split over 5 CTAs
         ("int8", 130, 256, 256, 2, (2, 1, 1)), ("int4", 1, 128, 1024, 5, (2, 1, 2))]


@pytest.mark.parametrize("fmt, m, n, k, ctas, tiling", CASES)
def test_kernel_matches_reference_under_interpreter(fmt, m, n, k, ctas, tiling):
    x, qw = _inputs(fmt, m, n, k)
    wgs, rows, k_sub = tiling
    config = qm.QMatmulConfig(wgs, rows, k_sub, num_ctas=ctas, max_stages=3)
    got = qm.qmatmul_pallas(x, qw.q, qw.scale, out_dtype=jnp.float32, config=config,
                            interpret=plgpu.InterpretGPUParams(detect_races=True))
    plan = qm.make_plan(m, n, k, fmt, config, qm.DEFAULT_NUM_SMS)
    assert (plan.compute_wgs, plan.row_tiles) == (wgs, rows)
    assert plan.k_sub == (k_sub if k % (128 * k_sub) == 0 else 1)
    assert got.shape == (m, n)
    assert _rel(got, qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)) < 1e-5, plan
    assert _rel(got, quant.matmul_reference(x, qw, jnp.float32)) < 1e-5, plan


@pytest.mark.parametrize("fmt, m, k_sub", [("int8", 3, 2), ("int4", 1, 2), ("int4", 17, 1), ("int8", 8, 4)])
def test_tiled_weights_match_reference_under_interpreter(fmt, m, k_sub):
    """The same kernel reading quant.tile_q's layout ([N/128, K/128, 128, 128], each block contiguous)."""
    x, qw = _inputs(fmt, m, 384, 512)
    qt = quant.tile_q(qw.q)
    assert qt.shape == (3, 4, 128, 128)
    np.testing.assert_array_equal(np.asarray(quant.rows(qt), np.int8), np.asarray(qw.q, np.int8))
    np.testing.assert_array_equal(np.asarray(qt[1, 2], np.int8), np.asarray(qw.q[128:256, 256:384], np.int8))
    config = qm.QMatmulConfig(k_sub=k_sub, num_ctas=5, max_stages=3)
    got = qm.qmatmul_pallas(x, qt, qw.scale, out_dtype=jnp.float32, config=config,
                            interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert _rel(got, qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)) < 1e-5
    with pytest.raises(ValueError, match="tiled"):
        qm.qmatmul_pallas(x, qt.reshape(3, 4, 64, 256), qw.scale, interpret=True)


def test_stream_k_schedule_covers_every_step_once():
    for n_tiles, k_iters, ctas in [(48, 32, 132), (32, 112, 132), (1024, 32, 132), (3, 3, 5), (6, 1, 2), (1, 4, 4)]:
        total = n_tiles * k_iters
        g = min(ctas, total)
        owners = [qm.cta_of(i, total, g) for i in range(total)]
        starts = [c * total // g for c in range(g)]
        assert owners == sorted(owners) and all(owners[s] == c for c, s in enumerate(starts))
        counts = np.bincount(owners, minlength=g)
        assert counts.max() - counts.min() <= 1  # an even split
        slots = max(owners[(t + 1) * k_iters - 1] - owners[t * k_iters] + 1 for t in range(n_tiles))
        plan = qm.make_plan(8, n_tiles * qm.BLOCK_N, k_iters * qm.BLOCK_K, "int8",
                            qm.QMatmulConfig(2, 1, 1, num_ctas=g), g)
        assert plan.slots == slots and qm.written(plan).sum() == len({(o, i // k_iters) for i, o in enumerate(owners)})


def test_plan_fits_shared_memory():
    for fmt in quant.FORMATS:
        for m in (1, 8, 32, 64, 128, 256):
            p = qm.make_plan(m, 4096, 4096, fmt, qm.QMatmulConfig(), 132)
            assert p.stages >= 2 and p.block_m % 8 == 0 and p.block_m * p.m_tiles >= m
            assert p.ctas * p.m_tiles <= 132


def test_bad_inputs():
    x, qw = _inputs("int8", 2, 256, 256)
    with pytest.raises(ValueError, match="K must match"):
        qm.qmatmul_pallas(x[:, :128], qw.q, qw.scale, interpret=True)
    with pytest.raises(ValueError, match=r"int8 scale must be \(256,\)"):
        qm.qmatmul_pallas(x, qw.q, qw.scale[:128], interpret=True)
    with pytest.raises(ValueError, match="q must be int8 or int4"):
        qm.qmatmul_pallas(x, qw.q.astype(jnp.int16), qw.scale, interpret=True)


def test_path_table():
    hopper = DeviceInfo("cuda", "NVIDIA H200", (9, 0))
    _, qw8 = _inputs("int8", 1, 256, 256)
    qw4 = quant.quantize(jnp.ones((256, 256)), "int4", group=64)
    assert quant.choose_impl(hopper, jnp.bfloat16, 1, qw8) == "pallas"
    assert quant.choose_impl(hopper, jnp.bfloat16, 257, qw8) == "xla"  # a prefill
    assert "Hopper" in quant.why_not("pallas", DeviceInfo("cuda", "NVIDIA A100", (8, 0)), jnp.bfloat16, 1, qw8)
    assert "Hopper" in quant.why_not("pallas", DeviceInfo("cpu", "cpu"), jnp.bfloat16, 1, qw8)
    assert "bfloat16" in quant.why_not("pallas", hopper, jnp.float32, 1, qw8)
    assert "groups of 128" in quant.why_not("pallas", hopper, jnp.bfloat16, 1, qw4)
    small = quant.quantize(jnp.ones((256, 64)), "int8")
    assert "multiples of 128" in quant.why_not("pallas", hopper, jnp.bfloat16, 1, small)
    with pytest.raises(ValueError, match="cannot run on"):
        quant.matmul(jnp.ones((1, 256), jnp.bfloat16), qw8, impl="pallas")  # this CPU
    with pytest.raises(ValueError, match="unknown matmul impl"):
        quant.matmul(jnp.ones((1, 256), jnp.bfloat16), qw8, impl="triton")


@pytest.mark.parametrize("config, tiled", [(qm.QMatmulConfig(), False), (qm.QMatmulConfig(2, 2, 2), False),
                                           (qm.QMatmulConfig(2, 1, 1), False), (qm.QMatmulConfig(4, 1, 1), False),
                                           (qm.QMatmulConfig(), True)],
                         ids=["default", "2x2x2", "2x1x1", "4x1x1", "tiled"])
def test_compiled_path_lowers_for_cuda(config, tiled):
    failures = []
    for fmt in quant.FORMATS:
        for m, n, k in [(1, 6144, 4096), (32, 4096, 14336), (100, 28672, 4096), (256, 4096, 4096)]:
            q = jax.ShapeDtypeStruct((n // 128, k // 128, 128, 128) if tiled else (n, k), quant.STORAGE[fmt])
            s = jax.ShapeDtypeStruct((n,) if fmt == "int8" else (k // 128, n), jnp.bfloat16)
            fn = jax.jit(functools.partial(qm.qmatmul_pallas, config=config))
            try:
                fn.trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), q, s).lower(lowering_platforms=("cuda",))
            except Exception as e:  # noqa: BLE001 - collect every failing configuration
                failures.append(f"{fmt} M={m} N={n} K={k}: {type(e).__name__}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)


# 8B shapes: qkv, o, gate_up, down (K, N), rows of AR decode and of 32-token chunks
GPU_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("m", [1, 5, 32, 64, 200, 256])
def test_gpu_kernel_matches_reference(fmt, m):
    for k, n in GPU_SHAPES:
        x, qw = _inputs(fmt, m, n, k)
        got = jax.jit(lambda x, q, s: qm.qmatmul_pallas(x, q, s, out_dtype=jnp.float32))(x, qw.q, qw.scale)
        want = qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)
        assert _rel(got, want) < 1e-5, (fmt, m, k, n)
        assert quant.choose_impl(DeviceInfo.of(), jnp.bfloat16, m, qw) == "pallas"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 12, 32, 200])
def test_gpu_tiled_weights_and_unpadded_rows(m):
    """Tiled weights, and x rows past M read as TMA's zero fill (M = 1, 3: fewer than 8 rows, no pad; 12: padded
    to 16; 200: the second M tile's box runs past the last row)."""
    for fmt in quant.FORMATS:
        for k, n in GPU_SHAPES[:2]:
            x, qw = _inputs(fmt, m, n, k)
            want = qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)
            for q in (qw.q, quant.tile_q(qw.q)):
                got = qm.qmatmul_pallas(x, q, qw.scale, out_dtype=jnp.float32)
                assert _rel(got, want) < 1e-5, (fmt, m, k, n, q.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", [(2, 1, 1), (2, 2, 1), (2, 2, 2)], ids=lambda t: "x".join(map(str, t)))
def test_gpu_tilings_match_reference(tiling):
    """The other 2-warpgroup tilings on the GPU (4 warpgroups: benchmarks/qmatmul_tiling.py runs them under a
    timeout; one never returned on 2026-12-02)."""
    config = qm.QMatmulConfig(*tiling)
    for fmt in quant.FORMATS:
        for m in (1, 32):
            x, qw = _inputs(fmt, m, 4096, 14336)
            got = qm.qmatmul_pallas(x, qw.q, qw.scale, out_dtype=jnp.float32, config=config)
            assert _rel(got, qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)) < 1e-5, (fmt, m)
