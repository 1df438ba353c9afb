"""The VLM's image path (spec §12): Pixtral vision tower, Mistral3 projector, and the splice of the image features
into the prompt's token embeddings, after which the LM runs unchanged (DESIGN §9).

    pixels --patchify (host)--> ImagePatches --VisionTower--> [P, E] --MultiModalProjector--> [M, D]
    --splice_image_features--> the prompt's embeddings, the `<|image_pad|>` rows replaced in order

Several images of different sizes run as ONE sequence of P patches: attention is block-diagonal (a patch sees
only its own image, never another; a chunk of query rows at a time, so its memory grows with P, not P**2), and
the 2-D RoPE restarts at (0, 0) in every image, exactly what transformers' PixtralVisionModel computes per
image. The tower and projector always compute in float32 with float32 matmuls (Precision.HIGHEST: no TF32/bf16
passes on GPUs), whatever dtype the weights are stored in: a bf16 tower was seen ~20% off on its features (spec
§12), while the weights upcast exactly.

Shape legend (model.py's, plus): P patches of all images, M merged image tokens, E tower width, F tower MLP
width, N tower heads, H tower head dim, C channels, Y/X pixel rows/columns of one patch, R = spatial_merge_size**2
patches per merged token, D text model width. Parameter layouts (Flax [in, out]): patch_conv [C,Y,X,E],
qkv [E,3,N,H], o [N,H,E], gate_up [E,2,F], down [F,E], merging_layer [E*R, E], linear_1 [E,D], linear_2 [D,D].
The names differ from the LM's (qkv_proj, o_proj, ...) on purpose: model.QUANTIZABLE selects matmul weights by
name, and the tower is never quantized. Parameters are replicated under a mesh (no logical axes): the tower is
small (0.43 B for VLM-8B) and runs once per image, at prefill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax import rope
from nemodiff_jax.config import Config, VisionConfig

COMPUTE_DTYPE = jnp.float32
PRECISION = jax.lax.Precision.HIGHEST
ATTENTION_CHUNK = 1024  # query rows per step of the tower's attention (block_diagonal_attention)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImagePatches:
    """The tower's input for a set of images (built on the host by `patchify`): every patch of every image as one
    sequence, raster order within an image, images one after another."""

    patches: jax.Array  # float32 [P, C, Y, X] pixel patches
    rows: jax.Array  # int32 [P] patch row within its image
    cols: jax.Array  # int32 [P] patch column within its image
    segments: jax.Array  # int32 [P] image index: attention stays inside one image
    merge_index: jax.Array  # int32 [M, R] each merged token's patches, (dy, dx) in raster order

    @property
    def num_tokens(self) -> int:
        """M: the image features (and prompt placeholders) these images make."""
        return self.merge_index.shape[0]


def merged_grid(height: int, width: int, vcfg: VisionConfig) -> tuple[int, int]:
    """(rows, columns) of merged tokens for an image of height x width pixels (multiples of patch * merge)."""
    cell = vcfg.patch_size * vcfg.spatial_merge_size
    return height // cell, width // cell


def patchify(images, vcfg: VisionConfig, image_sizes=None, pad_to: int | None = None) -> ImagePatches:
    """Cuts preprocessed images into the tower's patch sequence (numpy, on the host).

    `images`: a sequence of float arrays [C, H_i, W_i], or one array [N, C, H, W] (transformers' padded
    `pixel_values`). `image_sizes` [N, 2] (H_i, W_i), optional: the valid top-left region of each image (the
    rest, padding, is ignored, as transformers crops it). Every H_i, W_i must be a positive multiple of
    patch_size * spatial_merge_size (the image processor resizes to that) and at most image_size.

    `pad_to` (a multiple of spatial_merge_size**2, at least the patch count): the sequence is padded to that many
    patches, so that images of many sizes share a few compiled shapes. The padding patches are zeros in a
    segment of their own (segment -1: no real patch attends to them, nor they to one) and make merged tokens of
    their own after the real ones, which the caller drops: the real features are the first
    sum(H_i W_i) / (patch * merge)**2 rows, unchanged."""
    if isinstance(images, np.ndarray | jax.Array):
        if np.ndim(images) != 4:
            raise ValueError(f"images: an array must be [N, C, H, W], got shape {np.shape(images)} (pass one "
                             "[C, H, W] image as a list of one)")
        images = list(np.asarray(images))
    if not isinstance(images, Sequence) or not len(images):
        raise ValueError("patchify needs at least one image ([C, H, W] arrays or an [N, C, H, W] array)")
    if image_sizes is not None:
        image_sizes = np.asarray(image_sizes)
        if image_sizes.shape != (len(images), 2):
            raise ValueError(f"image_sizes must be [N, 2] = [{len(images)}, 2] (height, width), got "
                             f"{image_sizes.shape}")
    p, s = vcfg.patch_size, vcfg.spatial_merge_size
    cell = p * s
    patches, rows, cols, segments, merge = [], [], [], [], []
    start = 0
    for i, image in enumerate(images):
        image = np.asarray(image, np.float32)
        if image.ndim != 3 or image.shape[0] != vcfg.num_channels:
            raise ValueError(f"image {i}: expected [C={vcfg.num_channels}, H, W] pixels, got shape {image.shape}")
        h_px, w_px = image.shape[1:] if image_sizes is None else (int(image_sizes[i][0]), int(image_sizes[i][1]))
        if not (0 < h_px <= image.shape[1] and 0 < w_px <= image.shape[2]):
            raise ValueError(f"image {i}: size {h_px}x{w_px} does not fit its pixels {image.shape[1:]}")
        if h_px % cell or w_px % cell:
            raise ValueError(f"image {i}: {h_px}x{w_px} pixels is not a multiple of patch_size * "
                             f"spatial_merge_size = {cell} on both sides (resize it with the image processor)")
        if max(h_px, w_px) > vcfg.image_size:
            raise ValueError(f"image {i}: {h_px}x{w_px} pixels exceeds the tower's image_size {vcfg.image_size}")
        h, w = h_px // p, w_px // p
        grid = image[:, :h_px, :w_px].reshape(vcfg.num_channels, h, p, w, p)
        patches.append(grid.transpose(1, 3, 0, 2, 4).reshape(h * w, vcfg.num_channels, p, p))
        rows.append(np.repeat(np.arange(h, dtype=np.int32), w))
        cols.append(np.tile(np.arange(w, dtype=np.int32), h))
        segments.append(np.full(h * w, i, np.int32))
        # merged token (r, c) takes patches (r*s + dy, c*s + dx): torch unfold's kernel positions, raster order
        r, c, dy, dx = np.meshgrid(np.arange(h // s), np.arange(w // s), np.arange(s), np.arange(s), indexing="ij")
        merge.append((start + (r * s + dy) * w + c * s + dx).reshape(-1, s * s).astype(np.int32))
        start += h * w
    if pad_to is not None:
        r = s * s
        if pad_to < start or pad_to % r:
            raise ValueError(f"pad_to={pad_to} must be a multiple of {r} and at least the {start} patches")
        extra = pad_to - start
        patches.append(np.zeros((extra, vcfg.num_channels, p, p), np.float32))
        rows.append(np.zeros(extra, np.int32))
        cols.append(np.zeros(extra, np.int32))
        segments.append(np.full(extra, -1, np.int32))
        merge.append((start + np.arange(extra, dtype=np.int32)).reshape(-1, r))
    return ImagePatches(*(jnp.asarray(np.concatenate(a)) for a in (patches, rows, cols, segments, merge)))


def _dense(subscripts: str, x: jax.Array, w: nnx.Param) -> jax.Array:
    return jnp.einsum(subscripts, x, w[...].astype(COMPUTE_DTYPE), precision=PRECISION,
                      preferred_element_type=COMPUTE_DTYPE)


def _param(rngs: nnx.Rngs, shape, fan_in: int, dtype) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in ** -0.5
    return nnx.Param(value.astype(dtype), logical_axes=(None,) * len(shape))


class RMSNorm(nnx.Module):
    """RMSNorm entirely in float32 (the tower's activations are float32; the weight is upcast)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(COMPUTE_DTYPE)
        return self.weight[...].astype(COMPUTE_DTYPE) * (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True)
                                                                            + self.eps))


