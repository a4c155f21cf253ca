"""UoCTTI HOG (DPM v5) and HOGb, as VLFeat 0.9.21 ``vl_hog`` computes them, in PyTorch.

Mahendran & Vedaldi, "Visualizing deep convolutional neural networks using natural
pre-images" (IJCV 2016), section 4.1, observe that HOG is a small CNN: a gradient filter
bank, a non-linear orientation assignment, spatial pooling into cells with bilinear weights,
block normalization and a clamp at 0.2.  This module writes that network with batched tensor
ops and hand-written backward passes, so that images can be reconstructed by gradient descent
through it (the paper's HOG and HOGb pre-images).

Pipeline (``vl/hog.c``: ``vl_hog_put_image`` then ``vl_hog_extract``), for an image of
``H x W`` pixels, cell size ``s`` and ``K`` orientations:

1. Central differences ``gx = I(x+1, y) - I(x-1, y)``, ``gy = I(x, y+1) - I(x, y-1)`` on the
   *interior* pixels only (VLFeat skips the one-pixel border).  For colour images each pixel
   keeps the channel with the largest ``gx^2 + gy^2`` (the first one on ties).
2. Orientation assignment: the gradient is dotted with the ``K`` directions ``k pi / K``; the
   largest absolute score picks one of ``2K`` directed bins (``k``, or ``k + K`` for a
   negative score; the first ``k`` on ties).  HOG gives the whole magnitude ``|g|`` to that
   bin.  HOGb (``vl_hog_set_use_bilinear_orientation_assignments``) splits it between the
   best bin and the second best one (a neighbour of it) with weights ``1 - w1`` and
   ``w1 = acos(best score / |g|) / (pi / K)``, the angle between the gradient and the best
   bin's direction in bins.
3. Spatial pooling: a pixel at ``x`` falls between the cells whose centres are left and right
   of it, with bilinear weights from ``hx = (x + 0.5) / s - 0.5`` (likewise in ``y``);
   contributions to cells outside the ``Hc x Wc`` grid are dropped, ``Hc = (H + s // 2) // s``,
   ``Wc = (W + s // 2) // s`` (integer divisions: the last cell is at least half inside).
4. Block normalization (``vl_hog_extract``): ``n`` is the squared norm of each cell's
   *undirected* histogram (directed bins ``k`` and ``k + K`` added).  A cell has four
   ``2 x 2`` blocks around it; block norms use clamped cell indices at the grid border (so
   border cells count twice) and factors ``1 / sqrt(sum + 1e-4)``.  The four normalized
   copies are clamped at 0.2 and summed times 0.5, for the ``2K`` directed and ``K``
   undirected histograms; the four texture features are the sums over ``K`` of the clamped
   undirected copies times ``1 / sqrt(18)`` = 0.2357 (whatever ``K`` is).

The output is ``(N, 3K + 4, Hc, Wc)``: ``2K`` directed, ``K`` undirected and 4 texture
channels in VLFeat's order; :func:`to_vlfeat_layout` gives VLFeat's ``(rows, cols, dims)``.

Matching the binary.  The reference is the libvl 0.9.21 binary (Debian ``libvlfeat1``, called
by ``cyvlfeat.hog.hog``), whose code differs from ``vl/hog.c`` on GitHub master: the
orientation scores use the *raw* gradient, ``sin_k * gy + cos_k * gx`` (float products, float
sum), and only the best score is normalized, inside the arc cosine:
``acosf((float) min((double) best / max((double) |g|, 1e-10), 1.0))``; the running scores start
at -1, so a bin is always assigned.  Bins are decided by float rounding at exact or near ties
(a vertical gradient is exactly between two bins for odd ``K``), and in HOGb one ulp of the
ratio moves ``w1`` by up to ~1e-3 near a bin centre (``acos`` has an infinite slope at 1).
So the bins come from ``atan2`` except within 1e-3 bins of a tie, where libvl's float scan is
replayed, and ``w1`` replays libvl's float arithmetic, with a correctly rounded square root
(torch's float32 ``sqrt`` on CPU is not always correctly rounded).  The rest only needs float
accuracy.  With float32 inputs in ``0 .. 255`` the result equals VLFeat's to ~3e-7.
Half-precision inputs are computed in float32; float64 inputs in float64, where HOGb's ``w1``
is the exact angle and bins may differ from VLFeat's float32 choice at near-ties.

Differentiability.  The orientation choices (best bin, HOGb's second bin, the colour channel)
are piecewise constant and carry no gradient: the backward pass differentiates the magnitude
``|g|`` and, for HOGb, the weight ``w1`` as the exact angle to the bin centre
(``d w1 = +-d atan2(gy, gx) / (pi / K)``), i.e. the derivative of the function inside the
region where those choices are fixed.  At the boundaries between regions plain HOG is
discontinuous (a gradient jumps to the next bin) and its derivative ignores the jump; HOGb
is continuous there.  At non-differentiable points: null gradients (flat image regions) get
a zero derivative (a subgradient of ``|g|``; the angle is undefined), HOGb's kink at a bin
centre gets a one-sided derivative, and the 0.2 clamp passes the gradient up to and
including 0.2.  All divisions by ``|g|`` are guarded, so flat images give finite (zero)
gradients, never NaN.  In float32, HOGb's ``w1`` is libvl's value while its derivative is the
exact angle's (libvl's direction tables are unit vectors to 1e-8 only, which bends its
``w1`` slightly within ~1e-3 rad of bin centres); in float64 the two agree.

Speed: the orientation step uses ``atan2`` rather than ``K`` dot products, pooling is four
``index_add_`` per orientation assignment into a padded histogram, and the normalization and
all other steps have hand-written backward passes (autograd's ``clamp``, ``where`` and
slicing backward kernels dominate otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .base import Geometry, Representation, RepresentationError

__all__ = ["HOG", "hog", "hog_shape", "to_vlfeat_layout"]

_CLAMP = 0.2
"""Saturation of the normalized histograms (``VL_MIN(0.2, ...)`` in ``vl_hog_extract``)."""

_BLOCK_EPS = 1e-4
"""Added to each squared block norm before the square root (UoCTTI convention)."""

_TEXTURE_FACTOR = float(np.float32(1.0) / np.sqrt(np.float32(18.0)))
"""``1.0f / sqrtf(18.0f)`` = 0.2357, the texture features' factor (independent of ``K``)."""

