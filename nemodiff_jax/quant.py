"""Weight-only quantization formats and their pure-jnp reference (issue 14, first part).

Two symmetric round-to-nearest formats for the decode matmuls (qkv, o, gate_up, down; the head optionally).
The embedding table, the norms and the LoRA drafter stay 16-bit.

- `int8`: one scale per output channel. `q` is int8 [K, N] in [-127, 127], and `scale` is bf16 [N].
- `int4`: one scale per group of `group` inputs (default 128) per output channel. `q` packs two values per byte
  along K, uint8 [K/2, N]: the low nibble holds input row 2i, the high nibble row 2i+1, each as a two's
  complement 4-bit value in [-7, 7]. `scale` is bf16 [K/group, N].

K is the product of the weight's leading `in_dims` axes (the contraction, as the model's einsums use them) and N
the product of the rest. Scales are rounded to bf16 before quantizing, so `dequantize` gives exactly the values
the quantizer rounded to: w ~= q * scale. `qeinsum` is the reference matmul, dequantize then einsum. The Pallas
kernels will compute the same thing without materializing the 16-bit weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

FORMATS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
DEFAULT_GROUP = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QWeight:
    q: jax.Array  # int8 [K, N] (int8) or uint8 [K/2, N] (int4, two per byte along K)
    scale: jax.Array  # bf16 [N] (int8) or [K/group, N] (int4)
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # the weight's own shape
    in_dims: int = dataclasses.field(metadata=dict(static=True))  # leading axes contracted
    group: int = dataclasses.field(default=0, metadata=dict(static=True))  # int4 group size (0: per channel)

    @property
    def kn(self) -> tuple[int, int]:
        return math.prod(self.shape[:self.in_dims]), math.prod(self.shape[self.in_dims:])

    @property
    def nbytes(self) -> int:
        return self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize


def pack_int4(v: jax.Array) -> jax.Array:
    """int8 values in [-8, 7], [K, N] with K even -> uint8 [K/2, N]: row 2i in the low nibble, 2i+1 high."""
    u = v.astype(jnp.uint8) & 0xF
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(p: jax.Array) -> jax.Array:
    """uint8 [K/2, N] -> int8 [K, N] (sign-extended nibbles), the inverse of pack_int4."""
    lo = (p & 0xF).astype(jnp.int8)
    hi = (p >> 4).astype(jnp.int8)
    lo, hi = jnp.where(lo > 7, lo - 16, lo), jnp.where(hi > 7, hi - 16, hi)
    return jnp.stack([lo, hi], axis=1).reshape(2 * p.shape[0], p.shape[1])


def quantize(w: jax.Array, fmt: str, in_dims: int = 1, group: int = DEFAULT_GROUP, name: str = "weight") -> QWeight:
    """Symmetric round-to-nearest quantization of `w` (its leading `in_dims` axes are the contraction)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose from {FORMATS}")
    if not 1 <= in_dims < w.ndim:
        raise ValueError(f"{name}: in_dims must be in [1, {w.ndim}) for shape {tuple(w.shape)}, got {in_dims}")
    k, n = math.prod(w.shape[:in_dims]), math.prod(w.shape[in_dims:])
    w2 = w.reshape(k, n).astype(jnp.float32)
    qmax = QMAX[fmt]
    if fmt == "int8":
        amax = jnp.max(jnp.abs(w2), axis=0)  # [N]
        scale = _scale(amax, qmax)
        q = jnp.clip(jnp.round(w2 / _safe(scale).astype(jnp.float32)), -qmax, qmax).astype(jnp.int8)
        return QWeight(q, scale, fmt, tuple(w.shape), in_dims)
    if group < 2 or group % 2 or k % group:
        raise ValueError(f"{name}: int4 group size {group} must be even and divide the {k} inputs "
                         f"(shape {tuple(w.shape)}, in_dims {in_dims})")
    g = w2.reshape(k // group, group, n)
    scale = _scale(jnp.max(jnp.abs(g), axis=1), qmax)  # [K/group, N]
    q = jnp.clip(jnp.round(g / _safe(scale).astype(jnp.float32)[:, None]), -qmax, qmax).astype(jnp.int8)
    return QWeight(pack_int4(q.reshape(k, n)), scale, fmt, tuple(w.shape), in_dims, group)


def _scale(amax: jax.Array, qmax: int) -> jax.Array:
    return (amax / qmax).astype(jnp.bfloat16)


def _safe(scale: jax.Array) -> jax.Array:
    """A zero scale (an all-zero channel or group) divides as 1: its values quantize to 0."""
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def values(qw: QWeight) -> jax.Array:
    """The integer values, int8 [K, N]."""
    return unpack_int4(qw.q) if qw.fmt == "int4" else qw.q


def dequantize(qw: QWeight, dtype=jnp.bfloat16) -> jax.Array:
    """q * scale in float32, cast to `dtype`, in the weight's own shape."""
    k, n = qw.kn
    v = values(qw).astype(jnp.float32)
    s = qw.scale.astype(jnp.float32)
    w = v * s[None] if qw.fmt == "int8" else (v.reshape(k // qw.group, qw.group, n) * s[:, None]).reshape(k, n)
    return w.astype(dtype).reshape(qw.shape)


def qeinsum(subscripts: str, x: jax.Array, qw: QWeight, **kw) -> jax.Array:
    """The reference matmul: einsum(x, dequantize(w)) in x's dtype."""
    return jnp.einsum(subscripts, x, dequantize(qw, x.dtype), **kw)
