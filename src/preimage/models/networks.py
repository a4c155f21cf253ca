"""The paper's three networks as plain ``torch.nn.Module`` s (Mahendran & Vedaldi, section 4.2).

Each network is a :class:`SequentialNet` -- an ``nn.Sequential`` whose direct children carry the
layer names of the paper's Tables 1-3, in order -- so that :class:`preimage.ModuleCut` can cut it at
``"conv5"`` or ``"fc6"`` and :func:`preimage.geometry.receptive_fields` can walk it:

* :func:`alexnet` (Table 1), Caffe's ``bvlc_alexnet``: ``conv1 relu1 norm1 pool1 conv2 relu2 norm2
  pool2 conv3 relu3 conv4 relu4 conv5 relu5 pool5 fc6 relu6 fc7 relu7 fc8 prob``; conv2, conv4 and
  conv5 are grouped convolutions (two groups, as in Krizhevsky et al.'s two-GPU model).
* :func:`caffenet`, Caffe's ``bvlc_reference_caffenet``: the same layers, but each max-pooling
  comes *before* its normalization (``... relu1 pool1 norm1 ... relu2 pool2 norm2 ...``).  The
  receptive fields of Table 1 hold per layer name except norm1 and norm2, which take the values of
  the pooling they follow (r.f. 19 / stride 8 and 67 / 16).
* :func:`vgg_m` (Table 2), VGG-M of Chatfield et al. 2014 (``imagenet-vgg-m.mat``): conv1 7x7/2 96,
  norm1, pool1, conv2 5x5/2 256 (pad 1), norm2, pool2, conv3-conv5 3x3 512, pool5, fc6-fc8.
* :func:`vgg_vd_16` (Table 3), VGG-VD-16 of Simonyan & Zisserman 2015: ``conv1_1 relu1_1 conv1_2
  relu1_2 pool1 ... conv5_3 relu5_3 pool5 fc6 relu6 fc7 relu7 fc8 prob`` (the paper prints
  ``conv1'1`` for ``conv1_1``).
* :func:`torchvision_alexnet`: torchvision's AlexNet ("one weird trick" variant: 64/192/384/256/256
  channels, no normalization, no groups), with the same naming scheme, for torchvision weights.

Dropout layers are not included: the paper's tables do not list them, they are the identity at
test time, and MatConvNet's pretrained files omit them too (Caffe's deploy prototxts keep them as
in-place layers; the importers skip them).

Layers.  Convolutions are ``torch.nn.Conv2d``; local response normalization is Caffe's
:class:`~preimage.models.caffe.CaffeLRN` (``x / (k + alpha/n * sum x^2)^beta``, equal to MatConvNet's
``vl_nnnormalize`` with ``param = [n k alpha/n beta]``); pooling is :class:`Pool2d`, with Caffe's
ceil rounding by default (``ceil_mode=False`` gives MatConvNet's and torch's floor rounding with
explicit, possibly asymmetric, padding -- the MatConvNet importer uses that, with the file's pads).

Fully connected layers are convolutions, as in MatConvNet: fc6 is a 6x6 (AlexNet, VGG-M) or 7x7
(VGG-VD-16) convolution and fc7, fc8 are 1x1 convolutions, and ``prob`` is a softmax over channels.
At the nominal input size (227 for AlexNet/CaffeNet, 224 for the VGG networks) the outputs are
``(N, C, 1, 1)`` and equal Caffe's InnerProduct outputs (Caffe flattens in C, H, W order, which is
exactly the order of a ``(out, C, H, W)`` convolution kernel, so Caffe's ``(4096, 9216)`` fc6 matrix is
``weight.reshape(4096, 256, 6, 6)``).  Larger inputs give spatial maps of class scores (the network
is fully convolutional).  The smallest valid input is given by
:func:`preimage.geometry.minimum_input_size`: with Caffe's ceil pooling 199 (AlexNet, CaffeNet),
201 (VGG-M) and 193 (VGG-VD-16); with floor pooling and no pads 227, 227 and 224.  (Caffe itself
accepts only the nominal size: its InnerProduct needs exactly 256x6x6 = 9216 inputs for AlexNet.)

Input conventions (:class:`InputConvention`): all networks take ``(N, 3, H, W)`` images in 0..255
units minus a per-channel mean (the mean image of Caffe/MatConvNet averaged over pixels).  The
constructors default to the convention of the paper's own files, MatConvNet's (RGB); the importers
replace it with the convention of the weights they read (Caffe: BGR; torchvision: RGB divided by
a standard deviation).  Weights are random (torch's default initialization) until an importer
loads some: see :mod:`preimage.models.zoo`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caffe import CaffeLRN, CaffePooling, ModelError
from .pooling import max_pool2d

__all__ = [
    "ARCHITECTURES",
    "ILSVRC_MEAN_RGB",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "VGG_MEAN_RGB",
    "VGG16_BLOCKS",
    "DenseConv2d",
    "InputConvention",
    "LayerSignature",
    "PaddedConv2d",
    "Pool2d",
    "SequentialNet",
    "alexnet",
    "build",
    "caffenet",
    "canonical_arch",
    "meta_build",
    "signature",
    "torchvision_alexnet",
    "vgg_m",
    "vgg_vd_16",
]

ILSVRC_MEAN_RGB: tuple[float, float, float] = (122.67891434, 116.66876762, 104.00698793)
"""Caffe's ILSVRC-2012 mean image (``ilsvrc_2012_mean.npy``) averaged over pixels, in RGB order."""