_AMBIGUITY = 1e-3
"""Distance in bins to a bin boundary (or, for HOGb, to a bin centre) below which float
rounding may decide a pixel's bins: they are recomputed there with libvl's exact scan."""


def hog_shape(height: int, width: int, cell_size: int = 8) -> tuple[int, int]:
    """Number of HOG cells ``(Hc, Wc)`` for an image of ``height x width`` pixels (VLFeat rule)."""
    return (height + cell_size // 2) // cell_size, (width + cell_size // 2) // cell_size


# --------------------------------------------------------------------------------------------
# Fixed tables, built with numpy (VLFeat's float roundings) and cached as tensors
# --------------------------------------------------------------------------------------------
def _slot_directions(k_or: int) -> np.ndarray:
    """Unit vectors ``(cos, sin)`` of the directed bins, one per *orientation slot*, ``(2K + 3, 2)``.

    Slot ``j`` stands for the directed bin ``(j - K - 1) mod 2K``, at the angle
    ``(j - K - 1) pi / K``: rounding the gradient angle ``atan2(gy, gx) / (pi / K)`` in
    ``[-K, K]`` and taking its neighbours then needs no modulo.  The values are VLFeat's
    float tables ``(float) cos(k pi / K)``, ``(float) sin(k pi / K)`` for ``k < K``, negated
    (exactly) for the bins ``k + K``.
    """
    angles = np.arange(k_or, dtype=np.float64) * math.pi / k_or
    table = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)  # (K, 2)
    directed = np.concatenate([table, -table])  # (2K, 2)
    return directed[(np.arange(2 * k_or + 3) - k_or - 1) % (2 * k_or)]


def _slot_fold(k_or: int) -> np.ndarray:
    """``(2K + 3, 2K)`` 0/1 matrix summing the orientation slots into the ``2K`` directed bins."""
    slots = np.arange(2 * k_or + 3)
    fold = np.zeros((2 * k_or + 3, 2 * k_or), dtype=np.float32)
    fold[slots, (slots - k_or - 1) % (2 * k_or)] = 1
    return fold


