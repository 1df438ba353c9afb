"""Weight-only quantization: the formats, the reference matmul, and which matmul path runs.

Two symmetric round-to-nearest formats for the decode matmuls (qkv, o, gate_up, down; the head in int8).
The embedding table, the norms and the LoRA drafter stay 16-bit.

A weight of logical shape [*in, *out] (its leading `in_dims` axes contracted, as the model's einsums use it;
K = prod(in), N = prod(out)) is stored out-major, like torch's Linear [out, in], so that a kernel tile of output
channels reads whole rows of K:
- `int8`: `q` int8 [*out, K] in [-127, 127], one scale per output channel, `scale` bf16 [*out].
- `int4`: `q` jnp.int4 [*out, K] in [-7, 7] (XLA packs two per byte on the GPU), one scale per group of
  `group` consecutive inputs (default 128) per output channel, `scale` bf16 [K/group, *out].
  In memory, where K is a multiple of 32 (every shape the kernel takes), K is permuted inside each block of
  32 inputs (`permute_int4`: stored position 8j + 4c + a holds input 8a + 2j + c), the order in which the
  Pallas kernel's threads load exactly the values they multiply (pallas_kernels/qmatmul.py); `values` and the
  reference undo it inside their fusions. Other K (tiny test models) stay in input order.
  On a Hopper GPU, where the Pallas kernel reads them, both formats are then laid out in 128 x 128 blocks
  (`tile`, `QWeight.tiled`: q [*out[:-1], out[-1]/128, K/128, 128, 128], each block one contiguous run of
  HBM for the kernel's TMA boxes; model.tile_quantized); `rows` undoes it.
  On disk (safetensors has no 4-bit type) `q` is uint8 [*out, K/2] in input order: input 2i in the low
  nibble, 2i+1 in the high one (`to_stored` / `from_stored`).
Scales are rounded to bf16 before quantizing: int8 dequantizes to exactly q * scale, int4 to q * scale rounded
once to bf16 (what its matmul multiplies by).

The matmul (`matmul`, the reference `matmul_reference`), with f32 accumulation:
- int8: (x @ q^T) * scale, the scale applied once per output channel after the sum;
- int4: x @ bf16(q * scale)^T, each group's values scaled (and rounded to bf16, x's dtype) before the sum.
The Pallas kernel (pallas_kernels/qmatmul.py) computes the same thing without materializing a 16-bit weight.

Which path runs (`why_not`, `choose_impl`): "pallas" on CUDA compute capability 9.x (wgmma + TMA) for
bf16 activations, M = rows x chunk <= 256, N and K multiples of 128 and int4 groups of 128: the decode shapes;
"xla" (the reference) everywhere else, including long prefills, where converting the weight once is cheap
next to the matmul itself. Under a mesh, sharding.py runs this per device inside shard_map on GPUs
(ShardedMatmul) and leaves the reference to the SPMD partitioner elsewhere; the scales lie beside their channels.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from jax import lax

from nemodiff_jax.pallas_kernels.qlayout import TILE, permute_int4, rows, tile_q, unpermute_int4

FORMATS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
DEFAULT_GROUP = 128
IMPLS = ("auto", "xla", "pallas")
STORAGE = {"int8": jnp.int8, "int4": jnp.int4}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QWeight:
    q: jax.Array  # int8 | int4 [*out, K]
    scale: jax.Array  # bf16 [*out] (int8) or [K/group, *out] (int4)
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # the weight's logical [*in, *out]
    in_dims: int = dataclasses.field(metadata=dict(static=True))  # leading axes of `shape` contracted
    group: int = dataclasses.field(default=0, metadata=dict(static=True))  # int4 group size (0: per channel)
    tiled: bool = dataclasses.field(default=False, metadata=dict(static=True))  # q in tile()'s layout

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[:self.in_dims]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.in_dims:]

    @property
    def kn(self) -> tuple[int, int]:
        return math.prod(self.in_shape), math.prod(self.out_shape)

    @property
    def nbytes(self) -> int:
        """Bytes as the GPU holds them (int4 packed two per byte)."""
        bits = 4 if self.fmt == "int4" else 8
        return self.q.size * bits // 8 + self.scale.size * self.scale.dtype.itemsize


def tileable(qw: QWeight) -> bool:
    """Whether tile() can lay this weight out in 128 x 128 blocks (the last out dim and K multiples of 128)."""
    k = qw.kn[0]
    return qw.out_shape[-1] % TILE == 0 and k % TILE == 0


def tile(qw: QWeight) -> QWeight:
    """q [*out, K] -> [*out[:-1], out[-1]/128, K/128, 128, 128]: each 128 x 128 block of the [N, K] matrix one
    contiguous run, so the kernel's TMA boxes read whole runs of HBM (int4 rows are only 64 bytes per 128-input
    step otherwise; docs/PERFORMANCE.md). The out dims before the last stay as they are, so the weight shards
    over them like the untiled one. A no-op for a tiled or untileable weight."""
    if qw.tiled or not tileable(qw):
        return qw
    return dataclasses.replace(qw, q=tile_q(qw.q), tiled=True)


def storage_shapes(fmt: str, shape: tuple[int, ...], in_dims: int, group: int = DEFAULT_GROUP) -> dict:
    """The shapes of q and scale for a weight of logical `shape` (what a checkpoint must hold)."""
    k, out = math.prod(shape[:in_dims]), tuple(shape[in_dims:])
    if fmt == "int8":
        return {"q": out + (k,), "scale": out}
    return {"q": out + (k,), "scale": (k // group,) + out}


def abstract(shape: tuple[int, ...], fmt: str, in_dims: int, group: int = DEFAULT_GROUP) -> QWeight:
    """A QWeight of ShapeDtypeStructs: the structure a checkpoint of this weight restores into."""
    shapes = storage_shapes(fmt, shape, in_dims, group)
    return QWeight(jax.ShapeDtypeStruct(shapes["q"], STORAGE[fmt]),
                   jax.ShapeDtypeStruct(shapes["scale"], jnp.bfloat16), fmt, tuple(shape), in_dims,
                   group if fmt == "int4" else 0)


def stored_q(fmt: str, q_shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """q as checkpoints hold it (safetensors and orbax): int8 as it is, int4 packed, uint8 [..., K/2]."""
    if fmt == "int8":
        return jax.ShapeDtypeStruct(tuple(q_shape), jnp.int8)
    return jax.ShapeDtypeStruct(tuple(q_shape[:-1]) + (q_shape[-1] // 2,), jnp.uint8)


def to_stored(qw: QWeight) -> jax.Array:
    """qw.q as checkpoints hold it (stored_q): int4 in input order, packed."""
    q = rows(qw.q, qw.tiled)
    return pack_int4(unpermute_int4(q)) if qw.fmt == "int4" else q


def from_stored(q: jax.Array, fmt: str) -> jax.Array:
    """The inverse of to_stored: for int4 a bitcast of the same bytes, then the in-memory order."""
    return permute_int4(unpack_int4(q)) if fmt == "int4" else q


def pack_int4(v: jax.Array) -> jax.Array:
    """int4 (or int8 values in [-8, 7]) [..., K], K even -> uint8 [..., K/2]: input 2i low nibble, 2i+1 high."""
    u = v.astype(jnp.int8).astype(jnp.uint8) & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: jax.Array) -> jax.Array:
    """uint8 [..., K/2] -> jnp.int4 [..., K], the inverse of pack_int4 (a bitcast: the same bytes)."""
    return lax.bitcast_convert_type(p, jnp.int4).reshape(*p.shape[:-1], 2 * p.shape[-1])


def check_quantizable(shape: tuple[int, ...], fmt: str, in_dims: int, group: int = DEFAULT_GROUP,
                      name: str = "weight"):
    """A ValueError naming the tensor when `shape` cannot be stored in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose from {FORMATS}")
    if not 1 <= in_dims < len(shape):
        raise ValueError(f"{name}: in_dims must be in [1, {len(shape)}) for shape {tuple(shape)}, got {in_dims}")
    k = math.prod(shape[:in_dims])
    if fmt == "int4" and (group < 2 or group % 2 or k % group):
        raise ValueError(f"{name}: int4 group size {group} must be even and divide the {k} inputs "
                         f"(shape {tuple(shape)}, in_dims {in_dims})")


