"""Inverting an affine Φ without computing its code: the L2 loss as a quadratic form.

When Φ is one convolution of the image (a cut at a network's first layer: VGG's conv1_1,
AlexNet's, VGG-M's or SqueezeNet's conv1), ``Φ(x) = A x + b`` and the inversion loss of eq. (2)
is a quadratic form in the image:

    ||A x + b - Φ0||² = <x, AᵀA x> - 2 <x, r> + ||Φ0 - b||²,   r = Aᵀ(Φ0 - b),
    its gradient 2 (AᵀA x - r).

``r`` and ``||Φ0 - b||²`` are computed once per run, so a step needs only ``AᵀA x``, an
image-to-image operator: for a stride-1 ``k x k`` convolution a ``(2k-1) x (2k-1)`` convolution
with as many output channels as the image has (3 for RGB, against 64 for VGG's conv1_1).  The
code, ``Φ0``'s copy in the code's layout and the code's gradient are never formed: on the CPU
these first layers were bound by memory, the loss alone taking longer than Φ's forward and
backward passes together (VGG-VD-16 conv1_1, batch 16: 103 MB of bf16 code read three times).

A convolution with stride ``s`` becomes a stride-1 one on the image's ``s x s`` phases
(``pixel_unshuffle``: ``C s²`` channels), with its kernel's taps regrouped the same way
(:func:`~preimage.representations.input_conv.phase_kernel`, which conv1's sub-pixel backward
uses too); ``AᵀA`` is then a stride-1 convolution of the phases.

``AᵀA`` is shift-invariant except near the border, where outputs of a zero-padded image are
missing: with ``K`` the kernel's autocorrelation (:func:`gram_kernel`),
``AᵀA u = K ⋆ u - Aᵀ M A u`` where ``M`` keeps the ring of virtual outputs that overhang the
valid ones (``k - 1`` wide).  The virtual rows above the image touch only its first ``k - 1``
phase rows, and along them they are shift-invariant: their part of ``Aᵀ M A`` is a 1-D
convolution of that band, with its rows folded into channels (:func:`_band_kernel`, built once).
So are the rows below and the columns on either side; a virtual output diagonal to a corner
belongs to two bands and is added back once, a small matrix on the corner's block
(:func:`_corner_matrix`).  Everything is exact: the tests compare values and gradients with
autograd through the convolution.  For a bf16 model ``AᵀA``'s convolutions run in bf16
(:attr:`ConvGram.compute_dtype`): ``r``, the subtraction and the dot products stay fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..objectives import L2Loss, WindowGradient
from .input_conv import phase_kernel


def gram_kernel(weight: Tensor) -> Tensor:
    """The stride-1 convolution ``AᵀA`` of a stride-1 convolution ``A`` with kernel ``weight``
    ``(C_out, C, kh, kw)``, away from the border: ``(C, C, 2kh-1, 2kw-1)``, to be applied with
    padding ``(kh-1, kw-1)``.  Entry ``[c, c', kh-1+d]`` is ``sum_{o,m} W[o,c,m] W[o,c',m+d]``."""
    kh, kw = weight.shape[-2:]
    w = weight.transpose(0, 1)  # (C, C_out, kh, kw): each input channel's taps as a C_out-channel "image"
    # conv2d correlates: out[c, c', y] = sum_{o,m} W[o,c,m+y-(k-1)] W[o,c',m]
    return F.conv2d(w, w, padding=(kh - 1, kw - 1)).transpose(0, 1).contiguous()


BORDER_LOW_PRECISION_BATCH = 4
"""The smallest batch at which :meth:`ConvGram.gram_phases` computes the border in its
``compute_dtype`` when that is not the weight's (below it, in the weight's): bf16's 1-D
convolutions here cost ~70 µs each at batch 1 against fp32's 24, and 7 µs per image against 17
at batch 16."""


def _shifted(weight: Tensor, rows: int, shift: int, cols: int = 0, col_shift: int = 0) -> Tensor:
    """``V[o, i, c, m] = weight[o, c, i + shift, m]`` for ``i < rows`` (zero outside the kernel):
    the taps that the ``rows`` border rows of an image meet in one virtual output row; with
    ``cols``, also ``j < cols`` and ``m = j + col_shift``: ``(C_out, rows, C, cols or kw)``."""
    kh, kw = weight.shape[-2:]
    out = weight.new_zeros(weight.shape[0], rows, weight.shape[1], cols or kw)
    for i in range(rows):
        if 0 <= i + shift < kh:
            if not cols:
                out[:, i] = weight[:, :, i + shift]
            else:
                for j in range(cols):
                    if 0 <= j + col_shift < kw:
                        out[:, i, :, j] = weight[:, :, i + shift, j + col_shift]
    return out


def _band_kernel(weight: Tensor, shifts: range) -> Tensor:
    """What the virtual output rows ``shifts`` (each the kernel row that border row 0 meets) add
    to ``AᵀA`` on the ``len(shifts)`` border rows, as a 1-D convolution along them:
    ``(a C, a C, 2 kw - 1)``, channels ``(row, channel)``, to be applied with padding ``kw - 1``."""
    a = len(shifts)
    kernel = sum(gram_kernel(_shifted(weight, a, d).flatten(1, 2).unsqueeze(2)) for d in shifts)
    return kernel.squeeze(2)  # type: ignore[union-attr]


def _corner_matrix(weight: Tensor, row_shifts: range, col_shifts: range) -> Tensor:
    """What the virtual outputs diagonal to one corner add to ``AᵀA`` on its ``a x c`` block, as
    a matrix on the block flattened ``(channel, row, column)``: counted by both of the corner's
    bands, so added back once."""
    a, c = len(row_shifts), len(col_shifts)
    v = [_shifted(weight, a, d, c, e).permute(0, 2, 1, 3).flatten(1) for d in row_shifts for e in col_shifts]
    return sum(m.T @ m for m in v)  # type: ignore[return-value]


@dataclass
class ConvGram:
    """``A x = conv(x / std) + b`` for one zero-padded convolution, and the operators on images
    that the quadratic loss needs: ``A`` (:meth:`forward`), ``Aᵀ`` (:meth:`adjoint`) and ``AᵀA``
    (:meth:`gram`), in the weight's dtype (fp32 for bf16 models too: their weights are exact in
    fp32), except that ``AᵀA``'s convolutions may run in a lower ``compute_dtype``.

    Args:
        weight: ``(C_out, C, kh, kw)``, already divided by the model's input ``std``.
        bias: ``(C_out,)``.
        stride: equal in both directions.
        padding: ``(top, bottom, left, right)`` zero padding.
        compute_dtype: the dtype of ``AᵀA``'s convolutions (:meth:`gram_phases`), default the
            weight's.  bf16 (oneDNN accumulates in fp32, then rounds each output to 8 bits) is
            3-7 x faster than fp32 here; its results are returned in the weight's dtype.
    """

    weight: Tensor
    bias: Tensor
    stride: int
    padding: tuple[int, int, int, int]
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.weight = self.weight.detach()
        self.bias = self.bias.detach().to(self.weight.dtype)
        self.compute_dtype = self.compute_dtype or self.weight.dtype
        self.phase_weight = phase_kernel(self.weight, (self.stride, self.stride))
        self.kernel = gram_kernel(self.phase_weight).to(self.compute_dtype)
        # the virtual outputs beyond the valid ones, per band (see gram_phases); columns as rows
        w, Mh, Mw = self.phase_weight.double(), *self.phase_weight.shape[-2:]
        a, c = Mh - 1, Mw - 1
        above, below = range(1, a + 1), range(0, -a, -1)  # the kernel row that border row 0 meets
        left, right = range(1, c + 1), range(0, -c, -1)
        wt = w.transpose(-2, -1)
        bands = [_band_kernel(k, shifts) if shifts else None
                 for k, shifts in ((w, above), (w, below), (wt, left), (wt, right))]
        # the bands negated, the corners added back (one block-diagonal matrix): gram_phases adds it all
        corners = torch.block_diag(*[_corner_matrix(w, rows, cols) for rows in (above, below)
                                     for cols in (left, right)]) if a and c else None
        self.border = {dtype: ([(-b).to(dtype) for b in bands if b is not None],
                               corners.to(dtype) if corners is not None else None)
                       for dtype in {self.compute_dtype, self.weight.dtype}}  # per dtype: see gram_phases
        # bands of one shape (a square kernel) as one grouped convolution, for square phase images
        self.grouped_bands = {dtype: torch.cat(kernels) if kernels and len({k.shape for k in kernels}) == 1 else None
                              for dtype, (kernels, _) in self.border.items()}
        self._border_index: dict[tuple[int, int, int, torch.device], Tensor] = {}
        C, s = self.weight.shape[1], self.stride  # the one-hot kernel of split (pixel_unshuffle's order)
        eye = torch.eye(C * s * s, dtype=self.weight.dtype, device=self.weight.device)
        self.unshuffle = eye.view(C * s * s, C, s, s)
        if self.weight.device.type == "cpu":  # oneDNN: channels-last is 3-4x faster with 3-12 channels
            last = torch.channels_last
            self.phase_weight = self.phase_weight.contiguous(memory_format=last)
            self.kernel = self.kernel.contiguous(memory_format=last)
            self.unshuffle = self.unshuffle.contiguous(memory_format=last)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(Ho, Wo)``: the code's spatial size for images of ``size``."""
        t, b, lf, rt = self.padding
        kh, kw = self.weight.shape[-2:]
        return (size[0] + t + b - kh) // self.stride + 1, (size[1] + lf + rt - kw) // self.stride + 1

    def cost_ratio(self, size: tuple[int, int]) -> float:
        """Multiply-adds of ``AᵀA`` on images of ``size`` over those of the convolution itself."""
        co, cu, Mh, Mw = self.phase_weight.shape
        Hu, Wu = self.phase_size(size)
        Ho, Wo = self.out_size(size)
        return (cu * cu * (2 * Mh - 1) * (2 * Mw - 1) * Hu * Wu) / (co * self.weight[0].numel() * Ho * Wo)

    def phase_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(Hu, Wu)``: the phases the valid outputs read, for images of ``size``."""
        Mh, Mw = self.phase_weight.shape[-2:]
        Ho, Wo = self.out_size(size)
        return Ho - 1 + Mh, Wo - 1 + Mw

    def pad(self, x: Tensor, buffer: Tensor | None = None,
            crops: tuple[list[list[int]], tuple[int, int]] | None = None) -> Tensor:
        """The images ``x`` zero-padded and cut to the ``s Hu x s Wu`` pixels that the valid
        outputs read, channels-last.  ``buffer``: the result of an earlier call with the same
        shapes, refilled (its zero border is kept).  ``crops``: ``(offsets, (H, W))``, the
        images are the ``H x W`` windows of ``x`` at per-element ``(row, column)`` offsets
        (:func:`~preimage.objectives.jitter_crop`, without its copy)."""
        N, C = x.shape[:2]
        H, W = crops[1] if crops is not None else x.shape[-2:]
        s, (t, _b, lf, _r) = self.stride, self.padding
        Hu, Wu = self.phase_size((H, W))
        padded = buffer if buffer is not None else x.new_zeros(N, s * Hu, s * Wu, C).permute(0, 3, 1, 2)
        h, w = min(H, s * Hu - t), min(W, s * Wu - lf)
        if crops is None:
            padded[:, :, t : t + h, lf : lf + w] = x[:, :, :h, :w]
        else:
            for n, (r, c) in enumerate(crops[0]):
                padded[n, :, t : t + h, lf : lf + w] = x[n, :, r : r + h, c : c + w]
        return padded

    def phases(self, x: Tensor, buffer: Tensor | None = None) -> Tensor:
        """The images ``x`` as the ``(N, C s², Hu, Wu)`` phases of :meth:`pad`'s image,
        channels-last; phase channel ``c s² + ry s + rx`` holds pixel ``(s q + ry, s p + rx)``
        (``pixel_unshuffle``'s order)."""
        return self.split(self.pad(x, buffer))

    def split(self, padded: Tensor) -> Tensor:
        """:meth:`pad`'s image as phases (see :meth:`phases`)."""
        if self.stride == 1:
            return padded
        # a stride-s convolution with a one-hot kernel: 0.5 ms for a 16 x 3 x 228² channels-last
        # batch, against 2.6-6 ms for pixel_unshuffle or a permuted copy
        return F.conv2d(padded, self.unshuffle, stride=self.stride)

    def image(self, u: Tensor, size: tuple[int, int]) -> Tensor:
        """The inverse of :meth:`phases` for a gradient: ``(N, C, H, W)`` (zero where no output
        reads the image), possibly a strided view of ``u``."""
        s, (t, _b, lf, _r) = self.stride, self.padding
        N, Cu, Hu, Wu = u.shape
        C = Cu // (s * s)
        if s > 1:
            u = u.reshape(N, C, s, s, Hu, Wu).permute(0, 1, 4, 2, 5, 3).reshape(N, C, Hu * s, Wu * s)
        H, W = size
        if t + H <= u.shape[2] and lf + W <= u.shape[3]:
            return u[:, :, t : t + H, lf : lf + W]
        return F.pad(u, (-lf, lf + W - u.shape[3], -t, t + H - u.shape[2]))

    def forward(self, x: Tensor) -> Tensor:
        """``A x``: the convolution's output (the code), ``(N, C_out, Ho, Wo)``."""
        return F.conv2d(self.phases(x), self.phase_weight, self.bias.to(x.device))

    def adjoint_phases(self, code: Tensor) -> Tensor:
        """``Aᵀ code`` as phases (:meth:`phases`' layout; the bias excluded)."""
        u = F.conv_transpose2d(code.to(self.weight.dtype), self.phase_weight)
        return u.contiguous(memory_format=torch.channels_last)

    def adjoint(self, code: Tensor, size: tuple[int, int]) -> Tensor:
        """``Aᵀ code`` for images of ``size``: the gradient of ``<A x, code>`` w.r.t. ``x``."""
        return self.image(self.adjoint_phases(code), size).contiguous()

    def gram_phases(self, u: Tensor, minus: Tensor | None = None) -> Tensor:
        """``AᵀA`` applied to phases ``u``, minus ``minus`` if given: a new channels-last tensor in
        the weight's dtype; exact at the border: the autocorrelation kernel, minus what the
        virtual outputs beyond the valid ones add (four bands ``M - 1`` phases wide, as 1-D
        convolutions along them, and the four corners added back: see the module docstring).
        Measured against computing each band's virtual outputs and their adjoint (two
        convolutions with the code's channels per band), per image at batch 16 / 1, fp32:
        SqueezeNet conv1 1.45 -> 1.1 / 2.2 -> 1.5 ms per loss evaluation."""
        Mh, Mw = self.phase_weight.shape[-2:]
        N, C, Hu, Wu = u.shape
        compute = u.to(self.compute_dtype)
        out = F.conv2d(compute, self.kernel, padding=(Mh - 1, Mw - 1))
        if N >= BORDER_LOW_PRECISION_BATCH:  # below it, bf16's 1-D convolutions cost more than fp32's
            u = compute
        bands, corners = self.border[u.dtype]
        if minus is not None:  # one pass, in the weight's dtype (type promotion)
            out = torch.sub(out, minus.to(self.weight.dtype))
        elif out.dtype != self.weight.dtype:
            out = out.to(self.weight.dtype)
        index = self.border_index(Hu, Wu, C, u.device)
        if index is None:
            return out
        # every band and corner of u in one gather, their corrections in one scatter (channels-last)
        last = torch.channels_last
        gathered = u.contiguous(memory_format=last).permute(0, 2, 3, 1).reshape(N, -1).index_select(1, index)
        parts, start = [], 0
        lengths = ([Wu, Wu] if Mh > 1 else []) + ([Hu, Hu] if Mw > 1 else [])  # rows along Wu, columns along Hu
        grouped = self.grouped_bands[u.dtype]
        if grouped is not None and len(set(lengths)) == 1:  # one call for the four bands (4 x ~50 µs at b1)
            start = grouped.shape[0] * lengths[0]
            parts.append(F.conv1d(gathered[:, :start].view(N, grouped.shape[0], lengths[0]), grouped,
                                  padding=(grouped.shape[-1] - 1) // 2, groups=len(bands)).view(N, -1))
        else:
            for kernel, length in zip(bands, lengths):  # kernel: (a C, a C, 2 kw - 1)
                end = start + kernel.shape[0] * length
                parts.append(F.conv1d(gathered[:, start:end].view(N, kernel.shape[0], length), kernel,
                                      padding=(kernel.shape[-1] - 1) // 2).view(N, -1))
                start = end
        if corners is not None:
            parts.append(gathered[:, start:] @ corners)
        out = out.contiguous(memory_format=last)
        ring = torch.cat(parts, 1).to(out.dtype)  # scatter_add_, not index_add_: 15 µs against 700 here
        out.permute(0, 2, 3, 1).view(N, -1).scatter_add_(1, index.expand(N, -1), ring)
        return out

    def border_index(self, Hu: int, Wu: int, C: int, device: torch.device) -> Tensor | None:
        """Where :meth:`gram_phases`' border terms sit in a channels-last ``(C, Hu, Wu)`` image,
        flattened: the top, bottom, left and right bands (each ``(rows, channel, along)``, as
        :func:`_band_kernel` orders them), then the four corners (``(channel, row, column)``);
        None without a border (a 1 x 1 kernel).  Built once per size."""
        key = (Hu, Wu, C, device)
        if key not in self._border_index:
            Mh, Mw = self.phase_weight.shape[-2:]
            a, c = Mh - 1, Mw - 1
            pos = torch.arange(Hu * Wu * C, device=device).view(Hu, Wu, C)
            parts = [pos[:a].permute(0, 2, 1), pos[Hu - a :].permute(0, 2, 1)] if a else []
            parts += [pos[:, :c].permute(1, 2, 0), pos[:, Wu - c :].permute(1, 2, 0)] if c else []
            if a and c:
                parts += [pos[r, k].permute(2, 0, 1) for r in (slice(0, a), slice(Hu - a, Hu))
                          for k in (slice(0, c), slice(Wu - c, Wu))]
            self._border_index[key] = torch.cat([p.flatten() for p in parts]) if parts else None  # type: ignore[assignment]
        return self._border_index[key]

    def gram(self, x: Tensor) -> Tensor:
        """``AᵀA x`` (bias excluded) for images ``x``."""
        return self.image(self.gram_phases(self.phases(x)), tuple(x.shape[-2:])).contiguous()


class QuadraticL2:
    """The inversion loss of eq. (2), ``||A x + b - Φ0||² / ||Φ0||²`` per batch element, with its
    gradient, from ``AᵀA x`` alone (see the module docstring): the engine's data term when Φ is
    affine (:func:`quadratic_loss`).

    Args:
        conv: Φ as :class:`ConvGram`.
        target: ``Φ0``, ``(N, C_out, Ho, Wo)``.
        norm2: ``||Φ0||²`` per element (the loss's normalization).
        size: the images' ``(H, W)``.
    """

    def __init__(self, conv: ConvGram, target: Tensor, norm2: Tensor, size: tuple[int, int]) -> None:
        self.conv, self.size = conv, size
        residual = target.detach().to(conv.weight.dtype) - conv.bias.to(target.device).view(1, -1, 1, 1)
        self.r = conv.adjoint_phases(residual)  # Aᵀ(Φ0 - b), as phases
        self.c0 = residual.square().sum((1, 2, 3), dtype=torch.float64)  # ||Φ0 - b||²
        self.norm2 = norm2.double()
        self._padded: Tensor | None = None  # the padded images: their zero border is written once

    def value_and_grad(self, x: Tensor, weight: float = 1.0, offsets: Tensor | None = None,
                       window: bool = False) -> tuple[Tensor, Tensor | WindowGradient]:
        """``weight * loss`` per element and its gradient w.r.t. the images ``x`` (in ``x``'s dtype;
        the gradient possibly a strided view).  With ``offsets``, ``x`` is the engine's canvas and
        the images its jittered windows (:func:`~preimage.objectives.jitter_crop`); the gradient
        is then the canvas's, zero outside each window: the crop's copy forward and backward
        folded into the padding and into this write.  ``window``: return that gradient as a
        :class:`~preimage.objectives.WindowGradient` of the phases instead, for the engine's
        update kernel to read where it lies (no reshuffle of the phases, no canvas written)."""
        crops = (offsets.tolist(), self.size) if offsets is not None else None
        self._padded = self.conv.pad(x.detach(), self._padded, crops)
        u = self.conv.split(self._padded)
        d = self.conv.gram_phases(u, minus=self.r)  # AᵀA x - r: half the unnormalized loss's gradient
        # ||Ax + b - Φ0||² = <x, AᵀA x - r> - <x, r> + ||Φ0 - b||² (phases outside the image are 0)
        x_row, d_col, r_col = (t.permute(0, 2, 3, 1).reshape(t.shape[0], 1, -1) for t in (u, d, self.r))
        dots = [torch.bmm(x_row, col.transpose(1, 2)).view(-1) for col in (d_col, r_col)]  # no product tensor
        values = (dots[0] - dots[1]).double() + self.c0
        scale = weight / self.norm2.to(x.device)
        s, (t, _b, lf, _r) = self.conv.stride, self.conv.padding
        N, Cu, Hu, Wu = d.shape
        phases = d.view(N, Cu // (s * s), s, s, Hu, Wu).permute(0, 1, 4, 2, 5, 3)  # pixel (a s + y, b s + x)
        grad = WindowGradient(phases, offsets if offsets is not None else torch.zeros(N, 2, dtype=torch.long),
                              self.size, (t, lf), scale=(2 * scale).to(d.dtype))
        if window and offsets is not None:
            return (values * scale).to(x.dtype), grad
        return (values * scale).to(x.dtype), grad.canvas(x.shape) if offsets is not None else grad.image()


def enabled() -> bool:
    """Whether the engine may use :class:`QuadraticL2` (``PREIMAGE_QUADRATIC=0`` turns it off)."""
    return os.environ.get("PREIMAGE_QUADRATIC", "1") != "0"


MAX_COST = {torch.float32: 2.0, torch.bfloat16: 1.0}
"""Largest :meth:`ConvGram.cost_ratio` at which :func:`quadratic_loss` replaces Φ, per dtype of
the model (``AᵀA``'s convolutions run in that dtype; other dtypes never replace Φ).  Measured on
the CPU (interleaved A/B, engine ms per image and step, Φ -> AᵀA, 2026-11-26): fp32 VGG-VD-16
conv1_1 (ratio 0.13) b16 9.0 -> 0.8, b1 3.9 -> 1.4; SqueezeNet conv1 (0.53) b16 4.0 -> 1.4, b1
4.3 -> 2.1; AlexNet conv1 (1.77) b16 1.9 -> 1.7, b1 2.5 -> 2.5.  bf16 VGG-VD-16 conv1_1 b16 2.4
-> 0.56, b1 2.5 -> 1.1; SqueezeNet / VGG-M conv1 b16 1.15 -> 0.80 / 1.1 -> 0.7, b1 1.85 -> 1.49 /
1.84 -> 1.45; AlexNet conv1 b16 0.6 -> 0.9, b1 1.5 -> 2.2 (so not in bf16)."""


def quadratic_loss(representation: object, loss: object, size: tuple[int, int],
                   device: torch.device) -> QuadraticL2 | None:
    """The engine's data term as :class:`QuadraticL2` where that is exact and measured faster,
    else None (the engine then computes Φ and the loss).

    Exact: an unmasked :class:`~preimage.objectives.L2Loss` of a Φ that is one convolution of the
    image (:meth:`~preimage.representations.cnn.ModuleCut.affine`).  Faster: on the CPU, where
    ``AᵀA`` costs at most :data:`MAX_COST` times the convolution's arithmetic (VGG-VD-16 conv1_1,
    SqueezeNet and VGG-M conv1; AlexNet's conv1, whose 4 x 4 phases make ``AᵀA`` 1.8 x the
    convolution, in fp32 only).  ``AᵀA``'s convolutions run in the model's precision: for a bf16 model its
    output is rounded to bf16 before ``r`` is subtracted, which changed SqueezeNet conv1's
    inversions (Table 5 protocol, C = 100, 50 images) by +0.01 ± 0.01 points of error (at most
    0.06).  Not measured on CUDA: there Φ is used.
    """
    if not enabled() or device.type != "cpu" or type(loss) is not L2Loss or loss.mask is not None:
        return None
    affine = getattr(representation, "affine", None)
    conv = affine() if affine is not None else None
    if conv is None:
        return None
    dtype = getattr(representation, "compute_dtype", torch.float32)
    if dtype not in MAX_COST or conv.cost_ratio(size) > MAX_COST[dtype]:
        return None
    if tuple(loss.target.shape[-2:]) != conv.out_size(size):
        return None
    return QuadraticL2(conv, loss.target, loss.norm2, size)
