"""Labelled image manifests, the evaluation conditions, and a decoded-pixel cache for training.

A manifest is a CSV in the format of `datasets/dev/manifest.csv`: at least `relpath` and `label` (`real` or
`fake`); `generator` and `source_repo` are used for families and leave-one-source-out; an optional `split`
column
(`train` / `test`) is honoured by evaluation.

A *source* is (label, source_repo): one repository can hold both classes (ML72's playground does), and
leaving it
out must leave out one class of it at a time so that the held-out test has a defined meaning.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from models.errors import DetectorError
from models.preprocess import to_rgb_array

Condition = Literal["native", "crop512_jpeg90", "crop512_png"]
CONDITIONS: tuple[Condition, ...] = ("native", "crop512_jpeg90", "crop512_png")
EVAL_CROP = 512
EVAL_JPEG_QUALITY = 90

#: Generators whose images come out of a GAN-trained decoder. DALL-E mini renders through a VQGAN decoder,
#: so its
#: traces are a GAN's, not a diffusion model's.
GAN_GENERATORS = frozenset({"stylegan2", "biggan", "unknown-gan", "dalle-mini"})

#: Formats stored without loss; the augmentation gives these a JPEG history as often as web images have one.
LOSSLESS_FORMATS = frozenset({"PNG", "TIFF", "BMP", "WEBP-LOSSLESS", "RECON"})


class ManifestError(DetectorError):
    """A manifest is missing, unreadable or has rows the detector cannot use."""


@dataclass(frozen=True)
class ManifestRow:
    """One labelled image."""

    path: Path
    label: Literal["real", "fake"]
    generator: str
    source_repo: str
    file_format: str
    split: str = ""

    @property
    def is_fake(self) -> bool:
        return self.label == "fake"

    @property
    def source(self) -> str:
        """Leave-one-source-out key: label and repository."""
        return f"{self.label}:{self.source_repo}"

    @property
    def family(self) -> int:
        """Index into `models.nets.FAMILIES` (real, diffusion, gan)."""
        if not self.is_fake:
            return 0
        return 2 if self.generator in GAN_GENERATORS else 1


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a UTF-8 manifest CSV (a byte-order mark, as Excel writes, is allowed); paths are resolved relative
    to the manifest's folder.

    Raises:
        ManifestError: missing or non-UTF-8 file, missing columns, a row without a relpath or label, or a
            label other than real/fake.
    """
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        return _read_manifest_rows(path)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise ManifestError(f"manifest {path} is not a readable CSV file: {exc}") from exc


def _read_manifest_rows(path: Path) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"relpath", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"manifest {path} lacks the column(s) {sorted(missing)}")
        for record in reader:
            # DictReader fills the columns a short row lacks with None; a quoted newline spans lines, so the
            # reader's own line count names the row's last line.
            line_no = reader.line_num
            relpath = record.get("relpath") or ""
            if not relpath.strip():
                raise ManifestError(f"{path}:{line_no}: the row has no relpath")
            label = (record.get("label") or "").strip().lower()
            if not label:
                raise ManifestError(f"{path}:{line_no}: the row has no label")
            if label not in {"real", "fake"}:
                raise ManifestError(f"{path}:{line_no}: label {label!r} is neither 'real' nor 'fake'")
            generator = (record.get("generator") or "").strip() or (
                "camera" if label == "real" else "unknown"
            )
            rows.append(
                ManifestRow(
                    path=path.parent / relpath,
                    label="real" if label == "real" else "fake",
                    generator=generator,
                    source_repo=(record.get("source_repo") or "").strip() or "unknown",
                    file_format=(record.get("format") or "").strip().upper(),
                    split=(record.get("split") or "").strip().lower(),
                )
            )
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def largest_sources(rows: Sequence[ManifestRow], n_fake: int = 5, n_real: int = 3) -> list[str]:
    """The `n_fake` largest fake sources and `n_real` largest real sources (ties broken by name)."""
    counts = Counter(row.source for row in rows)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    fakes = [name for name, _ in ranked if name.startswith("fake:")][:n_fake]
    reals = [name for name, _ in ranked if name.startswith("real:")][:n_real]
    return fakes + reals


