"""The VLM's image path (spec §12, nemodiff_jax/vision.py): Pixtral tower + Mistral3 projector + the splice into
the prompt, against HF transformers' `Mistral3ForConditionalGeneration` (committed fixture from
scripts/vlm_reference.py, and live where torch imports), plus the properties that must hold without a
reference: one image alone = the same image beside others, float32 compute for 16-bit weights, placeholder
counts checked, an image-free prompt on the VLM = the text model."""

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemodiff_jax
from nemodiff_jax import vision
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import IMAGE_TOKEN_ID, PRESETS, VLM_PRESETS, Config
from nemodiff_jax.convert.hf import load_model
from nemodiff_jax.model import Transformer, abstract_model

FIXTURES = Path(__file__).parent / "fixtures" / "vlm"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").exists()) if FIXTURES.is_dir() else []
TOL = 1e-5  # float32, as the text parity fixtures
TINY = VLM_PRESETS["tiny-vlm"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, patches):
    return nnx.merge(graphdef, state).encode_images(patches)


def encode(model: Transformer, patches: vision.ImagePatches) -> jax.Array:
    """model.encode_images under jit: one compile per shape instead of an eager dispatch per op."""
    return _encode(*nnx.split(model), patches)


def random_model(cfg: Config, seed: int = 0) -> Transformer:
    """A float32 model with random weights filled in host-side (no per-shape RNG compiles)."""
    graphdef, state = nnx.split(abstract_model(cfg, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray((1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32))
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 2 else leaf.shape[0]
        return jnp.asarray((fan_in ** -0.5 * rng.standard_normal(leaf.shape)).astype(np.float32))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def positions(ids) -> jax.Array:
    b, t = ids.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(graphdef, state, embeds, causal, cache):
    model = nnx.merge(graphdef, state)
    b, t = embeds.shape[:2]
    kv = KVCache.init(model.config, b, 64, model.dtype) if cache else None
    return model(None, positions(embeds), kv, causal=causal, embeds=embeds)[0]


def vlm_logits(model: Transformer, ref, causal: bool, cache: bool) -> np.ndarray:
    """The VLM prefill: tower + projector, splice into the prompt (eagerly: the placeholder count is checked),
    one forward (with or without a KV cache)."""
    images = vision.patchify(ref["pixel_values"], model.config.vision, ref["image_sizes"])
    embeds = model.embed(jnp.asarray(ref["input_ids"]), encode(model, images))
    return np.asarray(_forward(*nnx.split(model), embeds, causal, cache))


def check_case(model: Transformer, ref, label: str):
    images = vision.patchify(ref["pixel_values"], model.config.vision, ref["image_sizes"])
    got = {"vision_features": np.asarray(model.vision_tower(images)),
           "image_features": np.asarray(encode(model, images))}
    # float32 means float32 for the text model's matmuls too (GPUs default to TF32; the Generator sets this).
    # The tower's features above are computed without it: the tower asks for full precision itself.
    with jax.default_matmul_precision("highest"):
        for causal in (True, False):
            for cache in (False, True):
                got[f"logits_{'causal' if causal else 'bidir'}{'_cache' if cache else ''}"] = vlm_logits(
                    model, ref, causal, cache)
    for name, value in got.items():
        want = ref[name.removesuffix("_cache")]
        assert value.shape == want.shape and value.dtype == np.float32, (name, value.shape, value.dtype)
        err = rel_err(value, want)
        print(f"[vlm {label}] {name}: rel err {err:.3e}")
        assert err <= TOL, f"{label} {name}: ||jax-hf||/||hf|| = {err:.3e} > {TOL:g}"


# ------------------------------------------------------------------ parity with transformers


def test_fixtures_present():
    assert CASES, f"missing VLM fixtures in {FIXTURES}; run scripts/vlm_reference.py"


@pytest.fixture(scope="module", params=CASES)
def fixture_case(request):
    d = FIXTURES / request.param
    return request.param, load_model(d, Config.from_file(d / "config.json"), jnp.float32, progress=False), \
        np.load(d / "reference.npz")


def test_matches_transformers_fixture(fixture_case):
    """Tower features, projector output and the prompt's logits (causal and bidirectional, with and without a KV
    cache) for three images of three sizes in one tower pass, two of them in one prompt row."""
    name, model, ref = fixture_case
    assert len(ref["image_sizes"]) >= 2 and len({tuple(s) for s in ref["image_sizes"]}) == len(ref["image_sizes"])
    check_case(model, ref, name)


def test_prefill_with_images_then_decode(fixture_case):
    """Images enter at prefill only: after an embeds prefill of all but the last token into the KV cache, the
    last (text) token decoded by id gives transformers' causal logits for that position."""
    _, model, ref = fixture_case
    ids = jnp.asarray(ref["input_ids"])
    assert not np.any(np.asarray(ids[:, -1]) == IMAGE_TOKEN_ID)
    images = vision.patchify(ref["pixel_values"], model.config.vision, ref["image_sizes"])
    embeds = model.embed(ids, encode(model, images))

    @functools.partial(jax.jit, static_argnums=0)
    def prefill_then_decode(graphdef, state, embeds, ids):
        model = nnx.merge(graphdef, state)
        b, t = ids.shape
        cache = KVCache.init(model.config, b, 64, model.dtype)
        _, cache = model(None, positions(ids)[:, :-1], cache, causal=True, embeds=embeds[:, :-1])
        cache = cache.advance(jnp.full((b,), t - 1))
        return model(ids[:, -1:], positions(ids)[:, -1:], cache, causal=True)[0]

    with jax.default_matmul_precision("highest"):
        last = prefill_then_decode(*nnx.split(model), embeds, ids)
    err = rel_err(last[:, 0], ref["logits_causal"][:, -1])
    assert err <= TOL, err


def test_padded_batch_equals_list_of_images(fixture_case):
    """transformers' padded pixel_values + image_sizes and a list of exactly-sized images give the same patches."""
    _, model, ref = fixture_case
    crops = [px[:, :h, :w] for px, (h, w) in zip(ref["pixel_values"], ref["image_sizes"])]
    a = vision.patchify(ref["pixel_values"], model.config.vision, ref["image_sizes"])
    b = vision.patchify(crops, model.config.vision)
    for field in dataclasses.fields(vision.ImagePatches):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name), err_msg=field.name)
    sizes = ref["image_sizes"]
    cell = model.config.vision.patch_size * model.config.vision.spatial_merge_size
    assert a.num_tokens == int((sizes // cell).prod(axis=1).sum()) == int((ref["input_ids"] == IMAGE_TOKEN_ID).sum())


def test_matches_transformers_live(tmp_path):
    """The same comparison on a fresh random model built by transformers now (skipped without torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "vlm_reference", Path(__file__).resolve().parents[1] / "scripts" / "vlm_reference.py")
    vlm_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vlm_reference)
    for case in vlm_reference.CASES:
        nld, weights, inputs, outputs = vlm_reference.build_case(case, case["seed"] + 1000)
        d = tmp_path / case["name"]
        vlm_reference.parity_reference.write_hf_dir(d, nld, weights)
        model = load_model(d, Config.from_file(d / "config.json"), jnp.float32, progress=False)
        check_case(model, inputs | outputs, f"live {case['name']}")


# ------------------------------------------------------------------ properties of the tower


@pytest.fixture(scope="module")
def tiny():
    """A random tiny VLM (float32) and three images of different sizes."""
    model = random_model(TINY)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in ((16, 24), (24, 8), (8, 8))]
    return model, images


def test_each_image_only_sees_itself(tiny):
    """Block-diagonal attention and per-image RoPE: an image's features are the same alone or in one pass with
    others, in any position of the sequence."""
    model, images = tiny
    together = np.asarray(encode(model, vision.patchify(images, TINY.vision)))
    alone = [np.asarray(encode(model, vision.patchify([im], TINY.vision))) for im in images]
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=1e-6, atol=1e-6)
    reordered = np.asarray(encode(model, vision.patchify(images[::-1], TINY.vision)))
    np.testing.assert_allclose(reordered, np.concatenate(alone[::-1]), rtol=1e-6, atol=1e-6)
    # and the mask matters: one segment for all patches changes every image's features
    patches = vision.patchify(images, TINY.vision)
    mixed = encode(model, dataclasses.replace(patches, segments=jnp.zeros_like(patches.segments)))
    assert rel_err(mixed, together) > 1e-2


def test_tower_computes_in_float32_for_bf16_weights(fixture_case):
    """bf16-stored weights: the tower upcasts them and computes in float32, so its features equal those of a
    float32 model holding the same (bf16-rounded) weights, and stay float32."""
    name, model32, ref = fixture_case
    d = FIXTURES / name
    cfg = Config.from_file(d / "config.json")
    model16 = load_model(d, cfg, jnp.bfloat16, progress=False)
    graphdef, state = nnx.split(model32)
    rounded = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state))
    images = vision.patchify(ref["pixel_values"], cfg.vision, ref["image_sizes"])
    got, want = model16.encode_images(images), rounded.encode_images(images)
    assert got.dtype == jnp.float32
    # float32 rounding only (a bf16 computation would be ~1e-2 off); bit-equal on CPU, where both compile alike
    assert rel_err(got, want) <= 1e-6, rel_err(got, want)
    assert rel_err(got, ref["image_features"]) < 2e-2  # bf16 weights, float32 activations: still close


def dense_attention_reference(q, k, v, segments) -> np.ndarray:
    """The tower's attention written out in float64 numpy, one query row at a time over its own image's keys."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    segments = np.asarray(segments)
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        keys = segments == segments[i]
        scores = np.einsum("nh,qnh->nq", q[i], k[keys]) / np.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[i] = np.einsum("nq,qnh->nh", probs / probs.sum(-1, keepdims=True), v[keys])
    return out


@pytest.mark.parametrize("chunk", [16, 7, 24, 64])
def test_chunked_attention_equals_dense(chunk):
    """Query-chunked block-diagonal attention == the dense per-row softmax, for chunks that cut through images
    (16, 7: the last chunk padded; 24: P a multiple of it; 64 > P: one dense step), three images and a padding
    segment (-1, as patchify's pad_to makes). The input is sensitive to the mask: attending across images
    instead would be far off, so a chunk paired with the wrong rows' segments fails here."""
    rng = np.random.default_rng(3)
    segments = np.array([0] * 13 + [1] * 22 + [2] * 5 + [-1] * 8, np.int32)  # P = 48
    q, k, v = (jnp.asarray(rng.standard_normal((48, 2, 8)) * 2, jnp.float32) for _ in range(3))
    want = dense_attention_reference(q, k, v, segments)
    got = vision.block_diagonal_attention(q, k, v, jnp.asarray(segments), chunk=chunk)
    assert got.shape == want.shape and got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(vision.block_diagonal_attention, static_argnums=4)(q, k, v, jnp.asarray(segments), chunk)
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-5, atol=1e-5)
    unmasked = dense_attention_reference(q, k, v, np.zeros_like(segments))
    assert rel_err(unmasked, want) > 0.1
    shifted = dense_attention_reference(q, k, v, np.roll(segments, chunk % 48))
    assert rel_err(shifted, want) > 0.1


def test_chunked_tower_matches_transformers_fixture(fixture_case, monkeypatch):
    """The tower's features with attention in chunks of a few query rows (chunk boundaries inside the fixture's
    three images) still match transformers' at the parity tolerance, and the one-step (dense) tower to
    float32 rounding."""
    _, model, ref = fixture_case
    images = vision.patchify(ref["pixel_values"], model.config.vision, ref["image_sizes"])
    assert images.patches.shape[0] > 2 * 16  # several chunks
    dense = np.asarray(model.vision_tower(images))
    for chunk in (16, 5):
        monkeypatch.setattr(vision, "ATTENTION_CHUNK", chunk)
        got = np.asarray(model.vision_tower(images))  # eager: traced again with this chunk
        assert rel_err(got, ref["vision_features"]) <= TOL, (chunk, rel_err(got, ref["vision_features"]))
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)


