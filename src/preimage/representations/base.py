"""The Representation interface: Φ in the paper's notation (section 3, eq. 1).

A representation is a differentiable map from a batch of images ``x`` of shape
``(N, C, H, W)`` to a batch of codes ``Φ(x)`` of shape ``(N, ...)``.  The engine optimizes
images in the representation's own *input space*: channels, value range and mean are the
representation's business, and it converts to and from ordinary RGB photos in ``[0, 1]``
with :meth:`Representation.preprocess` and :meth:`Representation.deprocess`.  Following the
paper's footnote 1, the input space is null-mean: ``x = scale * photo - mean``.

Geometry: ``stride`` is the step in pixels between the receptive fields of neighbouring code
locations and ``receptive_field`` the side in pixels of one location's receptive field.  The
engine derives the jitter amount ``T = max(1, round(stride / 4))`` (section 5.2) and the
activation-maximization normalization ``Z = M * rho^2`` (section 6) from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..objectives import converted_crop, jitter_crop


class RepresentationError(ValueError):
    """Bad input to a representation (wrong shape, unknown layer, ...)."""


@dataclass(frozen=True)
class Geometry:
    """Where a representation's outputs look in the input image (paper Tables 1-3)."""

    stride: int
    receptive_field: int

    @property
    def jitter(self) -> int:
        """The paper's jitter amount T: a quarter of the stride, at least 1 (section 5.2)."""
        return max(1, round(self.stride / 4))


class Representation(nn.Module):
    """Base class of Φ.  Subclasses set the attributes below and implement ``forward``.

    Attributes:
        name: short identifier used in file names and sidecars (``"hog"``, ``"alexnet:conv3"``).
        in_channels: number of input channels the representation takes (1 gray, 3 colour).
        mean: per-channel mean (in input units) subtracted to make the input null-mean.
        scale: input units per unit of a [0, 1] photo (255 for HOG, DSIFT and Caffe networks).
        bgr: whether the input channel order is BGR (Caffe) instead of RGB.
        geometry: stride and receptive field of the code.
    """

    name: str = "representation"
    in_channels: int = 3
    scale: float = 255.0
    bgr: bool = False
    geometry: Geometry = Geometry(stride=1, receptive_field=1)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(self.in_channels), persistent=False)

    # --- conversions between ordinary photos and the input space -------------------------
    def preprocess(self, photo: Tensor) -> Tensor:
        """RGB photos ``(N, 3, H, W)`` in [0, 1] (or gray ``(N, 1, H, W)``) -> null-mean input."""
        if photo.dim() != 4 or photo.shape[1] not in (1, 3):
            raise RepresentationError(
                f"{self.name}: expected photos of shape (N, 1 or 3, H, W), got {tuple(photo.shape)}"
            )
        if self.in_channels == 1 and photo.shape[1] == 3:
            # ITU-R BT.601 luma, as MATLAB's rgb2gray and PIL's "L" conversion.
            w = photo.new_tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
            photo = (photo * w).sum(1, keepdim=True)
        elif self.in_channels == 3 and photo.shape[1] == 1:
            photo = photo.expand(-1, 3, -1, -1)
        if self.bgr:
            photo = photo.flip(1)
        return photo * self.scale - self.mean.to(photo).view(1, -1, 1, 1)

    def deprocess(self, x: Tensor) -> Tensor:
        """Null-mean input ``(N, C, H, W)`` -> RGB photos in [0, 1] for display."""
        photo = (x + self.mean.to(x).view(1, -1, 1, 1)) / self.scale
        if self.bgr:
            photo = photo.flip(1)
        if photo.shape[1] == 1:
            photo = photo.expand(-1, 3, -1, -1)
        return photo.clamp(0, 1)

    def for_optimization(self) -> "Representation":
        """The Φ the engine differentiates at every step; ``self`` unless exact reference
        arithmetic costs time that an optimizer does not need (DSIFT's VLFeat rounding, ~7%).
        Targets, and the errors reported, are always computed with ``self``."""
        return self

    def encode_crops(self, canvas: Tensor, offsets: Tensor, size: tuple[int, int], native: bool = False,
                     sink: list | None = None) -> Tensor:
        """``Φ(jitter(x))``, eqs. (1) and (7): the code of each element's ``size`` window of
        ``canvas`` ``(N, C, H + T - 1, W + T - 1)`` at its ``offsets`` ``(N, 2)`` (row, column),
        differentiable w.r.t. ``canvas``.  ``native``: cut the windows in C on the CPU, one pass
        each way (:func:`~preimage.objectives.converted_crop`), where ATen copies each element
        on its own; a network fuses its input conversion into that pass
        (:meth:`ModuleCut.encode_crops`).  ``sink`` (with ``native``): where the C crop applies,
        the backward pass appends the canvas's gradient to it as a
        :class:`~preimage.objectives.WindowGradient` instead of writing ``canvas.grad``."""
        crop = converted_crop(canvas, offsets, size, sink=sink) if native else None
        return self(crop if crop is not None else jitter_crop(canvas, offsets, size))

    def check_input(self, x: Tensor) -> None:
        """Raise a one-line :class:`RepresentationError` if ``x`` cannot be represented."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise RepresentationError(
                f"{self.name}: expected input of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
