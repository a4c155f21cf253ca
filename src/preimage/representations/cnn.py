"""Any ``torch.nn.Module`` cut at a named layer is a representation (paper section 4.2).

``ModuleCut(model, "features.8")`` evaluates ``model`` in evaluation mode, without weight
gradients, and stops the computation as soon as the module whose dotted name is
``features.8`` has produced its output: a forward hook captures it and aborts the rest of
the forward pass.  The hook is attached for the call only and removed in ``finally``, so
hooks never pile up, even when the model raises.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..objectives import WindowGradient, converted_crop
from .base import Geometry, Representation, RepresentationError

if TYPE_CHECKING:
    from .affine import ConvGram
from .input_conv import InputGradientHooks, input_gradient_phases, qualifies, top_left_padding, zero_padding


class _Stop(Exception):
    def __init__(self, output: Tensor) -> None:
        self.output = output


def _capture(_module: nn.Module, _inputs: object, output: Tensor) -> None:
    raise _Stop(output)


class _ToCompute(torch.autograd.Function):
    """An fp32 image to the model's dtype in channels-last layout, on the CPU: the dtype first,
    then the layout, and the gradient back in one conversion.  ATen's one-call conversion of
    both is twice as slow there: forward + backward of a 16 x 3 x 227² batch to bf16, 3.2 against
    1.4 ms (forward alone 1.39 against 0.74 ms), which on first layers is a tenth of a step."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.source = x.dtype
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.to(ctx.source, memory_format=torch.contiguous_format), None


@contextlib.contextmanager
def _bias_left_out(conv: nn.Module) -> Iterator[None]:
    """``conv`` computes without its bias inside the block (:meth:`ModuleCut.without_output_bias`);
    the bias is back afterwards, also when the block raises (as the cut's own stop does)."""
    bias = conv.bias
    conv.bias = None
    try:
        yield
    finally:
        conv.bias = bias


def named_layers(model: nn.Module) -> list[str]:
    """The dotted names that :class:`ModuleCut` accepts (every sub-module)."""
    return [name for name, _ in model.named_modules() if name]


