"""Evaluation: the normalized reconstruction error and the Table 4 protocol (section 5.1).

``error = ||Φ(x*) - Φ(x0)|| / ||Φ(x0)||`` with Φ the representation itself (for HOG / DSIFT it
equals VLFeat's numbers, see the tests).  :func:`evaluate_folder` runs the paper's protocol:
each image to grayscale 0..255 (for gray representations), shorter side resized to ``size``
and centre-cropped square, inverted from noise, error measured; results are written as PNGs
with JSON sidecars plus one summary JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .defaults import Settings
from .io import ImageError, read_image, save_json, save_png
from .engine import representation_device
from .representations.base import Representation
from .visualizations import invert


def reconstruction_error(representation: Representation, x: Tensor, x0: Tensor) -> Tensor:
    """``||Φ(x) - Φ(x0)|| / ||Φ(x0)||`` per batch element, for images in Φ's input space."""
    with torch.no_grad():
        a = representation(x).float().flatten(1)
        b = representation(x0).float().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1)


def summarize(errors: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and the 95% half-width ``1.96 * std / sqrt(n)`` of the errors."""
    n = len(errors)
    mean = sum(errors) / n
    std = math.sqrt(sum((e - mean) ** 2 for e in errors) / (n - 1)) if n > 1 else 0.0
    return {"mean_error": mean, "std_error": std, "sem95": 1.96 * std / math.sqrt(n)}


def evaluate_folder(
    representation: Representation,
    images: Sequence[Path],
    out: Path,
    settings: Settings,
    size: int = 160,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    resume: bool = False,
    on_batch: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    hoggle: Any = None,
    load: Callable[[Path], Tensor] | None = None,
    judge: Representation | None = None,
    classifier: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Invert every image with the Table 4 protocol; write PNGs, sidecars and return the summary.

    Images are inverted and saved ``batch_size`` at a time; the engine optimizes each such chunk
    in batches of its own choice (:func:`preimage.engine.auto_batch_size`, recorded in the
    sidecars as ``engine_batch_size``).  With ``resume``, images whose sidecar already exists in
    ``out`` are read back, not redone.
    With ``hoggle`` (a trained :class:`preimage.hoggle.HoggleModel`) the images are inverted by
    the HOGgle baseline instead of the optimization, and the error is measured with
    ``representation`` (plain HOG, as in the paper's Table 4).

    ``load`` reads one photo (default: shorter side to ``size``, centre crop; CNNs pass Caffe's
    warp + crop).  ``judge`` measures the error instead of ``representation`` (e.g. the fp32
    network when the optimization ran in bf16).  ``classifier`` maps images in Φ's input space to
    top-1 classes: each sidecar then records the class of the original and of the
    reconstruction, and the summary the *classification consistency* (the share that agree).
    """
    gray = representation.in_channels == 1
    if load is None:
        def load(p: Path) -> Tensor:
            return read_image(p, size=size, gray=gray)
    judge = judge if judge is not None else representation
    # Read every image first: a missing or corrupt one fails the run before any work is done.
    photos: dict[Path, Tensor] = {p: load(p) for p in images}
    per_image: dict[str, dict[str, Any]] = {}
    todo: list[Path] = []
    for p in images:
        side = out / f"{p.stem}.json"
        if resume and side.exists():
            try:
                rec = json.loads(side.read_text())
                per_image[p.name] = {"image": p.name, "error": float(rec["error"]), "seconds": rec.get("seconds", 0.0)}
                if classifier is not None:
                    per_image[p.name] |= {"top1": int(rec["top1"]), "top1_original": int(rec["top1_original"])}
                continue
            except (ValueError, KeyError):
                pass
        todo.append(p)
    if on_batch is not None and len(images) - len(todo):
        on_batch(len(images) - len(todo))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = torch.stack([photos[p] for p in chunk])
        t0 = time.perf_counter()
        if hoggle is None:
            # batch_size: the engine's choice within the chunk (auto_batch_size: on CPU, batches
            # whose activations stay near the caches; on CUDA, the whole chunk if it fits)
            result = invert(representation, batch, seeds=[seed], settings=settings, device=device, callback=on_step)
            pictures, errs = result.images, result.error
            if judge is not representation:
                jdev = representation_device(judge)
                errs = reconstruction_error(judge, result.x.to(jdev), judge.preprocess(batch.to(jdev))).cpu()
            energies = [result.final_energies(i) for i in range(len(chunk))]
            config = result.config
        else:
            from .hoggle import invert_images

            recons, _ = invert_images(hoggle, batch)
            x = representation.preprocess(recons)
            errs = reconstruction_error(representation, x, representation.preprocess(batch))
            pictures, energies = recons.expand(-1, 3, -1, -1), [{} for _ in chunk]
            config = {"mode": "hoggle", "representation": representation.name, "hoggle": hoggle.info}
        seconds = (time.perf_counter() - t0) / len(chunk)
        labels: list[dict[str, int]] = [{} for _ in chunk]
        if classifier is not None:
            x_star = judge.preprocess(pictures.float()) if hoggle is not None else result.x
            top1 = classifier(x_star).tolist()
            top0 = classifier(judge.preprocess(batch)).tolist()
            labels = [{"top1": int(a), "top1_original": int(b)} for a, b in zip(top1, top0)]
        for i, p in enumerate(chunk):
            err = float(errs[i])
            save_png(pictures[i], out / f"{p.stem}.png")
            save_json(
                {
                    "image": str(p),
                    "seed": seed,
                    "error": err,
                    "seconds": seconds,
                    **labels[i],
                    "final_energies": energies[i],
                    "config": config | {"size": size, "batch_size": len(chunk)},
                },
                out / f"{p.stem}.json",
            )
            per_image[p.name] = {"image": p.name, "error": err, "seconds": seconds, **labels[i]}
        if on_batch is not None:
            on_batch(len(chunk))
    rows = [per_image[p.name] for p in images]
    errors = [r["error"] for r in rows]
    done = [r["seconds"] for r in rows if r["seconds"]]
    consistency = {}
    if classifier is not None:
        consistency = {"consistency": sum(r["top1"] == r["top1_original"] for r in rows) / len(rows)}
    return {
        "rep": representation.name,
        "method": "hoggle" if hoggle is not None else "optimization",
        "n_images": len(rows),
        **summarize(errors),
        **consistency,
        "seconds_per_image": sum(done) / len(done) if done else 0.0,
        "size": size,
        "C": settings.C,
        "settings": settings.to_dict(),
        "per_image": rows,
    }


__all__ = ["ImageError", "evaluate_folder", "reconstruction_error", "summarize"]