@lru_cache(maxsize=64)
def _axis_weights(length: int, cell_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear weights of the interior pixels ``1 .. length - 2`` along one axis.

    Returns ``(left, w1, w2)``, each ``(length - 2,)``: the cell whose centre is at or before
    the pixel (``-1`` before the first centre) and the weights of that cell and of the next
    one, with VLFeat's float arithmetic (``hx = (float) ((x + 0.5) / s - 0.5)``,
    ``left = floor(hx)``, ``w2 = hx - left``, ``w1 = 1 - w2``).  The last pixel's next cell
    is at most ``Wc``, just outside the grid.
    """
    pos = np.arange(1, length - 1, dtype=np.float64)
    h = ((pos + 0.5) / cell_size - 0.5).astype(np.float32)
    left = np.floor(h).astype(np.int64)
    w2 = h - left.astype(np.float32)
    w1 = (1.0 - w2.astype(np.float64)).astype(np.float32)
    return left, w1, w2


def _corner_weights(height: int, width: int, cell_size: int) -> np.ndarray:
    """``(4, H', W')`` weights of each interior pixel in the cells up-left, up-right,
    down-left and down-right of it (``wy1 wx1``, ``wy1 wx2``, ``wy2 wx1``, ``wy2 wx2``)."""
    _, wy1, wy2 = _axis_weights(height, cell_size)
    _, wx1, wx2 = _axis_weights(width, cell_size)
    return np.stack([np.outer(wy, wx) for wy in (wy1, wy2) for wx in (wx1, wx2)])


def _pixel_index(height: int, width: int, cell_size: int, k_or: int) -> np.ndarray:
    """``(H', W')`` flat index of each interior pixel's up-left cell, orientation slot 0, in one
    image's ``(Hc + 2, Wc + 2, 2K + 3)`` histogram padded by one cell on each side.

    The other three cells are at constant offsets (:func:`_corner_offsets`); cells outside the
    ``Hc x Wc`` grid fall in the padding, which is dropped as VLFeat drops them.  The
    orientation slots are innermost, so neighbouring pixels write to nearby memory.
    """
    _, wc = hog_shape(height, width, cell_size)
    top = _axis_weights(height, cell_size)[0] + 1  # padded row of the up-left cell
    left = _axis_weights(width, cell_size)[0] + 1
    return ((top.reshape(-1, 1) * (wc + 2) + left.reshape(1, -1)) * (2 * k_or + 3)).astype(np.int32)


def _corner_offsets(height: int, width: int, cell_size: int, k_or: int) -> tuple[int, ...]:
    """Flat offsets of the up-left, up-right, down-left, down-right cells (see :func:`_pixel_index`)."""
    _, wc = hog_shape(height, width, cell_size)
    row, slots = (wc + 2) * (2 * k_or + 3), 2 * k_or + 3
    return (0, slots, row, row + slots)


def _axis_slots(k_or: int) -> np.ndarray:
    """libvl's orientation slots and side of the gradients ``(0, 1), (0, -1), (1, 0), (-1, 0)``.

    Axis-aligned gradients are common in 8-bit images and often exact ties (for odd ``K`` a
    vertical gradient lies on a bin boundary).  Their scores are the table entries times one
    component, so the scan's outcome does not depend on the magnitude and is tabulated here
    (rows as :func:`_bins_to_slots`).
    """
    gx = torch.tensor([0.0, 0.0, 1.0, -1.0])
    gy = torch.tensor([1.0, -1.0, 0.0, 0.0])
    return _bins_to_slots(*_scan(gx, gy, k_or), k_or).numpy().astype(np.float32)


_TENSORS: dict[tuple, Tensor] = {}


def _tensor(
    builder: Callable[..., np.ndarray], args: tuple, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``builder(*args)`` (a numpy table) as a tensor on ``device``, cached."""
    key = (builder.__name__, args, str(device), dtype)
    value = _TENSORS.get(key)
    if value is None:
        if len(_TENSORS) > 64:
            _TENSORS.clear()
        value = torch.from_numpy(np.ascontiguousarray(builder(*args))).to(device=device, dtype=dtype)
        _TENSORS[key] = value
    return value


def _first_argmax(values: Tensor, dim: int) -> Tensor:
    """Index of the first maximum along ``dim`` (kept), like ``argmax`` but fast on CPU along a
    strided or short axis, where ``argmax`` is very slow."""
    size = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = size
    rank_dtype = torch.uint8 if size < 256 else torch.int64
    rank = torch.arange(size, 0, -1, device=values.device, dtype=rank_dtype).view(shape)  # first wins
    first = size - (values.eq(values.amax(dim=dim, keepdim=True)) * rank).amax(dim=dim, keepdim=True).long()
    return first.clamp_max_(size - 1)  # (NaN rows)


