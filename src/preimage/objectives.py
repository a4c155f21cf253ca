"""The terms of energy (1): losses (eqs. 2-4) and regularizers (eqs. 5-6, TV^beta, eq. 7).

Every term maps a batch to a vector of per-element values of shape ``(N,)`` so that the
elements of a batch (images x seeds x units) are independent problems optimized together:
the engine minimizes the sum over the batch, whose gradient w.r.t. element ``n`` is the
gradient of element ``n``'s own energy.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ObjectiveError(ValueError):
    """A target or mask that defines no meaningful objective (zero norm, wrong shape, NaN)."""


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


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
        diff = code.float() - self.target
        if self.mask is not None:
            diff = diff * self.mask
        return _flat(diff).pow(2).sum(1) / self.norm2

    def error(self, code: Tensor) -> Tensor:
        """The paper's normalized reconstruction error ``||Φ(x*) - Φ0|| / ||Φ0||`` (section 5.1)."""
        return self(code).sqrt()


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

    def __call__(self, code: Tensor) -> Tensor:
        return -_flat(code.float() * self.weights).sum(1) / self.Z

    def activation(self, code: Tensor) -> Tensor:
        """``<Φ(x), Φ0>``: the quantity being maximized."""
        return _flat(code.float() * self.weights).sum(1)


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
        sq = (x / self.B).pow(2).sum(1)  # scale first: B^alpha overflows nothing this way
        return _flat(sq.pow(self.alpha / 2)).sum(1) / (H * W)

    @torch.no_grad()
    def project(self, x: Tensor) -> Tensor:
        """In place: scale every pixel's colour vector into the ball of radius ``B+`` (eq. 6)."""
        norm = x.pow(2).sum(1, keepdim=True).sqrt()
        x.mul_((self.B_plus / norm.clamp_min(1e-12)).clamp(max=1.0))
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
        x = x / self.V
        d_col = torch.zeros_like(x)
        d_row = torch.zeros_like(x)
        d_col[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]  # x(v, u+1) - x(v, u)
        d_row[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]  # x(v+1, u) - x(v, u)
        sq = d_col.pow(2) + d_row.pow(2)
        if self.beta == 2.0:
            v = sq
        else:
            # (.)^(beta/2) has an infinite slope at 0 for beta < 2: keep the gradient finite
            # where the image is locally constant, as the authors' code does with max(v, 1e-6).
            safe = torch.where(sq > self.eps, sq, torch.full_like(sq, self.eps))
            v = torch.where(sq > self.eps, safe.pow(self.beta / 2), sq * self.eps ** (self.beta / 2 - 1))
        return _flat(v).sum(1) / (H * W)


def jitter_crop(canvas: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """``jitter(x; tau)`` of eq. (7): crop ``size`` from ``canvas`` at per-element ``offsets``.

    ``canvas`` is ``(N, C, H + T - 1, W + T - 1)`` and ``offsets`` ``(N, 2)`` holds
    ``(tau_2, tau_1)`` (row, column) in ``[0, T - 1]``.  Differentiable w.r.t. ``canvas``.
    """
    N, C = canvas.shape[:2]
    H, W = size
    if bool((offsets == offsets[:1]).all()):
        r, c = int(offsets[0, 0]), int(offsets[0, 1])
        return canvas[:, :, r : r + H, c : c + W]
    dev = canvas.device
    rows = offsets[:, 0:1].to(dev) + torch.arange(H, device=dev)  # (N, H)
    cols = offsets[:, 1:2].to(dev) + torch.arange(W, device=dev)  # (N, W)
    n = torch.arange(N, device=dev).view(N, 1, 1, 1)
    k = torch.arange(C, device=dev).view(1, C, 1, 1)
    return canvas[n, k, rows.view(N, 1, H, 1), cols.view(N, 1, 1, W)]