VGG_MEAN_RGB: tuple[float, float, float] = (123.68, 116.779, 103.939)
"""The per-channel mean of the VGG-VD models (Simonyan & Zisserman), RGB."""

TORCHVISION_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
"""torchvision's ImageNet normalization expressed in 0..255 units (RGB)."""


# ------------------------------------------------------------------------------ conventions


@dataclass(frozen=True)
class InputConvention:
    """How a network wants its input: ``x = (scale * photo - mean) / std`` in its channel order.

    Attributes:
        mean: per-channel mean in 0..255 units, in the network's channel order (BGR when ``bgr``).
        std: per-channel divisor in the same units (1 for Caffe and MatConvNet models).
        bgr: whether the channels are in BGR order (Caffe) rather than RGB (MatConvNet, torchvision).
        input_size: the side of the square images the network was trained on (227 or 224).
        scale: input units per unit of a [0, 1] photo (always 255 here).
        source: where the convention comes from (``"matconvnet"``, ``"caffe"``, ``"torchvision"``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    bgr: bool = False
    input_size: int = 224
    scale: float = 255.0
    source: str = "matconvnet"

    def module_cut_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`preimage.ModuleCut` for this convention."""
        return {"mean": tuple(self.mean), "std": tuple(self.std), "scale": self.scale, "bgr": self.bgr}

    def with_(self, **changes: Any) -> InputConvention:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def as_caffe(self) -> InputConvention:
        """The same network fed as Caffe feeds it: BGR order (the mean reversed accordingly)."""
        mean = tuple(reversed(self.mean)) if not self.bgr else self.mean
        std = tuple(reversed(self.std)) if not self.bgr else self.std
        return replace(self, mean=mean, std=std, bgr=True, source="caffe")


# ----------------------------------------------------------------------------------- layers


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return t[0], t[0]
    if len(t) != 2:
        raise ValueError(f"expected 1 or 2 values, got {t}")
    return t[0], t[1]


