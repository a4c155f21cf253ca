"""The paper's Table 5 for any network: inversion error of every layer x C (section 5.2.1).

:func:`table5` inverts the same natural images from every chosen layer of a network, once per
value of C (1, 20, 100, 300 in the paper), and reports the mean ± std of the normalized
reconstruction error ``||Φ(x*) - Φ(x0)|| / ||Φ(x0)||`` and the *classification consistency*
of the authors' code: the share of reconstructions whose top-1 class (the whole network
applied to x*) equals the original image's.

Images follow Caffe's reference preprocessing geometry (warp to 256, centre crop of the input
size).  The optimization may run the network in bf16 (``precision``); the error and the class
are always measured with the fp32 network.  Every reconstruction has a PNG and a JSON sidecar
under ``out/<layer>/C<C>/``; a rerun reuses them (resumable), and each cell's summary is
written as soon as it is complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .defaults import Settings
from .engine import representation_device
from .evaluation import evaluate_folder
from .io import atomic_path, save_json
from .models.zoo import LoadedModel
from .representations.base import RepresentationError
from .stats import warp_crop

PAPER_C = (1.0, 20.0, 100.0, 300.0)
"""The values of C in the paper's Table 5."""

PAPER_TABLE5: dict[float, dict[str, float]] = {
    c: dict(zip(
        "conv1 relu1 norm1 pool1 conv2 relu2 norm2 pool2 conv3 relu3 conv4 relu4 conv5 relu5 pool5 fc6 relu6 "
        "fc7 relu7 fc8".split(), row))
    for c, row in {
        1.0: (69.5, 69.0, 61.4, 59.2, 57.0, 52.0, 50.4, 45.6, 37.3, 39.1, 32.2, 34.5, 24.9, 29.0, 26.4, 19.0,
              24.6, 18.5, 21.4, 13.6),
        20.0: (35.3, 34.9, 32.6, 28.5, 22.7, 23.0, 23.3, 20.4, 16.5, 17.5, 15.0, 16.6, 12.1, 17.3, 16.3, 12.4,
               19.4, 15.1, 17.0, 11.3),
        100.0: (21.1, 20.9, 19.9, 18.6, 13.2, 14.4, 14.9, 13.0, 11.3, 12.9, 11.6, 13.7, 9.6, 16.6, 16.3, 11.3,
                19.7, 13.7, 15.6, 9.6),
        300.0: (14.2, 14.1, 13.6, 14.5, 9.6, 11.1, 11.6, 10.6, 9.9, 12.0, 11.0, 13.4, 9.0, 17.3, 17.5, 11.2,
                20.2, 12.9, 14.9, 9.0),
    }.items()
}
"""The paper's Table 5 (AlexNet, 100 ILSVRC validation images): C -> layer -> mean error in %."""


def main_layers(layers: Sequence[str]) -> list[str]:
    """The outputs of a network's blocks: every layer, except those inside a ``block/...`` group
    that are not its last one (SqueezeNet's ``fire2/concat`` stands for the whole fire module).
    For networks with flat names (AlexNet, VGG) this is every layer."""
    chosen: list[str] = []
    for i, name in enumerate(layers):
        group = name.rsplit("/", 1)[0] if "/" in name else None
        following = layers[i + 1].rsplit("/", 1)[0] if i + 1 < len(layers) and "/" in layers[i + 1] else None
        if group is None or group != following:
            chosen.append(name)
    return chosen


def select_layers(loaded: LoadedModel, spec: str | None) -> list[str]:
    """``None`` / ``"main"``: :func:`main_layers`; ``"all"``: every layer; else a comma list."""
    if spec is None or spec.strip() == "main":
        layers = main_layers(loaded.layers)
    elif spec.strip() == "all":
        layers = list(loaded.layers)
    else:
        layers = [s.strip() for s in spec.split(",") if s.strip()]
        for name in layers:
            loaded.module_name(name)  # unknown layer -> one-line RepresentationError
        return layers
    # A softmax output is a probability vector (not part of the paper's Table 5); a test-time
    # dropout layer repeats the code of the layer before it.
    return [n for n in layers if n != "prob" and not any(k in type(_module(loaded, n)).__name__
                                                          for k in ("Softmax", "Dropout"))] or layers


def _module(loaded: LoadedModel, layer: str) -> torch.nn.Module:
    return dict(loaded.module.named_modules())[loaded.module_name(layer)]


def top1_classifier(loaded: LoadedModel) -> Callable[[Tensor], Tensor]:
    """``images in the model's input space -> top-1 class`` with the whole fp32 network."""
    rep = loaded.representation(loaded.layers[-1])

    @torch.no_grad()
    def classify(x: Tensor) -> Tensor:
        return rep(x.to(representation_device(rep))).flatten(1).argmax(1).cpu()

    return classify


