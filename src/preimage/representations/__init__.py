"""Representations Φ: HOG / HOGb (VLFeat UoCTTI), dense SIFT, and any module cut at a layer."""

from __future__ import annotations

from .base import Geometry, Representation, RepresentationError
from .cnn import ModuleCut, named_layers, probe_geometry

SHALLOW = ("hog", "hogb", "dsift")
"""Names accepted by :func:`make_representation`."""


def make_representation(name: str, *, cell_size: int = 8, color: bool = False, step: int | None = None,
                        fast: bool = False, exact_gradient: bool = False) -> Representation:
    """Build a shallow representation by name: ``hog``, ``hogb`` (bilinear orientations), ``dsift``.

    ``cell_size`` is the HOG cell size or the DSIFT bin size (8 in the paper); ``step`` the
    DSIFT sampling step (default: the bin size).  Plain HOG back-propagates HOGb's gradient
    (a straight-through surrogate, values unchanged) unless ``exact_gradient`` is set, which
    reproduces the paper's setting.
    """
    key = name.lower()
    if key in ("hog", "hogb"):
        from .hog import HOG

        return HOG(cell_size=cell_size, bilinear_orientations=key == "hogb", color=color,
                   surrogate_gradient=not exact_gradient)
    if key == "dsift":
        from .dsift import DSIFT

        if color:
            raise RepresentationError("dsift works on gray images only")
        return DSIFT(bin_size=cell_size, step=step or cell_size, fast=fast)
    raise RepresentationError(f"unknown representation {name!r}; choose one of {', '.join(SHALLOW)}")


__all__ = [
    "Geometry",
    "ModuleCut",
    "Representation",
    "RepresentationError",
    "SHALLOW",
    "make_representation",
    "named_layers",
    "probe_geometry",
]
