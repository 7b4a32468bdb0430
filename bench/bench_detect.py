"""Throughput and peak memory of `Detector.detect` on 512x512 JPEGs, decode and evidence included.

    .venv/bin/python bench/bench_detect.py                 # CPU (or CUDA when available), 200 images
    .venv/bin/python bench/bench_detect.py --device cuda --batch-size 128 --count 4000
    .venv/bin/python bench/bench_detect.py --device cuda --processes 12 --threads 1 --count 12000
    .venv/bin/python bench/bench_detect.py --weights runs/ship/weights.pt   # a locally trained model
    .venv/bin/python bench/bench_detect.py --crop-batch 256                 # crops per CNN batch

With --processes N, N detectors in separate processes share the device, as the N pool processes of one
`synthguard worker --concurrency N` do; decoding and the hand-made evidence run on the CPU in each of them.

Targets (issue 2): >= 10 images/s and < 1.5 GB peak RSS on the 2-core CPU; 500+ images/s on one H100.
The images are made here: native 512x512 crops of scikit-image's sample photos plus textured noise, saved as
JPEG quality 90, so every run measures the same work.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from importlib.resources import files
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from models import _scoring


def make_jpegs(count: int, side: int = 512, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    photos = []
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        with Image.open(io.BytesIO((files("skimage.data") / name).read_bytes())) as img:
            photos.append(np.asarray(img.convert("RGB")))
    blobs = []
    for i in range(count):
        base = photos[i % len(photos)]
        canvas = np.zeros((side, side, 3), dtype=np.float32)
        h, w = min(side, base.shape[0]), min(side, base.shape[1])
        canvas[:h, :w] = base[:h, :w]
        canvas += rng.normal(0, 6, canvas.shape)  # different pixels per image, so nothing is cached
        buffer = io.BytesIO()
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(
    *,
    count: int,
    batch_size: int | None,
    device: str | None,
    threads: int | None,
    weights: Path | None = None,
    crop_batch: int | None = None,
    seed: int = 0,
    barrier: Any = None,
) -> dict[str, Any]:
    """Detect `count` JPEGs made here in batches; returns throughput, peak RSS and the verdict counts."""
    if threads:
        torch.set_num_threads(threads)
    if crop_batch:
        # The detector's CNN batch is a module setting read at each call (the scores do not depend on it).
        _scoring.CPU_CROP_BATCH = _scoring.GPU_CROP_BATCH = crop_batch
    if weights is None:
        detector = models.create_detector("synthguard-v1", device=device)
    else:
        detector = models.detector_from_weights(weights, device=device)
    size = batch_size or (128 if detector.device.type == "cuda" else 8)
    blobs = make_jpegs(count, seed=seed)
    warm = [models.ImageInput(image=Image.open(io.BytesIO(b)), data=b) for b in blobs[:size]]
    detector.detect(warm)  # first call pays one-off costs (allocations, CUDA kernels)
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    if barrier is not None:
        barrier.wait()  # every process starts timing together
    wall_started = time.time()
    started = time.perf_counter()
    verdicts: dict[str, int] = {}
    for first in range(0, len(blobs), size):
        batch = []
        for blob in blobs[first : first + size]:
            image = Image.open(io.BytesIO(blob))
            image.load()
            batch.append(models.ImageInput(image=image, data=blob))
        for detection in detector.detect(batch):
            verdicts[detection.verdict] = verdicts.get(detection.verdict, 0) + 1
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "model": detector.model_id,
        "device": str(detector.device),
        "device_name": torch.cuda.get_device_name() if detector.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "images": len(blobs),
        "batch_size": size,
        "crop_batch": _scoring.crop_batch_size(detector.device),
        "seconds": round(elapsed, 2),
        "images_per_s": round(len(blobs) / elapsed, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "verdicts": verdicts,
        "wall_started": wall_started,
        "wall_ended": time.time(),
    }


def _process_main(queue: Any, barrier: Any, kwargs: dict[str, Any]) -> None:
    queue.put(measure(barrier=barrier, **kwargs))


def measure_processes(processes: int, **kwargs: Any) -> dict[str, Any]:
    """`processes` detectors side by side (as prefork pool processes sharing a GPU); total throughput."""
    # Spawned children read these when they import NumPy and PyTorch: one process per core, no thread pools
    # that would each claim every core.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(kwargs.get("threads") or 1))
    context = get_context("spawn")
    queue = context.Queue()
    barrier = context.Barrier(processes)
    share = kwargs.pop("count") // processes
    workers = [
        context.Process(target=_process_main, args=(queue, barrier, kwargs | {"count": share, "seed": i}))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    wall = max(r["wall_ended"] for r in results) - min(r["wall_started"] for r in results)
    images = sum(r["images"] for r in results)
    verdicts: dict[str, int] = {}
    for r in results:
        for verdict, n in r["verdicts"].items():
            verdicts[verdict] = verdicts.get(verdict, 0) + n
    first = results[0]
    return {
        "model": first["model"],
        "device": first["device"],
        "device_name": first["device_name"],
        "processes": processes,
        "torch_threads_per_process": first["torch_threads"],
        "images": images,
        "batch_size": first["batch_size"],
        "crop_batch": first["crop_batch"],
        "seconds": round(wall, 2),
        "images_per_s": round(images / wall, 2),
        "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in results),
        "verdicts": verdicts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--processes", type=int, default=1, help="detectors in separate processes sharing the device"
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="a trained weights file (default: the shipped model)"
    )
    parser.add_argument(
        "--crop-batch", type=int, default=None, help="crops per CNN batch (default: 64 on CPU, 256 on CUDA)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    kwargs: dict[str, Any] = {
        "count": args.count,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
        "weights": args.weights,
        "crop_batch": args.crop_batch,
    }
    if args.processes > 1:
        result = measure_processes(args.processes, **kwargs)
    else:
        result = measure(**kwargs)
        del result["wall_started"], result["wall_ended"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
