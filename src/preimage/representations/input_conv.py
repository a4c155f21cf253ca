"""The image-facing convolution, back-propagated as a sub-pixel convolution (issue 5).

Every step of the engine back-propagates to the image through the network's first layer: for
AlexNet, CaffeNet, VGG-M and SqueezeNet a convolution from 3 channels with stride 2 or 4.  The
gradient with respect to its input is a transposed convolution with 3 output channels, which
oneDNN computes 3-8x slower than the forward convolution (bf16, measured in
``benchmarks/README.md``: AlexNet conv1 at batch 8, 10.3 ms against 1.1 ms forward).

The same gradient is an ordinary stride-1 convolution followed by a pixel shuffle.  With stride
``s`` and padding offset ``p``, input pixel ``Y + p = s*q + r`` (``0 <= r < s``) receives
``sum_{o,m} W[o, :, s*m + r] * g[o, q - m]``: for each phase ``r`` a correlation of the output
gradient ``g`` with the kernel taps ``r, r + s, ...`` flipped.  Stacking the ``s*s`` phases as
``C_in*s*s`` output channels gives one convolution of ``g`` (96 channels in, e.g. 48 out, a
3x3 or 4x4 kernel) that oneDNN runs at full speed, then a shuffle interleaves the phases.
Measured: 2-7x faster in bf16, 2.5-4.5x in fp32, the same values up to rounding
(``tests/test_input_conv.py`` checks it against autograd with ``gradcheck``).

:class:`~preimage.representations.cnn.ModuleCut` uses it in the Φ it hands the engine
(``for_optimization``): hooks on the qualifying ``nn.Conv2d`` let the module compute its own
output, detached, and attach this gradient instead of autograd's.  The forward values are the
module's own; only the backward arithmetic differs.  On CUDA cuDNN wants channel counts that
are multiples of 8: :func:`method` takes the sub-pixel form where its channels are, and
otherwise, in bf16, pads the image to 8 channels (:func:`padded_input_gradient`); see
``benchmarks/first_conv.py`` and ``benchmarks/README.md``.

A stride-1 image-facing convolution (VGG's conv1_1, 3x3) has the same problem: its transposed
convolution has 3 output channels.  On the CPU its gradient is computed 2 x 2 pixels at a time
(:func:`blocked_kernel`): a stride-2 correlation with 12 output channels and a 4x4 kernel, then
the same shuffle.  VGG-VD-16 conv1_1 at 224 x 224: 0.69-0.74 -> 0.58-0.59 ms per image in bf16,
2.9-3.2 -> 1.6-1.9 ms in fp32 (``benchmarks/README.md``).

In the engine the shuffle is not made either: the crop the convolution reads carries a
:class:`~preimage.objectives.CropWindow`, and the phases (channels ordered ``(c, y, x)``) go
through it to the update kernel, which reads them where they lie
(:func:`input_gradient`; :func:`input_gradient_phases`, which a cut that is one convolution
calls directly: ``ModuleCut.loss_in_windows``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..objectives import CropWindow, crop_window

MAX_IN_CHANNELS = 4  # image-facing convolutions only (gray, RGB, RGBA): for wide ones oneDNN's
# backward is as fast as its forward and the sub-pixel form slower (VGG-M conv2 in bf16 at batch 8:
# 3.1 against 5.7 ms; a ResNet-style 3x3 stride-2 64 -> 128: 0.54 against 1.67 ms)

_kernels = WeakIdKeyDictionary()  # weight -> (its version, kind, derived kernel): see _cached


DEVICES = {"cpu"}  # device types that get the sub-pixel backward (CUDA measured: see the docstring)
ALIGNED_DEVICES = {"cuda"}  # device types whose kernels want channel counts that are multiples of PAD_TO
PAD_TO = 8  # cuDNN's fast bf16 kernels want 8 channels: 3 made the backward 3-4x slower (H200)


def zero_padding(conv: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """The ``(top, bottom, left, right)`` zero padding of ``conv``'s input, or None for a
    convolution this module cannot handle."""
    from ..models.networks import DenseConv2d, PaddedConv2d

    if type(conv) is PaddedConv2d:
        return conv.padding4 if conv.padding == (0, 0) else None
    if type(conv) not in (nn.Conv2d, DenseConv2d) or isinstance(conv.padding, str):
        return None
    ph, pw = int(conv.padding[0]), int(conv.padding[1])
    return ph, ph, pw, pw


def top_left_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The (top, left) zero padding of ``conv``'s input (see :func:`zero_padding`)."""
    pad = zero_padding(conv)
    return (pad[0], pad[2]) if pad is not None else None