# --------------------------------------------------------------------------------------------
# Step 1: gradients
# --------------------------------------------------------------------------------------------
class _CentralDifferences(torch.autograd.Function):
    """``x (N, C, H, W) -> gx, gy, g2`` on the interior pixels ``(N, H - 2, W - 2)``.

    ``gx = I(x + 1, y) - I(x - 1, y)``, ``gy = I(x, y + 1) - I(x, y - 1)``, ``g2 = gx^2 + gy^2``
    (two float products and a sum, as libvl; not differentiable).  For colour images each
    pixel keeps the channel with the largest ``g2``, the first one on ties (libvl's strict
    ``>`` scan); the gradient flows to that channel.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gx = x[:, :, 1:-1, 2:] - x[:, :, 1:-1, :-2]
        gy = x[:, :, 2:, 1:-1] - x[:, :, :-2, 1:-1]
        g2 = gx * gx + gy * gy
        selected = None
        if x.shape[1] > 1:
            channel = _first_argmax(g2, dim=1)
            selected = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1) == channel
            gx, gy, g2 = gx.gather(1, channel), gy.gather(1, channel), g2.gather(1, channel)
        ctx.save_for_backward(selected)
        ctx.shape = x.shape
        ctx.mark_non_differentiable(g2)
        return gx[:, 0], gy[:, 0], g2[:, 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x: Tensor | None, grad_y: Tensor | None, _grad_g2: Tensor | None):
        (selected,) = ctx.saved_tensors
        reference = grad_x if grad_x is not None else grad_y
        image = reference.new_zeros(ctx.shape)
        for grad, (plus, minus) in (
            (grad_x, ((slice(1, -1), slice(2, None)), (slice(1, -1), slice(0, -2)))),
            (grad_y, ((slice(2, None), slice(1, -1)), (slice(0, -2), slice(1, -1)))),
        ):
            if grad is None:
                continue
            grad = grad.unsqueeze(1) if selected is None else grad.unsqueeze(1) * selected
            image[(slice(None), slice(None)) + plus] += grad
            image[(slice(None), slice(None)) + minus] -= grad
        return image


# --------------------------------------------------------------------------------------------
# Step 2: orientation assignment
# --------------------------------------------------------------------------------------------
def _scan(gx: Tensor, gy: Tensor, k_or: int) -> tuple[Tensor, Tensor]:
    """libvl's orientation scan on ``(M,)`` gradients: the best and second directed bins.

    Scores are ``sin_k * gy + cos_k * gx`` in the gradients' dtype (two products and a sum,
    each rounded, as the C code); the best bin is the first maximum of ``|score|`` over ``k``
    (a strict ``>`` scan), the second the first maximum of the others; a negative score maps
    ``k`` to ``k + K``.
    """
    table = _tensor(_slot_directions, (k_or,), gx.device, gx.dtype)[k_or + 1 : 2 * k_or + 1]  # bins 0..K-1
    scores = table[:, 1:] * gy + table[:, :1] * gx  # (K, M)
    magnitudes = scores.abs()
    k0 = _first_argmax(magnitudes, dim=0)
    bin0 = k0 + k_or * (scores.gather(0, k0) < 0)
    if k_or == 1:
        return bin0[0], bin0[0]
    k1 = _first_argmax(magnitudes.scatter(0, k0, -1.0), dim=0)
    bin1 = k1 + k_or * (scores.gather(0, k1) < 0)
    return bin0[0], bin1[0]


def _bins_to_slots(bin0: Tensor, bin1: Tensor, k_or: int) -> Tensor:
    """Directed bins -> ``(M, 3)``: orientation slots of the best and second bins, and the side
    (+-1) of the best bin's centre where the second one lies."""
    two_k = 2 * k_or
    side = ((bin1 - bin0) % two_k == 1).long() * 2 - 1
    return torch.stack([(bin0 + k_or) % two_k + 1, (bin1 + k_or) % two_k + 1, side], dim=1)


def _exact_slots(gx: Tensor, gy: Tensor, k_or: int) -> tuple[Tensor, Tensor, Tensor]:
    """libvl's best and second orientation slots and the side, for ``(M,)`` gradients."""
    vertical, horizontal = gx == 0, gy == 0
    case = vertical * (gy < 0) + horizontal * (2 + (gx < 0))  # row of _axis_slots
    result = _tensor(_axis_slots, (k_or,), gx.device, gx.dtype)[case]  # (M, 3)
    rest = (~(vertical | horizontal)).nonzero()[:, 0]
    if rest.numel() > 0:
        result[rest] = _bins_to_slots(*_scan(gx[rest], gy[rest], k_or), k_or).to(gx.dtype)
    return result[:, 0], result[:, 1], result[:, 2]


def _exact_weight(gx: Tensor, gy: Tensor, g2: Tensor, slot0: Tensor, k_or: int) -> Tensor:
    """libvl's HOGb weight of the second bin, ``acosf((float) min((double) best / max((double)
    |g|, 1e-10), 1.0)) / (pi / K)`` with ``best = |sin_k0 * gy + cos_k0 * gx|``.

    ``acos`` is ill-conditioned near 1 (one ulp of the ratio moves the weight by ~1e-3 at a bin
    centre), so the ratio is computed exactly as in C: ``|g| = sqrtf(g2)`` needs a correctly
    rounded square root, which torch's float32 ``sqrt`` on CPU is not always (float64 rounded
    to float32 is), and a float division is the double one rounded.  After ``acos`` float
    precision is plenty.
    """
    directions = _tensor(_slot_directions, (k_or,), gx.device, gx.dtype)
    flat = slot0.reshape(-1)
    best = directions[:, 1].index_select(0, flat).view_as(gy).mul_(gy)
    best += directions[:, 0].index_select(0, flat).view_as(gx).mul_(gx)
    magnitude = g2.double().sqrt_().to(g2.dtype) if g2.dtype == torch.float32 else g2.sqrt()
    ratio = best.abs_().div_(magnitude.clamp_min_(1e-10)).clamp_(max=1.0)
    return ratio.acos_().mul_(k_or / math.pi)