def test_encode_images_under_jit(tiny):
    model, images = tiny
    patches = vision.patchify(images[:2], TINY.vision)
    np.testing.assert_allclose(np.asarray(encode(model, patches)), np.asarray(model.encode_images(patches)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,match", [
    ((3, 12, 16), r"image 0: 12x16 pixels is not a multiple of patch_size \* spatial_merge_size = 8"),
    ((3, 16, 20), "image 0: 16x20 pixels is not a multiple"),
    ((1, 16, 16), r"image 0: expected \[C=3, H, W\] pixels, got shape \(1, 16, 16\)"),
    ((3, 72, 8), "image 0: 72x8 pixels exceeds the tower's image_size 64"),
])
def test_patchify_rejects_bad_images(size, match):
    with pytest.raises(ValueError, match=match):
        vision.patchify([np.zeros(size, np.float32)], TINY.vision)


def test_patchify_rejects_bad_sizes():
    px = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"image_sizes must be \[N, 2\] = \[2, 2\]"):
        vision.patchify(px, TINY.vision, [[16, 16]])
    with pytest.raises(ValueError, match=r"image 1: size 24x16 does not fit its pixels \(16, 16\)"):
        vision.patchify(px, TINY.vision, [[16, 16], [24, 16]])
    with pytest.raises(ValueError, match="at least one image"):
        vision.patchify([], TINY.vision)
    with pytest.raises(ValueError, match=r"an array must be \[N, C, H, W\], got shape \(3, 16, 16\)"):
        vision.patchify(px[0], TINY.vision)


