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

Speed.  The network is one autograd function (:class:`_HOGFunction`) with a hand-written
backward pass, made of a fixed number of whole-batch tensor operations (no Python loop over
cells or orientations), applied to groups of images of about :data:`_GROUP_PIXELS` pixels so
that the per-pixel temporaries stay in cache; index and weight tables are cached per image
size, device and dtype.

* Orientations come from one ``atan2`` and a rounding; libvl's scan is replayed only on the
  few ambiguous pixels (found with numpy's ``flatnonzero`` on CPU, much faster than
  ``torch.nonzero`` and torch's comparisons).  On the CPU in float32 the C kernel
  (:func:`preimage.native.hog_orientations`) runs libvl's scan on every pixel instead, with
  ``|g|`` and HOGb's terms, in one vectorized pass (0.17 -> 0.07 ms per image).
* HOGb's two assignments are rewritten as ``|g|`` at the best bin plus a *difference term*:
  with ``lo`` the lower of the two (neighbouring) bins and ``e = +-|g| w1`` (``+`` when the
  second bin is above the best one), HOGb's histogram is ``P(|g| @ best) + P(e @ lo + 1) -
  P(e @ lo)``, ``P`` the spatial pooling of a magnitude at a bin.  ``P`` is linear and the
  bin shift commutes with it, so the difference is taken after pooling, on the small cell
  histograms (:func:`_slot_mixing`).  HOG is ``P(|g| @ best)`` alone: HOG, HOGb, and the
  surrogate-gradient HOG (which needs both codes, sharing everything up to this term) pool
  one or two *terms* per pixel.
* Pooling is separable (:func:`_pool`): each pixel adds its weighted terms to the cells left
  and right of it in per-row histograms (two ``index_add_`` per term); the rows, laid out in
  blocks of ``s`` rows that share their upper cell (:func:`_row_blocks`), are then pooled
  into cells by one batched ``2 x s`` product per block.  In the backward pass each pixel
  gathers the gradients of its four cells from a small padded grid (:func:`_pool_backward`).
  On the CPU in float32 both run in C where preimage's kernels are built
  (:func:`preimage.native.hog_pool`, :func:`~preimage.native.hog_pool_backward`): each pixel
  adds its terms times VLFeat's corner weights ``wy wx`` straight into its four cells, and
  gathers them back, in one pass (HOG 160², 16 images, 2 cores: pooling 0.44 -> 0.12 ms per
  image, its transpose 0.23 -> 0.06; the engine step 1.1-1.3 -> 0.63-0.71 ms per image).
* The block normalization (:func:`_normalize`) is some thirty whole-batch operations on the
  cell histograms; on the CPU in float32, one pass per image in C
  (:func:`preimage.native.hog_normalize`), whose transpose recomputes it from the histogram
  (0.08 -> 0.01 ms per image forward, 0.07 -> 0.03 back).  With the three kernels the engine
  step is 0.39-0.40 ms per image.
* The central differences (with the colour channel chosen per pixel) and the end of the
  backward pass (the unit gradient and the arithmetic of :func:`_backward`, and
  :func:`_central_differences_adjoint`) are a dozen operations over image-sized tensors; on
  the CPU in float32 each is one pass in C (:func:`preimage.native.hog_differences`,
  :func:`~preimage.native.hog_differences_backward`), bit for bit the same arithmetic: the
  engine step 0.39 -> 0.35 ms per image at 160², 16 images, 1.18 -> 0.95 ms for one image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import native
from .base import Geometry, Representation, RepresentationError

__all__ = ["HOG", "hog", "hog_shape", "to_vlfeat_layout"]

_CLAMP = 0.2
"""Saturation of the normalized histograms (``VL_MIN(0.2, ...)`` in ``vl_hog_extract``)."""

_BLOCK_EPS = 1e-4
"""Added to each squared block norm before the square root (UoCTTI convention)."""

_TEXTURE_FACTOR = float(np.float32(1.0) / np.sqrt(np.float32(18.0)))
"""``1.0f / sqrtf(18.0f)`` = 0.2357, the texture features' factor (independent of ``K``)."""

_GROUP_PIXELS = 2**18
"""Pixels per group of images processed together (see :class:`_HOGFunction`)."""

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


def _slot_cosines(k_or: int) -> np.ndarray:
    """``(2K + 3,)`` cosines of :func:`_slot_directions` (contiguous, for ``index_select``)."""
    return np.ascontiguousarray(_slot_directions(k_or)[:, 0])


def _slot_sines(k_or: int) -> np.ndarray:
    """``(2K + 3,)`` sines of :func:`_slot_directions`."""
    return np.ascontiguousarray(_slot_directions(k_or)[:, 1])


def _slot_fold(k_or: int) -> np.ndarray:
    """``(2K + 3, 2K)`` 0/1 matrix summing the orientation slots into the ``2K`` directed bins."""
    slots = np.arange(2 * k_or + 3)
    fold = np.zeros((2 * k_or + 3, 2 * k_or), dtype=np.float32)
    fold[slots, (slots - k_or - 1) % (2 * k_or)] = 1
    return fold


def _slot_mixing(k_or: int, terms: int, codes: tuple[bool, ...]) -> np.ndarray:
    """``(terms * (2K + 3), 2K * len(codes))`` matrix from the pooled orientation slots of each
    term to the directed histograms of each code (``False``: HOG, ``True``: HOGb).

    Term 0 is ``|g|`` at the best slot; term 1 (HOGb) is ``e`` at the lower slot ``lo`` of the
    pair, which counts ``-e`` at ``lo`` and ``+e`` at ``lo + 1`` (``e = +-|g| w1``; see the
    module docstring).  For ``K = 1`` there is no second bin and VLFeat scales the only one
    by ``1 - w1``: term 1 is then ``e = |g| w1`` at the best slot, counted ``-e``.  Each code
    is the term histograms times this matrix followed by the fold of the slots into bins.
    """
    fold = _slot_fold(k_or)
    n_slots = 2 * k_or + 3
    if k_or > 1:
        shift = np.eye(n_slots, k=1, dtype=np.float32) - np.eye(n_slots, dtype=np.float32)
    else:
        shift = -np.eye(n_slots, dtype=np.float32)
    columns = []
    for bilinear in codes:
        second = shift @ fold if bilinear else np.zeros_like(fold)
        columns.append(np.concatenate([fold, second][:terms], axis=0))
    return np.concatenate(columns, axis=1)


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


@lru_cache(maxsize=64)
def _row_blocks(length: int, cell_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Layout of the rows of the per-row histograms, for the vertical pooling.

    The interior rows ``1 .. length - 2`` that share their upper cell ``top`` are ``s``
    consecutive rows (fewer for the first and last cells), so with a few rows of padding
    in front the rows fall in blocks of ``s``, block ``b`` holding the rows with
    ``top = b - 1``.  A block's rows go to cell ``b - 1`` with weights ``wy1`` and to cell ``b``
    with weights ``wy2``, so the vertical pooling is one ``(2, s) @ (s, ...)`` product per
    block.  Returns ``(position, weights)``: the ``(length - 2,)`` padded row of each interior
    row and the ``(blocks, 2, s)`` weights (zero for padding rows and for cells outside the
    grid); there are at least ``Hc + 1`` blocks.
    """
    top, w1, w2 = _axis_weights(length, cell_size)
    cells = (length + cell_size // 2) // cell_size
    first_run = int(np.count_nonzero(top == top[0]))
    position = np.arange(len(top)) + (int(top[0]) + 1) * cell_size + (cell_size - first_run)
    if not np.array_equal(position // cell_size, top + 1):  # pragma: no cover - a VLFeat invariant
        raise AssertionError("hog: rows sharing a cell are not consecutive runs of cell_size")
    blocks = max(int(position[-1]) // cell_size + 1, cells + 1)
    weights = np.zeros((blocks * cell_size, 2), dtype=np.float32)
    weights[position, 0] = np.where((top >= 0) & (top < cells), w1, 0)
    weights[position, 1] = np.where(top + 1 < cells, w2, 0)
    return position, np.ascontiguousarray(weights.reshape(blocks, cell_size, 2).transpose(0, 2, 1))


def _row_weights(length: int, cell_size: int) -> np.ndarray:
    """``(blocks, 2, s)`` weights of :func:`_row_blocks`."""
    return _row_blocks(length, cell_size)[1]


def _first_cells(length: int, cell_size: int) -> np.ndarray:
    """``(length - 2,)`` cell at or before each interior pixel along one axis (``-1 .. cells - 1``)."""
    return _axis_weights(length, cell_size)[0]


def _column_weights(length: int, cell_size: int) -> np.ndarray:
    """``(2, length - 2)`` weights ``wx1, wx2`` of the interior columns in their left and right cells."""
    _, w1, w2 = _axis_weights(length, cell_size)
    return np.stack([w1, w2])


def _pixel_index(height: int, width: int, cell_size: int, k_or: int, terms: int, n: int) -> np.ndarray:
    """``(N, H', W')`` flat index of each interior pixel's left cell, term 0, slot 0 in the batch
    of per-row histograms ``(N, rows, Wc + 2, terms, 2K + 3)`` (:func:`_pool`).

    ``rows`` is the padded row axis of :func:`_row_blocks`; the columns are the cells ``-1 ..
    Wc`` (the two outside the grid are dropped after pooling).  The pixel's right cell is at
    offset ``terms * (2K + 3)``, term ``t`` at offset ``t * (2K + 3)``, its slot at offset
    ``slot``: neighbouring pixels write to nearby memory.
    """
    position, weights = _row_blocks(height, cell_size)
    rows = weights.shape[0] * cell_size
    columns = hog_shape(height, width, cell_size)[1] + 2
    left = _axis_weights(width, cell_size)[0] + 1
    if left.max() + 1 >= columns:  # pragma: no cover - a VLFeat invariant
        raise AssertionError("hog: a pixel's right cell is beyond the padded grid")
    images = np.arange(n).reshape(-1, 1, 1) * rows
    flat = (images + position.reshape(1, -1, 1)) * columns + left.reshape(1, 1, -1)
    return flat * (terms * (2 * k_or + 3))


def _corner_weights(height: int, width: int, cell_size: int) -> np.ndarray:
    """``(4, H', W')`` weights of each interior pixel in the cells up-left, up-right,
    down-left and down-right of it (``wy1 wx1``, ``wy1 wx2``, ``wy2 wx1``, ``wy2 wx2``, float
    products as VLFeat)."""
    _, wy1, wy2 = _axis_weights(height, cell_size)
    _, wx1, wx2 = _axis_weights(width, cell_size)
    return np.stack([np.outer(wy, wx) for wy in (wy1, wy2) for wx in (wx1, wx2)])


def _grid_index(height: int, width: int, cell_size: int, stride: int, n: int) -> np.ndarray:
    """``(N, H', W')`` flat index of each interior pixel's up-left cell in a padded cell grid
    ``(N, Hc + 2, Wc + 2, stride)`` (cells ``-1 .. Hc`` by ``-1 .. Wc``; see
    :func:`_corner_offsets` for the other three cells)."""
    hc, wc = hog_shape(height, width, cell_size)
    top = _axis_weights(height, cell_size)[0] + 1
    left = _axis_weights(width, cell_size)[0] + 1
    rows = np.arange(n).reshape(-1, 1, 1) * (hc + 2) + top.reshape(1, -1, 1)
    flat = rows * (wc + 2) + left.reshape(1, 1, -1)
    return flat * stride


def _corner_offsets(height: int, width: int, cell_size: int, stride: int) -> tuple[int, ...]:
    """Flat offsets of the up-left, up-right, down-left, down-right cells in :func:`_grid_index`'s grid."""
    wc = hog_shape(height, width, cell_size)[1]
    return (0, stride, (wc + 2) * stride, (wc + 3) * stride)


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
# Elementwise helpers: numpy on CPU where it is faster or exact
# --------------------------------------------------------------------------------------------
def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root, as C's ``sqrtf`` / ``sqrt`` (torch's float32 ``sqrt`` on
    CPU is not always; numpy's is, and float64 rounded to float32 is)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return x.double().sqrt_().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


def _atan2(y: Tensor, x: Tensor) -> Tensor:
    """``atan2(y, x)`` (numpy's on CPU: about twice as fast as torch's; both are accurate to
    an ulp or so, far below the :data:`_AMBIGUITY` margin of the bin decisions)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.arctan2(y.numpy(), x.numpy()))
    return torch.atan2(y, x)


def _rescan_every_pixel(device: torch.device) -> bool:
    """Whether :func:`_orientations` rescans every pixel (libvl's scan, :func:`_exact_slots`)
    and takes the scan where the angle is ambiguous: off the CPU, where finding the few
    ambiguous pixels (``nonzero``) makes the host wait for the device and a step could not be
    recorded as a CUDA graph (:mod:`preimage.graphs`).  The same values either way."""
    return device.type != "cpu"


def _indices_above(values: Tensor, threshold: float, positive: Tensor | None = None) -> Tensor:
    """Flat indices of the entries of the CPU tensor ``values`` above ``threshold`` (and where
    ``positive`` is positive), with numpy, where ``torch.nonzero`` and torch's comparisons are
    several times slower (off the CPU :func:`_orientations` needs no indices:
    :func:`_rescan_every_pixel`)."""
    mask = values.numpy() > threshold
    if positive is not None:
        mask &= positive.numpy() > 0
    return torch.from_numpy(np.flatnonzero(mask))


# --------------------------------------------------------------------------------------------
# Step 1: gradients
# --------------------------------------------------------------------------------------------
def _central_differences(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``x (N, C, H, W) -> gx, gy, g2, selected`` on the interior pixels ``(N, H - 2, W - 2)``.

    ``gx = I(x + 1, y) - I(x - 1, y)``, ``gy = I(x, y + 1) - I(x, y - 1)``, ``g2 = gx^2 + gy^2``
    (two float products and a sum, as libvl).  For colour images each pixel keeps the channel
    with the largest ``g2``, the first one on ties (libvl's strict ``>`` scan); ``selected``
    is then the ``(N, C, H', W')`` one-hot mask of that channel (``None`` for gray images).
    """
    gx = image[:, :, 1:-1, 2:] - image[:, :, 1:-1, :-2]
    gy = image[:, :, 2:, 1:-1] - image[:, :, :-2, 1:-1]
    g2 = gx * gx
    g2 += gy * gy
    selected = None
    if image.shape[1] > 1:
        channel = _first_argmax(g2, dim=1)
        selected = torch.arange(image.shape[1], device=image.device).view(1, -1, 1, 1) == channel
        gx, gy, g2 = gx.gather(1, channel), gy.gather(1, channel), g2.gather(1, channel)
    return gx[:, 0], gy[:, 0], g2[:, 0], selected


def _central_differences_adjoint(
    grad_x: Tensor, grad_y: Tensor, selected: Tensor | None, image: Tensor
) -> None:
    """Transpose of :func:`_central_differences` (``gx, gy`` part): the ``(N, C, H, W)`` image
    gradient from the gradients of ``gx, gy``, flowing to the selected channel only, written to
    ``image``."""
    image.zero_()
    grad_x, grad_y = grad_x.unsqueeze(1), grad_y.unsqueeze(1)
    if selected is not None:
        grad_x, grad_y = grad_x * selected, grad_y * selected
    image[:, :, 1:-1, 2:] += grad_x
    image[:, :, 1:-1, :-2] -= grad_x
    image[:, :, 2:, 1:-1] += grad_y
    image[:, :, :-2, 1:-1] -= grad_y


# --------------------------------------------------------------------------------------------
# Step 2: orientation assignment
# --------------------------------------------------------------------------------------------
def _pair_slots(k_or: int) -> np.ndarray:
    """``(4K^2, 2)`` table: for the best and second directed bins ``b0``, ``b1`` (row
    ``b0 * 2K + b1``), the orientation slot of ``b0`` (:func:`_slot_directions`) and the side
    (+-1) of ``b0``'s centre where ``b1`` lies."""
    two_k = 2 * k_or
    b0, b1 = np.divmod(np.arange(two_k * two_k), two_k)
    side = np.where((b1 - b0) % two_k == 1, 1, -1)
    return np.stack([(b0 + k_or) % two_k + 1, side], axis=1).astype(np.float32)


def _bin_directions(k_or: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """VLFeat's ``(K, 2)`` table ``(cos, sin)`` of the undirected bins ``0 .. K - 1`` (slots
    ``K + 1 .. 2K`` of :func:`_slot_directions`), the directions libvl's scan compares."""
    return _tensor(_slot_directions, (k_or,), device, dtype)[k_or + 1 : 2 * k_or + 1]


def _exact_slots(gx: Tensor, gy: Tensor, k_or: int) -> tuple[Tensor, Tensor]:
    """libvl's orientation scan on ``(M,)`` gradients: the best orientation slot and the side
    of its centre where the second best bin lies (as floats).

    Scores are ``sin_k * gy + cos_k * gx`` in the gradients' dtype (two products and a sum,
    each rounded, as the C code); the best bin is the first maximum of ``|score|`` over ``k``
    (a strict ``>`` scan; ``argmax`` returns the first maximum), the second the first maximum
    of the others; a negative score maps ``k`` to ``k + K``.
    """
    table = _bin_directions(k_or, gx.device, gx.dtype)
    scores = gy.unsqueeze(1) * table[:, 1]  # (M, K)
    scores += gx.unsqueeze(1) * table[:, 0]
    magnitudes = scores.abs()
    k0 = magnitudes.argmax(dim=1, keepdim=True)
    bin0 = torch.add(k0, scores.gather(1, k0) < 0, alpha=k_or)
    if k_or > 1:
        k1 = magnitudes.scatter_(1, k0, -1.0).argmax(dim=1, keepdim=True)
        bin1 = torch.add(k1, scores.gather(1, k1) < 0, alpha=k_or)
    else:
        bin1 = bin0
    pair = _tensor(_pair_slots, (k_or,), gx.device, gx.dtype)[torch.add(bin1, bin0, alpha=2 * k_or)[:, 0]]
    return pair[:, 0], pair[:, 1]


def _exact_weight(gx: Tensor, gy: Tensor, magnitude: Tensor, slot0: Tensor, k_or: int) -> Tensor:
    """libvl's HOGb weight of the second bin, ``acosf((float) min((double) best / max((double)
    |g|, 1e-10), 1.0)) / (pi / K)`` with ``best = |sin_k0 * gy + cos_k0 * gx|``.

    ``acos`` is ill-conditioned near 1 (one ulp of the ratio moves the weight by ~1e-3 at a bin
    centre), so the ratio is computed exactly as in C: ``magnitude`` is the correctly rounded
    ``sqrtf(g2)`` (:func:`_sqrt`) and a float division is the double one rounded.  After
    ``acos`` float precision is plenty.
    """
    flat = slot0.reshape(-1)
    sines = _tensor(_slot_sines, (k_or,), gx.device, gx.dtype)
    cosines = _tensor(_slot_cosines, (k_or,), gx.device, gx.dtype)
    best = sines.index_select(0, flat).view_as(gy).mul_(gy)
    best += cosines.index_select(0, flat).view_as(gx).mul_(gx)
    ratio = best.abs_().div_(magnitude.clamp_min(1e-10)).clamp_(max=1.0)
    return ratio.acos_().mul_(k_or / math.pi)


class _Orientations(NamedTuple):
    """Step 2's result, ``(N, H', W')`` tensors (see :func:`_orientations`)."""

    slot: Tensor
    """int32 orientation slot of the best bin."""
    magnitude: Tensor
    """``|g|``, given to ``slot`` (term 0)."""
    lower: Tensor | None
    """HOGb: int32 slot of term 1 (the lower slot of the pair; ``K = 1``: ``slot``)."""
    term: Tensor | None
    """HOGb: the value ``e`` of term 1."""
    along: Tensor | None
    """HOGb: ``a = d e / d|g|`` (``side * w1``; ``K = 1``: ``w1``)."""
    across: Tensor | float | None
    """HOGb: ``b = |g| d e / d angle`` (``K / pi``; ``K = 1``: ``side / pi``), so that
    ``de = a u . dg + b u_perp . dg`` with ``u = g / |g|``, ``u_perp = (-uy, ux)``."""


def _orientations(gx: Tensor, gy: Tensor, g2: Tensor, k_or: int, bilinear: bool) -> _Orientations:
    """Step 2: orientation slots (see :func:`_slot_directions`) and the pooled terms.

    The best bin is the one whose centre ``b pi / K`` is nearest to the gradient angle; HOGb's
    second one is its neighbour on the angle's side.  They come from ``atan2``, except on the
    few pixels within :data:`_AMBIGUITY` of a bin boundary (or, for HOGb, of a bin centre),
    where float rounding decides and libvl's scan is redone (:func:`_exact_slots`; null
    gradients, whose bins do not matter, are left out).  In float32 HOGb's weight ``w1`` is
    computed as libvl does (:func:`_exact_weight`); in float64 it is the exact angular distance
    to the best centre.  The HOGb terms are those of :func:`_slot_mixing`: ``|g|`` at the best slot
    and ``e = side * |g| w1`` at ``lower = min(best, second)`` (in slots), ``side = +-1`` the
    side of the best centre where the angle (and the second bin) lies.  Their derivatives
    (the weight as the exact angle to the bin centre, see the module docstring) are returned
    as ``along`` / ``across`` factors.

    On the CPU in float32 (not HOGb with ``K = 1``) the C kernel scans every pixel instead
    (:func:`_scanned_orientations`).
    """
    dtype = gx.dtype
    if native.hog_applies(gx) and (k_or > 1 or not bilinear):
        return _scanned_orientations(gx, gy, g2, k_or, bilinear)
    magnitude = _sqrt(g2)
    # the gradient angle in bins, in [-K, K], shifted by K + 1.5 so that its floor is the
    # orientation slot of the nearest bin centre
    angle = _atan2(gy, gx).mul_(k_or / math.pi)
    keep_angle = bilinear and dtype != torch.float32
    shifted = angle + (k_or + 1.5) if keep_angle else angle.add_(k_or + 1.5)
    slot = shifted.floor()
    offset = shifted.sub_(slot).sub_(0.5)  # angle - nearest centre, in bins, [-0.5, 0.5]
    distance = offset.abs()
    if bilinear:
        side = offset.sign_()  # side of the best centre where the angle lies
        # near a boundary (|offset| ~ 0.5) or a centre (|offset| ~ 0): | |offset| - 1/4 | ~ 1/4;
        # null gradients, whose bins do not matter, are left out
        nearness, threshold, positive = distance.sub_(0.25).abs_(), 0.25 - _AMBIGUITY, g2
    else:
        nearness, threshold, positive = distance, 0.5 - _AMBIGUITY, None
    if not _rescan_every_pixel(gx.device):  # the few ambiguous pixels, found by numpy, rescanned
        subset = _indices_above(nearness, threshold, positive)
        if subset.numel() > 0:
            exact_slot, exact_side = _exact_slots(gx.view(-1)[subset], gy.view(-1)[subset], k_or)
            slot.view(-1).index_copy_(0, subset, exact_slot)
            if bilinear and k_or > 1:
                side.view(-1).index_copy_(0, subset, exact_side)
    else:  # every pixel rescanned, the scan taken where ambiguous: the same values, no host sync
        ambiguous = nearness > threshold
        if positive is not None:
            ambiguous &= positive > 0
        exact_slot, exact_side = _exact_slots(gx.reshape(-1), gy.reshape(-1), k_or)
        slot.copy_(torch.where(ambiguous, exact_slot.view_as(slot), slot))
        if bilinear and k_or > 1:
            side.copy_(torch.where(ambiguous, exact_side.view_as(side), side))
    slot_index = slot.to(torch.int32)
    if not bilinear:
        return _Orientations(slot_index, magnitude, None, None, None, None)
    if dtype == torch.float32:  # libvl's value
        w1 = _exact_weight(gx, gy, magnitude, slot_index, k_or)
    else:  # the angular distance to the best centre, consistent with the derivative
        two_k = 2 * k_or
        w1 = angle.sub_(slot_index).add_(two_k + 1).remainder_(two_k).sub_(k_or).abs_()
    if k_or == 1:  # the only bin gets |g| (1 - w1): term 1 is |g| w1 at the best slot
        return _Orientations(slot_index, magnitude, slot_index, magnitude * w1, w1, side.mul_(1 / math.pi))
    lower = side.clamp(max=0).add_(slot).to(torch.int32)
    signed = side.mul_(w1)  # side * w1
    return _Orientations(slot_index, magnitude, lower, magnitude * signed, signed, k_or / math.pi)


def _scanned_orientations(gx: Tensor, gy: Tensor, g2: Tensor, k_or: int, bilinear: bool) -> _Orientations:
    """:func:`_orientations` in C (:func:`preimage.native.hog_orientations`, fp32 on the CPU, not
    HOGb with ``K = 1``): libvl's scan on every pixel in one pass, so no ``atan2`` and no rescan
    of ambiguous pixels.  The same bins and values: bin ``K`` always gets slot 1, where angles
    just below pi got ``2K + 1`` (the same bin), and HOGb's weight is libvl's ``acosf`` to within
    an ulp, as :func:`_exact_weight`'s."""
    table = _bin_directions(k_or, gx.device, gx.dtype)
    slot, magnitude, lower, term, along = native.hog_orientations(gx, gy, g2, table, bilinear)
    if not bilinear:
        return _Orientations(slot, magnitude, None, None, None, None)
    return _Orientations(slot, magnitude, lower, term, along, k_or / math.pi)


# --------------------------------------------------------------------------------------------
# Step 3: spatial pooling
# --------------------------------------------------------------------------------------------
def _pool(
    terms: list[tuple[Tensor, Tensor]], cell_size: int, k_or: int, mixing: Tensor
) -> Tensor:
    """Bilinear pooling of the terms ``(slot, value)`` (``(N, H', W')`` each) into cells.

    Each interior pixel adds ``value * wx1`` and ``value * wx2`` at its slot to the cells left
    and right of it in the per-row histograms ``(N, rows, Wc + 2, terms, 2K + 3)``
    (:func:`_pixel_index`; two ``index_add_`` per term, into views of the buffer at constant
    offsets); the rows are then pooled into the ``Hc`` cell rows by one ``(2, s) @ (s, ...)``
    product per block of rows (:func:`_row_blocks`), which also drops the rows' contributions
    to cells outside the grid.  Finally ``mixing`` (:func:`_slot_mixing`) maps the slots of the
    terms to the directed bins of the codes.

    On the CPU in float32 the cells are summed in C instead (:func:`preimage.native.hog_pool`:
    each pixel's terms times its corner weights, into its four cells), then mixed the same way.

    Returns the ``(N, C, Hc, Wc)`` histograms (a view; ``C`` = ``mixing``'s columns).
    """
    slot, value = terms[0]
    n, height, width = slot.shape[0], slot.shape[1] + 2, slot.shape[2] + 2
    hc, wc = hog_shape(height, width, cell_size)
    device, dtype = value.device, value.dtype
    n_slots = 2 * k_or + 3
    stride = len(terms) * n_slots  # one column of the per-row histograms
    if native.hog_applies(value):  # the C kernel: the cells directly, in one pass (native.hog_pool)
        cells = native.hog_pool(terms, *_cell_tables(height, width, cell_size, device), (hc, wc), n_slots)
        hist = torch.matmul(mixing.t(), cells.view(n, hc * wc, stride).transpose(1, 2))
        return hist.view(n, -1, hc, wc)
    row_weights = _tensor(_row_weights, (height, cell_size), device, dtype)  # (blocks, 2, s)
    column_weights = _tensor(_column_weights, (width, cell_size), device, dtype)  # (2, W')
    blocks = row_weights.shape[0]
    size = n * blocks * cell_size * (wc + 2) * stride
    index_dtype = torch.int32 if size < 2**31 else torch.int64
    base = _tensor(_pixel_index, (height, width, cell_size, k_or, len(terms), n), device, index_dtype)
    buffer = value.new_zeros(size)
    for t, (slot, value) in enumerate(terms):  # one or two terms
        index = torch.add(base, slot).view(-1)
        # in-place index_add_ into a fresh buffer: several times faster than out-of-place
        buffer[t * n_slots :].index_add_(0, index, (value * column_weights[0]).view(-1))
        buffer[t * n_slots + stride :].index_add_(0, index, (value * column_weights[1]).view(-1))
    pooled = torch.matmul(row_weights, buffer.view(n, blocks, cell_size, -1))  # (N, blocks, 2, X)
    rows = pooled[:, 1 : hc + 1, 0] + pooled[:, :hc, 1]  # cell c: blocks c + 1 (wy1) and c (wy2)
    hist = torch.matmul(mixing.t(), rows.view(n, hc * (wc + 2), stride).transpose(1, 2))
    return hist.view(n, -1, hc, wc + 2)[..., 1:-1]


def _cell_tables(height: int, width: int, cell_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The C kernels' tables: each interior row's and column's first cell (int32) and the fp32
    corner weights of :func:`_corner_weights`."""
    return (_tensor(_first_cells, (height, cell_size), device, torch.int32),
            _tensor(_first_cells, (width, cell_size), device, torch.int32),
            _tensor(_corner_weights, (height, width, cell_size), device, torch.float32))


def _pool_backward(
    grad: Tensor, slots: list[Tensor], shape: tuple[int, int, int], cell_size: int, k_or: int, mixing: Tensor
) -> list[Tensor]:
    """Transpose of :func:`_pool`: ``(N, 2K, Hc, Wc)`` histogram gradients (one code, whose
    columns of the mixing matrix are ``mixing``) -> the gradient of each term's value,
    ``(N, H', W')``, given the terms' slots.

    The cell gradients are laid out as a padded grid ``(N, Hc + 2, Wc + 2, terms, 2K + 3)``,
    small enough to stay in cache, from which each pixel gathers its four cells
    (``index_select`` at the constant offsets of :func:`_corner_offsets`) with its weights
    (:func:`_corner_weights`).  (Expanding the gradients to the per-row histograms of
    :func:`_pool` instead, to gather two cells per pixel, writes a buffer several times
    larger than the image: slower.)  On the CPU in float32 the gather runs in C
    (:func:`preimage.native.hog_pool_backward`).
    """
    n, height, width = shape
    hc, wc = grad.shape[-2:]
    n_slots = 2 * k_or + 3
    stride = len(slots) * n_slots
    cells = torch.matmul(grad.reshape(n, -1, hc * wc).transpose(1, 2), mixing.t())  # (N, Hc Wc, T S)
    padded = grad.new_zeros(n, hc + 2, wc + 2, stride)
    padded[:, 1:-1, 1:-1] = cells.view(n, hc, wc, stride)
    if native.hog_applies(grad):  # the C kernel: four cells gathered per pixel (native.hog_pool_backward)
        return native.hog_pool_backward(padded, slots, *_cell_tables(height, width, cell_size, grad.device), n_slots)
    padded = padded.view(-1)
    weights = _tensor(_corner_weights, (height, width, cell_size), grad.device, grad.dtype)
    offsets = _corner_offsets(height, width, cell_size, stride)
    index_dtype = torch.int32 if padded.numel() < 2**31 else torch.int64
    base = _tensor(_grid_index, (height, width, cell_size, stride, n), grad.device, index_dtype)
    grads = []
    corner = grad.new_empty(n, height - 2, width - 2)
    for t, slot in enumerate(slots):  # one or two terms
        index = torch.add(base, slot).view(-1)
        value_grad = None
        for offset, weight in zip(offsets, weights):  # the four cells around the pixel
            source = padded[t * n_slots + offset :]
            if value_grad is None:
                value_grad = source.index_select(0, index).view_as(corner).mul_(weight)
            else:
                torch.index_select(source, 0, index, out=corner.view(-1))
                value_grad.addcmul_(corner, weight)
        grads.append(value_grad)
    return grads


# --------------------------------------------------------------------------------------------
# Step 4: block normalization
# --------------------------------------------------------------------------------------------
def _block_factors(factor: Tensor) -> Tensor:
    """The factors of the four blocks containing each cell, ``(4, N, 1, Hc, Wc)``."""
    return torch.stack(
        [factor[:, :-1, :-1], factor[:, :-1, 1:], factor[:, 1:, :-1], factor[:, 1:, 1:]]
    ).unsqueeze(2)


def _normalize(hist: Tensor, value: int, keep: int | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(N, codes, 2K, Hc, Wc)`` directed histograms -> ``(N, 3K + 4, Hc, Wc)`` UoCTTI code of
    histogram ``value``.

    ``u`` = undirected histogram (bins ``k`` and ``k + K`` added), ``n = |u|^2`` per cell; the
    four ``2 x 2`` blocks around a cell have factors ``f = 1 / sqrt(sum of n + 1e-4)``, with
    clamped cell indices at the border (replicate padding).  The code is ``0.5 sum_f min(0.2,
    f h)`` for ``h`` directed and undirected, and ``0.2357 sum_k min(0.2, f u_k)`` per block
    (texture).  With ``keep``, what :func:`_normalize_backward` needs to differentiate the code
    of histogram ``keep`` is returned too (without computing that code when ``keep != value``).
    On the CPU in float32 the C kernel does it (:func:`preimage.native.hog_normalize`).
    """
    if native.hog_applies(hist):  # in C, the backward pass recomputing from the kept histogram
        return native.hog_normalize(hist[:, value], _TEXTURE_FACTOR), (() if keep is None else (hist[:, keep],))
    n, codes, two_k, hc, wc = hist.shape
    k_or = two_k // 2
    hist = hist.reshape(n * codes, two_k, hc, wc)
    undirected = hist[:, :k_or] + hist[:, k_or:]
    norm = (undirected * undirected).sum(dim=1)  # (B, Hc, Wc)
    padded = torch.nn.functional.pad(norm.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
    block = padded[:, :-1, :-1] + padded[:, :-1, 1:] + padded[:, 1:, :-1] + padded[:, 1:, 1:]
    # (B, Hc + 1, Wc + 1): block (i, j) covers the cells i - 1 .. i, j - 1 .. j
    factor = block.add_(_BLOCK_EPS).rsqrt_()
    stacked = torch.cat([hist, undirected], dim=1)  # (B, 3K, Hc, Wc)
    products = (_block_factors(factor) * stacked).unflatten(1, (n, codes))  # (4, N, codes, 3K, Hc, Wc)
    saved: tuple[Tensor, ...] = ()
    if keep is not None:
        def kept(t: Tensor) -> Tensor:
            return t.unflatten(0, (n, codes))[:, keep]

        # 1 where not clamped (a float mask: comparisons to a bool tensor are slow on CPU)
        passing = torch.le(products[:, :, keep], _CLAMP, out=torch.empty_like(products[:, :, keep]))
        saved = (kept(undirected), kept(factor), kept(stacked), passing)
    normalized = products[:, :, value].clamp_(max=_CLAMP)  # (4, N, 3K, Hc, Wc)
    texture = normalized[:, :, two_k:].sum(dim=2).mul_(_TEXTURE_FACTOR)  # (4, N, Hc, Wc)
    return torch.cat([normalized.sum(dim=0).mul_(0.5), texture.transpose(0, 1)], dim=1), saved


def _normalize_backward(grad: Tensor, *saved: Tensor) -> Tensor:
    """Transpose of :func:`_normalize` (one code): ``(N, 3K + 4, Hc, Wc)`` -> ``(N, 2K, Hc, Wc)``,
    given what it saved: the kept histogram (the C kernels, :func:`preimage.native.hog_normalize`,
    which recompute the rest) or ``undirected, factor, stacked, passing``.  The clamp passes the
    gradient up to and including 0.2."""
    if len(saved) == 1:
        return native.hog_normalize_backward(saved[0], grad, _TEXTURE_FACTOR)
    undirected, factor, stacked, passing = saved
    k_or = undirected.shape[1]
    two_k = 2 * k_or
    factors = _block_factors(factor)
    # gradient of the four clamped products f_b * stacked, (4, N, 3K, Hc, Wc)
    grad_products = passing * (grad[:, : 3 * k_or] * 0.5)
    grad_texture = (grad[:, 3 * k_or :] * _TEXTURE_FACTOR).transpose(0, 1).unsqueeze(2)
    grad_products[:, :, two_k:].addcmul_(passing[:, :, two_k:], grad_texture)
    grad_factors = (grad_products * stacked).sum(dim=2)  # (4, N, Hc, Wc)
    grad_stacked = grad_products.mul_(factors).sum(dim=0)  # (N, 3K, Hc, Wc)
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
    grad_undirected = grad_stacked[:, two_k:].addcmul_(undirected, grad_norm.unsqueeze(1), value=2.0)
    return grad_stacked[:, :two_k] + grad_undirected.repeat(1, 2, 1, 1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class _Saved(NamedTuple):
    """What the backward pass of one group of images needs (see :func:`_forward`)."""

    ux: Tensor
    uy: Tensor
    """The unit gradient ``u``, or, with :attr:`magnitude`, the gradient ``g`` itself."""
    along: Tensor | None
    across: Tensor | float | None
    selected: Tensor | None
    """Colour images: each pixel's channel, a one-hot mask (:func:`_central_differences`) or its
    index (int32, :func:`preimage.native.hog_differences`); ``None`` for gray images."""
    normalization: tuple[Tensor, ...]
    slots: list[Tensor]
    mixing: Tensor
    """The gradient code's columns of the mixing matrix."""
    magnitude: Tensor | None = None
    """``|g|`` for the C kernel (:func:`preimage.native.hog_differences_backward`), which forms
    ``u`` from ``g`` and ``|g|`` itself; ``None`` on the PyTorch path."""


def _forward(
    image: Tensor, cell_size: int, k_or: int, codes: tuple[bool, ...], value: int, keep: int | None
) -> tuple[Tensor, _Saved | None]:
    """Steps 1-4 on ``(n, C, H, W)`` images: code ``value`` of ``codes`` (``False``: HOG,
    ``True``: HOGb), and with ``keep`` what :func:`_backward` needs to differentiate code
    ``keep``."""
    n = image.shape[0]
    bilinear = any(codes)
    in_c = native.hog_applies(image)  # the differences and the backward pass's end in C
    if in_c:
        gx, gy, g2, selected = native.hog_differences(image)
    else:
        gx, gy, g2, selected = _central_differences(image)
    o = _orientations(gx, gy, g2, k_or, bilinear)
    terms = [(o.slot, o.magnitude)] + ([(o.lower, o.term)] if bilinear else [])
    mixing = _tensor(_slot_mixing, (k_or, len(terms), codes), image.device, image.dtype)
    hist = _pool(terms, cell_size, k_or, mixing)
    code, normalization = _normalize(hist.unflatten(1, (len(codes), 2 * k_or)), value, keep)
    if keep is None:
        return code, None
    along, across = (o.along, o.across) if codes[keep] else (None, None)
    columns = mixing[:, keep * 2 * k_or : (keep + 1) * 2 * k_or]
    slots = [slot for slot, _ in terms]
    if in_c:  # the backward kernel forms the unit gradient from g and |g|
        return code, _Saved(gx, gy, along, across, selected, normalization, slots, columns, o.magnitude)
    # the unit gradient, (0, 0) at null gradients; |ux|, |uy| <= 1 (no overflow)
    inverse = o.magnitude.clamp_min(torch.finfo(image.dtype).tiny).reciprocal_()
    ux, uy = gx.mul_(inverse), gy.mul_(inverse)
    return code, _Saved(ux, uy, along, across, selected, normalization, slots, columns)


def _backward(grad: Tensor, saved: _Saved, cell_size: int, k_or: int, out: Tensor) -> None:
    """Transpose of :func:`_forward` for one group of images: the ``(n, 3K + 4, Hc, Wc)`` code
    gradient -> the image gradient, written to ``out`` ``(n, C, H, W)``."""
    n, _, height, width = out.shape
    grad_hist = _normalize_backward(grad, *saved.normalization)
    grad_terms = _pool_backward(grad_hist, saved.slots, (n, height, width), cell_size, k_or, saved.mixing)
    if saved.magnitude is not None:  # the rest in C (the forward's choice), in the same order of operations
        native.hog_differences_backward(grad_terms[0], grad_terms[1] if saved.along is not None else None, saved.along,
                                        saved.across, saved.ux, saved.uy, saved.magnitude, saved.selected, out)
        return
    radial = grad_terms[0]  # coefficient of the unit gradient u
    if saved.along is not None:
        radial.addcmul_(grad_terms[1], saved.along)
        tangential = grad_terms[1].mul_(saved.across)  # coefficient of u_perp = (-uy, ux)
    grad_x = radial * saved.ux
    grad_y = radial.mul_(saved.uy)
    if saved.along is not None:
        grad_x.addcmul_(tangential, saved.uy, value=-1.0)
        grad_y.addcmul_(tangential, saved.ux)
    _central_differences_adjoint(grad_x, grad_y, saved.selected, out)


class _HOGFunction(torch.autograd.Function):
    """``(N, C, H, W)`` float32/float64 images -> ``(N, 3K + 4, Hc, Wc)`` codes.

    ``forward(image, cell_size, K, value_bilinear, gradient_bilinear)``: the value is HOG or
    HOGb (``value_bilinear``), and the backward pass differentiates HOG or HOGb
    (``gradient_bilinear``): HOG's value with HOGb's gradient is the straight-through
    surrogate of :class:`HOG`, computed in one pass (the two codes share the differences, the
    orientations and the ``|g|`` term of the pooling).

    The images are processed in groups of about :data:`_GROUP_PIXELS` pixels: the per-pixel
    temporaries of a group stay in the processor's cache (and in memory already mapped by the
    process), which speeds up these memory-bound steps on large batches (~10% at 16 x 227^2).

    Backward: the code's gradient goes through the normalization and the pooling to the
    terms' values (:func:`_normalize_backward`, :func:`_pool_backward`), ``G_m`` for ``|g|``
    and ``G_e`` for HOGb's ``e``, then to the gradient ``g = (gx, gy)``: ``d|g| = u . dg`` and
    ``de = a u . dg + b u_perp . dg`` (:class:`_Orientations`), so the gradient of ``g`` is
    ``(G_m + a G_e) u + b G_e u_perp``, with ``u`` the unit gradient (0 at null gradients);
    and finally to the image (:func:`_central_differences_adjoint`).
    """

    @staticmethod
    def forward(
        ctx, image: Tensor, cell_size: int, k_or: int, value_bilinear: bool, gradient_bilinear: bool
    ):
        n, _, height, width = image.shape
        differentiate = ctx.needs_input_grad[0]
        if not differentiate:
            gradient_bilinear = value_bilinear
        codes = (value_bilinear,) + ((gradient_bilinear,) if gradient_bilinear != value_bilinear else ())
        keep = codes.index(gradient_bilinear) if differentiate else None
        groups = -(-n * height * width // _GROUP_PIXELS)
        group = -(-n // groups)  # images per group, as even as possible
        results = [_forward(part, cell_size, k_or, codes, codes.index(value_bilinear), keep)
                   for part in image.split(group)]
        if differentiate:
            ctx.setup = (image.shape, cell_size, k_or, group, [saved for _, saved in results])
        codes_out = [code for code, _ in results]
        return codes_out[0].contiguous() if len(codes_out) == 1 else torch.cat(codes_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        shape, cell_size, k_or, group, saved = ctx.setup
        out = grad.new_empty(shape)
        for grad_part, saved_part, out_part in zip(grad.split(group), saved, out.split(group)):
            _backward(grad_part, saved_part, cell_size, k_or, out_part)
        return out, None, None, None, None


def _hog(
    image: Tensor, cell_size: int, num_orientations: int, value_bilinear: bool, gradient_bilinear: bool
) -> Tensor:
    """:func:`hog` whose value is HOG or HOGb and whose gradient is HOG's or HOGb's."""
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise RepresentationError(
            f"hog: expected images of shape (N, 1 or 3, H, W), got {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise RepresentationError(f"hog: expected a floating-point image, got {image.dtype}")
    if cell_size < 1 or num_orientations < 1:
        raise RepresentationError(f"hog: bad cell_size={cell_size} or num_orientations={num_orientations}")
    if value_bilinear and not gradient_bilinear:
        raise RepresentationError("hog: HOGb's value with HOG's gradient is not supported")
    n, _, height, width = image.shape
    hc, wc = hog_shape(height, width, cell_size)
    if n < 1 or height < 3 or width < 3 or hc < 1 or wc < 1:
        raise RepresentationError(
            f"hog: a batch of {n} {height}x{width} images is too small for cells of {cell_size} pixels"
        )
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    code = _HOGFunction.apply(
        image.to(dtype), cell_size, num_orientations, value_bilinear, gradient_bilinear
    )
    return code.to(image.dtype)


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
    return _hog(image, cell_size, num_orientations, bilinear_orientations, bilinear_orientations)


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
            return _hog(x, self.cell_size, self.num_orientations, False, True)
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