def block_diagonal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                             chunk: int | None = None) -> jax.Array:
    """Softmax attention of each patch over the patches of its own image: q, k, v float32 [P, N, H] (q not yet
    scaled), segments int32 [P] -> float32 [P, N, H]. Query rows go `chunk` at a time (default
    ATTENTION_CHUNK), so the scores take N * chunk * P floats instead of N * P * P (one 1036 x 1036 image,
    P = 5476, 16 heads: 0.36 GB instead of 1.9 GB); each row's softmax is the dense one's. P <= chunk: one
    dense step. Every row attends to itself (same segment), so no row is all masked."""
    chunk = chunk or ATTENTION_CHUNK

    def attend(q_rows: jax.Array, seg_rows: jax.Array) -> jax.Array:
        scores = jnp.einsum("pnh,qnh->npq", q_rows, k, precision=PRECISION) * q.shape[-1] ** -0.5
        mask = seg_rows[:, None] == segments[None, :]  # block-diagonal: the patches of one image
        probs = jax.nn.softmax(jnp.where(mask[None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("npq,qnh->pnh", probs, v, precision=PRECISION)

    p = q.shape[0]
    if p <= chunk:
        return attend(q, segments)
    n = -(-p // chunk)
    pad = n * chunk - p  # extra query rows (dropped): the last row's segment, so they too see a key
    q_chunks = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(n, chunk, *q.shape[1:])
    seg_chunks = jnp.pad(segments, (0, pad), mode="edge").reshape(n, chunk)
    out = jax.lax.map(lambda c: attend(*c), (q_chunks, seg_chunks))  # a loop: one chunk's scores live at a time
    return out.reshape(n * chunk, *q.shape[1:])[:p]


class VisionAttention(nnx.Module):
    def __init__(self, v: VisionConfig, rngs: nnx.Rngs, dtype):
        e, n, h = v.hidden_size, v.num_heads, v.head_dim
        self.qkv = _param(rngs, (e, 3, n, h), e, dtype)
        self.o = _param(rngs, (n, h, e), n * h, dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        qkv = _dense("pe,ecnh->pcnh", x, self.qkv)
        q = rope.apply_rope(qkv[None, :, 0], cos[None], sin[None])[0]
        k = rope.apply_rope(qkv[None, :, 1], cos[None], sin[None])[0]
        out = block_diagonal_attention(q, k, qkv[:, 2], segments)
        return _dense("pnh,nhe->pe", out, self.o)


class VisionMLP(nnx.Module):
    def __init__(self, v: VisionConfig, rngs: nnx.Rngs, dtype):
        e, f = v.hidden_size, v.intermediate_size
        self.gate_up = _param(rngs, (e, 2, f), e, dtype)
        self.down = _param(rngs, (f, e), f, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = _dense("pe,ecf->pcf", x, self.gate_up)
        return _dense("pf,fe->pe", jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], self.down)


class VisionBlock(nnx.Module):
    """Pre-norm block, as transformers' PixtralAttentionLayer."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs, dtype):
        self.attention_norm = RMSNorm(v.hidden_size, v.rms_norm_eps, dtype)
        self.attention = VisionAttention(v, rngs, dtype)
        self.ffn_norm = RMSNorm(v.hidden_size, v.rms_norm_eps, dtype)
        self.feed_forward = VisionMLP(v, rngs, dtype)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attention(self.attention_norm(x), cos, sin, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTower(nnx.Module):
    """Pixtral: patch conv (no bias; a matmul over patches, since stride = kernel) -> ln_pre -> pre-norm blocks.
    No final norm: the last hidden state is the feature (vision_feature_layer -1)."""

    def __init__(self, v: VisionConfig, rngs: nnx.Rngs, dtype):
        self.config = v
        c, p, e = v.num_channels, v.patch_size, v.hidden_size
        self.patch_conv = _param(rngs, (c, p, p, e), c * p * p, dtype)
        self.ln_pre = RMSNorm(e, v.rms_norm_eps, dtype)
        self.layers = nnx.List([VisionBlock(v, rngs, dtype) for _ in range(v.num_layers)])

    def __call__(self, images: ImagePatches) -> jax.Array:
        """float32 [P, E] features of every patch."""
        x = _dense("pcyx,cyxe->pe", images.patches.astype(COMPUTE_DTYPE), self.patch_conv)
        x = self.ln_pre(x)
        cos, sin = rope.pixtral_cos_sin(self.config, images.rows, images.cols)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"vision_layer{i}"):
                x = layer(x, cos, sin, images.segments)
        return x


class MultiModalProjector(nnx.Module):
    """Mistral3: RMSNorm -> patch merger (each merged token's R patches concatenated channel-major, as torch
    `unfold` orders them: index e*R + dy*s + dx) -> merging_layer -> linear_1 -> GELU -> linear_2; no biases."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
        v = cfg.vision
        e, d, r = v.hidden_size, cfg.hidden_size, v.spatial_merge_size ** 2
        # eps: the text model's, as transformers' Mistral3MultiModalProjector builds it
        self.norm = RMSNorm(e, cfg.rms_norm_eps, dtype)
        self.merging_layer = _param(rngs, (e * r, e), e * r, dtype)
        self.linear_1 = _param(rngs, (e, d), e, dtype)
        self.linear_2 = _param(rngs, (d, d), d, dtype)
        self.tanh_gelu = v.projector_hidden_act == "gelu_pytorch_tanh"  # "gelu": exact (erf), as transformers

    def __call__(self, features: jax.Array, merge_index: jax.Array) -> jax.Array:
        """features float32 [P, E], merge_index [M, R] -> float32 [M, D]."""
        x = self.norm(features)
        m, r = merge_index.shape
        x = x[merge_index].transpose(0, 2, 1).reshape(m, -1)  # [M, R, E] -> [M, E*R], channel-major
        x = _dense("mk,ke->me", x, self.merging_layer)
        x = jax.nn.gelu(_dense("me,ed->md", x, self.linear_1), approximate=self.tanh_gelu)
        return _dense("md,dk->mk", x, self.linear_2)


def splice_image_features(embeds: jax.Array, tokens: jax.Array, features: jax.Array | None,
                          image_token_id: int) -> jax.Array:
    """embeds [B,T,D] with its image-placeholder rows (tokens == image_token_id) replaced by features [M, D],
    in order: row-major over [B, T], as transformers' masked_scatter fills them. Other rows are untouched.

    The number of placeholders must equal M. With concrete tokens (not under jit) a mismatch is a ValueError
    that gives both counts; under jit it cannot be checked, so callers splice outside jit or check first
    (`check_placeholders`)."""
    if not isinstance(tokens, jax.core.Tracer):
        check_placeholders(tokens, 0 if features is None else features.shape[0], image_token_id)
    if features is None or features.shape[0] == 0:
        return embeds
    is_image = tokens == image_token_id
    order = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1  # k-th placeholder takes feature k
    picked = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0)
    return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


def place_image_features(embeds: jax.Array, features: jax.Array, index: jax.Array) -> jax.Array:
    """embeds [B,T,D] with row (b, t) replaced by features[index[b, t]] where index >= 0 (features [M, D]).

    `splice_image_features` with the order made explicit, for jitted batches: the caller (slots.Pool) builds
    `index` on the host from the placeholder positions, so features may be padded to a bucketed M and one
    prompt's rows may appear twice in a batch (both rows take the same features)."""
    picked = jnp.take(features, jnp.clip(index, 0, features.shape[0] - 1), axis=0)
    return jnp.where((index >= 0)[..., None], picked.astype(embeds.dtype), embeds)


def check_placeholders(tokens, num_features: int, image_token_id: int) -> None:
    """Raises ValueError unless `tokens` holds exactly `num_features` placeholders `image_token_id`."""
    count = int(np.sum(np.asarray(tokens) == image_token_id))
    if count != num_features:
        raise ValueError(f"the prompt has {count} image placeholder token(s) (id {image_token_id}) but the "
                         f"images give {num_features} feature(s); they must be equal (one <|image_pad|> per "
                         "merged image patch)")