def _quad(v: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right) from 1, 2 (vertical, horizontal) or 4 values."""
    if isinstance(v, int):
        return v, v, v, v
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return t * 4
    if len(t) == 2:
        return t[0], t[0], t[1], t[1]
    if len(t) != 4:
        raise ValueError(f"padding needs 1, 2 or 4 values, got {t}")
    return t


class Pool2d(CaffePooling):
    """Max or average pooling with Caffe's (ceil) or MatConvNet's (floor) rounding.

    Args:
        kernel, stride: window size and step (one value or (vertical, horizontal)).
        pad: padding as one value, (vertical, horizontal) or MatConvNet's (top, bottom, left, right).
        method: ``"max"`` or ``"avg"``.
        ceil_mode: ``True`` (Caffe): output size ``ceil((H + 2p - k) / s) + 1`` with Caffe's window
            clipping -- exactly :class:`~preimage.models.caffe.CaffePooling`; the padding must be
            symmetric.  ``False`` (MatConvNet ``vl_nnpool``, torch's default): output size
            ``floor((H + top + bottom - k) / s) + 1``; max pooling ignores the padding, average
            pooling divides by the number of pixels of the window inside the image (MatConvNet).

    MatConvNet's importer of Caffe models emulates ceil rounding by padding the bottom/right by
    ``s - 1`` at most, which for every input size equals Caffe's output (``floor((H + s - 1 - k)/s)
    = ceil((H - k)/s)``) when that pad is ``s - 1``, and at the nominal input size otherwise.
    """

    def __init__(self, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 pad: int | Sequence[int] = 0, *, method: str = "max", ceil_mode: bool = True) -> None:
        if method not in ("max", "avg"):
            raise ValueError(f"pooling method must be 'max' or 'avg', got {method!r}")
        k = _pair(kernel)
        s = _pair(stride) if stride is not None else k
        p4 = _quad(pad)
        if ceil_mode and (p4[0] != p4[1] or p4[2] != p4[3]):
            raise ValueError("Caffe (ceil) pooling takes symmetric padding; use ceil_mode=False for MatConvNet pads")
        super().__init__("MAX" if method == "max" else "AVE", k, s, (p4[0], p4[2]), ceil=ceil_mode)
        self.padding4: tuple[int, int, int, int] = p4

    @property
    def kind(self) -> str:
        """``"max"`` or ``"avg"``."""
        return "max" if self.method == "MAX" else "avg"

    def extra_repr(self) -> str:
        return (f"{self.kind}, kernel={self.kernel}, stride={self.stride}, pad={self.padding4}, "
                f"round={'ceil (Caffe)' if self.ceil else 'floor (MatConvNet)'}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.ceil:
            return super().output_size(height, width)
        (kh, kw), (sh, sw), (t, b, lf, rt) = self.kernel, self.stride, self.padding4
        return (height + t + b - kh) // sh + 1, (width + lf + rt - kw) // sw + 1

    def forward(self, x: Tensor) -> Tensor:
        if self.ceil:
            return super().forward(x)
        t, b, lf, rt = self.padding4
        padded = (t, b, lf, rt) != (0, 0, 0, 0)
        if self.method == "MAX":
            if padded:
                x = F.pad(x, (lf, rt, t, b), value=-math.inf)
            return max_pool2d(x, self.kernel, self.stride, (0, 0), False, relu=self.relu_first)
        if not padded:
            return F.avg_pool2d(x, self.kernel, self.stride)
        sums = F.avg_pool2d(F.pad(x, (lf, rt, t, b)), self.kernel, self.stride, divisor_override=1)
        ones = F.pad(x.new_ones((1, 1) + tuple(x.shape[-2:])), (lf, rt, t, b))
        counts = F.avg_pool2d(ones, self.kernel, self.stride, divisor_override=1)
        return sums / counts.clamp_min(1)


class DenseConv2d(nn.Conv2d):
    """A convolution that is a fully connected layer when its window covers its whole input.

    The paper's networks write fc6-fc8 as convolutions (Tables 1-3; MatConvNet does the same), so
    that larger inputs give spatial maps of scores.  At the nominal size the output is 1 x 1, and
    oneDNN's convolution is a poor matrix product there: forward + backward to the input of
    AlexNet's fc6 at batch 1 took 46 ms as a convolution and 8 ms as ``F.linear``, VGG-VD-16's fc6
    in fp32 397 ms against 24 ms, fc7 in bf16 at batch 16 36 ms against 2.7 ms.  Such calls (no
    padding, no groups, input exactly the kernel's size) run as one matrix product over the
    flattened input, in the order of the weights' layout so that neither side is copied; every
    other call is the ordinary convolution.  Parameters and ``state_dict`` are ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() != 4 or tuple(x.shape[-2:]) != tuple(self.kernel_size) or self.groups != 1
                or isinstance(self.padding, str) or any(self.padding) or self.padding_mode != "zeros"):
            return super().forward(x)
        n, w = x.shape[0], self.weight
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            flat_w, flat_x = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), x.permute(0, 2, 3, 1).reshape(n, -1)
        else:
            flat_w, flat_x = w.reshape(w.shape[0], -1), x.reshape(n, -1)
        return frozen_linear(flat_x, flat_w, self.bias, self).view(n, -1, 1, 1)


