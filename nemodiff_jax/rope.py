"""Rotary embeddings: YaRN inverse frequencies exactly as transformers computes them, rotate-half layout,
the Llama-4 query temperature (spec §3.4-3.5), and the VLM tower's 2-D (row, column) RoPE (spec §12)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nemodiff_jax.config import Config, VisionConfig, yarn_get_mscale


def inv_freq_and_attention_factor(cfg: Config) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [H/2], attention factor), computed in float32 like transformers' torch code."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    if cfg.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    factor = cfg.rope_factor
    orig = cfg.rope_original_max_position_embeddings
    if cfg.rope_attention_factor is not None:
        attention_factor = cfg.rope_attention_factor
    elif cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, cfg.rope_mscale) / yarn_get_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1) - ramp).astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def cos_sin(cfg: Config, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [B, T, H] for absolute positions [B, T] (frequencies duplicated for rotate-half)."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, heads, H]; cos/sin [B, T, H] float32, cast to x's dtype first (as HF does)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def llama4_query_scale(cfg: Config, positions: jnp.ndarray) -> jnp.ndarray | None:
    """s(pos) = 1 + beta * ln(1 + floor(pos / original_max_position_embeddings)), float32 [B, T]; None if off."""
    if cfg.llama_4_scaling_beta is None:
        return None
    steps = jnp.floor(positions.astype(jnp.float32) / cfg.rope_original_max_position_embeddings)
    return 1.0 + cfg.llama_4_scaling_beta * jnp.log(1.0 + steps)


def pixtral_cos_sin(vcfg: VisionConfig, rows: jnp.ndarray, cols: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin float32 [P, H] of Pixtral's 2-D RoPE for patches at grid (rows[P], cols[P]) of their image.

    Of the H/2 plain inverse frequencies, the even-indexed ones turn with the patch row and the odd-indexed
    ones with the column; [row part | column part] is then duplicated for rotate-half (apply_rope), as
    transformers' PixtralVisionRotaryEmbedding lays it out. Positions restart at (0, 0) in every image."""
    dim = vcfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(vcfg.rope_theta), exponents, dtype=np.float32))
    freqs = jnp.concatenate([rows.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq[0::2]),
                             cols.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq[1::2])], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
