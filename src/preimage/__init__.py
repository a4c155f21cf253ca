"""preimage: natural pre-images of image representations (Mahendran & Vedaldi, IJCV 2016).

The public API::

    from preimage import invert, maximize, caricature, make_representation, ModuleCut, Settings
    rep = make_representation("hog")
    result = invert(rep, photos, seeds=[0, 1], settings=Settings(C=100))
    result.images, result.error, result.energy, result.config
"""

from __future__ import annotations

__version__ = "0.1.0"

from .defaults import PAPER, Settings
from .engine import PreimageError, Stage, optimize
from .evaluation import reconstruction_error
from .objectives import BoundedRange, InnerProductLoss, L2Loss, ObjectiveError, TotalVariation
from .optim import PreimageSGD
from .representations import (
    Geometry,
    ModuleCut,
    Representation,
    RepresentationError,
    make_representation,
)
from .visualizations import Result, caricature, invert, invert_code, maximize, one_hot

__all__ = [
    "PAPER",
    "BoundedRange",
    "Geometry",
    "InnerProductLoss",
    "L2Loss",
    "ModuleCut",
    "ObjectiveError",
    "PreimageError",
    "PreimageSGD",
    "Representation",
    "RepresentationError",
    "Result",
    "Settings",
    "Stage",
    "TotalVariation",
    "caricature",
    "invert",
    "invert_code",
    "make_representation",
    "maximize",
    "one_hot",
    "optimize",
    "reconstruction_error",
]
