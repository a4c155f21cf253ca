"""The optimization loop: energy (1) with jitter (eq. 7), minimized by Algorithm 1.

One call optimizes a whole batch of independent problems (images x seeds x units) in one
tensor.  The engine knows nothing about HOG or CNNs: it receives a representation Φ, a loss
over codes returning one value per batch element, and the settings.

Data flow per iteration::

    canvas x ─ crop τ ─▶ Φ ─▶ loss × C ─┐
    canvas x ─▶ N_alpha + TV^beta ──────┴─▶ energy ─▶ backward ─▶ Algorithm 1 ─▶ Π_B+ ─▶ x
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .defaults import Settings
from .objectives import BoundedRange, TotalVariation, jitter_crop
from .optim import PreimageSGD
from .representations.base import Representation

ENERGY_TERMS = ("loss", "bounded_range", "tv", "total")
"""Names of the recorded energy terms; ``loss`` already includes the factor C."""

Loss = Callable[[Tensor], Tensor]
Callback = Callable[[int, int, dict[str, float]], None]


class PreimageError(RuntimeError):
    """The optimization cannot go on (the energy became NaN, ...)."""


@dataclass(frozen=True)
class Stage:
    """A run of Algorithm 1 at a fixed initial learning rate."""

    iterations: int
    lr_factor: float = 1.0  # multiplies eta0
    jitter: bool = True  # False: always feed the central crop


@dataclass
class Trace:
    """What the loop produces: final images and per-iteration energies."""

    x: Tensor  # (N, C, H, W) central crop of the canvas, input space of Φ
    energy: dict[str, Tensor]  # term -> (iterations, N)
    jitter: int  # T actually used
    lr: float  # the step actually used: H * W * eta0


def representation_device(representation: Representation) -> torch.device:
    """Where the representation's parameters (or buffers) live; CPU for a stateless one."""
    for t in list(representation.parameters()) + list(representation.buffers()):
        return t.device
    return torch.device("cpu")


def noise_init(shape: Sequence[int], seed: int, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [-1, 1] rescaled so that its 95th percentile equals ``scale``.

    ``scale`` is ``B / sqrt(3)`` by default (the authors' ``nnpreimage.m``).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=g) * 2 - 1
    q = torch.quantile(x.flatten(), 0.95)
    return x * (scale / q)


def optimize(
    representation: Representation,
    loss: Loss,
    size: tuple[int, int],
    seeds: Sequence[int],
    settings: Settings,
    stages: Sequence[Stage],
    init: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    callback_every: int = 10,
) -> Trace:
    """Minimize ``R_alpha(x) + R_TV(x) + C * loss(Φ(jitter(x)))`` for a batch of ``len(seeds)``.

    Args:
        representation: Φ; evaluated on crops of shape ``(N, in_channels, *size)``.
        loss: maps codes to per-element losses ``(N,)`` (eqs. 2-4).
        size: ``(H, W)`` of the images sought.
        seeds: one seed per batch element: its noise start and its jitter shifts.
        settings: the paper's constants (:mod:`preimage.defaults`).
        stages: successive runs of Algorithm 1 (e.g. 300 at eta0, then 50 at eta0/10).
        init: optional start images ``(N, C, H, W)`` (caricatures start from x0); the canvas
            border around them is zero, as in the authors' code.
        device: where to compute; defaults to the representation's device.
        callback: called as ``callback(t, total, batch_mean_energies)`` every
            ``callback_every`` iterations and at the last one.
    """
    N, C = len(seeds), representation.in_channels
    H, W = size
    device = torch.device(device) if device is not None else representation_device(representation)
    T = settings.jitter if settings.jitter is not None else representation.geometry.jitter
    T = max(1, int(T))
    centre = (T - 1) // 2

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    canvas_shape = (C, H + T - 1, W + T - 1)
    if init is None:
        scale = settings.init_scale if settings.init_percentile_scale else settings.B
        x = torch.stack([noise_init(canvas_shape, s, scale, g) for s, g in zip(seeds, gens)])
    else:
        if tuple(init.shape) != (N, C, H, W):
            raise PreimageError(f"initial images have shape {tuple(init.shape)}, expected {(N, C, H, W)}")
        x = torch.zeros((N, *canvas_shape))
        x[:, :, centre : centre + H, centre : centre + W] = init.detach().float().cpu()
    x = x.to(device).requires_grad_(True)

    bounded = BoundedRange(settings.alpha, settings.B, settings.B_plus)
    tv = TotalVariation(settings.beta, settings.V)
    lr = settings.eta0 * H * W
    opt = PreimageSGD([x], lr=lr, momentum=settings.momentum, projection=bounded.project)
    with torch.no_grad():
        bounded.project(x)

    for prm in representation.parameters():
        prm.requires_grad_(False)

    total = sum(s.iterations for s in stages)
    energy = torch.zeros(total, len(ENERGY_TERMS), N, device=device)
    centre_off = torch.full((N, 2), centre, dtype=torch.long)
    t = 0
    for stage in stages:
        opt.set_lr(lr * stage.lr_factor)
        for _ in range(stage.iterations):
            if stage.jitter and T > 1:
                offsets = torch.stack([torch.randint(0, T, (2,), generator=g) for g in gens])
            else:
                offsets = centre_off
            opt.zero_grad(set_to_none=True)
            crop = jitter_crop(x, offsets, (H, W))
            code = representation(crop)
            e_loss = settings.C * loss(code)
            e_range = settings.lambda_alpha * bounded(x)
            e_tv = settings.lambda_tv * tv(x)
            e_total = e_loss + e_range + e_tv
            e_total.sum().backward()
            opt.step()
            with torch.no_grad():
                energy[t] = torch.stack([e_loss, e_range, e_tv, e_total]).detach().float()
            t += 1
            if t % callback_every == 0 or t == total:
                means = energy[t - 1].mean(1).tolist()
                if not all(torch.isfinite(torch.tensor(means))):
                    raise PreimageError(f"the energy became NaN or infinite at iteration {t}")
                if callback is not None:
                    callback(t, total, dict(zip(ENERGY_TERMS, means)))

    final = x.detach()[:, :, centre : centre + H, centre : centre + W].clone()
    if not torch.isfinite(final).all():
        raise PreimageError("the optimized image contains NaN or infinite values")
    energy_cpu = energy.cpu()
    return Trace(
        x=final,
        energy={k: energy_cpu[:, i] for i, k in enumerate(ENERGY_TERMS)},
        jitter=T,
        lr=lr,
    )
