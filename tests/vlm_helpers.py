"""Shared pieces of the image-input tests: a tiny random VLM saved in HF format with the package's tokenizer, test
images, and a plain reference decode written directly over the model."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from nemodiff_jax import vision
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import VLM_PRESETS
from nemodiff_jax.image_processing import preprocess
from nemodiff_jax.model import Transformer, abstract_model
from nemodiff_jax.tokenizer import Tokenizer

# tiny-vlm (4-pixel patches, 2x2 merge: an 8-pixel cell is one image token; images up to 64 pixels a side) with the
# package tokenizer's vocabulary
TINY_VLM = VLM_PRESETS["tiny-vlm"].replace(vocab_size=Tokenizer.default().vocab_size)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def random_vlm(seed: int = 0, cfg=TINY_VLM) -> Transformer:
    """A float32 VLM with random weights drawn on the host (no per-shape RNG compiles): matrices at fan-in scale,
    norm weights near 1, the embedding at half scale (about the image features' size, so that both text
    and images steer the output)."""
    graphdef, state = nnx.split(abstract_model(cfg, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray((1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32))
        if "embed_tokens" in path:
            return jnp.asarray((0.5 * rng.standard_normal(leaf.shape)).astype(np.float32))
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 2 else leaf.shape[0]
        return jnp.asarray((fan_in ** -0.5 * rng.standard_normal(leaf.shape)).astype(np.float32))

    state = jax.tree_util.tree_map_with_path(lambda p, x: fill([getattr(k, "key", k) for k in p], x), state)
    return nnx.merge(graphdef, state)


def tiny_vlm_with_tokenizer(directory: Path, seed: int = 0, model: Transformer | None = None) -> Path:
    """A tiny random VLM saved in HF format (config.json with a vision_config, safetensors) beside the package's
    tokenizer files, so that text, chat and image prompts all work through nemodiff_jax.load."""
    from nemodiff_jax.convert.hf import save_hf
    from nemodiff_jax.embedded import ASSETS

    save_hf(model if model is not None else random_vlm(seed), directory)
    for name in TOKENIZER_FILES:
        shutil.copy(ASSETS / name, Path(directory) / name)
    return Path(directory)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random RGB picture: a coarse random colour field (3x3 cells, bilinearly enlarged) plus noise, so that
    pictures of different seeds differ in their large shapes, not only in noise the tower averages away."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.BILINEAR)
    pixels = 0.8 * np.asarray(coarse, np.float32) + 0.2 * rng.integers(0, 256, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def reference_embeds(model: Transformer, ids, images) -> jax.Array:
    """One prompt's input embeddings [1, T, D] written directly over the model: the images preprocessed
    (image_processing.preprocess, at the tower's cap) and encoded together (vision.patchify ->
    model.encode_images), spliced into the prompt's embeddings in order (model.embed)."""
    features = None
    if images:
        v = model.config.vision
        processed = [preprocess(im, max_image_size=min(1400, v.image_size), patch_size=v.patch_size,
                                merge_size=v.spatial_merge_size) for im in images]
        features = model.encode_images(vision.patchify([p.pixel_values for p in processed], v))
    return model.embed(jnp.asarray([ids], jnp.int32), features)


def reference_prefill(model: Transformer, ids, images, capacity: int):
    """The prefill written directly over the model for one prompt: its embeddings (reference_embeds), one causal
    forward from them into a fresh KV cache. Returns the last position's logits [V] and the advanced cache."""
    cfg = model.config
    embeds = reference_embeds(model, ids, images)
    cache = KVCache.init(cfg, 1, capacity, jnp.float32)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    logits, cache = model(None, positions, cache, causal=True, embeds=embeds)
    return logits[0, -1], cache.advance(jnp.asarray([len(ids)]))


def reference_greedy(model: Transformer, ids, images, max_new: int, stop_ids=()) -> list[int]:
    """Greedy AR written directly over the model, one token at a time, for one prompt: reference_prefill, then
    argmax and a one-token forward per step."""
    logits, cache = reference_prefill(model, ids, images, len(ids) + max_new + 8)
    out = []
    for step in range(max_new):
        token = int(jnp.argmax(logits))
        out.append(token)
        if token in stop_ids:
            break
        logits, cache = model(jnp.asarray([[token]], jnp.int32), jnp.asarray([[len(ids) + step]], jnp.int32), cache,
                              causal=True)
        logits = logits[0, -1]
        cache = cache.advance(jnp.asarray([1]))
    return out


def text_model_of(vlm: Transformer) -> Transformer:
    """The text model with the VLM's own LM weights (its tower and projector dropped)."""
    state = nnx.to_pure_dict(nnx.state(vlm, nnx.Param))
    text_state = {k: v for k, v in state.items() if k not in ("vision_tower", "multi_modal_projector")}
    graphdef, abstract = nnx.split(abstract_model(vlm.config.replace(vision=None), jnp.float32))
    nnx.replace_by_pure_dict(abstract, text_state)
    return nnx.merge(graphdef, abstract)
