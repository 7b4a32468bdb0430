"""Time the hand-made evidence: to_rgb_array, pixel_evidence (and each group), read_provenance.

    .venv/bin/python bench/bench_evidence.py [--size 512] [--repeats 30]
    .venv/bin/python bench/bench_evidence.py --batch 32 [--device cuda]   # per image, measured in batches
    .venv/bin/python bench/bench_evidence.py --big-mode RGB     # peak memory of prepare_image, 40 MP

Inputs are made here: a 512x512 JPEG (quality 90) of a smooth random scene, decoded once. Reports the median
and the 90th percentile of wall time per call on one thread (the detector measures the evidence of a whole
batch at once, on its device; with --batch the figure is per image of such a batch, results on the CPU).
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from models.evidence import pixel_evidence, pixel_evidence_batch, read_provenance
from models.evidence.color import color_evidence
from models.evidence.grid import grid_evidence
from models.evidence.spectral import spectral_evidence
from models.preprocess import center_crop, prepare_image, to_rgb_array


def _jpeg_bytes(size: int) -> bytes:
    rng = np.random.default_rng(0)
    scene = np.stack([ndimage.gaussian_filter(rng.random((size, size)), 2) for _ in range(3)], axis=-1)
    scene = (scene - scene.min()) / (scene.max() - scene.min()) * 255
    buffer = io.BytesIO()
    Image.fromarray(scene.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _time(label: str, call: Callable[[], object], repeats: int) -> None:
    call()  # warm-up: imports, FFT plans, caches
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p90 = samples[int(0.9 * (len(samples) - 1))]
    print(f"{label:28s} median {statistics.median(samples):6.1f} ms   p90 {p90:6.1f} ms")


def _big_image_memory(mode: str) -> None:
    """Peak RSS added by prepare_image on an 8000x5000 image (the worker's default max_pixels is 40 MP)."""
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(0).integers(0, 256, size=(5000, 8000, channels), dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    del pixels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepared = prepare_image(image)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"prepare_image 8000x5000 {mode}: peak RSS {before // 1024} -> {after // 1024} MiB "
        f"(result {prepared.rgb.nbytes // 2**20} MiB float32)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="also time a batch of this many crops")
    parser.add_argument("--device", default="cpu", help="device of the batched evidence (cpu, cuda)")
    parser.add_argument(
        "--big-mode", choices=["RGB", "RGBA"], help="instead: peak memory of prepare_image on a 40 MP image"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.big_mode:
        _big_image_memory(args.big_mode)
        return
    data = _jpeg_bytes(args.size)
    image = Image.open(io.BytesIO(data))
    image.load()
    rgb = to_rgb_array(image)
    crop = np.ascontiguousarray(center_crop(rgb, 512))
    print(f"{args.size}x{args.size} JPEG q90, {len(data)} bytes")
    _time("to_rgb_array", lambda: to_rgb_array(image), args.repeats)
    _time("spectral_evidence", lambda: spectral_evidence(crop), args.repeats)
    _time("color_evidence", lambda: color_evidence(crop), args.repeats)
    _time("grid_evidence", lambda: grid_evidence(crop), args.repeats)
    _time("pixel_evidence (all three)", lambda: pixel_evidence(rgb), args.repeats)
    _time("read_provenance", lambda: read_provenance(image, data), args.repeats)
    if args.batch:
        crops = [crop] * args.batch
        device = torch.device(args.device)

        def batch() -> None:
            pixel_evidence_batch(crops, device)
            if device.type == "cuda":
                torch.cuda.synchronize()

        _time(f"pixel_evidence_batch x{args.batch}", batch, args.repeats)
        print(f"  = per image, {args.device}: divide by {args.batch}")


if __name__ == "__main__":
    main()
