"""The paper's figures, regenerated for any representation or network.

* :func:`sweep` (Figure 2): the same photo inverted once per value of one
  :class:`~preimage.defaults.Settings` field (``C``, ``beta``, ...), as a row of images.
* For a CNN (:class:`~preimage.models.zoo.LoadedModel`), with the paper's per-layer C
  (:func:`paper_C`): :func:`layer_inversions` (Figs 5-7), :func:`diversity` (Fig. 8, several
  seeds), :func:`window_inversions` (Fig. 9, central 5x5 window with its receptive field box),
  :func:`stream_inversions` (Fig. 10, channel subsets), :func:`filter_grid` (Figs 11-12,
  activation maximization of the first filters), :func:`class_grid` (Fig. 13, class neurons)
  and :func:`caricature_grid` (Figs 14-15).  Each returns a :class:`Panel`: the image grid and a
  record per tile (layer, C, error or activation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .defaults import Settings
from .engine import Callback
from .io import grid
from .models.zoo import LoadedModel
from .render import caption, draw_box
from .representations.base import Representation
from .visualizations import caricature, channel_mask, code_shape, invert, mask_support, maximize, window_mask

SWEEPABLE = tuple(f.name for f in fields(Settings) if f.name not in ("extra",))


def sweep(
    representation: Representation,
    photo: Tensor,
    parameter: str,
    values: Sequence[float],
    settings: Settings,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """Invert ``photo`` ``(3 or 1, H, W)`` once per value of ``parameter``.

    Returns the row ``[original, x*(v1), x*(v2), ...]`` as one ``(3, H', W')`` image and the
    reconstruction errors.  Figure 2 of the paper: ``parameter="C", values=(1, 20, 100, 300)``
    and ``parameter="beta", values=(1, 1.5, 2)``.
    """
    if parameter not in SWEEPABLE:
        raise ValueError(f"cannot sweep {parameter!r}; choose one of {', '.join(SWEEPABLE)}")
    tiles: list[Tensor] = []
    errors: list[float] = []
    with torch.no_grad():
        original = representation.deprocess(representation.preprocess(photo[None].float()))[0]
    tiles.append(original)
    for v in values:
        value = int(v) if parameter in ("iterations", "fine_iterations", "jitter") else float(v)
        r = invert(representation, photo[None], seeds=[seed], settings=settings.replace(**{parameter: value}),
                   device=device, callback=callback)
        tiles.append(r.images[0])
        errors.append(float(r.error[0]))
    return grid(tiles, columns=len(tiles)), errors


# ---------------------------------------------------------------- Figures 5-15 for any network


RF_BOUNDS = (0.45, 0.6, 0.8)
"""Receptive field / input side up to which other networks get C = 300, 100, 20 (AlexNet's relu3,
relu4 and relu5 see 99, 131 and 163 of 227 pixels: 0.44, 0.58, 0.72; VGG-VD-16's relu4_3, relu5_1
and relu5_3 92, 132 and 196 of 224: 0.41, 0.59, 0.88)."""


def paper_C(loaded: LoadedModel, layer: str) -> float:
    """The data-term weight the paper uses for visualizing ``layer`` (section 5.2.1).

    AlexNet / CaffeNet / VGG-M: C = 300 up to relu3, 100 up to relu4, 20 up to relu5, 1 after;
    VGG-VD-16: 300 up to relu4_3, 100 for conv5_1, 20 up to relu5_3, 1 after.  The rule behind
    both is the receptive field (the wider a unit's view, the more invariant the code and the
    more the image prior must fill in), so other networks get C by their layer's receptive
    field relative to the input side (:data:`RF_BOUNDS`): SqueezeNet v1.0 gets 300 up to
    fire7 (91 pixels), 100 for fire8 and pool8, 20 for fire9 and conv_final, 1 for pool_final.
    """
    layers = loaded.layers
    i = layers.index(layer)
    marks = {"vgg-vd-16": ("relu4_3", "relu5_1", "relu5_3")}.get(loaded.arch or "", ("relu3", "relu4", "relu5"))
    if all(m in layers for m in marks):
        for bound, C in zip((layers.index(m) for m in marks), (300.0, 100.0, 20.0)):
            if i <= bound:
                return C
        return 1.0
    side = loaded.convention.input_size
    side = min(side) if isinstance(side, (tuple, list)) else int(side)
    rf = loaded.geometry(layer).receptive_field
    for bound, C in zip(RF_BOUNDS, (300.0, 100.0, 20.0)):
        if rf <= bound * side:
            return C
    return 1.0


def spatial_layers(loaded: LoadedModel, layers: Sequence[str], min_side: int = 1) -> list[str]:
    """The layers among ``layers`` whose code is a map at least ``min_side`` wide at the input size."""
    from .geometry import receptive_fields

    shapes = {row[0]: row[1] for row in receptive_fields(loaded.module, loaded.convention.input_size)}
    return [n for n in layers if len(shapes.get(n, ())) == 3 and min(shapes[n][1:]) >= min_side]


def filter_layers(loaded: LoadedModel, layers: Sequence[str]) -> list[str]:
    """The convolutional layers (Figs 11-12): convolutions and concatenations with a spatial
    code larger than 1x1 (fully connected layers, ReLUs, pools and norms are left out).

    A concatenation of rectified convolutions (SqueezeNet's ``fireN/concat``) is replaced by the
    convolution behind its first channels, before its ReLU (``fireN/conv1x1_2``): the same units,
    but linear, as the paper's ``convN`` layers are -- a rectified unit that starts inactive has no
    gradient, and its activation maximization would stay a blank image.
    """
    modules = dict(loaded.module.named_modules())
    keep = [pre_relu_source(loaded, n) for n in layers
            if any(k in type(modules[loaded.module_name(n)]).__name__ for k in ("Conv", "Concat"))]
    return spatial_layers(loaded, keep, min_side=2)


def pre_relu_source(loaded: LoadedModel, layer: str) -> str:
    """For a Caffe ``Concat`` layer whose first input is a convolution's (in-place rectified) blob,
    that convolution; else ``layer`` itself."""
    graph = getattr(loaded.module, "layers", None)
    if not graph or not all(hasattr(g, "bottoms") for g in graph):
        return layer
    by_name = {g.name: g for g in graph}
    node = by_name.get(layer)
    if node is None or node.type != "Concat" or not node.bottoms:
        return layer
    producers = [g for g in graph if node.bottoms[0] in g.tops and g.type == "Convolution"]
    return producers[0].name if producers and producers[0].name in loaded.layers else layer


def spread(layers: Sequence[str], k: int) -> list[str]:
    """``k`` layers evenly spaced over ``layers`` (the last one included)."""
    if k >= len(layers):
        return list(layers)
    n = len(layers) - 1
    return [layers[round(n * (j + 1) / k)] for j in range(k)] if k > 0 else []


@dataclass
class Panel:
    """One figure: the image grid and what every tile is."""

    image: Tensor
    tiles: list[dict[str, Any]]


def _original(rep: Representation, photo: Tensor) -> Tensor:
    with torch.no_grad():
        return rep.deprocess(rep.preprocess(photo[None].float()))[0].cpu()


def layer_inversions(loaded: LoadedModel, photos: Tensor, layers: Sequence[str], settings: Settings,
                     seeds: Sequence[int] = (0,), precision: str = "fp32", device: torch.device | str | None = None,
                     callback: Callback | None = None, fixed_C: float | None = None) -> Panel:
    """Figures 5-7: each row an image (x seed), the original then its inversion from every layer,
    with the paper's C per layer (:func:`paper_C`) unless ``fixed_C`` is given (also in Figs 8-10)."""
    rows: list[list[Tensor]] = [[] for _ in range(len(photos) * len(seeds))]
    tiles: list[dict[str, Any]] = []
    first = loaded.representation(layers[0], precision)
    for i, photo in enumerate(photos):
        for s in range(len(seeds)):
            rows[i * len(seeds) + s].append(caption(_original(first, photo), "original"))
    for layer in layers:
        rep = loaded.representation(layer, precision)
        C = fixed_C if fixed_C is not None else paper_C(loaded, layer)
        r = invert(rep, photos, seeds=seeds, settings=settings.replace(C=C), device=device, callback=callback)
        for n, el in enumerate(r.elements):
            rows[n].append(caption(r.images[n], f"{layer} C={C:g}"))
            tiles.append({"layer": layer, "C": C, **el, "error": float(r.error[n])})
    return Panel(grid([t for row in rows for t in row], columns=len(rows[0])), tiles)


def diversity(loaded: LoadedModel, photos: Tensor, layers: Sequence[str], settings: Settings, seeds: Sequence[int],
              precision: str = "fp32", device: torch.device | str | None = None,
              callback: Callback | None = None, fixed_C: float | None = None) -> Panel:
    """Figure 8: rows image x layer, the original then one inversion per seed (how much of the
    image each layer pins down)."""
    tiles: list[Tensor] = []
    records: list[dict[str, Any]] = []
    for layer in layers:
        rep = loaded.representation(layer, precision)
        C = fixed_C if fixed_C is not None else paper_C(loaded, layer)
        r = invert(rep, photos, seeds=seeds, settings=settings.replace(C=C), device=device, callback=callback)
        for i, photo in enumerate(photos):
            tiles.append(caption(_original(rep, photo), f"{layer} C={C:g}"))
            for s in range(len(seeds)):
                n = i * len(seeds) + s
                tiles.append(caption(r.images[n], f"seed {seeds[s]}"))
                records.append({"layer": layer, "C": C, **r.elements[n], "error": float(r.error[n])})
    return Panel(grid(tiles, columns=1 + len(seeds)), records)


def window_inversions(loaded: LoadedModel, photo: Tensor, layers: Sequence[str], settings: Settings,
                      window: int = 5, precision: str = "fp32", device: torch.device | str | None = None,
                      callback: Callback | None = None, fixed_C: float | None = None) -> Panel:
    """Figure 9: inversions from the central ``window x window`` feature locations of each layer
    (eq. 3 with a spatial mask), the white box marking the window's overall receptive field."""
    size = tuple(photo.shape[-2:])
    tiles = [caption(_original(loaded.representation(layers[0], precision), photo), "original")]
    records: list[dict[str, Any]] = []
    for layer in layers:
        rep = loaded.representation(layer, precision)
        mask = window_mask(code_shape(rep, size), window)
        box = mask_support(rep, size, mask)
        C = fixed_C if fixed_C is not None else paper_C(loaded, layer)
        r = invert(rep, photo[None], settings=settings.replace(C=C), mask=mask, device=device, callback=callback)
        tiles.append(caption(draw_box(r.images[0], box), f"{layer} {window}x{window}"))
        records.append({"layer": layer, "C": C, "window": window, "box": list(box), "error": float(r.error[0])})
    return Panel(grid(tiles, columns=len(tiles)), records)


def stream_inversions(loaded: LoadedModel, photo: Tensor, layers: Sequence[str], settings: Settings,
                      streams: int = 2, precision: str = "fp32", device: torch.device | str | None = None,
                      callback: Callback | None = None, fixed_C: float | None = None) -> Panel:
    """Figure 10: inversions from each of ``streams`` equal channel groups of a layer (CaffeNet's
    two GPU streams; for other networks, consecutive channel blocks).  Rows: streams."""
    size = tuple(photo.shape[-2:])
    rows: list[list[Tensor]] = [[] for _ in range(streams)]
    records: list[dict[str, Any]] = []
    for layer in layers:
        rep = loaded.representation(layer, precision)
        shape = code_shape(rep, size)
        K = shape[0]
        masks = torch.stack([channel_mask(shape, range(k * K // streams, (k + 1) * K // streams))
                             for k in range(streams)])
        C = fixed_C if fixed_C is not None else paper_C(loaded, layer)
        r = invert(rep, photo[None].expand(streams, -1, -1, -1), settings=settings.replace(C=C), mask=masks,
                   device=device, callback=callback)
        for k in range(streams):
            lo, hi = k * K // streams, (k + 1) * K // streams
            rows[k].append(caption(r.images[k], f"{layer} ch {lo}-{hi - 1}"))
            records.append({"layer": layer, "C": C, "channels": [lo, hi - 1], "error": float(r.error[k])})
    return Panel(grid([t for row in rows for t in row], columns=len(layers)), records)


def am_size(loaded: LoadedModel, layer: str) -> int:
    """Side of the image sought when maximizing a unit of ``layer``: its receptive field and a
    margin (at least 64, at most the network's input size)."""
    rf = loaded.geometry(layer).receptive_field
    return int(min(loaded.convention.input_size, max(64, math.ceil(rf * 1.5 / 8) * 8)))


def filter_grid(loaded: LoadedModel, layers: Sequence[str], units: int, maxima: dict[str, Tensor],
                settings: Settings, precision: str = "fp32", device: torch.device | str | None = None,
                callback: Callback | None = None) -> Panel:
    """Figures 11-12: activation maximization (eq. 4, Z = M rho^2) of the first ``units`` filters
    of each layer, one row per layer, all tiles resized to the largest."""
    rows: list[list[Tensor]] = []
    records: list[dict[str, Any]] = []
    for layer in layers:
        rep = loaded.representation(layer, precision)
        size = am_size(loaded, layer)
        chosen = list(range(min(units, int(maxima[layer].numel()))))
        M = [max(float(maxima[layer][u]), 1e-6) for u in chosen]
        r = maximize(rep, (size, size), chosen, M=M, settings=settings, device=device, callback=callback)
        rows.append([r.images[n] for n in range(len(chosen))])
        for n, u in enumerate(chosen):
            records.append({"layer": layer, "unit": u, "M": M[n], "size": size, "activation": float(r.activation[n]),
                            "beats_M": bool(float(r.activation[n]) > M[n])})
    side = max(t.shape[-1] for row in rows for t in row)
    tiles = []
    for layer, row in zip(layers, rows):
        for j, t in enumerate(row):
            t = torch.nn.functional.interpolate(t[None], size=(side, side), mode="nearest")[0]
            tiles.append(caption(t, f"{layer} #{j}" if j == 0 else f"#{j}"))
    return Panel(grid(tiles, columns=max(len(row) for row in rows)), records)


def class_grid(loaded: LoadedModel, layer: str, classes: Sequence[int], maxima: Tensor, settings: Settings,
               names: Sequence[str] | None = None, precision: str = "fp32",
               device: torch.device | str | None = None, callback: Callback | None = None) -> Panel:
    """Figure 13: activation maximization of class neurons of the layer before the softmax."""
    rep = loaded.representation(layer, precision)
    size = loaded.convention.input_size
    M = [max(float(maxima[c]), 1e-6) for c in classes]
    r = maximize(rep, (size, size), list(classes), M=M, settings=settings, device=device, callback=callback)
    tiles, records = [], []
    for n, c in enumerate(classes):
        name = names[c].split(" ", 1)[-1].split(",")[0] if names and c < len(names) else f"class {c}"
        tiles.append(caption(r.images[n], name))
        records.append({"layer": layer, "class": c, "name": name, "M": M[n], "activation": float(r.activation[n])})
    return Panel(grid(tiles, columns=len(tiles)), records)


def caricature_grid(loaded: LoadedModel, photos: Tensor, layers: Sequence[str], settings: Settings,
                    precision: str = "fp32", device: torch.device | str | None = None,
                    callback: Callback | None = None) -> Panel:
    """Figures 14-15: rows images, the original then its caricature from each layer."""
    rows: list[list[Tensor]] = [[] for _ in range(len(photos))]
    records: list[dict[str, Any]] = []
    first = loaded.representation(layers[0], precision)
    for i, photo in enumerate(photos):
        rows[i].append(caption(_original(first, photo), "original"))
    for layer in layers:
        rep = loaded.representation(layer, precision)
        r = caricature(rep, photos, settings=settings, device=device, callback=callback)
        for i in range(len(photos)):
            rows[i].append(caption(r.images[i], layer))
            records.append({"layer": layer, "image": i, "activation": float(r.activation[i]),
                            "initial_activation": float(r.extra["initial_activation"][i])})
    return Panel(grid([t for row in rows for t in row], columns=len(rows[0])), records)
