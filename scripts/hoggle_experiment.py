"""Train a HOGgle dictionary on ImageNet-sample images 100..499 and evaluate on images 0..99.

Usage::

    python scripts/hoggle_experiment.py [--images DIR] [--out dict.npz] [--atoms 512] ...

Prints the training time, the mean +- std of the normalized HOG error
``||HOG(x*) - HOG(x0)|| / ||HOG(x0)||`` over the test images (gray, shorter side 160, centre
crop: the paper's Table 4 protocol; the paper reports 60.1% for HOGgle) and seconds per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from preimage.hoggle import HoggleModel, invert_images, train_hoggle
from preimage.io import list_images, read_image

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images" / "imagenet-sample"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--out", type=Path, default=None, help="save the dictionary here (.npz)")
    ap.add_argument("--model", type=Path, default=None, help="evaluate this saved dictionary instead of training")
    ap.add_argument("--train", default="100:500", help="slice of the sorted images to train on")
    ap.add_argument("--test", default="0:100", help="slice of the sorted images to evaluate on")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--atoms", type=int, default=512)
    ap.add_argument("--patches", type=int, default=40000)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--alpha", type=float, default=0.02)
    ap.add_argument("--coding-iter", type=int, default=60)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pad", type=int, default=None, help="override the model's pad_cells")
    ap.add_argument("--sigma", type=float, default=None, help="override the model's sigma")
    ap.add_argument("--inv-alpha", type=float, default=None, help="override alpha at inversion")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    files = list_images(args.images)
    tr = slice(*map(int, args.train.split(":")))
    te = slice(*map(int, args.test.split(":")))
    if args.model is not None:
        model = HoggleModel.load(args.model)
        train_s = float(model.info.get("train_seconds", 0.0))
    else:
        t0 = time.perf_counter()
        model = train_hoggle(
            files[tr],
            window_cells=(args.window, args.window),
            n_atoms=args.atoms,
            n_patches=args.patches,
            alpha=args.alpha,
            seed=args.seed,
            image_size=args.size,
            n_batches=args.batches,
            batch_size=args.batch_size,
            coding_iter=args.coding_iter,
        )
        train_s = time.perf_counter() - t0
        print(f"trained {model.n_atoms} atoms on {model.info['n_pairs']} pairs in {train_s:.1f}s", flush=True)
        if args.out is not None:
            model.save(args.out)
    if args.pad is not None:
        model.pad_cells = args.pad
    if args.sigma is not None:
        model.sigma = args.sigma
    if args.inv_alpha is not None:
        model.alpha = args.inv_alpha

    photos = torch.stack([read_image(p, size=args.size, gray=True) for p in files[te]])
    t0 = time.perf_counter()
    errors = []
    for i in range(len(photos)):
        _, e = invert_images(model, photos[i : i + 1])
        errors.append(float(e[0]))
    per_image = (time.perf_counter() - t0) / len(photos)
    err = torch.tensor(errors)
    res = {
        "mean_error": float(err.mean()),
        "std_error": float(err.std()),
        "n_test": len(errors),
        "seconds_per_image": per_image,
        "train_seconds": train_s,
        "atoms": model.n_atoms,
        "pairs": model.info.get("n_pairs"),
        "alpha": model.alpha,
        "pad_cells": model.pad_cells,
        "sigma": model.sigma,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"HOGgle error on {len(errors)} images: {100 * res['mean_error']:.1f}% +- {100 * res['std_error']:.1f}% "
        f"(paper: 60.1%); {per_image:.3f}s per image; training {train_s:.1f}s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
