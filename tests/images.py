"""Test images made in code: crops of scikit-image's public-domain photos, and synthetic patterns."""

from __future__ import annotations

import io
from importlib.resources import files

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def photo(name: str = "astronaut.png", size: int = 256, offset: int = 0) -> Image.Image:
    """A native-resolution crop (no resizing) of one of scikit-image's sample photos."""
    image = Image.open(io.BytesIO((files("skimage.data") / name).read_bytes())).convert("RGB")
    left = min(offset, image.width - size)
    top = min(offset, image.height - size)
    return image.crop((left, top, left + size, top + size))


def encode(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def photo_bytes(
    name: str = "astronaut.png", size: int = 256, offset: int = 0, image_format: str = "PNG"
) -> bytes:
    """Encoded bytes of a photo crop; different ``offset`` values give different bytes."""
    return encode(photo(name, size, offset), image_format)


def noise_bytes(seed: int = 0, size: int = 128) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)))
