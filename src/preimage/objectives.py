"""The terms of energy (1): losses (eqs. 2-4) and regularizers (eqs. 5-6, TV^beta, eq. 7).

Every term maps a batch to a vector of per-element values of shape ``(N,)`` so that the
elements of a batch (images x seeds x units) are independent problems optimized together:
the engine minimizes the sum over the batch, whose gradient w.r.t. element ``n`` is the
gradient of element ``n``'s own energy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native


class ObjectiveError(ValueError):
    """A target or mask that defines no meaningful objective (zero norm, wrong shape, NaN)."""


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _per_element_sum(t: Tensor) -> Tensor:
    """Sum over all but the batch dimension, without reshaping (no copy for channels-last codes)."""
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


def _per_element(v: Tensor, like: Tensor) -> Tensor:
    """A per-element ``(N,)`` vector shaped to broadcast against the batch ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _layout_like(t: Tensor | None, code: Tensor) -> Tensor | None:
    """``t`` in ``code``'s memory format, so that elementwise ops with a channels-last code (a
    bf16 network's output) run as one pass instead of a strided gather."""
    if t is None or code.dim() != 4 or t.dim() != 4 or code.is_contiguous():
        return t
    if code.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ObjectiveError(f"{name} contains NaN or infinite values")


class L2Loss:
    """Normalized Euclidean inversion loss, eq. (2), or its masked form, eq. (3).

    ``loss(Φ(x)) = ||(Φ(x) - Φ0) ⊙ M||² / ||Φ0 ⊙ M||²`` per batch element, with one target
    (and optionally one binary mask) per element.
    """

    def __init__(self, target: Tensor, mask: Tensor | None = None) -> None:
        _check_finite("target code", target)
        if mask is not None:
            if mask.shape != target.shape:
                mask = mask.expand_as(target) if mask.dim() == target.dim() else mask
            if mask.shape != target.shape:
                raise ObjectiveError(
                    f"mask shape {tuple(mask.shape)} does not match code shape {tuple(target.shape)}"
                )
            mask = mask.to(target.dtype)
        self.target = target.detach()
        self.mask = mask
        self._cache: dict[tuple[torch.dtype, bool], Tensor] = {}
        masked = target if mask is None else target * mask
        self.norm2 = _flat(masked).pow(2).sum(1)
        # "zero" means numerically zero: an RMS below 1e-6 (e.g. the code of a blank image up to
        # float rounding), which would otherwise give a huge, meaningless normalized loss.
        tiny = 1e-12 * _flat(masked).shape[1]
        bad = (self.norm2 <= tiny).nonzero().flatten().tolist()
        if bad:
            raise ObjectiveError(
                f"target code has zero norm{' inside the mask' if mask is not None else ''} "
                f"for batch element(s) {bad}: there is nothing to invert"
            )

    def __call__(self, code: Tensor) -> Tensor:
        if self.mask is None:
            return _SquaredDistance.apply(code, self._target_like(code)) / self.norm2
        return _per_element_sum(self._masked_diff(code).square()) / self.norm2

    def _masked_diff(self, code: Tensor) -> Tensor:
        """``(Φ(x) - Φ0) ⊙ M`` in fp32, the mask and target in the code's layout."""
        self.target = _layout_like(self.target, code)  # type: ignore[assignment]
        self.mask = _layout_like(self.mask, code)
        return (code.float() - self.target) * self.mask

    def value_and_grad(self, code: Tensor, weight: float = 1.0, compiled: bool = False) -> tuple[Tensor, Tensor]:
        """``weight * loss`` per batch element and its gradient w.r.t. ``code`` (same dtype and
        layout as ``code``), without autograd: the engine feeds the gradient to Φ's backward.

        ``compiled`` uses a one-pass kernel for the unmasked loss (:func:`preimage.fused.loss_step`:
        C on the CPU, ``torch.compile`` elsewhere; eager if neither is available).
        """
        key = ("scale", float(weight), code.device)
        if key not in self._cache:  # constant over a run: formed once
            self._cache[key] = weight / self.norm2.to(code.device, torch.float32)
        scale = self._cache[key]
        if self.mask is None:
            target = self._target_like(code)
            if compiled:
                from . import fused

                out = fused.loss_step(code, target, scale)
                if out is not None:
                    return out
            diff = code - target
            rows = _rows(diff)
            values = torch.linalg.vecdot(rows, rows).float() * scale
            return values, diff.mul_(_per_element((2 * scale).to(diff.dtype), diff))
        diff = self._masked_diff(code)
        return _per_element_sum(diff.square()) * scale, (diff * _per_element(2 * scale, diff)).to(code.dtype)

    def select(self, index: slice) -> "L2Loss":
        """The loss of batch elements ``index`` only (the engine optimizes big batches in chunks)."""
        part = object.__new__(L2Loss)
        part.target = self.target[index]
        part.mask = self.mask[index] if self.mask is not None and self.mask.shape[0] > 1 else self.mask
        part.norm2 = self.norm2[index]
        part._cache = {}
        return part

    def shifted(self, offset: Tensor) -> "L2Loss":
        """This loss for codes that lack a per-channel ``offset`` ``(C,)`` (a convolution's bias:
        :meth:`~preimage.representations.cnn.ModuleCut.without_output_bias`):
        ``shifted(b)(c) == self(c + b)``, the target ``Φ0 - b`` and the normalization
        ``||Φ0 ⊙ M||²`` kept."""
        part = object.__new__(L2Loss)
        shape = (1, -1) + (1,) * (self.target.dim() - 2)
        part.target = self.target - offset.detach().to(self.target.device, self.target.dtype).view(shape)
        part.mask, part.norm2, part._cache = self.mask, self.norm2, {}
        return part

    def _target_like(self, code: Tensor) -> Tensor:
        """The target in the code's dtype and memory layout (converted once, then cached with
        :meth:`value_and_grad`'s scales)."""
        key = (code.dtype, code.dim() == 4 and not code.is_contiguous())
        if key not in self._cache:
            t = _layout_like(self.target, code)
            assert t is not None
            self._cache[key] = t.to(code.dtype)
        return self._cache[key]

    def error(self, code: Tensor) -> Tensor:
        """The paper's normalized reconstruction error ``||Φ(x*) - Φ0|| / ||Φ0||`` (section 5.1)."""
        return self(code).sqrt()