def frozen_linear(x: Tensor, w: Tensor, b: Tensor | None, owner: nn.Module) -> Tensor:
    """``F.linear(x, w, b)``; for frozen bf16 weights on the CPU with ``x`` requiring gradients,
    through :class:`_FrozenLinear`, whose transposed copy of ``w`` is kept on ``owner`` (outside
    its ``state_dict``) until the weights change."""
    if not (torch.is_grad_enabled() and x.requires_grad and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and not w.requires_grad and (b is None or not b.requires_grad)):
        return F.linear(x, w, b)
    key = (w.data_ptr(), w.stride(), w._version, w.dtype)
    cached = owner.__dict__.get("_transposed_weight")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_transposed_weight"] = (key, w.t().contiguous())
    return _FrozenLinear.apply(x, w, b, cached[1])


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` whose input gradient ``g @ w`` is computed as ``F.linear(g, wt)``
    from ``wt``, a transposed copy of ``w`` (:func:`frozen_linear`).

    oneDNN's bf16 matrix product is fast only with its second operand stored (out, in): AlexNet's
    fc6 (4096 x 9216) took 2.6 ms forward and 6.2 ms for ``g @ w`` at batch 1 (4.1 at batch 16),
    against 2.6 (3.0) ms from the transposed copy; AlexNet's whole fc8 cut, engine step in bf16
    at batch 1, 30 -> 23 ms.  The copy costs the layer's weights once more in memory while Φ is
    optimized through it (VGG-VD-16's fc6-fc8: 248 MB).  In fp32 ``g @ w`` is the faster of the
    two and runs as it is.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, wt: Tensor) -> Tensor:  # type: ignore[override]
        ctx.wt = wt
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return F.linear(grad, ctx.wt), None, None, None


class PaddedConv2d(nn.Conv2d):
    """A convolution with MatConvNet's asymmetric zero padding ``(top, bottom, left, right)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, pad: Sequence[int] = (0, 0, 0, 0), dilation: int | Sequence[int] = 1,
                 groups: int = 1, bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, _pair(kernel_size), stride=_pair(stride), padding=0,
                         dilation=_pair(dilation), groups=groups, bias=bias, device=device, dtype=dtype)
        self.padding4: tuple[int, int, int, int] = _quad(pad)

    def extra_repr(self) -> str:
        return str(super().extra_repr()) + f", pad={self.padding4}"

    def forward(self, x: Tensor) -> Tensor:
        t, b, lf, rt = self.padding4
        return super().forward(F.pad(x, (lf, rt, t, b)))


# --------------------------------------------------------------------------------- the net


class SequentialNet(nn.Sequential):
    """A chain of named layers (``nn.Sequential`` with names), the form of all the paper's networks.

    Attributes:
        arch: architecture name (``"alexnet"``, ``"caffenet"``, ``"vgg-m"``, ``"vgg-vd-16"``,
            ``"torchvision-alexnet"`` or ``"custom"``).
        convention: the :class:`InputConvention` of the weights.
        classes: class descriptions of the outputs when the weights file has them, else None.

    ``forward(x, start=None, until=None)`` runs the layers from ``start`` to ``until`` (both
    included; the whole chain by default).  The network is created in evaluation mode.
    """

    def __init__(self, layers: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]] = (), *,
                 arch: str = "custom", convention: InputConvention | None = None) -> None:
        items = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
        super().__init__(OrderedDict(items))
        self.arch = arch
        self.convention = convention if convention is not None else InputConvention(mean=(0.0, 0.0, 0.0))
        self.classes: list[str] | None = None
        self.eval()

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}"

    def layer_names(self) -> list[str]:
        """The layer names, in order (Tables 1-3)."""
        return list(self._modules)

    def layer(self, name: str) -> nn.Module:
        """The layer called ``name``."""
        if name not in self._modules:
            raise ModelError(f"no layer named {name!r} in {self.arch} (layers: {', '.join(self._modules)})")
        module = self._modules[name]
        assert module is not None
        return module

    def index(self, name: str) -> int:
        """Position of layer ``name`` in the chain."""
        self.layer(name)
        return list(self._modules).index(name)

    def forward(self, x: Tensor, *, start: str | None = None, until: str | None = None) -> Tensor:
        names = list(self._modules)
        first = self.index(start) if start is not None else 0
        last = self.index(until) if until is not None else len(names) - 1
        for name in names[first:last + 1]:
            module = self._modules[name]
            assert module is not None
            x = module(x)
        return x


# --------------------------------------------------------------------------- architectures


def _conv(cin: int, cout: int, k: int, s: int = 1, p: int = 0, g: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g)


def _lrn(alpha: float, k: float, n: int = 5, beta: float = 0.75) -> CaffeLRN:
    return CaffeLRN(n, alpha, beta, k, across_channels=True)


def _classifier(cin: int, k: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    return [("fc6", DenseConv2d(cin, 4096, k)), ("relu6", nn.ReLU()),
            ("fc7", DenseConv2d(4096, 4096, 1)), ("relu7", nn.ReLU()),
            ("fc8", DenseConv2d(4096, num_classes, 1)), ("prob", nn.Softmax(dim=1))]


def _alexnet_layers(pool_first: bool, ceil_mode: bool, num_classes: int) -> list[tuple[str, nn.Module]]:
    def block(i: int) -> list[tuple[str, nn.Module]]:
        norm = (f"norm{i}", _lrn(1e-4, 1.0))
        pool = (f"pool{i}", Pool2d(3, 2, ceil_mode=ceil_mode))
        return [pool, norm] if pool_first else [norm, pool]

    return [("conv1", _conv(3, 96, 11, 4)), ("relu1", nn.ReLU()), *block(1),
            ("conv2", _conv(96, 256, 5, 1, 2, g=2)), ("relu2", nn.ReLU()), *block(2),
            ("conv3", _conv(256, 384, 3, 1, 1)), ("relu3", nn.ReLU()),
            ("conv4", _conv(384, 384, 3, 1, 1, g=2)), ("relu4", nn.ReLU()),
            ("conv5", _conv(384, 256, 3, 1, 1, g=2)), ("relu5", nn.ReLU()),
            ("pool5", Pool2d(3, 2, ceil_mode=ceil_mode)),
            *_classifier(256, 6, num_classes)]


def alexnet(*, num_classes: int = 1000, ceil_mode: bool = True,
            convention: InputConvention | None = None) -> SequentialNet:
    """AlexNet as shipped with Caffe (``bvlc_alexnet``), the paper's Table 1, with random weights.

    conv1 11x11/4 96 -> relu1 -> norm1 (LRN 5, alpha 1e-4, beta 0.75) -> pool1 3x3/2 -> conv2 5x5
    256 (pad 2, 2 groups) -> relu2 -> norm2 -> pool2 -> conv3 3x3 384 -> relu3 -> conv4 3x3 384
    (2 groups) -> relu4 -> conv5 3x3 256 (2 groups) -> relu5 -> pool5 -> fc6 (6x6 conv, 4096) ->
    relu6 -> fc7 -> relu7 -> fc8 -> prob.  Input 227x227.
    """
    conv = convention or InputConvention(mean=ILSVRC_MEAN_RGB, input_size=227)
    return SequentialNet(_alexnet_layers(False, ceil_mode, num_classes), arch="alexnet", convention=conv)


def caffenet(*, num_classes: int = 1000, ceil_mode: bool = True,
             convention: InputConvention | None = None) -> SequentialNet:
    """CaffeNet (``bvlc_reference_caffenet``): AlexNet with pooling before normalization (Table 1).

    Identical layers and shapes to :func:`alexnet`, in the order ``relu1 pool1 norm1`` and
    ``relu2 pool2 norm2``.  Input 227x227.
    """
    conv = convention or InputConvention(mean=ILSVRC_MEAN_RGB, input_size=227)
    return SequentialNet(_alexnet_layers(True, ceil_mode, num_classes), arch="caffenet", convention=conv)


def vgg_m(*, num_classes: int = 1000, ceil_mode: bool = True,
          convention: InputConvention | None = None) -> SequentialNet:
    """VGG-M (Chatfield et al., BMVC 2014; ``imagenet-vgg-m.mat``), the paper's Table 2.

    conv1 7x7/2 96 -> relu1 -> norm1 (LRN 5, alpha 5e-4, beta 0.75, k 2) -> pool1 3x3/2 -> conv2
    5x5/2 256 (pad 1) -> relu2 -> norm2 -> pool2 3x3/2 -> conv3, conv4, conv5 3x3 512 (pad 1, with
    ReLUs) -> pool5 3x3/2 -> fc6 (6x6 conv, 4096) -> relu6 -> fc7 -> relu7 -> fc8 -> prob.
    Input 224x224.  (MatConvNet's file stores the LRN as ``param = [5 2 1e-4 0.75]``.)
    """
    conv = convention or InputConvention(mean=ILSVRC_MEAN_RGB, input_size=224)
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", _conv(3, 96, 7, 2)), ("relu1", nn.ReLU()), ("norm1", _lrn(5e-4, 2.0)),
        ("pool1", Pool2d(3, 2, ceil_mode=ceil_mode)),
        ("conv2", _conv(96, 256, 5, 2, 1)), ("relu2", nn.ReLU()), ("norm2", _lrn(5e-4, 2.0)),
        ("pool2", Pool2d(3, 2, ceil_mode=ceil_mode)),
        ("conv3", _conv(256, 512, 3, 1, 1)), ("relu3", nn.ReLU()),
        ("conv4", _conv(512, 512, 3, 1, 1)), ("relu4", nn.ReLU()),
        ("conv5", _conv(512, 512, 3, 1, 1)), ("relu5", nn.ReLU()),
        ("pool5", Pool2d(3, 2, ceil_mode=ceil_mode)),
        *_classifier(512, 6, num_classes),
    ]
    return SequentialNet(layers, arch="vgg-m", convention=conv)


VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
"""Output channels of the convolutions of VGG-VD-16, block by block (Table 3)."""


def vgg_vd_16(*, num_classes: int = 1000, ceil_mode: bool = True,
              convention: InputConvention | None = None) -> SequentialNet:
    """VGG-VD-16 (Simonyan & Zisserman, ICLR 2015; ``imagenet-vgg-verydeep-16.mat``), Table 3.

    Five blocks of 3x3 convolutions (pad 1) with ReLUs, ``convB_i`` / ``reluB_i``, each followed by
    a 2x2/2 max pooling ``poolB``; then fc6 (7x7 conv, 4096) -> relu6 -> fc7 -> relu7 -> fc8 -> prob.
    Input 224x224.  138M parameters: build it once.
    """
    conv = convention or InputConvention(mean=VGG_MEAN_RGB, input_size=224)
    layers: list[tuple[str, nn.Module]] = []
    cin = 3
    for b, widths in enumerate(VGG16_BLOCKS, start=1):
        for i, cout in enumerate(widths, start=1):
            layers += [(f"conv{b}_{i}", _conv(cin, cout, 3, 1, 1)), (f"relu{b}_{i}", nn.ReLU())]
            cin = cout
        layers.append((f"pool{b}", Pool2d(2, 2, ceil_mode=ceil_mode)))
    layers += _classifier(512, 7, num_classes)
    return SequentialNet(layers, arch="vgg-vd-16", convention=conv)


def torchvision_alexnet(*, num_classes: int = 1000, ceil_mode: bool = False,
                        convention: InputConvention | None = None) -> SequentialNet:
    """torchvision's AlexNet (``alexnet-owt``) with the Table 1 naming scheme (no norm layers).

    conv1 11x11/4 64 (pad 2) -> relu1 -> pool1 3x3/2 -> conv2 5x5 192 (pad 2) -> relu2 -> pool2 ->
    conv3 3x3 384 -> relu3 -> conv4 3x3 256 -> relu4 -> conv5 3x3 256 -> relu5 -> pool5 -> fc6 (6x6
    conv) -> relu6 -> fc7 -> relu7 -> fc8 -> prob.  torch's floor pooling; input 224x224, where
    torchvision's ``AdaptiveAvgPool2d((6, 6))`` is the identity (at other sizes this network gives a
    map of scores instead of resampling pool5 to 6x6).
    """
    conv = convention or InputConvention(mean=TORCHVISION_MEAN, std=TORCHVISION_STD, input_size=224,
                                         source="torchvision")
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", _conv(3, 64, 11, 4, 2)), ("relu1", nn.ReLU()), ("pool1", Pool2d(3, 2, ceil_mode=ceil_mode)),
        ("conv2", _conv(64, 192, 5, 1, 2)), ("relu2", nn.ReLU()), ("pool2", Pool2d(3, 2, ceil_mode=ceil_mode)),
        ("conv3", _conv(192, 384, 3, 1, 1)), ("relu3", nn.ReLU()),
        ("conv4", _conv(384, 256, 3, 1, 1)), ("relu4", nn.ReLU()),
        ("conv5", _conv(256, 256, 3, 1, 1)), ("relu5", nn.ReLU()),
        ("pool5", Pool2d(3, 2, ceil_mode=ceil_mode)),
        *_classifier(256, 6, num_classes),
    ]
    return SequentialNet(layers, arch="torchvision-alexnet", convention=conv)


ARCHITECTURES: dict[str, Callable[..., SequentialNet]] = {
    "alexnet": alexnet,
    "caffenet": caffenet,
    "vgg-m": vgg_m,
    "vgg-vd-16": vgg_vd_16,
    "torchvision-alexnet": torchvision_alexnet,
}
"""Constructors by architecture name."""

_ALIASES: dict[str, str] = {
    "caffe-alex": "alexnet", "bvlc-alexnet": "alexnet", "imagenet-caffe-alex": "alexnet",
    "caffe-ref": "caffenet", "bvlc-reference-caffenet": "caffenet", "imagenet-caffe-ref": "caffenet",
    "vggm": "vgg-m", "imagenet-vgg-m": "vgg-m",
    "vgg16": "vgg-vd-16", "vgg-16": "vgg-vd-16", "vgg-vd16": "vgg-vd-16", "vggvd16": "vgg-vd-16",
    "vgg-verydeep-16": "vgg-vd-16", "imagenet-vgg-verydeep-16": "vgg-vd-16",
    "alexnet-owt": "torchvision-alexnet", "tv-alexnet": "torchvision-alexnet",
}


def canonical_arch(name: str) -> str | None:
    """The architecture name for ``name`` (case and ``_``/``-`` insensitive, a few aliases), or None."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in ARCHITECTURES else None


def build(arch: str, **kwargs: Any) -> SequentialNet:
    """Build architecture ``arch`` (see :data:`ARCHITECTURES`) with random weights."""
    key = canonical_arch(arch)
    if key is None:
        raise ModelError(f"unknown network {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[key](**kwargs)


@dataclass(frozen=True)
class LayerSignature:
    """What must agree between two networks for weights to carry over: kind and shapes per layer."""

    name: str
    kind: str
    shape: tuple[int, ...] = ()
    hyper: tuple[Any, ...] = field(default=())


def signature(net: nn.Module) -> list[LayerSignature]:
    """Per-layer kinds and shapes of a :class:`SequentialNet` (pooling pads and rounding excluded)."""
    out: list[LayerSignature] = []
    for name, m in net.named_children():
        if isinstance(m, nn.Conv2d):
            pad = m.padding4 if isinstance(m, PaddedConv2d) else _quad(m.padding)  # type: ignore[arg-type]
            out.append(LayerSignature(name, "conv", tuple(m.weight.shape),
                                      (tuple(m.stride), pad, tuple(m.dilation), m.groups, m.bias is not None)))
        elif isinstance(m, CaffePooling):
            out.append(LayerSignature(name, "pool", (), (m.method, tuple(m.kernel), tuple(m.stride))))
        elif isinstance(m, CaffeLRN):
            out.append(LayerSignature(name, "lrn", (), (m.local_size, m.across_channels)))
        elif isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            out.append(LayerSignature(name, "relu"))
        elif isinstance(m, nn.Softmax):
            out.append(LayerSignature(name, "softmax"))
        else:
            out.append(LayerSignature(name, type(m).__name__))
    return out


def meta_build(arch: str, **kwargs: Any) -> SequentialNet:
    """Build ``arch`` on the ``meta`` device: structure only, no memory, instant (for geometry)."""
    with torch.device("meta"):
        return build(arch, **kwargs)
