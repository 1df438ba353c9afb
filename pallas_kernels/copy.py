"""Device-to-device copy through SMEM by TMA (Pallas Mosaic GPU): the bench's HBM bandwidth probe.

The array is viewed as `num_tiles` contiguous tiles of `tile_bytes`. A persistent grid of `num_ctas` CTAs (one
per SM: 132 on an H100 SXM / H200) takes tiles cta, cta + num_ctas, ... (an even split, at most one tile apart).
Each CTA, one warpgroup, runs a ring of `stages` SMEM slots:

    prologue   load tiles 0 .. stages-1 (GMEM -> SMEM, one TMA bulk copy each, mbarrier per slot)
    step k     wait slot k's load; store it (SMEM -> GMEM, TMA bulk store, own bulk group);
               once store k-1 has *read* its slot (`wait_smem_to_gmem(1, wait_read_only=True)`), refill that
               slot with tile k-1+stages
    end        wait for every store to land

so stages-1 loads and up to two stores are in flight per SM. The data never passes through registers: each tile
is one `cp.async.bulk` in and one out (contiguous, unswizzled tiles take Mosaic GPU's plain bulk-copy path, not
a tensor map, so no 256-element box limit). Default 32 KiB x 6 stages = 192 KiB SMEM per CTA: about 160 KiB of
loads in flight per SM, several times what HBM latency x bandwidth asks for (~40 KiB per SM on an H200).

`interpret=True` runs the same body under JAX's GPU interpreter on CPU (simulated GMEM/SMEM, TMA copies,
barriers; uninitialised memory is NaN, so a tile nobody wrote fails an exact comparison). It does not model
asynchrony: there the copies complete at once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

SMEM_BUDGET = 200 * 1024  # of the 227 KiB a Hopper CTA may use; barriers and Mosaic's own scratch need the rest
DEFAULT_NUM_SMS = 132  # H100 SXM / H200
# Whole tiles only, so no bounds clamp; also what lets a contiguous unswizzled load take the plain bulk copy
# (Mosaic GPU sends ZEROS-filled loads through a tensor map, whose box is at most 256 per dimension).
IN_BOUNDS = plgpu.OOBFillMode.PROMISE_IN_BOUNDS


@dataclasses.dataclass(frozen=True)
class CopyConfig:
    """Static tiling (jit-static: frozen and hashable)."""
    tile_bytes: int = 32 * 1024  # one TMA bulk copy per tile each way
    stages: int = 6  # SMEM ring depth: stages * tile_bytes of SMEM per CTA
    num_ctas: int | None = None  # None: one per SM (the device's core_count), at most one per tile

    def __post_init__(self):
        if self.tile_bytes <= 0 or self.tile_bytes % 128:
            raise ValueError(f"{self.tile_bytes=} must be a positive multiple of 128 bytes")
        if self.stages < 2:
            raise ValueError(f"{self.stages=} must be >= 2 (one slot loading while one stores)")
        if self.stages * self.tile_bytes > SMEM_BUDGET:
            raise ValueError(f"{self.stages} stages x {self.tile_bytes} B exceeds the {SMEM_BUDGET} B SMEM budget")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"{self.num_ctas=} must be >= 1 (or None: one per SM)")


def num_sms(device=None) -> int:
    """SMs of a GPU (jax's core_count), DEFAULT_NUM_SMS for anything else (CPU, interpret)."""
    device = device if device is not None else jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count) if count else DEFAULT_NUM_SMS


def tile_elems(dtype, config: CopyConfig = CopyConfig()) -> int:
    """Elements per tile; an array's size must be a multiple of it."""
    return config.tile_bytes // jnp.dtype(dtype).itemsize


def _copy_kernel(x_ref, o_ref, smem, bars, *, num_tiles: int, num_ctas: int, stages: int):
    cta = lax.axis_index("cta")
    mine = (num_tiles - cta + num_ctas - 1) // num_ctas  # tiles cta, cta + num_ctas, ... below num_tiles

    def tile(k):
        return cta + k * num_ctas

    for s in range(stages):  # prologue: fill the ring
        @pl.when(s < mine)
        def _():
            plgpu.copy_gmem_to_smem(x_ref.at[tile(s)], smem.at[s], bars.at[s], oob_mode=IN_BOUNDS)

    @pl.loop(0, mine)
    def _(k):
        slot = lax.rem(k, stages)
        plgpu.barrier_wait(bars.at[slot])
        plgpu.copy_smem_to_gmem(smem.at[slot], o_ref.at[tile(k)])  # commits its own bulk group
        nxt = k - 1 + stages  # the tile that goes into the slot store k-1 read from

        @pl.when((k >= 1) & (nxt < mine))
        def _():
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # all but the newest store (k) have read SMEM
            prev = lax.rem(k - 1, stages)
            plgpu.copy_gmem_to_smem(x_ref.at[tile(nxt)], smem.at[prev], bars.at[prev], oob_mode=IN_BOUNDS)

    # Every slot's last load was waited for in the loop (loads are issued only for tiles < mine), so each
    # barrier's phases are all observed; now let the stores land before the kernel ends.
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def copy_pallas(x: jax.Array, *, config: CopyConfig = CopyConfig(),
                interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """A copy of x (any shape; size a multiple of `tile_elems(x.dtype, config)`) made by the TMA kernel.
    `interpret=True` (or an `plgpu.InterpretGPUParams`) runs it under the GPU interpreter on CPU."""
    per_tile = tile_elems(x.dtype, config)
    if config.tile_bytes % jnp.dtype(x.dtype).itemsize:
        raise ValueError(f"{config.tile_bytes=} is not a whole number of {x.dtype} elements")
    if x.size == 0 or x.size % per_tile:
        raise ValueError(f"size {x.size} must be a positive multiple of {per_tile} elements ({config.tile_bytes} B tiles)")
    num_tiles = x.size // per_tile
    num_ctas = min(config.num_ctas or num_sms(), num_tiles)
    kernel = functools.partial(_copy_kernel, num_tiles=num_tiles, num_ctas=num_ctas, stages=config.stages)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_tiles, per_tile), x.dtype),
        scratch_types=(plgpu.SMEM((config.stages, per_tile), x.dtype), plgpu.Barrier(num_barriers=config.stages)),
        grid=(num_ctas,),
        grid_names=("cta",),
        interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if interpret else None),
    )(x.reshape(num_tiles, per_tile))
    return out.reshape(x.shape)


def copy_reference(x: jax.Array) -> jax.Array:
    """Pure-jnp oracle: the identity (same values, shape and dtype)."""
    return jnp.asarray(x)


def bytes_moved(x: jax.Array) -> int:
    """HBM bytes one copy of x moves: read + write."""
    return 2 * x.size * jnp.dtype(x.dtype).itemsize

