"""The three visualizations of the paper as presets over the engine (section 3).

* :func:`invert` — inversion (section 5): normalized L2 loss to ``Φ0 = Φ(x0)`` (eq. 2), optionally
  through a binary mask (eq. 3), starting from random noise so that only the code is used.
* :func:`maximize` — activation maximization (section 6): inner-product loss (eq. 4) with a one-hot
  or weighted ``Φ0`` and ``Z = M ρ²``.
* :func:`caricature` — caricaturization (section 7): ``Φ0 = max(0, Φ(x0))``, ``Z = ||Φ0||``,
  starting from ``x0``.

All three work on batches: every image is run with every seed (and every unit) in one tensor.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .defaults import PAPER, Settings
from .engine import Callback, Stage, Trace, optimize, representation_device
from .objectives import InnerProductLoss, L2Loss, ObjectiveError
from .representations.base import Representation, RepresentationError


@dataclass
class Result:
    """The output of a visualization for a batch of ``N`` elements.

    Attributes:
        x: optimized images in Φ's input space, ``(N, C, H, W)`` (null-mean, e.g. 0..255 - mean).
        images: the same as displayable RGB photos in [0, 1], ``(N, 3, H, W)``.
        energy: term name -> per-iteration values ``(iterations, N)``: ``loss`` (times C),
            ``bounded_range``, ``tv`` and ``total``.
        error: ``(N,)``; inversion: the normalized reconstruction error
            ``||Φ(x*) - Φ0|| / ||Φ0||`` (masked as eq. 3 when a mask is given); maximization and
            caricature: the final normalized loss ``-<Φ(x*), Φ0> / Z`` (eq. 4).
        activation: ``(N,)`` ``<Φ(x*), Φ0>`` for maximization and caricature, else ``None``.
        elements: what each batch element is: ``{"image": i, "seed": s}`` (+ ``"unit"``).
        config: the full configuration, JSON-serializable.
    """

    x: Tensor
    images: Tensor
    energy: dict[str, Tensor]
    error: Tensor
    elements: list[dict[str, Any]]
    config: dict[str, Any]
    activation: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def final_energies(self, n: int) -> dict[str, float]:
        return {k: float(v[-1, n]) for k, v in self.energy.items()}


def _device_of(rep: Representation, device: torch.device | str | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RepresentationError("--device cuda was asked for but CUDA is not available")
        return dev
    return representation_device(rep)


def _config(mode: str, rep: Representation, settings: Settings, trace: Trace, stages: Sequence[Stage],
            device: torch.device, **more: Any) -> dict[str, Any]:
    from . import __version__

    return {
        "mode": mode,
        "representation": rep.name,
        "representation_config": getattr(rep, "config", lambda: {})(),
        "stride": rep.geometry.stride,
        "receptive_field": rep.geometry.receptive_field,
        "settings": settings.to_dict(),
        "jitter": trace.jitter,
        "step_size": trace.lr,
        "compiled": trace.compiled,
        "quadratic": trace.quadratic,
        "engine_batch_size": trace.batch_size,
        "stages": [asdict(s) for s in stages],
        "device": str(device),
        "versions": {"preimage": __version__, "torch": torch.__version__, "python": platform.python_version()},
        **more,
    }


def _as_photos(photos: Tensor) -> Tensor:
    if photos.dim() == 3:
        photos = photos.unsqueeze(0)
    if photos.dim() != 4 or photos.shape[1] not in (1, 3):
        raise RepresentationError(f"expected photos of shape (N, 1 or 3, H, W), got {tuple(photos.shape)}")
    if not torch.isfinite(photos).all():
        raise RepresentationError("the input image contains NaN or infinite values")
    return photos.float()


def _repeat(t: Tensor, times: int) -> Tensor:
    return t.repeat_interleave(times, dim=0)


def invert(
    representation: Representation,
    photos: Tensor,
    seeds: Sequence[int] = (0,),
    settings: Settings = PAPER,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
) -> Result:
    """Reconstruct images from their codes ``Φ0 = Φ(x0)`` (eqs. 1-3, section 5).

    All images x seeds form one batch, optimized in chunks of ``batch_size`` (default: what fits
    in memory, :func:`preimage.engine.auto_batch_size`).  ``compile`` fuses the image-side work
    and the loss of every step into compiled kernels (:mod:`preimage.fused`; same results up to
    float rounding): None, the default, does so on the CPU with preimage's C kernels where they
    build (:mod:`preimage.native`); True also on a GPU, with ``torch.compile`` (~15 s of
    compilation the first time); False never.

    Args:
        photos: ``(B, 3 or 1, H, W)`` RGB or gray images in [0, 1].
        seeds: each image is inverted once per seed; the batch is image-major
            (image 0 seed 0, image 0 seed 1, ...).
        mask: optional binary mask of the code's shape, one per image ``(B, ...)`` or shared.
    Runs ``settings.iterations`` steps at ``eta0`` with jitter, then ``settings.fine_iterations``
    at ``eta0 / 10`` without (the authors' code).  Only the code is used: the start is noise.
    """
    dev = _device_of(representation, device)
    photos = _as_photos(photos).to(dev)
    with torch.no_grad():
        x0 = representation.preprocess(photos)
        target = representation(x0).float()
    return invert_code(representation, target, tuple(photos.shape[-2:]), seeds, settings, mask, dev, callback,
                       batch_size, compile)


def invert_code(
    representation: Representation,
    code: Tensor,
    size: tuple[int, int],
    seeds: Sequence[int] = (0,),
    settings: Settings = PAPER,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
) -> Result:
    """Like :func:`invert` but from codes ``(B, ...)`` directly, for images of ``size``."""
    dev = _device_of(representation, device)
    code = code.to(dev).float()
    S = len(seeds)
    if S == 0:
        raise ObjectiveError("at least one seed is needed")
    if mask is not None:
        mask = mask.to(dev)
        if mask.dim() == code.dim() - 1:
            mask = mask.unsqueeze(0)
        if mask.shape[1:] != code.shape[1:] or mask.shape[0] not in (1, code.shape[0]):
            raise ObjectiveError(f"mask shape {tuple(mask.shape)} does not match the code shape {tuple(code.shape)}")
        mask = _repeat(mask.expand_as(code), S)
    loss = L2Loss(_repeat(code, S), mask)
    all_seeds = [int(s) for _ in range(code.shape[0]) for s in seeds]
    stages = [Stage(settings.iterations)]
    if settings.fine_iterations > 0:
        stages.append(Stage(settings.fine_iterations, lr_factor=0.1, jitter=False))
    trace = optimize(representation, loss, size, all_seeds, settings, stages, device=dev, callback=callback,
                     batch_size=batch_size, compile=compile)
    with torch.no_grad():
        error = loss.error(representation(trace.x).float()).cpu()
    elements = [{"image": i, "seed": int(s)} for i in range(code.shape[0]) for s in seeds]
    return Result(
        x=trace.x.cpu(),
        images=representation.deprocess(trace.x).cpu(),
        energy=trace.energy,
        error=error,
        elements=elements,
        config=_config("invert", representation, settings, trace, stages, dev, masked=mask is not None),
    )


def one_hot(code_shape: Sequence[int], unit: int, position: tuple[int, int] | None = None) -> Tensor:
    """``Φ0 = e_i`` (section 6): the one-hot target of ``unit`` (a channel, or a neuron of a vector code).

    For spatial codes ``(K, h, w)`` the unit is channel ``unit`` at ``position`` (default: the
    centre of the map, as the authors do).
    """
    w = torch.zeros(tuple(code_shape))
    K = code_shape[0]
    if not 0 <= unit < K:
        raise ObjectiveError(f"unit {unit} out of range: the layer has {K} channels")
    if len(code_shape) == 1:
        w[unit] = 1
    elif len(code_shape) == 3:
        h, ww = code_shape[1:]
        r, c = position if position is not None else (h // 2, ww // 2)
        w[unit, r, c] = 1
    else:
        raise ObjectiveError(f"cannot build a one-hot target for a code of shape {tuple(code_shape)}")
    return w


def code_shape(representation: Representation, size: tuple[int, int], device: torch.device | str = "cpu") -> tuple[int, ...]:
    """The shape of one code for an input of ``size`` (without the batch dimension)."""
    with torch.no_grad():
        z = torch.zeros(1, representation.in_channels, *size, device=device)
        return tuple(representation(z).shape[1:])


def maximize(
    representation: Representation,
    size: tuple[int, int],
    units: Sequence[int | Tensor],
    seeds: Sequence[int] = (0,),
    M: float | Sequence[float] = 1.0,
    settings: Settings = PAPER,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
) -> Result:
    """Activation maximization (eq. 4, section 6) of each unit, once per seed.

    Args:
        units: channel / neuron indices (one-hot, :func:`one_hot`) or weight tensors of the
            code's shape (weighted combinations).
        M: each unit's maximum over natural images (one value, or one per unit); with
            ``ρ`` the receptive field the normalization is ``Z = M ρ² / 100²`` — the paper's
            ``M ρ²`` in the units of the authors' code (``innerWeight = 10000 / rf² / M``), which
            keeps the loss comparable with the regularizers.
    """
    dev = _device_of(representation, device)
    shape = code_shape(representation, size, dev)
    weights = torch.stack([one_hot(shape, u) if isinstance(u, int) else u.float().reshape(shape) for u in units])
    Ms = torch.as_tensor([M] * len(units) if isinstance(M, (int, float)) else list(M), dtype=torch.float32)
    if Ms.numel() != len(units) or (Ms <= 0).any():
        raise ObjectiveError("M must be positive, one value or one per unit")
    rho = representation.geometry.receptive_field
    Z = Ms * (rho / 100.0) ** 2
    S = len(seeds)
    loss = InnerProductLoss(_repeat(weights, S).to(dev), _repeat(Z, S).to(dev))
    all_seeds = [int(s) for _ in units for s in seeds]
    stages = [Stage(settings.iterations)]
    trace = optimize(representation, loss, size, all_seeds, settings, stages, device=dev, callback=callback,
                     batch_size=batch_size, compile=compile)
    with torch.no_grad():
        code = representation(trace.x).float()
    elements = [{"unit": u if isinstance(u, int) else "weights", "seed": int(s)} for u in units for s in seeds]
    return Result(
        x=trace.x.cpu(),
        images=representation.deprocess(trace.x).cpu(),
        energy=trace.energy,
        error=loss(code).cpu(),
        activation=loss.activation(code).cpu(),
        elements=elements,
        config=_config("maximize", representation, settings, trace, stages, dev, M=Ms.tolist(), Z=Z.tolist()),
    )


def caricature(
    representation: Representation,
    photos: Tensor,
    seeds: Sequence[int] = (0,),
    settings: Settings = PAPER,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    batch_size: int | None = None,
    compile: bool | None = None,
) -> Result:
    """Caricaturization (section 7): exaggerate what is active in ``Φ(x0)``, starting from ``x0``.

    ``Φ0 = max(0, Φ(x0))`` and ``Z = ||Φ0||`` in eq. (4).  With several seeds only the jitter
    differs between runs.
    """
    dev = _device_of(representation, device)
    photos = _as_photos(photos).to(dev)
    with torch.no_grad():
        x0 = representation.preprocess(photos)
        phi0 = representation(x0).float().clamp_min(0)
    Z = phi0.reshape(phi0.shape[0], -1).norm(dim=1)
    if (Z == 0).any():
        raise ObjectiveError("the image's code has no positive component: nothing to caricature")
    S = len(seeds)
    loss = InnerProductLoss(_repeat(phi0, S), _repeat(Z, S))
    all_seeds = [int(s) for _ in range(photos.shape[0]) for s in seeds]
    stages = [Stage(settings.iterations)]
    trace = optimize(representation, loss, tuple(photos.shape[-2:]), all_seeds, settings, stages,
                     init=_repeat(x0, S), device=dev, callback=callback, batch_size=batch_size,
                     compile=compile)
    with torch.no_grad():
        code = representation(trace.x).float()
        start = loss.activation(representation(_repeat(x0, S)).float()).cpu()
    elements = [{"image": i, "seed": int(s)} for i in range(photos.shape[0]) for s in seeds]
    return Result(
        x=trace.x.cpu(),
        images=representation.deprocess(trace.x).cpu(),
        energy=trace.energy,
        error=loss(code).cpu(),
        activation=loss.activation(code).cpu(),
        elements=elements,
        config=_config("caricature", representation, settings, trace, stages, dev),
        extra={"initial_activation": start},
    )


def window_mask(code_shape: Sequence[int], window: int = 5) -> Tensor:
    """Eq. (3)'s mask for Figure 9: the central ``window x window`` locations, all channels."""
    if len(code_shape) != 3:
        raise ObjectiveError(f"a spatial window needs a (channels, h, w) code, not {tuple(code_shape)}")
    K, h, w = code_shape
    if window < 1:
        raise ObjectiveError("the window must be at least 1x1")
    mask = torch.zeros(tuple(code_shape))
    r0, c0 = max(0, (h - window) // 2), max(0, (w - window) // 2)
    mask[:, r0 : r0 + window, c0 : c0 + window] = 1
    return mask


def channel_mask(code_shape: Sequence[int], channels: Sequence[int]) -> Tensor:
    """Eq. (3)'s mask for Figure 10: a subset of channels (e.g. one of CaffeNet's two streams)."""
    K = code_shape[0]
    bad = [c for c in channels if not 0 <= c < K]
    if bad or not channels:
        raise ObjectiveError(f"channel {bad[0]} out of range: the code has {K} channels" if bad
                             else "no channels selected")
    mask = torch.zeros(tuple(code_shape))
    mask[list(channels)] = 1
    return mask


def mask_support(representation: Representation, size: tuple[int, int], mask: Tensor,
                 device: torch.device | str | None = None) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)``: the pixels on which the masked code depends (its overall
    receptive field; the white box of Figure 9), found by back-propagating random inputs."""
    dev = _device_of(representation, device)
    support = torch.zeros(size, dtype=torch.bool, device=dev)
    g = torch.Generator().manual_seed(0)
    m = mask.to(dev)
    for _ in range(2):
        x = (torch.randn(1, representation.in_channels, *size, generator=g) * 50).to(dev).requires_grad_(True)
        with torch.enable_grad():
            (representation(x).float().abs() * m).sum().backward()
        assert x.grad is not None
        support |= x.grad[0].abs().sum(0) > 0
    rows, cols = support.any(1).nonzero(), support.any(0).nonzero()
    if len(rows) == 0:
        return (0, 0, -1, -1)
    return (int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
