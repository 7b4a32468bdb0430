"""The decoding process: reads encoded images from stdin, writes raw pixels to stdout, one at a time.

It runs as ``python -m worker._decode_child`` under an address-space limit (RLIMIT_AS), with core dumps and
file writes disabled, so a decoder bug triggered by a hostile file can crash, hang or exhaust only this
process; the parent (worker/decode.py) kills it on timeout and starts a new one. It imports nothing but the
standard library and Pillow, so it starts quickly.

Wire format, both directions: 4-byte big-endian length + UTF-8 JSON header, then 8-byte big-endian length +
payload. Request header: {"seq", "max_pixels", "formats"}; payload: the file bytes. Reply header (echoing
"seq"): {"ok": true, "mode", "size", "format", "info"} + raw pixels, or {"ok": false, "reason", "fatal"}.
``info`` is image.info in a tagged JSON form (bytes as base64), never pickle: a compromised child must not be
able to run code in the parent through what it sends back.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import io
import json
import math
import numbers
import os
import resource
import signal
import struct
import sys
import warnings
from pathlib import Path
from typing import IO, Any, Final

from PIL import Image, ImageFile, UnidentifiedImageError

HEADER_LEN: Final = struct.Struct(">I")
PAYLOAD_LEN: Final = struct.Struct(">Q")
MAX_HEADER_BYTES: Final = 1 << 20
# Metadata values larger than this are dropped (a 60 MB ICC profile is not evidence worth shipping around).
MAX_INFO_VALUE_BYTES: Final = 4 << 20
MAX_INFO_TOTAL_BYTES: Final = 16 << 20
#: What the parent accepts as a reply header: all the metadata the child may send (keys and JSON included,
#: counted in ``_encoded_info``) plus room for mode, size and format. A ComfyUI workflow alone can pass 1 MiB.
MAX_REPLY_HEADER_BYTES: Final = MAX_INFO_TOTAL_BYTES + (1 << 20)
MAX_INFO_DEPTH: Final = 6

# Magic numbers of formats Pillow can open but the allowlist refuses: only used to name them in the reason.
_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"8BPS", "PSD"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"SIMPLE  =", "FITS"),
    (b"\x01\xda", "SGI"),
    (b"DDS ", "DDS"),
    (b"BLP1", "BLP"),
    (b"BLP2", "BLP"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"GIF8", "GIF"),
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
_NETPBM: Final = {b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"Pf", b"PF"}


def sniff_format(data: bytes) -> str | None:
    """A name for what ``data`` looks like, from its first bytes (for error messages only)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:2] in _NETPBM:
        return "PPM/PGM (Netpbm)"
    if len(data) > 4 and data[4:8] == b"ftyp":
        return f"ISO media ({data[8:12].decode('latin-1', 'replace').strip()})"
    if data[:2] in (b"II", b"MM"):
        return "TIFF"
    return None


# --- tagged JSON for image.info ----------------------------------------------------------------------------


