"""Prompts with images (the VLM, spec §12): where images go in the text, how they become tokens, and where they
may come from.

A prompt with images is a `Prompt`: its token ids, where every image is its token block (`<|image_start|>`, rows
of `<|image_pad|>` placeholders split by `<|image_break|>`, `<|image_end|>`; image_processing.image_token_ids),
and the images in the order of their blocks. The placeholders are what the image features replace at the prefill
(slots.Pool); after it every mode decodes exactly as for text.

Placing images in text: the marker `IMAGE_MARKER` ("<image>") stands for one image, in order. Text with as many
markers as images gets each block where its marker is; text with no marker gets every block before it (after
the BOS the tokenizer adds); any other count is an error (`MarkerCountError`) that gives both counts. Markers
mean something only where images can be given (a {"text", "images"} prompt, chat messages with image parts): a
plain string prompt is tokenized as it always was.

Chat messages: content parts in OpenAI's form (`{"type": "text", "text": ...}`, `{"type": "image_url",
"image_url": {"url": ...}}`) or transformers' (`{"type": "image", "image" | "url" | "path": ...}`) become one
string per message with a marker where each image part is; the model's own chat template renders the messages
(any template that takes string content works: the released VLM template's handling of image parts is not
known, spec §12), and the rendered text is split at the markers and encoded piece by piece without added
special tokens, as a text chat is encoded.

Image sources: a PIL image, a file path, encoded bytes, or a base64 `data:` URL (image_processing.load_image).
Remote http(s) URLs are never fetched. The server reads local files only under the directories its operator
allows (`MediaPolicy`), and a batch job reads paths relative to its input file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from nemodiff_jax.config import VisionConfig
from nemodiff_jax.image_processing import (DEFAULT_MAX_IMAGE_SIZE, ImageError, ImageSource, ProcessedImage,
                                           image_token_ids, load_image, preprocess, target_size)

IMAGE_MARKER = "<image>"
IMAGE_PART_TYPES = ("image_url", "image")


class MarkerCountError(ValueError):
    """The text's image markers do not match the images given."""


# ------------------------------------------------------------------------------------------------ the images


