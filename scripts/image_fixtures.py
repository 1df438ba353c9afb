"""Writes tests/fixtures/images/: small deterministic images of several sizes and modes, and reference.npz with
what the reference tools make of each, for tests/test_image_processing.py (the VLM-8B preprocessing, spec §12).

For every image `NAME` (NAME.png or NAME.tif beside the .npz), reference.npz holds:
- NAME/rgb (modes other than RGB): uint8 [h, w, 3], the file decoded by Pillow and made RGB by transformers'
  Pixtral `convert_to_rgb` (4.x: pasted onto white through RGBA). Under transformers 5 that function is gone; then
  modes without alpha use transformers 5's `convert_to_rgb` (a plain convert, identical where nothing is
  transparent) and modes with alpha the 4.x recipe written out below; meta's rgb_source says which. (Both ways
  gave identical files, checked with transformers 4.57.1 and 5.17.0.)
- NAME/max_image_size and NAME/size: the cap used and the (H, W) the checkpoint's rule gives (written out here on
  its own: longest edge capped with Python's round, then each side rounded up to a multiple of 28).
- NAME/hf_size: (H, W) from transformers' `PixtralImageProcessorPil` sizing at patch 28 (floor instead of round
  when shrinking: equal to NAME/size for images within the cap).
- NAME/resized: float32 [H, W, 3], `cv2.resize(rgb as float32, (W, H), interpolation=cv2.INTER_CUBIC)` with
  Intel IPP switched off (OpenCV's own code); NAME/resized_ipp, for a few images, the same with IPP on (the
  default of the x86 opencv-python wheels).
- NAME/pixel_values: float32 [3, H, W], transformers' `rescale(1/255)` then `normalize(OPENAI_CLIP_MEAN/STD)` of
  NAME/resized.

Run in a venv of its own (no torch needed): `~/.pyenv/versions/3.11.7/bin/python -m venv /tmp/imgenv &&
/tmp/imgenv/bin/pip install numpy pillow opencv-python-headless 'transformers==5.17.*'`, then
`/tmp/imgenv/bin/python scripts/image_fixtures.py`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "images"

# name: (mode, width, height, max_image_size, with IPP's resize too). Sizes straddle multiples of 28 (rounded up),
# the caps shrink some (one axis or both); every mode the loader must convert appears once.
CASES = {
    "rgb_37x23": ("RGB", 37, 23, 1400, True),
    "picture_150x100_cap56": ("RGB", 150, 100, 56, True),
    "tall_40x300_cap112": ("RGB", 40, 300, 112, True),
    "gray_L_29x17": ("L", 29, 17, 1400, False),
    "rgba_33x21": ("RGBA", 33, 21, 1400, False),
    "la_24x24": ("LA", 24, 24, 1400, False),
    "palette_30x20": ("P", 30, 20, 1400, False),
    "cmyk_20x12": ("CMYK", 20, 12, 1400, False),
    "gray16_19x27": ("I;16", 19, 27, 1400, False),
}
UNIT = 28  # patch 14 x spatial merge 2


def make_image(name: str, mode: str, width: int, height: int) -> Image.Image:
    """A deterministic picture: gradients, a disc, a bar and some noise (so that resizing has work to do)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 96)], -1)
    rgb[(xx - width * 0.3) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) / 4) ** 2] = [220, 30, 30]
    rgb[height // 5: height // 5 + max(height // 10, 1), width // 2:] = [30, 60, 220]
    rgb = np.clip(rgb + rng.integers(-12, 13, rgb.shape), 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "L":
        return Image.fromarray(rgb).convert("L")
    if mode in ("RGBA", "LA"):
        alpha = np.where(xx < width // 3, 0, np.where(xx < 2 * width // 3, 128 + yy % 64, 255)).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]))  # transparent, half and opaque columns
        return image if mode == "RGBA" else image.convert("LA")
    if mode == "P":
        image = Image.fromarray(rgb).quantize(colors=16, dither=Image.Dither.NONE)
        image.info["transparency"] = int(np.asarray(image)[0, 0])  # the top-left colour is see-through
        return image
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "I;16":  # 16-bit grey, partly above 255 (Pillow's conversion to RGB saturates those)
        return Image.fromarray((xx * 600 // max(width - 1, 1) + yy).astype(np.uint16))
    raise ValueError(mode)


def pixtral_4x_convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers 4.57's models/pixtral/image_processing_pixtral.convert_to_rgb, step for step."""
    if image.mode == "RGB":
        return image
    image = image.convert("RGBA")
    new_image = Image.new("RGBA", image.size, "WHITE")
    new_image.paste(image, (0, 0), image)
    return new_image.convert("RGB")


def reference_rgb(image: Image.Image) -> tuple[np.ndarray, str]:
    try:  # transformers 4.x
        from transformers.models.pixtral.image_processing_pixtral import convert_to_rgb
        return np.asarray(convert_to_rgb(image)), "transformers 4 pixtral convert_to_rgb"
    except ImportError:
        pass
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        return np.asarray(pixtral_4x_convert_to_rgb(image)), "transformers 4.57 pixtral convert_to_rgb recipe"
    from transformers.image_transforms import convert_to_rgb
    return np.asarray(convert_to_rgb(image)), "transformers 5 convert_to_rgb"


def reference_size(height: int, width: int, max_image_size: int) -> tuple[int, int]:
    longest = max(height, width)
    if longest > max_image_size:
        height, width = round(height * max_image_size / longest), round(width * max_image_size / longest)
    return math.ceil(height / UNIT) * UNIT, math.ceil(width / UNIT) * UNIT


def main() -> int:
    import cv2
    import transformers
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:  # transformers 5: the numpy/PIL backend (the default class needs torch)
        from transformers.models.pixtral.image_processing_pil_pixtral import (
            PixtralImageProcessorPil as Processor, get_resize_output_image_size)
    except ImportError:  # transformers 4
        from transformers.models.pixtral.image_processing_pixtral import (
            PixtralImageProcessor as Processor, get_resize_output_image_size)

    OUT.mkdir(parents=True, exist_ok=True)
    hf = Processor()
    arrays, meta = {}, {}
    for name, (mode, width, height, max_image_size, with_ipp) in CASES.items():
        path = OUT / f"{name}.{'tif' if mode == 'CMYK' else 'png'}"
        make_image(name, mode, width, height).save(path)
        with Image.open(path) as image:  # what the tests decode
            image.load()
            rgb, source = reference_rgb(image)
        size = reference_size(height, width, max_image_size)
        hf_size = get_resize_output_image_size(rgb.transpose(2, 0, 1), size=(max_image_size, max_image_size),
                                               patch_size=(UNIT, UNIT))
        pixels = rgb.astype(np.float32)
        cv2.ipp.setUseIPP(False)
        resized = cv2.resize(pixels, size[::-1], interpolation=cv2.INTER_CUBIC)
        cv2.ipp.setUseIPP(True)
        values = hf.normalize(hf.rescale(resized.transpose(2, 0, 1), 1 / 255), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if mode != "RGB":  # (an RGB file's pixels are the file's)
            arrays[f"{name}/rgb"] = rgb
        arrays |= {f"{name}/max_image_size": np.int64(max_image_size),
                   f"{name}/size": np.array(size), f"{name}/hf_size": np.array(hf_size),
                   f"{name}/resized": resized, f"{name}/pixel_values": values.astype(np.float32)}
        if with_ipp:
            arrays[f"{name}/resized_ipp"] = cv2.resize(pixels, size[::-1], interpolation=cv2.INTER_CUBIC)
        meta[name] = {"file": path.name, "mode": Image.open(path).mode, "rgb_source": source}
    arrays["meta"] = np.array(json.dumps({"cases": meta, "opencv": cv2.__version__, "ipp": cv2.ipp.getIppVersion(),
                                          "transformers": transformers.__version__,
                                          "pillow": Image.__version__}))
    np.savez_compressed(OUT / "reference.npz", **arrays)
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {len(CASES)} images and reference.npz to {OUT} ({total / 1024:.0f} KiB; opencv {cv2.__version__}, "
          f"transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