def quantize(w: jax.Array, fmt: str, in_dims: int = 1, group: int = DEFAULT_GROUP, name: str = "weight") -> QWeight:
    """Symmetric round-to-nearest quantization of `w` (its leading `in_dims` axes are the contraction)."""
    shape = tuple(w.shape)
    check_quantizable(shape, fmt, in_dims, group, name)
    k, n = math.prod(shape[:in_dims]), math.prod(shape[in_dims:])
    out = shape[in_dims:]
    wt = w.reshape(k, n).T.astype(jnp.float32)  # [N, K]
    qmax = QMAX[fmt]
    if fmt == "int8":
        scale = _scale(jnp.max(jnp.abs(wt), axis=1), qmax)  # [N]
        q = jnp.clip(jnp.round(wt / _safe(scale).astype(jnp.float32)[:, None]), -qmax, qmax).astype(jnp.int8)
        return QWeight(q.reshape(*out, k), scale.reshape(out), fmt, shape, in_dims)
    g = wt.reshape(n, k // group, group)
    scale = _scale(jnp.max(jnp.abs(g), axis=2), qmax)  # [N, K/group]
    q = jnp.clip(jnp.round(g / _safe(scale).astype(jnp.float32)[..., None]), -qmax, qmax).astype(jnp.int4)
    return QWeight(permute_int4(q.reshape(*out, k)), scale.T.reshape(k // group, *out), fmt, shape, in_dims, group)


def _scale(amax: jax.Array, qmax: int) -> jax.Array:
    return (amax / qmax).astype(jnp.bfloat16)


def _safe(scale: jax.Array) -> jax.Array:
    """A zero scale (an all-zero channel or group) divides as 1: its values quantize to 0."""
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def values(qw: QWeight) -> jax.Array:
    """The integer values as int8 [*out, K], in input order."""
    q = rows(qw.q, qw.tiled)
    return unpermute_int4(q).astype(jnp.int8) if qw.fmt == "int4" else q


def scaled_values(qw: QWeight, dtype) -> jax.Array:
    """int4: bf16(q * scale) cast to `dtype`, [*out, K], what the int4 matmul multiplies by (q * scale exact in
    float32, rounded once). int8: the values q themselves in `dtype` (the scale comes after the sum)."""
    q = rows(qw.q, qw.tiled)
    if qw.fmt == "int8":
        return q.astype(dtype)
    k = q.shape[-1]
    v = unpermute_int4(q).astype(jnp.float32).reshape(*q.shape[:-1], k // qw.group, qw.group)
    s = jnp.moveaxis(qw.scale.astype(jnp.float32), 0, -1)[..., None]  # [*out, K/group, 1]
    return (v * s).astype(jnp.bfloat16).astype(dtype).reshape(q.shape)


def dequantize(qw: QWeight, dtype=jnp.bfloat16) -> jax.Array:
    """The weight in its logical shape [*in, *out]: q * scale in float32, cast to `dtype`."""
    k, n = qw.kn
    w = scaled_values(qw, jnp.float32)
    if qw.fmt == "int8":
        w = w * qw.scale.astype(jnp.float32)[..., None]
    return w.reshape(n, k).T.reshape(qw.shape).astype(dtype)


def _check_x(x: jax.Array, qw: QWeight):
    if x.ndim < qw.in_dims or tuple(x.shape[x.ndim - qw.in_dims:]) != qw.in_shape:
        raise ValueError(f"matmul: x {tuple(x.shape)} must end in the weight's input dims {qw.in_shape}")


def matmul_reference(x: jax.Array, qw: QWeight, out_dtype=None) -> jax.Array:
    """x [..., *in] @ the quantized weight -> [..., *out] in `out_dtype` (default x's), f32 accumulation
    (module doc). Keeps the weight's out dims, so the SPMD partitioner splits it like the bf16 einsum."""
    _check_x(x, qw)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    k = qw.kn[0]
    lead = x.shape[:x.ndim - qw.in_dims]
    xf = x.reshape(*lead, k)
    letters = string.ascii_letters
    b, o = letters[:len(lead)], letters[len(lead):len(lead) + len(qw.out_shape)]
    y = jnp.einsum(f"{b}z,{o}z->{b}{o}", xf, scaled_values(qw, x.dtype), preferred_element_type=jnp.float32)
    if qw.fmt == "int8":
        y = y * qw.scale.astype(jnp.float32)
    return y.astype(out_dtype)


# ------------------------------------------------------------------------------------------ which path runs

MAX_M = 256  # rows x chunk the kernel takes: decode shapes (AR at batch <= 256, 32-token chunks at batch <= 8)


def why_not(path: str, device, x_dtype, m: int, qw: QWeight) -> str | None:
    """Why `path` cannot run this matmul (M rows of x against qw) on `device` (attention.DeviceInfo), or None."""
    if path == "xla":
        return None
    if path != "pallas":
        raise ValueError(f"unknown matmul impl {path!r}; choose from {IMPLS}")
    cc = device.compute_capability
    k, n = qw.kn
    if device.platform != "cuda" or cc is None or cc[0] != 9:
        return "the Mosaic GPU kernel uses Hopper instructions (wgmma, TMA): CUDA compute capability 9.x only"
    if jnp.dtype(x_dtype) != jnp.dtype(jnp.bfloat16):
        return f"the kernel takes bfloat16 activations, got {jnp.dtype(x_dtype).name}"
    if not 1 <= m <= MAX_M:
        return f"the kernel takes 1..{MAX_M} rows, got {m} (a long prefill: the reference converts once)"
    if n % TILE or k % TILE:
        return f"the kernel takes N and K multiples of {TILE}, got N={n}, K={k}"
    if qw.fmt == "int4" and qw.group != TILE:
        return f"the int4 kernel takes groups of {TILE}, got {qw.group}"
    return None


def choose_impl(device, x_dtype, m: int, qw: QWeight) -> str:
    return "pallas" if why_not("pallas", device, x_dtype, m, qw) is None else "xla"


def matmul(x: jax.Array, qw: QWeight, out_dtype=None, impl: str = "auto", device=None) -> jax.Array:
    """x [..., *in] @ qw -> [..., *out] in `out_dtype` (default x's dtype), on the path the table picks for
    `device` (default the first jax device), or a forced "xla" | "pallas" (a ValueError where it cannot run)."""
    from nemodiff_jax.attention import DeviceInfo

    _check_x(x, qw)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    k, n = qw.kn
    lead = x.shape[:x.ndim - qw.in_dims]
    m = math.prod(lead)
    if impl not in IMPLS:
        raise ValueError(f"unknown matmul impl {impl!r}; choose from {IMPLS}")
    if impl != "xla":
        device = DeviceInfo.of() if device is None else device
        if impl == "auto":
            impl = choose_impl(device, x.dtype, m, qw)
        elif (reason := why_not(impl, device, x.dtype, m, qw)) is not None:
            raise ValueError(f"matmul impl {impl!r} cannot run on {device}: {reason}")
    if impl == "xla":
        return matmul_reference(x, qw, out_dtype)
    from nemodiff_jax.pallas_kernels.qmatmul import qmatmul_pallas  # Mosaic GPU only when used

    scale = qw.scale.reshape(n) if qw.fmt == "int8" else qw.scale.reshape(k // qw.group, n)
    q = qw.q.reshape(n // TILE, k // TILE, TILE, TILE) if qw.tiled else qw.q.reshape(n, k)
    y = qmatmul_pallas(x.reshape(m, k), q, scale, out_dtype=out_dtype)
    return y.reshape(*lead, *qw.out_shape)