def encode_value(value: Any, depth: int = 0) -> Any:
    """image.info value -> JSON-safe tagged value; unknown objects become their number or text."""
    if depth > MAX_INFO_DEPTH:
        return None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray):
        return {"__b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_value(item, depth + 1) for item in value]}
    if isinstance(value, list):
        return [encode_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        pairs = [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]
        return {"__dict__": pairs}
    if isinstance(value, numbers.Real):  # IFDRational and friends
        number = float(value)
        return number if math.isfinite(number) else str(number)
    return str(value)[:1000]


def decode_value(value: Any) -> Any:
    """Inverse of ``encode_value`` (run by the parent on what the child sent)."""
    if isinstance(value, list):
        return [decode_value(item) for item in value]
    if isinstance(value, dict):
        if "__b64__" in value:
            return base64.b64decode(value["__b64__"])
        if "__tuple__" in value:
            return tuple(decode_value(item) for item in value["__tuple__"])
        if "__dict__" in value:
            return {_hashable(decode_value(k)): decode_value(v) for k, v in value["__dict__"]}
        return None
    return value


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        return str(key)
    return key


def _encoded_info(image: Image.Image) -> dict[str, Any]:
    """image.info, tagged, within MAX_INFO_TOTAL_BYTES of JSON in all (each entry's key and separators
    counted), so the reply header stays under MAX_REPLY_HEADER_BYTES; entries that do not fit are dropped."""
    info: dict[str, Any] = {}
    total = 0

    def add(key: str, encoded: Any) -> None:
        nonlocal total
        value_size = len(json.dumps(encoded))
        size = value_size + len(json.dumps(key)) + 2
        if value_size <= MAX_INFO_VALUE_BYTES and total + size <= MAX_INFO_TOTAL_BYTES:
            total += size
            info[key] = encoded

    for key, value in image.info.items():
        add(str(key), encode_value(value))
    if "exif" not in info:
        # TIFF keeps EXIF (orientation included) in its own tags, which raw pixels lose: carry it as EXIF
        # bytes.
        try:
            exif = image.getexif()
            exif_bytes = exif.tobytes() if len(exif) else b""
        except Exception:  # noqa: BLE001 - hostile EXIF; the pixels are still worth analysing without it
            exif_bytes = b""
        if exif_bytes:
            add("exif", encode_value(exif_bytes))
    return info


# --- decoding
# ------------------------------------------------------------------------------------------------


class RefusedError(Exception):
    """The file is refused for a stated reason (not an accident of decoding)."""


def _first_frame(data: bytes, max_pixels: int, formats: list[str]) -> tuple[Image.Image, str]:
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        sniffed = sniff_format(data)
        if sniffed is not None and sniffed.split(" ")[0] not in formats:
            allowed = ", ".join(formats)
            raise RefusedError(f"unsupported image format {sniffed} (allowed: {allowed})") from None
        if sniffed is not None:
            raise RefusedError(f"corrupt {sniffed} header: not a readable image") from None
        raise RefusedError(f"not a recognised image (allowed formats: {', '.join(formats)})") from None
    image_format = str(image.format or "unknown")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise RefusedError(f"degenerate image size {width}x{height}")
    if width * height > max_pixels:
        pixels = width * height
        raise RefusedError(f"image too large: {width}x{height} = {pixels} pixels > limit {max_pixels}")
    # Only the first frame is ever decoded: the file's other frames (which may be thousands) are never
    # touched.
    image.load()
    return image, image_format


def _normalised(image: Image.Image) -> Image.Image:
    # Palette images travel as RGB(A): the palette would otherwise need its own wire format.
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "PA":
        return image.convert("RGBA")
    return image


def decode_one(data: bytes, max_pixels: int, formats: list[str]) -> tuple[dict[str, Any], bytes]:
    """Decode the first frame of ``data`` into (reply header, pixel bytes); raises on any failure."""
    if not data:
        raise RefusedError("empty file")
    image, image_format = _first_frame(data, max_pixels, formats)
    info = _encoded_info(image)
    pixels_image = _normalised(image)
    pixels = pixels_image.tobytes()
    header = {
        "ok": True,
        "mode": pixels_image.mode,
        "size": list(pixels_image.size),
        "format": image_format,
        "info": info,
    }
    return header, pixels


def reason_for(exc: BaseException) -> tuple[str, bool]:
    """(readable reason, whether the child should be restarted) for an exception raised by decoding."""
    if isinstance(exc, RefusedError):
        return str(exc), False
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        return f"image too large (over the {limit}-pixel limit; decompression bomb guard): {exc}", False
    if isinstance(exc, MemoryError):
        return "decoder ran out of memory (image needs more than the decode memory limit)", True
    message = str(exc).strip() or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated image data: {message}", False
    return f"corrupt image data ({type(exc).__name__}: {message[:300]})", False


# --- process loop
# --------------------------------------------------------------------------------------------


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_message(stream: IO[bytes], header: dict[str, Any], payload: bytes) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    stream.write(HEADER_LEN.pack(len(head)) + head + PAYLOAD_LEN.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_message(stream: IO[bytes], max_payload: int) -> tuple[dict[str, Any], bytes] | None:
    raw_len = _read_exact(stream, HEADER_LEN.size)
    if raw_len is None:
        return None
    (head_len,) = HEADER_LEN.unpack(raw_len)
    if head_len > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    head = _read_exact(stream, head_len)
    raw_payload_len = _read_exact(stream, PAYLOAD_LEN.size)
    if head is None or raw_payload_len is None:
        return None
    (payload_len,) = PAYLOAD_LEN.unpack(raw_payload_len)
    if payload_len > max_payload:
        raise ValueError("payload too large")
    payload = _read_exact(stream, payload_len)
    if payload is None:
        return None
    return json.loads(head), payload


def _limit_resources(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Pillow decodes in memory; a decoder that tries to write a file is doing something it should not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    if memory_bytes > 0:
        current_vm = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[0]) * os.sysconf(
            "SC_PAGE_SIZE"
        )
        limit = current_vm + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    # A decode stuck in a loop never reads the EOF that tells it the worker is gone; have the kernel kill it.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    expected_parent = int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid()
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        sys.exit(0)


def main() -> None:
    _die_with_parent()
    memory_bytes = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    max_input = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 31
    # Pillow's own bomb check becomes an error at our cap; the explicit check in _first_frame comes first
    # anyway.
    # Hostile files make plugins warn about every broken tag; the outcome is reported, the noise is not.
    warnings.simplefilter("ignore")
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.init()  # import every plugin now, before the memory limit, not lazily inside a decode
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Anything a plugin prints must not corrupt the reply stream.
    sys.stdout = sys.stderr
    _limit_resources(memory_bytes)
    write_message(stdout, {"ready": True, "pid": os.getpid()}, b"")
    while True:
        message = read_message(stdin, max_input)
        if message is None:
            return
        request, data = message
        sequence = request.get("seq")
        max_pixels = int(request["max_pixels"])
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            header, pixels = decode_one(data, max_pixels, list(request["formats"]))
        except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a reason for the parent
            reason, fatal = reason_for(exc)
            write_message(stdout, {"seq": sequence, "ok": False, "reason": reason, "fatal": fatal}, b"")
            if fatal:
                return
            continue
        header["seq"] = sequence
        write_message(stdout, header, pixels)


if __name__ == "__main__":
    main()