def image_options(vcfg: VisionConfig) -> dict:
    """image_processing.preprocess's sizing for this tower: the longest edge capped at the processor's default
    and at the tower's image_size, patch and merge sizes from the config."""
    return {"max_image_size": min(DEFAULT_MAX_IMAGE_SIZE, vcfg.image_size), "patch_size": vcfg.patch_size,
            "merge_size": vcfg.spatial_merge_size}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRef:
    """An image read and sized once (so a corrupt file is reported where its request is read) whose pixels are
    made again only when its prompt is admitted: a batch job holds all its prompts at once, and their float32
    pixels would not fit in memory. `load` raises ImageError if the source changed in between."""

    source: ImageSource
    name: str
    image_size: tuple[int, int]
    options: dict

    @classmethod
    def read(cls, source: ImageSource, vcfg: VisionConfig, name: str) -> ImageRef:
        opts = image_options(vcfg)
        rgb = load_image(source, name=name)
        size = target_size(rgb.height, rgb.width, **opts)
        return cls(source, name, size, opts)

    @property
    def num_image_tokens(self) -> int:
        unit = self.options["patch_size"] * self.options["merge_size"]
        return (self.image_size[0] // unit) * (self.image_size[1] // unit)

    def load(self) -> ProcessedImage:
        image = preprocess(self.source, name=self.name, **self.options)
        if image.image_size != self.image_size:
            raise ImageError(f"{self.name}: the image changed since its request was read ({self.image_size} -> "
                             f"{image.image_size} pixels after the resize)")
        return image


Image = ProcessedImage | ImageRef


def prepare_image(source: ImageSource | ProcessedImage, vcfg: VisionConfig, name: str,
                  deferred: bool = False) -> Image:
    """A source made ready for `vcfg`'s tower: preprocessed now, or (`deferred`) an ImageRef read and sized now
    and preprocessed at admission. A ProcessedImage passes if it was made for this tower."""
    if isinstance(source, ImageRef):
        return source
    if isinstance(source, ProcessedImage):
        unit = vcfg.patch_size * vcfg.spatial_merge_size
        if (source.patch_size, source.merge_size) != (vcfg.patch_size, vcfg.spatial_merge_size):
            raise ImageError(f"{name}: preprocessed for patch {source.patch_size} x merge {source.merge_size}, "
                             f"this model's tower takes {vcfg.patch_size} x {vcfg.spatial_merge_size}")
        h, w = source.image_size
        shape = tuple(np.shape(source.pixel_values))
        if max(h, w) > vcfg.image_size or h % unit or w % unit or shape != (vcfg.num_channels, h, w):
            raise ImageError(f"{name}: a preprocessed image must be [{vcfg.num_channels}, H, W] float pixels with "
                             f"H, W multiples of {unit} up to {vcfg.image_size}, got {shape} for size "
                             f"{source.image_size}")
        return source
    if deferred:
        return ImageRef.read(source, vcfg, name)
    return preprocess(source, name=name, **image_options(vcfg))


def block_ids(image: Image, vcfg: VisionConfig) -> list[int]:
    """The image's tokens with this model's image token ids."""
    return image_token_ids(image.image_size, patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                           start_id=vcfg.image_start_token_id, pad_id=vcfg.image_token_id,
                           break_id=vcfg.image_break_token_id, end_id=vcfg.image_end_token_id)[0]


def block_length(image: Image) -> int:
    """The tokens of an image's block: start, rows of placeholders each closed by a break (the last: the end)."""
    unit = _unit(image)
    rows, cols = image.image_size[0] // unit, image.image_size[1] // unit
    return 1 + rows * (cols + 1)


def _unit(image: Image) -> int:
    if isinstance(image, ImageRef):
        return image.options["patch_size"] * image.options["merge_size"]
    return image.patch_size * image.merge_size


def load_pixels(image: Image) -> ProcessedImage:
    return image.load() if isinstance(image, ImageRef) else image


# ------------------------------------------------------------------------------------------------ the prompt


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    """An encoded prompt: token ids (each image's block in place) and its images in the order of their blocks."""

    ids: list[int]
    images: tuple[Image, ...] = ()

    @property
    def num_image_tokens(self) -> int:
        """The placeholders the images fill (one per merged patch)."""
        return sum(im.num_image_tokens for im in self.images)

    @property
    def image_block_tokens(self) -> int:
        """The prompt's tokens that its images' blocks take (start, placeholders, breaks, end)."""
        return sum(block_length(im) for im in self.images)

    def describe_images(self) -> str:
        """For length errors: ' (N of them the blocks of k image(s))', or '' without images."""
        if not self.images:
            return ""
        return f" ({self.image_block_tokens} of them the blocks of {len(self.images)} image(s))"

    def materialized(self) -> Prompt:
        """The same prompt with every deferred image's pixels made (ImageError if one cannot be)."""
        if not any(isinstance(im, ImageRef) for im in self.images):
            return self
        return Prompt(self.ids, tuple(load_pixels(im) for im in self.images))


def split_markers(text: str, num_images: int, name: str = "prompt") -> list[str]:
    """The num_images + 1 pieces of text around the images: split at the markers when there is one per image,
    or all images first ("", ..., "", text) when the text has none."""
    count = text.count(IMAGE_MARKER)
    if count == num_images:
        return text.split(IMAGE_MARKER)
    if count == 0:
        return [""] * num_images + [text]
    raise MarkerCountError(f"{name}: the text has {count} image marker(s) {IMAGE_MARKER!r} but {num_images} "
                           f"image(s) were given: put one marker per image where it goes, or none to put every "
                           "image before the text")


def encode_pieces(tokenizer, pieces: Sequence[str], images: Sequence[Image], vcfg: VisionConfig,
                  add_special_tokens: bool) -> Prompt:
    """Text pieces with image i's block between pieces i and i+1. Only the first piece gets the tokenizer's
    special tokens (its BOS, which then precedes an image that opens the prompt)."""
    ids = list(tokenizer.encode(pieces[0], add_special_tokens=add_special_tokens))
    for image, piece in zip(images, pieces[1:], strict=True):
        ids += block_ids(image, vcfg)
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return Prompt(ids, tuple(images))


# ------------------------------------------------------------------------------------------------ chat messages


def image_part_source(part: dict, name: str) -> Any:
    """The source an image content part names: OpenAI's image_url ({"url": ...} or a string) or transformers'
    {"type": "image", "image" | "url" | "path": ...}."""
    if part["type"] == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ValueError(f"{name}: an image_url part needs 'image_url': {{'url': <data: URL or path>}}")
        return url
    given = [k for k in ("image", "url", "path") if part.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"{name}: an image part needs exactly one of 'image', 'url' or 'path', got {given or 'none'}")
    return part[given[0]]


def flatten_messages(messages: Sequence[dict]) -> tuple[list[dict], list[tuple[Any, str]]]:
    """Messages whose content parts are joined into one string each, an IMAGE_MARKER where each image part is;
    and the image parts' sources with their names (messages[i].content[j]), in order. A message whose content
    is a string passes as it is."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                name = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in IMAGE_PART_TYPES:
                    images.append((image_part_source(part, name), name))
                    texts.append(IMAGE_MARKER)
                else:
                    raise ValueError(f"{name}: a content part must be {{'type': 'text', 'text': ...}} or an image "
                                     f"part ({' | '.join(IMAGE_PART_TYPES)}), got {str(part)[:80]}")
            m = {**m, "content": "".join(texts)}
        out.append(m)
    return out, images


def content_parts(text: str, images: Sequence[Any], name: str = "prompt") -> list[dict]:
    """One message's content parts for `text` and `images`: each image where its marker is, or all images first
    when the text has none (split_markers)."""
    pieces = split_markers(text, len(images), name)
    parts = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if k < len(images):
            parts.append({"type": "image", "image": images[k]})
    return parts


# ----------------------------------------------------------------------------------- where images come from


def local_path(source: str, name: str) -> Path | None:
    """The local path a string names (a plain path or a file:// URL), or None for a data: URL; a remote URL is
    an ImageError (never fetched)."""
    if source.startswith("data:"):
        return None
    parsed = urlparse(source)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"{name}: file URL {source[:80]!r} names another host")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # http, https, ftp, s3, ... (a one-letter scheme: a drive)
        raise ImageError(f"{name}: {parsed.scheme}:// image URLs are not fetched: send the image as a data: URL "
                         "(base64) or, where allowed, a local path")
    return Path(source)


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """Which image sources a server takes: base64 `data:` URLs always; local files (a path or a file:// URL)
    only inside one of `allowed_dirs` (after resolving symlinks and `..`); remote URLs never."""

    allowed_dirs: tuple[Path, ...] = ()

    @classmethod
    def of(cls, dirs: Sequence[str | os.PathLike] | None) -> MediaPolicy:
        resolved = []
        for d in dirs or ():
            p = Path(d).expanduser().resolve()
            if not p.is_dir():
                raise ValueError(f"--allowed-media-dir {d}: not a directory")
            resolved.append(p)
        return cls(tuple(resolved))

    def resolve(self, source: Any, name: str) -> ImageSource:
        if not isinstance(source, str):
            raise ImageError(f"{name}: an image must be given as a data: URL or a path string")
        path = local_path(source, name)
        if path is None:
            return source
        if not self.allowed_dirs:
            raise ImageError(f"{name}: local image paths are not allowed on this server (its operator can allow a "
                             "directory with --allowed-media-dir); send the image as a data: URL")
        real = path.expanduser().resolve() if path.is_absolute() else None
        if real is None or not any(real.is_relative_to(d) for d in self.allowed_dirs):
            raise ImageError(f"{name}: {str(path)[:200]!r} is not an absolute path inside an allowed media "
                             "directory")  # which directories those are is the operator's to know
        return real


def file_or_base64(source: Any, base: Path, name: str) -> ImageSource:
    """A batch line's image: a data: URL, a path (relative to `base`, the input file's directory), or bare base64
    image data. Remote URLs are refused."""
    if not isinstance(source, str) or not source:
        raise ImageError(f"{name}: an image must be a path, a data: URL or base64 data (a string)")
    path = local_path(source, name)
    if path is None:
        return source
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return path
    if len(source) >= 64:  # no such file: perhaps bare base64 (data too short to be an image is not tried)
        try:
            return base64.b64decode("".join(source.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ImageError(f"{name}: no such image file {str(path)[:200]!r} (paths are relative to the input file), "
                     "and not base64 image data")


Resolver = Callable[[Any, str], ImageSource]