def load_rgb(path: Path) -> NDArray[np.float32]:
    """Decode an image file to float32 RGB in [0, 1] (metadata is not read: pixels only)."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_array(img)
    except Exception as exc:
        # Pillow raises more than OSError on hostile files (SyntaxError for a broken APNG, struct.error,
        # DecompressionBombError, ...); each becomes one error naming the file instead of a traceback.
        raise ManifestError(f"cannot decode {path}: {type(exc).__name__}: {exc}") from exc


def _centre_crop(rgb: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """Centre crop to at most `size` on each side, no resizing, as the evaluation protocol defines it."""
    height, width = rgb.shape[:2]
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return rgb[top : top + crop_h, left : left + crop_w]


def to_uint8(rgb: NDArray[np.float32]) -> NDArray[np.uint8]:
    scaled: NDArray[np.uint8] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return scaled


def reencode(
    rgb_u8: NDArray[np.uint8], file_format: Literal["JPEG", "PNG"], quality: int = 90
) -> Image.Image:
    """Encode in memory and decode again: what a platform does when it re-saves an upload."""
    buffer = io.BytesIO()
    Image.fromarray(rgb_u8).save(buffer, format=file_format, quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.convert("RGB")


def apply_condition(rgb: NDArray[np.float32], condition: Condition) -> Image.Image:
    """Pixels of an image as seen under one evaluation condition, as a fresh PIL image without metadata.

    - native: the decoded pixels at native resolution, no metadata (provenance cannot decide anything);
    - crop512_jpeg90: centre crop of at most 512 px, never resized, re-encoded as JPEG quality 90 (both
      classes);
    - crop512_png: the same crop stored losslessly.
    """
    if condition == "native":
        return Image.fromarray(to_uint8(rgb))
    cropped = to_uint8(_centre_crop(rgb, EVAL_CROP))
    if condition == "crop512_jpeg90":
        return reencode(cropped, "JPEG", EVAL_JPEG_QUALITY)
    if condition == "crop512_png":
        return reencode(cropped, "PNG")
    raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")


@dataclass
class PixelCache:
    """Decoded images kept as uint8 HxWx3 arrays, saved as one tensor file (loadable with
    weights_only=True).
    """

    images: list[NDArray[np.uint8]]
    rows: list[ManifestRow]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = torch.tensor([img.shape[:2] for img in self.images], dtype=torch.int64)
        flat = torch.from_numpy(np.concatenate([img.reshape(-1) for img in self.images]))
        torch.save({"pixels": flat, "shapes": shapes, "paths": [str(row.path) for row in self.rows]}, path)

    @classmethod
    def load(cls, path: Path, rows: Sequence[ManifestRow]) -> PixelCache:
        """Load a cache built for exactly these rows (checked by path), else raise ManifestError."""
        data = torch.load(path, weights_only=True)
        if data["paths"] != [str(row.path) for row in rows]:
            raise ManifestError(f"pixel cache {path} was built from another manifest")
        flat = data["pixels"].numpy()
        images: list[NDArray[np.uint8]] = []
        offset = 0
        for height, width in data["shapes"].tolist():
            size = height * width * 3
            images.append(flat[offset : offset + size].reshape(height, width, 3))
            offset += size
        return cls(images=images, rows=list(rows))


def build_pixel_cache(rows: Sequence[ManifestRow], path: Path | None = None) -> PixelCache:
    """Decode every image once (the slow part), reusing `path` if it already holds this manifest's pixels."""
    if path is not None and path.is_file():
        try:
            return PixelCache.load(path, rows)
        except ManifestError:
            pass
    cache = PixelCache(images=[to_uint8(load_rgb(row.path)) for row in rows], rows=list(rows))
    if path is not None:
        cache.save(path)
    return cache
