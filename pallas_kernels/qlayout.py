"""The memory layouts of quantized weights that the int8 / int4 kernel (qmatmul.py) reads, as plain jnp
reshapes and transposes (no Mosaic GPU here: quant.py imports this on every platform).

- int4's K order: inside each block of 32 inputs, stored position 8j + 4c + a (j, a < 4; c < 2) holds input
  8a + 2j + c, so that the 32 bits a thread loads in Mosaic GPU's WGMMA_UPCAST_4X layout are exactly the 8
  values it holds in the WGMMA operand layout (qmatmul._dequant_int4). K not a multiple of 32 (tiny test
  models, which the kernel never takes) stays in input order.
- Tiles: [..., N, K] -> [..., N/128, K/128, 128, 128], each 128 x 128 block one contiguous run of memory, so
  each of the kernel's TMA boxes reads one run of HBM.
"""

from __future__ import annotations

import jax

INT4_BLOCK = 32  # permute_int4 reorders K inside blocks of this many inputs
TILE = 128  # the kernel's N and K multiple (two warpgroups of 64 output channels; 128-input steps); tile_q's block


def permute_int4(q: jax.Array) -> jax.Array:
    """[..., K] in input order -> int4's in-memory order (the identity where K is not a multiple of 32)."""
    *lead, k = q.shape
    if k % INT4_BLOCK:
        return q
    return q.reshape(*lead, k // INT4_BLOCK, 4, 4, 2).swapaxes(-3, -2).swapaxes(-2, -1).reshape(*lead, k)


def unpermute_int4(p: jax.Array) -> jax.Array:
    """The inverse of permute_int4: in-memory order -> input order."""
    *lead, k = p.shape
    if k % INT4_BLOCK:
        return p
    return p.reshape(*lead, k // INT4_BLOCK, 4, 2, 4).swapaxes(-2, -1).swapaxes(-3, -2).reshape(*lead, k)


def tile_q(q: jax.Array) -> jax.Array:
    """[..., N, K] -> [..., N/128, K/128, 128, 128] (N and K multiples of 128): block (i, j) is q[..., 128i:,
    128j:] and one contiguous run of memory."""
    *lead, n, k = q.shape
    if n % TILE or k % TILE:
        raise ValueError(f"q {tuple(q.shape)}: its last two dims must be multiples of {TILE} to tile")
    return q.reshape(*lead, n // TILE, TILE, k // TILE, TILE).swapaxes(-3, -2)


def rows(q: jax.Array, tiled: bool = True) -> jax.Array:
    """q as [..., N, K]: the inverse of tile_q where `tiled`."""
    if not tiled:
        return q
    *lead, nt, kt, bn, bk = q.shape
    return q.swapaxes(-3, -2).reshape(*lead, nt * bn, kt * bk)