class _Magnitudes(torch.autograd.Function):
    """The gradient magnitude given to the orientation bins: ``|g|`` (HOG), or ``|g| (1 - w1)``
    and ``|g| w1`` (HOGb).

    ``forward(gx, gy, magnitude, w1, slope)``: ``magnitude`` = ``|g|`` and ``w1`` (``None`` for
    HOG) are given without gradient.  The backward pass differentiates
    ``|g| = sqrt(gx^2 + gy^2)`` and ``w1 = |angle - centre| / (pi / K)``, whose derivative is
    ``slope * d atan2(gy, gx)`` with ``slope = +-K / pi`` on either side of the centre:
    ``d|g| = (gx dgx + gy dgy) / |g|`` and ``|g| dw1 = slope (gx dgy - gy dgx) / |g|``.  Both
    are taken as 0 at null gradients (a subgradient of ``|g|``; the angle is undefined there).
    """

    @staticmethod
    def forward(ctx, gx: Tensor, gy: Tensor, magnitude: Tensor, w1: Tensor | None, slope: Tensor | None):
        ctx.save_for_backward(gx, gy, magnitude, w1, slope)
        if w1 is None:
            return magnitude.clone()
        v1 = magnitude * w1
        return magnitude - v1, v1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad0: Tensor | None, grad1: Tensor | None = None):
        gx, gy, magnitude, w1, slope = ctx.saved_tensors
        # unit gradient, (0, 0) at null gradients; |ux|, |uy| <= 1 (no overflow)
        inverse = magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny).reciprocal_()
        ux, uy = gx * inverse, gy * inverse
        along = torch.zeros_like(magnitude) if grad0 is None else grad0  # coefficient of (ux, uy)
        if w1 is None:
            return along * ux, along * uy, None, None, None
        difference = -along if grad1 is None else grad1 - along
        along = difference * w1 + along
        across = difference.mul_(slope)  # coefficient of (-uy, ux)
        return along * ux - across * uy, along * uy + across * ux, None, None, None