class ModuleCut(Representation):
    """Φ = the output of ``layer`` of ``model`` (dotted module name, e.g. ``"features.8"``).

    Args:
        model: any module taking ``(N, in_channels, H, W)``.
        layer: dotted name of the sub-module whose output is the code; ``""`` or ``None``
            means the whole model.
        mean, std, scale, bgr: the model's input convention.  The engine always works in
            0..255 units minus the mean, so that the paper's constants (B = 80, ...) keep their
            meaning; ``forward`` divides by ``std`` before calling the model.  The defaults are
            torchvision's ImageNet normalization ((photo - 0.485) / 0.229, ... expressed in
            0..255 units); for Caffe models pass ``mean=(104, 117, 123), std=(1, 1, 1), bgr=True``.
        geometry: stride and receptive field; measured by :func:`probe_geometry` if omitted.
        channels_last: feed the model channels-last inputs (faster convolutions on CPU, and
            needed for bf16 max-pooling to be fast); pair it with a model converted by
            :func:`low_precision`.

    The model may be a low-precision copy (:func:`low_precision`): images, codes and the
    optimizer stay in fp32, only the model's arithmetic is bf16 (issue 5).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        *,
        in_channels: int = 3,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        scale: float = 255.0,
        bgr: bool = False,
        geometry: Geometry | None = None,
        name: str | None = None,
        probe_size: int = 224,
        channels_last: bool = False,
    ) -> None:
        self.in_channels = in_channels
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        layer = layer or ""
        modules = dict(model.named_modules())
        if layer not in modules:
            names = named_layers(model)
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise RepresentationError(f"unknown layer {layer!r}; the model's layers are: {shown}")
        self.layer = layer
        self._target = modules[layer]
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)
        self._divide = bool((self.std != 1).any())  # Caffe models take 0..255 units as they are
        self.scale, self.bgr = float(scale), bgr
        self.channels_last = channels_last
        self._input_gradient: InputGradientHooks | None = None  # see for_optimization
        self._optimized = False  # for_optimization's copy
        self._without_bias = False  # without_output_bias's copy: the last convolution runs without its bias
        self._single: tuple[nn.Conv2d, tuple[int, int]] | tuple[()] | None = None  # see single_convolution
        self.name = name or f"{type(model).__name__.lower()}:{layer or 'output'}"
        self.geometry = geometry if geometry is not None else probe_geometry(self, probe_size)

    def train(self, mode: bool = True) -> "ModuleCut":
        """The cut model stays in evaluation mode (dropout off, batch-norm statistics frozen)."""
        super().train(False)
        return self

    def config(self) -> dict[str, object]:
        return {"layer": self.layer, "model": type(self.model).__name__,
                "precision": str(self.compute_dtype).replace("torch.", ""), "channels_last": self.channels_last}

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (its first floating parameter's); images stay fp32."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def forward(self, x: Tensor) -> Tensor:
        """The code of ``x`` (fp32 images in; the code in the model's dtype).

        A low-precision model (bf16, see :func:`low_precision`) receives ``x`` cast to its dtype,
        in channels-last layout when the model's weights are, and returns a bf16 (channels-last)
        code: the losses promote it to fp32 inside their first operation, which is cheaper than
        converting it here.  Gradients flow back to fp32 ``x``.
        """
        self.check_input(x)
        given = x
        if self._divide:
            x = x / self.std.to(x).view(1, -1, 1, 1)
        layout = torch.channels_last if self.channels_last and x.dim() == 4 else torch.preserve_format
        dtype = self.compute_dtype
        if layout is torch.channels_last and x.dtype != dtype and x.device.type == "cpu":
            x = _ToCompute.apply(x, dtype)
        else:
            x = x.to(dtype, memory_format=layout)  # one copy for both (none if unchanged)
        if x is given:  # the model gets its own tensor: an in-place first layer must not touch the caller's
            x = x.clone()
        return self._run(x)

    def encode_crops(self, canvas: Tensor, offsets: Tensor, size: tuple[int, int], native: bool = False,
                     sink: list | None = None) -> Tensor:
        """``Φ(jitter(x))`` (see :meth:`Representation.encode_crops`).  With ``native``, on the
        CPU, the crop, the division by ``std`` and the conversion to the model's dtype and
        layout are one C pass (:func:`~preimage.objectives.converted_crop`; bit for bit what
        :meth:`forward` gives the model), where the kernels are available; otherwise the crop,
        then :meth:`forward`."""
        if native:
            self.check_input(canvas)
            crop = converted_crop(canvas, offsets, size, self._divisor(), self.compute_dtype,
                                  self.channels_last and canvas.dim() == 4, sink)
            if crop is not None:
                return self._run(crop)
        return super().encode_crops(canvas, offsets, size)

    def _divisor(self) -> Tensor | None:
        """What the C crop divides the image by: ``std`` where the model takes it divided."""
        return self.std.float() if self._divide else None

    def for_optimization(self) -> "ModuleCut":
        """This cut with the image-facing strided convolutions back-propagated by
        :mod:`~preimage.representations.input_conv` (the same gradient: on the CPU as a sub-pixel
        convolution, 2-7x faster than oneDNN's for AlexNet, VGG-M and SqueezeNet conv1; on CUDA
        in the form cuDNN runs fast; VGG's stride-1 conv1_1 in 2 x 2 blocks), each ReLU that only
        a max pooling reads fused into it, each other convolution -> ReLU pair run as one oneDNN
        call, and zero-padded 1 x 1 convolutions computed unpadded
        (:func:`~preimage.models.fusion.fuse`: the same values and gradients, to rounding for the
        last); ``self`` when the model has none of these."""
        if self._optimized:
            return self
        from ..models.fusion import fuse

        fused = fuse(self.model, self._target)
        convs = [m for m in (fused[0] if fused is not None else self.model).modules() if qualifies(m)]
        if not convs and fused is None:
            return self
        fast = copy.copy(self)  # shares the model's modules and the buffers
        fast._modules = dict(self._modules)  # (copy.copy shares the dict: fast.model = ... would rebind self's)
        if fused is not None:
            fast.model, replaced = fused
            fast._target = replaced.get(self._target, self._target)
        if convs:
            fast._input_gradient = InputGradientHooks(convs)
        fast._optimized = True
        return fast

    def affine(self) -> "ConvGram | None":
        """Φ as ``A x + b`` (:class:`~preimage.representations.affine.ConvGram`: fp32 weights,
        ``AᵀA``'s convolutions in the model's precision) when the
        cut is a single zero-padded convolution of the image (a network's first layer), else
        None.  The form is checked against the model's own output on random images, so a model
        whose ``forward`` does anything else before that convolution is never mistaken for one."""
        from .affine import ConvGram

        conv = self._target
        padding = zero_padding(conv) if isinstance(conv, nn.Conv2d) else None
        if (padding is None or conv.in_channels != self.in_channels or conv.groups != 1
                or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or conv.stride[0] != conv.stride[1]):
            return None
        weight = conv.weight.detach().float()
        if self._divide:
            weight = weight / self.std.float().view(1, -1, 1, 1)
        bias = conv.bias.detach().float() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        gram = ConvGram(weight, bias, int(conv.stride[0]), tuple(int(p) for p in padding),  # type: ignore[arg-type]
                        self.compute_dtype)
        g = torch.Generator().manual_seed(0)
        side = max(48, 2 * max(conv.kernel_size))
        tolerance = 1e-4 if self.compute_dtype == torch.float32 else 2e-2
        with torch.no_grad():
            for scale in (1.0, 100.0):  # a non-linearity before the convolution shows at one scale or the other
                x = (torch.randn(2, self.in_channels, side, side + 3, generator=g) * scale).to(weight.device)
                try:
                    code = self(x).float()
                except Exception:  # noqa: BLE001 - a model that will not run this probe is not affine here
                    return None
                expected = gram.forward(x)
                if code.shape != expected.shape or (code - expected).norm() > tolerance * expected.norm():
                    return None
        return gram

    def single_convolution(self) -> nn.Conv2d | None:
        """The convolution the cut is, when Φ is nothing but one convolution of the image
        (:meth:`affine`) that :mod:`~.input_conv` back-propagates, else None (the probe runs
        once per object)."""
        if self._single is None:  # the convolution and its (top, left) padding, or ()
            single = qualifies(self._target) and self.affine() is not None
            self._single = (self._target, top_left_padding(self._target)) if single else ()  # type: ignore[assignment]
        return self._single[0] if self._single and qualifies(self._single[0]) else None

    def loss_in_windows(self, canvas: Tensor, offsets: Tensor, size: tuple[int, int],
                        value_and_grad: Callable[..., tuple[Tensor, Tensor]],
                        weight: float) -> tuple[Tensor, WindowGradient] | None:
        """``weight * loss(Φ(jitter(canvas)))`` per element and its gradient as a
        :class:`~preimage.objectives.WindowGradient`, without autograd, where Φ is one
        convolution (:meth:`single_convolution`) and the C crop applies, else None.

        ``value_and_grad``: the loss's closed form (``(code, weight=, compiled=)``).  The
        convolution's own forward on the converted crop, then its input gradient as phases
        (:func:`~.input_conv.input_gradient_phases`): bit for bit the values and gradient of
        :meth:`encode_crops` and autograd, without the hooks, the graph and its backward pass
        (AlexNet conv1 in bf16 at batch 1: ~0.2 of a 1.4 ms step)."""
        conv = self.single_convolution()
        if conv is None or canvas.dim() != 4:
            return None
        divisor = self._divisor()
        with torch.no_grad():
            crop = converted_crop(canvas, offsets, size, divisor, self.compute_dtype, self.channels_last)
            if crop is None:
                return None
            e_loss, g_code = value_and_grad(conv(crop), weight=weight, compiled=True)
            values, origin = input_gradient_phases(g_code.to(conv.weight.dtype), conv.weight, tuple(conv.stride),
                                                   self._single[1], by_channel=True)  # type: ignore[arg-type, misc]
        return e_loss, WindowGradient(values, offsets, size, origin, divisor)

    def without_output_bias(self) -> "tuple[ModuleCut, Tensor] | None":
        """This cut with its last convolution's bias left out, and that bias ``(C,)``, when the
        cut ends at a convolution that has one; else None.  ``Φ(x) = cut(x) + b``, so an L2
        loss against ``Φ0`` is the loss of ``cut(x)`` against ``Φ0 - b``: the same value and
        gradient (:meth:`~preimage.objectives.L2Loss.shifted`; what the engine does on CUDA).
        There ATen adds a convolution's bias in a pass of its own over the whole code, after
        cuDNN's kernel: VGG-VD-16 conv1_1 in bf16 at batch 128, 1.12 ms of a 5.7 ms step on an
        H200 (oneDNN, on the CPU, adds it inside the convolution)."""
        conv = self._target
        if self._without_bias or not isinstance(conv, nn.Conv2d) or conv.bias is None:
            return None
        cut = copy.copy(self)  # shares the model's modules and buffers
        cut._without_bias = True
        return cut, conv.bias.detach()

    @property
    def fast_input_gradient(self) -> list[nn.Conv2d]:
        """The convolutions whose input gradient :mod:`~.input_conv` computes (empty for ``self``;
        which form, if any, each takes is decided per device and precision at run time)."""
        return self._input_gradient.convs if self._input_gradient is not None else []

    def _run(self, x: Tensor) -> Tensor:
        with self._input_gradient if self._input_gradient is not None else contextlib.nullcontext(), \
                _bias_left_out(self._target) if self._without_bias else contextlib.nullcontext():
            if self.layer == "":
                return self.model(x)
            handle = self._target.register_forward_hook(_capture)
            try:
                self.model(x)
            except _Stop as stop:
                return stop.output
            finally:
                handle.remove()
        raise RepresentationError(f"layer {self.layer!r} was never called by the model's forward")


@torch.no_grad()
def _out_size(rep: ModuleCut, size: int, device: torch.device) -> int:
    z = torch.zeros(1, rep.in_channels, size, size, device=device)
    out = rep(z)
    return out.shape[-1] if out.dim() == 4 else 1


def probe_geometry(rep: ModuleCut, size: int = 224) -> Geometry:
    """Measure stride and receptive field of a cut by probing it (for arbitrary modules).

    Stride: how much the output map grows when the input grows by 64 pixels.  Receptive field:
    the extent of the input pixels on which the central output location depends (non-zero
    gradient of that location's channels w.r.t. a random input, three inputs united).
    """
    device = next((t.device for t in list(rep.parameters()) + list(rep.buffers())), torch.device("cpu"))
    try:
        a, b = _out_size(rep, size, device), _out_size(rep, size + 64, device)
    except RepresentationError:
        raise
    except Exception as exc:  # a model that rejects the probe size: report, don't crash deep inside
        raise RepresentationError(f"could not run the model on a {size}x{size} probe: {exc}") from None
    stride = max(1, round(64 / (b - a))) if b > a else size
    support = torch.zeros(size, size, dtype=torch.bool, device=device)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.randn(1, rep.in_channels, size, size, generator=g) * 50).to(device).requires_grad_(True)
        with torch.enable_grad():
            out = rep(x)
            if out.dim() == 4:
                unit = out[0, :, out.shape[2] // 2, out.shape[3] // 2]
            else:
                unit = out.reshape(-1)
            unit.abs().sum().backward()
        support |= (x.grad[0].abs().sum(0) > 0)
    rows = support.any(1).nonzero()
    cols = support.any(0).nonzero()
    if len(rows) == 0:
        rf = 1
    else:
        rf = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1
    return Geometry(stride=int(stride), receptive_field=rf)


def low_precision(model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` with floating parameters and buffers in ``dtype`` (bf16 by default),
    channels-last, in evaluation mode and without weight gradients; ``model`` is left untouched.

    On CPUs with AMX (and on CUDA) bf16 convolutions and matrix products run several times
    faster than fp32; :class:`ModuleCut` casts its fp32 input to the model's dtype and its code
    back to fp32, so the energy, the image and the optimizer state stay in fp32.
    """
    import copy

    fast = copy.deepcopy(model).to(dtype).eval()
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matrix products natively: a CUDA GPU that supports bf16, or
    a CPU with AMX or AVX512-BF16 (elsewhere bf16 is emulated and slower than fp32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`fast_bf16`, else ``"fp32"``; other values unchanged.

    bf16 is the default where it is fast because it costs no reconstruction quality (SqueezeNet,
    Table 5 protocol: the same mean error as fp32 within 0.02 points, README)."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise RepresentationError(f"unknown precision {precision!r} (auto, fp32 or bf16)")
    return precision