def test_patchify_layout():
    """Raster order per image, then images in turn; positions restart per image; merge groups (dy, dx)."""
    p = vision.patchify([np.zeros((3, 8, 16), np.float32), np.zeros((3, 16, 8), np.float32)], TINY.vision)
    # image 0: 2x4 patches -> 1x2 merged; image 1: 4x2 patches -> 2x1 merged
    np.testing.assert_array_equal(p.rows, [0, 0, 0, 0, 1, 1, 1, 1] + [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(p.cols, [0, 1, 2, 3, 0, 1, 2, 3] + [0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(p.segments, [0] * 8 + [1] * 8)
    np.testing.assert_array_equal(p.merge_index, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    assert p.num_tokens == 4 and vision.merged_grid(8, 16, TINY.vision) == (1, 2)


# ------------------------------------------------------------------ splicing into the prompt


def prompt_with(n_pads: int, length: int = 16) -> np.ndarray:
    ids = np.arange(30, 30 + length, dtype=np.int32)[None].repeat(2, 0)
    flat = ids.reshape(-1)
    flat[np.linspace(1, flat.size - 2, n_pads).astype(int)] = IMAGE_TOKEN_ID
    return ids


def test_splice_places_features_in_order(tiny):
    model, _ = tiny
    ids = prompt_with(5)
    feats = jnp.asarray(np.random.default_rng(1).standard_normal((5, TINY.hidden_size)), jnp.float32)
    got = np.asarray(model.embed(jnp.asarray(ids), feats))
    plain = np.asarray(model.embed(jnp.asarray(ids)))
    is_pad = ids == IMAGE_TOKEN_ID
    assert is_pad[0].any() and is_pad[1].any()  # both rows hold placeholders: order is row-major over [B, T]
    np.testing.assert_array_equal(got[is_pad], np.asarray(feats))
    np.testing.assert_array_equal(got[~is_pad], plain[~is_pad])


@pytest.mark.parametrize("n_pads,n_features", [(4, 5), (5, 4), (0, 3), (3, 0)])
def test_splice_count_mismatch_is_an_error(tiny, n_pads, n_features):
    model, _ = tiny
    ids = jnp.asarray(prompt_with(n_pads))
    feats = jnp.zeros((n_features, TINY.hidden_size), jnp.float32)
    with pytest.raises(ValueError, match=rf"the prompt has {n_pads} image placeholder token\(s\) \(id 19\) but the "
                                         rf"images give {n_features} feature\(s\)"):
        model.embed(ids, feats)


def test_image_inputs_on_a_text_model_are_errors():
    model = random_model(PRESETS["tiny"])
    with pytest.raises(ValueError, match="no vision tower"):
        model.embed(jnp.asarray(prompt_with(2)), jnp.zeros((2, 64), jnp.float32))
    patches = vision.patchify([np.zeros((3, 8, 8), np.float32)], TINY.vision)
    with pytest.raises(ValueError, match="no vision tower"):
        model.encode_images(patches)


def test_image_free_prompt_equals_text_model(tiny, tmp_path):
    """A VLM is the text model plus a tower: without images its logits are the text model's with the same LM
    weights, bit for bit, through the public API and through the embeds path, causal and bidirectional."""
    model, _ = tiny
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    text_state = {k: v for k, v in state.items() if k not in ("vision_tower", "multi_modal_projector")}
    graphdef, abstract = nnx.split(abstract_model(PRESETS["tiny"], jnp.float32))
    nnx.replace_by_pure_dict(abstract, text_state)
    text = nnx.merge(graphdef, abstract)
    ids = np.array([[1, 5, 100, 7, 255, 0, 42, 9, 18, 20, 21, 3]], np.int32)  # image ids but no placeholder
    for causal in (True, False):
        want, _ = text(jnp.asarray(ids), positions(ids), causal=causal)
        got, _ = model(jnp.asarray(ids), positions(ids), causal=causal)
        via_embeds, _ = model(None, positions(ids), causal=causal, embeds=model.embed(jnp.asarray(ids), None))
        spliced_nothing, _ = model(None, positions(ids), causal=causal,
                                   embeds=model.embed(jnp.asarray(ids), jnp.zeros((0, TINY.hidden_size))))
        for x in (got, via_embeds, spliced_nothing):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(want))
    from nemodiff_jax.convert.hf import save_hf

    gen = nemodiff_jax.load(save_hf(model, tmp_path / "vlm"), dtype="float32", progress=False)
    assert gen.config.vision == TINY.vision
    np.testing.assert_array_equal(gen.logits(ids), nemodiff_jax.Generator(text).logits(ids))