def _orientations(
    gx: Tensor, gy: Tensor, g2: Tensor, k_or: int, bilinear: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Step 2: orientation slots (see :func:`_slot_directions`) and the magnitudes they get.

    Returns lists of ``(N, H', W')`` tensors, one entry for HOG, two for HOGb (``K >= 2``): the
    int32 orientation slot of the best bin (and of the second one) and the part of the
    gradient magnitude it receives.  The best bin is the one whose centre ``b pi / K`` is
    nearest to the gradient angle, the second one its neighbour on the angle's side.  They
    come from ``atan2``, except on the few pixels within :data:`_AMBIGUITY` of a bin boundary
    (or, for HOGb, of a bin centre), where float rounding decides and libvl's scan is redone
    (:func:`_exact_slots`).  In float32 HOGb's weight is computed as libvl does
    (:func:`_exact_weight`); in float64 it is the exact angular distance to the best centre.
    Gradients flow through the magnitudes and HOGb's weights (:class:`_Magnitudes`), the
    latter as the derivative of the exact angular distance (libvl's float32 value differs from
    it by its rounding, e.g. its direction tables are unit vectors to 1e-8 only).
    """
    dtype = gx.dtype
    two_k = 2 * k_or
    with torch.no_grad():
        gxd, gyd = gx.detach(), gy.detach()
        magnitude = g2.sqrt()  # (torch's float32 sqrt may be 1 ulp off: harmless here)
        # the gradient angle in bins, in [-K, K], shifted by K + 1.5 so that its floor is the
        # orientation slot of the nearest bin centre
        angle = torch.atan2(gyd, gxd).mul_(k_or / math.pi)
        shifted = angle + (k_or + 1.5)
        slot0 = shifted.floor()
        offset = shifted.sub_(slot0).sub_(0.5)  # angle - nearest centre, in bins, [-0.5, 0.5]
        distance = offset.abs()
        ambiguous = distance > 0.5 - _AMBIGUITY
        if bilinear:
            side = offset.sign_()  # side of the best centre where the angle lies
            slot1 = slot0 + side  # the neighbour there (side == 0 is ambiguous: redone below)
            ambiguous |= (distance < _AMBIGUITY) & (g2 > 0)
        subset = ambiguous.view(-1).nonzero()[:, 0]
        if subset.numel() > 0:
            exact0, exact1, exact_side = _exact_slots(gxd.reshape(-1)[subset], gyd.reshape(-1)[subset], k_or)
            slot0.view(-1)[subset] = exact0
            if bilinear:
                slot1.view(-1)[subset] = exact1
                if k_or > 1:
                    side.view(-1)[subset] = exact_side
        slot0 = slot0.to(torch.int32)
        if bilinear:
            if dtype == torch.float32:  # libvl's value
                w1 = _exact_weight(gxd, gyd, g2, slot0, k_or)
            else:  # the angular distance to the best centre, consistent with the derivative
                w1 = angle.sub_(slot0).add_(2 * k_or + 1).remainder_(two_k).sub_(k_or).abs_()
            slope = side.mul_(k_or / math.pi)  # d w1 / d angle
    if not bilinear:
        return [slot0], [_Magnitudes.apply(gx, gy, magnitude, None, None)]
    v0, v1 = _Magnitudes.apply(gx, gy, magnitude, w1, slope)
    if k_or == 1:  # no second orientation: VLFeat still scales the only bin by 1 - w1
        return [slot0], [v0]
    return [slot0, slot1.to(torch.int32)], [v0, v1]


# --------------------------------------------------------------------------------------------
# Step 3: spatial pooling
# --------------------------------------------------------------------------------------------
class _CellPooling(torch.autograd.Function):
    """Bilinear pooling of the assigned magnitudes into ``(N, Hc, Wc, 2K)`` histograms.

    ``forward(geometry, slot0, value0, slot1, value1)`` (``slot1``, ``value1`` ``None`` for
    HOG): each interior pixel adds ``value * w`` to its four neighbouring cells (weights of
    :func:`_corner_weights`) at its orientation slot, with four ``index_add_`` into a padded
    histogram (the corners are constant offsets of one index: views of the buffer), whose
    padding (contributions outside the grid) is then dropped; the orientation slots are
    folded into the ``2K`` bins.  The backward pass gathers the same entries.
    """

    @staticmethod
    def forward(ctx, geometry: tuple[int, int, int, int], *slots_values: Tensor | None) -> Tensor:
        height, width, cell_size, k_or = geometry
        pairs = [(s, v) for s, v in zip(slots_values[::2], slots_values[1::2]) if s is not None]
        first = pairs[0][1]
        n, device, dtype = first.shape[0], first.device, first.dtype
        hc, wc = hog_shape(height, width, cell_size)
        n_slots = 2 * k_or + 3
        base = _tensor(_pixel_index, (height, width, cell_size, k_or), device)
        weights = _tensor(_corner_weights, (height, width, cell_size), device, dtype)
        offsets = _corner_offsets(height, width, cell_size, k_or)
        image_size = (hc + 2) * (wc + 2) * n_slots
        if n * image_size >= 2**31:
            raise RepresentationError("hog: batch too large for int32 indexing; split it")
        padded = first.new_zeros(n * image_size)
        images = torch.arange(0, n * image_size, image_size, device=device, dtype=torch.int32).view(n, 1, 1)
        indices = []
        for slot, value in pairs:  # one or two orientation assignments per pixel
            index = (slot + images).add_(base).view(-1)
            indices.append(index)
            for offset, weight in zip(offsets, weights):  # the four cells around the pixel
                # in-place index_add_ into a fresh buffer: several times faster than out-of-place
                padded[offset:].index_add_(0, index, (value * weight).view(-1))
        ctx.save_for_backward(*indices)
        ctx.geometry = geometry
        hist = padded.view(n, hc + 2, wc + 2, n_slots)[:, 1:-1, 1:-1]
        return torch.matmul(hist, _tensor(_slot_fold, (k_or,), device, dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        height, width, cell_size, k_or = ctx.geometry
        indices = ctx.saved_tensors
        n, hc, wc, _ = grad.shape
        weights = _tensor(_corner_weights, (height, width, cell_size), grad.device, grad.dtype)
        offsets = _corner_offsets(height, width, cell_size, k_or)
        fold = _tensor(_slot_fold, (k_or,), grad.device, grad.dtype)
        padded = grad.new_zeros(n, hc + 2, wc + 2, 2 * k_or + 3)
        padded[:, 1:-1, 1:-1] = torch.matmul(grad, fold.t())
        padded = padded.view(-1)
        grads: list[Tensor | None] = [None]
        for index in indices:
            value_grad = None
            for offset, weight in zip(offsets, weights):
                term = padded[offset:].index_select(0, index).view(n, height - 2, width - 2).mul_(weight)
                value_grad = term if value_grad is None else value_grad.add_(term)
            grads += [None, value_grad]
        return tuple(grads + [None] * (5 - len(grads)))


# --------------------------------------------------------------------------------------------
# Step 4: block normalization
# --------------------------------------------------------------------------------------------
class _BlockNormalization(torch.autograd.Function):
    """``(N, Hc, Wc, 2K)`` directed histograms -> ``(N, Hc, Wc, 3K + 4)`` UoCTTI code.

    ``u`` = undirected histogram (bins ``k`` and ``k + K`` added), ``n = |u|^2`` per cell; the
    four ``2 x 2`` blocks around a cell have factors ``f = 1 / sqrt(sum of n + 1e-4)``, with
    clamped cell indices at the border (replicate padding).  The code is ``0.5 sum_f min(0.2,
    f h)`` for ``h`` directed and undirected, and ``0.2357 sum_k min(0.2, f u_k)`` per block
    (texture).  The backward pass is written out: autograd's ``clamp`` and slicing backward
    passes dominate the cost otherwise.
    """

    @staticmethod
    def forward(ctx, hist: Tensor) -> Tensor:
        two_k = hist.shape[-1]
        k_or = two_k // 2
        undirected = hist[..., :k_or] + hist[..., k_or:]
        norm = (undirected * undirected).sum(dim=-1)  # (N, Hc, Wc)
        padded = torch.nn.functional.pad(norm.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
        block = padded[:, :-1, :-1] + padded[:, :-1, 1:] + padded[:, 1:, :-1] + padded[:, 1:, 1:]
        # (N, Hc + 1, Wc + 1): block (i, j) covers the cells i - 1 .. i, j - 1 .. j
        factor = block.add_(_BLOCK_EPS).rsqrt_()
        factors = _block_factors(factor)  # (4, N, Hc, Wc, 1): up-left, up-right, down-left, down-right
        stacked = torch.cat([hist, undirected], dim=-1)  # (N, Hc, Wc, 3K)
        normalized = factors * stacked  # (4, N, Hc, Wc, 3K)
        passing = torch.le(normalized, _CLAMP, out=torch.empty_like(normalized))  # 1 where not clamped
        normalized.clamp_(max=_CLAMP)
        texture = normalized[..., two_k:].sum(dim=-1).mul_(_TEXTURE_FACTOR)  # (4, N, Hc, Wc)
        ctx.save_for_backward(undirected, factor, stacked, passing)
        return torch.cat([normalized.sum(dim=0).mul_(0.5), texture.permute(1, 2, 3, 0)], dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        undirected, factor, stacked, passing = ctx.saved_tensors
        k_or = undirected.shape[-1]
        two_k = 2 * k_or
        factors = _block_factors(factor)
        # gradient of the four clamped products f_b * stacked, (4, N, Hc, Wc, 3K); the clamp
        # passes the gradient up to and including 0.2
        grad_products = passing * (grad[..., : 3 * k_or] * 0.5)
        grad_texture = (grad[..., 3 * k_or :] * _TEXTURE_FACTOR).permute(3, 0, 1, 2).unsqueeze(-1)
        grad_products[..., two_k:].addcmul_(passing[..., two_k:], grad_texture)
        grad_factors = torch.einsum("bnhwc,nhwc->bnhw", grad_products, stacked)  # (4, N, Hc, Wc)
        grad_stacked = grad_products.mul_(factors).sum(dim=0)  # (N, Hc, Wc, 3K)
        grad_factor = torch.zeros_like(factor)
        grad_factor[:, :-1, :-1] += grad_factors[0]
        grad_factor[:, :-1, 1:] += grad_factors[1]
        grad_factor[:, 1:, :-1] += grad_factors[2]
        grad_factor[:, 1:, 1:] += grad_factors[3]
        grad_block = grad_factor.mul_(factor.pow(3)).mul_(-0.5)  # d rsqrt(z) = -z^(-3/2) / 2
        n, hc, wc = grad_block.shape[0], grad_block.shape[1] - 1, grad_block.shape[2] - 1
        grad_padded = grad_block.new_zeros(n, hc + 2, wc + 2)
        grad_padded[:, :-1, :-1] += grad_block
        grad_padded[:, :-1, 1:] += grad_block
        grad_padded[:, 1:, :-1] += grad_block
        grad_padded[:, 1:, 1:] += grad_block
        # adjoint of the replicate padding: the padding rows and columns go to the border cells
        rows = grad_padded[:, 1:-1].clone()
        rows[:, 0] += grad_padded[:, 0]
        rows[:, -1] += grad_padded[:, -1]
        grad_norm = rows[:, :, 1:-1].clone()
        grad_norm[:, :, 0] += rows[:, :, 0]
        grad_norm[:, :, -1] += rows[:, :, -1]
        grad_undirected = grad_stacked[..., two_k:] + 2 * undirected * grad_norm.unsqueeze(-1)
        return grad_stacked[..., :two_k] + grad_undirected.repeat(1, 1, 1, 2)


def _block_factors(factor: Tensor) -> Tensor:
    """The factors of the four blocks containing each cell, ``(4, N, Hc, Wc, 1)``."""
    return torch.stack(
        [factor[:, :-1, :-1], factor[:, :-1, 1:], factor[:, 1:, :-1], factor[:, 1:, 1:]]
    ).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
def hog(
    image: Tensor,
    cell_size: int = 8,
    num_orientations: int = 9,
    bilinear_orientations: bool = False,
) -> Tensor:
    """UoCTTI HOG (or HOGb) of a batch of images, as VLFeat's ``vl_hog`` (paper section 4.1).

    Args:
        image: ``(N, C, H, W)`` floating-point images, ``C`` = 1 (gray) or 3 (colour), in
            VLFeat's intensity range ``0 .. 255`` (the block normalization's ``1e-4`` makes the
            code depend slightly on the scale; an offset does not matter).  ``H, W >= 3``.
        cell_size: cell side ``s`` in pixels.
        num_orientations: ``K``, the number of undirected orientations.
        bilinear_orientations: HOGb, bilinear orientation assignment
            (``vl_hog_set_use_bilinear_orientation_assignments``).

    Returns:
        ``(N, 3K + 4, Hc, Wc)`` codes, ``(Hc, Wc)`` = :func:`hog_shape` ``(H, W, s)``, in the
        input's dtype (half-precision inputs are computed in float32).

    Raises:
        RepresentationError: on a bad shape, dtype or parameter.
    """
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise RepresentationError(
            f"hog: expected images of shape (N, 1 or 3, H, W), got {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise RepresentationError(f"hog: expected a floating-point image, got {image.dtype}")
    if cell_size < 1 or num_orientations < 1:
        raise RepresentationError(f"hog: bad cell_size={cell_size} or num_orientations={num_orientations}")
    n, _, height, width = image.shape
    hc, wc = hog_shape(height, width, cell_size)
    if n < 1 or height < 3 or width < 3 or hc < 1 or wc < 1:
        raise RepresentationError(
            f"hog: a batch of {n} {height}x{width} images is too small for cells of {cell_size} pixels"
        )
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    gx, gy, g2 = _CentralDifferences.apply(image.to(dtype))
    slots, values = _orientations(gx, gy, g2, num_orientations, bilinear_orientations)
    pairs = [t for pair in zip(slots, values) for t in pair] + [None, None]
    hist = _CellPooling.apply((height, width, cell_size, num_orientations), *pairs[:4])
    code = _BlockNormalization.apply(hist)  # (N, Hc, Wc, 3K + 4)
    return code.permute(0, 3, 1, 2).contiguous().to(image.dtype)


def to_vlfeat_layout(code: Tensor) -> Tensor:
    """``(N, dims, rows, cols)`` codes -> VLFeat/cyvlfeat's layout ``(N, rows, cols, dims)``."""
    if code.dim() != 4:
        raise RepresentationError(
            f"hog: expected codes of shape (N, dims, rows, cols), got {tuple(code.shape)}"
        )
    return code.permute(0, 2, 3, 1)


