"""Weight-only int8 / int4 matmul for Hopper (Pallas Mosaic GPU): the decode shapes, M = 1..256 rows.

Semantics (nemodiff_jax/quant.py, `qmatmul_reference` here): x [M, K] bf16 against q [N, K] (int8 with a
per-channel scale [N], or int4 with group-128 scales [K/128, N]) -> [M, N], f32 accumulation:
    int8: (x @ q^T) * scale          int4: x @ bf16(q * scale)^T
int4 q arrives with K permuted inside blocks of 32 (qlayout.permute_int4, the order quant.py keeps int4 weights
in memory), and either format may come tiled (qlayout.tile_q: [N/128, K/128, 128, 128], each block contiguous).

Kernel design
- Swap AB: the weight is wgmma's A operand and x^T its B, so the output channels fill wgmma's M (64 per
  compute warpgroup, 2 warpgroups = 128 channels per tile) and the few rows of x its N (8..128, a multiple of 8;
  M > 128 takes several balanced M tiles). One weight tile [128, 128] per step goes GMEM -> SMEM by TMA, then each
  warpgroup loads its 64 rows into registers in the upcast layout, converts them to bf16 (int8: Mosaic
  GPU's prmt/and/sub sequence and one shuffle into the WGMMA layout; int4: `_dequant_int4`, whose stored order
  makes the loaded registers the WGMMA operand's as they are: lop3 + sub.bf16x2, then the group scale in a
  mul.bf16x2, one bf16 per row as a 128-input step is one group), and issues wgmma with A from registers and
  B = the x tile in SMEM transposed. The int8 scale is applied once per channel after the sum (the epilogue),
  as quant.py defines.
- Stream-K over (N tile, K step): the n_tiles x k_iters steps are split evenly over `ctas` CTAs (one per SM),
  each taking a contiguous range, so every SM streams the same number of weight bytes whatever N and K are
  (no wave quantization at one row, where 8B's o_proj has only 32 tiles for 132 SMs). A CTA flushes an f32
  partial whenever its range leaves a tile, its accumulator [128 channels, bm] stored transposed, so the
  partials are [slots, rows of x, N]; a tile's partials go to slots 0.. (the CTAs that touch it, in order),
  and the epilogue (plain jnp) sums the written slots, a reduction XLA fuses into the consumer.
- Warp specialisation: one memory warpgroup runs a ring of `stages` SMEM slots (weight tile, x tile and, for
  int4, the tile's scale row; one barrier per slot), the compute warpgroups release a slot after their wgmma
  has read it.

Interpret mode (`interpret=True`) runs the same body under JAX's GPU interpreter on CPU. As in
chunk_attention.py, its wgmma takes SMEM operands only, so there the dequantized tile goes through SMEM
(`a_from_smem=True`, also selectable on the GPU); layouts and SMEM transforms are no-ops there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, memref
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from nemodiff_jax.pallas_kernels.copy import DEFAULT_NUM_SMS, num_sms
from nemodiff_jax.pallas_kernels.qlayout import rows as untiled, unpermute_int4

ROWS_PER_WG = 64  # wgmma M: output channels per row tile
SUB_K = 128  # inputs per wgmma chain (= the int4 group); a pipeline stage holds `k_sub` of them
MAX_BLOCK_M = 128  # rows of x per M tile (wgmma N)
SMEM_BUDGET = 200 * 1024
REGISTERS = 65536  # per SM
BLOCK_N = 128  # what N must be a multiple of (the smallest tile: 2 warpgroups x 1 row tile)
BLOCK_K = SUB_K  # what K must be a multiple of


@dataclasses.dataclass(frozen=True)
class QMatmulConfig:
    """Static tuning (jit-static: frozen and hashable). A tile is compute_wgs x row_tiles x 64 output channels;
    a pipeline stage k_sub x 128 inputs. None: DEFAULT_TILING, 2 x 1 x 2, the fastest 2-warpgroup tiling of the
    H100 sweep of 2026-12-07 (docs/PERFORMANCE.md, benchmarks/qmatmul_tiling.py). 4 warpgroups pass the
    interpreter and lower for CUDA, but did not return within 50 s on the GPU (hang or very slow compile)."""
    compute_wgs: int | None = None  # 2 or 4 compute warpgroups
    row_tiles: int | None = None  # independent 64-row accumulators per warpgroup (wgmma chains in flight)
    k_sub: int | None = None  # 128-input sub-steps per pipeline stage (per barrier round trip)
    max_stages: int = 8  # SMEM ring depth (fewer where the budget asks)
    num_ctas: int | None = None  # CTAs of the stream-K split (all M tiles together); None: the device's SMs
    a_from_smem: bool = False  # dequantized tile via SMEM (forced under interpret; see module doc)
    # Diagnostics only (benchmarks/qmatmul_probe.py; the result is wrong): "memory" streams the tiles through the
    # ring but computes nothing; "convert" also loads and dequantizes them, summing them in registers instead of
    # issuing the per-step wgmmas (one wgmma at the end of each segment keeps the work alive).
    probe: str | None = None

    def __post_init__(self):
        if self.probe not in (None, "memory", "convert"):
            raise ValueError(f"{self.probe=} must be None, 'memory' or 'convert'")
        if self.max_stages < 2:
            raise ValueError(f"{self.max_stages=} must be >= 2")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"{self.num_ctas=} must be >= 1 (or None: one per SM)")
        if self.compute_wgs not in (None, 2, 4):
            raise ValueError(f"{self.compute_wgs=} must be 2 or 4")
        for name in ("row_tiles", "k_sub"):
            if getattr(self, name) not in (None, 1, 2, 4):
                raise ValueError(f"{name}={getattr(self, name)} must be 1, 2 or 4")
        if (self.compute_wgs or 2) * (self.row_tiles or 1) > 4:
            raise ValueError("a tile holds at most 256 output channels (one TMA box): compute_wgs x row_tiles <= 4")


DEFAULT_TILING = dict(compute_wgs=2, row_tiles=1, k_sub=2)


@dataclasses.dataclass(frozen=True)
class Plan:
    block_m: int  # rows of x per M tile (a multiple of 8)
    m_tiles: int
    n_tiles: int
    k_iters: int  # pipeline stages' worth of K per tile
    ctas: int  # per M tile
    slots: int  # partials per N tile (the most CTAs any tile is split over)
    stages: int
    compute_wgs: int = 2
    row_tiles: int = 1
    k_sub: int = 1

    @property
    def block_n(self) -> int:
        return self.compute_wgs * self.row_tiles * ROWS_PER_WG

    @property
    def block_k(self) -> int:
        return self.k_sub * SUB_K


def cta_of(i: int, total: int, ctas: int) -> int:
    """The CTA whose range [c*total//ctas, (c+1)*total//ctas) holds step i (also traced, with lax ints)."""
    return ((i + 1) * ctas - 1) // total


def written(plan: Plan) -> np.ndarray:
    """bool [slots, n_tiles]: which partial slots of each N tile some CTA writes."""
    total = plan.n_tiles * plan.k_iters
    out = np.zeros((plan.slots, plan.n_tiles), bool)
    for t in range(plan.n_tiles):
        first = cta_of(t * plan.k_iters, total, plan.ctas)
        last = cta_of((t + 1) * plan.k_iters - 1, total, plan.ctas)
        out[:last - first + 1, t] = True
    return out


def stage_bytes(fmt: str, block_m: int, block_n: int, block_k: int) -> int:
    w = block_n * block_k // (1 if fmt == "int8" else 2)
    return w + block_m * block_k * 2 + (block_n * 2 * (block_k // SUB_K) if fmt == "int4" else 0)


def make_plan(m: int, n: int, k: int, fmt: str, config: QMatmulConfig, sms: int,
              a_from_smem: bool = False) -> Plan:
    m_tiles = -(-m // MAX_BLOCK_M)
    block_m = -(-(-(-m // m_tiles)) // 8) * 8  # balanced M tiles (each streams the whole weight), rounded to 8
    tiling = {name: DEFAULT_TILING[name] if getattr(config, name) is None else getattr(config, name)
              for name in DEFAULT_TILING}
    wgs, rows, k_sub = tiling["compute_wgs"], tiling["row_tiles"], tiling["k_sub"]
    # Shrink the tile where N or K does not divide, or the SMEM ring would hold fewer than 2 stages (large M),
    # down to 2 warpgroups x 1 row tile x 128 inputs.
    while rows > 1 and n % (wgs * rows * ROWS_PER_WG):
        rows //= 2
    if n % (wgs * rows * ROWS_PER_WG) or (wgs == 4 and block_m > 64):  # 4 warpgroups: <= 120 registers each
        wgs = 2
    while k_sub > 1 and k % (k_sub * SUB_K):
        k_sub //= 2
    while True:
        block_n, block_k = wgs * rows * ROWS_PER_WG, k_sub * SUB_K
        fixed = block_n * block_m * 4 + (wgs * ROWS_PER_WG * SUB_K * 2 if a_from_smem else 0)  # o tiles, a tiles
        stages = min(config.max_stages, (SMEM_BUDGET - fixed) // stage_bytes(fmt, block_m, block_n, block_k))
        if stages >= 2 or (wgs, rows, k_sub) == (2, 1, 1):
            break
        k_sub, rows, wgs = (1, rows, wgs) if k_sub > 1 else (1, 1, wgs) if rows > 1 else (1, 1, 2)
    if stages < 2:
        raise ValueError(f"block_m {block_m} with {block_n}x{block_k} tiles leaves room for {stages} pipeline "
                         f"stages in {SMEM_BUDGET} B of SMEM")
    n_tiles, k_iters = n // block_n, k // block_k
    total = n_tiles * k_iters
    ctas = max(1, min((config.num_ctas or sms) // m_tiles, total))
    slots = max(cta_of((t + 1) * k_iters - 1, total, ctas) - cta_of(t * k_iters, total, ctas) + 1
                for t in range(n_tiles))
    return Plan(block_m, m_tiles, n_tiles, k_iters, ctas, slots, stages, wgs, rows, k_sub)


def _transforms(minor: int, dtype) -> tuple:
    """Tiling + swizzle for an SMEM tile whose rows hold `minor` elements (wgmma operand / TMA)."""
    bits = jnp.dtype(dtype).itemsize * 8 if jnp.dtype(dtype) != jnp.dtype(jnp.int4) else 4
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _registers(wgs: int) -> tuple[int, int]:
    """setmaxnreg for the compute and the memory warpgroups (multiples of 8, all within the SM's file)."""
    memory = 40 if wgs == 2 else 24
    compute = min(232, (REGISTERS // 128 - memory) // wgs // 8 * 8)
    return compute, memory


def _kernel(x_ref, w_ref, s_ref, o_ref, x_smem, w_smem, s_smem, o_smem, a_smem, loaded, consumed, *,
            int4: bool, plan: Plan, a_from_smem: bool, probe: str | None = None, tiled: bool = False,
            interpreted: bool = False):
    """One CTA = (stream-K part `cta`, M tile `m`); warpgroups `wg` (W compute + 1 memory).

    x_ref [M or Mp, K] bf16; w_ref [N, K] int8 | int4, or tiled [N/128, K/128, 128, 128]; s_ref [K/128, N] bf16
    (int4) or None; o_ref [S, rows, N] f32 (rows: M, or M rounded up to 8; TMA drops a store's rows past them)
    smem (C stages, J = k_sub, R = row_tiles): x [C, J, bm, 128], w [C, J, BN, 128], s [C, J, BN] (int4),
    o [W, R, bm, 64] f32 (the accumulator transposed: rows of x major), a [W, 64, 128] (a_from_smem)
    barriers: loaded [C] (one arrival per copy of the slot), consumed [C] (W arrivals)
    """
    bm, stages, k_iters = plan.block_m, plan.stages, plan.k_iters
    wgs, row_tiles, k_sub, block_n = plan.compute_wgs, plan.row_tiles, plan.k_sub, plan.block_n
    total = plan.n_tiles * k_iters
    c = lax.axis_index("cta")
    cols = pl.ds(lax.axis_index("m") * bm, bm)
    start = lax.div(c * total, plan.ctas)
    end = lax.div((c + 1) * total, plan.ctas)
    steps = end - start
    wg = lax.axis_index("wg")
    compute_regs, memory_regs = _registers(wgs)

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_regs, action="increase")
        tiles = [pl.ds((wg * row_tiles + r) * ROWS_PER_WG, ROWS_PER_WG) for r in range(row_tiles)]

        def segment(t, carry):  # the CTA's steps within N tile t, then the flush of its partials
            lo = jnp.maximum(start, t * k_iters)
            hi = jnp.minimum(end, (t + 1) * k_iters)

            def accumulate(*acc_refs):
                def load_tiles(slot):  # wait for the slot, then its weight tiles dequantized in registers
                    plgpu.barrier_wait(loaded.at[slot])
                    ws = []
                    for j in range(k_sub):
                        for rows in tiles:
                            upcast = plgpu.Layout.WGMMA_UPCAST_4X if int4 else plgpu.Layout.WGMMA_UPCAST_2X
                            w = plgpu.load(w_smem.at[slot, j, rows], layout=upcast)
                            if int4:
                                s = plgpu.load(s_smem.at[slot, j, rows], layout=plgpu.Layout.WGMMA.reduce(1))
                                if interpreted:  # plain arrays there: undo the stored order with jnp
                                    w = unpermute_int4(w).astype(jnp.bfloat16)
                                    w = w * lax.broadcast_in_dim(s, w.shape, [0])
                                else:
                                    w = _dequant_int4(w, s)
                            else:
                                w = plgpu.layout_cast(w, plgpu.Layout.WGMMA).astype(jnp.bfloat16)
                            ws.append(w)
                    return ws

                def mma(slot, ws):  # issue the wgmmas of one step (asynchronous unless via SMEM)
                    for j in range(k_sub):
                        for r in range(row_tiles):
                            w = ws[j * row_tiles + r]
                            if a_from_smem:
                                a_smem.at[wg][...] = w
                                plgpu.commit_smem()
                                plgpu.wgmma(acc_refs[r], a_smem.at[wg], x_smem.at[slot, j].T)
                                plgpu.wgmma_wait(0)  # a_smem is written again next
                            else:
                                plgpu.wgmma(acc_refs[r], w, x_smem.at[slot, j].T)

                def release(slot):
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[slot])

                def step(i, carry):
                    slot = lax.rem(i - start, stages)
                    mma(slot, load_tiles(slot))
                    release(slot)
                    return carry

                def memory_step(i, carry):  # probe="memory"
                    slot = lax.rem(i - start, stages)
                    plgpu.barrier_wait(loaded.at[slot])
                    plgpu.barrier_arrive(consumed.at[slot])
                    return carry

                def convert_step(i, carry):  # probe="convert"
                    slot = lax.rem(i - start, stages)
                    ws = load_tiles(slot)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return functools.reduce(lambda a, b: a + b, ws, carry)

                if probe == "memory":
                    lax.fori_loop(lo, hi, memory_step, 0)
                elif probe == "convert":
                    zero = plgpu.layout_cast(jnp.zeros((ROWS_PER_WG, SUB_K), jnp.bfloat16), plgpu.Layout.WGMMA)
                    total = lax.fori_loop(lo, hi, convert_step, zero)
                    mma(lax.rem(lo - start, stages), [total] * (k_sub * row_tiles))
                    plgpu.wgmma_wait(0)
                else:
                    lax.fori_loop(lo, hi, step, 0)
                return [a[...] for a in acc_refs]

            accs = pl.run_scoped(accumulate, *[plgpu.ACC((ROWS_PER_WG, bm), jnp.float32)] * row_tiles)
            slot = c - cta_of(t * k_iters, total, plan.ctas)
            for r, rows in enumerate(tiles):
                o_tile = o_smem.at[wg, r]  # [bm, 64]: the accumulator [64 channels, bm rows] stored transposed
                if interpreted:  # plain arrays there
                    o_tile[...] = accs[r].T
                else:
                    _store_transposed(accs[r], o_tile)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_tile, o_ref.at[slot, cols, pl.ds(t * block_n + rows.start, ROWS_PER_WG)])
            plgpu.wait_smem_to_gmem(0)  # the o tiles are written again by the next segment
            return carry

        lax.fori_loop(lax.div(start, k_iters), lax.div(end - 1, k_iters) + 1, segment, 0)

    @pl.when(wg == wgs)
    def _memory():
        plgpu.set_max_registers(memory_regs, action="decrease")

        def fetch(i, slot):
            t = lax.div(i, k_iters)
            kk = lax.rem(i, k_iters)
            ns = pl.ds(t * block_n, block_n)
            for j in range(k_sub):
                group = kk * k_sub + j
                ks = pl.ds(group * SUB_K, SUB_K)
                src = w_ref.at[t, group] if tiled else w_ref.at[ns, ks]
                plgpu.copy_gmem_to_smem(src, w_smem.at[slot, j], loaded.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[cols, ks], x_smem.at[slot, j], loaded.at[slot])
                if int4:
                    plgpu.copy_gmem_to_smem(s_ref.at[group, ns], s_smem.at[slot, j], loaded.at[slot])

        for j in range(stages):  # fill the ring
            pl.when(j < steps)(functools.partial(fetch, start + j, j))

        @pl.loop(0, jnp.maximum(steps - stages, 0))
        def _refill(j):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(consumed.at[slot])
            fetch(start + j + stages, slot)

        # Observe the last consumptions too, so every barrier phase is waited for (the interpreter checks it).
        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(j):
            plgpu.barrier_wait(consumed.at[lax.rem(j, stages)])


def _store_transposed(acc, o_tile):
    """acc f32 [64, bm] (WGMMA layout) -> the SMEM tile o_tile [bm, 64] as acc^T, one element store each (bm / 2
    per thread; Mosaic GPU's layout inference has no transposed store of the WGMMA layout)."""

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def body(_, acc, ref):
        acc.foreach(lambda value, idx: memref.store(value, ref, [idx[1], idx[0]]))

    body(acc, o_tile)


def _dequant_int4(w, s):
    """w: int4 [64, 128] loaded in WGMMA_UPCAST_4X from quant.permute_int4's order; s: bf16 [64] (WGMMA row
    layout) -> bf16(q * s) [64, 128] in the WGMMA layout: wgmma's register operand, with no data movement
    between threads. In that order, stored position 8j + 4c + a of each 32 inputs holds input 8a + 2j + c: the
    32 bits thread j of a row loads in the upcast layout are the 8 inputs it holds in the WGMMA layout (2j, 2j+1
    of every 8), and nibbles a and a + 4 of the word are one bf16 pair. Per word, for a = 0..3: shift by 4a,
    lop3 (the two nibbles | 0x4300, sign bit flipped: 136 + q in each bf16 half), sub.bf16x2 136 (exact),
    mul.bf16x2 by the scale (one rounding, as quant.py's bf16(q * scale)): no warp shuffles."""

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA.reduce(1)),
                       return_type=plgpu.ShapeDtypeStruct((ROWS_PER_WG, SUB_K), jnp.bfloat16, plgpu.Layout.WGMMA))
    def body(_, w, s):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        regs = np.empty(mgpu_fa.WGMMA_LAYOUT.registers_shape((ROWS_PER_WG, SUB_K)), dtype=object)
        for idx, reg in np.ndenumerate(w.registers):  # (0, 32-input block b, 0, 0, row half h, 0, 0, 0, 0)
            b, h = idx[1], idx[4]
            word = mgpu_utils.bitcast(reg, i32)
            scale = mgpu_utils.bitcast(s.registers[0, 0, h, 0, 0], i16)
            for a in range(4):
                part = word if a == 0 else arith.shrui(word, arith.constant(i32, 4 * a))
                out = llvm.inline_asm(
                    i32, [part, scale],
                    """{
                    .reg .b32 v, bias, s2;
                    lop3.b32 v, $1, 0x000F000F, 0x43084308, 0x6a;
                    mov.b32 bias, 0x43084308;
                    sub.bf16x2 v, v, bias;
                    mov.b32 s2, {$2, $2};
                    mul.rn.bf16x2 $0, v, s2;
                    }""",
                    "=r,r,h")
                regs[0, 4 * b + a, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(out, pair)
        return mgpu_fa.FragmentedArray(_registers=regs, _layout=mgpu_fa.WGMMA_LAYOUT, _is_signed=None)

    return body(w, s)


def weight_shape(q) -> tuple[int, int]:
    """(N, K) of a plain [N, K] or a tiled [N/128, K/128, 128, 128] weight (qlayout.tile_q)."""
    if q.ndim == 4:
        if tuple(q.shape[2:]) != (BLOCK_N, SUB_K):
            raise ValueError(f"a tiled weight must be [N/128, K/128, 128, 128], got {q.shape}")
        return q.shape[0] * BLOCK_N, q.shape[1] * SUB_K
    if q.ndim != 2:
        raise ValueError(f"q must be [N, K] or tiled [N/128, K/128, 128, 128], got {q.shape}")
    return tuple(q.shape)


def check_inputs(x, q, scale, interpret: bool = False) -> str:
    """The format ("int8" | "int4") of valid inputs, or a ValueError naming the problem."""
    m, k = x.shape
    n, k2 = weight_shape(q)
    fmt = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.int4): "int4"}.get(jnp.dtype(q.dtype))
    if fmt is None:
        raise ValueError(f"q must be int8 or int4, got {q.dtype}")
    if k2 != k or k % BLOCK_K or n % BLOCK_N:
        raise ValueError(f"x {x.shape} and q {q.shape}: K must match and be a multiple of {BLOCK_K}, N of {BLOCK_N}")
    want = (n,) if fmt == "int8" else (k // BLOCK_K, n)
    if tuple(scale.shape) != want:
        raise ValueError(f"{fmt} scale must be {want}, got {scale.shape}")
    if jnp.dtype(scale.dtype) != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"scale must be bfloat16, got {scale.dtype}")
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16) and not interpret:
        raise NotImplementedError(f"the compiled kernel takes bfloat16 x, got {x.dtype}")
    if m < 1:
        raise ValueError("x has no rows")
    return fmt


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def qmatmul_pallas(x: jax.Array, q: jax.Array, scale: jax.Array, *, out_dtype=jnp.bfloat16,
                   config: QMatmulConfig = QMatmulConfig(),
                   interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """x [M, K] @ the quantized weight q [N, K] (int8: scale [N]; int4: scale [K/128, N]) -> [M, N] out_dtype.
    `interpret=True` (or an `plgpu.InterpretGPUParams`) runs the kernel under the GPU interpreter on CPU."""
    fmt = check_inputs(x, q, scale, bool(interpret))
    int4 = fmt == "int4"
    m, k = x.shape
    n = weight_shape(q)[0]
    tiled = q.ndim == 4
    if tiled:  # the layout fixes the tile: 2 warpgroups x 1 row tile
        config = dataclasses.replace(config, compute_wgs=2, row_tiles=1)
    a_from_smem = config.a_from_smem or bool(interpret)
    plan = make_plan(m, n, k, fmt, config, DEFAULT_NUM_SMS if interpret else num_sms(), a_from_smem)
    bm, stages, wgs, k_sub, block_n = plan.block_m, plan.stages, plan.compute_wgs, plan.k_sub, plan.block_n
    mp = plan.m_tiles * bm
    # The compiled kernel takes x as it is where TMA's 8-row tiling allows (M < 8 or a multiple of 8: every AR
    # step at batch <= 8 and every chunk shape): a pad is one more kernel per call (~2 us; 137 per 8B forward).
    # The box's rows past M are not to be trusted (zeros, or through the tiled view of x the bytes after it), but
    # x's row j feeds only output row j, and the partials' TMA store drops the rows past M (their array holds
    # `rows` rows and is not tiled). The interpreter slices in bounds.
    rows = mp if interpret else m if m < 8 else -(-m // 8) * 8
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    f32, bf16 = jnp.float32, jnp.bfloat16
    scratch = (
        plgpu.SMEM((stages, k_sub, bm, SUB_K), x.dtype, transforms=_transforms(SUB_K, x.dtype)),
        plgpu.SMEM((stages, k_sub, block_n, SUB_K), q.dtype, transforms=_transforms(SUB_K, q.dtype)),
        plgpu.SMEM((stages, k_sub, block_n), bf16) if int4 else None,
        plgpu.SMEM((wgs, plan.row_tiles, bm, ROWS_PER_WG), f32),
        (plgpu.SMEM((wgs, ROWS_PER_WG, SUB_K), x.dtype, transforms=_transforms(SUB_K, x.dtype))
         if a_from_smem else None),
        plgpu.Barrier(num_arrivals=k_sub * (3 if int4 else 2), num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
    )
    kernel = functools.partial(_kernel, int4=int4, plan=plan, a_from_smem=a_from_smem, probe=config.probe,
                               tiled=tiled, interpreted=bool(interpret))
    partials = plgpu.kernel(
        lambda x_ref, w_ref, *rest: (kernel(x_ref, w_ref, *rest) if int4 else kernel(x_ref, w_ref, None, *rest)),
        out_type=jax.ShapeDtypeStruct((plan.slots, rows, n), f32),
        scratch_types=scratch,
        grid=(plan.ctas, plan.m_tiles),
        grid_names=("cta", "m"),
        kernel_name="qmatmul",  # what a profile lists (benchmarks/profile_forward.py)
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                   else plgpu.InterpretGPUParams() if interpret else None),
    )(xp, q, *((scale,) if int4 else ()))
    if plan.slots > 1:  # sum the slots some CTA wrote (the rest were never written)
        mask = np.repeat(written(plan), block_n, axis=1)[:, None, :]
        y = jnp.sum(jnp.where(mask, partials, 0.0), axis=0)
    else:
        y = partials[0]
    y = y[:m]  # [M, N]
    if not int4:
        y = y * scale.astype(f32)
    return y.astype(out_dtype)


def qmatmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Pure-jnp oracle, all float32 (HIGHEST precision): int8 (x @ q^T) * scale; int4 x @ bf16(q * scale)^T.
    Takes the kernel's inputs: q plain or tiled, int4 in permute_int4's stored order."""
    q = untiled(q, q.ndim == 4)
    int4 = jnp.dtype(q.dtype) == jnp.dtype(jnp.int4)
    q = unpermute_int4(q) if int4 else q
    n, k = q.shape
    xf = x.astype(jnp.float32)
    v = q.astype(jnp.float32)
    if int4:
        g = k // scale.shape[0]
        w = (v.reshape(n, k // g, g) * scale.T.astype(jnp.float32)[..., None]).astype(jnp.bfloat16)
        return jnp.dot(xf, w.reshape(n, k).astype(jnp.float32).T, precision=lax.Precision.HIGHEST).astype(out_dtype)
    y = jnp.dot(xf, v.T, precision=lax.Precision.HIGHEST)
    return (y * scale.astype(jnp.float32)).astype(out_dtype)
