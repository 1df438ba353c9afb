"""The Pallas Mosaic GPU TMA copy (pallas_kernels/copy.py), the bench's HBM-bandwidth probe.

1. Under the Mosaic GPU interpreter on CPU: the kernel body itself (TMA copies, mbarriers, bulk-group waits,
   SMEM/GMEM) over random data, compared bit for bit. The interpreter fills uninitialised memory with NaN, the
   kernel's output included (checked below with a kernel that writes nothing), so a tile no CTA wrote fails.
   It does not model asynchrony (copies complete at once), so it cannot catch a slot reused too early.
2. The compiled kernel lowered for CUDA on this CPU machine (Mosaic GPU dialect lowering, SMEM allocation, the
   bulk-copy path), which needs no GPU.
3. `gpu`-marked: compiled and run on the GPU over a few hundred MB.
"""

import functools

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from nemodiff_jax.pallas_kernels.copy import (CopyConfig, bytes_moved, copy_pallas, copy_reference, num_sms,
                                              tile_elems)

NAN_INIT = plgpu.InterpretGPUParams(uninitialized_memory="nan")


def random(shape, dtype, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# (tiles, config, dtype, shape rows): tile counts per CTA uneven, rings that wrap, fewer tiles than stages,
# one tile per CTA, a 2-D float32 array.
CASES = {
    "uneven_ctas_ring_wraps": (10, CopyConfig(1024, 3, num_ctas=3), jnp.bfloat16, None),
    "fewer_tiles_than_stages": (2, CopyConfig(1024, 4, num_ctas=1), jnp.bfloat16, None),
    "one_tile_per_cta_auto_ctas": (7, CopyConfig(512, 2), jnp.bfloat16, None),
    "two_stages_many_tiles": (13, CopyConfig(256, 2, num_ctas=2), jnp.bfloat16, None),
    "f32_2d": (12, CopyConfig(512, 2, num_ctas=5), jnp.float32, 24),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_copies_exactly(name):
    tiles, cfg, dtype, rows = CASES[name]
    n = tiles * tile_elems(dtype, cfg)
    shape = (rows, n // rows) if rows else (n,)
    x = random(shape, dtype, seed=len(name))
    out = copy_pallas(x, config=cfg, interpret=NAN_INIT)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(bits(out), bits(x), err_msg=name)
    np.testing.assert_array_equal(bits(out), bits(copy_reference(x)))


def test_interpreter_output_starts_as_nan():
    """What makes the exact comparison above catch an unwritten tile: the interpreter's output is NaN-filled."""
    def write_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = plgpu.kernel(write_nothing, out_type=jax.ShapeDtypeStruct((4, 256), jnp.bfloat16), grid=(2,),
                       grid_names=("cta",), interpret=NAN_INIT)(jnp.ones((4, 256), jnp.bfloat16))
    assert np.isnan(np.asarray(out, np.float32)).all()


# The configurations the bench times (bench._pallas_configs, 132 SMs) and a 2 GiB probe buffer: lowering only.
LOWERINGS = [CopyConfig(num_ctas=132), CopyConfig(64 << 10, 3, num_ctas=132), CopyConfig(16 << 10, 6, num_ctas=264)]


def test_compiled_path_lowers_for_cuda():
    failures = []
    for cfg in LOWERINGS:
        for shape in ((1 << 30,), (4096, 3 * 1024)):  # 2 GiB of bf16; a 2-D 24 MiB array
            fn = jax.jit(functools.partial(copy_pallas, config=cfg))
            try:
                text = fn.trace(jax.ShapeDtypeStruct(shape, jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
                assert "mosaic_gpu" in text
            except Exception as e:  # noqa: BLE001 - collect every failing configuration
                failures.append(f"{cfg} {shape}: {type(e).__name__}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of"):
        copy_pallas(jnp.ones((1000,), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="SMEM budget"):
        CopyConfig(64 << 10, 4)
    with pytest.raises(ValueError, match="multiple of 128"):
        CopyConfig(1000, 2)
    with pytest.raises(ValueError, match="stages"):
        CopyConfig(1024, 1)
    assert bytes_moved(jnp.ones((8, 4), jnp.bfloat16)) == 128
    assert num_sms(jax.devices("cpu")[0]) == 132  # not a GPU: the H100/H200 default


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [CopyConfig(), CopyConfig(64 << 10, 3), CopyConfig(16 << 10, 6, num_ctas=2 * num_sms())],
                         ids=["32KiBx6", "64KiBx3", "16KiBx6_2cta"])
def test_gpu_copies_exactly(cfg):
    """Compiled on the GPU, 384 MiB of bf16, bit for bit. Each copy follows a freed NaN buffer of its size (the
    allocator tends to hand that memory to the next output) and two distinct inputs are copied, so an unwritten
    tile would show NaN or the other input's data."""
    n = 192 << 20  # elements: 384 MiB
    equal = jax.jit(lambda a, b: jnp.array_equal(jax.lax.bitcast_convert_type(a, jnp.uint16),
                                                 jax.lax.bitcast_convert_type(b, jnp.uint16)))
    for seed in (0, 1):
        x = random((n,), jnp.bfloat16, seed)
        poison = jax.block_until_ready(jnp.full((n,), jnp.nan, jnp.bfloat16))
        del poison
        out = jax.block_until_ready(copy_pallas(x, config=cfg))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()
        assert bool(equal(out, x)), f"{cfg}: copy differs from its source (seed {seed})"
        del out, x