def qualifies(module: nn.Module) -> bool:
    """Whether ``module`` is a plain convolution on an image (``nn.Conv2d``, or this project's
    ``DenseConv2d`` / ``PaddedConv2d``; zero padding, no groups or dilation, stride > 1 or a kernel
    wider than 1, at most :data:`MAX_IN_CHANNELS` input channels, frozen weights)."""
    if not isinstance(module, nn.Conv2d) or top_left_padding(module) is None:
        return False
    strided = tuple(module.stride) != (1, 1)
    return (module.groups == 1 and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros"
            and (strided or max(module.kernel_size) > 1) and module.in_channels <= MAX_IN_CHANNELS
            and not module.weight.requires_grad)


def phase_kernel(weight: Tensor, stride: tuple[int, int]) -> Tensor:
    """``(C_out, C_in, kh, kw)`` with stride ``(sh, sw)`` -> ``(C_out, C_in*sh*sw, Mh, Mw)``
    (``M = ceil(k / s)``, taps beyond ``k`` zero): the kernel of the same convolution applied, with
    stride 1, to the input's phases; tap ``s*m + r`` of channel ``c`` is tap ``m`` of phase channel
    ``c*sh*sw + ry*sw + rx`` (``pixel_unshuffle``'s order)."""
    co, ci, kh, kw = weight.shape
    sh, sw = stride
    Mh, Mw = -(-kh // sh), -(-kw // sw)
    padded = weight.new_zeros(co, ci, Mh * sh, Mw * sw)
    padded[..., :kh, :kw] = weight
    return padded.view(co, ci, Mh, sh, Mw, sw).permute(0, 1, 3, 5, 2, 4).reshape(co, ci * sh * sw, Mh, Mw)


def subpixel_kernel(weight: Tensor, stride: tuple[int, int]) -> Tensor:
    """``(C_out, C_in, kh, kw)`` -> the ``(C_in*sh*sw, C_out, Mh, Mw)`` kernel of the phases
    (:func:`phase_kernel`), flipped for a correlation."""
    kernel = phase_kernel(weight, stride).transpose(0, 1).flip(-2, -1)
    kh, kw = weight.shape[-2:]
    layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and kh * kw > 1 \
        else torch.contiguous_format
    return kernel.contiguous(memory_format=layout)


BLOCK = 2  # a stride-1 convolution's input gradient is computed BLOCK x BLOCK pixels at a time


def blocked_kernel(weight: Tensor, block: int = BLOCK) -> Tensor:
    """The kernel of a stride-1 convolution's input gradient computed ``block x block`` pixels
    at a time: ``(C_in*block*block, C_out, kh+block-1, kw+block-1)``, for a stride-``block``
    correlation of the output gradient (padded by ``k - 1``) whose phase ``(ry, rx)`` holds the
    flipped kernel shifted by ``(ry, rx)``.

    With ``Y = block*q + r``, ``dx[Y] = sum_t W[t] g[Y - t] = sum_m K_r[m] gpad[block*q + m]``
    where ``gpad`` is ``g`` padded by ``k - 1`` and ``K_r[m] = W[r + k - 1 - m]`` (zero outside the
    kernel).  It has ``block*block`` times the output channels of the plain transposed
    convolution, which oneDNN needs to keep its matrix units busy when the image has 3 channels.
    """
    co, ci, kh, kw = weight.shape
    flipped = weight.flip(-2, -1).transpose(0, 1)  # (ci, co, kh, kw)
    kernel = weight.new_zeros(ci, block, block, co, kh + block - 1, kw + block - 1)
    for ry in range(block):
        for rx in range(block):
            kernel[:, ry, rx, :, ry:ry + kh, rx:rx + kw] = flipped
    kernel = kernel.reshape(ci * block * block, co, kh + block - 1, kw + block - 1)
    layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return kernel.contiguous(memory_format=layout)


def _cached(weight: Tensor, kind: object, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, made once per weight tensor and ``kind`` and rebuilt only when the weights
    change in place (0.12 ms per step saved on AlexNet conv1: 6 % of a batch-1 step in bf16)."""
    hit = _kernels.get(weight)
    if hit is not None and hit[0] == weight._version and hit[1] == kind:
        return hit[2]
    kernel = build()
    _kernels[weight] = (weight._version, kind, kernel)
    return kernel


def _crop(full: Tensor, offset: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The input's ``size`` window of the padded input's gradient ``full``, ``offset`` the (top,
    left) padding; rows / columns no window reached (beyond ``full``) get zero gradient."""
    (top, left), (H, W) = offset, size
    short_h, short_w = max(0, top + H - full.shape[-2]), max(0, left + W - full.shape[-1])
    if short_h or short_w:
        full = F.pad(full, (0, short_w, 0, short_h))
    return full[..., top:top + H, left:left + W]


def input_gradient_phases(grad_out: Tensor, weight: Tensor, stride: tuple[int, int], offset: tuple[int, int],
                          by_channel: bool = False) -> tuple[Tensor, tuple[int, int]]:
    """The gradient of ``conv2d(pad(x), weight, stride)`` with respect to the padded input,
    given the output's gradient, as its phases: ``(values, origin)`` with ``values`` a
    ``(N, C_in, A, sh, B, sw)`` view (pixel ``(a sh + y, b sw + x)`` of the padded input's
    gradient, zero beyond) and ``origin`` the input's (top, left) in it; ``offset`` is the
    convolution's (top, left) padding.

    For a channels-last ``grad_out`` the phases' channels are ordered ``(y, x, c)`` (a shuffle
    into a channels-last image then copies runs of ``sw * C_in`` values), or with ``by_channel``
    ``(c, y, x)``: each pixel's ``sw`` phases then lie together, which the engine's update reads
    block by block as fast as an image (:mod:`preimage.native`)."""
    ci, (kh, kw) = weight.shape[1], weight.shape[-2:]
    channels_last = grad_out.dim() == 4 and not grad_out.is_contiguous() and grad_out.is_contiguous(
        memory_format=torch.channels_last)
    last = channels_last and not by_channel
    if tuple(stride) == (1, 1):
        sh = sw = BLOCK
        # the blocks' rows / columns, from -margin: one more block where the last input row would be missed
        margin = [BLOCK if BLOCK * ((o + k - 1) // BLOCK) < o + k - 1 else 0
                  for o, k in zip(grad_out.shape[-2:], (kh, kw))]
        kernel = _cached(weight, ("blocked", last), lambda: _phases_last(blocked_kernel(weight), ci, last))
        phases = F.conv2d(grad_out, kernel, stride=BLOCK, padding=(kh - 1 + margin[0], kw - 1 + margin[1]))
        offset = (offset[0] + margin[0], offset[1] + margin[1])
    else:
        sh, sw = stride
        kernel = _cached(weight, (stride, last), lambda: _phases_last(subpixel_kernel(weight, stride), ci, last))
        Mh, Mw = kernel.shape[-2:]
        phases = F.conv2d(grad_out, kernel, padding=(Mh - 1, Mw - 1))  # (N, C_in*sh*sw, Qh, Qw)
    n, _, Qh, Qw = phases.shape
    if last:  # channels (ry, rx, c)
        values = phases.permute(0, 2, 3, 1).reshape(n, Qh, Qw, sh, sw, ci).permute(0, 5, 1, 3, 2, 4)
    else:
        values = phases.view(n, ci, sh, sw, Qh, Qw).permute(0, 1, 4, 2, 5, 3)
    return values, offset


def input_gradient(grad_out: Tensor, weight: Tensor, stride: tuple[int, int], offset: tuple[int, int],
                   size: tuple[int, int], window: CropWindow | None = None) -> Tensor | None:
    """The gradient of ``conv2d(pad(x), weight, stride)`` with respect to ``x`` ``(N, C_in, *size)``,
    given the output's gradient; ``offset`` is the (top, left) padding.

    With the :class:`~preimage.objectives.CropWindow` of a converted crop ``x`` (the engine's
    jittered windows), and square phases, the phases go to its sink as they lie and None is
    returned: the shuffle into an image (a copy in runs of ``sw * C_in`` values; AlexNet conv1 at
    batch 16 in bf16, 0.43 ms per step) is never made."""
    square = stride[0] == stride[1]
    values, origin = input_gradient_phases(grad_out, weight, stride, offset, by_channel=window is not None and square)
    n, ci, A, sh, B, sw = values.shape
    if window is not None and square:
        window.put(values, size, origin)
        return None
    if values.stride(1) == 1:  # channels-last phases: a channels-last gradient, copied in runs of sw * ci values
        full = values.permute(0, 2, 3, 4, 5, 1).reshape(n, A * sh, B * sw, ci).permute(0, 3, 1, 2)
    else:
        full = values.reshape(n, ci, A * sh, B * sw)
    return _crop(full, origin, size)


def _phases_last(kernel: Tensor, ci: int, last: bool) -> Tensor:
    """A phase kernel's output channels reordered from ``(c, ry, rx)`` to ``(ry, rx, c)`` when
    ``last`` (channels-last gradients: the shuffle then copies runs of ``sw * ci`` values)."""
    if not last:
        return kernel
    co, rest = kernel.shape[0], kernel.shape[1:]
    layout = torch.channels_last if kernel.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return kernel.view(ci, co // ci, *rest).transpose(0, 1).reshape(co, *rest).contiguous(memory_format=layout)


def padded_weight(weight: Tensor) -> Tensor:
    """``weight`` with zero input channels up to :data:`PAD_TO`, in its memory layout."""
    padded = F.pad(weight, (0, 0, 0, 0, 0, PAD_TO - weight.shape[1]))
    layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return padded.contiguous(memory_format=layout)


def padded_input_gradient(grad_out: Tensor, weight: Tensor, stride: tuple[int, int], offset: tuple[int, int],
                          size: tuple[int, int]) -> Tensor:
    """:func:`input_gradient` as cuDNN's transposed convolution, with the image's channels padded
    to :data:`PAD_TO` (zero weights; the extra channels' gradients are dropped)."""
    full = F.conv_transpose2d(grad_out, _cached(weight, "padded", lambda: padded_weight(weight)), stride=stride)
    return _crop(full[:, :weight.shape[1]], offset, size)


def method(conv: nn.Conv2d, x: Tensor) -> str | None:
    """How the input gradient of ``conv`` (one that :func:`qualifies`) at ``x`` is computed:
    ``"subpixel"``, ``"padded"`` or None (autograd's own).

    :data:`DEVICES` (the CPU): sub-pixel.  :data:`ALIGNED_DEVICES` (CUDA), measured on an H200
    (``benchmarks/first_conv.py``): sub-pixel when its ``C_in*s*s`` output channels are a
    multiple of :data:`PAD_TO` (AlexNet's stride 4: 48; bf16 at batch 16 / 128, 4.3x / 2.1x
    faster than cuDNN's backward); else, in bf16 / fp16, the image padded to :data:`PAD_TO`
    channels (stride 2, 12 sub-pixel channels: 2.8-3x faster at batch 16, the same at 128,
    where the sub-pixel form was 2.8x slower); else autograd's.
    """
    device = x.device.type
    if device in DEVICES:
        return "subpixel"
    if tuple(conv.stride) == (1, 1):
        return None  # the blocked form is measured on the CPU only
    if device in ALIGNED_DEVICES:
        if conv.in_channels * conv.stride[0] * conv.stride[1] % PAD_TO == 0:
            return "subpixel"
        if conv.weight.dtype in (torch.bfloat16, torch.float16) and conv.in_channels < PAD_TO:
            return "padded"
    return None


class _InputGradient(torch.autograd.Function):
    """Identity on the convolution's (detached) output; its backward gives the input's gradient
    (``how``: ``"subpixel"``, :func:`input_gradient`, or ``"padded"``, :func:`padded_input_gradient`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, held: list[Tensor], weight: Tensor, stride: tuple[int, int],
                offset: tuple[int, int], how: str = "subpixel") -> Tensor:
        # ``held``: the output, in a list so that autograd does not see an input returned as-is
        # (it would make a view of it, which an in-place ReLU after the convolution may not modify)
        ctx.save_for_backward(weight)
        ctx.geometry = (stride, offset, tuple(x.shape[-2:]), x.dtype, how)
        ctx.window = crop_window(x) if how == "subpixel" and x.dtype == weight.dtype else None
        return held[0]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        stride, offset, size, dtype, how = ctx.geometry
        grad_out = grad_out.to(weight.dtype)
        if how == "padded":
            grad = padded_input_gradient(grad_out, weight, stride, offset, size)
        else:
            grad = input_gradient(grad_out, weight, stride, offset, size, ctx.window)
        return grad if grad is None else grad.to(dtype), None, None, None, None, None


class InputGradientHooks:
    """Forward hooks that give the convolutions in ``convs`` (each one that :func:`qualifies`) the
    input gradient :func:`method` picks (sub-pixel, or padded to 8 channels) for the duration of
    a ``with`` block (installed and removed around each forward pass; the object is reused
    across passes)."""

    def __init__(self, convs: list[nn.Conv2d]) -> None:
        self.convs = convs
        self._offsets = {id(c): top_left_padding(c) for c in convs}
        self._inputs: dict[int, tuple[Tensor, str]] = {}
        self._handles: list[Any] = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
            return None  # nothing to back-propagate
        assert isinstance(module, nn.Conv2d)
        how = method(module, x)
        if how is None:
            return None  # a device whose own backward is fast enough
        self._inputs[id(module)] = (x, how)
        return (x.detach(), *args[1:])  # the module computes its output without a graph

    def _post(self, module: nn.Module, _args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        held = self._inputs.pop(id(module), None)
        if held is None:
            return None
        assert isinstance(module, nn.Conv2d)
        x, how = held
        return _InputGradient.apply(x, [out], module.weight, tuple(module.stride), self._offsets[id(module)], how)

    def __enter__(self) -> "InputGradientHooks":
        for conv in self.convs:
            self._handles.append(conv.register_forward_pre_hook(self._pre))
            self._handles.append(conv.register_forward_hook(self._post, prepend=True))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
