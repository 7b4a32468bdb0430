"""Per-image cost of the sandboxed decoder (worker.decode) against a plain in-process Pillow decode.

Usage: .venv/bin/python bench/decode_overhead.py [--size 512] [--n 200]

Prints the median and p95 wall time per image for both paths, and their difference (the sandbox overhead: one
pipe round trip carrying the file out and the pixels back). Images are made here (smooth noise, JPEG quality
90).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from worker.decode import decode_image, shutdown_decoder
from worker.settings import Settings


def _jpeg(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _in_process(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _time(fn: object, payloads: list[bytes]) -> list[float]:
    times = []
    for data in payloads:
        start = time.perf_counter()
        fn(data)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    settings = Settings()
    payloads = [_jpeg(args.size, seed) for seed in range(args.n)]

    start = time.perf_counter()
    decode_image(payloads[0], settings)  # starts the child
    startup = time.perf_counter() - start

    plain = _time(_in_process, payloads)
    sandboxed = _time(lambda data: decode_image(data, settings), payloads)
    shutdown_decoder()

    def row(name: str, times: list[float]) -> str:
        ordered = sorted(times)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        return f"{name:<22} median {statistics.median(times) * 1e3:7.2f} ms   p95 {p95 * 1e3:7.2f} ms"

    mean_bytes = sum(map(len, payloads)) // args.n
    print(f"{args.n} JPEGs {args.size}x{args.size} ({mean_bytes} bytes each on average)")
    print(f"decoder child start-up (once per worker process): {startup * 1e3:.0f} ms")
    print(row("in-process Pillow", plain))
    print(row("sandboxed decode_image", sandboxed))
    overhead = statistics.median(sandboxed) - statistics.median(plain)
    print(f"sandbox overhead per image (median difference): {overhead * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
