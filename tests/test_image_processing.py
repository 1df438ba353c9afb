"""VLM-8B image preprocessing (spec §12): decoding, RGB conversion, the resize rule, OpenCV's bicubic resize, CLIP
normalisation and the image's token layout.

The references in tests/fixtures/images/reference.npz were made by OpenCV and transformers themselves
(scripts/image_fixtures.py) from the image files beside it: transformers' Pixtral RGB conversion (identical under
4.57.1 and 5.17.0), `cv2.resize(..., INTER_CUBIC)` of float32 pixels with Intel IPP off (which our resize equals
bit for bit) and on (the x86 wheels' default, up to ~1e-3 of a pixel level away), and transformers' rescale and
normalize. Where OpenCV or transformers is importable, the same checks also run live on random images."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nemodiff_jax.image_processing import (
    IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID, IMAGE_START_TOKEN_ID, IMAGE_TOKEN_ID, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
    ImageError, decode_base64_image, image_token_ids, load_image, normalize, preprocess, preprocess_images,
    resize_bicubic, target_size)

FIXTURES = Path(__file__).parent / "fixtures" / "images"
REF = dict(np.load(FIXTURES / "reference.npz"))
META = json.loads(str(REF["meta"]))
CASES = list(META["cases"])
IPP_CASES = [c for c in CASES if f"{c}/resized_ipp" in REF]
S, P, B, E = IMAGE_START_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID


def path(case: str) -> Path:
    return FIXTURES / META["cases"][case]["file"]


def max_size(case: str) -> int:
    return int(REF[f"{case}/max_image_size"])


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------- against the fixtures


def test_fixture_cases_are_the_current_cases():
    """The committed references cover exactly the images the fixture script defines (regenerate after editing)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        from image_fixtures import CASES as SCRIPT_CASES
    finally:
        sys.path.pop(0)
    assert CASES == list(SCRIPT_CASES), "run scripts/image_fixtures.py"
    for case, (mode, width, height, cap, with_ipp) in SCRIPT_CASES.items():
        with Image.open(path(case)) as image:
            assert (image.mode, image.size) == (META["cases"][case]["mode"], (width, height))
        assert max_size(case) == cap and (case in IPP_CASES) == with_ipp


@pytest.mark.parametrize("case", CASES)
def test_decoding_and_rgb_conversion_match_transformers(case):
    rgb = load_image(path(case))
    assert rgb.mode == "RGB"
    expected = REF.get(f"{case}/rgb")
    if expected is None:  # an RGB file: its own pixels
        with Image.open(path(case)) as image:
            expected = np.asarray(image)
    np.testing.assert_array_equal(np.asarray(rgb), expected)


def test_transparency_becomes_white_and_opaque_pixels_keep_their_colour():
    """RGBA: the first third of the columns is transparent, the last third opaque (scripts/image_fixtures.py)."""
    with Image.open(path("rgba_33x21")) as image:
        raw = np.asarray(image)
    rgb = np.asarray(load_image(path("rgba_33x21")))
    assert (raw[:, :11, 3] == 0).all() and (raw[:, 22:, 3] == 255).all()
    assert (rgb[:, :11] == 255).all()
    np.testing.assert_array_equal(rgb[:, 22:], raw[:, 22:, :3])
    half = raw[:, 11:22]  # alpha 128..191: between the colour and white
    lo, hi = np.minimum(half[..., :3], 255), np.maximum(half[..., :3], 255)
    assert ((rgb[:, 11:22] >= lo) & (rgb[:, 11:22] <= hi)).all() and (rgb[:, 11:22] != 255).any()
    with Image.open(path("palette_30x20")) as image:  # the palette's transparent index, top-left
        see_through = np.asarray(image) == image.info["transparency"]
    assert (np.asarray(load_image(path("palette_30x20")))[see_through] == 255).all()


@pytest.mark.parametrize("case", CASES)
def test_resize_matches_opencv_bit_for_bit(case):
    rgb = load_image(path(case))
    size = target_size(rgb.height, rgb.width, max_image_size=max_size(case))
    assert size == tuple(REF[f"{case}/size"])
    resized = resize_bicubic(np.asarray(rgb, dtype=np.float32), *size)
    assert resized.dtype == np.float32
    np.testing.assert_array_equal(resized, REF[f"{case}/resized"])


@pytest.mark.parametrize("case", IPP_CASES)
def test_resize_stays_near_opencv_with_ipp(case):
    """IPP (the x86 wheels' default) rounds differently: within 0.01 of a pixel level (0..255) on these images."""
    rgb = np.asarray(load_image(path(case)), dtype=np.float32)
    resized = resize_bicubic(rgb, *REF[f"{case}/size"])
    np.testing.assert_allclose(resized, REF[f"{case}/resized_ipp"], rtol=0, atol=0.01)


