"""models.preprocess: every PIL mode to float RGB, EXIF orientation, lattice-aligned crops, no resizing."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DetectorError, ImageTooSmallError, UnsupportedImageError
from models.evidence import pixel_evidence
from models.preprocess import (
    CROP_ALIGN,
    MIN_SIDE,
    center_crop,
    crop_side,
    crop_texture,
    native_crops,
    prepare_image,
    textured_crops,
    to_rgb_array,
)

RNG_SEED = 7


def _roundtrip(image: Image.Image, image_format: str, **options: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    reopened.load()
    return reopened


def _random_rgb(height: int, width: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_rgb_is_scaled_exactly_and_float32() -> None:
    pixels = _random_rgb(70, 90)
    rgb = to_rgb_array(Image.fromarray(pixels))
    assert rgb.dtype == np.float32
    assert rgb.shape == (70, 90, 3)
    np.testing.assert_allclose(rgb, pixels / 255.0, atol=1e-6)


def test_a_large_photo_keeps_every_pixel() -> None:
    """No resizing at any size: a downscale of large photos (a tempting speed-up) would erase the traces the
    detector reads. 2600x1600 is above every common resize target (1024, 1536, 2048)."""
    pixels = _random_rgb(1600, 2600)
    rgb = prepare_image(Image.fromarray(pixels)).rgb
    assert rgb.shape == (1600, 2600, 3)
    assert np.array_equal(np.rint(rgb * 255).astype(np.uint8), pixels)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_modes_fill_three_equal_channels(mode: str) -> None:
    grey = np.random.default_rng(1).integers(0, 256, size=(40, 50), dtype=np.uint8)
    image = Image.fromarray(grey).convert(mode)
    rgb = to_rgb_array(image)
    expected = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    for channel in range(3):
        np.testing.assert_allclose(rgb[..., channel], expected, atol=1e-6)


def test_la_alpha_is_flattened_onto_white() -> None:
    grey = np.full((32, 32), 100, dtype=np.uint8)
    alpha = np.zeros((32, 32), dtype=np.uint8)
    alpha[:, 16:] = 255
    alpha[:8, :] = 128
    image = _roundtrip(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "PNG")
    assert image.mode == "LA"
    prepared = prepare_image(image)
    rgb = prepared.rgb
    np.testing.assert_allclose(rgb[20, 0], [1.0, 1.0, 1.0], atol=1e-6)  # transparent -> white
    np.testing.assert_allclose(rgb[20, 20], [100 / 255] * 3, atol=1e-6)  # opaque -> its grey
    blended = 100 / 255 * 128 / 255 + (1 - 128 / 255)
    np.testing.assert_allclose(rgb[2, 2], [blended] * 3, atol=1e-5)
    assert any("transparency" in note for note in prepared.notes)


def test_rgba_alpha_hides_junk_under_transparent_pixels() -> None:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[..., :3] = _random_rgb(16, 16)  # junk colour under fully transparent pixels
    pixels[:, :8, 3] = 0
    pixels[:, 8:, 3] = 255
    rgb = to_rgb_array(Image.fromarray(pixels, "RGBA"))
    np.testing.assert_allclose(rgb[:, :8], 1.0)
    np.testing.assert_allclose(rgb[:, 8:], pixels[:, 8:, :3] / 255.0, atol=1e-6)


def test_palette_with_transparent_index() -> None:
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.paste(1, (0, 0, 8, 16))
    image = _roundtrip(palette_image, "PNG", transparency=1)
    assert image.mode == "P"
    assert image.info.get("transparency") == 1
    rgb = to_rgb_array(image)
    np.testing.assert_allclose(rgb[:, :8], 1.0)  # index 1 is transparent: white, not blue
    np.testing.assert_allclose(rgb[:, 8:], np.broadcast_to([1.0, 0.0, 0.0], (16, 8, 3)))


def test_palette_without_transparency_matches_its_colours() -> None:
    source = Image.fromarray(_random_rgb(24, 24)).quantize(colors=16)
    rgb = to_rgb_array(source)
    np.testing.assert_allclose(rgb, np.asarray(source.convert("RGB")) / 255.0, atol=1e-6)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    decoded = _roundtrip(cmyk, "JPEG", quality=95)
    assert decoded.mode == "CMYK"
    rgb = to_rgb_array(decoded)
    assert rgb.shape == (64, 64, 3)
    mean = rgb.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 0.9
    assert mean[1] < 0.1
    assert mean[2] < 0.1


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(image_format: str) -> None:
    values = np.array([[0, 255, 1000, 40000, 65535] * 4] * 8, dtype=np.uint16)
    image = _roundtrip(Image.fromarray(values), image_format)
    assert image.mode.startswith("I")
    rgb = to_rgb_array(image)
    np.testing.assert_allclose(rgb[..., 0], values / 65535.0, atol=1e-6)
    # Pillow's own convert("RGB") clips at 255: 1000 and 40000 would both read as white.
    assert rgb[0, 2, 0] < 0.02
    assert 0.6 < rgb[0, 3, 0] < 0.62


def test_mode_i_infers_its_scale_and_says_so() -> None:
    wide = Image.fromarray(np.array([[0, 300, 65535]] * 3, dtype=np.int32), "I")
    prepared = prepare_image(wide)
    np.testing.assert_allclose(prepared.rgb[0, :, 0], [0.0, 300 / 65535, 1.0], atol=1e-6)
    assert prepared.notes
    narrow = Image.fromarray(np.array([[0, 128, 255]] * 3, dtype=np.int32), "I")
    np.testing.assert_allclose(to_rgb_array(narrow)[0, :, 0], [0.0, 128 / 255, 1.0], atol=1e-6)


def test_float_mode() -> None:
    values = np.linspace(0.0, 1.0, 30, dtype=np.float32).reshape(5, 6)
    rgb = to_rgb_array(Image.fromarray(values, "F"))
    np.testing.assert_allclose(rgb[..., 1], values, atol=1e-6)


def test_ycbcr_mode() -> None:
    pixels = _random_rgb(32, 32)
    ycbcr = Image.fromarray(pixels).convert("YCbCr")
    rgb = to_rgb_array(ycbcr)
    np.testing.assert_allclose(rgb, np.asarray(ycbcr.convert("RGB")) / 255.0, atol=1e-6)
    assert np.abs(rgb - pixels / 255.0).mean() < 0.02


def test_empty_image_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedImageError):
        to_rgb_array(Image.new("RGB", (0, 0)))


# Expected display pixels for each EXIF orientation, from the stored pixels (EXIF 2.32, tag 0x0112).
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_displayed_array(orientation: int) -> None:
    stored = _random_rgb(30, 50)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = _roundtrip(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    prepared = prepare_image(image)
    expected = _ORIENT[orientation](stored) / 255.0
    assert prepared.rgb.shape == expected.shape
    np.testing.assert_allclose(prepared.rgb, expected, atol=1e-6)
    assert prepared.orientation == orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_block_lattice_is_tracked_through_rotation(orientation: int) -> None:
    """A heavily compressed JPEG whose sides are not multiples of 8, rotated by EXIF: the crop that follows
    `grid_offset` still sees the block boundaries where the grid measure expects them."""
    rng = np.random.default_rng(orientation)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 1, (197, 263, 3)), axis=0), axis=1)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 200 + 20
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = _roundtrip(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=30, exif=exif.tobytes())
    prepared = prepare_image(image)
    aligned = pixel_evidence(prepared.rgb, prepared.grid_offset)["grid"]["jpeg_blockiness"]["value"]
    assert aligned > 1.3
    if prepared.grid_offset != (0, 0):
        # Ignoring the shifted lattice puts the boundaries elsewhere: the measure no longer sees them.
        misaligned = pixel_evidence(prepared.rgb)["grid"]["jpeg_blockiness"]["value"]
        assert misaligned < aligned - 0.2


def test_broken_exif_never_raises() -> None:
    pixels = _random_rgb(64, 64)
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    with warnings.catch_warnings():
        # Opening may already warn about the corrupt EXIF; that is the decoder's business, not the test's.
        warnings.simplefilter("ignore")
        image = _roundtrip(Image.fromarray(pixels), "JPEG", exif=broken, quality=95)
    prepared = prepare_image(image)  # under filterwarnings=error: must neither raise nor warn
    assert prepared.rgb.shape == (64, 64, 3)
    assert prepared.orientation == 1


def test_hostile_exif_files_are_analysed(shared_datasets: Path) -> None:
    folder = shared_datasets / "hostile" / "pillow-tests"
    names = ["hopper_bad_exif.jpg", "exif-ifd-offset.jpg", "exif_typeerror.jpg", "exif-dpi-zerodivision.jpg"]
    names += sorted(p.name for p in folder.glob("invalid-exif*.jpg"))
    for name in names:
        with Image.open(folder / name) as image:
            rgb = to_rgb_array(image)
        assert rgb.ndim == 3
        assert rgb.shape[2] == 3
        assert np.isfinite(rgb).all()


def test_hopper_orientations_all_display_the_same_picture(shared_datasets: Path) -> None:
    folder = shared_datasets / "hostile" / "pillow-tests"
    arrays = []
    for orientation in range(2, 9):
        with Image.open(folder / f"hopper_orientation_{orientation}.jpg") as image:
            arrays.append(to_rgb_array(image))
    reference = arrays[0]
    for rgb in arrays[1:]:
        assert rgb.shape == reference.shape
        assert float(np.abs(rgb - reference).mean()) < 0.03


def test_odd_valid_shared_files(shared_datasets: Path) -> None:
    folder = shared_datasets / "hostile" / "pillow-tests"
    with Image.open(folder / "16_bit_binary_pgm.tiff") as image:
        assert image.mode == "I"
        rgb = to_rgb_array(image)
        raw = np.asarray(image)
    assert raw.max() > 255
    np.testing.assert_allclose(rgb[..., 0], raw / 65535.0, atol=1e-6)
    for name in ["pil_sample_cmyk.jpg", "uncompressed_la.png", "1_trns.png"]:
        with Image.open(folder / name) as image:
            rgb = to_rgb_array(image)
        assert rgb.dtype == np.float32
        assert float(rgb.min()) >= 0.0
        assert float(rgb.max()) <= 1.0


# --- crops
# ---------------------------------------------------------------------------------------------------


def test_too_small_images_raise_a_detector_error() -> None:
    rgb = np.zeros((MIN_SIDE - 1, 300, 3), dtype=np.float32)
    with pytest.raises(ImageTooSmallError) as caught:
        center_crop(rgb, 256)
    assert isinstance(caught.value, DetectorError)
    assert caught.value.min_side == MIN_SIDE
    assert "63" in str(caught.value)
    with pytest.raises(ImageTooSmallError):
        native_crops(rgb, 64, 4)
    with pytest.raises(ImageTooSmallError):
        pixel_evidence(rgb)


def test_center_crop_never_resizes_and_stays_on_the_lattice() -> None:
    rgb = np.random.default_rng(0).random((301, 517, 3), dtype=np.float32)
    crop = center_crop(rgb, 256)
    assert crop.shape == (256, 256, 3)
    # Find where the crop came from: it must be an exact slice at offsets that are multiples of 8.
    top, left = _locate(rgb, crop)
    assert top % CROP_ALIGN == 0
    assert left % CROP_ALIGN == 0
    assert abs(top - (301 - 256) / 2) <= CROP_ALIGN
    assert abs(left - (517 - 256) / 2) <= CROP_ALIGN


def test_center_crop_follows_a_shifted_lattice() -> None:
    rgb = np.random.default_rng(0).random((300, 300, 3), dtype=np.float32)
    crop = center_crop(rgb, 128, grid_offset=(3, 5))
    top, left = _locate(rgb, crop)
    assert top % CROP_ALIGN == 3
    assert left % CROP_ALIGN == 5


def test_small_images_get_a_native_crop_of_their_own_size() -> None:
    rgb = np.random.default_rng(0).random((100, 150, 3), dtype=np.float32)
    assert crop_side(rgb, 256) == 96
    crop = center_crop(rgb, 256)
    assert crop.shape == (96, 96, 3)
    _locate(rgb, crop)


def test_native_crops_grid_is_deterministic_and_aligned() -> None:
    rgb = np.random.default_rng(0).random((700, 1000, 3), dtype=np.float32)
    crops = native_crops(rgb, 128, 6)
    again = native_crops(rgb, 128, 6)
    assert 1 < len(crops) <= 6
    positions = [_locate(rgb, c) for c in crops]
    assert positions == [_locate(rgb, c) for c in again]
    assert len(set(positions)) == len(positions)
    for top, left in positions:
        assert top % CROP_ALIGN == 0
        assert left % CROP_ALIGN == 0
    tops = {p[0] for p in positions}
    lefts = {p[1] for p in positions}
    assert max(lefts) - min(lefts) > 500  # spread over the image, not bunched at the centre
    assert len(tops) * len(lefts) == len(positions)


def test_native_crops_random_positions_are_aligned() -> None:
    rgb = np.random.default_rng(0).random((400, 400, 3), dtype=np.float32)
    crops = native_crops(rgb, 64, 10, rng=np.random.default_rng(3), grid_offset=(2, 6))
    assert len(crops) == 10
    for crop in crops:
        assert crop.shape == (64, 64, 3)
        top, left = _locate(rgb, crop)
        assert top % CROP_ALIGN == 2
        assert left % CROP_ALIGN == 6
    with pytest.raises(ValueError, match="max_crops"):
        native_crops(rgb, 64, 0)


def _locate(full: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """(top, left) where `crop` is an exact slice of `full`; fails if it is not (i.e. it was resampled)."""
    height, width = crop.shape[:2]
    first_row = crop[0]
    for top in range(full.shape[0] - height + 1):
        row = full[top]
        for left in np.flatnonzero(np.all(row[: full.shape[1] - width + 1] == first_row[0], axis=1)):
            if np.array_equal(full[top : top + height, left : left + width], crop):
                return top, int(left)
    pytest.fail("crop is not an exact slice of the image")


def test_textured_crops_are_read_where_the_image_has_texture():
    rng = np.random.default_rng(4)
    rgb = np.full((192, 256, 3), 0.5, dtype=np.float32)
    rgb[:, 128:] = rng.random((192, 128, 3), dtype=np.float32)  # the right half is textured, the left flat
    crops = textured_crops(rgb, 64, 4, 24, grid_offset=(0, 0))
    assert len(crops) == 4
    assert all(crop_texture(c) > 0.1 for c in crops)
    assert crop_texture(rgb[:64, :64]) == 0.0
    # Every chosen crop is one of the grid candidates, read in grid order, still on the 8-pixel lattice.
    candidates = native_crops(rgb, 64, 24)
    positions = [next(i for i, c in enumerate(candidates) if np.array_equal(c, crop)) for crop in crops]
    assert positions == sorted(positions)


def test_textured_crops_without_more_candidates_are_the_even_grid():
    rgb = np.random.default_rng(5).random((200, 300, 3), dtype=np.float32)
    for candidates in (0, 4, 6):
        chosen = textured_crops(rgb, 64, 6, candidates, grid_offset=(0, 0))
        expected = native_crops(rgb, 64, 6)
        assert len(chosen) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(chosen, expected, strict=True))
