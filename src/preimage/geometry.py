"""Receptive fields and strides of network layers, computed analytically (paper Tables 1-3).

For a chain of layers, the receptive field ``r`` (side in input pixels of the window that one
output location sees) and the stride ``s`` (input pixels between neighbouring output locations)
follow the recursion of the paper's Tables 1-3::

    r_out = r_in + d (k - 1) s_in          s_out = s_in * stride

for a convolution or pooling with kernel ``k``, dilation ``d`` and stride ``stride`` (``r = s = 1``
for the input image); pointwise layers (ReLU, LRN across channels, softmax, dropout) keep both.
Padding does not enter (so a receptive field can be larger than the image, as Table 1 notes).
A layer that mixes *all* locations (an InnerProduct / ``nn.Linear`` applied to a map, a global
pooling) sees the whole map: ``r_out = r_in + (H - 1) s_in``, ``s_out = s_in``; this is how fc6
(a 6x6 kernel on the 6x6 pool5 map) gets r.f. 355 in Table 1 either way.  Output shapes follow each
framework's rounding: floor for convolutions, Caffe's ceil (or MatConvNet's floor with explicit
pads) for :class:`~preimage.models.caffe.CaffePooling` / :class:`~preimage.models.networks.Pool2d`,
torch's rules for ``nn.MaxPool2d`` / ``nn.AvgPool2d``.

:func:`receptive_fields` walks

* sequential networks: :class:`~preimage.models.networks.SequentialNet`, any ``nn.Sequential``,
  and modules such as torchvision's AlexNet/VGG whose children run in registration order (nested
  ``nn.Sequential`` s are entered, with dotted names ``features.0``); a nested container that is
  not an ``nn.Sequential`` (a ResNet block, ...) raises :class:`GeometryError`;
* Caffe networks (:class:`~preimage.models.caffe.CaffeNet`), as a graph of blobs: Concat and
  Eltwise take the largest receptive field (and stride) of their inputs (SqueezeNet's fire modules).

Non-square kernels are tracked per axis; the reported numbers are the larger of the two axes.
``nn.AdaptiveAvgPool2d`` / ``AdaptiveMaxPool2d`` are exact when they are the identity or divide the
map evenly, approximate otherwise (largest window, rounded stride).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .models.caffe import (
    CaffeBatchNorm,
    CaffeConcat,
    CaffeDropout,
    CaffeEltwise,
    CaffeInnerProduct,
    CaffeLRN,
    CaffeNet,
    CaffePooling,
    CaffePower,
    CaffeScale,
    CaffeSplit,
)
from .models.networks import PaddedConv2d, SequentialNet
from .models.pooling import torch_pool_size
from .representations.base import Geometry

__all__ = ["GeometryError", "LayerInfo", "layer_geometry", "minimum_input_size", "receptive_fields"]


class GeometryError(ValueError):
    """The geometry of a network cannot be computed (unknown layer, input too small, ...)."""


class LayerInfo(NamedTuple):
    """One row of Tables 1-3: layer name, output shape ``(C, H, W)`` (or ``(F,)``), r.f. size, stride."""

    name: str
    shape: tuple[int, ...]
    receptive_field: int
    stride: int


@dataclass(frozen=True)
class _State:
    channels: int
    size: tuple[int, int] | None  # None once the spatial axes are gone (flatten / linear)
    rf: tuple[int, int]
    stride: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels,) + (self.size if self.size is not None else ())

    def info(self, name: str) -> LayerInfo:
        return LayerInfo(name, self.shape, max(self.rf), max(self.stride))


_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
    nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
    nn.LocalResponseNorm, nn.BatchNorm2d, nn.BatchNorm1d,
    CaffeLRN, CaffeDropout, CaffePower, CaffeBatchNorm, CaffeScale,
)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def _spatial(name: str, st: _State) -> tuple[int, int]:
    if st.size is None:
        raise GeometryError(f"layer {name!r} needs a spatial (C, H, W) input but gets a flat vector")
    return st.size


def _window(name: str, st: _State, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
            out: tuple[int, int], channels: int) -> _State:
    h, w = _spatial(name, st)
    if out[0] <= 0 or out[1] <= 0:
        raise GeometryError(f"layer {name!r}: its {kernel[0]}x{kernel[1]} window does not fit the {h}x{w} input "
                            f"(the image is too small)")
    rf = tuple(r + d * (k - 1) * s for r, d, k, s in zip(st.rf, dilation, kernel, st.stride))
    new_stride = tuple(s * t for s, t in zip(st.stride, stride))
    return _State(channels, out, rf, new_stride)  # type: ignore[arg-type]


def _collapse(name: str, st: _State, channels: int) -> _State:
    """A layer that sees the whole map (InnerProduct, flatten, global pooling)."""
    if st.size is None:
        return _State(channels, None, st.rf, st.stride)
    rf = tuple(r + (n - 1) * s for r, n, s in zip(st.rf, st.size, st.stride))
    return _State(channels, None, rf, st.stride)  # type: ignore[arg-type]


def _step(name: str, m: nn.Module, st: _State) -> _State:
    """The state after layer ``m`` (one input)."""
    if isinstance(m, nn.Conv2d):
        h, w = _spatial(name, st)
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        if isinstance(m, PaddedConv2d):
            t, b, lf, rt = m.padding4
        elif isinstance(m.padding, str):
            if m.padding == "valid":
                t = b = lf = rt = 0
            else:  # "same"
                th, tw = (d * (k - 1) for d, k in zip(dilation, kernel))
                t, b, lf, rt = th // 2, th - th // 2, tw // 2, tw - tw // 2
        else:
            (t, lf) = _pair(m.padding)
            b, rt = t, lf
        if st.channels != m.in_channels:
            raise GeometryError(f"layer {name!r} expects {m.in_channels} input channels, gets {st.channels}")
        out = ((h + t + b - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
               (w + lf + rt - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)
        return _window(name, st, kernel, stride, dilation, out, m.out_channels)
    if isinstance(m, CaffePooling):
        h, w = _spatial(name, st)
        if m.global_pooling:
            return _State(st.channels, (1, 1), _collapse(name, st, st.channels).rf, st.stride)
        return _window(name, st, m.kernel, m.stride, (1, 1), m.output_size(h, w), st.channels)
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        h, w = _spatial(name, st)
        pk = _pair(m.kernel_size)
        ps = _pair(m.stride) if m.stride is not None else pk
        pp = _pair(m.padding)
        pd = _pair(m.dilation) if isinstance(m, nn.MaxPool2d) else (1, 1)
        ceil = bool(m.ceil_mode)
        pout = (torch_pool_size(h, pk[0], ps[0], pp[0], pd[0], ceil),
                torch_pool_size(w, pk[1], ps[1], pp[1], pd[1], ceil))
        return _window(name, st, pk, ps, pd, pout, st.channels)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        h, w = _spatial(name, st)
        target = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        ah, aw = (h if target[0] is None else int(target[0])), (w if target[1] is None else int(target[1]))
        if (ah, aw) == (h, w):
            return _State(st.channels, (h, w), st.rf, st.stride)

        def widest(n: int, o: int) -> int:  # PyTorch's windows: [floor(i n / o), ceil((i + 1) n / o))
            return max(math.ceil((i + 1) * n / o) - (i * n) // o for i in range(o))

        ak = (widest(h, ah), widest(w, aw))
        astride = (max(1, round(h / ah)), max(1, round(w / aw)))
        return _window(name, st, ak, astride, (1, 1), (ah, aw), st.channels)
    if isinstance(m, CaffeLRN) and not m.across_channels:
        n = m.local_size
        return _window(name, st, (n, n), (1, 1), (1, 1), _spatial(name, st), st.channels)
    if isinstance(m, nn.Linear):
        if isinstance(m, CaffeInnerProduct) and m.axis != 1:
            raise GeometryError(f"layer {name!r}: InnerProduct on axis {m.axis} is not supported")
        n_in = st.channels * (math.prod(st.size) if st.size is not None else 1)
        if isinstance(m, CaffeInnerProduct) or st.size is None:
            if m.in_features != n_in:
                raise GeometryError(f"layer {name!r} expects {m.in_features} inputs, gets {n_in} "
                                    f"(shape {st.shape}): the input size is wrong for this network")
            return _collapse(name, st, m.out_features)
        # nn.Linear on a (C, H, W) map acts on the last axis
        raise GeometryError(f"layer {name!r}: nn.Linear applied to a spatial map (flatten it first)")
    if isinstance(m, nn.Flatten):
        if m.start_dim not in (1, -3) or m.end_dim != -1:
            raise GeometryError(f"layer {name!r}: only flattening of all but the batch axis is supported")
        channels = st.channels * (math.prod(st.size) if st.size is not None else 1)
        return _collapse(name, st, channels)
    if isinstance(m, _POINTWISE):
        return st
    raise GeometryError(f"cannot compute the geometry of layer {name!r} ({type(m).__name__}): "
                        f"not a convolution, pooling or pointwise layer")


def _leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, f"{full}.")
        elif next(child.children(), None) is not None and not isinstance(child, (CaffePooling, nn.Conv2d)):
            raise GeometryError(f"layer {full!r} ({type(child).__name__}) is a container that is not sequential; "
                                f"its geometry cannot be computed analytically")
        else:
            yield full, child


def _first_conv_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _default_size(model: nn.Module) -> int:
    if isinstance(model, SequentialNet):
        return int(model.convention.input_size)
    if isinstance(model, CaffeNet) and model.input_names:
        shape = model.input_shapes[model.input_names[0]]
        if len(shape) == 4:
            return int(shape[2])
    return 224


def _size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    if h <= 0 or w <= 0:
        raise GeometryError(f"input size must be positive, got {h}x{w}")
    return h, w


def _caffe_fields(net: CaffeNet, size: tuple[int, int] | None) -> list[LayerInfo]:
    blobs: dict[str, _State] = {}
    for name in net.input_names:
        shape = net.input_shapes[name]
        if len(shape) != 4:
            raise GeometryError(f"input {name!r} has shape {shape}; only (N, C, H, W) inputs are supported")
        hw = size if size is not None else (int(shape[2]), int(shape[3]))
        blobs[name] = _State(int(shape[1]), hw, (1, 1), (1, 1))
    rows: list[LayerInfo] = []
    for spec in net.layers:
        module = getattr(net, spec.module_name)
        ins = [blobs[b] for b in spec.bottoms]
        if isinstance(module, (CaffeConcat, CaffeEltwise)):
            if any(s.size != ins[0].size for s in ins):
                raise GeometryError(f"layer {spec.name!r} joins maps of different sizes {[s.shape for s in ins]}")
            if isinstance(module, CaffeConcat) and module.axis != 1:
                raise GeometryError(f"layer {spec.name!r}: Concat along axis {module.axis} is not supported")
            channels = sum(s.channels for s in ins) if isinstance(module, CaffeConcat) else ins[0].channels
            rf = tuple(max(s.rf[i] for s in ins) for i in range(2))
            stride = tuple(max(s.stride[i] for s in ins) for i in range(2))
            outs = [_State(channels, ins[0].size, rf, stride)]  # type: ignore[arg-type]
        elif isinstance(module, CaffeSplit):
            outs = [ins[0]] * len(spec.tops)
        else:
            if len(ins) != 1:
                raise GeometryError(f"layer {spec.name!r} ({spec.type}) has {len(ins)} inputs")
            outs = [_step(spec.name, module, ins[0])]
        for top, st in zip(spec.tops, outs):
            blobs[top] = st
        rows.append(outs[0].info(spec.name))
    return rows


def receptive_fields(model: nn.Module, input_size: int | tuple[int, int] | None = None,
                     in_channels: int | None = None) -> list[LayerInfo]:
    """Every layer's ``(name, output shape, receptive field, stride)`` for a square input of ``input_size``.

    Args:
        model: a :class:`~preimage.models.networks.SequentialNet`, a sequential ``nn.Module`` or a
            :class:`~preimage.models.caffe.CaffeNet`.
        input_size: the input side (or ``(H, W)``); default: the network's nominal size (227 for
            AlexNet/CaffeNet, 224 for the VGG networks, the prototxt's for Caffe networks).
        in_channels: input channels (default: those of the first convolution / the prototxt's).

    Returns:
        One :class:`LayerInfo` per layer in execution order, without the input (column 0 of the
        tables).  For the paper's networks the receptive fields and strides are Tables 1-3.

    Raises:
        GeometryError: an unknown layer type, a non-sequential container, or an input too small for
            some layer (``"... does not fit the 5x5 input"``).
    """
    if isinstance(model, CaffeNet):
        return _caffe_fields(model, _size(input_size) if input_size is not None else None)
    size = _size(input_size if input_size is not None else _default_size(model))
    st = _State(in_channels if in_channels is not None else _first_conv_channels(model), size, (1, 1), (1, 1))
    steps = list(_leaves(model)) if next(model.children(), None) is not None else [("", model)]
    rows: list[LayerInfo] = []
    for name, module in steps:
        st = _step(name, module, st)
        rows.append(st.info(name))
    return rows


def layer_geometry(model: nn.Module, layer: str, input_size: int | tuple[int, int] | None = None) -> Geometry:
    """Stride and receptive field of ``layer`` as a :class:`preimage.Geometry` (for ``ModuleCut``)."""
    if isinstance(model, CaffeNet) and layer in model.layer_for_module:
        layer = model.layer_for_module[layer]
    for row in receptive_fields(model, input_size):
        if row.name == layer:
            return Geometry(stride=row.stride, receptive_field=row.receptive_field)
    raise GeometryError(f"no layer named {layer!r} in the network")


def minimum_input_size(model: nn.Module, limit: int = 4096) -> int:
    """The smallest square input side for which every layer has a non-empty output."""
    last: GeometryError | None = None
    for side in range(1, limit + 1):
        try:
            receptive_fields(model, side)
            return side
        except GeometryError as err:
            if "does not fit" not in str(err) and "inputs, gets" not in str(err):
                raise
            last = err
    raise GeometryError(f"no input size up to {limit} fits the network ({last})")
