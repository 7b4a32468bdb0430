"""Turn any decoded PIL image into float32 RGB pixels, and cut native-resolution crops from them.

Nothing here ever resizes: resampling erases exactly the traces the detector looks for (demosaicing
periodicity, decoder upsampling grids, JPEG block alignment). Images that are too small for a crop are
refused with `ImageTooSmallError` instead of being scaled up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from models.errors import ImageTooSmallError, UnsupportedImageError

FloatImage = NDArray[np.float32]

#: Smallest side (pixels) the detector analyses. 64 px holds 8 periods of the 8-pixel decoder/JPEG grid and
#: 32 periods of the 2x2 colour-filter lattice, which is the least the periodicity measures can estimate.
MIN_SIDE = 64

#: Crop offsets are multiples of this, so a crop keeps the 8x8 JPEG block lattice (and the 2x2 Bayer lattice,
#: and an 8x latent decoder's grid) at the same phase as the full image: a crop starting at an odd offset
#: would turn the camera's colour-filter pattern and the JPEG block boundaries into different, misleading
#: phases.
CROP_ALIGN = 8

#: Colour that transparent pixels are composited over. Any fixed colour makes the result deterministic; white
#: is what most viewers and browsers show behind transparency, and the RGB stored under fully transparent
#: pixels is often junk (zeros or leftovers from an editor) that must not reach the analysis.
ALPHA_BACKGROUND = 1.0

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class PreparedImage:
    """RGB pixels plus what was done to get them.

    Attributes:
        rgb: float32 array HxWx3 in [0, 1].
        source_mode: the PIL mode the image arrived in.
        orientation: EXIF orientation that was applied (1 = none).
        grid_offset: (row, col) phase, modulo 8, of the original file's 8x8 block lattice in `rgb`. It is
            (0, 0) unless an EXIF rotation or flip moved the lattice (flipping a width that is not a multiple
            of 8 shifts it).
        notes: readable remarks (broken EXIF ignored, heuristic scaling used, alpha flattened, ...).
    """

    rgb: FloatImage
    source_mode: str
    orientation: int = 1
    grid_offset: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def _read_orientation(img: Image.Image, notes: list[str]) -> int:
    try:
        # Pillow warns (UserWarning) on corrupt EXIF; callers that turn warnings into errors must not lose the
        # image over its metadata, so warnings here become notes.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        notes.extend(f"EXIF warning: {w.message}" for w in caught[:3])
    except Exception as exc:  # noqa: BLE001 - hostile EXIF raises anything from struct.error to ZeroDivisionError
        notes.append(f"EXIF unreadable ({type(exc).__name__}); orientation not applied")
        return 1
    if not isinstance(value, int) or not 1 <= value <= 8:
        if value != 1:
            notes.append(f"EXIF orientation {value!r} is invalid; not applied")
        return 1
    return value


def _lattice_offset(orientation: int, width: int, height: int) -> tuple[int, int]:
    """Phase (row, col) of the original 8x8 lattice after the EXIF transpose for `orientation`.

    A flip maps column x to W-1-x, so block starts (x = 8k) land on columns congruent to W mod 8; a transpose
    swaps the axes. Derived per orientation from the transposes `ImageOps.exif_transpose` applies.
    """
    w8, h8 = width % CROP_ALIGN, height % CROP_ALIGN
    return {
        1: (0, 0),
        2: (0, w8),  # mirror left-right
        3: (h8, w8),  # rotate 180
        4: (h8, 0),  # mirror top-bottom
        5: (0, 0),  # transpose
        6: (0, h8),  # rotate 90 clockwise
        7: (w8, h8),  # transverse
        8: (w8, 0),  # rotate 90 counter-clockwise
    }[orientation]


def _apply_orientation(img: Image.Image, notes: list[str]) -> tuple[Image.Image, int, tuple[int, int]]:
    orientation = _read_orientation(img, notes)
    if orientation == 1:
        return img, 1, (0, 0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rotated = ImageOps.exif_transpose(img)
        notes.extend(f"EXIF warning: {w.message}" for w in caught[:3])
    except Exception as exc:  # noqa: BLE001 - never let broken metadata stop the pixel analysis
        notes.append(
            f"EXIF orientation {orientation} could not be applied ({type(exc).__name__}); not rotated"
        )
        return img, 1, (0, 0)
    return rotated, orientation, _lattice_offset(orientation, img.width, img.height)


def _unit_float(image: Image.Image) -> FloatImage:
    """8-bit pixels as float32 in [0, 1], converted with one full-size float allocation (scaled in place):
    a 40-megapixel upload must not need several float copies at once."""
    pixels = np.asarray(image)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, np.float32(1.0 / 255.0), out=out)
    return out


def _flatten_alpha(rgba: Image.Image, notes: list[str]) -> FloatImage:
    """Composite an RGBA image over the fixed `ALPHA_BACKGROUND` (see its comment for why).

    Works on the 8-bit data and one float RGB array, in place, to keep peak memory near one float copy.
    """
    pixels = np.asarray(rgba)
    if int(pixels[..., 3].min()) < 255:
        notes.append("transparency flattened onto white")
    colour = np.empty((*pixels.shape[:2], 3), dtype=np.float32)
    np.multiply(pixels[..., :3], np.float32(1.0 / 255.0), out=colour)
    alpha = pixels[..., 3:].astype(np.float32)
    alpha *= np.float32(1.0 / 255.0)
    colour -= np.float32(ALPHA_BACKGROUND)
    colour *= alpha
    colour += np.float32(ALPHA_BACKGROUND)  # = colour * alpha + background * (1 - alpha)
    return colour


def _scale_integer(values: NDArray[np.generic], mode: str, notes: list[str]) -> FloatImage:
    """Scale 32-bit integer / float single-band data to [0, 1].

    Mode "I" carries no bit depth (16-bit PGM/TIFF/PNG decode to it, and so does 8-bit data converted to
    "I"), so the scale is inferred from the value range and the inference is noted. Pillow's own convert("L")
    would clip at 255.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        notes.append("non-finite values replaced by 0")
        data = np.where(finite, data, 0.0)
    lo, hi = float(data.min()), float(data.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return data.astype(np.float32)
    if lo >= 0.0 and hi <= 255.0:
        scale = 255.0
    elif lo >= 0.0 and hi <= 65535.0:
        scale = 65535.0
    else:
        notes.append(f"mode {mode} values span [{lo:g}, {hi:g}]; stretched to [0, 1]")
        span = hi - lo if hi > lo else 1.0
        return ((data - lo) / span).astype(np.float32)
    notes.append(f"mode {mode} has no bit depth; values <= {scale:g} scaled by 1/{scale:g}")
    return (data / scale).astype(np.float32)


def _mode_to_rgb(img: Image.Image, notes: list[str]) -> FloatImage:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float32)
        grey *= np.float32(1.0 / 65535.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in {"I", "F"}:
        grey = _scale_integer(np.asarray(img), mode, notes)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        # A palette with a transparent index (or an RGBA palette) needs alpha; others are plain RGB.
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode in {"L", "1"} and "transparency" in img.info:
        img = img.convert("LA")
        mode = "LA"
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBa", "La"}:
        # Premultiplied alpha: un-premultiply through Pillow so compositing below is the same as for RGBA/LA.
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode in {"RGBA", "LA", "PA"}:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        return _flatten_alpha(rgba, notes)
    if mode == "RGB":
        return _unit_float(img)
    if mode in {"L", "1"}:
        grey = _unit_float(img.convert("L"))
        return np.repeat(grey[..., None], 3, axis=2)
    # CMYK, YCbCr, LAB, HSV and the rarer modes: Pillow's converters are exact enough at 8 bits.
    try:
        converted = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc
    return _unit_float(converted)


def prepare_image(img: Image.Image) -> PreparedImage:
    """Decode-independent normalisation: EXIF orientation, mode, bit depth and alpha, as float32 RGB.

    Raises:
        UnsupportedImageError: the mode cannot be converted, or the image has no pixels.
    """
    notes: list[str] = []
    source_mode = img.mode
    if img.width <= 0 or img.height <= 0:
        raise UnsupportedImageError(f"image has no pixels ({img.width}x{img.height})")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnsupportedImageError(f"image data could not be decoded: {exc}") from exc
    oriented, orientation, offset = _apply_orientation(img, notes)
    rgb = _mode_to_rgb(oriented, notes)
    rgb = np.ascontiguousarray(rgb, dtype=np.float32)
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return PreparedImage(
        rgb=rgb, source_mode=source_mode, orientation=orientation, grid_offset=offset, notes=notes
    )


def to_rgb_array(img: Image.Image) -> FloatImage:
    """Float32 HxWx3 RGB in [0, 1] for an image of any PIL mode, EXIF orientation applied.

    Handles 1, L, LA, La, P (with and without transparency), PA, RGB, RGBA, RGBa, CMYK, YCbCr, I, I;16
    (scaled by 1/65535, not clipped), F. Broken EXIF never raises: the image is used unrotated (see
    `prepare_image` for notes).
    """
    return prepare_image(img).rgb


def _check_size(height: int, width: int, min_side: int) -> None:
    if height < min_side or width < min_side:
        raise ImageTooSmallError(width=width, height=height, min_side=min_side)


def _aligned_start(length: int, size: int, phase: int) -> int:
    """Start of a centred window of `size` in `length`, snapped down to `phase` modulo `CROP_ALIGN`."""
    centred = (length - size) // 2
    start = centred - ((centred - phase) % CROP_ALIGN)
    if start < 0:
        start += CROP_ALIGN
    if start + size > length:
        # No aligned position fits (length - size < the alignment slack): keep the crop inside the image.
        start = max(0, min(centred, length - size))
    return start


def crop_side(rgb: FloatImage, size: int) -> int:
    """Side of the square crops taken from `rgb` for a requested `size`.

    It is `size` when the image is large enough, otherwise the largest multiple of 8 that fits (never below
    `MIN_SIDE`): small images are analysed at their native resolution, not scaled up.

    Raises:
        ImageTooSmallError: a side is below `MIN_SIDE`.
    """
    height, width = rgb.shape[:2]
    _check_size(height, width, MIN_SIDE)
    fit = min(height, width)
    return size if fit >= size else max(MIN_SIDE, fit - fit % CROP_ALIGN)


def center_crop(rgb: FloatImage, size: int, grid_offset: tuple[int, int] = (0, 0)) -> FloatImage:
    """Square crop of side `crop_side(rgb, size)` around the centre, offsets aligned to the 8x8 lattice.

    Never resizes. `grid_offset` is `PreparedImage.grid_offset` (the lattice phase after EXIF rotation).

    Raises:
        ImageTooSmallError: a side is below `MIN_SIDE`.
    """
    side = crop_side(rgb, size)
    height, width = rgb.shape[:2]
    top = _aligned_start(height, side, grid_offset[0])
    left = _aligned_start(width, side, grid_offset[1])
    return rgb[top : top + side, left : left + side]


def _grid_starts(length: int, side: int, count: int, phase: int) -> list[int]:
    """Up to `count` evenly spread, lattice-aligned starts of a window of `side` in `length`."""
    first = phase % CROP_ALIGN
    if first + side > length:
        first = 0
    last = length - side
    last -= (last - first) % CROP_ALIGN
    if count <= 1 or last <= first:
        return [_aligned_start(length, side, phase)]
    raw = np.linspace(first, last, count)
    return sorted({first + ((round(float(s)) - first) // CROP_ALIGN) * CROP_ALIGN for s in raw})


def native_crops(
    rgb: FloatImage,
    size: int,
    max_crops: int,
    rng: np.random.Generator | None = None,
    grid_offset: tuple[int, int] = (0, 0),
) -> list[FloatImage]:
    """Native-resolution square crops of side `crop_side(rgb, size)`, never resized.

    Without `rng` the crops form a deterministic grid spread over the image (same input, same crops: needed
    for reproducible scores). With `rng`, that many crops are drawn at random positions (for training). In
    both cases every offset is congruent to `grid_offset` modulo 8, so the JPEG block lattice, the Bayer 2x2
    lattice and any 8x decoder grid sit at the same phase in every crop as in the image.

    Raises:
        ImageTooSmallError: a side is below `MIN_SIDE`.
        ValueError: `max_crops` < 1.
    """
    if max_crops < 1:
        raise ValueError("max_crops must be at least 1")
    side = crop_side(rgb, size)
    height, width = rgb.shape[:2]
    if rng is not None:
        crops: list[FloatImage] = []
        for _ in range(max_crops):
            top = _random_start(height, side, grid_offset[0], rng)
            left = _random_start(width, side, grid_offset[1], rng)
            crops.append(rgb[top : top + side, left : left + side])
        return crops
    # Choose a rows x cols grid with rows*cols <= max_crops, shaped like the image.
    spare_rows = (height - side) // CROP_ALIGN + 1
    spare_cols = (width - side) // CROP_ALIGN + 1
    best = (1, 1)
    for rows in range(1, max_crops + 1):
        cols = max_crops // rows
        rows_used, cols_used = min(rows, spare_rows), min(cols, spare_cols)
        if rows_used * cols_used > best[0] * best[1]:
            best = (rows_used, cols_used)
    tops = _grid_starts(height, side, best[0], grid_offset[0])
    lefts = _grid_starts(width, side, best[1], grid_offset[1])
    return [rgb[t : t + side, s : s + side] for t in tops for s in lefts][:max_crops]


def crop_texture(crop: FloatImage) -> float:
    """How much texture a crop holds: the mean absolute 4-neighbour Laplacian of its luminance (BT.601), on
    the [0, 1] scale. A flat crop (sky, a wall, a defocused background) is near 0."""
    luma = crop[..., 0] * 0.299 + crop[..., 1] * 0.587 + crop[..., 2] * 0.114
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
    return float(np.abs(laplacian).mean()) if laplacian.size else 0.0


def textured_crops(
    rgb: FloatImage,
    size: int,
    max_crops: int,
    candidates: int,
    grid_offset: tuple[int, int] = (0, 0),
) -> list[FloatImage]:
    """The `max_crops` most textured of up to `candidates` deterministic grid crops (`native_crops`), in grid
    order; ties keep the earlier crop. With `candidates <= max_crops` this is `native_crops` itself.

    Why: the CNN's log-odds say little on flat crops, and a flat crop of a real photo scores about where a
    generated one does, so an evenly spread choice lets a photo's flat areas pull it towards "generated"
    (MODEL_CARD.md, "Which crops the detector reads").
    """
    grid = native_crops(rgb, size, max(candidates, max_crops), grid_offset=grid_offset)
    if len(grid) <= max_crops:
        return grid
    texture = np.array([crop_texture(crop) for crop in grid])
    chosen = np.sort(np.argsort(-texture, kind="stable")[:max_crops])
    return [grid[int(i)] for i in chosen]


def _random_start(length: int, side: int, phase: int, rng: np.random.Generator) -> int:
    first = phase % CROP_ALIGN
    if first + side > length:
        first = 0
    slots = (length - side - first) // CROP_ALIGN + 1
    return first + CROP_ALIGN * int(rng.integers(0, max(1, slots)))
