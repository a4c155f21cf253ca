"""The engine step's own arithmetic as compiled kernels (issue 5, ``compile=True``).

Two kernels: the image-side half of a step (:func:`fused_update`) and the inversion loss's value
and gradient (:func:`squared_distance`).  On the CPU they run as preimage's own C kernels
(:mod:`preimage.native`: one pass over memory each, 3-4x faster than inductor's code for the
update), and through ``torch.compile`` where those do not apply (CUDA, no C compiler).

After the backward pass through Φ, every iteration adds the regularizers' gradients (eqs. 5-6
and TV^beta), runs Algorithm 1 (lines 5-7) and projects onto the ``B+`` ball (line 8).  Eagerly
that is ~25 passes over image-sized fp32 tensors, which for shallow cuts costs as much as Φ
itself (benchmarks/: AlexNet conv1 in bf16 at batch 16 spends ~0.7 ms per image per step
there, against 2 ms in conv1).  :func:`fused_update` writes the same arithmetic as one function
that ``torch.compile`` turns into a few fused loops: it reads ``x``, the data-term gradient and
Algorithm 1's state once and writes them back once.

The arithmetic is that of :class:`~preimage.objectives.BoundedRange`,
:class:`~preimage.objectives.TotalVariation` (beta = 2) and
:class:`~preimage.optim.PreimageSGD`; ``tests/test_fused.py`` checks that both paths give the
same trajectory.  It is written out functionally rather than by calling those in-place methods:
traced as they are, their slice updates fuse less well (measured: a 27 % slower step at batch 16,
63 % at batch 1).  Compilation takes ~15 s the first time on a small CPU (cached on disk by
torch afterwards, ~3 s), so it pays for long runs (many images, layers or units) and on GPUs;
if it fails (no C++ compiler, an unsupported platform) the engine warns once and stays eager.

On per call (``optimize(..., compile=True)``, the same argument of
:func:`~preimage.visualizations.invert` and friends), for the process (:func:`set_default`,
the CLI's ``--compile``) or from the environment (``PREIMAGE_COMPILE=1``); off the same ways
(``compile=False``, ``--no-compile``, ``PREIMAGE_COMPILE=0``: plain PyTorch operations).
Where nothing says, it is on for the CPU when the C kernels are available (they cost ~1 s to
build, once per machine) and off elsewhere: ``torch.compile`` is never started unasked.  The
long CLI commands (``table4``, ``table5``, ``figures``) turn it on everywhere unless
``--no-compile`` or ``PREIMAGE_COMPILE=0``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import native
from .objectives import WindowGradient

Update = Callable[..., tuple[Tensor, Tensor]]

_kernels: dict[Update, Update] = {}  # function -> its torch.compile'd kernel
_rates: dict[tuple[float, torch.device], Tensor] = {}  # step sizes as tensors, made once per device
_broken: str | None = None
_default: bool | None = None  # set_default's value; None: PREIMAGE_COMPILE decides
announce: Callable[[str], None] | None = None  # told once when torch.compile starts (the CLI prints it)
_announced = False


def environment() -> bool | None:
    """What ``PREIMAGE_COMPILE`` says: True / False, or None where it is unset or empty."""
    value = os.environ.get("PREIMAGE_COMPILE", "").strip().lower()
    return None if value == "" else value not in ("0", "false", "no", "off")


def set_default(on: bool) -> None:
    """Whether runs that do not say (``compile=None``) use the compiled step."""
    global _default
    _default = bool(on)


def wanted(compile: bool | None, device: torch.device | str | None = None) -> bool:
    """``compile``, or the process default when it is None: :func:`set_default`'s value, else
    ``PREIMAGE_COMPILE``, else whether ``device`` is the CPU and the C kernels
    (:mod:`preimage.native`) are available."""
    if compile is not None:
        return bool(compile)
    said = _default if _default is not None else environment()
    if said is not None:
        return said
    return device is not None and torch.device(device).type == "cpu" and native.library(quiet=True) is not None


def active() -> bool:
    """False once compilation has failed in this process."""
    return _broken is None


def _row_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(1, 2, 3))


def fused_update(x: Tensor, grad: Tensor, G: Tensor, mu: Tensor, *, alpha: float, B: float, B_plus: float,
                 V: float, lambda_alpha: float, lambda_tv: float, rho: float, lr: Tensor | float) -> tuple[Tensor, Tensor]:
    """One step on the canvas ``x`` ``(N, C, H', W')`` given the data term's gradient ``grad``.

    Updates ``x``, ``G`` and ``mu`` in place and returns the per-element regularizer values
    ``(N_alpha, TV^2)`` at ``x`` before the step (unweighted, like ``value_and_grad``).
    """
    H, W = x.shape[-2:]
    HW = H * W
    # N_alpha, eq. (5): s = ||x(v,u,:)||^2 / B^2, value sum s^(alpha/2) / HW
    s = (x * x).sum(1, keepdim=True) * (1.0 / (B * B))
    p = s * s if alpha == 6.0 else s.pow(alpha / 2 - 1)
    e_range = _row_sum(p * s) / HW
    g = grad + x * (p * (lambda_alpha * alpha / (B * B * HW)))
    # TV^2: sum of squared forward differences (zero across the last row / column)
    k = 1.0 / (V * V * HW)
    d_col = x[..., :, 1:] - x[..., :, :-1]
    d_row = x[..., 1:, :] - x[..., :-1, :]
    e_tv = (_row_sum(d_col * d_col) + _row_sum(d_row * d_row)) * k
    pad = torch.nn.functional.pad
    lap = pad(d_col, (1, 0)) - pad(d_col, (0, 1)) + pad(d_row, (0, 0, 1, 0)) - pad(d_row, (0, 0, 0, 1))
    g = g + lap * (2.0 * k * lambda_tv)
    # Algorithm 1, lines 5-8
    G_new = G * rho + g * g
    mu_new = mu * rho - g / (G_new.sqrt() + 1.0 / lr)  # lr: eta0 of the current stage
    x_new = x + mu_new
    norm = (x_new * x_new).sum(1, keepdim=True).sqrt()
    x_new = x_new * (B_plus / norm.clamp_min(B_plus))
    G.copy_(G_new)
    mu.copy_(mu_new)
    x.copy_(x_new)
    return e_range, e_tv


def _run(fn: Update, *args: object, **kwargs: object) -> tuple[Tensor, Tensor] | None:
    """``fn`` through its kernel, compiled on first use; None, with one warning for the process,
    once compilation has failed (nothing has been modified then)."""
    if _broken is not None:
        return None
    global _announced
    kernel = _kernels.get(fn)
    if kernel is None:
        if announce is not None and not _announced:
            _announced = True
            announce("compiling the engine step with torch.compile (~15 s the first time, cached after; "
                     "--no-compile to skip)")
        kernel = _kernels[fn] = torch.compile(fn, dynamic=None)
    try:
        return kernel(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any compiler failure (no C++ compiler, no Triton, ...)
        text = str(err).strip()
        disable(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}")
        return None


def step(x: Tensor, grad: Tensor | WindowGradient, G: Tensor, mu: Tensor, lr: float,
         constants: dict[str, float]) -> tuple[Tensor, Tensor] | None:
    """:func:`fused_update` through the C kernel on the CPU (:func:`preimage.native.update`),
    else through the compiled kernel (see :func:`_run`); ``lr`` goes in as a tensor, so that a
    new stage's rate does not recompile.  ``grad``: the data term's gradient, the canvas's or
    a :class:`~preimage.objectives.WindowGradient` (which the C kernel reads where it lies)."""
    if x.device.type == "cpu":
        out = native.update(x, grad, G, mu, lr, **constants)
        if out is not None:
            return out
    if isinstance(grad, WindowGradient):
        grad = grad.canvas(x.shape)
    key = (lr, x.device)
    rate = _rates.get(key)
    if rate is None:  # a host-to-device copy per step otherwise (measurable on a GPU at batch 1)
        if len(_rates) > 64:
            _rates.clear()
        rate = _rates[key] = torch.tensor(lr, device=x.device)
    return _run(fused_update, x, grad, G, mu, lr=rate, **constants)


def squared_distance(code: Tensor, target: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The L2 inversion loss, eq. (2), and its gradient in one pass over the code.

    ``scale`` ``(N,)`` is ``C / ||Φ0||²``.  Returns ``scale * ||code - target||²`` per batch
    element (accumulated in fp32) and ``2 * scale * (code - target)`` in the code's dtype.
    Eagerly the same takes a subtraction, a product, a reduction and another product (four
    passes over a code that can be 2-40 MB for first layers); compiled, one loop reads ``code``
    and ``target`` once and writes the gradient once (measured: 0.30 against 0.63 ms at
    SqueezeNet conv1 in bf16, batch 1; 2.0 against 7.3 ms at batch 8).
    """
    d = code.float() - target.float()
    dims = tuple(range(1, d.dim()))
    s = scale.view(-1, *([1] * (d.dim() - 1)))
    return (d * d).sum(dim=dims) * scale, (d * (2.0 * s)).to(code.dtype)


