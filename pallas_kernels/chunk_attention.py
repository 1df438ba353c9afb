"""Chunk attention over the KV cache for Hopper (Pallas Mosaic GPU).

Semantics (same as `nemodiff_jax.attention.chunk_attention(impl="xla")`): the chunk's K/V are already written at
each row's cache slots `[length, length+T)`; query j of row b sees slot s iff
    s < lengths[b] + j + 1   (causal, bottom-right aligned)   or   s < lengths[b] + T   (bidirectional),
or, for quadratic_spec's canvas of a J-chain (`chain=J`, T = J(J+1); `canvas_within`), s < lengths[b] or
within[j, s - lengths[b]], the mask computed from the slot and row indices (no table);
scores scaled by H**-0.5, softmax in float32, output in q's dtype.

Kernel design
- GQA folded into query rows: per (row b, kv head k) the T*G queries (row r = t*G + g) share one K/V stream, so
  every KV block is read once per kv head. 64 query rows per compute warpgroup (the wgmma M); 32 slots x 4 heads
  = 128 rows = two compute warpgroups for the 8B model. T=1 (AR decode) pads 4 rows to 64 (memory-bound anyway).
- Ragged lengths: a CTA reads only blocks below its rows' limit (length + T, or length + last_t + 1 when causal).
  The last block is a window shifted down to end at the limit rounded up to 8 slots (the SMEM tile rows a TMA
  copy must start on; overlap with the previous block is masked out). So slots at or past
  max(round_up(limit, 8), block_kv) are never loaded; slots in [limit, that) may be loaded and are masked.
  Masked slots get exact-zero probabilities, so finite garbage there cannot leak; NaN/Inf there would
  (0 * NaN = NaN), and real caches never hold them. Capacity S must be a multiple of 8 (the engine rounds it
  to 128) so that a window never runs past the cache.
- Split-KV (flash-decoding): grid (kv heads x q tiles, splits, batch); each row's blocks are divided evenly over
  the splits (per row, so ragged rows stay balanced). Each split writes its unnormalised fp32 accumulator and
  the base-2 running max / sum; `_combine` (plain jnp) merges them. Splits default to filling ~num_sms CTAs.
- Warp specialisation as in JAX's FlashAttention-3 kernel (`jax/experimental/pallas/ops/gpu/attention_mgpu.py`):
  one memory warpgroup streams K/V blocks by TMA into a ring of `max_concurrent_steps` SMEM slots, compute
  warpgroups run wgmma QK^T, the online softmax in registers, and wgmma PV.

Interpret mode (`interpret=True`) runs this same kernel body under JAX's GPU interpreter
(`plgpu.InterpretGPUParams`: simulated GMEM/SMEM, warpgroup threads, TMA copies, barriers, wgmma), on CPU. One
step differs: the interpreter's wgmma takes SMEM operands only and cannot run `pl.run_state` over an accumulator,
so there the probabilities P go through SMEM and PV lands in a fresh accumulator that is added
(`pv_from_smem=True`, also selectable on the GPU, where it is the exact code the CPU test ran). The compiled
default (`pv_from_smem=False`) is FA3's: P from registers, PV accumulated in place. Layout casts and SMEM
tiling/swizzling are no-ops under the interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

ROWS_PER_WG = 64  # wgmma M of one warpgroup
MAX_COMPUTE_WGS = 2  # 2 compute + 1 memory warpgroup, registers split 232/232/40 as in FA3
MASK_VALUE = -1e30  # finite: a block fully masked for a row gives exp2(0), later erased by alpha = 0, never NaN
LOG2E = math.log2(math.e)
TMA_ROWS = 8  # SMEM tile rows: a tiled TMA copy starts on a multiple of this; so must the cache capacity be
WGMMA_K = 64  # compiled: block_kv (PV's K) a multiple of this (wgmma's K step; 32 fails layout inference)
SMEM_BYTES = 232448  # per CTA on Hopper (227 KiB)
SMEM_RESERVE = 4096  # barriers and Mosaic GPU's own scratch (seen on an H200: 3152 bytes beyond smem_bytes())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tiling of the kernel (jit-static: frozen and hashable)."""
    block_kv: int = 64  # cache slots per KV block (wgmma N of QK^T, K of PV)
    max_concurrent_steps: int = 3  # KV ring-buffer depth (SMEM: 2 * steps * block_kv * H * 2 bytes)
    num_splits: int | None = None  # KV splits per (row, kv head); None: fill `num_sms` CTAs
    num_sms: int = 132  # H100 SXM / H200
    pv_from_smem: bool = False  # P via SMEM + fresh PV accumulator (forced under interpret; see module doc)

    def __post_init__(self):
        if self.block_kv <= 0 or self.block_kv % 16:
            raise ValueError(f"{self.block_kv=} must be a positive multiple of 16")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"{self.max_concurrent_steps=} must be >= 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1 (or None for auto)")


