"""Image preprocessing of Nemotron-Labs-Diffusion-VLM-8B (spec §12), in numpy and Pillow only.

The checkpoint ships its own `image_processing.py`, which is not transformers' `PixtralImageProcessor`. Its text
was not retrievable; we follow what is known of it (spec §12, and third-party ports that test against it), step by
step:

1. Decode (a PIL image, a file path, bytes, a base64 `data:` URL) and convert to RGB as transformers 4.x's Pixtral
   `convert_to_rgb` does (the checkpoint's code needs transformers 4.x, and the ports check that transparency turns
   white): any mode goes through RGBA and is pasted onto white, so transparent pixels become white
   (transformers 5's generic `convert_to_rgb` drops alpha instead, which turns transparent black into black).
   Pillow's own conversions do the rest (a palette's transparency, CMYK, 16-bit grey, which Pillow saturates at
   255). The EXIF orientation is not applied (the ports found the checkpoint's loader does not apply it).
2. Size: cap the longest edge at `max_image_size` keeping the aspect ratio (each side `round(side * scale)`,
   Python's round: halves go to even), then round each side *up* to a multiple of patch x merge = 28 pixels.
   Small images are not enlarged beyond that rounding up (a 300x200 image becomes 308x224).
3. Resize to that size with OpenCV's `INTER_CUBIC` on float32 pixels (a port checks its resize against
   `cv2.resize` of the `np.float32` pixels, as the checkpoint's code does): separable, a = -0.75, half-pixel
   centres, edge pixels replicated, no antialiasing when shrinking. `resize_bicubic` redoes OpenCV's own
   arithmetic (float32 weights and sums, in its order), so it equals `cv2.resize` bit for bit where OpenCV runs its
   own code. The x86 wheels of opencv-python hand float32 resizes to Intel IPP instead, whose results differ from
   OpenCV's own code by up to ~1e-3 of a pixel level (0..255) for mild scales and ~0.04 (2e-4 of the range) for
   strong downscales (tests/test_image_processing.py measures both).
4. `/ 255`, then CLIP mean/std normalisation, in float32; layout [3, H, W]. `image_size` is (H, W) after the
   resize.

The image's tokens (spec §12): `<|image_start|>`, then H/28 rows of W/28 `<|image_pad|>` placeholders (one per
merged 2x2 patch, replaced by the image features), `<|image_break|>` after each row but the last and
`<|image_end|>` after the last one. A 300x200 image is a grid of 8 rows x 11 columns: 88 pads + 7 breaks + end +
start = 97 tokens.

Unknown (spec §12), each a named default or a documented choice here: the default longest edge
(DEFAULT_MAX_IMAGE_SIZE = 1400 as in the ports; the config's `image_size` is 1540), the rounding when shrinking
(Python's `round`, as the spec says, where transformers' Pixtral floors), and whether the resize works on float32
or uint8 pixels (float32, as the ports do; a uint8 resize would round each pixel to an integer first).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# The image tokens of the VLM tokenizer (spec §12); a checkpoint's config.json may override them (Config.vision).
from nemodiff_jax.config import (IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID, IMAGE_START_TOKEN_ID,  # noqa: F401
                                 IMAGE_TOKEN_ID)

PATCH_SIZE = 14  # vision_config.patch_size
SPATIAL_MERGE_SIZE = 2  # root spatial_merge_size: 2x2 patches merge into one image token
# Longest edge (pixels) after the cap. The ports of the checkpoint's processor default to 1400 and their callers
# pass 672, 560 or 280; the config's vision image_size (1540 = 55 x 28) is the most the tower was built for.
DEFAULT_MAX_IMAGE_SIZE = 1400
CONFIG_IMAGE_SIZE = 1540

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, per RGB channel of [0, 1] pixels.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CUBIC_A = -0.75  # OpenCV's INTER_CUBIC kernel parameter (Pillow and PyTorch's antialiased bicubic use -0.5)



class ImageError(ValueError):
    """An image that cannot be decoded or converted; the message names the item."""


ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview


# ----------------------------------------------------------------------------------------------------- loading


def decode_base64_image(text: str, *, name: str = "image") -> bytes:
    """The bytes of a `data:<mime>;base64,<data>` URL or of a bare base64 string (whitespace allowed)."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(f"{name}: a data URL must be 'data:<mime type>;base64,<data>', got {header[:60]!r}")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: invalid base64 image data: {e}") from None
    if not data:
        raise ImageError(f"{name}: empty image data")
    return data


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes of image data"
    text = os.fsdecode(source)
    return f"data URL ({len(text)} characters)" if text.startswith("data:") else repr(text)