class HOG(Representation):
    """HOG / HOGb (VLFeat UoCTTI variant) as a representation Φ (paper section 4.1).

    The input space is VLFeat's ``0 .. 255`` intensities minus a mean of 128: HOG only sees
    differences between pixels, so the mean does not change the code and is only there for
    display.  Geometry: a cell pools the pixels within one cell of its centre (bilinear
    weights, support ``2s``) and block normalization reaches one more cell on each side, so a
    code location depends on a ``4s x 4s`` window; the stride is the cell size ``s``.

    ``surrogate_gradient`` (plain HOG only; beyond the paper): the hard orientation assignment
    of HOG is piecewise constant, so its exact derivative ignores how a pixel's orientation
    could move between bins, and gradient descent only adjusts magnitudes.  With this option
    the *value* is still exactly VLFeat's HOG, but the gradient is that of HOGb (bilinear
    orientations) — a straight-through estimator ``stop_gradient(hog) + hogb - stop_gradient(hogb)``.
    It roughly halves the inversion error of plain HOG (see README) at about twice the cost.
    """

    scale = 255.0
    bgr = False

    def __init__(
        self,
        cell_size: int = 8,
        num_orientations: int = 9,
        bilinear_orientations: bool = False,
        color: bool = False,
        surrogate_gradient: bool = False,
    ) -> None:
        self.in_channels = 3 if color else 1  # read by Representation.__init__ for the mean
        super().__init__()
        self.name = "hogb" if bilinear_orientations else "hog"
        self.surrogate_gradient = surrogate_gradient and not bilinear_orientations
        self.cell_size = cell_size
        self.num_orientations = num_orientations
        self.bilinear_orientations = bilinear_orientations
        self.color = color
        self.geometry = Geometry(stride=cell_size, receptive_field=4 * cell_size)
        self.mean.fill_(128.0)

    @property
    def dimension(self) -> int:
        """Number of channels of the code, ``3K + 4``."""
        return 3 * self.num_orientations + 4

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` inputs (``0 .. 255`` minus the mean) -> ``(N, 3K + 4, Hc, Wc)``."""
        self.check_input(x)
        if self.surrogate_gradient and torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                hard = hog(x, self.cell_size, self.num_orientations, False)
            soft = hog(x, self.cell_size, self.num_orientations, True)
            return hard + (soft - soft.detach())
        return hog(x, self.cell_size, self.num_orientations, self.bilinear_orientations)

    def config(self) -> dict[str, object]:
        return {"cell_size": self.cell_size, "num_orientations": self.num_orientations,
                "bilinear_orientations": self.bilinear_orientations, "color": self.color,
                "surrogate_gradient": self.surrogate_gradient}

    @staticmethod
    def to_vlfeat_layout(code: Tensor) -> Tensor:
        """``(N, dims, rows, cols)`` -> VLFeat's ``(N, rows, cols, dims)``."""
        return to_vlfeat_layout(code)

    def extra_repr(self) -> str:
        return (
            f"cell_size={self.cell_size}, num_orientations={self.num_orientations}, "
            f"bilinear_orientations={self.bilinear_orientations}, color={self.color}"
        )
