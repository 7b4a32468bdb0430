"""Leave-one-source-out for several training recipes at once, one process per (recipe, fold).

Each fold is exactly what `synthguard eval MANIFEST --loso DIR` does (train without the source and without a
seeded 25% of the other class, calibrate on the fold's own calibration split, evaluate the held-out source
against that unseen 25%), with the recipe's full number of steps. On a GPU machine with many cores the
folds run side by side; on the 2-core CPU the same command works, slowly.

    python bench/loso_sweep.py ../shared/datasets/dev/manifest.csv --out runs/sweep \
        --taef2-dir ../shared/weights/taef2 --device cuda --jobs 14 --recipes shipped,crops32

Writes `OUT/<recipe>/<fold>/eval.json` and, after every finished fold, `OUT/sweep.json` (mean ROC AUC per
recipe and condition, and per fold the AUC and the held-out recall or false-positive rate), covering every
recipe and fold found under OUT, earlier runs' included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import build_pixel_cache, largest_sources, read_manifest
from models.evaluation import fold_dir_name, leave_one_source_out, summarise_folds
from models.nets import NetConfig
from models.training import Augmentation, TrainConfig, pixel_cache_path, reconstructions

#: How synthguard-v1 1.1.0 drew images within a class; the recipes measured against 1.1.0 keep it.
V1_1_DRAWS: dict[str, Any] = {"source_weight_power": 0.5}
#: 128 px crops instead of 64; 16 crops per batch keep the pixels per optimiser step, and so the time.
CROP128: dict[str, Any] = {"crop_size": 128, "batch_size": 16}
#: A rescaling history on 30% of the training crops of both classes (`Augmentation.resize_p`).
RESCALED: dict[str, Any] = {"augmentation": Augmentation(resize_p=0.3)}
#: AdamW weight decay 1e-2 (PyTorch's default) instead of the shipped 1e-4.
STRONG_DECAY: dict[str, Any] = {"weight_decay": 1e-2}
#: Half the shipped network's width everywhere (8 stem channels, 24 and 48 in the stages).
NARROW: dict[str, Any] = {"net": NetConfig(stem_channels=8, width=24)}
#: A bag of local patches (`NetConfig.local_head`): per-position logits averaged, receptive field 24 or 40 px.
LOCAL24: dict[str, Any] = {"net": NetConfig(local_head=1, blocks=1)}
LOCAL40: dict[str, Any] = {"net": NetConfig(local_head=1)}
#: Every reconstruction drawn brings its real photo, cropped alike (`TrainConfig.paired_reconstructions`).
PAIRED: dict[str, Any] = {"paired_reconstructions": True}

#: The last 40% of the steps at a held learning rate, their weights averaged
#: (`TrainConfig.average_weights_from`).
AVERAGED: dict[str, Any] = {"average_weights_from": 0.6}

#: Recipe name -> changes to the shipped `TrainConfig`. `shipped` is the recipe of the committed weights.
RECIPES: dict[str, dict[str, Any]] = {
    # The shipped recipe (`TrainConfig()`'s defaults): synthguard-v1 1.2.0's since 2026-12-07. The tables of
    # MODEL_CARD.md measured before then under the names `shipped` and `shipped_seed1` are 1.1.0's recipe,
    # now `sqrt` and `sqrt_seed1`.
    "shipped": {},
    # synthguard-v1 1.1.0's recipe: within a class an image is drawn with weight 1/sqrt(size of its source).
    "sqrt": V1_1_DRAWS,
    "sqrt_seed1": {**V1_1_DRAWS, "seed": 1},
    # The recipe of synthguard-v1 1.0.0: evidence fused into the score, "generated" at the bare 99th
    # percentile of the calibration reals.
    "fused_q99": {**V1_1_DRAWS, "evidence_in_score": True, "generated_margin": 0.0},
    # Same training, 32 crops per image read at detection time instead of 8 (the fusion is refitted).
    "crops32": {**V1_1_DRAWS, "max_crops": 32},
    # Residual-only input: the network cannot see the raw pixels, so less of the content.
    "residual32": {**V1_1_DRAWS, "max_crops": 32, "net": NetConfig(use_pixels=0)},
    # Three times the optimiser steps of the 1.0.0 recipe (28-32 minutes per fold on the 2-core CPU).
    "steps3x": {**V1_1_DRAWS, "steps": 10500, "evidence_in_score": True, "generated_margin": 0.0},
    # synthguard-v1 1.1.0's recipe (CNN alone in the score, margin 1.0) with three times the optimiser steps.
    # The time cap is lifted so that folds sharing the cores still finish their steps.
    "shipped3x": {**V1_1_DRAWS, "steps": 10500, "max_minutes": 120.0},
    # Half of the generated side are taef2 reconstructions of real photos (same content, decoder trace).
    "recon50": {**V1_1_DRAWS, "max_crops": 32, "reconstruction_share": 0.5},
    # 1.1.0's recipe with every source drawn equally often within its class (weight 1/size, not 1/sqrt(size)).
    # Measured: much worse (the 3-5 image sources then make up a third of the real draws).
    "balanced": {"source_weight_power": 1.0},
    # 1.1.0's recipe with every image drawn alike within its class (no damping of large sources): what
    # `shipped` is since 1.2.0. Kept under the name the model card's tables use.
    "flat": {"source_weight_power": 0.0},
    # 1.1.0's recipe with the 2x2 neighbouring-pixel residual (NPR) as a third view beside pixels, high-pass.
    "npr": {**V1_1_DRAWS, "net": NetConfig(use_npr=1)},
    # The shipped recipe with another seed: it changes the training draws and which seeded 25% of the other
    # class each fold is tested against, so two seeds of one recipe show how far a fold moves by chance.
    "shipped_seed1": {"seed": 1},
    # `flat` with seed 1 (the same as `shipped_seed1` since 1.2.0).
    "flat_seed1": {"source_weight_power": 0.0, "seed": 1},
    # The shipped recipe on the same splits as `shipped` with another initialisation and other training
    # draws: the second member of a two-model average (bench/loso_ensemble.py).
    "shipped_init1": {"init_seed": 1},
    # The shipped recipe reading 128 px crops instead of 64 (four times the context per crop, 8x8 cells of the
    # decoder grid instead of 4x4).
    "crop128": CROP128,
    # The shipped recipe with a Gaussian blur (sigma 0.2-1.5 px) on 30% of the training crops of both classes,
    # before the JPEG steps (blur + JPEG augmentation, Wang et al., CVPR 2020, who report it helping a
    # detector transfer to unseen generators).
    "blur": {"augmentation": Augmentation(blur_p=0.3)},
    # The shipped recipe with the pixel view standardised per crop and channel: brightness and colour balance
    # (subject matter more than generator: the dev set's fakes are mostly prompted art) no longer reach it.
    "pixnorm": {"net": NetConfig(standardise_pixels=1)},
    # The shipped recipe with a rescaling history on 30% of the training crops of both classes: a region
    # 1-2x the crop's side resampled down to it (bicubic, antialiased), then treated as lossless. ImageNet's
    # web photos are downscaled; if the model reads resampling as "generated", they look generated.
    "resize": RESCALED,
    # The shipped recipe with four residual blocks per stage instead of two (about 1.8x the CNN work): the
    # issue names capacity as one lever, and the shipped model fits its own calibration split at AUC 0.85
    # only.
    "deep": {"net": NetConfig(blocks=4)},
    # The two nearest misses of the screening together: 128 px crops and the rescaling history.
    "crop128_resize": {**CROP128, **RESCALED},
    # `resize` with other initial weights and draws (same splits): is its gain over `shipped_init1` the same?
    "resize_init1": {**RESCALED, "init_seed": 1},
    # The shipped recipe with every training JPEG step drawing its chroma subsampling (4:4:4, 4:2:2 or 4:2:0)
    # for both classes alike: the dev set's JPEG sources differ by it, and Pillow's default is always 4:2:0.
    "chroma": {"augmentation": Augmentation(chroma_subsampling=(0, 1, 2))},
    # A third of the shipped optimiser steps (same schedule, compressed): `steps3x` gained nothing on unseen
    # sources, so fewer steps may fit the training sources' particulars less.
    "steps_third": {"steps": 1167},
    # AdamW weight decay 1e-2 instead of 1e-4: a stronger pull towards small weights.
    "wd1e2": STRONG_DECAY,
    # `wd1e2` with other initial weights and draws (same splits), against `shipped_init1`: informational.
    "wd1e2_init1": {**STRONG_DECAY, "init_seed": 1},
    # `shipped`'s fold networks, recalibrated: the detector reads the 8 most textured of 64 grid crops.
    "textured": {"crop_candidates": 64},
    # `shipped`'s fold networks, recalibrated: the detector averages 64 grid crops instead of 8.
    "all64": {"max_crops": 64},
    # The same with 32 grid crops (a 4 x 8 grid on a 512 px image): half the CNN work of `all64`.
    "all32": {"max_crops": 32},
    # Trained on the most textured of 4 random positions per crop (both classes alike); read as `textured`.
    "textured_train": {"crop_candidates": 64, "augmentation": Augmentation(texture_candidates=4)},
    # AdamW weight decay 1e-1, ten times `wd1e2`'s: does a stronger dose of its small gain give more?
    "wd1e1": {"weight_decay": 1e-1},
    # Gaussian noise (sigma 0.5-3 grey levels) on 30% of the training crops of both classes, before the JPEG
    # steps: sensor noise, or its absence, should not decide the class by itself.
    "noise": {"augmentation": Augmentation(noise_p=0.3)},
    # Colour saturation scaled about the luma (x0.25-1.5) on half the training crops of both classes, before
    # the JPEG steps: a palette (saturated prompted art, everyday photos) should not stand for a class.
    "saturation": {"augmentation": Augmentation(saturation_p=0.5)},
    # The colour channels in a random order on half the training crops of both classes: the same cue taken
    # away more bluntly.
    "channel_shuffle": {"augmentation": Augmentation(channel_shuffle_p=0.5)},
    # Half the width everywhere (8 stem channels, 24 and 48 in the stages; about a quarter of the weights):
    # `deep` gained nothing, so a smaller network may fit fewer of the training sources' particulars.
    "narrow": NARROW,
    # `narrow` with seed 1 (its own calibration split and draws), against `shipped_seed1`.
    "narrow_seed1": {**NARROW, "seed": 1},
    # Session 13: the local-patch networks, each with two initial weights on the same splits (MODEL_CARD.md).
    "local24": LOCAL24,
    "local24_init1": {**LOCAL24, "init_seed": 1},
    "local40": LOCAL40,
    "local40_init1": {**LOCAL40, "init_seed": 1},
    # Session 13, informational: does `crop128`'s gain on the two screening folds repeat with other weights?
    "crop128_init1": {**CROP128, "init_seed": 1},
    # Session 13: the two changes whose gains repeated with both initial weights, together (MODEL_CARD.md).
    "resize_wd1e2": {**RESCALED, **STRONG_DECAY},
    "resize_wd1e2_init1": {**RESCALED, **STRONG_DECAY, "init_seed": 1},
    # Session 14: reconstructions paired with their real photos in each batch, with the shipped share of
    # reconstructions and with half the generated side, each with two initial weights (MODEL_CARD.md).
    "paired": PAIRED,
    "paired_init1": {**PAIRED, "init_seed": 1},
    "paired_recon50": {**PAIRED, "reconstruction_share": 0.5},
    "paired_recon50_init1": {**PAIRED, "reconstruction_share": 0.5, "init_seed": 1},
    # Session 17: weights averaged over a flat stretch of training (SWA / SWAD), two initial weights.
    "swa": AVERAGED,
    "swa_init1": {**AVERAGED, "init_seed": 1},
}

#: Recipes that change only what happens after training: they reuse the named recipe's fold networks
#: (`OUT/<that recipe>/<fold>/weights.pt`, which must exist) and only calibrate them again.
NETWORKS_FROM: dict[str, str] = {"textured": "shipped", "all64": "shipped", "all32": "shipped"}


def run_fold(
    *,
    manifest: Path,
    out_dir: Path,
    recipe: str,
    source: str,
    device: str,
    taef2_dir: str | None,
    cache_dir: Path,
    steps: int | None,
) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = replace(TrainConfig(device=device), **RECIPES[recipe])
    if steps:
        config = replace(config, steps=steps)
    started = time.monotonic()
    lines: list[str] = []
    summary = leave_one_source_out(
        manifest,
        out_dir / recipe,
        train_config=config,
        sources=[source],
        taef2_dir=Path(taef2_dir) if taef2_dir else None,
        cache_dir=cache_dir,
        networks_from=out_dir / NETWORKS_FROM[recipe] if recipe in NETWORKS_FROM else None,
        log=lines.append,
    )
    (out_dir / recipe / fold_dir_name(source) / "log.txt").write_text("\n".join(lines) + "\n")
    return {"recipe": recipe, "source": source, "minutes": (time.monotonic() - started) / 60, **summary}


def merged_summary(out_dir: Path) -> dict[str, Any]:
    """Every recipe's finished folds under `out_dir`, this run's and earlier runs' alike, so that a run of one
    recipe does not drop the others from `sweep.json`. Each mean states how many folds it covers."""
    result: dict[str, Any] = {}
    for recipe_dir in sorted(path for path in out_dir.iterdir() if path.is_dir()):
        folds = {}
        for eval_path in sorted(recipe_dir.glob("*/eval.json")):
            report = json.loads(eval_path.read_text())
            # A fold of this sweep holds out exactly one source; anything else under OUT is not one of them.
            if len(report.get("holdout_sources", [])) == 1:
                folds[report["holdout_sources"][0]] = report
        if folds:
            result[recipe_dir.name] = summarise_folds(folds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default="shipped", help=f"comma-separated subset of {list(RECIPES)}")
    parser.add_argument("--sources", default="", help="comma-separated folds (default: 5 + 3 largest)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--taef2-dir", default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's steps (smoke runs)")
    parser.add_argument("--summary", type=Path, default=None, help="also write sweep.json here")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}")
    rows = read_manifest(args.manifest)
    sources = [s for s in args.sources.split(",") if s] or largest_sources(rows)
    started = time.monotonic()
    # The caches are built once here, so that the parallel folds only read them.
    cache = build_pixel_cache(rows, pixel_cache_path(rows, args.cache_dir))
    if args.taef2_dir:
        reals = [i for i, r in enumerate(rows) if not r.is_fake]
        reconstructions(
            [cache.images[i] for i in reals],
            [str(rows[i].path) for i in reals],
            taef2_dir=Path(args.taef2_dir),
            side=TrainConfig().reconstruction_side,
            cache_path=args.cache_dir / f"taef2-{TrainConfig().reconstruction_side}.pt",
            log=print,
            device=args.device,
        )
    print(f"caches ready after {time.monotonic() - started:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(recipe, source) for recipe in recipes for source in sources]
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        pending: dict[Future[dict[str, Any]], tuple[str, str]] = {
            pool.submit(
                run_fold,
                manifest=args.manifest,
                out_dir=args.out,
                recipe=recipe,
                source=source,
                device=args.device,
                taef2_dir=args.taef2_dir,
                cache_dir=args.cache_dir,
                steps=args.steps,
            ): (recipe, source)
            for recipe, source in jobs
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                recipe, source = pending.pop(future)
                try:
                    result = future.result()
                    timings[f"{recipe}/{source}"] = round(result["minutes"], 2)
                    auc = result["folds"][source]["crop512_jpeg90"]["roc_auc"]
                    print(
                        f"{recipe:>10} {source:60} jpeg90 AUC {auc:.3f} ({result['minutes']:.1f} min)",
                        flush=True,
                    )
                except Exception as exc:  # noqa: BLE001 - one broken fold must not hide the others
                    print(f"{recipe} {source} FAILED: {exc!r}", flush=True)
                summary = {
                    "recipes": merged_summary(args.out),
                    "fold_minutes": timings,
                    "elapsed_minutes": round((time.monotonic() - started) / 60, 2),
                    "device": args.device,
                }
                for path in [args.out / "sweep.json", args.summary]:
                    if path is not None:
                        path.write_text(json.dumps(summary, indent=2) + "\n")
    for recipe, summary in merged_summary(args.out).items():
        if recipe not in recipes:
            continue
        means = {c: round(v["roc_auc"], 3) for c, v in summary["mean"].items()}
        print(f"{recipe:>10} mean ROC AUC {means}")


if __name__ == "__main__":
    main()