def load_image(source: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decode `source` and convert it to an RGB `PIL.Image` (see `to_rgb`).

    `source`: a PIL image, a file path, encoded bytes (PNG, JPEG, WebP, GIF, ... whatever Pillow reads; the first
    frame of an animation), or a base64 `data:` URL. `name` labels the item in errors (default: a description of
    `source`). A missing file, undecodable or truncated data, or a mode Pillow cannot convert raise ImageError;
    remote URLs are not fetched (ImageError)."""
    if not isinstance(source, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(f"an image must be a PIL image, a path, bytes or a data URL, got {type(source).__name__}")
    name = name or _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream = io.BytesIO(bytes(source))
        elif (text := os.fsdecode(source)).startswith("data:"):
            stream = io.BytesIO(decode_base64_image(text, name=name))
        elif text.startswith(("http://", "https://")):
            raise ImageError(f"{name}: remote images are not fetched; pass the bytes or a local path")
        else:
            try:
                stream = io.BytesIO(Path(text).read_bytes())
            except OSError as e:
                raise ImageError(f"{name}: cannot read the file: {e.strerror or e}") from None
        try:
            image = Image.open(stream)
        except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types; all mean "not an image"
            raise ImageError(f"{name}: not an image Pillow can decode ({type(e).__name__}: {e})") from None
    try:
        image.load()  # decoding is lazy: truncated or corrupt data fails here, not in Image.open
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"{name}: cannot decode the image data ({type(e).__name__}: {e})") from None
    return to_rgb(image, name=name)


def to_rgb(image: Image.Image, *, name: str = "image") -> Image.Image:
    """RGB as transformers 4.x's Pixtral `convert_to_rgb`: RGB stays as it is; any other mode converts to RGBA and
    is pasted onto white with its own alpha as the mask, so transparency (alpha, a palette's transparent index, LA)
    becomes white and opaque pixels keep Pillow's conversion of their colour."""
    if image.mode == "RGB":
        return image
    try:
        rgba = image.convert("RGBA")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert image mode {image.mode!r} to RGB ({e})") from None
    canvas = Image.new("RGBA", rgba.size, "WHITE")
    canvas.paste(rgba, (0, 0), rgba)
    return canvas.convert("RGB")


# ------------------------------------------------------------------------------------------------------ sizing


def target_size(height: int, width: int, *, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
                patch_size: int = PATCH_SIZE, merge_size: int = SPATIAL_MERGE_SIZE) -> tuple[int, int]:
    """(H, W) an image of `height` x `width` pixels is resized to: the longest edge capped at `max_image_size`
    (aspect ratio kept, each side `round(side * scale)` with Python's round), then each side rounded up to a
    multiple of `patch_size * merge_size`. Images within the cap are only rounded up (never enlarged further);
    a side never drops below one unit."""
    for key, value in {"height": height, "width": width, "max_image_size": max_image_size,
                       "patch_size": patch_size, "merge_size": merge_size}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    longest = max(height, width)
    if longest > max_image_size:
        scale = max_image_size / longest
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    unit = patch_size * merge_size
    return math.ceil(height / unit) * unit, math.ceil(width / unit) * unit


# ------------------------------------------------------------------------------------------------ the resize


def _cubic_weights(x: np.ndarray) -> np.ndarray:
    """OpenCV's `interpolateCubic` in float32, term by term: the 4 tap weights [N, 4] for fractions x [N]."""
    a, one = np.float32(CUBIC_A), np.float32(1)
    x1, y = x + one, one - x
    w0 = ((a * x1 - np.float32(5) * a) * x1 + np.float32(8) * a) * x1 - np.float32(4) * a
    w1 = ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one
    w2 = ((a + np.float32(2)) * y - (a + np.float32(3))) * y * y + one
    w3 = one - w0 - w1 - w2
    return np.stack([w0, w1, w2, w3], axis=-1)


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, 4] (edge-replicated) and float32 weights [out, 4] along one axis, as cv2.resize
    computes them: centre (d + 0.5) * scale - 0.5 in double with scale = 1 / (out / in), then float32."""
    scale = 1.0 / (out_size / in_size)
    centre = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(centre)
    index = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return index, _cubic_weights(centre - first)


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)` of a float32 [h, w, C] array, in
    OpenCV's own float32 arithmetic: rows first (sum of the 4 taps left to right), then columns, where OpenCV's
    SIMD loop adds S0*b0 + (S1*b1 + (S2*b2 + S3*b3)) 4 lanes at a time and its scalar loop adds the last
    (width * C) % 4 values of a row left to right. Returns float32 [height, width, C]."""
    if pixels.ndim != 3 or pixels.dtype != np.float32:
        raise ValueError(f"pixels must be a float32 [h, w, C] array, got {pixels.dtype} {pixels.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"the output size must be positive, got {height}x{width}")
    cols, col_weights = _taps(pixels.shape[1], width)
    rows = pixels[:, cols[:, 0]] * col_weights[:, 0, None]
    for k in range(1, 4):
        rows += pixels[:, cols[:, k]] * col_weights[:, k, None]
    index, weights = _taps(pixels.shape[0], height)
    s = [(rows[index[:, k]] * weights[:, k, None, None]).reshape(height, -1) for k in range(4)]
    out = s[0] + (s[1] + (s[2] + s[3]))
    tail = out.shape[1] // 4 * 4
    out[:, tail:] = s[0][:, tail:] + s[1][:, tail:] + s[2][:, tail:] + s[3][:, tail:]
    return out.reshape(height, width, pixels.shape[2])


def normalize(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] pixel values 0..255 (float32) -> CLIP-normalised float32 [3, H, W]: (x / 255 - mean) / std."""
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    return np.ascontiguousarray(((pixels / np.float32(255) - mean) / std).transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One preprocessed image: `pixel_values` float32 [3, H, W]; `image_size` = (H, W), multiples of 28."""

    pixel_values: np.ndarray
    image_size: tuple[int, int]
    patch_size: int = PATCH_SIZE
    merge_size: int = SPATIAL_MERGE_SIZE

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of merged patches: one image token each."""
        unit = self.patch_size * self.merge_size
        return self.image_size[0] // unit, self.image_size[1] // unit

    @property
    def num_image_tokens(self) -> int:
        """The `<|image_pad|>` placeholders = the image features the projector gives."""
        rows, cols = self.grid
        return rows * cols

    def token_ids(self, **ids: int) -> list[int]:
        """The image's token ids (see `image_token_ids`; keyword overrides for the ids)."""
        return image_token_ids(self.image_size, patch_size=self.patch_size, merge_size=self.merge_size, **ids)[0]


def preprocess(image: ImageSource, *, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE, patch_size: int = PATCH_SIZE,
               merge_size: int = SPATIAL_MERGE_SIZE, name: str | None = None) -> ProcessedImage:
    """Load, convert to RGB, resize (`target_size`, `resize_bicubic`) and normalise one image."""
    rgb = load_image(image, name=name)
    size = target_size(rgb.height, rgb.width, max_image_size=max_image_size, patch_size=patch_size,
                       merge_size=merge_size)
    resized = resize_bicubic(np.asarray(rgb, dtype=np.float32), *size)
    return ProcessedImage(normalize(resized), size, patch_size, merge_size)


def preprocess_images(images: Sequence[ImageSource], **kw) -> list[ProcessedImage]:
    """`preprocess` each image (same keywords, but `name`); errors name the image by its position."""
    return [preprocess(image, name=f"image {i}", **kw) for i, image in enumerate(images)]


# ------------------------------------------------------------------------------------------------- the tokens


def image_token_ids(image_size: tuple[int, int], *, patch_size: int = PATCH_SIZE,
                    merge_size: int = SPATIAL_MERGE_SIZE, start_id: int = IMAGE_START_TOKEN_ID,
                    pad_id: int = IMAGE_TOKEN_ID, break_id: int = IMAGE_BREAK_TOKEN_ID,
                    end_id: int = IMAGE_END_TOKEN_ID) -> tuple[list[int], int]:
    """The token ids of an image resized to `image_size` = (H, W) pixels, and how many of them are pads (= the
    number of merged image features that replace them): start, then H/28 rows of W/28 pads, each row followed by
    a break except the last, which is followed by the end token."""
    unit = patch_size * merge_size
    height, width = image_size
    if height < unit or width < unit or height % unit or width % unit:
        raise ValueError(f"image_size must be positive multiples of {unit} pixels, got {tuple(image_size)}")
    rows, cols = height // unit, width // unit
    ids = [start_id]
    for r in range(rows):
        ids += [pad_id] * cols + [break_id if r < rows - 1 else end_id]
    return ids, rows * cols
