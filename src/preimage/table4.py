"""The paper's Table 4 and Figure 4, regenerated (section 5.1).

:func:`table4` inverts the same images with HOGgle, HOG, HOGb and DSIFT under the Table 4
protocol (gray, shorter side 160, centre crop, cell size 8, error measured with each
representation itself; HOGgle's with plain HOG), writes one JSON summary per method, a Markdown
table and a Figure 4 analogue (original | HOGgle | HOG | HOGb | DSIFT).  It is resumable: every
reconstruction has a sidecar, and a rerun reuses the ones already written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .defaults import Settings
from .evaluation import evaluate_folder
from .io import grid, read_image, save_json, save_png
from .representations import make_representation

METHODS = ("hoggle", "hog", "hogb", "dsift")
PAPER_TABLE4 = {"hoggle": 60.1, "hog": 36.6, "hogb": 11.5, "dsift": 9.4}
"""The paper's Table 4 mean errors, in percent."""


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Table 4 as Markdown: mean ± std, mean ± 1.96 SEM and seconds per image per method."""
    lines = [
        "| method | error mean ± std (%) | mean ± 1.96·SEM (%) | s / image | paper (%) |",
        "|---|---|---|---|---|",
    ]
    for m, s in summaries.items():
        lines.append(
            f"| {m} | {100 * s['mean_error']:.1f} ± {100 * s['std_error']:.1f} | "
            f"{100 * s['mean_error']:.1f} ± {100 * s['sem95']:.1f} | {s['seconds_per_image']:.2f} | "
            f"{PAPER_TABLE4.get(m, float('nan')):.1f} |"
        )
    n = next(iter(summaries.values()))["n_images"] if summaries else 0
    return "\n".join(lines) + f"\n\n{n} images.\n"


def figure4(images: Sequence[Path], out: Path, methods: Sequence[str], size: int) -> torch.Tensor:
    """Rows of ``original | method 1 | method 2 | ...`` read back from the reconstructions."""
    tiles = []
    for p in images:
        tiles.append(read_image(p, size=size, gray=True).expand(3, -1, -1))
        for m in methods:
            tiles.append(read_image(out / m / f"{p.stem}.png"))
    return grid(tiles, columns=1 + len(methods))


def table4(
    images: Sequence[Path],
    out: Path,
    settings: Settings,
    hoggle_model: Any = None,
    methods: Sequence[str] = METHODS,
    size: int = 160,
    batch_size: int = 20,
    figure_images: int = 4,
    device: str | None = None,
    on_method: Callable[[str, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every method on ``images``; write ``out/<method>.json``, ``table4.md``, ``figure4.png``."""
    summaries: dict[str, dict[str, Any]] = {}
    for m in methods:
        if on_method is not None:
            on_method(m, len(images))
        if m == "hoggle":
            if hoggle_model is None:
                raise ValueError("the hoggle method needs a trained HOGgle model")
            rep = make_representation("hog", cell_size=hoggle_model.cell_size)
        else:
            rep = make_representation(m, cell_size=8)
        if device is not None:
            rep = rep.to(device)
        summary = evaluate_folder(rep, images, out / m, settings, size=size, batch_size=batch_size, device=device,
                                  resume=True, on_batch=on_batch, on_step=on_step,
                                  hoggle=hoggle_model if m == "hoggle" else None)
        summary["method"] = m
        save_json(summary, out / f"{m}.json")
        summaries[m] = summary
    (out / "table4.md").write_text(markdown_table(summaries))
    save_png(figure4(images[:figure_images], out, list(methods), size), out / "figure4.png")
    return summaries