def loss_step(code: Tensor, target: Tensor, scale: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`squared_distance` through its compiled kernel (see :func:`_run`).

    ``target`` has ``code``'s layout.  A channels-last code goes in as its ``(N, H, W, C)``
    view, which is contiguous: the kernel then sums each element's row in memory order.  Given
    the ``(N, C, H, W)`` view, Triton's reduction read it across the channel stride: 5.3 ms of a
    15 ms step at VGG-VD-16 conv1_1 in bf16, batch 128, on an H200 (benchmarks/README.md).
    On the CPU the C kernel (:func:`preimage.native.squared_distance`) runs instead.
    """
    if code.device.type == "cpu":
        done = native.squared_distance(code, target, scale)
        if done is not None:
            return done
    last = code.dim() == 4 and not code.is_contiguous() and code.is_contiguous(memory_format=torch.channels_last)
    if not last:
        return _run(squared_distance, code, target, scale)
    out = _run(squared_distance, code.permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), scale)
    return None if out is None else (out[0], out[1].permute(0, 3, 1, 2))


def disable(reason: str) -> None:
    """Stop using the compiled path for the rest of the process, with one warning."""
    global _broken
    if _broken is None:
        _broken = reason
        warnings.warn(f"torch.compile failed, running eagerly: {reason}", RuntimeWarning, stacklevel=3)