def _rows(t: Tensor) -> Tensor:
    """``(N, D)`` view of a batch in its memory order (channels-last codes need no copy)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


class _SquaredDistance(torch.autograd.Function):
    """``||code - target||²`` per batch element, computed in the code's dtype and layout.

    Fused for speed (issue 5): one pass forms the difference, one dot product per element
    reduces it, and the backward pass is one multiplication.  For a bf16 network the code, the
    target and the gradient stay bf16 (as the network's own backward pass is), which is several
    times faster on CPU than promoting the early layers' large codes to fp32; the value is then
    rounded to bf16 (3 significant digits) -- it is only recorded, the gradient is what matters.
    In fp32 it equals ``(code - target).pow(2).sum()`` (tested).
    """

    @staticmethod
    def forward(ctx: object, code: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        diff = code - target
        rows = _rows(diff)
        ctx.save_for_backward(diff)  # type: ignore[attr-defined]
        return torch.linalg.vecdot(rows, rows).to(torch.promote_types(diff.dtype, torch.float32))

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return diff * _per_element((2 * grad).to(diff.dtype), diff), None


class InnerProductLoss:
    """Inner-product loss, eq. (4): ``-<Φ(x), Φ0> / Z`` per batch element.

    Used by activation maximization (one-hot or weighted ``Φ0``, section 6) and
    caricaturization (``Φ0 = max(0, Φ(x0))``, ``Z = ||Φ0||``, section 7).
    """

    def __init__(self, weights: Tensor, Z: Tensor | float) -> None:
        _check_finite("target weights", weights)
        Z_t = torch.as_tensor(Z, dtype=torch.float32, device=weights.device)
        Z_t = Z_t.expand(weights.shape[0]) if Z_t.dim() == 0 else Z_t.reshape(-1)
        if Z_t.numel() != weights.shape[0]:
            raise ObjectiveError(f"need one Z per batch element, got {Z_t.numel()}")
        _check_finite("normalization Z", Z_t)
        if (Z_t <= 0).any():
            raise ObjectiveError(f"normalization Z must be positive, got {Z_t.tolist()}")
        if (_flat(weights).abs().sum(1) == 0).any():
            raise ObjectiveError("target weights are all zero: nothing to maximize")
        self.weights = weights.detach()
        self.Z = Z_t
        self._grad_cache: dict[tuple, Tensor] = {}

    def __call__(self, code: Tensor) -> Tensor:
        return -self.activation(code) / self.Z

    def value_and_grad(self, code: Tensor, weight: float = 1.0, compiled: bool = False) -> tuple[Tensor, Tensor]:
        """``weight * loss`` per batch element and its (constant) gradient ``-weight Φ0 / Z``
        w.r.t. ``code``, in the code's dtype and layout; see :meth:`L2Loss.value_and_grad`."""
        del compiled  # one product and a sum: nothing to fuse
        scale = weight / self.Z.to(code.device)
        values = -self.activation(code) * scale
        key = (weight, code.dtype, code.device, code.dim() == 4 and not code.is_contiguous())
        if key not in self._grad_cache:  # constant over a run: formed once
            self._grad_cache = {key: (self.weights * -_per_element(scale, code)).to(code.dtype)}
        return values, self._grad_cache[key]

    def select(self, index: slice) -> "InnerProductLoss":
        """The loss of batch elements ``index`` only (the engine optimizes big batches in chunks)."""
        part = object.__new__(InnerProductLoss)
        part.weights, part.Z = self.weights[index], self.Z[index]
        part._grad_cache = {}
        return part

    def activation(self, code: Tensor) -> Tensor:
        """``<Φ(x), Φ0>``: the quantity being maximized."""
        self.weights = _layout_like(self.weights, code)  # type: ignore[assignment]
        return _per_element_sum(code * self.weights)


class BoundedRange:
    """Isotropic bounded-range regularizer ``N_alpha``, eq. (5), with the hard bound of eq. (6).

    ``N_alpha(x) = 1/(H W B^alpha) sum_{v,u} (sum_k x(v,u,k)^2)^(alpha/2)``: the colour norm is
    taken over channels (dim 1), so the term is isotropic in RGB space.  The hard constraint
    ``||x(v,u,:)|| <= B+`` is enforced by :meth:`project`, the projection of Algorithm 1 line 8.
    """

    def __init__(self, alpha: float, B: float, B_plus: float | None = None) -> None:
        self.alpha, self.B = float(alpha), float(B)
        self.B_plus = float(B_plus) if B_plus is not None else 2.0 * self.B

    def __call__(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        sq = (x * (1.0 / self.B)).square().sum(1)  # scale first: B^alpha overflows nothing this way
        half = self.alpha / 2
        if half == 3.0:  # the default alpha = 6: two multiplications instead of a general power
            v = sq * sq * sq
        else:
            v = sq.pow(half)
        return _per_element_sum(v) / (H * W)

    @torch.no_grad()
    def value_and_grad(self, x: Tensor, into: Tensor | None = None, weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """The per-element values and their gradient ``dN/dx = alpha/(H W B^2) s^(alpha/2-1) x``
        with ``s = ||x(v,u,:)||^2 / B^2``, in closed form: a few passes over the image instead of
        autograd's graph (the engine's per-step overhead, issue 5).

        With ``into``, ``weight`` times the gradient is added to it in place (one fused pass) and
        ``into`` is returned instead of a new tensor; the values are never weighted.
        """
        H, W = x.shape[-2:]
        inv_b2 = 1.0 / (self.B * self.B)
        s = x.square().sum(1, keepdim=True).mul_(inv_b2)  # one channel: cheap from here on
        half = self.alpha / 2
        p = s.square() if half == 3.0 else s.pow(half - 1)  # s^(alpha/2 - 1)
        values = _per_element_sum(p * s) / (H * W)
        p.mul_(weight * self.alpha * inv_b2 / (H * W))
        if into is None:
            return values, x * p
        return values, into.addcmul_(x, p)

    @torch.no_grad()
    def project(self, x: Tensor) -> Tensor:
        """In place: scale every pixel's colour vector into the ball of radius ``B+`` (eq. 6)."""
        norm = x.square().sum(1, keepdim=True).sqrt_()
        x.mul_(norm.clamp_min_(self.B_plus).reciprocal_().mul_(self.B_plus))  # min(1, B+ / ||x||)
        return x


class TotalVariation:
    """The ``TV^beta`` regularizer of section 3.2.2.

    ``R(x) = 1/(H W V^beta) sum_{v,u,k} ((x(v,u+1,k) - x(v,u,k))^2 + (x(v+1,u,k) - x(v,u,k))^2)^(beta/2)``
    with ``u`` the column (dim 3) and ``v`` the row (dim 2).  Differences across the last column
    and row are zero (the image is extended by replication, as in the authors' ``tv.m``).
    """

    def __init__(self, beta: float, V: float, eps: float = 1e-6) -> None:
        self.beta, self.V, self.eps = float(beta), float(V), eps

    def __call__(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        x = x * (1.0 / self.V)
        d_col = x[..., :, 1:] - x[..., :, :-1]  # x(v, u+1) - x(v, u); zero across the last column
        d_row = x[..., 1:, :] - x[..., :-1, :]  # x(v+1, u) - x(v, u); zero across the last row
        if self.beta == 2.0:  # the default: a sum of squares, no pairing of the two differences needed
            return (_per_element_sum(d_col.square()) + _per_element_sum(d_row.square())) / (H * W)
        sq = F.pad(d_col.square(), (0, 1)) + F.pad(d_row.square(), (0, 0, 0, 1))
        # (.)^(beta/2) has an infinite slope at 0 for beta < 2: keep the gradient finite
        # where the image is locally constant, as the authors' code does with max(v, 1e-6).
        safe = sq.clamp_min(self.eps)
        v = torch.where(sq > self.eps, safe.pow(self.beta / 2), sq * self.eps ** (self.beta / 2 - 1))
        return _per_element_sum(v) / (H * W)

    @torch.no_grad()
    def value_and_grad(self, x: Tensor, into: Tensor | None = None, weight: float = 1.0) -> tuple[Tensor, Tensor]:
        """The per-element values and their gradient w.r.t. ``x``; with ``into``, ``weight`` times
        the gradient is added to it in place and ``into`` is returned.

        For beta = 2 in closed form: ``2/(V^2 H W)`` times the backward-minus-forward
        differences; other exponents go through autograd.
        """
        if self.beta != 2.0:  # the general exponent: autograd on a detached copy
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                values = self(xx)
                (grad,) = torch.autograd.grad(values.sum(), xx)
            values = values.detach()
            return (values, grad.mul_(weight)) if into is None else (values, into.add_(grad, alpha=weight))
        H, W = x.shape[-2:]
        d_col = x[..., :, 1:] - x[..., :, :-1]  # x(v, u+1) - x(v, u)
        d_row = x[..., 1:, :] - x[..., :-1, :]  # x(v+1, u) - x(v, u)
        k = 1.0 / (self.V * self.V * H * W)
        values = (_per_element_sum(d_col.square()) + _per_element_sum(d_row.square())).mul_(k)
        c = 2.0 * k * weight  # d/dx of k sum d^2
        grad = into if into is not None else torch.zeros_like(x)
        grad[..., :, 1:].add_(d_col, alpha=c)
        grad[..., :, :-1].sub_(d_col, alpha=c)
        grad[..., 1:, :].add_(d_row, alpha=c)
        grad[..., :-1, :].sub_(d_row, alpha=c)
        return values, grad


class _JitterCrop(torch.autograd.Function):
    """Per-element crops; the backward pass writes each gradient into its window of a zero
    canvas (one copy per element, no scatter-add, no full-canvas temporaries per element)."""

    @staticmethod
    def forward(ctx: object, canvas: Tensor, offsets: list[list[int]], H: int, W: int) -> Tensor:  # type: ignore[override]
        ctx.offsets, ctx.shape = offsets, canvas.shape  # type: ignore[attr-defined]
        out = canvas.new_empty((canvas.shape[0], canvas.shape[1], H, W))
        for n, (r, c) in enumerate(offsets):
            out[n] = canvas[n, :, r : r + H, c : c + W]
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return uncrop(grad, ctx.offsets, ctx.shape), None, None, None  # type: ignore[attr-defined]


class WindowGradient:
    """The data term's gradient w.r.t. the engine's canvas, left where it lies: zero outside each
    element's jitter window (eq. 7) and, at window pixel ``(i, j)``, the image gradient ``values``
    at pixel ``(i + top, j + left)``, times ``scale[n]``, divided by ``divisor[c]``.

    ``values`` is ``(N, C, A, s, B, s)`` with any strides: pixel ``(a s + y, b s + x)`` of an
    image ``A s x B s`` (zero beyond it); ``s = 1`` for a plain ``(N, C, H, W)`` gradient, such as
    a network's input gradient (:meth:`of_image`), ``s > 1`` for the phases of a strided first
    layer (:class:`~preimage.representations.affine.QuadraticL2`), which need no reshuffling.  The
    engine's update kernel reads it directly (:func:`preimage.native.update`): the canvas-sized
    gradient, written and read again, and the phases' reshuffle are gone (SqueezeNet conv1 at
    batch 16: 2.5 ms per step).  :meth:`canvas` writes it out for every other path.
    """

    def __init__(self, values: Tensor, offsets: Tensor, size: tuple[int, int], origin: tuple[int, int] = (0, 0),
                 divisor: Tensor | None = None, scale: Tensor | None = None) -> None:
        self.values, self.offsets, self.size, self.origin = values, offsets, size, origin
        self.divisor, self.scale = divisor, scale

    @classmethod
    def of_image(cls, grad: Tensor, offsets: Tensor, divisor: Tensor | None = None) -> "WindowGradient":
        """The gradient ``grad / divisor`` ``(N, C, H, W)`` of the windows at ``offsets``."""
        return cls(grad[:, :, :, None, :, None], offsets, (grad.shape[-2], grad.shape[-1]), divisor=divisor)

    def image(self) -> Tensor:
        """The windows' gradient, ``(N, C, H, W)``: ``values`` as an image, cut at the origin,
        scaled and divided (in fp32 for bf16 values, else in their dtype)."""
        N, C, A, s, B, _ = self.values.shape
        v = self.values if self.values.dtype in (torch.float32, torch.float64) else self.values.float()
        img = v.reshape(N, C, A * s, B * s)
        (top, left), (H, W) = self.origin, self.size
        if top + H <= A * s and left + W <= B * s:
            img = img[:, :, top : top + H, left : left + W]
        else:
            img = F.pad(img, (-left, left + W - B * s, -top, top + H - A * s))
        if self.scale is not None:
            img = img * self.scale.to(img.dtype).view(-1, 1, 1, 1)
        if self.divisor is not None:
            img = img / self.divisor.to(img.dtype).view(1, -1, 1, 1)
        return img

    def canvas(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The canvas gradient ``shape`` written out: in one C pass where it applies
        (:func:`preimage.native.window_canvas`), else :func:`uncrop` of :meth:`image`."""
        out = native.window_canvas(self, tuple(shape))
        return out if out is not None else uncrop(self.image(), self.offsets.tolist(), shape)


def uncrop(grad: Tensor, offsets: list[list[int]], shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The gradient of :func:`jitter_crop` w.r.t. its canvas of ``shape``: each element's
    ``grad`` in its window of a zero canvas, one copy per element (for fp32 on the CPU
    :func:`preimage.native.uncrop` does it in one pass)."""
    H, W = grad.shape[-2:]
    full = grad.new_zeros(shape)
    for n, (r, c) in enumerate(offsets):
        full[n, :, r : r + H, c : c + W] = grad[n]
    return full


class _GatherCrop(torch.autograd.Function):
    """All per-element crops as one ``gather`` along each image's flattened pixels, and the
    backward pass as one ``scatter_`` into a zero canvas (the windows of different elements never
    meet, so nothing accumulates).  On a GPU two kernels where :class:`_JitterCrop` launches one
    copy per element; on an H200 at batch 128 (3 x 227², fp32) forward + backward take 0.50 ms,
    against 0.83 for advanced indexing of a channels-last view (bit for bit the same)."""

    @staticmethod
    def forward(ctx: object, canvas: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)  # type: ignore[attr-defined]
        ctx.shape = canvas.shape  # type: ignore[attr-defined]
        N, C = canvas.shape[:2]
        return canvas.reshape(N, C, -1).gather(2, index.expand(N, C, -1))

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors  # type: ignore[attr-defined]
        full = grad.new_zeros(ctx.shape)  # type: ignore[attr-defined]
        N, C = full.shape[:2]
        full.view(N, C, -1).scatter_(2, index.expand(N, C, -1), grad.reshape(N, C, -1))
        return full, None


def gather_crop(canvas: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`jitter_crop` as one gather (what it does on CUDA; see :class:`_GatherCrop`): each
    element's window as indices into its flattened ``(H + T - 1) x (W + T - 1)`` pixels."""
    H, W = size
    N, C = canvas.shape[:2]
    offsets = offsets.to(canvas.device, non_blocking=True).long()
    rows = offsets[:, :1] + torch.arange(H, device=canvas.device)
    cols = offsets[:, 1:] + torch.arange(W, device=canvas.device)
    index = (rows[:, :, None] * canvas.shape[-1] + cols[:, None, :]).view(N, 1, H * W)
    return _GatherCrop.apply(canvas, index).view(N, C, H, W)


def jitter_crop(canvas: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """``jitter(x; tau)`` of eq. (7): crop ``size`` from ``canvas`` at per-element ``offsets``.

    ``canvas`` is ``(N, C, H + T - 1, W + T - 1)`` and ``offsets`` ``(N, 2)`` holds
    ``(tau_2, tau_1)`` (row, column) in ``[0, T - 1]``.  Differentiable w.r.t. ``canvas``.
    One copy per element on the CPU; one gather on other devices, where each copy is a kernel
    launch (an H200 at batch 128 spent ~6 ms of CPU time per step launching them).  Offsets
    on a GPU (the recorded CUDA-graph step, :mod:`preimage.graphs`) always take the gather:
    the host never reads them.
    """
    H, W = size
    if offsets.device.type != "cpu":
        return gather_crop(canvas, offsets, size)
    if bool((offsets == offsets[:1]).all()):
        r, c = int(offsets[0, 0]), int(offsets[0, 1])
        return canvas[:, :, r : r + H, c : c + W]
    if canvas.device.type != "cpu":
        return gather_crop(canvas, offsets, size)
    return _JitterCrop.apply(canvas, offsets.tolist(), H, W)


class CropWindow:
    """What a converted crop whose gradient goes to a ``sink`` carries (:func:`crop_window`):
    the convolution that reads the crop can put its input gradient in the sink itself, as a
    :class:`WindowGradient` in the layout it computed it in (a strided first layer's phases,
    never shuffled into an image: AlexNet conv1 at batch 16 in bf16, 0.43 ms per step), and give
    the crop no gradient (:mod:`~preimage.representations.input_conv`)."""

    def __init__(self, sink: list, offsets: Tensor, divisor: Tensor | None) -> None:
        self.sink, self.offsets, self.divisor = sink, offsets, divisor

    def put(self, values: Tensor, size: tuple[int, int], origin: tuple[int, int]) -> None:
        """The crop's gradient, ``values`` ``(N, C, A, s, B, s)`` seen from ``origin`` (see
        :class:`WindowGradient`)."""
        self.sink.append(WindowGradient(values, self.offsets, size, origin, self.divisor))


def crop_window(t: Tensor) -> CropWindow | None:
    """The :class:`CropWindow` of a converted crop's output ``t``, if it has one."""
    return getattr(t, "_preimage_crop_window", None)


class _ConvertedCrop(torch.autograd.Function):
    """:func:`jitter_crop`, a division by per-channel ``divisor`` and a conversion to ``dtype``
    and layout, as one C pass forward and one backward (:func:`preimage.native.crop` /
    :func:`~preimage.native.uncrop`).  With a ``sink`` list, the backward pass appends the
    crop's gradient to it as a :class:`WindowGradient` and gives the canvas none: the engine's
    update kernel reads it in the windows (no canvas-sized gradient written and read again).
    A convolution may have put its part there already (:class:`CropWindow`): the two add."""

    @staticmethod
    def forward(ctx, canvas: Tensor, offsets: Tensor, size: tuple[int, int], divisor: Tensor | None,  # type: ignore[override]
                dtype: torch.dtype, channels_last: bool, sink: list | None) -> Tensor:
        ctx.offsets, ctx.shape, ctx.divisor, ctx.sink = offsets, tuple(canvas.shape), divisor, sink
        ctx.set_materialize_grads(sink is None)  # with a sink: None when the gradient went there
        return native.crop_kernel(canvas, offsets, size, divisor, dtype, channels_last)  # checked by the caller

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.sink is None:
            return native.uncrop(grad, ctx.offsets, ctx.shape, ctx.divisor), None, None, None, None, None, None
        if grad is not None:
            if ctx.sink:  # a convolution's part, put there by it, and another reader's: summed
                put = ctx.sink.pop()
                grad = grad.float() + WindowGradient(put.values, put.offsets, put.size, put.origin).image()
            ctx.sink.append(WindowGradient.of_image(grad, ctx.offsets, ctx.divisor))
        return (None,) * 7


def converted_crop(canvas: Tensor, offsets: Tensor, size: tuple[int, int], divisor: Tensor | None = None,
                   dtype: torch.dtype = torch.float32, channels_last: bool = False,
                   sink: list | None = None) -> Tensor | None:
    """``(jitter_crop(canvas, offsets, size) / divisor).to(dtype, channels_last)`` in one C pass
    each way, bit for bit (differentiable w.r.t. ``canvas``); None where the C kernels do not
    apply (not on the CPU, not fp32 in, not available: :func:`preimage.native.crop_applies`).
    Where ATen makes one copy per element, then a pass per conversion each way: AlexNet conv1's
    input in bf16 at batch 16, forward + backward 4.0 against ~0.7 ms per step.  ``sink``: a
    list that the backward pass appends the canvas's gradient to, as a :class:`WindowGradient`,
    instead of accumulating it into ``canvas.grad`` (the crop then carries a :class:`CropWindow`
    for the convolution that reads it)."""
    if not native.crop_applies(canvas, offsets, size, divisor, dtype):
        return None
    crop = _ConvertedCrop.apply(canvas, offsets, size, divisor, dtype, channels_last, sink)
    if sink is not None:
        crop._preimage_crop_window = CropWindow(sink, offsets, divisor)
    return crop
