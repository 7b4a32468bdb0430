"""Pipeline throughput: images per second through the real pipeline, in-process and through a Celery worker.

    .venv/bin/python bench/bench_pipeline.py --images 48 --size 512
    .venv/bin/python bench/bench_pipeline.py --images 48 --worker --concurrency 2   # + a real worker

Phases (each on images the previous phases did not see, except "reuse"):
  scan      ``scan_inputs`` in this process on SQLite: read, hash, decode (child process), detect, store;
  reuse     the same bytes under new ids: hash + stored-verdict lookup, no inference;
  worker    (--worker) ``synthguard worker`` subprocess on PostgreSQL + Redis, fed by ``submit_check``; timed
            from the first submit to the last check stored, the detector already loaded.
Images are native-resolution crops of scikit-image's sample photos (distinct bytes per image). Numbers
depend on the CPU/GPU and on what else runs; the script prints the machine's core count beside them.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.resources import files
from pathlib import Path

import psycopg
import sqlalchemy as sa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.migrate import upgrade_to_head  # noqa: E402
from db.session import make_engine, make_session_factory  # noqa: E402
from db.tables import Check  # noqa: E402
from worker.app import load_detector  # noqa: E402
from worker.cli.pipeline_cmds import ScanInput, scan_inputs  # noqa: E402
from worker.client import submit_check  # noqa: E402
from worker.settings import Settings  # noqa: E402

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def make_images(count: int, size: int, directory: Path, seed_offset: int = 0) -> list[Path]:
    """``count`` distinct PNG crops of ``size`` px (smaller photos are cropped to what they have)."""
    sources = [
        Image.open(io.BytesIO((files("skimage.data") / name).read_bytes())).convert("RGB") for name in PHOTOS
    ]
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        side = min(size, photo.width, photo.height)
        step = index // len(sources) + seed_offset
        left = (step * 7) % max(1, photo.width - side + 1)
        top = (step * 13) % max(1, photo.height - side + 1)
        crop = photo.crop((left, top, left + side, top + side))
        if step % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = directory / f"img{seed_offset}_{index:04d}.png"
        crop.save(path)
        paths.append(path)
    return paths


def bench_in_process(settings: Settings, paths: list[Path]) -> tuple[float, float]:
    factory = make_session_factory(make_engine(settings.database_url))
    detector = load_detector(settings)
    detector.detect([Image.open(paths[0]).convert("RGB")])  # warm-up outside the timing
    started = time.perf_counter()
    rows = scan_inputs(
        factory, detector, [ScanInput(name=str(p), path=p) for p in paths], settings, client="bench"
    )
    fresh_s = time.perf_counter() - started
    assert all(row["status"] == "done" for row in rows), [row["error"] for row in rows if row["error"]]
    # The same bytes under other external ids: copies with one appended byte would change the sha256, so the
    # files are re-submitted under another client instead (new checks, same content).
    started = time.perf_counter()
    scan_inputs(
        factory, detector, [ScanInput(name=str(p), path=p) for p in paths], settings, client="bench-reuse"
    )
    reuse_s = time.perf_counter() - started
    return fresh_s, reuse_s


def bench_worker(paths: list[Path], concurrency: int, redis_db: int) -> float:
    name = f"synthguard_bench_{secrets.token_hex(4)}"
    admin = {"host": "127.0.0.1", "user": "postgres", "dbname": "postgres", "autocommit": True}
    with psycopg.connect(**admin) as connection:  # type: ignore[arg-type]
        connection.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1/{name}"
    broker = f"redis://127.0.0.1:6379/{redis_db}"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SYNTHGUARD_")}
    env.update(
        SYNTHGUARD_DATABASE_URL=url,
        SYNTHGUARD_BROKER_URL=broker,
        SYNTHGUARD_QUEUE_NAME=queue,
        SYNTHGUARD_SECRET_KEY=secrets.token_hex(32),
    )
    worker = None
    engine = make_engine(url)
    try:
        upgrade_to_head(url)
        worker = subprocess.Popen(
            [sys.executable, "-c", "from worker.cli import main; main()", "worker",
             f"--concurrency={concurrency}", "--loglevel=WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Warm-up: one check end to end, so every child has loaded its detector before the timing starts.
        warm = make_images(concurrency, 64, paths[0].parent, seed_offset=999)
        for index, path in enumerate(warm):
            submit_check(broker, queue=queue, client="warm", external_id=str(index), image_path=path)
        _wait_done(engine, "warm", len(warm))
        started = time.perf_counter()
        for index, path in enumerate(paths):
            submit_check(broker, queue=queue, client="bench", external_id=str(index), image_path=path)
        _wait_done(engine, "bench", len(paths))
        return time.perf_counter() - started
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
        engine.dispose()
        with psycopg.connect(**admin) as connection:  # type: ignore[arg-type]
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wait_done(engine: sa.Engine, client: str, count: int, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            finished = connection.scalar(
                sa.select(sa.func.count())
                .select_from(Check)
                .where(Check.client == client, Check.status.in_(("done", "failed")))
            )
        if finished == count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{client}: not all {count} checks finished within {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="crop side in pixels (native resolution)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help="also measure a real `synthguard worker`")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--redis-db", type=int, default=13)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        paths = make_images(args.images, args.size, directory)
        db_url = f"sqlite:///{directory / 'bench.db'}"
        upgrade_to_head(db_url)
        settings = Settings(database_url=db_url, batch_size=args.batch_size, device="auto")
        fresh_s, reuse_s = bench_in_process(settings, paths)
        results = [
            ("scan (in-process, SQLite)", fresh_s),
            ("reuse (same bytes, new ids)", reuse_s),
        ]
        if args.worker:
            worker_paths = make_images(args.images, args.size, directory, seed_offset=500)
            results.append((f"worker (prefork x{args.concurrency}, PostgreSQL)", bench_worker(
                worker_paths, args.concurrency, args.redis_db)))  # fmt: skip

    print(
        f"{args.images} images of {args.size}x{args.size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'phase':<36} {'seconds':>8} {'images/s':>9}")
    for phase, seconds in results:
        print(f"{phase:<36} {seconds:>8.1f} {args.images / seconds:>9.1f}")


if __name__ == "__main__":
    main()
