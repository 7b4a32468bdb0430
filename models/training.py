"""Train the detector from a labelled manifest: `synthguard train MANIFEST --out DIR`.

Recipe (the reasons are in MODEL_CARD.md):
1. Decode every image once into a uint8 pixel cache (`runs/cache/`), optionally add taef2 reconstructions
   of the
   real training photos as extra "generated" images with the same content.
2. Hold out a calibration split (a fixed fraction of every source) that the CNN never trains on.
3. Train `ResidualNet` on random 64x64 native crops, balanced between the classes. Every augmentation is drawn
   the same way for both classes, so no class can be recognised by how it was stored:
   - crop offsets on the 8-pixel lattice (most of the time), so the newest JPEG block grid has the same
     phase in
     every crop and in every crop the detector reads later; a minority of crops start off-lattice, so an
     older,
     misaligned JPEG grid (a cropped-then-resaved photo) is seen in both classes too;
   - lossless sources (PNG, reconstructions) get a JPEG "history" with the probability that web images have
     one,
     applied by file format whatever the class, so that "never compressed" is not a proxy for "generated";
   - then a random final JPEG re-compression (random quality, sometimes none) and a random horizontal flip.
   Optional, off in the shipped recipe: a Gaussian blur (`Augmentation.blur_p`), a rescaling history
   (`Augmentation.resize_p`) and a drawn chroma subsampling of every JPEG step
   (`Augmentation.chroma_subsampling`), all drawn alike for both classes. Resampling happens only to
   training crops; the detector itself never resizes what it analyses.
   Image size, aspect ratio, file format and metadata never reach the network: it only sees fixed-size crops.
4. Fit the fusion (CNN logit -> calibrated score; the hand-made evidence features join it only with
   `evidence_in_score`) by logistic regression on the calibration split under the three evaluation conditions,
   then set the thresholds from the calibration REAL images only (`real_thresholds`): "uncertain" from their
   95th percentile score, "generated" a margin above their 99th percentile, because photos from a source the
   model never saw score higher than its own calibration photos.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from models._scoring import Fusion, cnn_outputs, crop_tensor, fit_fusion, resolve_device
from models.data import (
    CONDITIONS,
    LOSSLESS_FORMATS,
    ManifestError,
    ManifestRow,
    apply_condition,
    build_pixel_cache,
    read_manifest,
    to_uint8,
)
from models.errors import DetectorError
from models.nets import FAMILIES, NetConfig, ResidualNet
from models.preprocess import CROP_ALIGN, crop_texture

WEIGHTS_FORMAT = "synthguard-weights/1"
CROP_SIZE = 64
DEFAULT_MAX_CROPS = 8

Log = Callable[[str], None]

#: Chosen by leaving each of the three largest real sources out (no generated image involved): at the bare
#: 99th percentile of the calibration reals 4.7% of the unseen camera JPEGs were flagged, at this margin 1.9%
#: (and at most 1% of the other two sources); see MODEL_CARD.md.
GENERATED_MARGIN = 1.0


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and ranges of the augmentations; identical for both classes."""

    lossless_history_p: float = 0.8
    history_quality: tuple[int, int] = (70, 100)
    final_jpeg_p: float = 0.65
    final_quality: tuple[int, int] = (60, 100)
    off_lattice_p: float = 0.15
    #: Gaussian blur of the crop (sigma drawn from `blur_sigma`, before any JPEG step), both classes alike:
    #: web copies are often softened by resampling, which a model should not read as "real" or "generated".
    #: 0 in the shipped recipe; when 0, no random number is drawn for it, so older recipes repeat exactly.
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.2, 1.5)
    #: Gaussian noise added to the crop (sigma drawn from `noise_sigma`, in grey levels of 255, after any
    #: blur and before any JPEG step), both classes alike: a camera photo's sensor noise is missing from a
    #: downscaled web copy as from a generated image, so its presence alone should not decide the class.
    #: 0 in the shipped recipe; when 0, no random number is drawn for it, so older recipes repeat exactly.
    noise_p: float = 0.0
    noise_sigma: tuple[float, float] = (0.5, 3.0)
    #: Rescaling "history", both classes alike: a region of size/scale pixels (scale drawn from
    #: `resize_scale`, clipped to the image) is resampled to the crop size, and the crop then counts as
    #: lossless (it gets a JPEG history like any lossless image), because resampling erased whatever JPEG
    #: grid it had. Web copies of photos and of generated images alike are often downscaled (ImageNet's
    #: photos are), so resampling traces should not decide the class. 0 in the shipped recipe; when 0, no
    #: random number is drawn for it, so older recipes repeat exactly.
    resize_p: float = 0.0
    resize_scale: tuple[float, float] = (0.5, 1.0)
    #: Chroma subsampling of every JPEG step (Pillow's codes: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0), one drawn per
    #: step, both classes alike. The dev set's JPEG sources differ by it (its web photos are mostly 4:4:4,
    #: its camera photos mostly 4:2:2, two generated sources 4:4:4), while Pillow's default is always 4:2:0,
    #: so chroma resolution is a trace of the saving software that can stand for a source. Empty in the
    #: shipped recipe (Pillow's default); when empty, no random number is drawn for it.
    chroma_subsampling: tuple[int, ...] = ()
    #: The crop is the most textured (`preprocess.crop_texture`) of this many positions drawn alike, both
    #: classes alike: the CNN's log-odds say little on flat crops (MODEL_CARD.md, "Which crops the detector
    #: reads"). 1 in the shipped recipe: one position is drawn, as before this option existed.
    texture_candidates: int = 1
    #: Colour saturation of the crop scaled about its luma (BT.601) by a factor drawn from
    #: `saturation_range` (0 would be grey), after any noise and before any JPEG step, both classes alike:
    #: the dev set's generated images are mostly saturated prompted art and its photos everyday scenes, so a
    #: palette can stand for a class. 0 in the shipped recipe; when 0, no random number is drawn for it.
    saturation_p: float = 0.0
    saturation_range: tuple[float, float] = (0.25, 1.5)
    #: The crop's colour channels in a random order (one of the six), before any JPEG step, both classes
    #: alike: a palette cue taken away more bluntly than by `saturation_p` (the residual of each channel is
    #: kept, but no longer in its own place). 0 in the shipped recipe; when 0, no random number is drawn.
    channel_shuffle_p: float = 0.0
    flip_p: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved into the weights file)."""

    steps: int = 3500
    max_minutes: float = 55.0
    #: Seeds the calibration split (and, in leave-one-source-out, which images are held back for testing).
    seed: int = 0
    #: Seeds the network's initial weights and the training draws; None uses `seed`. Two runs that differ
    #: only here see the same data splits, so their models can be compared or averaged image by image.
    init_seed: int | None = None
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    crop_size: int = CROP_SIZE
    max_crops: int = DEFAULT_MAX_CROPS
    #: At detection (and calibration), 0 reads `max_crops` crops spread evenly over the image; N > max_crops
    #: lays out N grid candidates and reads the `max_crops` most textured (`preprocess.textured_crops`).
    #: Training crops are drawn at random either way.
    crop_candidates: int = 0
    calibration_fraction: float = 0.15
    reconstruction_share: float = 0.25
    reconstruction_side: int = 192
    #: Every reconstruction drawn into a batch brings its real photo along: the same region, cropped at the
    #: same position with the same flips and JPEG steps, in place of one of the batch's real draws. The two
    #: crops then differ only by the autoencoder's trace, not by content (dataset alignment, Rajan et al.,
    #: ICLR 2025). Off in the shipped recipe; when off, batches are drawn exactly as before it existed.
    paired_reconstructions: bool = False
    #: An image's draw weight within its class is (size of its source) ** -source_weight_power: 0 draws every
    #: image alike (since 1.2.0), 0.5 damps a large source (1.1.0), 1.0 gives every source the same share.
    #: Chosen over 0.5 by leaving each of eight sources out, over two seeds (MODEL_CARD.md).
    source_weight_power: float = 0.0
    exclude_sources: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()
    net: NetConfig = field(default_factory=NetConfig)
    augmentation: Augmentation = field(default_factory=Augmentation)
    threads: int = 1
    #: "cpu" for the shipped recipe; "cuda" trains the same recipe on a GPU (leave-one-source-out sweeps).
    device: str = "cpu"
    #: How far above the calibration reals' 99th percentile the "generated" threshold sits, in units of their
    #: logit spread (99th minus 90th percentile); see `real_thresholds`.
    generated_margin: float = GENERATED_MARGIN
    #: Whether the hand-made evidence features enter the score beside the CNN. Off in the shipped recipe: on
    #: sources left out of training the evidence pointed the wrong way (see MODEL_CARD.md). It is still
    #: computed and shown to reviewers.
    evidence_in_score: bool = False
    #: From this fraction of `steps` on, the learning rate stays where the cosine schedule is at that step
    #: and the weights after every later step are averaged (stochastic weight averaging, Izmailov et al.,
    #: UAI 2018, at every step as SWAD does for unseen domains, Cha et al., NeurIPS 2021); the averaged
    #: network's batch-norm statistics are then measured again on `bn_refresh_batches` training batches.
    #: 1.0 (off) in the shipped recipe; when off, training runs exactly as before the option existed.
    average_weights_from: float = 1.0
    bn_refresh_batches: int = 100


@dataclass
class Sample:
    """One training image: pixels, class family, and whether its storage was lossless."""

    pixels: NDArray[np.uint8]
    family: int
    lossless: bool
    source: str
    is_reconstruction: bool = False
    #: For a reconstruction, the real pixels it was made from (the same region, the same shape).
    partner: NDArray[np.uint8] | None = None


def _jpeg(pixels: NDArray[np.uint8], quality: int, subsampling: int | None = None) -> NDArray[np.uint8]:
    buffer = io.BytesIO()
    options: dict[str, int] = {} if subsampling is None else {"subsampling": subsampling}
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _recompress(
    pixels: NDArray[np.uint8], quality: tuple[int, int], aug: Augmentation, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """One JPEG step of the augmentation: a quality from `quality`, a chroma subsampling when the recipe
    draws one."""
    drawn_quality = int(rng.integers(quality[0], quality[1] + 1))
    if not aug.chroma_subsampling:
        return _jpeg(pixels, drawn_quality)
    subsampling = aug.chroma_subsampling[int(rng.integers(len(aug.chroma_subsampling)))]
    return _jpeg(pixels, drawn_quality, subsampling)


def augmented_crop(
    sample: Sample, size: int, aug: Augmentation, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """One training crop; see the module docstring for why each step is there."""
    pixels = sample.pixels
    height, width = pixels.shape[:2]
    lossless = sample.lossless
    if aug.resize_p > 0 and rng.random() < aug.resize_p:
        scale = float(rng.uniform(*aug.resize_scale))
        region = min(round(size / scale), height, width)
        top = int(rng.integers(0, height - region + 1))
        left = int(rng.integers(0, width - region + 1))
        source = Image.fromarray(np.ascontiguousarray(pixels[top : top + region, left : left + region]))
        # Pillow's bicubic resize widens its kernel when reducing, so the downscale is antialiased.
        crop = np.asarray(source.resize((size, size), Image.Resampling.BICUBIC))
        lossless = True
    else:
        step = 1 if rng.random() < aug.off_lattice_p else CROP_ALIGN
        crop = _textured_position(pixels, size, step, aug.texture_candidates, rng)
    if rng.random() < aug.flip_p:
        crop = np.ascontiguousarray(crop[:, ::-1])
    if aug.blur_p > 0 and rng.random() < aug.blur_p:
        radius = float(rng.uniform(*aug.blur_sigma))  # Pillow's GaussianBlur radius is the sigma
        crop = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius)))
    if aug.noise_p > 0 and rng.random() < aug.noise_p:
        sigma = float(rng.uniform(*aug.noise_sigma))
        noisy = crop.astype(np.float32) + rng.normal(0.0, sigma, crop.shape).astype(np.float32)
        crop = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if aug.saturation_p > 0 and rng.random() < aug.saturation_p:
        crop = _scaled_saturation(crop, float(rng.uniform(*aug.saturation_range)))
    if aug.channel_shuffle_p > 0 and rng.random() < aug.channel_shuffle_p:
        crop = np.ascontiguousarray(crop[:, :, rng.permutation(3)])
    if lossless and rng.random() < aug.lossless_history_p:
        crop = _recompress(crop, aug.history_quality, aug, rng)
    if rng.random() < aug.final_jpeg_p:
        crop = _recompress(crop, aug.final_quality, aug, rng)
    return crop


#: BT.601 luma weights of R, G, B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _scaled_saturation(crop: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    """`crop` with each pixel's distance from its own luma scaled by `factor` (luma kept, up to rounding)."""
    pixels = crop.astype(np.float32)
    luma = pixels @ LUMA_WEIGHTS
    scaled = luma[..., None] + factor * (pixels - luma[..., None])
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _textured_position(
    pixels: NDArray[np.uint8], size: int, step: int, candidates: int, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """A crop at a random multiple of `step`; with `candidates` > 1, the most textured of that many."""
    height, width = pixels.shape[:2]
    crops = []
    for _ in range(max(1, candidates)):
        top = step * int(rng.integers(0, (height - size) // step + 1))
        left = step * int(rng.integers(0, (width - size) // step + 1))
        crops.append(pixels[top : top + size, left : left + size])
    if len(crops) == 1:
        return np.ascontiguousarray(crops[0])
    texture = [crop_texture(crop.astype(np.float32) / np.float32(255.0)) for crop in crops]
    return np.ascontiguousarray(crops[int(np.argmax(texture))])


def split_calibration(rows: Sequence[ManifestRow], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, calibration): `fraction` of every source, drawn with `seed`, goes to calibration."""
    rng = np.random.default_rng(seed + 7919)
    by_source: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_source.setdefault(row.source, []).append(index)
    train: list[int] = []
    calibration: list[int] = []
    for source in sorted(by_source):
        members = by_source[source]
        order = rng.permutation(len(members))
        n_cal = round(len(members) * fraction)
        if n_cal == 0 and fraction > 0 and len(members) >= 3:
            n_cal = 1  # every source of some size is represented when the thresholds are set
        calibration += [members[i] for i in order[:n_cal]]
        train += [members[i] for i in order[n_cal:]]
    return sorted(train), sorted(calibration)


def reconstructions(
    pixels: Sequence[NDArray[np.uint8]],
    keys: Sequence[str],
    *,
    taef2_dir: Path,
    side: int,
    cache_path: Path,
    log: Log,
    device: str = "cpu",
) -> list[NDArray[np.uint8]]:
    """taef2 encode->decode of a centred crop (at most `side`, multiple of 8) of each image, cached by key."""
    from models.taef2 import TinyAutoencoder  # noqa: PLC0415 - only training needs the autoencoder

    cached: dict[str, NDArray[np.uint8]] = {}
    if cache_path.is_file():
        stored = torch.load(cache_path, weights_only=True)
        cached = {key: tensor.numpy() for key, tensor in stored.items()}
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if missing:
        model = TinyAutoencoder.from_dir(taef2_dir).to(device)
        log(f"reconstructing {len(missing)} real images through taef2 (cached in {cache_path})")
        for done, index in enumerate(missing, start=1):
            crop = reconstructed_region(pixels[index], side)
            x = torch.from_numpy(crop.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
            y = model.reconstruct(x)[0].permute(1, 2, 0).cpu().numpy()
            cached[keys[index]] = to_uint8(y)
            if done % 100 == 0:
                log(f"  {done}/{len(missing)}")
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({key: torch.from_numpy(value) for key, value in cached.items()}, cache_path)
    return [cached[key] for key in keys]


def reconstructed_region(image: NDArray[np.uint8], side: int) -> NDArray[np.uint8]:
    """The centred region of `image` that `reconstructions` encodes: at most `side`, a multiple of 8."""
    height, width = image.shape[:2]
    crop_h, crop_w = min(side, height) // 8 * 8, min(side, width) // 8 * 8
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


def _batch(
    samples: Sequence[Sample],
    *,
    probabilities: NDArray[np.float64],
    size: int,
    batch_size: int,
    aug: Augmentation,
    rng: np.random.Generator,
    paired: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    drawn = [samples[int(i)] for i in rng.choice(len(samples), size=batch_size, p=probabilities)]
    twins = _twins(drawn) if paired else {}
    twin_slots = {slot for slot, _ in twins.values()}
    crops = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    labels = np.array([sample.family for sample in drawn], dtype=np.int64)
    for i, sample in enumerate(drawn):
        if i in twin_slots:
            continue
        if i in twins:
            # A copy of the generator replays this crop's draws: same position, flip and JPEG steps.
            slot, twin = twins[i]
            crops[slot] = augmented_crop(twin, size, aug, copy.deepcopy(rng))
            labels[slot] = 0
        crops[i] = augmented_crop(sample, size, aug, rng)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
    return x, torch.from_numpy(labels)


def _twins(drawn: Sequence[Sample]) -> dict[int, tuple[int, Sample]]:
    """Slot of a drawn reconstruction -> (slot of a real draw, its real photo as a sample to crop there).

    Each reconstruction with a partner takes one real slot (last first) while any are left. The twin keeps
    the reconstruction's `lossless` flag so that both crops take the same augmentation branches.
    """
    real_slots = [i for i, sample in enumerate(drawn) if sample.family == 0]
    twins: dict[int, tuple[int, Sample]] = {}
    for i, sample in enumerate(drawn):
        if sample.is_reconstruction and sample.partner is not None and real_slots:
            twin = replace(sample, pixels=sample.partner, family=0, is_reconstruction=False, partner=None)
            twins[i] = (real_slots.pop(), twin)
    return twins


def sampling_probabilities(
    samples: Sequence[Sample],
    crop_size: int,
    reconstruction_share: float,
    *,
    source_weight_power: float,
) -> NDArray[np.float64]:
    """Per-image probability of being drawn: half real, half generated (reconstructions take their share of
    the generated half), and within each part an image's weight is (size of its source) **
    -source_weight_power (0: every image alike; 0.5: 1/sqrt damps one large source; 1: every source alike).

    Raises:
        ManifestError: a class has no image large enough for a crop.
    """
    usable = np.array([min(s.pixels.shape[:2]) >= crop_size for s in samples])
    parts = {
        "real": np.array([s.family == 0 for s in samples]),
        "generated": np.array([s.family != 0 and not s.is_reconstruction for s in samples]),
        "reconstruction": np.array([s.is_reconstruction for s in samples]),
    }
    shares = {
        "real": 0.5,
        "generated": 0.5 * (1 - reconstruction_share),
        "reconstruction": 0.5 * reconstruction_share,
    }
    if not (parts["reconstruction"] & usable).any():
        shares["generated"] = 0.5
        shares["reconstruction"] = 0.0
    if not (parts["generated"] & usable).any():
        shares["reconstruction"] = 0.5 if shares["reconstruction"] else 0.0
        shares["generated"] = 0.0
    if not (parts["real"] & usable).any() or shares["generated"] + shares["reconstruction"] == 0:
        raise ManifestError(f"training needs real and generated images of at least {crop_size} px")
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.source] = counts.get(sample.source, 0) + 1
    base = np.array([1.0 / counts[s.source] ** source_weight_power for s in samples]) * usable
    probabilities = np.zeros(len(samples))
    for name, mask in parts.items():
        part = base * mask
        if part.sum() > 0:
            probabilities += shares[name] * part / part.sum()
    normalised: NDArray[np.float64] = probabilities / probabilities.sum()
    return normalised


def train_net(
    samples: Sequence[Sample],
    config: TrainConfig,
    log: Log,
) -> ResidualNet:
    """Train the CNN on `samples` for `config.steps` steps (or until `max_minutes`), cosine learning rate."""
    init_seed = config.seed if config.init_seed is None else config.init_seed
    torch.manual_seed(init_seed)
    rng = np.random.default_rng(init_seed)
    probabilities = sampling_probabilities(
        samples, config.crop_size, config.reconstruction_share, source_weight_power=config.source_weight_power
    )
    device = torch.device(config.device)
    net = ResidualNet(config.net).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    # The step from which the weights are averaged (and the learning rate held); None: no averaging.
    average_from = (
        int(config.steps * config.average_weights_from) if config.average_weights_from < 1.0 else None
    )
    if average_from is not None and config.bn_refresh_batches < 1:
        # Averaged weights with the batch-norm statistics reset and never measured would score nonsense.
        raise ValueError("average_weights_from needs bn_refresh_batches >= 1")
    averaged: torch.optim.swa_utils.AveragedModel | None = None
    started = time.monotonic()
    net.train()
    running = 0.0

    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(
            samples,
            probabilities=probabilities,
            size=config.crop_size,
            batch_size=config.batch_size,
            aug=config.augmentation,
            rng=rng,
            paired=config.paired_reconstructions,
        )

    for step in range(config.steps):
        schedule_step = step if average_from is None else min(step, average_from)
        lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * schedule_step / config.steps))
        for group in optimiser.param_groups:
            group["lr"] = lr
        x, y = draw_batch()
        loss = F.cross_entropy(net(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        if average_from is not None and step >= average_from:
            if averaged is None:
                averaged = torch.optim.swa_utils.AveragedModel(net)
            averaged.update_parameters(net)
        value = loss.item()
        running = 0.98 * running + 0.02 * value if step else value
        elapsed = time.monotonic() - started
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step}/{config.steps} loss {running:.4f} lr {lr:.2e} {elapsed / 60:.1f} min")
        if elapsed > config.max_minutes * 60:
            log(f"stopping at step {step}: the {config.max_minutes} min budget is spent")
            break
    if averaged is not None:
        net.load_state_dict(averaged.module.state_dict())
        log(f"averaged the weights of {int(averaged.n_averaged)} steps")
        # Averaged weights are a network no step trained: the batch-norm running statistics kept during
        # training belong to the individual networks, so they are measured again, as a plain mean.
        fresh_batches = (draw_batch()[0] for _ in range(config.bn_refresh_batches))
        torch.optim.swa_utils.update_bn(fresh_batches, net, device=device)
    return net.eval()


def _rgb_float(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    return pixels.astype(np.float32) / np.float32(255.0)


#: Evidence features the fusion never uses: they measure whether and how the file was JPEG-compressed,
#: which is a property of how an image was stored, not of how it was made (the format shortcut the dataset
#: warns about).
COMPRESSION_FEATURES = frozenset({"grid.jpeg_blockiness", "grid.jpeg_phase_share"})

#: Variants per calibration image used to fit the fusion (each with a training-style compression history).
FUSION_VARIANTS = 3


def image_inputs(pixels: NDArray[np.uint8], config: TrainConfig) -> tuple[torch.Tensor, NDArray[np.float32]]:
    """Crops and evidence features of one image, computed by the detector's own code."""
    from models.detector import evidence_vector  # noqa: PLC0415 - avoids an import cycle at module load

    rgb = _rgb_float(pixels)
    crops = crop_tensor(rgb, config.crop_size, config.max_crops, candidates=config.crop_candidates)
    return crops, evidence_vector(rgb)[1]


def condition_pixels(pixels: NDArray[np.uint8], condition: str) -> NDArray[np.uint8]:
    image = apply_condition(_rgb_float(pixels), condition)  # type: ignore[arg-type]
    return np.asarray(image.convert("RGB"))


def history_variant(
    pixels: NDArray[np.uint8], lossless: bool, aug: Augmentation, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """The whole image with the training augmentation's compression history (same draws for both classes)."""
    out = pixels
    if lossless and rng.random() < aug.lossless_history_p:
        out = _recompress(out, aug.history_quality, aug, rng)
    if rng.random() < aug.final_jpeg_p:
        out = _recompress(out, aug.final_quality, aug, rng)
    return out


def _fused_scores(
    fusion: Fusion, cnn: NDArray[np.float32], features: Sequence[NDArray[np.float32]]
) -> NDArray[Any]:
    fused = np.array([fusion.logit(float(c), f) for c, f in zip(cnn, features, strict=True)])
    scores: NDArray[Any] = 1.0 / (1.0 + np.exp(-fused))
    return scores


def calibrate(
    net: ResidualNet,
    pixels: Sequence[NDArray[np.uint8]],
    labels: Sequence[int],
    *,
    lossless: Sequence[bool],
    config: TrainConfig,
    log: Log,
) -> tuple[Fusion, dict[str, float], dict[str, Any]]:
    """Fit the fusion on the calibration images, then set the thresholds from their real images only.

    The fusion is fitted on variants carrying the training augmentation's compression history, so that, as for
    the CNN, "was it ever JPEG-compressed" cannot separate the classes. Without `evidence_in_score` the fusion
    is a Platt scaling of the CNN's log-odds. The thresholds are then read off the calibration reals under the
    three evaluation conditions (`real_thresholds`).
    """
    from models.evidence import FEATURE_NAMES  # noqa: PLC0415

    rng = np.random.default_rng(config.seed + 31337)
    used = [
        i
        for i, name in enumerate(FEATURE_NAMES)
        if config.evidence_in_score and name not in COMPRESSION_FEATURES
    ]
    fit_crops: list[torch.Tensor] = []
    fit_features: list[NDArray[np.float32]] = []
    fit_labels: list[int] = []
    eval_crops: list[torch.Tensor] = []
    eval_features: list[NDArray[np.float32]] = []
    eval_labels: list[int] = []
    for image, label, is_lossless in zip(pixels, labels, lossless, strict=True):
        if min(image.shape[:2]) < config.crop_size:
            continue
        for _ in range(FUSION_VARIANTS):
            variant = history_variant(image, is_lossless, config.augmentation, rng)
            crop, feature = image_inputs(variant, config)
            fit_crops.append(crop)
            fit_features.append(feature[used])
            fit_labels.append(label)
        for condition in CONDITIONS:
            crop, feature = image_inputs(condition_pixels(image, condition), config)
            eval_crops.append(crop)
            eval_features.append(feature[used])
            eval_labels.append(label)
    device = torch.device(config.device)
    fit_cnn = np.array([o.logit for o in cnn_outputs(net, fit_crops, device)], dtype=np.float32)
    eval_cnn = np.array([o.logit for o in cnn_outputs(net, eval_crops, device)], dtype=np.float32)
    fusion = fit_fusion(
        fit_cnn,
        np.stack(fit_features),
        np.array(fit_labels, dtype=np.int64),
        [FEATURE_NAMES[i] for i in used],
    )
    eval_y = np.array(eval_labels, dtype=np.int64)
    scores = _fused_scores(fusion, eval_cnn, eval_features)
    thresholds = real_thresholds(scores[eval_y == 0], config.generated_margin)
    stats: dict[str, Any] = {
        "calibration_images": len(eval_labels) // len(CONDITIONS),
        "calibration_reals": int((eval_y == 0).sum()) // len(CONDITIONS),
        "real_score_quantiles": {
            f"q{q}": float(np.quantile(scores[eval_y == 0], q / 100)) for q in (50, 90, 95, 99)
        },
        "fusion_fit_auc": roc_auc(np.array(fit_labels), _fused_scores(fusion, fit_cnn, fit_features)),
    }
    n = len(CONDITIONS)
    for k, condition in enumerate(CONDITIONS):
        stats[f"cnn_auc_{condition}"] = roc_auc(eval_y[k::n], eval_cnn[k::n])
        stats[f"fused_auc_{condition}"] = roc_auc(eval_y[k::n], scores[k::n])
    log(f"calibration: {stats}; thresholds {thresholds}")
    return fusion, thresholds, stats


def real_thresholds(real_scores: NDArray[Any], margin: float) -> dict[str, float]:
    """Verdict thresholds read off the calibration REAL images' scores only (never the generated ones).

    "uncertain" starts at their 95th percentile. "generated" sits `margin` logit spreads above their 99th
    percentile, the spread being the distance from their 90th to their 99th percentile in logit space (the
    fusion's own scale). The percentile alone is calibrated on the sources the model was trained beside; a
    source it never saw sits higher, and a false accusation costs more than a missed generated image.
    """
    if len(real_scores) == 0:
        raise ManifestError("no calibration real images: the thresholds cannot be set")
    logits = np.log(np.clip(real_scores, 1e-7, 1 - 1e-7) / np.clip(1 - real_scores, 1e-7, None))
    q90, q99 = np.quantile(logits, [0.90, 0.99])
    generated_logit = q99 + margin * max(q99 - q90, 0.0)
    return {
        "generated": float(1.0 / (1.0 + np.exp(-generated_logit))),
        "uncertain": float(np.quantile(real_scores, 0.95)),
    }


def roc_auc(labels: NDArray[np.int64], scores: NDArray[Any]) -> float:
    """Mann-Whitney ROC AUC (ties count one half); NaN when a class is missing."""
    from models.evaluation import roc_auc as _auc  # noqa: PLC0415

    return _auc(labels, scores)


def training_device(name: str) -> str:
    """The device `name` resolves to here ("auto" included), refused before any work if training can't use it.

    Raises:
        DetectorError: not a device this machine has, or not one training supports (cpu, cuda).
    """
    try:
        device = resolve_device(name)
    except DetectorError as exc:
        raise DetectorError(f"training device {name!r}: {exc}") from exc
    if device.type not in {"cpu", "cuda"}:
        raise DetectorError(f"training device {name!r} is not supported: use cpu or cuda")
    return str(device)


def pixel_cache_path(rows: Sequence[ManifestRow], cache_dir: Path) -> Path:
    """Where the decoded pixels of exactly these manifest rows are cached (keyed by their paths, in order)."""
    digest = hashlib.sha256("\n".join(str(r.path) for r in rows).encode()).hexdigest()
    return cache_dir / f"pixels-{digest[:16]}.pt"


def training_split(rows: Sequence[ManifestRow], config: TrainConfig) -> tuple[list[int], list[int]]:
    """Manifest indices of the training and calibration images: every row that is not excluded by source or
    path and not marked `test`, split per source by `split_calibration`."""
    excluded_sources = set(config.exclude_sources)
    excluded_paths = {str(Path(p)) for p in config.exclude_paths}
    unknown = excluded_sources - {row.source for row in rows}
    if unknown:
        raise ManifestError(
            f"--exclude-source {sorted(unknown)} matches no source; sources look like 'fake:<repo>'"
        )
    keep = [
        i
        for i, row in enumerate(rows)
        if row.source not in excluded_sources and str(row.path) not in excluded_paths and row.split != "test"
    ]
    kept_rows = [rows[i] for i in keep]
    train_local, cal_local = split_calibration(kept_rows, config.calibration_fraction, config.seed)
    train_idx = [keep[i] for i in train_local]
    cal_idx = [keep[i] for i in cal_local]
    if {rows[i].label for i in cal_idx} != {"real", "fake"}:
        raise ManifestError(
            "the calibration split needs real and generated images (sources of at least 3 images each)"
        )
    return train_idx, cal_idx


def train(
    manifest: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    taef2_dir: Path | None = None,
    cache_dir: Path = Path("runs/cache"),
    log: Log = print,
) -> Path:
    """Train, calibrate and save `out_dir/weights.pt` (+ `train_summary.json`); returns the weights path.

    Raises:
        ManifestError: the manifest is unusable or leaves one class empty.
        DetectorError: `config.device` is not a device this machine has.
    """
    config = replace(config, device=training_device(config.device))
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    rows = read_manifest(manifest)
    cache = build_pixel_cache(rows, pixel_cache_path(rows, cache_dir))
    train_idx, cal_idx = training_split(rows, config)
    log(
        f"{len(train_idx)} training images, {len(cal_idx)} calibration images, "
        f"{len(rows) - len(train_idx) - len(cal_idx)} excluded"
    )
    samples = [
        Sample(
            pixels=cache.images[i],
            family=rows[i].family,
            lossless=rows[i].file_format in LOSSLESS_FORMATS,
            source=rows[i].source,
        )
        for i in train_idx
    ]
    n_recon = 0
    if taef2_dir is not None:
        real_idx = [i for i in train_idx if not rows[i].is_fake]
        recon = reconstructions(
            [cache.images[i] for i in real_idx],
            [str(rows[i].path) for i in real_idx],
            taef2_dir=taef2_dir,
            side=config.reconstruction_side,
            cache_path=cache_dir / f"taef2-{config.reconstruction_side}.pt",
            log=log,
            device=config.device,
        )
        samples += [
            Sample(
                pixels=p,
                family=1,
                lossless=True,
                source="taef2",
                is_reconstruction=True,
                partner=reconstructed_region(cache.images[i], config.reconstruction_side),
            )
            for i, p in zip(real_idx, recon, strict=True)
        ]
        n_recon = len(recon)
    net = train_net(samples, config, log)
    summary: dict[str, Any] = {
        "manifest": str(manifest),
        "training_images": len(train_idx),
        "reconstructions": n_recon,
    }
    calibration = [(cache.images[i], rows[i]) for i in cal_idx]
    return _calibrate_and_save(net, calibration, summary, config, out_dir=out_dir, started=started, log=log)


def recalibrate(
    weights: Path,
    manifest: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    cache_dir: Path = Path("runs/cache"),
    log: Log = print,
) -> Path:
    """Calibrate a trained network again under `config`'s detection-time settings (crop choice, threshold
    margin, evidence fusion) and save it as `out_dir/weights.pt`; the network's tensors are unchanged.

    `config` must be the network's training config up to `DETECTION_TIME_FIELDS` (checked against the config
    saved in the weights), so that the calibration split is the one the network was trained beside; the
    saved summary names the source file.

    Raises:
        WeightsError: `weights` is missing or unreadable.
        ValueError: `config` differs from the network's training config in a training setting.
        ManifestError: the manifest is unusable.
    """
    from models.detector import detector_from_weights  # noqa: PLC0415 - avoids an import cycle at load

    config = replace(config, device=training_device(config.device))
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    # Loaded as the detector loads it (checked, strict, in eval mode, so calibrating cannot move the
    # batch-norm statistics), on the CPU in full precision, then moved where the calibration runs.
    detector = detector_from_weights(weights, device="cpu")
    trained = detector.training_info
    differing = training_differences(trained.get("config", {}), config)
    if differing:
        raise ValueError(
            f"{weights} was trained with other settings than the config asks for ({', '.join(differing)}); "
            "recalibrating changes only detection-time settings"
        )
    net = detector.net.to(config.device)
    rows = read_manifest(manifest)
    cache = build_pixel_cache(rows, pixel_cache_path(rows, cache_dir))
    _, cal_idx = training_split(rows, config)
    kept = ("manifest", "training_images", "reconstructions")
    summary = {key: trained[key] for key in kept if key in trained}
    summary["recalibrated_from"] = {"path": str(weights), "sha256": detector.cfg.weights_sha256}
    calibration = [(cache.images[i], rows[i]) for i in cal_idx]
    return _calibrate_and_save(net, calibration, summary, config, out_dir=out_dir, started=started, log=log)


#: `TrainConfig` fields that act only after training (crop reading, calibration, thresholds) or on how a run
#: is executed, not on the network it trains.
DETECTION_TIME_FIELDS = frozenset(
    {"crop_candidates", "max_crops", "generated_margin", "evidence_in_score"}
    | {"device", "threads", "max_minutes"}
)


def _as_json(config: TrainConfig) -> dict[str, Any]:
    return dict(json.loads(json.dumps(_jsonable(asdict(config)))))


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the settings it lacks taken from `defaults`: a weights file saved before a setting existed
    was trained as its default."""
    merged = dict(defaults)
    for name, value in saved.items():
        default = defaults.get(name)
        merged[name] = (
            _with_defaults(value, default) if isinstance(value, dict) and isinstance(default, dict) else value
        )
    return merged


def saved_training_config(saved: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` a config saved with weights (as JSON) describes; settings it lacks take their
    defaults, as the network was trained with them. `recalibrate` with it (and other detection-time
    settings) reuses the network's own calibration split.

    Raises:
        ValueError: `saved` names a setting this version does not know.
    """
    known = _with_defaults(saved, _as_json(TrainConfig()))
    unknown = sorted(set(known) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"the saved training config has settings this version does not know: {unknown}")
    values: dict[str, Any] = {}
    try:
        for item in fields(TrainConfig):
            value = known[item.name]
            if item.name == "net":
                value = NetConfig.from_dict(value)
            elif item.name == "augmentation":
                value = Augmentation(**{name: _tuples(v) for name, v in value.items()})
            values[item.name] = _tuples(value)
    except TypeError as exc:  # an unknown network or augmentation setting
        raise ValueError(f"the saved training config does not fit this version: {exc}") from exc
    return TrainConfig(**values)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def training_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Training settings in which `config` differs from a config saved with weights (as JSON)."""
    known = _with_defaults(saved, _as_json(TrainConfig()))
    return sorted(
        name
        for name, value in _as_json(config).items()
        if name not in DETECTION_TIME_FIELDS and known.get(name) != value
    )


def _calibrate_and_save(
    net: ResidualNet,
    calibration: Sequence[tuple[NDArray[np.uint8], ManifestRow]],
    summary: dict[str, Any],
    config: TrainConfig,
    *,
    out_dir: Path,
    started: float,
    log: Log,
) -> Path:
    """Calibrate `net` on the (pixels, row) calibration images, save the weights and the summary."""
    fusion, thresholds, stats = calibrate(
        net,
        [pixels for pixels, _ in calibration],
        [int(row.is_fake) for _, row in calibration],
        lossless=[row.file_format in LOSSLESS_FORMATS for _, row in calibration],
        config=config,
        log=log,
    )
    summary = {
        **summary,
        "calibration": stats,
        "excluded_sources": sorted(set(config.exclude_sources)),
        "minutes": round((time.monotonic() - started) / 60, 2),
        "config": _jsonable(asdict(config)),
        "torch": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "weights.pt"
    save_weights(
        weights_path,
        net,
        fusion=fusion,
        thresholds=thresholds,
        crop_size=config.crop_size,
        max_crops=config.max_crops,
        crop_candidates=config.crop_candidates,
        summary=summary,
    )
    (out_dir / "train_summary.json").write_text(
        json.dumps(summary | {"thresholds": thresholds}, indent=2) + "\n"
    )
    log(f"saved {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) after {summary['minutes']} min")
    return weights_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_weights(
    path: Path,
    net: ResidualNet,
    *,
    fusion: Fusion,
    thresholds: dict[str, float],
    crop_size: int,
    max_crops: int,
    summary: dict[str, Any],
    crop_candidates: int = 0,
) -> None:
    """Write a weights file that `torch.load(weights_only=True)` reads: tensors, numbers, strings, lists,
    dicts.
    """
    state = {key: value.detach().cpu().clone().contiguous() for key, value in net.state_dict().items()}
    payload = {
        "format": WEIGHTS_FORMAT,
        "families": list(FAMILIES),
        "net_config": net.config.to_dict(),
        "state_dict": state,
        "fusion": fusion.to_state(),
        "thresholds": dict(thresholds),
        "crop_size": crop_size,
        "max_crops": max_crops,
        "crop_candidates": crop_candidates,
        "training": json.loads(json.dumps(_jsonable(summary))),
    }
    torch.save(payload, path)