@pytest.mark.parametrize("case", CASES)
def test_pixel_values_match_transformers(case):
    image = preprocess(path(case), max_image_size=max_size(case))
    assert image.image_size == tuple(REF[f"{case}/size"])
    assert image.pixel_values.dtype == np.float32 and image.pixel_values.shape == (3, *image.image_size)
    np.testing.assert_allclose(image.pixel_values, REF[f"{case}/pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_transformers_pixtral_sizing_agrees_within_the_cap(case):
    """Within the cap transformers' Pixtral sizing (ceil to the 28-pixel unit) is the checkpoint's: the same."""
    h, w = np.asarray(load_image(path(case))).shape[:2]
    if max(h, w) <= max_size(case):
        assert target_size(h, w, max_image_size=max_size(case)) == tuple(REF[f"{case}/hf_size"])


# ------------------------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize("hw, grid", [
    ((1400, 1400), (50, 50)), ((1540, 1540), (50, 50)), ((1401, 1401), (50, 50)), ((28, 28), (1, 1)),
    ((28, 29), (1, 2)), ((100, 50), (4, 2)), ((3000, 1500), (50, 25)), ((770, 3080), (13, 50)),
    ((200, 300), (8, 11)), ((23, 37), (1, 2)),
])
def test_target_size(hw, grid):
    """Rounded up to 28-pixel units; the longest edge capped at 1400 (the 3080x770 side: 350 px -> 13 units)."""
    assert target_size(*hw) == (grid[0] * 28, grid[1] * 28)


def test_target_size_rounding_and_parameters():
    # Python's round: 561 * 0.5 = 280.5 -> 280 (halves to even), not 281 (= 11 units).
    assert target_size(561, 2800) == (280, 1400)
    # round, not transformers' floor: 702 * 0.4 = 280.8 -> 281 -> 11 units (floor: 280 -> 10 units).
    assert target_size(702, 3500) == (308, 1400)
    assert target_size(1, 5000) == (28, 1400)  # a side never vanishes
    assert target_size(1540, 1540, max_image_size=784) == (784, 784)
    assert target_size(300, 200, max_image_size=112) == (112, 84)  # 200 * 112/300 = 74.67 -> 75 -> 84
    assert target_size(33, 10, patch_size=4, merge_size=2) == (40, 16)
    for bad in ({"max_image_size": 0}, {"patch_size": 1.5}, {"merge_size": True}):
        with pytest.raises(ValueError):
            target_size(10, 10, **bad)


def test_resize_keeps_size_and_constants():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (13, 17, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_bicubic(pixels, 13, 17), pixels)  # same size: a copy
    flat = np.full((9, 31, 3), 77.0, np.float32)
    for size in [(28, 56), (3, 5), (50, 13)]:  # the weights sum to 1: a flat image stays flat
        np.testing.assert_allclose(resize_bicubic(flat, *size), 77.0, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="float32"):
        resize_bicubic(pixels.astype(np.uint8), 28, 28)


def test_normalize():
    pixels = np.array([[[255.0, 0.0, 128.0]]], np.float32)
    expected = (np.array([1.0, 0.0, 128 / 255]) - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD
    out = normalize(pixels)
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=0, atol=1e-6)


def test_300x200_image_is_97_tokens():
    """Spec §12's example: 300x200 -> 308x224 pixels, 8 rows x 11 columns of merged cells."""
    image = preprocess(Image.new("RGB", (300, 200), (200, 100, 50)))
    assert image.image_size == (224, 308) and image.grid == (8, 11) and image.num_image_tokens == 88
    ids = image.token_ids()
    assert len(ids) == 97 and ids[0] == S and ids[-1] == E
    assert [ids.count(t) for t in (S, P, B, E)] == [1, 88, 7, 1]
    assert image_token_ids((224, 308)) == (ids, 88)


def test_token_layout():
    assert image_token_ids((56, 56)) == ([S, P, P, B, P, P, E], 4)
    assert image_token_ids((28, 84)) == ([S, P, P, P, E], 3)
    assert image_token_ids((84, 28)) == ([S, P, B, P, B, P, E], 3)
    assert image_token_ids((28, 28)) == ([S, P, E], 1)
    assert image_token_ids((16, 8), patch_size=4) == ([S, P, B, P, E], 2)
    assert image_token_ids((28, 56), start_id=1, pad_id=2, break_id=3, end_id=4) == ([1, 2, 2, 4], 2)
    ids, pads = image_token_ids((1400, 700))  # 50 rows of 25
    assert pads == 1250 and len(ids) == 1 + 50 * 26
    assert [i for i, t in enumerate(ids) if t in (B, E)] == [26 * (r + 1) for r in range(50)]
    for bad in [(30, 28), (0, 28), (28, 14)]:
        with pytest.raises(ValueError, match="multiples of 28"):
            image_token_ids(bad)


# --------------------------------------------------------------------------------------- loading and errors


