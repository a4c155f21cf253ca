"""The optimization loop: energy (1) with jitter (eq. 7), minimized by Algorithm 1.

One call optimizes a whole batch of independent problems (images x seeds x units) in one
tensor.  The engine knows nothing about HOG or CNNs: it receives a representation Φ, a loss
over codes returning one value per batch element, and the settings.

Data flow per iteration::

    canvas x ─ crop τ ─▶ Φ ─▶ loss × C ─┐
    canvas x ─▶ N_alpha + TV^beta ──────┴─▶ energy ─▶ backward ─▶ Algorithm 1 ─▶ Π_B+ ─▶ x

An affine Φ (a cut at a network's first convolution) takes the loss and its gradient from
``AᵀA`` applied to the crop instead (:mod:`preimage.representations.affine`): Φ is not run.
With the fused C step, the data term's gradient reaches Algorithm 1 as a
:class:`~preimage.objectives.WindowGradient`, read in the jitter windows where it lies; no
canvas-sized gradient is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from . import fused, graphs
from .allocator import keep_freed_memory
from .defaults import Settings
from .objectives import BoundedRange, L2Loss, TotalVariation, WindowGradient, jitter_crop
from .optim import PreimageSGD
from .representations.affine import quadratic_loss
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
    compiled: bool = False  # whether the fused compiled step ran (preimage.fused)
    batch_size: int = 0  # elements optimized together (optimize's chunk size)
    quadratic: bool = False  # the data term came from AᵀA, Φ never computed (representations/affine.py)
    graphed: bool = False  # the steps after the warm-up were replayed from a CUDA graph (preimage.graphs)


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
    return x * (scale / percentile95(x.flatten()))


def percentile95(values: Tensor) -> Tensor:
    """``torch.quantile(values, 0.95)`` (linear interpolation, the same bits) by two selections
    instead of a sort: 1.2 against 10 ms for a 3x230x230 canvas, which every seed pays once
    (a batch of 128 seeds spent 1.9 s sorting on a GPU run)."""
    n = values.numel()
    rank = torch.tensor(0.95, dtype=values.dtype) * (n - 1)  # in the values' dtype, as quantile
    lo, hi = int(rank.floor()), int(rank.ceil())
    below = values.kthvalue(lo + 1).values
    above = values.kthvalue(hi + 1).values if hi != lo else below
    return torch.lerp(below, above, rank - lo)


IMAGE_BUFFERS = 40  # image-sized fp32 buffers a step may hold per element (see element_bytes)
CPU_ACTIVATION = 20 << 20  # bytes of a CPU batch's largest activation (see auto_batch_size)


def _image_bytes(representation: Representation, size: tuple[int, int]) -> int:
    """The :data:`IMAGE_BUFFERS` image-sized fp32 buffers of one element."""
    return IMAGE_BUFFERS * representation.in_channels * size[0] * size[1] * 4


def _probe(representation: Representation, size: tuple[int, int], device: torch.device | str) -> tuple[int, int, int]:
    """``(activation bytes, weight bytes, largest activation)`` of one element's step, from a
    1-image forward pass: what Φ saves for its backward pass plus its code twice (the weights
    it saves are the ones a step reads)."""
    params = {t.data_ptr(): t.numel() * t.element_size()
              for t in [*representation.parameters(), *representation.buffers()]}
    saved, largest, used = 0, 0, {}

    def pack(t: Tensor) -> Tensor:
        nonlocal saved, largest
        if t.data_ptr() in params:
            used[t.data_ptr()] = params[t.data_ptr()]
        else:
            saved += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
        return t

    x = torch.zeros(1, representation.in_channels, *size, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = representation(x)
    code = out.numel() * out.element_size()
    return saved + 2 * code, sum(used.values()), max(largest, code)


def element_bytes(representation: Representation, size: tuple[int, int], device: torch.device | str = "cpu") -> int:
    """Memory one batch element needs in a step: what Φ saves for its backward pass on a 1-image
    probe (weights excluded), its code twice, and ~40 image-sized buffers (canvas, gradient,
    Algorithm 1's state, regularizer temporaries)."""
    return _probe(representation, size, device)[0] + _image_bytes(representation, size)


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: CUDA's free memory, or the CPU's ``MemAvailable``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def auto_batch_size(representation: Representation, size: tuple[int, int], device: torch.device | str = "cpu",
                    budget: int | None = None, cap: int | None = None) -> int:
    """How many elements to optimize together.

    CUDA: as many as fit in 60% of the free memory, at most ``cap`` (256).  CPU: as many as fit
    in half the free memory, at most ``cap`` (16), and -- because on CPU bigger batches only pay
    while the largest activation of the batch stays near the caches -- up to :data:`CPU_ACTIVATION`
    bytes of the largest activation per batch, or, for weight-heavy cuts, as many elements as
    it takes for the activations to outweigh twice the weights read once per step.  Measured
    (benchmarks/README.md, bf16, engine step per image): batch 1 is 20-30 % slower than this
    choice on SqueezeNet fire5 / pool_final, AlexNet conv3 and VGG-VD-16 conv3_3; batch 16 is
    30-65 % slower on VGG-M conv3 and VGG-VD-16 conv1_1 / conv3_3; AlexNet fc8 runs 12x faster
    at batch 16 than at 1.
    """
    dev = torch.device(device)
    activations, weights, largest = _probe(representation, size, dev)
    per = max(1, activations + _image_bytes(representation, size))
    budget = budget if budget is not None else int(available_bytes(dev) * (0.6 if dev.type == "cuda" else 0.5))
    fits = budget // per
    if dev.type == "cuda":
        return max(1, min(cap if cap is not None else 256, fits))
    useful = max(CPU_ACTIVATION // max(1, largest), -(-2 * weights // max(1, activations)), 1)
    return max(1, min(cap if cap is not None else 16, fits, useful))


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
    batch_size: int | None = None,
    compile: bool | None = None,
    graph: bool | None = None,
) -> Trace:
    """Minimize ``R_alpha(x) + R_TV(x) + C * loss(Φ(jitter(x)))`` for ``len(seeds)`` elements.

    The elements are independent problems; they are optimized in chunks of ``batch_size``
    (default: :func:`auto_batch_size`, what fits in memory) when the loss can be split
    (``loss.select``), with identical results: every element's noise and jitter come from its
    own seed.  See :func:`optimize_batch` for the arguments; ``callback`` sees one count of
    iterations over all chunks.
    """
    keep_freed_memory()  # no page faults on the step's buffers (allocator.py)
    N = len(seeds)
    dev = torch.device(device) if device is not None else representation_device(representation)
    if batch_size is None and N > 1 and hasattr(loss, "select"):
        batch_size = auto_batch_size(representation, size, dev)
    if batch_size is None or N <= batch_size or not hasattr(loss, "select"):
        return optimize_batch(representation, loss, size, seeds, settings, stages, init, dev, callback, callback_every,
                              compile, graph)
    total = sum(s.iterations for s in stages)
    starts = list(range(0, N, batch_size))
    traces = []
    for k, start in enumerate(starts):
        part = slice(start, start + batch_size)
        cb = None
        if callback is not None:
            def cb(t: int, _total: int, e: dict[str, float], k: int = k) -> None:
                callback(k * total + t, len(starts) * total, e)
        traces.append(optimize_batch(representation, loss.select(part), size, seeds[part], settings, stages,  # type: ignore[attr-defined]
                                     init[part] if init is not None else None, dev, cb, callback_every, compile, graph))
    return Trace(
        x=torch.cat([tr.x for tr in traces]),
        energy={k: torch.cat([tr.energy[k] for tr in traces], dim=1) for k in traces[0].energy},
        jitter=traces[0].jitter,
        lr=traces[0].lr,
        compiled=all(tr.compiled for tr in traces),
        batch_size=batch_size,
        quadratic=all(tr.quadratic for tr in traces),
        graphed=all(tr.graphed for tr in traces),
    )


def output_bias_in_target(phi: Callable[[Tensor], Tensor], loss: Loss,
                          device: torch.device) -> tuple[Callable[[Tensor], Tensor], Loss]:
    """On CUDA, for an L2 loss of a cut that ends at a convolution with a bias: the cut without
    the bias and the loss against ``Φ0 - b``, the same values and gradient with one pass less
    over the code per step (:meth:`~preimage.representations.cnn.ModuleCut.without_output_bias`).
    Elsewhere, or for any other Φ or loss, ``(phi, loss)`` as given."""
    drop = getattr(phi, "without_output_bias", None)
    found = drop() if drop is not None and device.type == "cuda" and type(loss) is L2Loss else None
    return (found[0], loss.shifted(found[1])) if found is not None else (phi, loss)


def _data_term(phi: Callable[[Tensor], Tensor], encode_crops: Callable[..., Tensor] | None, loss: Loss,
               value_and_grad: Callable[..., tuple[Tensor, Tensor]] | None, x: Tensor, offsets: Tensor,
               size: tuple[int, int], C: float, compiled: bool, in_windows: bool) -> tuple[Tensor, WindowGradient | None]:
    """``C * loss(Φ(jitter(x)))`` per element, its gradient accumulated into ``x.grad`` or, with
    ``in_windows`` where the C crop applies, returned as a :class:`WindowGradient` (``x.grad``
    untouched)."""
    sink: list[WindowGradient] = []
    if encode_crops is not None:  # the crop fused with Φ's input conversion where it can be
        code = encode_crops(x, offsets, size, native=compiled, sink=sink if in_windows else None)
    else:
        code = phi(jitter_crop(x, offsets, size))
    if value_and_grad is None:  # any other callable: autograd
        e_loss = C * loss(code)
        e_loss.sum().backward()
        return e_loss, (sink[0] if sink else None)
    with torch.no_grad():  # the loss's gradient in closed form, then Φ's backward
        e_loss, g_code = value_and_grad(code.detach(), weight=C, compiled=compiled)
    if code.requires_grad:
        code.backward(g_code)
    return e_loss, (sink[0] if sink else None)


def optimize_batch(
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
    compile: bool | None = None,
    graph: bool | None = None,
) -> Trace:
    """Minimize ``R_alpha(x) + R_TV(x) + C * loss(Φ(jitter(x)))`` for a batch of ``len(seeds)``
    in one tensor.

    Args:
        representation: Φ; evaluated on crops of shape ``(N, in_channels, *size)``.
        loss: maps codes to per-element losses ``(N,)`` (eqs. 2-4).  A loss with a
            ``value_and_grad(code, weight=, compiled=)`` method (:class:`~preimage.objectives.L2Loss`,
            :class:`~preimage.objectives.InnerProductLoss`) gives its gradient in closed form,
            which is fed to Φ's backward pass; any other callable is differentiated by autograd.
        size: ``(H, W)`` of the images sought.
        seeds: one seed per batch element: its noise start and its jitter shifts.
        settings: the paper's constants (:mod:`preimage.defaults`).
        stages: successive runs of Algorithm 1 (e.g. 300 at eta0, then 50 at eta0/10).
        init: optional start images ``(N, C, H, W)`` (caricatures start from x0); the canvas
            border around them is zero, as in the authors' code.
        device: where to compute; defaults to the representation's device.
        callback: called as ``callback(t, total, batch_mean_energies)`` every
            ``callback_every`` iterations and at the last one.
        compile: run the regularizers, Algorithm 1 and the projection as one kernel (beta = 2
            only, else ignored), and the L2 loss's value and gradient as another
            (:mod:`preimage.fused`): preimage's C kernels on the CPU (:mod:`preimage.native`),
            ``torch.compile``'s elsewhere.  Same results up to float rounding.  None: the process
            default (:func:`preimage.fused.set_default`, ``PREIMAGE_COMPILE``), else on for the
            CPU when the C kernels are available.  False: plain PyTorch operations.
        graph: on CUDA, record each stage's step as a CUDA graph after a few eager iterations
            and replay it (:mod:`preimage.graphs`; same results).  None: ``PREIMAGE_CUDA_GRAPHS``
            if set, else yes.  Ignored off CUDA.
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
    phi = representation.for_optimization() if isinstance(representation, Representation) else representation

    compile_loss = fused.wanted(compile, device)
    compiled = compile_loss and tv.beta == 2.0
    quadratic = quadratic_loss(representation, loss, size, device)  # an affine Φ: the loss of the image itself
    if quadratic is None:
        phi, loss = output_bias_in_target(phi, loss, device)
    value_and_grad = getattr(loss, "value_and_grad", None)
    encode_crops = getattr(phi, "encode_crops", None)  # a Representation's Φ(jitter(x)); any module: phi(crop)
    # Φ one convolution (a first layer that AᵀA does not take): its loss and window gradient without autograd
    one_conv = getattr(phi, "loss_in_windows", None) \
        if quadratic is None and value_and_grad is not None and device.type == "cpu" else None
    state = opt.state[x]  # Algorithm 1's G and mu, shared by the eager and the compiled step
    state.setdefault("G", torch.zeros_like(x))
    state.setdefault("mu", torch.zeros_like(x))
    constants = dict(alpha=bounded.alpha, B=bounded.B, B_plus=bounded.B_plus, V=tv.V,
                     lambda_alpha=settings.lambda_alpha, lambda_tv=settings.lambda_tv, rho=settings.momentum)

    def run_step(offsets: Tensor) -> Tensor:
        """One iteration at these jitter ``offsets``: the step's ``(4, N)`` energies at ``x``
        before it (:data:`ENERGY_TERMS`); ``x``, ``G`` and ``mu`` updated in place."""
        nonlocal compiled
        x.grad = None
        window = None  # the data term's gradient left in the windows, for the fused step to read
        if quadratic is not None:  # Φ never computed: the same loss and gradient from AᵀA (affine.py)
            with torch.no_grad():  # the jitter crop folded in: no copy of the windows either way
                e_loss, grad = quadratic.value_and_grad(x.detach(), weight=settings.C, offsets=offsets,
                                                        window=compiled)
            if isinstance(grad, WindowGradient):
                window = grad
            else:
                x.grad = grad
        else:  # the data term through Φ; the regularizers below in closed form
            direct = one_conv(x.detach(), offsets, (H, W), value_and_grad, settings.C) \
                if one_conv is not None and compiled else None
            if direct is not None:
                e_loss, window = direct
            else:
                e_loss, window = _data_term(phi, encode_crops, loss, value_and_grad, x, offsets, (H, W),
                                            settings.C, compile_loss, in_windows=compiled)
        with torch.no_grad():
            if window is None and x.grad is None:  # a loss that does not depend on x (C = 0)
                x.grad = torch.zeros_like(x)
            regs = None
            if compiled:  # regularizers + Algorithm 1 + projection in one kernel (fused.py)
                regs = fused.step(x.detach(), window if window is not None else x.grad, state["G"], state["mu"],
                                  opt.param_groups[0]["lr"], constants)
                compiled = regs is not None  # None: compilation failed, eager from now on
            if regs is None and window is not None:
                x.grad = window.canvas(x.shape)
            if regs is None:
                e_range, _ = bounded.value_and_grad(x, into=x.grad, weight=settings.lambda_alpha)
                e_tv, _ = tv.value_and_grad(x, into=x.grad, weight=settings.lambda_tv)
            else:
                e_range, e_tv = regs
            e_range, e_tv = settings.lambda_alpha * e_range, settings.lambda_tv * e_tv
            e_total = e_loss.detach() + e_range + e_tv
        if regs is None:
            opt.step()
        return torch.stack([e_loss.detach(), e_range, e_tv, e_total]).float()

    total = sum(s.iterations for s in stages)
    energy = torch.zeros(total, len(ENERGY_TERMS), N, device=device)
    centre_off = torch.full((N, 2), centre, dtype=torch.long)
    recording = graphs.wanted(graph, device)  # CUDA: each stage's step recorded once, then replayed
    replayed = False  # whether any step was replayed
    t = 0
    for stage in stages:
        opt.set_lr(lr * stage.lr_factor)
        jittered = stage.jitter and T > 1  # the stage's shifts drawn at once: the same numbers as step by step
        shifts = torch.stack([torch.randint(0, T, (stage.iterations, 2), generator=g) for g in gens], 1) \
            if jittered else centre_off.expand(stage.iterations, N, 2)
        if recording and jittered:  # offsets read on the device, never looked at by the host
            shifts = shifts.to(device)  # (a stage without jitter keeps one host offset: a plain slice, no gather)
        replay = None
        side = graphs.side_stream(device) if recording else None
        for i in range(stage.iterations):
            offsets = shifts[i]
            if replay is None and recording and graphs.WARMUP <= i < stage.iterations - 1:
                torch.cuda.current_stream(device).wait_stream(side)
                was = compiled
                replay = graphs.record(run_step, offsets)
                if replay is None or compiled != was:  # a step that changed its path while recorded: eager
                    replay, recording = None, False
                else:
                    replayed = True
            warming = recording and replay is None  # eager on the side stream until recorded
            with torch.cuda.stream(side) if warming else nullcontext():
                energy[t] = replay(offsets) if replay is not None else run_step(offsets)
                t += 1
                if t % callback_every == 0 or t == total:
                    means = energy[t - 1].mean(1).tolist()
                    if not all(map(math.isfinite, means)):
                        raise PreimageError(f"the energy became NaN or infinite at iteration {t}")
                    if callback is not None:
                        callback(t, total, dict(zip(ENERGY_TERMS, means)))
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)

    final = x.detach()[:, :, centre : centre + H, centre : centre + W].clone()
    if not torch.isfinite(final).all():
        raise PreimageError("the optimized image contains NaN or infinite values")
    energy_cpu = energy.cpu()
    return Trace(
        x=final,
        energy={k: energy_cpu[:, i] for i, k in enumerate(ENERGY_TERMS)},
        jitter=T,
        lr=lr,
        compiled=compiled,
        batch_size=N,
        quadratic=quadratic is not None,
        graphed=replayed,
    )
