"""decode_image: hostile corpus, pixel cap before decoding, format allowlist, crash/hang/memory isolation.

The corpus tests need ../shared/datasets/hostile and skip with a reason without it; every other test makes
its images here.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tests.conftest import shared_dir
from worker.decode import ALLOWED_FORMATS, DecodeError, Decoder, decode_image
from worker.settings import Settings

HOSTILE_DIR = shared_dir() / "datasets" / "hostile" / "pillow-tests"
HOSTILE_FILES = sorted(p for p in HOSTILE_DIR.glob("*") if p.is_file() and p.name != "LICENSE")
NO_CORPUS = pytest.mark.skip(reason=f"hostile corpus not found at {HOSTILE_DIR} (set SYNTHGUARD_SHARED_DIR)")
CORPUS_PARAMS = [pytest.param(p, id=p.name) for p in HOSTILE_FILES] or [pytest.param(None, marks=NO_CORPUS)]

SETTINGS = Settings()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --- the hostile corpus ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", CORPUS_PARAMS)
def test_every_hostile_file_decodes_or_fails_with_a_reason(path: Path) -> None:
    try:
        image = decode_image(path.read_bytes(), SETTINGS)
    except DecodeError as exc:
        assert exc.reason.strip()
        assert len(exc.reason) < 500
        return
    # Decoded: a real, loaded image within the limits.
    assert image.width > 0
    assert image.height > 0
    assert image.width * image.height <= SETTINGS.max_pixels
    assert image.format in ALLOWED_FORMATS
    assert len(image.tobytes()) > 0


def _corpus(name: str) -> Path:
    path = HOSTILE_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not found (shared datasets absent)")
    return path


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_files_decode_with_their_orientation(orientation: int) -> None:
    image = decode_image(_corpus(f"hopper_orientation_{orientation}.jpg").read_bytes(), SETTINGS)
    assert image.format == "JPEG"
    assert image.getexif().get(0x0112) == orientation


@pytest.mark.parametrize(
    "name",
    [
        "decompression_bomb.gif",
        "bmp__b__reallybig.bmp",
    ],
)
def test_bombs_in_allowed_formats_are_refused_from_the_header(name: str) -> None:
    with pytest.raises(DecodeError, match="too large"):
        decode_image(_corpus(name).read_bytes(), SETTINGS)


@pytest.mark.parametrize(
    "name",
    [
        "decompression_bomb.ico",
        "m13_gzip.fits",
        "psd-oob-write.psd",
        "eps__timeout-d675703545fee17acab56e5fec6.eps",
    ],
)
def test_formats_outside_the_allowlist_are_refused(name: str) -> None:
    matches = sorted(HOSTILE_DIR.glob(name[:30] + "*"))
    if not matches:
        pytest.skip(f"{name} not found (shared datasets absent)")
    with pytest.raises(DecodeError, match="unsupported image format"):
        decode_image(matches[0].read_bytes(), SETTINGS)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("pil_sample_cmyk.jpg", "CMYK"),
        ("16_bit_binary_pgm.tiff", None),
        ("tiff_tiled_planar_16bit_RGB.tiff", None),
        ("uncompressed_la.png", "LA"),
        ("1_trns.png", None),
        ("avif__hopper.avif", "RGB"),
    ],
)
def test_unusual_but_valid_files_decode(name: str, mode: str | None) -> None:
    image = decode_image(_corpus(name).read_bytes(), SETTINGS)
    if mode is not None:
        assert image.mode == mode
    assert image.width * image.height > 0


@pytest.mark.parametrize("name", ["truncated_jpeg.jpg", "truncated_image.png"])
def test_truncated_files_fail_with_a_truncation_reason(name: str) -> None:
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(_corpus(name).read_bytes(), SETTINGS)


# --- limits checked before decoding ----------------------------------------------------------------------


def test_pixel_cap_is_checked_from_the_header_before_decoding() -> None:
    # The data behind the header is 16 bytes: a decode would fail as truncated. "too large" proves the size
    # was refused first.
    with pytest.raises(DecodeError, match="too large") as refused:
        decode_image(png_header_only(7000, 7000), SETTINGS)
    assert "49000000" in refused.value.reason


def test_pixel_cap_applies_between_one_and_two_times_the_limit() -> None:
    # Pillow only warns between 1x and 2x its MAX_IMAGE_PIXELS; our own cap refuses.
    data = encode(Image.new("RGB", (1200, 1000), (10, 20, 30)), "PNG")
    with pytest.raises(DecodeError, match="too large"):
        decode_image(data, Settings(max_pixels=1_000_000))
    assert decode_image(data, Settings(max_pixels=1_200_000)).size == (1200, 1000)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not a recognised image"),
        (b"GIF89a" + b"\0" * 7, "GIF"),
    ],
)
def test_non_images_fail_with_a_reason(data: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment):
        decode_image(data, SETTINGS)


@pytest.mark.parametrize(("fmt", "name"), [("PPM", "Netpbm"), ("ICO", "ICO"), ("PDF", "PDF")])
def test_formats_outside_the_allowlist_made_here_are_refused(fmt: str, name: str) -> None:
    data = encode(Image.new("RGB", (32, 32), (200, 0, 0)), fmt)
    with pytest.raises(DecodeError, match=f"unsupported image format .*{name}"):
        decode_image(data, SETTINGS)


def test_truncated_jpeg_made_here_fails_on_load() -> None:
    data = encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], SETTINGS)


# --- what comes back
# ------------------------------------------------------------------------------------------


def test_pixels_and_metadata_survive_the_round_trip() -> None:
    source = Image.effect_noise((64, 48), 40).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo of a cat, Steps: 30, Sampler: Euler a")
    data = encode(source, "PNG", pnginfo=info, exif=exif.tobytes())
    image = decode_image(data, SETTINGS)
    assert image.format == "PNG"
    assert image.mode == "RGB"
    assert image.tobytes() == source.tobytes()
    assert image.info["parameters"].startswith("a photo of a cat")
    assert image.getexif()[0x0112] == 6
    assert image.getexif()[0x010F] == "Canon"


def test_icc_profile_and_jpeg_info_survive() -> None:
    fake_icc = b"\0\0\2\0ICC-profile-bytes" * 10
    data = encode(Image.new("RGB", (40, 30), (1, 2, 3)), "JPEG", icc_profile=fake_icc, dpi=(300, 300))
    image = decode_image(data, SETTINGS)
    assert image.info["icc_profile"] == fake_icc
    assert tuple(round(v) for v in image.info["dpi"]) == (300, 300)


def test_large_generator_metadata_survives_and_what_exceeds_the_budget_is_dropped() -> None:
    # A ComfyUI workflow near Pillow's 1 MiB text-chunk limit grows past 1 MiB once quoted as JSON; it is
    # provenance evidence, so it must come back, not fail the decode.
    workflow = json.dumps({"nodes": [{"id": i, "type": "KSampler", "seed": i} for i in range(20_000)]})
    assert 900_000 < len(workflow) < 1 << 20
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", workflow)
    image = decode_image(encode(Image.new("RGB", (64, 64)), "PNG", pnginfo=info), SETTINGS)
    assert image.info["workflow"] == workflow
    # Twenty such chunks exceed what the decoding process sends back: some are dropped, the image decodes.
    many = PngImagePlugin.PngInfo()
    for index in range(20):
        many.add_text(f"chunk{index}", workflow)
    image = decode_image(encode(Image.new("RGB", (64, 64)), "PNG", pnginfo=many), SETTINGS)
    assert image.size == (64, 64)
    assert 0 < sum(key.startswith("chunk") for key in image.info) < 20


def test_sixteen_bit_pixels_are_kept() -> None:
    source = Image.new("I;16", (20, 10))
    source.putdata([i * 300 for i in range(200)])
    image = decode_image(encode(source, "PNG"), SETTINGS)
    assert image.mode in ("I;16", "I")
    assert list(image.get_flattened_data()) == [i * 300 for i in range(200)]


def test_palette_with_transparency_comes_back_rgba() -> None:
    source = Image.new("P", (8, 8), 1)
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    source.info["transparency"] = 0
    image = decode_image(encode(source, "PNG", transparency=0), SETTINGS)
    assert image.mode == "RGBA"
    assert image.getpixel((0, 0)) == (255, 0, 0, 255)


def test_only_the_first_frame_of_an_animation_is_decoded() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image(data, SETTINGS)
    assert image.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    assert not hasattr(image, "n_frames") or getattr(image, "n_frames", 1) == 1


def test_decode_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DecodeError("decode timed out after 20 s")))  # noqa: S301
    assert isinstance(error, DecodeError)
    assert error.reason == "decode timed out after 20 s"


# --- isolation: hang, crash, memory
# ---------------------------------------------------------------------------


def big_png() -> bytes:
    # 40 M pixels of smooth gradient: small on disk, ~0.3 s or more to decode and 120 MB to ship back.
    gradient = Image.linear_gradient("L").resize((8000, 5000))
    return encode(Image.merge("RGB", (gradient, gradient, gradient)), "PNG", compress_level=1)


@pytest.fixture(scope="module")
def big_png_bytes() -> bytes:
    return big_png()


def test_a_decode_past_the_time_limit_is_killed_and_the_next_one_works(big_png_bytes: bytes) -> None:
    decoder = Decoder(memory_bytes=2 << 30)
    try:
        small = encode(Image.new("RGB", (10, 10)), "PNG")
        decoder.decode(small, max_pixels=50_000_000, timeout_s=30)
        first_child = decoder._process.pid if decoder._process else None
        with pytest.raises(DecodeError, match="timed out"):
            decoder.decode(big_png_bytes, max_pixels=50_000_000, timeout_s=0.02)
        assert decoder._process is None  # the stuck child was killed, not left running
        assert first_child is not None
        with pytest.raises(ProcessLookupError):
            os.kill(first_child, 0)
        assert decoder.decode(small, max_pixels=50_000_000, timeout_s=30).size == (10, 10)
        assert decoder.restarts == 1
    finally:
        decoder.close()


def test_a_crashing_decoder_yields_a_reason_and_the_next_decode_works(big_png_bytes: bytes) -> None:
    decoder = Decoder(memory_bytes=2 << 30)
    try:
        small = encode(Image.new("RGB", (10, 10)), "PNG")
        decoder.decode(small, max_pixels=50_000_000, timeout_s=30)
        assert decoder._process is not None
        child_pid = decoder._process.pid

        def kill_soon() -> None:
            time.sleep(0.1)
            os.kill(child_pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        with pytest.raises(DecodeError, match=r"decoder crashed \(killed by SIGKILL\)"):
            decoder.decode(big_png_bytes, max_pixels=50_000_000, timeout_s=60)
        killer.join()
        assert decoder.decode(small, max_pixels=50_000_000, timeout_s=30).size == (10, 10)
    finally:
        decoder.close()


def test_memory_limit_stops_a_decode_without_hurting_the_caller(big_png_bytes: bytes) -> None:
    decoder = Decoder(memory_bytes=64 << 20)
    try:
        with pytest.raises(DecodeError, match="out of memory"):
            decoder.decode(big_png_bytes, max_pixels=50_000_000, timeout_s=60)
        small = encode(Image.new("RGB", (10, 10)), "PNG")
        assert decoder.decode(small, max_pixels=50_000_000, timeout_s=30).size == (10, 10)
    finally:
        decoder.close()


def test_an_interrupted_decode_never_hands_its_reply_to_the_next_one(big_png_bytes: bytes) -> None:
    # Celery's soft time limit raises inside the task like this signal handler does, possibly while the reply
    # is half read. The next decode must get its own image, not the rest of the interrupted one.
    class SoftLimitError(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise SoftLimitError

    decoder = Decoder(memory_bytes=2 << 30)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        small = encode(Image.new("RGB", (10, 10)), "PNG")
        decoder.decode(small, max_pixels=50_000_000, timeout_s=30)
        signal.setitimer(signal.ITIMER_REAL, 0.15)
        with pytest.raises(SoftLimitError):
            decoder.decode(big_png_bytes, max_pixels=50_000_000, timeout_s=60)
        signal.setitimer(signal.ITIMER_REAL, 0)
        image = decoder.decode(
            encode(Image.new("RGB", (13, 7), (1, 2, 3)), "PNG"), max_pixels=10**8, timeout_s=30
        )
        assert image.size == (13, 7)
        assert image.getpixel((0, 0)) == (1, 2, 3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        decoder.close()


def test_a_child_started_from_a_short_lived_thread_outlives_the_thread() -> None:
    # The child dies with its parent (PR_SET_PDEATHSIG), and for the kernel the parent is the spawning thread.
    decoder = Decoder(memory_bytes=1 << 30)
    small = encode(Image.new("RGB", (10, 10)), "PNG")
    try:
        worker = threading.Thread(
            target=decoder.decode, args=(small,), kwargs={"max_pixels": 10**6, "timeout_s": 30}
        )
        worker.start()
        worker.join()
        assert decoder._process is not None
        first_pid = decoder._process.pid
        time.sleep(0.3)  # time for a kill on thread exit to land, if there were one
        assert decoder.decode(small, max_pixels=10**6, timeout_s=30).size == (10, 10)
        assert decoder._process is not None
        assert decoder._process.pid == first_pid
    finally:
        decoder.close()


def test_a_forked_process_gets_its_own_decoder_child() -> None:
    small = encode(Image.new("RGB", (12, 7), (9, 9, 9)), "PNG")
    assert decode_image(small, SETTINGS).size == (12, 7)  # the parent's child is running now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked process
        try:
            size = decode_image(small, SETTINGS).size
            os.write(write_end, f"{size[0]}x{size[1]}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read_end, 100).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == "12x7"
    # The parent's decoder child was not disturbed by the fork's use of its own.
    assert decode_image(small, SETTINGS).size == (12, 7)