def test_every_source_kind_gives_the_same_pixels(tmp_path):
    image = random_image(np.random.default_rng(1), 9, 14)
    data = png_bytes(image)
    (tmp_path / "x.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [image, str(tmp_path / "x.png"), tmp_path / "x.png", data, bytearray(data), memoryview(data),
               "data:image/png;base64," + b64]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(image))
    assert decode_base64_image(b64[:20] + "\n " + b64[20:]) == data == decode_base64_image(f"data:;base64,{b64}")
    assert load_image(image) is image  # RGB input is used as it is


def test_exif_orientation_is_not_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": ignored, as the checkpoint's loader does
    data = png_bytes(Image.new("RGB", (56, 28), (200, 10, 10)), format="JPEG", exif=exif.tobytes())
    assert preprocess(data).image_size == (28, 56)


def test_corrupt_data_raises_image_error_naming_the_item():
    with pytest.raises(ImageError, match="holiday.png: not an image"):
        load_image(b"this is not an image", name="holiday.png")
    with pytest.raises(ImageError, match="20 bytes of image data"):
        load_image(b"this is not an image")
    good = png_bytes(Image.new("RGB", (4, 4)))
    with pytest.raises(ImageError, match="image 1"):
        preprocess_images([good, b"junk"])
    assert issubclass(ImageError, ValueError)


def test_truncated_png_raises_image_error(tmp_path):
    data = png_bytes(random_image(np.random.default_rng(2), 64, 64))
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        preprocess(tmp_path / "cut.png")


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="missing.png.*cannot read"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="data URL must be"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="empty"):
        decode_base64_image("")
    with pytest.raises(ImageError, match="mode 'La'"):
        load_image(Image.new("La", (4, 4)))
    with pytest.raises(TypeError, match="int"):
        load_image(123)


# ------------------------------------------------------------------------------------ live cross-checks


def test_live_resize_against_opencv():
    """Random sizes (up and down, 1/3/4 channels, any width): OpenCV's own code bit for bit; with IPP close."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    ipp = cv2.ipp.useIPP()
    try:
        cv2.ipp.setUseIPP(False)
        for _ in range(40):
            (h, w), (hh, ww), c = rng.integers(1, 90, 2), rng.integers(1, 120, 2), int(rng.choice([1, 3, 4]))
            pixels = rng.integers(0, 256, (h, w, c)).astype(np.float32)
            expected = cv2.resize(pixels, (int(ww), int(hh)), interpolation=cv2.INTER_CUBIC).reshape(hh, ww, c)
            np.testing.assert_array_equal(resize_bicubic(pixels, int(hh), int(ww)), expected)
        cv2.ipp.setUseIPP(True)
        pixels = rng.integers(0, 256, (600, 300, 3)).astype(np.float32)
        expected = cv2.resize(pixels, (84, 168), interpolation=cv2.INTER_CUBIC)
        np.testing.assert_allclose(resize_bicubic(pixels, 168, 84), expected, rtol=0, atol=0.05)
    finally:
        cv2.ipp.setUseIPP(ipp)


def test_live_against_transformers():
    """transformers' Pixtral steps that the checkpoint shares: sizing within the cap, rescale + normalize, and the
    RGB conversion (4.x Pixtral's white background where it exists; else 5.x's plain convert where no alpha)."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.pixtral.image_processing_pil_pixtral import (
            PixtralImageProcessorPil as Processor, get_resize_output_image_size)
    except ImportError:
        from transformers.models.pixtral.image_processing_pixtral import (
            PixtralImageProcessor as Processor, get_resize_output_image_size)
    try:
        from transformers.models.pixtral.image_processing_pixtral import convert_to_rgb
        alpha_too = True
    except ImportError:
        from transformers.image_transforms import convert_to_rgb
        alpha_too = False
    hf, rng = Processor(), np.random.default_rng(4)
    for h, w in [(200, 300), (23, 37), (400, 50), (28, 28), (111, 57)]:
        image = random_image(rng, h, w)
        size = tuple(get_resize_output_image_size(np.asarray(image).transpose(2, 0, 1), size=(1400, 1400),
                                                  patch_size=(28, 28)))
        assert target_size(h, w) == size
        resized = resize_bicubic(np.asarray(image, np.float32), *size)
        expected = hf.normalize(hf.rescale(resized.transpose(2, 0, 1), 1 / 255), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        np.testing.assert_allclose(preprocess(image).pixel_values, expected, rtol=0, atol=1e-5)
    base = random_image(rng, 11, 13)
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (11, 13), dtype=np.uint8)))
    images = [base.convert("L"), base.convert("CMYK"), base.quantize(8), base.convert("1")]
    images += [rgba, rgba.convert("LA")] if alpha_too else []
    for image in images:
        np.testing.assert_array_equal(np.asarray(load_image(image)), np.asarray(convert_to_rgb(image)), image.mode)