@dataclasses.dataclass(frozen=True)
class GridPlan:
    compute_wgs: int  # compute warpgroups per CTA (64 query rows each)
    q_tiles: int  # query-row tiles per kv head
    heads: int  # grid axis 0: kv heads x q tiles
    splits: int  # grid axis 1: KV splits
    rows_io: int  # query rows a CTA reads and writes: fewer than 64 x compute_wgs when T*G < 64 (AR decode)


def grid_plan(batch: int, t: int, n: int, kh: int, capacity: int, block: BlockSizes) -> GridPlan:
    """How the T*G folded query rows and the KV length are tiled over the grid (batch, heads, splits)."""
    n_rows = t * (n // kh)
    compute_wgs = min(pl.cdiv(n_rows, ROWS_PER_WG), MAX_COMPUTE_WGS)
    q_tiles = pl.cdiv(n_rows, compute_wgs * ROWS_PER_WG)
    heads = kh * q_tiles
    rows_io = pl.cdiv(n_rows, TMA_ROWS) * TMA_ROWS if n_rows < ROWS_PER_WG else compute_wgs * ROWS_PER_WG
    return GridPlan(compute_wgs, q_tiles, heads, auto_num_splits(batch, heads, capacity, block), rows_io)


def auto_num_splits(batch: int, grid_heads: int, capacity: int, block: BlockSizes) -> int:
    """Splits so that batch * grid_heads * splits CTAs about fill the GPU (one CTA per SM: ~215 KB SMEM)."""
    if block.num_splits is not None:
        return block.num_splits
    ctas = batch * grid_heads
    return max(1, min(block.num_sms // max(ctas, 1), pl.cdiv(capacity, block.block_kv), 64))


def smem_bytes(block: BlockSizes, compute_wgs: int, head_dim: int, itemsize: int, pv_from_smem: bool) -> int:
    """The kernel's SMEM buffers per CTA: q, the K/V ring, the f32 accumulator, m/l and (pv_from_smem) P."""
    rows = compute_wgs * ROWS_PER_WG
    ring = 2 * block.max_concurrent_steps * block.block_kv * head_dim * itemsize
    p = rows * block.block_kv * itemsize if pv_from_smem else 0
    return rows * head_dim * itemsize + ring + rows * head_dim * 4 + 2 * rows * 4 + p


def check_block(block: BlockSizes, compute_wgs: int, head_dim: int, itemsize: int, pv_from_smem: bool):
    """Configurations the compiler rejects (seen on an H200), as clear errors before it runs. The interpreter
    takes any block_kv that is a multiple of 16 (the CPU tests use 32 to wrap the ring quickly)."""
    if block.block_kv % WGMMA_K:
        raise ValueError(f"the compiled kernel needs {block.block_kv=} to be a multiple of {WGMMA_K} (wgmma's K "
                         f"step for P @ V)")
    need = smem_bytes(block, compute_wgs, head_dim, itemsize, pv_from_smem) + SMEM_RESERVE
    if need > SMEM_BYTES:
        raise ValueError(f"{block} needs ~{need} bytes of shared memory per CTA at head_dim {head_dim} with "
                         f"{compute_wgs} compute warpgroups; a Hopper CTA has {SMEM_BYTES}: use fewer "
                         f"max_concurrent_steps or a smaller block_kv")


def _smem_transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle for a [rows, minor] SMEM tile (wgmma operand / TMA), as the Hopper matmul does."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def canvas_visible(j, i, chain: int):
    """quadratic_spec's canvas (decoding/quadratic.canvas): whether chunk query j sees chunk slot i (int arrays
    of one shape, i < 0: the cache before the chunk, always seen). Slot x hangs on chain slot owner(x): x for the
    J chain slots, (x - J) // J for the J x J masks after them. A query sees the chain up to its own slot's
    owner, and a mask also sees the masks of its sub-block."""
    zero = jnp.zeros_like(j)

    def owner(x):
        return jnp.where(x < chain, x, lax.div(jnp.maximum(x - chain, zero), jnp.full_like(x, chain)))

    in_chain = (i < chain) & (i <= owner(j))
    same_block = (j >= chain) & (i >= chain) & (owner(j) == owner(i))
    return in_chain | same_block


@functools.lru_cache(maxsize=None)
def canvas_within(chain: int) -> np.ndarray:
    """The canvas's [T, T] within-chunk visibility as a (read-only) table, what attention.within_mask takes."""
    t = chain * (chain + 1)
    j, i = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    with jax.ensure_compile_time_eval():  # first asked for while a forward is traced: the table stays concrete
        table = np.asarray(canvas_visible(jnp.asarray(j), jnp.asarray(i), chain))
    table.flags.writeable = False
    return table


def _chunk_attention_kernel(q_ref, k_ref, v_ref, lengths_ref, o_ref, m_ref, l_ref, smem, barriers, *,
                            t: int, g: int, causal: bool, q_tiles: int, compute_wgs: int, num_splits: int,
                            rows_io: int, block: BlockSizes, pv_from_smem: bool, chain: int = 0):
    """One CTA = (grid head hq = kv_head * q_tiles + q_tile, split, batch row b); warpgroups `wg`.

    q_ref       [B, HQ, RIO, H]      folded queries (row r = t*G + g of the tile), zero-padded rows, GMEM
    k_ref/v_ref [B, S, K, H]         the cache, GMEM (only blocks below the tile's limit are read)
    lengths_ref [B] int32            GMEM
    o_ref       [B, HQ, P, RIO, H] f32  unnormalised split accumulators (P = splits)
    m_ref/l_ref [B, HQ, P, RIO]    f32  base-2 running max / running sum of each split
    RIO = rows_io: 64 x W, or T*G rounded up to 8 when that is < 64 (the AR-decode case: 4 rows of 64 are real;
    SMEM rows past RIO are never written and hold garbage, which stays in its own rows and is never stored)
    smem: q [W, 64, H], k/v [C, BK, H] (C = max_concurrent_steps), o [W, 64, H] f32, m/l [W, 64] f32,
          p [W, 64, BK] (only with pv_from_smem, else None)
    barriers: q [W], k/v loaded [C], k/v consumed [C] (W arrivals each)
    """
    q_smem, k_smem, v_smem, o_smem, m_smem, l_smem, p_smem = smem
    q_barriers, k_barriers, v_barriers, k_consumed, v_consumed = barriers
    bk, steps_in_flight = block.block_kv, block.max_concurrent_steps
    rows_cta = compute_wgs * ROWS_PER_WG
    n_rows = t * g
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    wg_rows_io = min(rows_io, ROWS_PER_WG)  # rows each compute warpgroup loads and stores

    b = lax.axis_index("batch")
    hq = lax.axis_index("heads")
    split = lax.axis_index("splits")
    wg = lax.axis_index("wg")
    if q_tiles == 1:
        kv_head, q_tile = hq, 0
    else:
        kv_head = lax.div(hq, jnp.int32(q_tiles))
        q_tile = lax.rem(hq, jnp.int32(q_tiles))

    length = lengths_ref[b]
    # The highest slot any query of this tile may see, plus one.
    if causal and not chain:
        if q_tiles == 1:
            tile_limit = length + (min(rows_cta, n_rows) - 1) // g + 1
        else:
            last_row = jnp.minimum((q_tile + 1) * rows_cta, n_rows) - 1
            tile_limit = length + lax.div(last_row, jnp.int32(g)) + 1
    else:
        tile_limit = length + t
    n_blocks = lax.div(tile_limit + (bk - 1), jnp.int32(bk))  # >= 1: every limit is >= 1
    limit_tiles = lax.div(tile_limit + (TMA_ROWS - 1), jnp.int32(TMA_ROWS))  # limit rounded up, in 8-slot tiles
    per_split = lax.div(n_blocks + (num_splits - 1), jnp.int32(num_splits))
    first = split * per_split
    steps = jnp.minimum(jnp.maximum(n_blocks - first, 0), per_split)  # 0 for an empty split

    def window_start(i):
        # Block i covers slots [i*bk, (i+1)*bk); the last block is shifted down to end at the limit rounded up to
        # TMA_ROWS. The start must be visibly a multiple of the SMEM tile rows (8) for the tiled TMA copy.
        tiles = jnp.maximum(jnp.minimum(i * (bk // TMA_ROWS), limit_tiles - bk // TMA_ROWS), 0)
        return tiles * TMA_ROWS

    @pl.when(wg < compute_wgs)
    def _compute_wg():
        if compute_wgs == 2:
            plgpu.set_max_registers(232, action="increase")
        q_wg = q_smem.at[wg]  # [64, H]
        row_base = q_tile * rows_cta + wg * ROWS_PER_WG  # folded row index of this warpgroup's first row
        rows = pl.ds(wg * ROWS_PER_WG, wg_rows_io)
        plgpu.copy_gmem_to_smem(q_ref.at[b, hq, rows], q_wg.at[pl.ds(0, wg_rows_io)], q_barriers.at[wg])
        plgpu.barrier_wait(q_barriers.at[wg])

        m_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((ROWS_PER_WG, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
        qk_scale = head_dim ** -0.5 * LOG2E  # scores kept in base 2 (exp2 on the FMA path)

        def kv_step(j, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(j, jnp.int32(steps_in_flight))
            i = first + j  # global KV block index of this step
            start = window_start(i)

            plgpu.barrier_wait(k_barriers.at[slot])

            def compute_qk(acc_ref):  # [64, BK] f32
                plgpu.wgmma(acc_ref, q_wg, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            qk = pl.run_scoped(compute_qk, plgpu.ACC((ROWS_PER_WG, bk), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])

            x = qk * qk_scale
            slot_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, bk), 1, layout=plgpu.Layout.WGMMA) + start
            x = jnp.where(slot_ids >= i * bk, x, MASK_VALUE)  # the shifted last window overlaps block i-1
            x = jnp.where(slot_ids < length + t, x, MASK_VALUE)
            if chain:  # the canvas: query r//G against chunk slot s - length
                row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, bk), 0, layout=plgpu.Layout.WGMMA)
                query = lax.div(row_ids + row_base, jnp.full_like(row_ids, g)) if g > 1 else row_ids + row_base
                x = jnp.where(canvas_visible(query, slot_ids - length, chain), x, MASK_VALUE)
            elif causal:  # slot s < length + r//G + 1  <=>  (s - length) * G <= r
                row_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS_PER_WG, bk), 0, layout=plgpu.Layout.WGMMA)
                lhs = slot_ids * g if g > 1 else slot_ids
                x = jnp.where(lhs <= row_ids + (row_base + length * g), x, MASK_VALUE)

            m_new = jnp.maximum(m_i, x.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(x - lax.broadcast_in_dim(m_new, x.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)

            plgpu.barrier_wait(v_barriers.at[slot])
            if pv_from_smem:
                p_wg = p_smem.at[wg]  # [64, BK]
                p_wg[...] = p16
                plgpu.commit_smem()  # generic-proxy stores -> visible to wgmma

                def compute_pv(acc_ref):  # [64, H] f32
                    plgpu.wgmma(acc_ref, p_wg, v_smem.at[slot])
                    return acc_ref[...]
                acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((ROWS_PER_WG, head_dim), jnp.float32))
            else:
                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        acc, m_i, l_i = lax.fori_loop(0, steps, kv_step, (acc, m_i, l_i))

        o_wg, m_wg, l_wg = o_smem.at[wg], m_smem.at[wg], l_smem.at[wg]
        o_wg[...] = acc
        m_wg[...] = m_i
        l_wg[...] = l_i
        plgpu.commit_smem()
        mine = pl.ds(0, wg_rows_io)
        plgpu.copy_smem_to_gmem(o_wg.at[mine], o_ref.at[b, hq, split, rows])
        plgpu.copy_smem_to_gmem(m_wg.at[mine], m_ref.at[b, hq, split, rows])
        plgpu.copy_smem_to_gmem(l_wg.at[mine], l_ref.at[b, hq, split, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _memory_wg():
        if compute_wgs == 2:
            plgpu.set_max_registers(40, action="decrease")

        def fetch(j, slot):
            src = (b, pl.ds(window_start(first + j), bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_barriers.at[slot])

        for j in range(steps_in_flight):  # fill the ring
            pl.when(j < steps)(functools.partial(fetch, j, j))

        @pl.loop(0, jnp.maximum(steps - steps_in_flight, 0))
        def _refill(j):
            slot = lax.rem(j, jnp.int32(steps_in_flight))
            src = (b, pl.ds(window_start(first + j + steps_in_flight), bk), kv_head)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_barriers.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_barriers.at[slot])

        # Observe the last consumptions too, so every barrier phase is waited for (the GPU interpreter checks
        # this at deallocation; on hardware it only idles this warpgroup until the compute ones finish).
        @pl.loop(jnp.maximum(steps - steps_in_flight, 0), steps)
        def _drain(j):
            slot = lax.rem(j, jnp.int32(steps_in_flight))
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])


def _combine(o, m, l):
    """Merge split partials: o [..., P, R, H], m/l [..., P, R] (base 2) -> [..., R, H] f32."""
    m_max = m.max(axis=-2, keepdims=True)  # finite: split 0 always holds slot 0, visible to every row
    w = jnp.exp2(m - m_max)  # 0 for empty splits (m = -inf)
    num = jnp.sum(w[..., None] * o, axis=-3)
    den = jnp.sum(w * l, axis=-2)
    return num / den[..., None]


@functools.partial(jax.jit, static_argnames=("causal", "block", "interpret", "chain"))
def chunk_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                           causal: bool, block: BlockSizes = BlockSizes(),
                           interpret: bool | plgpu.InterpretGPUParams = False, chain: int = 0) -> jax.Array:
    """q [B,T,N,H] over the cache k/v [B,S,K,H] (chunk already written at [length, length+T)), lengths [B] int32
    -> [B,T,N,H] in q's dtype. Requires lengths[b] + T <= S (the cache's overflow check), S >= block_kv and
    S % 8 == 0. `chain` J > 0: the chunk is quadratic_spec's canvas (T = J(J+1); `causal` is then ignored).
    `interpret=True` (or an `plgpu.InterpretGPUParams`, e.g. with `detect_races=True`) runs the kernel under the
    GPU interpreter on CPU, where float32 inputs are allowed too."""
    b, t, n, h = q.shape
    bb, s, kh, hh = k_cache.shape
    if v_cache.shape != k_cache.shape or (bb, hh) != (b, h) or n % kh:
        raise ValueError(f"shape mismatch: {q.shape=} {k_cache.shape=} {v_cache.shape=}")
    if lengths.shape != (b,):
        raise ValueError(f"{lengths.shape=} must be ({b},)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: {q.dtype=} {k_cache.dtype=} {v_cache.dtype=}")
    if not interpret and jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"compiled kernel takes bf16/f16, got {q.dtype}")
    if s < block.block_kv or s % TMA_ROWS:
        raise ValueError(f"cache capacity {s} must be >= {block.block_kv=} and a multiple of {TMA_ROWS}")
    if chain and t != chain * (chain + 1):
        raise ValueError(f"a canvas of chain {chain} has {chain * (chain + 1)} queries, got T={t}")
    g = n // kh
    n_rows = t * g
    plan = grid_plan(b, t, n, kh, s, block)
    compute_wgs, q_tiles, heads, splits, rows_io = (plan.compute_wgs, plan.q_tiles, plan.heads, plan.splits,
                                                    plan.rows_io)
    pv_from_smem = block.pv_from_smem or bool(interpret)
    if not interpret:
        check_block(block, compute_wgs, h, jnp.dtype(q.dtype).itemsize, pv_from_smem)

    # [B,T,K,G,H] -> [B,K,T*G,H] (row r = t*G + g), zero-padded to whole tiles -> [B, K*q_tiles, RIO, H]
    qf = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, n_rows, h)
    # (Padded in GMEM, not left to TMA's out-of-bounds handling: with the tiled SMEM transforms, an 8-row box
    # stored to a 4-row array wrote the extra rows into the next head's, on an H100, 2026-12-07.)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, q_tiles * rows_io - n_rows), (0, 0)))
    qf = qf.reshape(b, heads, rows_io, h)

    steps = block.max_concurrent_steps
    f32 = jnp.float32
    p_scratch = (plgpu.SMEM((compute_wgs, ROWS_PER_WG, block.block_kv), q.dtype,
                            transforms=_smem_transforms(block.block_kv, q.dtype)) if pv_from_smem else None)
    kernel = functools.partial(
        _chunk_attention_kernel, t=t, g=g, causal=causal, q_tiles=q_tiles, compute_wgs=compute_wgs,
        num_splits=splits, rows_io=rows_io, block=block, pv_from_smem=pv_from_smem, chain=chain)
    o, m, l = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, heads, splits, rows_io, h), f32),
                  jax.ShapeDtypeStruct((b, heads, splits, rows_io), f32),
                  jax.ShapeDtypeStruct((b, heads, splits, rows_io), f32)),
        scratch_types=(
            (plgpu.SMEM((compute_wgs, ROWS_PER_WG, h), q.dtype, transforms=_smem_transforms(h, q.dtype)),
             plgpu.SMEM((steps, block.block_kv, h), q.dtype, transforms=_smem_transforms(h, q.dtype)),
             plgpu.SMEM((steps, block.block_kv, h), q.dtype, transforms=_smem_transforms(h, q.dtype)),
             plgpu.SMEM((compute_wgs, ROWS_PER_WG, h), f32, transforms=_smem_transforms(h, f32)),
             plgpu.SMEM((compute_wgs, ROWS_PER_WG), f32),
             plgpu.SMEM((compute_wgs, ROWS_PER_WG), f32),
             p_scratch),
            (plgpu.Barrier(num_barriers=compute_wgs),
             plgpu.Barrier(num_barriers=steps),
             plgpu.Barrier(num_barriers=steps),
             plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=steps),
             plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=steps)),
        ),
        grid=(heads, splits, b),
        grid_names=("heads", "splits", "batch"),
        kernel_name="chunk_attention",  # what a profile lists (benchmarks/profile_forward.py)
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if interpret else None),
    )(qf, k_cache, v_cache, lengths.astype(jnp.int32))

    out = o[:, :, 0] / l[:, :, 0, :, None] if splits == 1 else _combine(o, m, l)  # [B, HQ, RIO, H]
    out = out.reshape(b, kh, q_tiles * rows_io, h)[:, :, :n_rows]
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def chunk_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                              causal: bool, within: np.ndarray | None = None) -> jax.Array:
    """Pure-jnp oracle, all float32: query j of row b sees slot s < lengths[b] + (j+1 if causal else T), or with
    a `within` table [T, T], s < lengths[b] or within[j, s - lengths[b]]. Slots past a row's limit are treated
    as absent (zeroed before use), so poisoned (NaN) slots cannot leak."""
    b, t, n, h = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    g = n // kh
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)
    slot = jnp.arange(s)
    row_limit = lengths.astype(jnp.int32)[:, None] + t  # [B, 1]: nothing past it exists
    present = (slot[None, :] < row_limit)[:, :, None, None]  # [B, S, 1, 1]
    k = jnp.where(present, k_cache.astype(jnp.float32), 0.0)
    v = jnp.where(present, v_cache.astype(jnp.float32), 0.0)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("btkgh,bskh->bkgts", qf, k, precision=hi) / math.sqrt(h)
    if within is None:
        query_pos = jnp.arange(t)
        limit = lengths.astype(jnp.int32)[:, None] + (query_pos + 1 if causal else jnp.full((t,), t))[None, :]
        visible = slot[None, None, :] < limit[:, :, None]  # [B, T, S]
    else:
        rel = slot[None, :] - lengths.astype(jnp.int32)[:, None]  # [B, S]
        table = jnp.asarray(within)[:, jnp.clip(rel, 0, t - 1)]  # [T, B, S]
        visible = (rel[:, None, :] < 0) | ((rel[:, None, :] < t) & table.transpose(1, 0, 2))
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v, precision=hi)
    return out.reshape(b, t, n, h).astype(q.dtype)