def table5(
    loaded: LoadedModel,
    images: Sequence[Path],
    out: Path,
    settings: Settings,
    layers: Sequence[str],
    Cs: Sequence[float] = PAPER_C,
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    resume: bool = True,
    on_cell: Callable[[str, float], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run the Table 5 protocol; write per-cell summaries, ``table5.json``, ``table5.md`` and
    ``table5.png`` in ``out``; return the table as a dict.

    Args:
        loaded: the network (:func:`preimage.models.load_model`).
        layers: layer names (:func:`select_layers`).
        Cs: the values of C.
        precision: ``"fp32"`` or ``"bf16"`` for the optimization (measurement is fp32).
        report_only: compute nothing; assemble the table from the cells already finished in
            ``out`` (missing cells show as "–").
    """
    if not images:
        raise RepresentationError("no images to evaluate")
    size = loaded.convention.input_size
    classify = top1_classifier(loaded) if not report_only else None
    n_images = len(images)

    def load(p: Path) -> Tensor:
        return warp_crop(p, size)

    cells: dict[str, dict[str, Any]] = {}
    for layer in layers:
        folder = out / layer.replace("/", "_")
        if report_only:
            for C in Cs:
                done = folder / f"C{C:g}" / "summary.json"
                if done.is_file():
                    summary = json.loads(done.read_text())
                    if summary.get("n_images") == len(images):
                        cells[f"{layer}@{C:g}"] = {k: v for k, v in summary.items() if k != "per_image"}
            continue
        rep = loaded.representation(layer, precision)
        judge = loaded.representation(layer) if precision != "fp32" else rep
        if device is not None:
            rep.to(device)
            judge.to(device)
        for C in Cs:
            if on_cell is not None:
                on_cell(layer, C)
            summary = evaluate_folder(
                rep, images, folder / f"C{C:g}", settings.replace(C=float(C)), size=size, seed=seed,
                batch_size=batch_size, device=device, resume=resume, on_batch=on_batch, on_step=on_step,
                load=load, judge=judge, classifier=classify,
            )
            summary |= {"layer": layer, "precision": precision, "model": loaded.name, "weights": loaded.source}
            save_json(summary, folder / f"C{C:g}" / "summary.json")
            cells[f"{layer}@{C:g}"] = {k: v for k, v in summary.items() if k != "per_image"}
    table = {
        "model": loaded.name,
        "weights": loaded.source,
        "n_images": n_images,
        "layers": list(layers),
        "C": [float(c) for c in Cs],
        "precision": precision,
        "cells": cells,
    }
    save_json(table, out / "table5.json")
    with atomic_path(out / "table5.md") as tmp:
        tmp.write_text(markdown_table5(table))
    plot_table5(table, out / "table5.png")
    return table


def _cell(table: dict[str, Any], layer: str, C: float) -> dict[str, Any] | None:
    return table["cells"].get(f"{layer}@{C:g}")


def markdown_table5(table: dict[str, Any]) -> str:
    """Layers as rows (the paper's table transposed, as SqueezeNet has many layers), one column
    of ``mean ± std`` error (%) per C, then one column of classification consistency per C."""
    Cs = table["C"]
    head = "| layer | " + " | ".join(f"C = {c:g}" for c in Cs) + " | " + " | ".join(
        f"consistency C = {c:g}" for c in Cs) + " |"
    lines = [head, "|---" * (1 + 2 * len(Cs)) + "|"]
    for layer in table["layers"]:
        errs, cons = [], []
        for c in Cs:
            s = _cell(table, layer, c)
            errs.append(f"{100 * s['mean_error']:.1f} ± {100 * s['std_error']:.1f}" if s else "–")
            cons.append(f"{100 * s['consistency']:.0f}%" if s and "consistency" in s else "–")
        lines.append(f"| {layer} | " + " | ".join(errs) + " | " + " | ".join(cons) + " |")
    seconds = [s["seconds_per_image"] for s in table["cells"].values() if s.get("seconds_per_image")]
    note = (f"\n{table['model']} ({table['weights']}), {table['n_images']} images, mean ± std of "
            f"||Φ(x*) − Φ(x0)|| / ||Φ(x0)|| in %; consistency: share of reconstructions whose top-1 class "
            f"equals the original's.  Optimization in {table['precision']}, measurement in fp32")
    if seconds:
        note += f"; {sum(seconds) / len(seconds):.1f} s per image per cell on average"
    return "\n".join(lines) + note + ".\n"


def plot_table5(table: dict[str, Any], path: Path) -> None:
    """Error (mean ± std) and consistency against layer depth, one line per C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, Cs = table["layers"], table["C"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(layers) + 2), 7), sharex=True)
    xs = list(range(len(layers)))
    for c in Cs:
        cells = [_cell(table, layer, c) for layer in layers]
        mean = [100 * s["mean_error"] if s else math.nan for s in cells]
        std = [100 * s["std_error"] if s else math.nan for s in cells]
        cons = [100 * s.get("consistency", math.nan) if s else math.nan for s in cells]
        ax1.errorbar(xs, mean, yerr=std, marker="o", ms=3, capsize=2, label=f"C = {c:g}")
        ax2.plot(xs, cons, marker="o", ms=3, label=f"C = {c:g}")
    ax1.set_ylabel("reconstruction error (%)")
    ax1.set_title(f"{table['model']}: inversion error per layer ({table['n_images']} images)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_ylabel("top-1 consistency (%)")
    ax2.set_ylim(-5, 105)
    ax2.grid(alpha=0.3)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["PAPER_C", "PAPER_TABLE5", "main_layers", "markdown_table5", "plot_table5", "select_layers", "table5",
           "top1_classifier"]
